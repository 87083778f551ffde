"""The layer-wise calibration engine: capture, statistics, restoration, propagation."""

import pytest
import torch

from sparse_recover.calibration import capture_inputs, layerwise
from sparse_recover.models import decoder_blocks, prunable_linears, weight_2d
from sparse_recover.sparsity.stats import SqNorm
from tests.helpers import build_model

CPU = torch.device("cpu")


def _windows(n=4, L=24, vocab=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, L), generator=g)


def _no_hooks(model):
    for m in model.modules():
        assert not m._forward_pre_hooks and not m._forward_hooks, type(m).__name__
        assert "forward" not in m.__dict__


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_identity_pruner_leaves_logits_unchanged(family):
    model = build_model(family)
    win = _windows()
    with torch.no_grad():
        before = model(input_ids=win).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    layerwise(model, win, lambda ctx: seen.append(ctx.index), statistic="sq_norm", device=CPU, batch_size=2)
    with torch.no_grad():
        after = model(input_ids=win).logits
    assert seen == list(range(len(decoder_blocks(model)[1])))
    assert torch.equal(before, after)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    _no_hooks(model)


def test_restores_hooks_and_use_cache_when_pruner_raises():
    model = build_model("llama")
    model.config.use_cache = True
    model.train()

    def boom(ctx):
        if ctx.index == 1:
            raise RuntimeError("pruner failed")

    with pytest.raises(RuntimeError, match="pruner failed"):
        layerwise(model, _windows(), boom, statistic="hessian", device=CPU)
    assert model.config.use_cache is True
    assert model.training
    _no_hooks(model)


def test_capture_matches_model_hidden_states():
    model = build_model("llama")
    win = _windows()
    _, blocks = decoder_blocks(model)
    model.config.use_cache = False
    inputs = capture_inputs(model, blocks, win, CPU, batch_size=3)
    _no_hooks(model)
    with torch.no_grad():
        hs = model(input_ids=win, output_hidden_states=True).hidden_states[0]
    torch.testing.assert_close(torch.cat(inputs.hidden), hs, rtol=0, atol=0)
    args, kwargs = inputs.call_args[0][0]
    assert "position_embeddings" in kwargs  # transformers 5 rotary: must be captured and replayed
    assert len(inputs.call_args) == 2 and len(inputs.call_args[0]) == len(blocks)


def _collect_stats(model, win, batch_size):
    out = {}

    def grab(ctx):
        for group in ctx.groups:
            for name in group:
                out[f"{ctx.index}.{name}"] = ctx.stats[group[0]].value.clone()

    layerwise(model, win, grab, statistic="sq_norm", device=CPU, batch_size=batch_size)
    return out


def test_streaming_statistics_equal_batch_statistics():
    model = build_model("llama")
    win = _windows(6)
    one = _collect_stats(model, win, 1)
    six = _collect_stats(model, win, 6)
    three = _collect_stats(model, win, 4)  # uneven last batch
    assert one.keys() == six.keys() == three.keys()
    for k in one:
        torch.testing.assert_close(one[k], six[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(one[k], three[k], rtol=1e-5, atol=1e-6)


def test_block0_statistic_equals_direct_computation():
    model = build_model("llama")
    win = _windows(3)
    stats = _collect_stats(model, win, 1)
    with torch.no_grad():
        h0 = model(input_ids=win, output_hidden_states=True).hidden_states[0]
        x = model.model.layers[0].input_layernorm(h0)
    ref = SqNorm(x.shape[-1], CPU)
    for i in range(x.shape[0]):
        ref.add(x[i : i + 1])
    torch.testing.assert_close(stats["0.self_attn.q_proj"], ref.value, rtol=1e-5, atol=1e-6)
    # q, k, v share one input and so one statistic
    assert torch.equal(stats["0.self_attn.q_proj"], stats["0.self_attn.k_proj"])


def _prune_half(ctx):
    for name, mod in ctx.linears.items():
        w = weight_2d(mod)
        with torch.no_grad():
            w.masked_fill_(w.abs() < w.abs().median(), 0)


@pytest.mark.parametrize("propagate", ["pruned", "dense"])
def test_offload_on_cpu_and_propagation_modes(propagate):
    a, b = build_model("llama"), build_model("llama")
    win = _windows()
    layerwise(a, win, _prune_half, statistic=None, device=CPU, propagate=propagate)
    layerwise(b, win, _prune_half, statistic=None, device=CPU, propagate=propagate, offload=True)
    for (k, v), (k2, v2) in zip(a.state_dict().items(), b.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_pruned_vs_dense_propagation_differ_after_block0():
    def grab_into(store):
        def f(ctx):
            for g in ctx.groups:
                store[(ctx.index, g[0])] = ctx.stats[g[0]].value.clone()
            _prune_half(ctx)
        return f

    pruned, dense = {}, {}
    layerwise(build_model("llama"), _windows(), grab_into(pruned), statistic="sq_norm", device=CPU, propagate="pruned")
    layerwise(build_model("llama"), _windows(), grab_into(dense), statistic="sq_norm", device=CPU, propagate="dense")
    block0 = [k for k in pruned if k[0] == 0]
    block1 = [k for k in pruned if k[0] == 1]
    assert all(torch.equal(pruned[k], dense[k]) for k in block0)
    assert not all(torch.equal(pruned[k], dense[k]) for k in block1)


def test_prunable_linears_cover_conv1d():
    model = build_model("gpt2")
    _, blocks = decoder_blocks(model)
    names = set(prunable_linears(blocks[0]))
    assert names == {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
@pytest.mark.parametrize("statistic", ["sq_norm", "hessian"])
def test_statistics_pass_stops_after_the_last_linear(family, statistic):
    """From the second batch on, the statistics pass ends at the block's last linear (its outputs are not kept): the
    last linear runs once there plus once per window in the propagation (none after the last block), and the
    statistics are the same bits as a pass that runs every block to the end (propagate="dense" keeps outputs, so it
    never stops early)."""
    win = _windows(4)

    def record(store):
        def f(ctx):
            for g in ctx.groups:
                store[(ctx.index, g[0])] = ctx.stats[g[0]].value.clone()
        return f

    def count_last_linear(model):
        counts = {}
        for i, block in enumerate(decoder_blocks(model)[1]):
            last = list(prunable_linears(block).values())[-1]  # module order ends with the last-called linear here
            counts[i] = 0
            last.register_forward_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
        return counts

    early, full = {}, {}
    a, b = build_model(family), build_model(family)
    counts_a, counts_b = count_last_linear(a), count_last_linear(b)
    layerwise(a, win, record(early), statistic=statistic, device=CPU, propagate="pruned")
    layerwise(b, win, record(full), statistic=statistic, device=CPU, propagate="dense")
    block0 = [k for k in early if k[0] == 0]
    assert block0 and all(torch.equal(early[k], full[k]) for k in block0)
    assert len(early) == len(full)
    n = len(counts_a)
    # first window of the statistics pass, then the propagation; the last block's outputs feed nothing: no propagation
    assert [counts_a[i] for i in range(n)] == [1 + 4] * (n - 1) + [1]
    assert set(counts_b.values()) == {4}  # dense: one pass that keeps every output
