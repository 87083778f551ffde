"""DSnoT (Dynamic Sparse No Training): training-free prune-and-regrow of a mask, row by row.

A restatement of the reference `prune_DSnoT` (zyxxmu/DSnoT, lib/prune.py; algorithms.md section 5) as
pure tensor functions. Masks are torch.bool (out, in) with True = keep. The weight is the DENSE
weight; its values are never changed, only the mask.

Quantities, per output row i (all rows at once, vectorised with per-row pointer pairs, gather and
scatter; the only Python loop is over cycles):

* contribution  c_ij = W_ij * sum_j, where `sum` is `DSnoTStats.sum` (the mean over calibration
  sequences of the per-sequence column sum of the inputs, i.e. seqlen x the per-token mean);
* reconstruction error  eps_i = sum over pruned j of c_ij: the expected dense output minus the
  expected sparse output of row i. Units: W x (per-sequence sum of inputs). `threshold` is in the
  same absolute units (reference default 0.1 with 2048-token sequences; it is scale dependent);
* grow list: every column sorted ascending (stable) by g_ij = c_ij / var_j^pow for initially pruned
  j and 0 for kept j (pow == 0 skips the division); a low pointer (most negative first) and a high
  pointer (most positive first);
* prune list (unstructured): the initially kept weights in ascending Wanda order |W| sqrt(sq_norm)
  (always Wanda, whatever made the initial mask), negative contributors first in ascending-Wanda
  order and positive contributors last in descending-Wanda order (the reference's
  `return_reorder_indice`), read by a low pointer (negatives) and a high pointer (positives);
  kept weights with c == 0 are never pruned.

Each cycle, every row: grow r from the high end if eps > 0 else from the low end; prune p from the
positive end if eps < 0 else from the negative end (N:M: p is the kept weight of r's aligned M-group
with the smallest initial metric); the sticky `active` flag becomes active & (|eps| > threshold),
eps taken BEFORE the swap, & (optionally, always for N:M) sign(eps + c_p - c_r) == sign(eps_initial);
an active row swaps (prune p, keep r, eps += c_p - c_r). A row that fails the test never swaps
again. The loop stops after `max_cycles` cycles or when no row is active.

Deviation from the reference, only where the reference breaks its own budget: the reference advances
every pointer every cycle without bounds, so on narrow layers (or long runs) a pointer walks past its
candidates: the grow pointer onto kept weights (the low grow list is the prefix of the grow order
made of initially pruned columns, the high list the suffix), the prune pointer into zero or
wrong-sign contributors, or past the end (an out-of-range gather, i.e. a crash). Here a row's pointer
stops at the end of its candidate list: a row whose chosen list is exhausted stops swapping (counted
in `list_end_rows`), so per-row kept counts (unstructured) and every N:M group count never change.
For N:M with more than half the group pruned (e.g. keep 1 of 4), r's group can run out of kept
weights; that proposal is skipped (no swap, the grow pointer advances, the row stays active; counted
in `skipped_groups`), where the reference would regrow r without pruning anything. While every
pointer stays inside its list (always on wide layers) the masks are bit-identical to the reference.
Stopped rows need no pointer updates: the reference's stopped rows only re-write unchanged entries
while their pointers are inside the lists.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparse_recover.errors import ConfigError
from sparse_recover.pruning.wanda import wanda_score
from sparse_recover.sparsity.patterns import NM, Pattern, Unstructured


@dataclass(frozen=True)
class DSnoTSettings:
    """Reference defaults: --max_cycle_time 50, --update_threshold 0.1, --pow_of_var_regrowing 1.

    sign_check applies to the unstructured path only (the reference's --without_same_sign is
    effectively always True there, hence False by default); the N:M path always applies it.
    """

    max_cycles: int = 50
    threshold: float = 0.1
    pow_var_regrow: float = 1.0
    sign_check: bool = False


@dataclass(frozen=True)
class ReconstructionError:
    """Summary of the per-row reconstruction error eps_i (units: W x per-sequence input sum)."""

    mean_abs: float  # mean over rows of |eps_i|
    sum_sq: float  # sum over rows of eps_i^2

    @staticmethod
    def of(eps: torch.Tensor) -> "ReconstructionError":
        eps = eps.double()
        return ReconstructionError(mean_abs=float(eps.abs().mean()) if eps.numel() else 0.0,
                                   sum_sq=float((eps * eps).sum()))


@dataclass
class DSnoTResult:
    keep: torch.Tensor  # (out, in) bool, True = keep
    swaps: int  # accepted swaps, all rows
    swaps_per_row: torch.Tensor  # (out,) int64
    error_before: ReconstructionError  # eps of keep_init
    error_after: ReconstructionError  # eps of keep, recomputed from the final mask
    cycles_run: int
    eps_before: torch.Tensor  # (out,) float32, per-row eps of keep_init
    eps_after: torch.Tensor  # (out,) float32, per-row eps of keep (recomputed, not the running value)
    list_end_rows: int = 0  # rows that stopped because their candidate list ran out (see module doc)
    skipped_groups: int = 0  # N:M proposals skipped because r's group had no kept weight left


def dsnot_contribution(weight: torch.Tensor, col_sum: torch.Tensor) -> torch.Tensor:
    """c_ij = W_ij * sum_j in float32 (the reference's DSnoT_metric)."""
    return weight.detach().float() * col_sum.detach().float().to(weight.device).reshape(1, -1)


def reconstruction_error(weight: torch.Tensor, keep: torch.Tensor, col_sum: torch.Tensor) -> torch.Tensor:
    """eps_i = sum of c_ij over the pruned j of row i, shape (out,), float32."""
    c = dsnot_contribution(weight, col_sum)
    return torch.where(keep.to(c.device), torch.zeros((), dtype=c.dtype, device=c.device), c).sum(dim=1)


def dsnot_initial_keep(weight: torch.Tensor, sq_norm: torch.Tensor, pattern: Pattern,
                       initial_metric: torch.Tensor | None = None) -> torch.Tensor:
    """The reference's initial mask: prune the int(C * s) smallest of each row (stable sort), or the
    M - N smallest of each aligned M-group. The metric defaults to Wanda's |W| sqrt(sq_norm), in which
    case the mask equals `wanda_keep`. (The reference's N:M path uses an unstable sort; the two agree
    without ties.)"""
    metric = _initial_metric(weight, sq_norm, initial_metric)
    rows, cols = metric.shape
    if isinstance(pattern, NM):
        _check_nm(cols, pattern)
        grouped = metric.reshape(rows, cols // pattern.m, pattern.m)
        keep = torch.ones_like(grouped, dtype=torch.bool)
        keep.scatter_(2, torch.sort(grouped, dim=2, stable=True).indices[..., : pattern.n_prune], False)
        return keep.reshape(rows, cols)
    if not isinstance(pattern, Unstructured):
        raise ConfigError(f"DSnoT supports unstructured or N:M patterns, got {pattern!r}")
    keep = torch.ones_like(metric, dtype=torch.bool)
    keep.scatter_(1, torch.sort(metric, dim=1, stable=True).indices[:, : pattern.n_prune(cols)], False)
    return keep


@torch.no_grad()
def dsnot_refine(weight: torch.Tensor, keep_init: torch.Tensor, sq_norm: torch.Tensor, col_sum: torch.Tensor,
                 col_var: torch.Tensor, pattern: Pattern, settings: DSnoTSettings = DSnoTSettings(),
                 initial_metric: torch.Tensor | None = None) -> DSnoTResult:
    """Refine `keep_init` (bool (out, in), True = keep) for the dense `weight` by DSnoT swaps.

    sq_norm, col_sum, col_var: `DSnoTStats.sq_norm`, `.sum`, `.var`, each (in,). pattern: `Unstructured`
    (any per-row counts in keep_init are preserved) or `NM` (every M-group keeps its count).
    initial_metric (N:M only): the metric that chose keep_init, used to pick p inside r's group;
    defaults to the Wanda score. Inputs are not modified.
    """
    if settings.max_cycles < 0:
        raise ConfigError(f"DSnoT max_cycles must be >= 0, got {settings.max_cycles}")
    if weight.dim() != 2:
        raise ConfigError(f"DSnoT expects a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    if tuple(keep_init.shape) != (rows, cols):
        raise ConfigError(f"mask shape {tuple(keep_init.shape)} does not match weight shape {(rows, cols)}")
    for label, vec in (("sq_norm", sq_norm), ("sum", col_sum), ("var", col_var)):
        if vec.numel() != cols:
            raise ConfigError(f"DSnoT statistic {label} has {vec.numel()} entries, the weight has {cols} inputs")
    if isinstance(pattern, NM):
        _check_nm(cols, pattern)
    elif not isinstance(pattern, Unstructured):
        raise ConfigError(f"DSnoT supports unstructured or N:M patterns, got {pattern!r}")

    dev = weight.device
    c = dsnot_contribution(weight, col_sum)  # (rows, cols) float32
    keep0 = keep_init.detach().to(device=dev, dtype=torch.bool)
    keep = keep0.clone()

    zero = torch.zeros((), dtype=c.dtype, device=dev)
    grow_metric = torch.where(keep0, zero, c)
    eps = grow_metric.sum(dim=1, keepdim=True)  # (rows, 1)
    eps_before = eps.reshape(-1).clone()
    sigma = torch.sign(eps)
    if settings.pow_var_regrow:
        grow_metric = grow_metric / torch.pow(col_var.detach().float().to(dev).reshape(1, -1), settings.pow_var_regrow)
    grow_order = torch.sort(grow_metric, dim=1, stable=True).indices
    del grow_metric
    # candidate lists: the leading / trailing runs of initially pruned columns in the grow order
    pruned_in_order = (~keep0.gather(1, grow_order)).to(torch.int64)
    grow_lo_len = pruned_in_order.cumprod(dim=1).sum(dim=1, keepdim=True)
    grow_hi_len = pruned_in_order.flip(1).cumprod(dim=1).sum(dim=1, keepdim=True)
    del pruned_in_order
    grow_ptr = torch.zeros(rows, 2, dtype=torch.int64, device=dev)  # [low, high]
    grow_ptr[:, 1] = cols - 1
    step = torch.tensor([[1, -1]], dtype=torch.int64, device=dev).expand(rows, 2)

    is_nm = isinstance(pattern, NM)
    if is_nm:
        state = _initial_metric(weight, sq_norm, initial_metric).clone()
        state.masked_fill_(~keep0, float("inf"))
        available = keep0.clone()  # kept initially and not yet proposed as p
        offsets = torch.arange(pattern.m, device=dev).reshape(1, -1)
    else:
        prune_order, n_neg, n_pos = _prune_order(weight, sq_norm, c, keep0)
        prune_ptr = torch.zeros(rows, 2, dtype=torch.int64, device=dev)  # [negatives, positives]
        prune_ptr[:, 1] = cols - 1

    active = torch.ones(rows, 1, dtype=torch.bool, device=dev)
    swaps_per_row = torch.zeros(rows, 1, dtype=torch.int64, device=dev)
    list_end = torch.zeros(rows, 1, dtype=torch.bool, device=dev)
    skipped = torch.zeros((), dtype=torch.int64, device=dev)
    threshold = settings.threshold
    cycles = 0
    while cycles < settings.max_cycles and bool(active.any()):
        cycles += 1
        # grow: the pruned weight with the largest sign(eps) * c / var^pow still in the list
        g_side = (eps > 0).to(torch.int64)
        g_pos = grow_ptr.gather(1, g_side)
        g_ok = torch.where(g_side.bool(), (g_pos >= cols - grow_hi_len) & (g_pos >= grow_ptr[:, :1]),
                           (g_pos < grow_lo_len) & (g_pos <= grow_ptr[:, 1:]))
        r = grow_order.gather(1, g_pos.clamp(0, cols - 1))
        c_r = c.gather(1, r)
        thr_ok = eps.abs() > threshold

        if is_nm:
            start = r - r % pattern.m
            block = start + offsets
            p = start + torch.topk(state.gather(1, block), 1, dim=1, largest=False).indices
            p_ok = available.gather(1, p)
            c_p = c.gather(1, p)
            after = eps + c_p - c_r
            live = active & thr_ok & g_ok
            list_end |= active & thr_ok & ~g_ok
            proposed = live & p_ok
            skip = live & ~p_ok
            skipped += skip.sum()
            accept = proposed & (torch.sign(after) == sigma)
            # p is never proposed again, whether or not the swap is accepted (the reference sets its
            # metric to row max + 1, which is +inf there because pruned entries already hold +inf)
            state.scatter_(1, p, torch.where(proposed, float("inf"), state.gather(1, p)))
            available.scatter_(1, p, available.gather(1, p) & ~proposed)
            moved = accept | skip
        else:
            # prune: the kept opposite-sign contributor with the smallest Wanda score still in the list
            p_side = (eps < 0).to(torch.int64)
            p_pos = prune_ptr.gather(1, p_side)
            p_ok = torch.where(p_side.bool(), p_pos >= cols - n_pos, p_pos < n_neg)
            p = prune_order.gather(1, p_pos.clamp(0, cols - 1))
            c_p = c.gather(1, p)
            after = eps + c_p - c_r
            cond = active & thr_ok
            list_end |= cond & ~(g_ok & p_ok)
            cond = cond & g_ok & p_ok
            if settings.sign_check:
                cond = cond & (torch.sign(after) == sigma)
            accept = cond
            prune_ptr.scatter_(1, p_side, p_pos + step.gather(1, p_side) * accept.to(torch.int64))
            moved = accept

        keep.scatter_(1, p, keep.gather(1, p) & ~accept)
        keep.scatter_(1, r, keep.gather(1, r) | accept)
        eps = eps + torch.where(accept, c_p, zero)
        eps = eps - torch.where(accept, c_r, zero)
        grow_ptr.scatter_(1, g_side, g_pos + step.gather(1, g_side) * moved.to(torch.int64))
        swaps_per_row += accept.to(torch.int64)
        active = moved

    eps_after = torch.where(keep, zero, c).sum(dim=1)
    swaps_per_row = swaps_per_row.reshape(-1)
    return DSnoTResult(
        keep=keep,
        swaps=int(swaps_per_row.sum()),
        swaps_per_row=swaps_per_row,
        error_before=ReconstructionError.of(eps_before),
        error_after=ReconstructionError.of(eps_after),
        cycles_run=cycles,
        eps_before=eps_before,
        eps_after=eps_after,
        list_end_rows=int(list_end.sum()),
        skipped_groups=int(skipped),
    )


def _initial_metric(weight: torch.Tensor, sq_norm: torch.Tensor, initial_metric: torch.Tensor | None) -> torch.Tensor:
    if initial_metric is None:
        return wanda_score(weight, sq_norm.to(weight.device))
    if tuple(initial_metric.shape) != tuple(weight.shape):
        raise ConfigError(f"initial metric shape {tuple(initial_metric.shape)} does not match weight {tuple(weight.shape)}")
    return initial_metric.detach().float().to(weight.device)


def _check_nm(cols: int, nm: NM) -> None:
    if cols % nm.m:
        raise ConfigError(f"input width {cols} is not divisible by M={nm.m}")


def _prune_order(weight: torch.Tensor, sq_norm: torch.Tensor, c: torch.Tensor, keep0: torch.Tensor):
    """The reference's pruning list, one (rows, cols) index tensor per matrix.

    Kept weights sorted by ascending Wanda score (stable); then positions [0, n_neg) hold the negative
    contributors in that order and positions [cols - n_pos, cols) the positive contributors in reverse
    order, so reading from the end gives the smallest-Wanda positive first (return_reorder_indice).
    Everything else (pruned columns, zero contributors) sits in between and is never read.
    """
    rows, cols = c.shape
    wanda = wanda_score(weight, sq_norm.to(weight.device)).masked_fill(~keep0, float("inf"))
    order = torch.sort(wanda, dim=1, stable=True).indices
    kept = keep0.gather(1, order)
    c_o = c.gather(1, order)
    neg = kept & (c_o < 0)
    pos = kept & (c_o > 0)
    position = torch.arange(cols, device=c.device).reshape(1, -1).expand(rows, cols)
    key = torch.where(neg, position, torch.where(pos, 3 * cols - 1 - position, cols + position))
    prune_order = order.gather(1, torch.sort(key, dim=1).indices)
    return prune_order, neg.sum(dim=1, keepdim=True), pos.sum(dim=1, keepdim=True)
