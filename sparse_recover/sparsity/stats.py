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


STATISTICS: dict[str, type[Statistic]] = {cls.name: cls for cls in (SqNorm, Hessian)}
