"""SPP (Sparsity-Preserved PEFT, arXiv 2405.16057), as the reference code (Lucky-Lance/SPP) does it.

Per adapted linear with frozen sparse weight W (out, in):
    alpha (r, in), beta (out, 1);  A = repeat_interleave(alpha, out / r, dim=0)   (contiguous blocks)
    W' = A * beta * W                 (every zero of W stays zero)
    y  = x W^T + b + s * dropout(x) W'^T
    merge: W <- W + s * (A * beta * W)
Init: alpha ~ U(+-1/sqrt(in)) (kaiming_uniform a=sqrt(5)), beta = 0, so training starts exactly at
the pruned model. The expansion rank r comes from the config (the reference hard-codes 16) and
s defaults to 2 (the reference's lora_alpha / lora_r = 16 / 8).

Memory: the branch runs in a custom autograd function that saves only its input, W, alpha and
beta, and rebuilds W' in backward (the recomputation the reference's 7B recipe gets from
torch.utils.checkpoint); no (out, in) tensor is kept alive between forward and backward. The
parameter gradients are reduced block by block with einsum, without forming A.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

from sparse_recover.adapters.base import AdapterSettings, SparseAdapter, kaiming_uniform_


def _blocked(weight: torch.Tensor, r: int) -> torch.Tensor:
    return weight.reshape(r, weight.shape[0] // r, weight.shape[1])


def spp_weight(weight: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """W' = repeat_interleave(alpha) * beta * W, shape (out, in), in W's dtype."""
    r = alpha.shape[0]
    w3 = _blocked(weight, r)
    out = w3 * alpha.to(weight.dtype).unsqueeze(1)
    out.mul_(beta.to(weight.dtype).reshape(r, -1, 1))
    return out.reshape(weight.shape)


class SppBranchFn(torch.autograd.Function):
    """s * x W'^T with W' rebuilt in backward instead of saved."""

    @staticmethod
    def forward(ctx, x, weight, alpha, beta, scaling):
        xc = x.to(weight.dtype)
        w_prime = spp_weight(weight, alpha, beta)
        y = torch.matmul(xc, w_prime.t())
        if scaling != 1.0:
            y = y.mul_(scaling)
        ctx.save_for_backward(x, weight, alpha, beta)
        ctx.scaling = scaling
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, weight, alpha, beta = ctx.saved_tensors
        s = ctx.scaling
        r = alpha.shape[0]
        g = grad_y.reshape(-1, grad_y.shape[-1]).to(weight.dtype)
        x2 = x.reshape(-1, x.shape[-1]).to(weight.dtype)
        grad_x = grad_alpha = grad_beta = None
        if ctx.needs_input_grad[0]:
            w_prime = spp_weight(weight, alpha, beta)
            grad_x = (g @ w_prime).mul_(s).reshape(x.shape).to(x.dtype)
            del w_prime
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            # dL/dW' = s * g^T x  (transient); P = dL/dW' * W, reduced per block without forming A
            p = (g.t() @ x2).mul_(weight).mul_(s)
            p3 = _blocked(p, r)
            if ctx.needs_input_grad[2]:
                grad_alpha = torch.einsum("kbj,kb->kj", p3, beta.to(p.dtype).reshape(r, -1)).to(alpha.dtype)
            if ctx.needs_input_grad[3]:
                grad_beta = torch.einsum("kbj,kj->kb", p3, alpha.to(p.dtype)).reshape(beta.shape).to(beta.dtype)
        return grad_x, None, grad_alpha, grad_beta, None


class SppAdapter(SparseAdapter):
    method = "spp"

    def __init__(self, base: nn.Module, keep: torch.Tensor | None, settings: AdapterSettings, name: str = ""):
        super().__init__(base, keep, settings, name)
        r = settings.rank
        dev = self.weight.device
        self.alpha = nn.Parameter(kaiming_uniform_(torch.empty(r, self.in_features, device=dev)))
        self.beta = nn.Parameter(torch.zeros(self.out_features, 1, device=dev))

    @staticmethod
    def check_shape(out_features: int, in_features: int, rank: int) -> str | None:
        if rank > out_features:
            return f"rank {rank} is larger than the layer's output width {out_features}"
        if out_features % rank:
            return f"output width {out_features} is not divisible by the SPP rank {rank}"
        return None

    @staticmethod
    def trainable_formula(out_features: int, in_features: int, rank: int) -> int:
        return rank * in_features + out_features

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        branch = SppBranchFn.apply(self.dropout(x), self.weight, self.alpha, self.beta, self.scaling)
        return y + branch.to(y.dtype)

    def merged_weight(self, keep: torch.Tensor) -> torch.Tensor:
        w = self.weight.float()
        return w + self.scaling * spp_weight(w, self.alpha.float(), self.beta.float())
