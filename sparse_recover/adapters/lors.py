"""LoRS (Low-Rank adaptation for Sparse LLMs, arXiv 2501.08582), as the reference (hyx1999/LoRS) does it.

Per adapted linear with frozen sparse weight W (out, in) and keep mask M:
    A (out, r) = 0, B (r, in) ~ kaiming_uniform(a=sqrt(5)) or the gradient-based init below
    W_eff = (W + s * A B) * M,   s = lora_alpha / sqrt(r)
    y = x W_eff^T + b
    merge: W <- W + s * (A B) * M   (in float32, cast to W's dtype)
(The reference names A "lora_A" and B "lora_B", the reverse of peft's convention.)

The custom autograd function saves only x, W, A and B, and rebuilds W_eff in backward. Adapter
gradients are rearranged so that the (out, in) gradient g^T x is never formed:
    dA = g^T (x B^T)    dB = (g A)^T x          (the reference's straight-through rule: it drops
                                                 both the mask and the factor s)
With `exact_grad` the true gradients of the masked parameterisation are used instead:
    dA = s * ((g^T x) * M) B^T    dB = s * A^T ((g^T x) * M)   (forms one transient (out, in)).

Gradient-based init (the reference's LoRA-GA step): average the weight gradient of the training
loss over the first `init_samples` training examples, then A = 0 and B = the top-r right singular
vectors of that gradient (torch.svd_lowrank, q = min(4r, out, in), niter = 4, seeded).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

from sparse_recover.adapters.base import AdapterSettings, SparseAdapter, kaiming_uniform_


def _keep(weight: torch.Tensor, kept_zeros: torch.Tensor) -> torch.Tensor:
    keep = (weight != 0).contiguous()
    if kept_zeros.numel():
        keep.view(-1)[kept_zeros] = True
    return keep


def _effective(weight, a, b, scaling, kept_zeros):
    w_eff = torch.addmm(weight, a.to(weight.dtype), b.to(weight.dtype), alpha=scaling)
    return w_eff.mul_(_keep(weight, kept_zeros))


class LorsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scaling, kept_zeros, exact_grad):
        w_eff = _effective(weight, a, b, scaling, kept_zeros)
        y = torch.nn.functional.linear(x.to(weight.dtype), w_eff, None if bias is None else bias.to(weight.dtype))
        del w_eff
        ctx.save_for_backward(x, weight, a, b, kept_zeros)
        ctx.scaling = scaling
        ctx.exact_grad = exact_grad
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, weight, a, b, kept_zeros = ctx.saved_tensors
        s = ctx.scaling
        dt = weight.dtype
        g = grad_y.reshape(-1, grad_y.shape[-1]).to(dt)
        x2 = x.reshape(-1, x.shape[-1]).to(dt)
        ac, bc = a.to(dt), b.to(dt)
        grad_x = grad_bias = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ _effective(weight, a, b, s, kept_zeros)).reshape(x.shape).to(x.dtype)
        if ctx.needs_input_grad[1]:
            raise RuntimeError("LoRS keeps the sparse base weight frozen; it has no gradient")
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = g.sum(dim=0)
        if ctx.exact_grad and (ctx.needs_input_grad[3] or ctx.needs_input_grad[4]):
            gw = (g.t() @ x2).mul_(_keep(weight, kept_zeros)).mul_(s)
            if ctx.needs_input_grad[3]:
                grad_a = (gw @ bc.t()).to(a.dtype)
            if ctx.needs_input_grad[4]:
                grad_b = (ac.t() @ gw).to(b.dtype)
        else:
            if ctx.needs_input_grad[3]:
                grad_a = (g.t() @ (x2 @ bc.t())).to(a.dtype)
            if ctx.needs_input_grad[4]:
                grad_b = ((g @ ac).t() @ x2).to(b.dtype)
        return grad_x, None, grad_bias, grad_a, grad_b, None, None, None


class LorsAdapter(SparseAdapter):
    method = "lors"

    def __init__(self, base: nn.Module, keep: torch.Tensor | None, settings: AdapterSettings, name: str = ""):
        super().__init__(base, keep, settings, name)
        r = settings.rank
        dev = self.weight.device
        self.lora_A = nn.Parameter(torch.zeros(self.out_features, r, device=dev))
        self.lora_B = nn.Parameter(kaiming_uniform_(torch.empty(r, self.in_features, device=dev)))
        self.exact_grad = settings.exact_grad

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        return LorsFn.apply(x, self.weight, self.base.bias, self.lora_A, self.lora_B, self.scaling,
                            self.kept_zeros, self.exact_grad)

    def merged_weight(self, keep: torch.Tensor) -> torch.Tensor:
        delta = (self.lora_A.float() @ self.lora_B.float()) * keep
        return self.weight.float() + delta * self.scaling

    @torch.no_grad()
    def set_gradient_init(self, b_in: torch.Tensor) -> None:
        """A = 0, B = b_in (r, in): the gradient-based init."""
        self.lora_A.zero_()
        self.lora_B.copy_(b_in.to(self.lora_B.dtype))


def top_right_singular_vectors(grad: torch.Tensor, rank: int, seed: int, stable_gamma: float = 1.0) -> torch.Tensor:
    """B_in = V[:, :r]^T / gamma of svd_lowrank(grad, q=min(4r, out, in), niter=4), deterministic per seed."""
    q = min(4 * rank, min(grad.shape))
    with torch.random.fork_rng(devices=[grad.device] if grad.device.type == "cuda" else []):
        torch.manual_seed(seed)
        _, _, v = torch.svd_lowrank(grad.float(), q=q, niter=4)
    return v[:, :rank].t().contiguous() / stable_gamma
