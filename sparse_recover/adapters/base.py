"""The one base class every sparsity-preserving adapter derives from (peft's layer/merge split).

A `SparseAdapter` wraps a frozen linear (nn.Linear or GPT-2's Conv1D) whose pruned positions are
zero, together with its stored keep mask (True = keep). Subclasses define only their parameters,
their forward, and `merged_weight` (the float32 weight merging produces). This class implements
merge / unmerge / merged / safe merge once, and checks after every merge that every pruned
position is exactly zero: a merge that would revive a weight raises instead of writing.

The keep mask is not held as an (out, in) buffer: the frozen weight is zero exactly where it is
pruned, so `keep = (W != 0)` plus the (rare) kept positions whose weight happens to be zero, stored
as a flat index list. This equals the stored mask bit for bit and costs no memory in the usual
case (the LoRS reference recomputes `W != 0` the same way but forgets the kept zeros).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from sparse_recover.errors import AuditError, NumericalError


@dataclass(frozen=True)
class AdapterSettings:
    rank: int = 16
    scaling: float = 1.0
    dropout: float = 0.0
    exact_grad: bool = False  # LoRS only: exact masked gradient instead of straight-through


def kaiming_uniform_(t: torch.Tensor) -> torch.Tensor:
    """nn.Linear's default init (kaiming_uniform, a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    return nn.init.kaiming_uniform_(t, a=math.sqrt(5))


def weight_view(module: nn.Module) -> torch.Tensor:
    """The base weight as (out, in) (a transposed view for Conv1D)."""
    from sparse_recover.models import weight_2d

    return weight_2d(module)


def base_bias(module: nn.Module) -> torch.Tensor | None:
    return getattr(module, "bias", None)


class SparseAdapter(nn.Module):
    method: ClassVar[str] = ""

    # Shape rules of the low-rank adapters (LoRS, LoRA, SQFT); SPP overrides both.
    @staticmethod
    def check_shape(out_features: int, in_features: int, rank: int) -> str | None:
        if rank > min(out_features, in_features):
            return f"rank {rank} is larger than the layer's width {min(out_features, in_features)}"
        return None

    @staticmethod
    def trainable_formula(out_features: int, in_features: int, rank: int) -> int:
        return rank * (out_features + in_features)

    def __init__(self, base: nn.Module, keep: torch.Tensor | None, settings: AdapterSettings, name: str = ""):
        super().__init__()
        self.base = base
        self.layer_name = name
        for p in base.parameters():
            p.requires_grad_(False)
        w = weight_view(base)
        self.out_features, self.in_features = int(w.shape[0]), int(w.shape[1])
        if keep is None:
            keep = torch.ones(w.shape, dtype=torch.bool)
        keep = keep.to(device=w.device, dtype=torch.bool)
        if tuple(keep.shape) != tuple(w.shape):
            raise ValueError(f"{name}: mask shape {tuple(keep.shape)} != weight shape {tuple(w.shape)}")
        with torch.no_grad():
            revived = int(((w != 0) & ~keep).sum())
            if revived:
                raise AuditError(f"{name}: {revived} pruned weights are not zero before adaptation")
            kept_zeros = ((w == 0) & keep).reshape(-1).nonzero().reshape(-1)
        self.register_buffer("kept_zeros", kept_zeros, persistent=False)
        self.settings = settings
        self.rank = settings.rank
        self.scaling = float(settings.scaling)
        self.dropout = nn.Dropout(settings.dropout) if settings.dropout > 0 else nn.Identity()
        self.merged = False
        self._original: torch.Tensor | None = None
        self.last_merge_max_pruned_delta: float | None = None

    # ------------------------------------------------------------------ mask

    @property
    def weight(self) -> torch.Tensor:
        return weight_view(self.base)

    def keep_mask(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The stored keep mask, rebuilt from the frozen weight's zeros plus the kept zeros."""
        w = self.weight if weight is None else weight
        keep = (w != 0).contiguous()
        if self.kept_zeros.numel():
            keep.view(-1)[self.kept_zeros.to(keep.device)] = True
        return keep

    # ------------------------------------------------------------------ subclass API

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def merged_weight(self, keep: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """The (out, in) float32 weight that merging writes (pruned positions must come out zero)."""
        raise NotImplementedError

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if not n.startswith("base.")}

    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.adapter_parameters().values())

    # ------------------------------------------------------------------ forward / merge

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        return self.adapted_forward(x)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, remember: bool = True) -> float:
        """Fold the adapter into the base weight. Returns the largest |dW| at pruned positions (0.0).

        safe_merge: also refuse non-finite merged weights. remember: keep the original weight so
        that `unmerge` restores it bit for bit (costs one weight copy).
        """
        if self.merged:
            return 0.0
        w = self.weight
        keep = self.keep_mask()
        new = self.merged_weight(keep).to(w.dtype)
        if safe_merge and not torch.isfinite(new).all():
            raise NumericalError(f"{self.layer_name}: merging gives non-finite weights; the base is left untouched")
        pruned_delta = new.masked_fill(keep, 0).abs()
        worst = float(pruned_delta.max()) if pruned_delta.numel() else 0.0
        if worst != 0.0 or not math.isfinite(worst):
            bad = int((pruned_delta != 0).sum())
            raise AuditError(f"{self.layer_name}: merging would revive {bad} pruned weights "
                             f"(largest |dW| {worst:g}); the base is left untouched")
        if remember:
            self._original = w.detach().clone()
        w.copy_(new)
        self.kept_zeros = ((new == 0) & keep).reshape(-1).nonzero().reshape(-1)
        self.merged = True
        self.last_merge_max_pruned_delta = worst
        return worst

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        if self._original is None:
            raise RuntimeError(f"{self.layer_name}: merged with remember=False; cannot restore the base weight")
        w = self.weight
        keep = self.keep_mask()
        w.copy_(self._original)
        self._original = None
        self.kept_zeros = ((w == 0) & keep).reshape(-1).nonzero().reshape(-1)
        self.merged = False
