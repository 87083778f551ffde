"""LoRS (Low-Rank adaptation for Sparse LLMs, arXiv 2501.08582), as the reference (hyx1999/LoRS) does it.

Per adapted linear with frozen sparse weight W (out, in) and keep mask M:
    A (out, r) = 0, B (r, in) ~ kaiming_uniform(a=sqrt(5)) or the gradient-based init below
    W_eff = (W + s * A B) * M,   s = lora_alpha / sqrt(r)
    y = x W_eff^T + b
    merge: W <- W + s * (A B) * M   (in float32, cast to W's dtype)
(The reference names A "lora_A" and B "lora_B", the reverse of peft's convention.)

The custom autograd function saves only x, W, A and B, and rebuilds W_eff in backward (on CPU a
cache-sized block of rows at a time, consumed by the matmul before the next block is built, so
neither pass allocates an (out, in) temporary; on CUDA in one piece, as the reference). Adapter
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


# On CPU, W_eff is rebuilt and consumed a block of rows at a time so that each block stays in cache:
# the frozen weight is read from memory once per pass, as a plain linear reads it, instead of the
# four memory-bound passes (copy, add, mask, multiply) a whole-matrix rebuild costs. About 8 MiB per
# block (measured best on a 2-core EPYC with a 32 MiB L3; see scripts/bench_finetune.py). On CUDA the
# whole matrix is rebuilt at once, as the reference does: bandwidth is plentiful and launches are not.
CPU_BLOCK_BYTES = 8 << 20


def _block_rows(weight: torch.Tensor) -> int:
    out_f, in_f = weight.shape
    if weight.device.type != "cpu":
        return out_f
    rows = CPU_BLOCK_BYTES // max(1, in_f * weight.element_size())
    # A multiple of 16 rows: then each block's output columns come out of the BLAS kernel bit for bit
    # as the whole matrix's do (a fresh adapter equals the base exactly; tests/unit/test_adapters.py).
    return min(out_f, max(16, rows // 16 * 16))


class _EffectiveBlocks:
    """Yields (row slice, W_eff rows) of W_eff = (W + s A B) * keep, block by block, into one reused
    buffer: each block is valid until the next is built. Pruned positions come out exactly zero."""

    def __init__(self, weight, a, b, scaling, kept_zeros):
        self.weight, self.scaling, self.kept_zeros = weight, scaling, kept_zeros
        self.a, self.b = a.to(weight.dtype), b.to(weight.dtype)
        self.rows = _block_rows(weight)
        out_f, in_f = weight.shape
        self.buf = torch.empty(min(self.rows, out_f), in_f, dtype=weight.dtype, device=weight.device)
        # CPU: the mask in the weight's dtype (see __iter__); CUDA: bool, a quarter of the transient
        self.mask = torch.empty(self.buf.shape, device=weight.device,
                                dtype=weight.dtype if weight.device.type == "cpu" else torch.bool)

    def __iter__(self):
        w, kz = self.weight, self.kept_zeros
        out_f, in_f = w.shape
        for i in range(0, out_f, self.rows):
            n = min(self.rows, out_f - i)
            blk, m = self.buf[:n], self.mask[:n]
            torch.addmm(w[i:i + n], self.a[i:i + n], self.b, alpha=self.scaling, out=blk)
            # On CPU the keep mask is 1.0 / 0.0 in the weight's dtype: comparing into a float buffer and
            # multiplying is ~5x faster there than a bool mask (whose multiply first converts it).
            torch.ne(w[i:i + n], 0, out=m)
            if kz.numel():
                lo, hi = torch.searchsorted(kz, torch.tensor([i * in_f, (i + n) * in_f], device=kz.device)).tolist()
                if hi > lo:
                    m.view(-1)[kz[lo:hi] - i * in_f] = 1
            yield slice(i, i + n), blk.mul_(m)


def _linear_effective(x2: torch.Tensor, blocks: _EffectiveBlocks, bias: torch.Tensor | None) -> torch.Tensor:
    """x2 (T, in) @ W_eff^T + bias -> (T, out), W_eff built block by block. Each output column is
    computed exactly as F.linear computes it (same addmm per column block)."""
    out_f = blocks.weight.shape[0]
    if blocks.rows >= out_f:  # one block: the whole W_eff
        _, blk = next(iter(blocks))
        return torch.nn.functional.linear(x2, blk, bias)
    y = torch.empty(x2.shape[0], out_f, dtype=x2.dtype, device=x2.device)
    for rows, blk in blocks:
        y[:, rows] = torch.nn.functional.linear(x2, blk, None if bias is None else bias[rows])
    return y


def _grad_input_effective(g: torch.Tensor, blocks: _EffectiveBlocks) -> torch.Tensor:
    """g (T, out) @ W_eff -> (T, in), W_eff built block by block."""
    if blocks.rows >= blocks.weight.shape[0]:  # one block: the whole W_eff
        _, blk = next(iter(blocks))
        return g @ blk
    gx = None
    for rows, blk in blocks:
        gx = g[:, rows] @ blk if gx is None else gx.addmm_(g[:, rows], blk)
    return gx


class LorsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scaling, kept_zeros, exact_grad):
        x2 = x.reshape(-1, x.shape[-1]).to(weight.dtype)
        y = _linear_effective(x2, _EffectiveBlocks(weight, a, b, scaling, kept_zeros),
                              None if bias is None else bias.to(weight.dtype))
        ctx.save_for_backward(x, weight, a, b, kept_zeros)
        ctx.scaling = scaling
        ctx.exact_grad = exact_grad
        ctx.has_bias = bias is not None
        return y.reshape(*x.shape[:-1], weight.shape[0])

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
            grad_x = _grad_input_effective(g, _EffectiveBlocks(weight, a, b, s, kept_zeros))
            grad_x = grad_x.reshape(x.shape).to(x.dtype)
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
