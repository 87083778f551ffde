"""RIA (relative importance and activations; Zhang et al., ICLR 2024), as its reference `prune_ria` does it.

Score = (|W_ij| / sum_i |W_ij| + |W_ij| / sum_j |W_ij|) * sqrt(scaler_j) ** a, where scaler is Wanda's
running mean of squared input norms (the `sq_norm` statistic) and a defaults to 0.5. The first term
divides by the column sum (over output rows), the second by the row sum (over inputs).

Comparison group, following the reference defaults: unstructured pruning compares the whole matrix
(the reference's `--per_outneuron`, "Wanda's tactic", is off by default; `per_row=True` gives it);
N:M compares each aligned group of M inputs of a row. Rule "reference" reproduces the reference's
per-matrix threshold (prune every score <= sorted[int(numel*s)]); "exact" prunes int(numel*s).

Deliberate differences: the score is computed in float32 (the reference computes the relative
importance in the model's dtype, fp16 there); a weight whose row or column is all zero scores 0
(the reference gets 0/0 = NaN, which sorts last and is never pruned).
"""

from __future__ import annotations

import torch

from sparse_recover.sparsity.masks import ThresholdRule, keep_nm, keep_per_matrix, keep_per_row
from sparse_recover.sparsity.patterns import NM, Pattern


def ria_score(weight: torch.Tensor, sq_norm: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    w = weight.detach().abs().float()
    relative = w / torch.sum(w, dim=0) + w / torch.sum(w, dim=1).reshape(-1, 1)
    relative = torch.nan_to_num(relative, nan=0.0)  # 0/0 only: an all-zero row or column
    return relative * torch.sqrt(sq_norm.float().reshape(1, -1)) ** alpha


def ria_keep(weight: torch.Tensor, sq_norm: torch.Tensor, pattern: Pattern, alpha: float = 0.5,
             rule: ThresholdRule = "exact", per_row: bool = False) -> torch.Tensor:
    """Keep mask (out, in) by the RIA score. `weight` is (out, in) and is not modified."""
    score = ria_score(weight, sq_norm, alpha)
    if isinstance(pattern, NM):
        return keep_nm(score, pattern)
    if per_row:  # the reference's --per_outneuron: a stable per-row sort, exactly int(in * s) per row
        return keep_per_row(score, pattern.n_prune(score.shape[1]))
    return keep_per_matrix(score, pattern.n_prune(score.numel()), rule)
