"""The pruners as pure tensor functions: exact budgets, no mutation of inputs, SparseGPT details."""

import pytest
import torch

from sparse_recover.errors import ConfigError
from sparse_recover.pruning import METHODS, PruneSettings, get_method
from sparse_recover.pruning.magnitude import magnitude_keep
from sparse_recover.pruning.sparsegpt import sparsegpt_prune
from sparse_recover.pruning.wanda import wanda_keep
from sparse_recover.sparsity.masks import nm_group_counts
from sparse_recover.sparsity.patterns import NM, Unstructured
from sparse_recover.sparsity.stats import Hessian, SqNorm


def _layer(out=32, inp=256, tokens=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    x = torch.randn(4, tokens // 4, inp, generator=g) * (torch.rand(inp, generator=g) * 3)
    return w, x


def test_registry_lists_names():
    assert set(METHODS) == {"magnitude", "wanda", "sparsegpt", "ria"}
    with pytest.raises(ConfigError, match="magnitude, wanda, sparsegpt"):
        get_method("obs")


def test_magnitude_matrix_budget_and_no_mutation():
    w, _ = _layer()
    before = w.clone()
    keep = magnitude_keep(w, Unstructured(0.5))
    assert torch.equal(w, before)
    assert int((~keep).sum()) == int(w.numel() * 0.5)
    assert w.abs()[~keep].max() <= w.abs()[keep].min()


def test_wanda_row_budget_and_nm():
    w, x = _layer()
    stat = SqNorm(w.shape[1], torch.device("cpu"))
    stat.add(x)
    before = (w.clone(), stat.value.clone())
    keep = wanda_keep(w, stat.value, Unstructured(0.6))
    assert torch.equal(w, before[0]) and torch.equal(stat.value, before[1])
    assert (keep.sum(1) == w.shape[1] - int(w.shape[1] * 0.6)).all()
    keep = wanda_keep(w, stat.value, NM(2, 4))
    assert (nm_group_counts(keep, 4) == 2).all()


def test_wanda_variant_meets_layer_sparsity():
    w, x = _layer(64, 256)
    stat = SqNorm(w.shape[1], torch.device("cpu"))
    stat.add(x)
    keep = wanda_keep(w, stat.value, Unstructured(0.5), variant=True)
    assert abs((1 - keep.float().mean().item()) - 0.5) <= 0.002
    rows = keep.sum(1)
    assert rows.max() != rows.min()  # non-uniform per row, by design


def _hessian(x):
    h = Hessian(x.shape[-1], torch.device("cpu"))
    h.add(x)
    return h.value


@pytest.mark.parametrize("pattern", [Unstructured(0.5), NM(2, 4), NM(2, 8)])
def test_sparsegpt_zero_at_pruned_and_budget(pattern):
    w, x = _layer()
    H = _hessian(x)
    before = (w.clone(), H.clone())
    res = sparsegpt_prune(w, H, pattern)
    assert torch.equal(w, before[0]) and torch.equal(H, before[1])
    assert (res.weight[~res.keep] == 0).all()
    if isinstance(pattern, NM):
        assert (nm_group_counts(res.keep, pattern.m) == pattern.n).all()
    else:
        for c0 in range(0, w.shape[1], 128):
            blk = res.keep[:, c0:c0 + 128]
            assert int((~blk).sum()) == int(blk.numel() * 0.5)
    # OBS compensation beats plain masking on the layer's reconstruction error
    xf = x.reshape(-1, x.shape[-1])
    err_obs = ((xf @ w.t() - xf @ res.weight.t()) ** 2).sum()
    err_mask = ((xf @ w.t() - xf @ (w * res.keep).t()) ** 2).sum()
    assert err_obs < err_mask


def test_sparsegpt_dead_columns_and_cholesky_retry():
    w, x = _layer(16, 128, tokens=64)
    x[..., :5] = 0  # dead inputs
    H = _hessian(x)  # rank <= 64 < 128: singular without damping
    res = sparsegpt_prune(w, H, Unstructured(0.5), percdamp=1e-12)
    assert res.dead_columns == 5
    assert (res.weight[:, :5] == 0).all()
    assert res.retries >= 1 and res.damp > 1e-12
    assert torch.isfinite(res.weight).all()


def test_sparsegpt_stacked_segments_equal_separate():
    w1, x = _layer(16, 128, seed=1)
    w2, _ = _layer(24, 128, seed=2)
    H = _hessian(x)
    settings = PruneSettings(pattern=Unstructured(0.5))
    joint = get_method("sparsegpt").fn([w1, w2], H, settings)
    solo1 = sparsegpt_prune(w1, H, Unstructured(0.5))
    solo2 = sparsegpt_prune(w2, H, Unstructured(0.5))
    assert torch.equal(joint[0].keep, solo1.keep) and torch.equal(joint[1].keep, solo2.keep)
    torch.testing.assert_close(joint[0].weight, solo1.weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(joint[1].weight, solo2.weight, rtol=1e-4, atol=1e-5)


def test_sparsegpt_blocksize_must_fit_m():
    w, x = _layer(8, 96)
    with pytest.raises(ConfigError):
        sparsegpt_prune(w, _hessian(x), NM(2, 5), blocksize=128)
