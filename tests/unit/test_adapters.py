"""Adapters: fresh = base, merge = unmerged forward, unmerge restores, zeros kept, gradients, counts,
and equality with the reference formulas (SPP, LoRS) and with peft's LoRA."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparse_recover.adapters import ADAPTERS, AdapterSettings
from sparse_recover.adapters.lors import LorsAdapter
from sparse_recover.adapters.spp import SppAdapter
from sparse_recover.errors import AuditError, NumericalError

METHODS = list(ADAPTERS)
OUT, IN, R = 32, 24, 8


def sparse_linear(seed: int = 0, bias: bool = True, kept_zero: bool = True):
    torch.manual_seed(seed)
    lin = nn.Linear(IN, OUT, bias=bias)
    keep = torch.rand(OUT, IN) > 0.5
    with torch.no_grad():
        lin.weight.mul_(keep)
        if kept_zero:  # a kept weight that happens to be zero (stored masks, not re-derived from zeros)
            idx = keep.reshape(-1).nonzero()[0, 0]
            lin.weight.view(-1)[idx] = 0.0
    return lin, keep


def make(method: str, seed: int = 0, **kw):
    lin, keep = sparse_linear(seed)
    settings = AdapterSettings(rank=R, scaling=kw.pop("scaling", 1.5), dropout=0.0, **kw)
    return ADAPTERS[method](lin, keep, settings, name="layer"), lin, keep


def train_a_little(adapter, seed: int = 1):
    """Give every adapter parameter non-trivial values (as after training)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in adapter.adapter_parameters().values():
            p.copy_(torch.randn_like(p) * 0.3)


@pytest.mark.parametrize("method", METHODS)
def test_fresh_adapter_is_the_base(method):
    adapter, lin, _ = make(method)
    x = torch.randn(3, 5, IN)
    base_out = F.linear(x, lin.weight, lin.bias)
    assert torch.equal(adapter(x), base_out)


@pytest.mark.parametrize("method", METHODS)
def test_merge_equals_trained_forward_and_keeps_every_zero(method):
    adapter, lin, keep = make(method)
    train_a_little(adapter)
    w0 = lin.weight.detach().clone()
    x = torch.randn(4, IN)
    with torch.no_grad():
        if method == "lora-remask":  # merging re-applies the mask: compare with the masked weight
            w_eff = (w0 + adapter.scaling * adapter.lora_B @ adapter.lora_A) * keep
            expected = F.linear(x, w_eff, lin.bias)
        else:
            expected = adapter(x)
    worst = adapter.merge()
    assert worst == 0.0 and adapter.merged
    merged_out = adapter(x)
    torch.testing.assert_close(merged_out, expected, rtol=1e-5, atol=1e-5)
    w = lin.weight.detach()
    assert torch.equal(w[~keep], torch.zeros_like(w[~keep]))  # every pruned position exactly zero
    assert torch.equal(adapter.keep_mask(), keep)  # mask preserved bit for bit
    adapter.unmerge()
    assert torch.equal(lin.weight.detach(), w0)  # bit-exact restore
    assert torch.equal(adapter.keep_mask(), keep)


@pytest.mark.parametrize("method", METHODS)
def test_gradients_reach_only_adapter_parameters(method):
    adapter, lin, _ = make(method)
    train_a_little(adapter)
    adapter(torch.randn(6, IN)).square().sum().backward()
    assert lin.weight.grad is None and lin.bias.grad is None
    for name, p in adapter.adapter_parameters().items():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("method", METHODS)
def test_trainable_count_matches_formula(method):
    adapter, _, _ = make(method)
    expected = R * IN + OUT if method == "spp" else R * (IN + OUT)
    assert adapter.trainable_count() == expected == ADAPTERS[method].trainable_formula(OUT, IN, R)


def test_pruned_weight_not_zero_is_refused():
    lin, keep = sparse_linear()
    with torch.no_grad():
        lin.weight[~keep] = 1.0
    with pytest.raises(AuditError):
        LorsAdapter(lin, keep, AdapterSettings(rank=R), name="bad")


def test_safe_merge_refuses_non_finite_and_leaves_base():
    adapter, lin, _ = make("lors")
    with torch.no_grad():
        adapter.lora_A.fill_(float("inf"))
        adapter.lora_B.fill_(1.0)
    w0 = lin.weight.detach().clone()
    with pytest.raises((NumericalError, AuditError)):
        adapter.merge(safe_merge=True)
    assert torch.equal(lin.weight.detach(), w0) and not adapter.merged


# ----------------------------------------------------------------------------- reference formulas


def spp_reference(x, w, b, alpha, beta, s):
    """Lucky-Lance/SPP DiagonalLinear + Linear: y = xW^T + b + s * x (repeat(alpha) * beta * W)^T."""
    a_full = torch.repeat_interleave(alpha, w.shape[0] // alpha.shape[0], dim=0)
    return F.linear(x, w, b) + s * F.linear(x, a_full * beta * w)


def test_spp_matches_reference_forward_gradients_and_merge():
    adapter, lin, keep = make("spp", scaling=2.0)
    train_a_little(adapter)
    x = torch.randn(2, 7, IN, requires_grad=True)
    y = adapter(x)
    g = torch.randn_like(y)
    y.backward(g)
    got = (x.grad.clone(), adapter.alpha.grad.clone(), adapter.beta.grad.clone())
    x2 = x.detach().clone().requires_grad_(True)
    alpha = adapter.alpha.detach().clone().requires_grad_(True)
    beta = adapter.beta.detach().clone().requires_grad_(True)
    y2 = spp_reference(x2, lin.weight.detach(), lin.bias.detach(), alpha, beta, 2.0)
    y2.backward(g)
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, (x2.grad, alpha.grad, beta.grad)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    a_full = torch.repeat_interleave(alpha.detach(), OUT // R, dim=0)
    ref_merged = lin.weight.detach() + 2.0 * (a_full * beta.detach() * lin.weight.detach())
    adapter.merge()
    torch.testing.assert_close(lin.weight.detach(), ref_merged, rtol=1e-6, atol=1e-7)


def spp_alpha_init_bound():
    return 1 / math.sqrt(IN)


def test_spp_init_is_the_reference_one():
    adapter, _, _ = make("spp")
    assert adapter.alpha.abs().max() <= spp_alpha_init_bound() and torch.equal(adapter.beta, torch.zeros(OUT, 1))


@pytest.fixture(params=["whole", "blocked"])
def lors_blocks(request, monkeypatch):
    """Run LoRS with W_eff rebuilt whole, and in blocks of 16 rows (two blocks for OUT = 32: the
    path large layers take on CPU), with a kept zero in the first block."""
    import sparse_recover.adapters.lors as lors

    if request.param == "blocked":
        monkeypatch.setattr(lors, "CPU_BLOCK_BYTES", IN * 4 * 16)
    return request.param


def test_lors_fresh_is_base_bit_for_bit(lors_blocks):
    adapter, lin, _ = make("lors")
    x = torch.randn(3, 5, IN)
    assert torch.equal(adapter(x), F.linear(x, lin.weight, lin.bias))


def test_lors_blocked_keeps_kept_zeros_in_every_block(monkeypatch):
    import sparse_recover.adapters.lors as lors

    monkeypatch.setattr(lors, "CPU_BLOCK_BYTES", IN * 4 * 16)
    lin, keep = sparse_linear(3, kept_zero=False)
    with torch.no_grad():  # one kept zero in each of the two row blocks
        for row in (2, 20):
            col = int(keep[row].nonzero()[0, 0])
            lin.weight[row, col] = 0.0
    adapter = LorsAdapter(lin, keep, AdapterSettings(rank=R, scaling=2.0), name="layer")
    assert adapter.kept_zeros.numel() == 2
    train_a_little(adapter)
    blocks = lors._EffectiveBlocks(adapter.weight, adapter.lora_A, adapter.lora_B, 2.0, adapter.kept_zeros)
    assert blocks.rows == 16
    with torch.no_grad():
        w_eff = torch.cat([blk.clone() for _, blk in blocks])
    w = lin.weight.detach()
    expected = (w + 2.0 * adapter.lora_A.detach() @ adapter.lora_B.detach()) * keep
    assert torch.equal(w_eff != 0, keep) and torch.allclose(w_eff, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("exact", [False, True])
def test_lors_backward(exact, lors_blocks):
    adapter, lin, keep = make("lors", exact_grad=exact, scaling=4.0)
    train_a_little(adapter)
    x = torch.randn(3, 5, IN, requires_grad=True)
    y = adapter(x)
    g = torch.randn_like(y)
    y.backward(g)
    s = 4.0
    a = adapter.lora_A.detach().clone().requires_grad_(True)
    b = adapter.lora_B.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    w = lin.weight.detach()
    y2 = F.linear(x2, (w + s * a @ b) * keep, lin.bias.detach())
    y2.backward(g)
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    if exact:  # autograd on the same math
        torch.testing.assert_close(adapter.lora_A.grad, a.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(adapter.lora_B.grad, b.grad, rtol=1e-4, atol=1e-5)
    else:  # the reference LorsFn: dA = g^T (x B^T), dB = (g A)^T x (no mask, no scale)
        g2, xf = g.reshape(-1, OUT), x.detach().reshape(-1, IN)
        torch.testing.assert_close(adapter.lora_A.grad, g2.t() @ (xf @ b.detach().t()), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(adapter.lora_B.grad, (g2 @ a.detach()).t() @ xf, rtol=1e-4, atol=1e-5)


def test_lors_gradient_init_vectors():
    from sparse_recover.adapters.lors import top_right_singular_vectors

    torch.manual_seed(0)
    grad = torch.randn(OUT, 4) @ torch.randn(4, IN)  # rank 4
    v1 = top_right_singular_vectors(grad, 4, seed=3)
    v2 = top_right_singular_vectors(grad, 4, seed=3)
    assert torch.equal(v1, v2) and v1.shape == (4, IN)
    # the rows span the row space of grad: projecting grad onto them loses nothing
    torch.testing.assert_close(grad @ v1.t() @ v1, grad, rtol=1e-4, atol=1e-4)


def test_lora_remask_matches_peft():
    peft = pytest.importorskip("peft")
    lin, keep = sparse_linear()
    model = nn.Sequential()
    model.add_module("proj", lin)
    import copy

    ours = ADAPTERS["lora-remask"](copy.deepcopy(lin), keep, AdapterSettings(rank=R, scaling=2.0), name="proj")
    train_a_little(ours)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=2 * R, target_modules=["proj"], lora_dropout=0.0))
    layer = pm.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(ours.lora_A)
        layer.lora_B["default"].weight.copy_(ours.lora_B)
    x = torch.randn(5, IN)
    torch.testing.assert_close(ours(x), pm(x), rtol=1e-5, atol=1e-6)


def test_spp_rank_must_divide_output():
    assert SppAdapter.check_shape(30, 24, 16) is not None
    assert SppAdapter.check_shape(32, 24, 16) is None
    assert LorsAdapter.check_shape(32, 24, 25) is not None
