"""Mask selection in each comparison group. Pure tensor functions; True = keep.

Ties break by a stable sort (lower column index is pruned first), so equal scores always give the
same mask. The reference code uses torch.topk for N:M, whose tie order is unspecified; without
ties both select the same entries.
"""

from __future__ import annotations

from typing import Literal

import torch

from sparse_recover.errors import ConfigError
from sparse_recover.sparsity.patterns import NM

ThresholdRule = Literal["exact", "reference"]


def _argsort(score: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return torch.sort(score, dim=dim, stable=True).indices


def _prune_k_lowest(score: torch.Tensor, k: int) -> torch.Tensor:
    """Per row of a 2-D score, mark the k lowest entries (ties broken by lower column index).

    Equal to taking the first k indices of a stable ascending sort, but O(n) per row: the k-th
    smallest value is the threshold, everything below it is pruned, and the remaining budget is
    filled with the leftmost entries equal to the threshold.
    """
    if k <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    k = min(k, score.shape[1])
    thresh = torch.kthvalue(score, k, dim=1, keepdim=True).values
    below = score < thresh
    equal = score == thresh
    room = k - below.sum(dim=1, keepdim=True)
    if bool((equal.sum(dim=1, keepdim=True) == room).all()):
        # the usual case, no surplus ties at the threshold: every equal entry fits the budget (the same
        # mask as below, without the scan)
        return below | equal
    return below | (equal & (torch.cumsum(equal, dim=1) <= room))


def keep_per_row(score: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Prune the `n_prune` lowest scores of every row (Wanda's comparison group)."""
    if n_prune <= 0:
        return torch.ones_like(score, dtype=torch.bool)
    return ~_prune_k_lowest(score, n_prune)


def keep_per_matrix(score: torch.Tensor, n_prune: int, rule: ThresholdRule = "exact") -> torch.Tensor:
    """Prune the `n_prune` lowest scores of the whole matrix (magnitude's / SparseGPT-block's group).

    rule="exact" prunes exactly n_prune entries (stable order). rule="reference" reproduces the
    reference code: threshold = sorted[n_prune], prune every score <= threshold, which prunes
    n_prune + 1 entries plus any ties.
    """
    flat = score.reshape(-1)
    if rule == "reference":
        if n_prune >= flat.numel():
            return torch.zeros_like(score, dtype=torch.bool)
        thresh = torch.kthvalue(flat, n_prune + 1).values  # == sorted(flat)[n_prune]
        return ~(score <= thresh)
    if n_prune <= 0:
        return torch.ones_like(score, dtype=torch.bool)
    return ~_prune_k_lowest(flat.unsqueeze(0), n_prune).view_as(score)


# Up to this M, N:M selection ranks each group by pairwise comparisons (M passes over the matrix, no sort);
# above it, a stable sort of every group. Both give the same mask.
_RANK_MAX_M = 16


def _stable_rank(grouped: torch.Tensor) -> torch.Tensor:
    """Position of every entry of each group (last dim) in a stable ascending sort of its group.

    rank_j = #{i < j : s_i <= s_j} + #{i > j : s_i < s_j}, equal to argsort(argsort(stable=True)): one
    comparison per pair of positions, M(M-1)/2 passes over 1/M of the matrix (no sort, no NaN: see keep_nm).
    """
    m = grouped.shape[-1]
    rank = torch.zeros(grouped.shape, dtype=torch.uint8, device=grouped.device)
    for i in range(m):
        for j in range(i + 1, m):
            first = grouped[..., i] <= grouped[..., j]  # i sorts before j (ties: the lower index first)
            rank[..., j] += first
            rank[..., i] += ~first
    return rank


def keep_nm(score: torch.Tensor, nm: NM) -> torch.Tensor:
    """Within each row and each aligned group of M input columns, keep the N highest scores."""
    rows, cols = score.shape
    if cols % nm.m:
        raise ConfigError(f"input width {cols} is not divisible by M={nm.m}")
    grouped = score.reshape(rows, cols // nm.m, nm.m)
    if nm.m <= _RANK_MAX_M and not bool(torch.isnan(score).any()):  # a sort puts NaN last; comparisons cannot
        return (_stable_rank(grouped) >= nm.n_prune).reshape(rows, cols)
    keep = torch.ones_like(grouped, dtype=torch.bool)
    idx = _argsort(grouped, dim=2)[..., : nm.n_prune]
    keep.scatter_(2, idx, False)
    return keep.reshape(rows, cols)


def count_kept(keep: torch.Tensor) -> int:
    """Number of True entries of a mask (count_nonzero: about 20x faster than a bool sum on the CPU)."""
    return int(torch.count_nonzero(keep))


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry is finite, in one reduction without a mask (min/max propagate NaN and show inf)."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t.detach())
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def nm_group_counts(keep: torch.Tensor, m: int) -> torch.Tensor:
    """Kept count of every aligned group of m input columns, shape (rows, cols // m)."""
    rows, cols = keep.shape
    return keep.reshape(rows, cols // m, m).sum(dim=2)
