"""Streaming per-linear input statistics, float32, exactly the reference running means.

`n` counts sequences (not tokens), as in the reference code, so processing the calibration set in
batches of b sequences gives the same statistics as one at a time up to float rounding.
"""

from __future__ import annotations

import math

import torch


class Statistic:
    """Accumulates one statistic from a linear layer's inputs, shaped (..., in_features)."""

    name = "base"

    def __init__(self, columns: int, device: torch.device):
        self.columns = columns
        self.device = device
        self.nsamples = 0

    @staticmethod
    def _flatten(x: torch.Tensor) -> tuple[torch.Tensor, int]:
        if x.dim() == 2:
            x = x.unsqueeze(0)
        b = x.shape[0]
        return x.reshape(-1, x.shape[-1]).float(), b

    def add(self, x: torch.Tensor) -> None:
        raise NotImplementedError


class SqNorm(Statistic):
    """Wanda's scaler_row: running mean over sequences of the per-column sum of squared inputs."""

    name = "sq_norm"

    def __init__(self, columns: int, device: torch.device):
        super().__init__(columns, device)
        self.value = torch.zeros(columns, dtype=torch.float32, device=device)

    def add(self, x: torch.Tensor) -> None:
        x, b = self._flatten(x)
        self.value *= self.nsamples / (self.nsamples + b)
        self.nsamples += b
        self.value += torch.linalg.vector_norm(x, ord=2, dim=0) ** 2 / self.nsamples


class Hessian(Statistic):
    """SparseGPT's H = (2/N) sum over tokens of x x^T, accumulated as the reference does."""

    name = "hessian"

    def __init__(self, columns: int, device: torch.device):
        super().__init__(columns, device)
        self.value = torch.zeros(columns, columns, dtype=torch.float32, device=device)

    def add(self, x: torch.Tensor) -> None:
        x, b = self._flatten(x)
        self.value *= self.nsamples / (self.nsamples + b)
        self.nsamples += b
        x = math.sqrt(2 / self.nsamples) * x
        self.value.addmm_(x.t(), x)


class DSnoTStats(Statistic):
    """DSnoT's per-column statistics, as the reference `WrappedGPT.add_batch` accumulates them.

    Attributes, each a float32 tensor of shape (in_features,):

    * `sq_norm`: Wanda's scaler, the running mean over sequences of the per-sequence sum of squared
      inputs (the same update as `SqNorm`).
    * `sum`: the same running scheme applied to the plain sum, i.e. the mean over sequences of the
      per-sequence column sum (= sequence length x the per-token mean). DSnoT uses it as the
      "expectation", so the reconstruction error and the update threshold are in units of
      W x (per-sequence sum of inputs).
    * `var`: the token-weighted average of per-call population variances (unbiased=False), merged as
      var <- (var * T + var_call * L) / (T + L) with T the tokens seen before. This is the reference's
      formula, not the pooled variance: differences between the means of sequences are ignored.
    * `ntokens`: T, the tokens merged into `var` so far; `nsamples` counts sequences.

    `value` is `sq_norm` (the same tensor), so code that reads `stat.value` gets the Wanda scaler;
    the DSnoT command reads the three attributes.

    The reference calls `add_batch` once per sequence, so its "per-call" variance is a per-sequence
    variance. When the engine passes a batch of b sequences shaped (b, L, C), the variance of each
    sequence is computed separately and merged as b consecutive calls, so batched accumulation equals
    one-sequence-at-a-time accumulation (`var` bit for bit, `sq_norm`/`sum` up to float rounding).
    A 2-D input (L, C) is one sequence. The reference's unused `mean` is not tracked.
    """

    name = "dsnot"

    def __init__(self, columns: int, device: torch.device):
        super().__init__(columns, device)
        self.sq_norm = torch.zeros(columns, dtype=torch.float32, device=device)
        self.sum = torch.zeros(columns, dtype=torch.float32, device=device)
        self.var = torch.zeros(columns, dtype=torch.float32, device=device)
        self.ntokens = 0

    @property
    def value(self) -> torch.Tensor:
        return self.sq_norm

    def add(self, x: torch.Tensor) -> None:
        if x.dim() == 2:
            x = x.unsqueeze(0)
        b = x.shape[0]
        seqs = x.reshape(b, -1, x.shape[-1]).float()
        length = seqs.shape[1]
        # per-sequence population variances, merged one sequence at a time as the reference does
        var_seq = torch.var(seqs, dim=1, unbiased=False)
        for k in range(b):
            if self.ntokens == 0:
                self.var = var_seq[k].clone()
            else:
                self.var = (self.var * self.ntokens + var_seq[k] * length) / (self.ntokens + length)
            self.ntokens += length
        flat = seqs.reshape(-1, seqs.shape[-1])
        self.sq_norm *= self.nsamples / (self.nsamples + b)
        self.sum *= self.nsamples / (self.nsamples + b)
        self.nsamples += b
        self.sq_norm += torch.linalg.vector_norm(flat, ord=2, dim=0) ** 2 / self.nsamples
        self.sum += flat.sum(dim=0) / self.nsamples


STATISTICS: dict[str, type[Statistic]] = {cls.name: cls for cls in (SqNorm, Hessian, DSnoTStats)}
