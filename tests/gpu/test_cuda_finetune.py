"""CUDA checks (skipped without a GPU): bf16 base weights with fp32 adapters under bf16 autocast train,
merge without reviving a weight, and LoRS's custom backward agrees with autograd on the GPU."""

import pytest
import torch
import torch.nn.functional as F

from sparse_recover.adapters import ADAPTERS, AdapterSettings

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("method", list(ADAPTERS))
def test_bf16_adapter_trains_and_merges_exactly(method):
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 512, bias=False).cuda().to(torch.bfloat16)
    keep = torch.rand(512, 256, device="cuda") > 0.5
    with torch.no_grad():
        lin.weight.mul_(keep)
    adapter = ADAPTERS[method](lin, keep, AdapterSettings(rank=16, scaling=2.0), name="l")
    opt = torch.optim.AdamW([p for p in adapter.adapter_parameters().values()], lr=1e-3)
    x = torch.randn(4, 128, 256, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = adapter(x).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(p.dtype == torch.float32 for p in adapter.adapter_parameters().values())
    adapter.merge(safe_merge=True)
    assert int((lin.weight[~keep] != 0).sum()) == 0


def test_lors_exact_grad_matches_autograd_on_cuda():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 128).cuda()
    keep = torch.rand(128, 64, device="cuda") > 0.5
    with torch.no_grad():
        lin.weight.mul_(keep)
    adapter = ADAPTERS["lors"](lin, keep, AdapterSettings(rank=8, scaling=4.0, exact_grad=True), name="l")
    with torch.no_grad():
        adapter.lora_A.normal_()
    x = torch.randn(3, 10, 64, device="cuda")
    y = adapter(x)
    g = torch.randn_like(y)
    y.backward(g)
    a = adapter.lora_A.detach().clone().requires_grad_(True)
    b = adapter.lora_B.detach().clone().requires_grad_(True)
    F.linear(x, (lin.weight.detach() + 4.0 * a @ b) * keep, lin.bias.detach()).backward(g)
    torch.testing.assert_close(adapter.lora_A.grad, a.grad, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(adapter.lora_B.grad, b.grad, rtol=1e-3, atol=1e-3)
