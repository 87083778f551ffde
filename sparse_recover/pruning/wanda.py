"""Wanda: score |W_ij| * sqrt(scaler_j), where scaler is the running mean of squared input norms.

Comparison group: each output row (unstructured), or each aligned N:M group. The optional variant
(Wanda appendix, `--use_variant` in the reference) prunes in each row the prefix of ascending scores
whose cumulative sum stays under alpha * row total, with alpha found by the reference's bisection
so that the layer meets its sparsity.
"""

from __future__ import annotations

import torch

from sparse_recover.sparsity.masks import keep_nm, keep_per_row
from sparse_recover.sparsity.patterns import NM, Pattern


def wanda_score(weight: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    return weight.detach().abs().float() * torch.sqrt(sq_norm.float()).reshape(1, -1)


def wanda_keep(weight: torch.Tensor, sq_norm: torch.Tensor, pattern: Pattern, variant: bool = False) -> torch.Tensor:
    score = wanda_score(weight, sq_norm)
    if isinstance(pattern, NM):
        return keep_nm(score, pattern)
    if variant:
        return _variant_keep(score, pattern.sparsity)
    return keep_per_row(score, pattern.n_prune(score.shape[1]))


def _variant_mask(sorted_vals, score, cumsum, row_sum, alpha: float):
    qualifies = cumsum <= (row_sum * alpha).reshape(-1, 1)
    count = qualifies.sum(dim=1, keepdim=True)
    # The reference gathers at count-1 and crashes when no entry qualifies; such a row prunes nothing.
    thresh = torch.gather(sorted_vals, 1, (count - 1).clamp(min=0))
    thresh = torch.where(count > 0, thresh, torch.full_like(thresh, -float("inf")))
    prune = score <= thresh
    # float32 tensor, as in the reference, so the bisection stops at the same alpha
    return prune, prune.sum() / prune.numel()


def _variant_keep(score: torch.Tensor, target: float) -> torch.Tensor:
    sorted_vals = torch.sort(score, dim=-1, stable=True).values
    cumsum = torch.cumsum(sorted_vals, dim=1)
    row_sum = score.sum(dim=1)
    alpha, lo, hi = 0.4, 0.0, 0.8
    prune, current = _variant_mask(sorted_vals, score, cumsum, row_sum, alpha)
    while bool(torch.abs(current - target) > 0.001) and (hi - lo) >= 0.001:
        if bool(current > target):
            alpha, hi = (alpha + lo) / 2.0, alpha
        else:
            alpha, lo = (alpha + hi) / 2.0, alpha
        prune, current = _variant_mask(sorted_vals, score, cumsum, row_sum, alpha)
    return ~prune
