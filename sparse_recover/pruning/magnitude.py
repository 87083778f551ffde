"""Magnitude pruning: score |W|; one comparison group per matrix (unstructured) or per N:M group."""

from __future__ import annotations

import torch

from sparse_recover.sparsity.masks import ThresholdRule, keep_nm, keep_per_matrix
from sparse_recover.sparsity.patterns import NM, Pattern


def magnitude_keep(weight: torch.Tensor, pattern: Pattern, rule: ThresholdRule = "exact") -> torch.Tensor:
    """Keep mask (out, in) for |W|. `weight` is (out, in) and is not modified."""
    score = weight.detach().abs().float()
    if isinstance(pattern, NM):
        return keep_nm(score, pattern)
    return keep_per_matrix(score, pattern.n_prune(score.numel()), rule)
