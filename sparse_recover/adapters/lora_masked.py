"""LoRA baselines on a sparse model (peft naming: A (r, in) kaiming, B (out, r) zeros, s = alpha / r).

* `lora-remask` (LoRA* in the SPP paper): plain LoRA trained on the sparse model,
      y = x W^T + b + s * B A dropout(x),
  merged, then multiplied by the stored mask: W <- (W + s B A) * M. Training does not see the mask,
  so merging changes the model (that loss is what the baseline measures); the merge records it.
* `sqft` (SparsePEFT, the naive masked LoRA the LoRS paper measures against): the mask inside the
  forward through plain autograd,
      W_eff = W + s * (B A) * M,   y = dropout(x) W_eff^T + b,
  which materialises (out, in) tensors for backward (the overhead LoRS removes). Merge:
  W <- W + s (B A) * M, identical to the trained forward.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparse_recover.adapters.base import AdapterSettings, SparseAdapter, base_bias, kaiming_uniform_


class _LoraFactors(SparseAdapter):
    def __init__(self, base: nn.Module, keep: torch.Tensor | None, settings: AdapterSettings, name: str = ""):
        super().__init__(base, keep, settings, name)
        r = settings.rank
        dev = self.weight.device
        self.lora_A = nn.Parameter(kaiming_uniform_(torch.empty(r, self.in_features, device=dev)))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=dev))

    def _delta(self) -> torch.Tensor:
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling


class LoraRemaskAdapter(_LoraFactors):
    method = "lora-remask"

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        xd = self.dropout(x).to(self.lora_A.dtype)
        branch = F.linear(F.linear(xd, self.lora_A), self.lora_B) * self.scaling
        return y + branch.to(y.dtype)

    def merged_weight(self, keep: torch.Tensor) -> torch.Tensor:
        return (self.weight.float() + self._delta()) * keep


class SqftAdapter(_LoraFactors):
    method = "sqft"

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        keep = self.keep_mask().detach()
        delta = (self.lora_B @ self.lora_A).to(w.dtype) * keep * self.scaling
        return F.linear(self.dropout(x).to(w.dtype), w + delta, base_bias(self.base))

    def merged_weight(self, keep: torch.Tensor) -> torch.Tensor:
        return self.weight.float() + self._delta() * keep
