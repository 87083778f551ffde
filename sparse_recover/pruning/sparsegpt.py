"""SparseGPT (Frantar & Alistarh 2023): adaptive mask selection with OBS weight reconstruction.

A faithful restatement of the reference `fasterprune`: float32 Hessian, dead inputs, damping as a
fraction of mean(diag H), U = upper Cholesky factor of H^-1, column sweep with lazy block updates,
mask chosen per 128-column block (unstructured) or per N:M group on the already-updated weights.

Differences from the reference, on purpose:
  * When a Cholesky factorisation fails, damping grows tenfold and the solve is retried (until
    `max_damp` x mean(diag H)); the damping used is returned and recorded. The reference crashes.
  * Unstructured blocks prune exactly floor(numel * s) entries unless rule="reference", which
    reproduces the reference's `score <= sorted[k]` threshold (one more entry, plus ties).
  * Several matrices that share one input (q/k/v, gate/up) may be solved in one sweep by stacking
    their rows (`segments`): rows are independent given H, and unstructured masks are still chosen
    per matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparse_recover.errors import ConfigError, NumericalError
from sparse_recover.sparsity.masks import ThresholdRule, keep_per_matrix
from sparse_recover.sparsity.patterns import NM, Pattern


@dataclass
class SparseGPTResult:
    weight: torch.Tensor  # (out, in) float32, pruned and updated
    keep: torch.Tensor  # (out, in) bool
    row_losses: torch.Tensor  # (out,) the reference's OBS loss per row (its 'error' is the sum)
    damp: float  # relative damping finally used
    retries: int  # Cholesky retries needed
    dead_columns: int


def _inverse_cholesky_upper(H: torch.Tensor, percdamp: float, max_damp: float) -> tuple[torch.Tensor, float, int]:
    """U = upper Cholesky factor of (H + damp*mean(diag H)*I)^-1, growing damp tenfold on failure."""
    diag = torch.arange(H.shape[0], device=H.device)
    mean_diag = torch.mean(torch.diag(H))
    damp_rel, attempt = percdamp, 0
    while True:
        Hd = H.clone()
        Hd[diag, diag] += damp_rel * mean_diag
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0 and torch.isfinite(U).all():
                return U, damp_rel, attempt
        if damp_rel * 10.0 > max_damp:
            raise NumericalError(
                f"SparseGPT: the Hessian is not positive definite even with damping {damp_rel:g}; "
                "use more calibration samples or check the activations for non-finite values"
            )
        damp_rel *= 10.0
        attempt += 1


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    pattern: Pattern,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
    rule: ThresholdRule = "exact",
    segments: list[int] | None = None,
    max_damp: float = 10.0,
    fixed_keep: torch.Tensor | None = None,
) -> SparseGPTResult:
    """Prune `weight` (out, in) given H (in, in). Neither input is modified.

    fixed_keep: a given (out, in) keep mask instead of choosing one (llm-compressor's
    `preserve_sparsity_mask`): the same column sweep re-solves the kept weights by OBS updates. With the
    mask SparseGPT itself chose, the result is SparseGPT's own, operation for operation."""
    if fixed_keep is not None and tuple(fixed_keep.shape) != tuple(weight.shape):
        raise ValueError(f"fixed_keep has shape {tuple(fixed_keep.shape)}, the weight {tuple(weight.shape)}")
    if fixed_keep is None and isinstance(pattern, NM) and blocksize % pattern.m:
        raise ConfigError(f"SparseGPT block size {blocksize} must be divisible by M={pattern.m}")
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone()
    rows, columns = W.shape
    segments = segments or [rows]
    if sum(segments) != rows:
        raise ValueError("segments must add up to the number of rows")
    bounds = [0]
    for size in segments:
        bounds.append(bounds[-1] + size)

    if not torch.isfinite(H).all():
        raise NumericalError("SparseGPT: the Hessian has non-finite entries (non-finite activations?)")
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    U, damp_used, retries = _inverse_cholesky_upper(H, percdamp, max_damp)
    del H

    prune = torch.zeros(rows, columns, dtype=torch.bool, device=W.device)
    losses = torch.zeros(rows, device=W.device)
    nm = fixed_keep is None and isinstance(pattern, NM)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        d1 = torch.diag(U1)
        d1sq = d1**2

        if fixed_keep is not None:
            mask1 = ~fixed_keep[:, i1:i2].to(W1.device, torch.bool)
        elif nm:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        else:
            score = W1**2 / d1sq.reshape(1, -1)
            mask1 = torch.empty_like(W1, dtype=torch.bool)
            for s0, s1 in zip(bounds[:-1], bounds[1:]):
                block = score[s0:s1]
                mask1[s0:s1] = ~keep_per_matrix(block, pattern.n_prune(block.numel()), rule)

        # The sweep, column by column, on the block transposed (count, rows) so that every column is one
        # contiguous row. Column i's error is (w - q) / d with q = w where kept and 0 where pruned, i.e.
        # w - q = w where pruned and exactly 0 elsewhere. The rank-1 update (each entry minus one rounded
        # product, as the reference's K=1 matmul) is applied to the columns after i only, so row i keeps
        # w, the value the column was pruned from; Q1 and the losses are formed for the whole block after
        # the sweep with the same arithmetic per entry.
        W1t = W1.t().contiguous()
        mask1t = mask1.t().contiguous()
        Err1t = torch.empty_like(W1t)
        for i in range(count):
            if nm and i % pattern.m == 0:
                tmp = W1t[i : i + pattern.m].t() ** 2 / d1sq[i : i + pattern.m].reshape(1, -1)
                idx = torch.sort(tmp, dim=1, stable=True).indices[:, : pattern.n_prune]
                mask1t.scatter_(0, (i + idx).t(), True)
            err1 = Err1t[i]
            torch.div(torch.where(mask1t[i], W1t[i], 0.0), U1[i, i], out=err1)
            if i + 1 < count:
                W1t[i + 1 :] -= torch.outer(U1[i, i + 1 :], err1)
        W1 = W1t.t().contiguous()
        mask1 = mask1t.t().contiguous()
        Err1 = Err1t.t().contiguous()

        diff = torch.where(mask1, W1, 0.0)
        W[:, i1:i2] = W1.masked_fill_(mask1, 0.0)
        prune[:, i1:i2] = mask1
        losses += torch.sum(diff**2 / d1sq.reshape(1, -1), 1) / 2
        W[:, i2:] -= Err1.matmul(U[i1:i2, i2:])

    return SparseGPTResult(
        weight=W,
        keep=~prune,
        row_losses=losses,
        damp=damp_used,
        retries=retries,
        dead_columns=int(dead.sum()),
    )
