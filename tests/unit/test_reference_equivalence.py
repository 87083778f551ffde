"""Our masks equal the reference implementations' masks, given identical calibration windows.

The oracles below restate, in our own words, the arithmetic of the reference code:
  * locuslab/wanda lib/prune.py (prune_magnitude, prune_wanda, return_given_alpha,
    prepare_calibration_input), lib/layerwrapper.py (WrappedGPT), lib/data.py (get_c4, get_wikitext2);
  * IST-DASLab/sparsegpt sparsegpt.py (SparseGPT.add_batch, SparseGPT.fasterprune).
They follow the reference pipeline literally: a Catcher replacing layers[0] stores the input of each
calibration sample (batch 1) and the keyword arguments the model passes (all of them: transformers 5
also passes position_embeddings); forward hooks accumulate the statistic one sample at a time; each
linear of the layer is pruned; the pruned layer is re-run to produce the next layer's inputs.

Reference N:M is "prune n of m"; ours is "keep N of M": NM(n, m) <-> prune_n = m - n, prune_m = m.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn as nn

from sparse_recover.calibration import layerwise
from sparse_recover.data import Corpus, sample_windows
from sparse_recover.models import decoder_blocks, prunable_linears, weight_2d
from sparse_recover.pruning import PruneSettings, get_method
from sparse_recover.sparsity.patterns import NM, Pattern, Unstructured
from sparse_recover.sparsity.stats import Hessian, SqNorm
from tests.helpers import build_model, make_tokenizer

NSAMPLES = 8
SEQLEN = 64
CPU = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("one_thread")


# ==================================================================================================
# Reference oracles (restated from the reference code)


def ref_find_layers(module: nn.Module, layers=(nn.Linear,), name: str = "") -> dict[str, nn.Module]:
    """Every module whose exact type is in `layers`, by dotted name (reference find_layers)."""
    if type(module) in layers:
        return {name: module}
    found = {}
    for child_name, child in module.named_children():
        found.update(ref_find_layers(child, layers, f"{name}.{child_name}" if name else child_name))
    return found


class RefWrappedGPT:
    """Wanda's scaler_row: running mean over sequences of each input column's squared l2 norm."""

    def __init__(self, layer: nn.Linear):
        self.layer = layer
        self.columns = layer.weight.shape[1]
        self.scaler_row = torch.zeros(self.columns, device=layer.weight.device)
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        if inp.dim() == 2:
            inp = inp.unsqueeze(0)
        b = inp.shape[0]
        if inp.dim() == 3:
            inp = inp.reshape(-1, inp.shape[-1])
        inp = inp.t()  # (columns, tokens)
        self.scaler_row *= self.nsamples / (self.nsamples + b)
        self.nsamples += b
        inp = inp.to(torch.float32)
        self.scaler_row += torch.norm(inp, p=2, dim=1) ** 2 / self.nsamples


class RefSparseGPT:
    """SparseGPT's Hessian accumulation and fasterprune (no quantizer), nn.Linear only."""

    def __init__(self, layer: nn.Linear):
        self.layer = layer
        self.rows, self.columns = layer.weight.shape
        self.H = torch.zeros(self.columns, self.columns, device=layer.weight.device)
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        if inp.dim() == 2:
            inp = inp.unsqueeze(0)
        b = inp.shape[0]
        if inp.dim() == 3:
            inp = inp.reshape(-1, inp.shape[-1])
        inp = inp.t()
        self.H *= self.nsamples / (self.nsamples + b)
        self.nsamples += b
        inp = math.sqrt(2 / self.nsamples) * inp.float()
        self.H += inp.matmul(inp.t())

    def fasterprune(self, sparsity: float, prunen: int = 0, prunem: int = 0, blocksize: int = 128,
                    percdamp: float = 0.01) -> None:
        W = self.layer.weight.data.clone().float()
        H = self.H
        self.H = None
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        damp = percdamp * torch.mean(torch.diag(H))
        idx = torch.arange(self.columns, device=H.device)
        H[idx, idx] += damp
        H = torch.linalg.cholesky(H)
        H = torch.cholesky_inverse(H)
        Hinv = torch.linalg.cholesky(H, upper=True)

        for i1 in range(0, self.columns, blocksize):
            i2 = min(i1 + blocksize, self.columns)
            count = i2 - i1
            W1 = W[:, i1:i2].clone()
            Q1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            if prunen == 0:
                score = W1**2 / torch.diag(Hinv1).reshape(1, -1) ** 2
                thresh = torch.sort(score.flatten())[0][int(score.numel() * sparsity)]
                mask1 = score <= thresh
            else:
                mask1 = torch.zeros_like(W1) == 1
            for i in range(count):
                w = W1[:, i]
                d = Hinv1[i, i]
                if prunen != 0 and i % prunem == 0:
                    score = W1[:, i : i + prunem] ** 2 / torch.diag(Hinv1)[i : i + prunem].reshape(1, -1) ** 2
                    mask1.scatter_(1, i + torch.topk(score, prunen, dim=1, largest=False)[1], True)
                q = w.clone()
                q[mask1[:, i]] = 0
                Q1[:, i] = q
                err1 = (w - q) / d
                W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
                Err1[:, i] = err1
            W[:, i1:i2] = Q1
            W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])

        self.layer.weight.data = W.reshape(self.layer.weight.shape).to(self.layer.weight.data.dtype)


def ref_return_given_alpha(alpha, sort_res, W_metric, tmp_metric, sum_before):
    thres_cumsum = sum_before * alpha
    sort_mask = tmp_metric <= thres_cumsum.reshape(-1, 1)
    thres = torch.gather(sort_res[0], dim=1, index=sort_mask.sum(dim=1, keepdim=True) - 1)
    W_mask = W_metric <= thres
    return W_mask, (W_mask == True).sum() / W_mask.numel()  # noqa: E712 (a float32 tensor, as in the reference)


def ref_nm_prune_mask(W_metric: torch.Tensor, prune_n: int, prune_m: int) -> torch.Tensor:
    """True = prune: the prune_n smallest of every aligned block of prune_m columns, per row (topk)."""
    W_mask = torch.zeros_like(W_metric) == 1
    for ii in range(W_metric.shape[1]):
        if ii % prune_m == 0:
            tmp = W_metric[:, ii : ii + prune_m].float()
            W_mask.scatter_(1, ii + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
    return W_mask


def ref_wanda_prune_mask(W_metric, sparsity_ratio, prune_n, prune_m, use_variant):
    if prune_n != 0:
        return ref_nm_prune_mask(W_metric, prune_n, prune_m)
    W_mask = torch.zeros_like(W_metric) == 1
    sort_res = torch.sort(W_metric, dim=-1, stable=True)
    if use_variant:
        tmp_metric = torch.cumsum(sort_res[0], dim=1)
        sum_before = W_metric.sum(dim=1)
        alpha, alpha_hist = 0.4, [0.0, 0.8]
        W_mask, cur = ref_return_given_alpha(alpha, sort_res, W_metric, tmp_metric, sum_before)
        while torch.abs(cur - sparsity_ratio) > 0.001 and alpha_hist[1] - alpha_hist[0] >= 0.001:
            if cur > sparsity_ratio:
                alpha_new = (alpha + alpha_hist[0]) / 2.0
                alpha_hist[1] = alpha
            else:
                alpha_new = (alpha + alpha_hist[1]) / 2.0
                alpha_hist[0] = alpha
            alpha = alpha_new
            W_mask, cur = ref_return_given_alpha(alpha, sort_res, W_metric, tmp_metric, sum_before)
        return W_mask
    indices = sort_res[1][:, : int(W_metric.shape[1] * sparsity_ratio)]
    W_mask.scatter_(1, indices, True)
    return W_mask


def ref_magnitude(model, sparsity_ratio=0.0, prune_n=0, prune_m=0) -> dict[str, torch.Tensor]:
    """lib/prune.py prune_magnitude; returns keep masks keyed by parameter name."""
    keep = {}
    layers = model.model.layers
    for i in range(len(layers)):
        subset = ref_find_layers(layers[i])
        for name in subset:
            W = subset[name].weight.data
            W_metric = torch.abs(W)
            if prune_n != 0:
                W_mask = ref_nm_prune_mask(W_metric, prune_n, prune_m)
            else:
                thresh = torch.sort(W_metric.flatten())[0][int(W.numel() * sparsity_ratio)]
                W_mask = W_metric <= thresh
            W[W_mask] = 0
            keep[f"model.layers.{i}.{name}.weight"] = ~W_mask
    return keep


class _RefCatcher(nn.Module):
    def __init__(self, module, inps, cache):
        super().__init__()
        self.module = module
        self.inps = inps
        self.cache = cache

    def forward(self, inp, **kwargs):
        self.inps[self.cache["i"]] = inp
        self.cache["i"] += 1
        self.cache["kwargs"] = kwargs  # every kwarg: attention_mask, position_ids, position_embeddings, ...
        raise ValueError


@torch.no_grad()
def ref_layerwise(model, windows: torch.Tensor, method: str, *, sparsity_ratio=0.0, prune_n=0, prune_m=0,
                  use_variant=False, blocksize=128, layer_sparsity=None, prune=True
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """prune_wanda / prune_sparsegpt: (keep masks, statistic per linear) keyed by parameter name.
    layer_sparsity: OWL's per-layer ratios (prune_wanda_outlier / prune_sparsegpt_outlier); prune=False:
    OWL's first pass, which only collects statistics and propagates the dense activations."""
    model.config.use_cache = False
    layers = model.model.layers
    nsamples, seqlen = windows.shape
    inps = torch.zeros((nsamples, seqlen, model.config.hidden_size), dtype=next(model.parameters()).dtype)
    cache = {"i": 0, "kwargs": None}
    layers[0] = _RefCatcher(layers[0], inps, cache)
    for j in range(nsamples):  # the dataloader yields one (1, seqlen) window at a time
        try:
            model(windows[j : j + 1])
        except ValueError:
            pass
    layers[0] = layers[0].module
    assert cache["i"] == nsamples
    outs = torch.zeros_like(inps)
    kwargs = cache["kwargs"]
    assert "position_embeddings" in kwargs
    assert kwargs.get("past_key_values") is None  # use_cache=False: no KV cache shared across samples

    keep, stats = {}, {}
    for i in range(len(layers)):
        layer = layers[i]
        subset = ref_find_layers(layer)
        wrapper = RefWrappedGPT if method == "wanda" else RefSparseGPT
        wrapped = {name: wrapper(subset[name]) for name in subset}

        def add_batch(name):
            def hook(_, inp, out):
                wrapped[name].add_batch(inp[0].data, out.data)

            return hook

        handles = [subset[name].register_forward_hook(add_batch(name)) for name in wrapped]
        for j in range(nsamples):
            outs[j] = layer(inps[j].unsqueeze(0), **kwargs)[0]
        for h in handles:
            h.remove()

        ratio = sparsity_ratio if layer_sparsity is None else layer_sparsity[i]
        for name in subset:
            key = f"model.layers.{i}.{name}.weight"
            if not prune:
                stats[key] = wrapped[name].scaler_row.clone()
                continue
            if method == "wanda":
                stats[key] = wrapped[name].scaler_row.clone()
                W_metric = torch.abs(subset[name].weight.data) * torch.sqrt(wrapped[name].scaler_row.reshape(1, -1))
                W_mask = ref_wanda_prune_mask(W_metric, ratio, prune_n, prune_m, use_variant)
                subset[name].weight.data[W_mask] = 0
                keep[key] = ~W_mask
            else:
                stats[key] = wrapped[name].H.clone()
                wrapped[name].fasterprune(ratio, prunen=prune_n, prunem=prune_m, blocksize=blocksize,
                                          percdamp=0.01)
                keep[key] = subset[name].weight.data != 0  # the reference stores no mask: zeros are the mask

        for j in range(nsamples):
            outs[j] = layer(inps[j].unsqueeze(0), **kwargs)[0]
        inps, outs = outs, inps
    return keep, stats


def ref_get_c4_windows(documents: list[str], nsamples: int, seed: int, seqlen: int, tokenizer) -> torch.Tensor:
    """lib/data.py get_c4, the training windows (the shard is a list of documents here)."""
    random.seed(seed)
    trainloader = []
    for _ in range(nsamples):
        while True:
            i = random.randint(0, len(documents) - 1)
            trainenc = tokenizer(documents[i], return_tensors="pt")
            if trainenc.input_ids.shape[1] > seqlen:
                break
        i = random.randint(0, trainenc.input_ids.shape[1] - seqlen - 1)
        inp = trainenc.input_ids[:, i : i + seqlen]
        tar = inp.clone()
        tar[:, :-1] = -100
        trainloader.append((inp, tar))
    return torch.cat([inp for inp, _ in trainloader], dim=0)


def ref_get_wikitext2_windows(texts: list[str], nsamples: int, seed: int, seqlen: int, tokenizer) -> torch.Tensor:
    """lib/data.py get_wikitext2, the training windows (texts = the train split's lines)."""
    trainenc = tokenizer(" ".join(texts), return_tensors="pt")
    random.seed(seed)
    out = []
    for _ in range(nsamples):
        i = random.randint(0, trainenc.input_ids.shape[1] - seqlen - 1)
        out.append(trainenc.input_ids[:, i : i + seqlen])
    return torch.cat(out, dim=0)


def ref_args(pattern: Pattern) -> dict:
    """Our pattern -> the reference's (sparsity_ratio, prune_n, prune_m)."""
    if isinstance(pattern, NM):
        return {"sparsity_ratio": pattern.sparsity, "prune_n": pattern.m - pattern.n, "prune_m": pattern.m}
    return {"sparsity_ratio": pattern.sparsity, "prune_n": 0, "prune_m": 0}


# ==================================================================================================
# Our side: the engine driven the way sparse_recover/engine/prune.py drives it


def ours_prune(model, windows, method_name: str, settings: PruneSettings, batch_size: int = 1):
    """(keep masks, statistic per linear) keyed by parameter name, as engine/prune.py computes them."""
    method = get_method(method_name)
    masks: dict[str, torch.Tensor] = {}
    stats_seen: dict[str, torch.Tensor] = {}

    def prune_linears(prefix, linears, groups, stats):
        for group in groups:
            stat = stats.get(group[0])
            assert method.statistic is None or stat is not None, f"{prefix}.{group} was never called"
            mods = [linears[n] for n in group]
            outcomes = method.fn([weight_2d(m).detach() for m in mods], stat.value if stat else None, settings)
            for name, mod, res in zip(group, mods, outcomes):
                with torch.no_grad():
                    if res.weight is not None:
                        weight_2d(mod).copy_(res.weight.to(mod.weight.dtype))
                    weight_2d(mod).masked_fill_(~res.keep, 0)
                masks[f"{prefix}.{name}.weight"] = res.keep.clone()
                if stat is not None:
                    stats_seen[f"{prefix}.{name}.weight"] = stat.value.clone()

    if method.statistic is None:
        blocks_name, blocks = decoder_blocks(model)
        for i, block in enumerate(blocks):
            lin = prunable_linears(block)
            prune_linears(f"{blocks_name}.{i}", lin, [[n] for n in lin], {})
    else:
        layerwise(model, windows, lambda ctx: prune_linears(ctx.prefix, ctx.linears, ctx.groups, ctx.stats),
                  statistic=method.statistic, device=CPU, batch_size=batch_size, propagate="pruned")
    return masks, stats_seen


def assert_masks_equal(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert set(ours) == set(ref), (sorted(ours), sorted(ref))
    bad = {k: int((ours[k] != ref[k]).sum()) for k in ref if not torch.equal(ours[k], ref[k])}
    assert not bad, f"masks differ from the reference (differing entries per matrix): {bad}"


def model_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ==================================================================================================
# Fixtures




@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def documents() -> list[str]:
    from sparse_recover.data import wiki_en_part

    docs = wiki_en_part("train")[:120]
    # a few documents too short for any window, so the redraw loop is exercised
    return docs[:40] + ["tiny.", "A short line of text.", ""] + docs[40:]


@pytest.fixture(scope="module")
def windows(tokenizer, documents) -> torch.Tensor:
    """Calibration windows drawn by the reference get_c4 protocol; both sides get these."""
    w = ref_get_c4_windows(documents, NSAMPLES, 0, SEQLEN, tokenizer)
    assert w.shape == (NSAMPLES, SEQLEN)
    return w


def _pair():
    """Two identical seeded tiny 2-layer LLaMA models (ours, reference)."""
    return build_model("llama"), build_model("llama")


# ==================================================================================================
# 1. Wanda


@pytest.mark.parametrize(
    "pattern, use_variant",
    [
        (Unstructured(0.5), False),
        (Unstructured(0.6), False),
        (NM(2, 4), False),
        (NM(4, 8), False),
        (NM(2, 8), False),  # keep 2 of 8 = the reference's prune_n=6, prune_m=8
        (Unstructured(0.5), True),
    ],
    ids=["unstructured-50", "unstructured-60", "2:4", "4:8", "2:8", "variant-50"],
)
def test_wanda_masks_equal_reference(windows, pattern, use_variant):
    ours_model, ref_model = _pair()
    ours, _ = ours_prune(ours_model, windows, "wanda", PruneSettings(pattern=pattern, use_variant=use_variant))
    ref, _ = ref_layerwise(ref_model, windows, "wanda", use_variant=use_variant, **ref_args(pattern))
    assert_masks_equal(ours, ref)
    assert len(ours) == 2 * 7
    # the weights left are the same too (Wanda only masks)
    w_ours, w_ref = model_weights(ours_model), model_weights(ref_model)
    assert all(torch.equal(w_ours[k], w_ref[k]) for k in w_ref)
    if isinstance(pattern, NM):
        for keep in ours.values():
            assert (keep.reshape(keep.shape[0], -1, pattern.m).sum(-1) == pattern.n).all()
    elif not use_variant:
        for keep in ours.values():
            assert ((~keep).sum(1) == int(keep.shape[1] * pattern.sparsity)).all()


# ==================================================================================================
# 2. Magnitude


@pytest.mark.parametrize("sparsity", [0.5, 0.6])
def test_magnitude_reference_rule_equals_reference(sparsity):
    ours_model, ref_model = _pair()
    ours, _ = ours_prune(ours_model, None, "magnitude", PruneSettings(pattern=Unstructured(sparsity), rule="reference"))
    ref = ref_magnitude(ref_model, sparsity_ratio=sparsity)
    assert_masks_equal(ours, ref)


@pytest.mark.parametrize("sparsity", [0.5, 0.6])
def test_magnitude_exact_rule_differs_only_at_the_threshold(sparsity):
    ours_model, ref_model = _pair()
    dense = {k: v.abs() for k, v in model_weights(ours_model).items()}
    ours, _ = ours_prune(ours_model, None, "magnitude", PruneSettings(pattern=Unstructured(sparsity)))
    ref = ref_magnitude(ref_model, sparsity_ratio=sparsity)
    assert set(ours) == set(ref)
    for key in ref:
        score = dense[key]
        k = int(score.numel() * sparsity)
        assert int((~ours[key]).sum()) == k, key  # exactly int(numel * s) per matrix
        extra = ours[key] & ~ref[key]  # pruned by the reference only
        assert not (~ours[key] & ref[key]).any(), key  # everything we prune, the reference prunes
        thresh = torch.sort(score.flatten())[0][k]
        assert int(extra.sum()) >= 1, key  # the reference prunes int(numel * s) + 1 (plus ties)
        assert (score[extra] == thresh).all(), key  # the extra entries sit at the reference threshold
        assert torch.equal(extra, (score <= thresh) & ours[key]), key


@pytest.mark.parametrize("pattern", [NM(2, 4), NM(4, 8)], ids=["2:4", "4:8"])
def test_magnitude_nm_equals_reference(pattern):
    ours_model, ref_model = _pair()
    ours, _ = ours_prune(ours_model, None, "magnitude", PruneSettings(pattern=pattern))
    ref = ref_magnitude(ref_model, **ref_args(pattern))
    assert_masks_equal(ours, ref)
    w_ours, w_ref = model_weights(ours_model), model_weights(ref_model)
    assert all(torch.equal(w_ours[k], w_ref[k]) for k in w_ref)


# ==================================================================================================
# 3. SparseGPT


@pytest.mark.parametrize(
    "pattern, blocksize",
    [(Unstructured(0.5), 128), (Unstructured(0.5), 32), (NM(2, 4), 128), (NM(2, 4), 32)],
    ids=["unstructured-50-b128", "unstructured-50-b32", "2:4-b128", "2:4-b32"],
)
def test_sparsegpt_masks_and_weights_match_reference(windows, pattern, blocksize):
    ours_model, ref_model = _pair()
    settings = PruneSettings(pattern=pattern, rule="reference", blocksize=blocksize)
    ours, _ = ours_prune(ours_model, windows, "sparsegpt", settings, batch_size=1)
    ref, _ = ref_layerwise(ref_model, windows, "sparsegpt", blocksize=blocksize, **ref_args(pattern))
    assert_masks_equal(ours, ref)
    w_ours, w_ref = model_weights(ours_model), model_weights(ref_model)
    for key in w_ref:
        torch.testing.assert_close(w_ours[key], w_ref[key], rtol=1e-4, atol=1e-5, msg=key)


def test_sparsegpt_exact_rule_prunes_floor_per_block(windows):
    """The default rule prunes exactly int(numel*s) per (matrix, column block); the reference one more."""
    model = build_model("llama")
    ours, _ = ours_prune(model, windows, "sparsegpt", PruneSettings(pattern=Unstructured(0.5), blocksize=32))
    for key, keep in ours.items():
        for c0 in range(0, keep.shape[1], 32):
            block = keep[:, c0 : c0 + 32]
            assert int((~block).sum()) == int(block.numel() * 0.5), key


@pytest.mark.parametrize("method, pattern", [("wanda", Unstructured(0.5)), ("sparsegpt", NM(2, 4))],
                         ids=["wanda-50", "sparsegpt-2:4"])
def test_float16_model_matches_reference(windows, method, pattern):
    """The reference loads models in fp16 (statistics and the solve in fp32): same masks, same weights."""
    ours_model, ref_model = (m.to(torch.float16) for m in _pair())
    ours, _ = ours_prune(ours_model, windows, method, PruneSettings(pattern=pattern, rule="reference"))
    ref, _ = ref_layerwise(ref_model, windows, method, **ref_args(pattern))
    assert_masks_equal(ours, ref)
    w_ours, w_ref = model_weights(ours_model), model_weights(ref_model)
    for key in w_ref:
        assert w_ours[key].dtype == torch.float16
        torch.testing.assert_close(w_ours[key], w_ref[key], rtol=1e-3, atol=1e-4, msg=key)


# ==================================================================================================
# 4. Statistics


def test_streaming_statistics_equal_one_sample_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 24, 48, generator=g) * (torch.rand(48, generator=g) * 4 + 0.1)
    layer = nn.Linear(48, 16, bias=False)
    ref_w, ref_h = RefWrappedGPT(layer), RefSparseGPT(layer)
    for j in range(x.shape[0]):  # one sequence per call, as the reference does
        ref_w.add_batch(x[j : j + 1], None)
        ref_h.add_batch(x[j : j + 1], None)
    for sizes in ([3, 3, 4], [10], [1, 5, 2, 2]):
        sq, hs = SqNorm(48, CPU), Hessian(48, CPU)
        start = 0
        for b in sizes:
            sq.add(x[start : start + b])
            hs.add(x[start : start + b])
            start += b
        assert sq.nsamples == hs.nsamples == 10
        torch.testing.assert_close(sq.value, ref_w.scaler_row, rtol=1e-5, atol=0)
        torch.testing.assert_close(hs.value, ref_h.H, rtol=1e-5, atol=1e-5 * float(ref_h.H.abs().max()))
    # one sample at a time: bit for bit
    sq, hs = SqNorm(48, CPU), Hessian(48, CPU)
    for j in range(x.shape[0]):
        sq.add(x[j : j + 1])
        hs.add(x[j : j + 1])
    assert torch.equal(sq.value, ref_w.scaler_row)
    torch.testing.assert_close(hs.value, ref_h.H, rtol=1e-6, atol=1e-6 * float(ref_h.H.abs().max()))


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_engine_batched_statistics_equal_reference(windows, method):
    """The engine's statistics with 4 windows per forward equal the reference's batch-1 accumulation."""
    ours_model, ref_model = _pair()
    settings = PruneSettings(pattern=NM(2, 4), rule="reference")
    ours, ours_stats = ours_prune(ours_model, windows, method, settings, batch_size=4)
    ref, ref_stats = ref_layerwise(ref_model, windows, method, **ref_args(settings.pattern))
    assert set(ours_stats) == set(ref_stats)
    # on this tie-free data the masks are the same as well (rounding differences are far from ties)
    assert_masks_equal(ours, ref)
    for key in ref_stats:
        r = ref_stats[key]
        torch.testing.assert_close(ours_stats[key], r, rtol=1e-5, atol=1e-5 * float(r.abs().max()), msg=key)


# ==================================================================================================
# 5. Calibration windows


@pytest.mark.parametrize("seqlen, seed", [(64, 0), (200, 0), (200, 7)])
def test_sample_windows_equals_reference_get_c4(tokenizer, documents, seqlen, seed):
    ours = sample_windows(Corpus("docs", documents), tokenizer, 12, seqlen, seed)
    ref = ref_get_c4_windows(documents, 12, seed, seqlen, tokenizer)
    assert ours.dtype == torch.int64 and ours.shape == (12, seqlen)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("seed", [0, 3])
def test_sample_windows_stream_equals_reference_get_wikitext2(tokenizer, documents, seed):
    texts = documents[:60]
    ours = sample_windows(Corpus("stream", [" ".join(texts)], stream=True), tokenizer, 10, SEQLEN, seed)
    ref = ref_get_wikitext2_windows(texts, 10, seed, SEQLEN, tokenizer)
    assert torch.equal(ours, ref)


# ==================================================================================================
# End to end: the prune command's masks.safetensors equal the reference's


@pytest.mark.parametrize("method, pattern, extra", [
    ("wanda", "unstructured", {"sparsity": 0.5}),
    ("sparsegpt", "2:4", {}),
])
def test_prune_command_masks_equal_reference(tmp_path, tokenizer, documents, method, pattern, extra, capsys):
    import json

    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from sparse_recover.commands.prune import run
    from sparse_recover.rundir import RunDir
    from sparse_recover.config import CalibSection, ModelSection, PruneConfig, PruneSection
    from sparse_recover.sparsity.io import MASKS_FILE, load_masks

    model_dir = tmp_path / "model"
    build_model("llama").save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "calib.jsonl"
    data.write_text("\n".join(json.dumps({"text": d}) for d in documents), encoding="utf-8")
    cfg = PruneConfig(
        model=ModelSection(model=str(model_dir), dtype="float32", device="cpu"),
        calib=CalibSection(source=str(data), nsamples=NSAMPLES, seqlen=SEQLEN, seed=0),
        prune=PruneSection(method=method, pattern=pattern, threshold_rule="reference", **extra),
    )
    run(cfg, RunDir(tmp_path / "run"))
    masks, _ = load_masks(tmp_path / "run" / "prune" / MASKS_FILE)
    with safe_open(str(tmp_path / "run" / "calib" / "windows.safetensors"), framework="pt") as fh:
        windows = fh.get_tensor("windows")
    # the command drew the reference get_c4 windows
    assert torch.equal(windows, ref_get_c4_windows(documents, NSAMPLES, 0, SEQLEN, tokenizer))

    ref_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pat = PruneSection(method=method, pattern=pattern, **extra).parsed_pattern()
    ref, _ = ref_layerwise(ref_model, windows, method, **ref_args(pat))
    assert_masks_equal(masks, ref)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "prune", dtype=torch.float32).state_dict()
    for key, value in ref_model.state_dict().items():
        torch.testing.assert_close(saved[key], value, rtol=1e-4, atol=1e-5, msg=key)


# ==================================================================================================
# 7. OWL (luuyin/OWL lib/prune_all.py: prune_wanda_outlier, prune_sparsegpt_outlier, prune_mag_outlier)


def ref_owl_layer_ratios(model, windows, hyper_m: float, lamda: float, sparsity_ratio: float):
    """The first pass: per layer, the Wanda metric of every linear on the dense activations, concatenated
    (.cpu(), find_layers order), its outlier ratio (check_outlier_mean), then the numpy scaling."""
    import numpy as np

    _, stats = ref_layerwise(model, windows, "wanda", prune=False)
    all_layer_ratio = []
    for i, layer in enumerate(model.model.layers):
        subset = ref_find_layers(layer)
        layer_wmetric = []
        for name in subset:
            scaler_row = stats[f"model.layers.{i}.{name}.weight"]
            layer_wmetric.append(torch.abs(subset[name].weight.data) * torch.sqrt(scaler_row.reshape((1, -1))))
        W = torch.cat([torch.flatten(x.cpu()) for x in layer_wmetric])
        max_shred = torch.mean(W) * hyper_m
        all_layer_ratio.append(float((W > max_shred).sum().item()) / W.numel() * 100)
    ratios = list(all_layer_ratio)
    arr = np.array(all_layer_ratio)
    arr = (arr - arr.min()) * (1 / (arr.max() - arr.min()) * lamda * 2)
    arr = arr - np.mean(arr) + (1 - sparsity_ratio)
    return ratios, [1 - arr[i] for i in range(len(arr))]


def ref_mag_owl(model, layer_sparsity) -> dict[str, torch.Tensor]:
    """prune_mag_outlier's second pass: one `<= sorted[int(numel * ratio)]` threshold per matrix."""
    keep = {}
    for i, layer in enumerate(model.model.layers):
        subset = ref_find_layers(layer)
        for name in subset:
            W = subset[name].weight.data
            W_metric = torch.abs(W)
            thresh = torch.sort(W_metric.flatten())[0][int(W.numel() * layer_sparsity[i])]
            W_mask = W_metric <= thresh
            W[W_mask] = 0
            keep[f"model.layers.{i}.{name}.weight"] = ~W_mask
    return keep


def _distinct_layers():
    """The seeded tiny model with its second block's weights scaled so the two blocks' outlier ratios differ
    clearly (with identical ratios the reference divides by zero)."""
    model = build_model("llama")
    with torch.no_grad():
        for p in model.model.layers[1].parameters():
            if p.dim() == 2:
                p[:, ::7] *= 6.0
    return model


@pytest.mark.parametrize("method, sparsity, rule", [("wanda", 0.6, "exact"), ("sparsegpt", 0.5, "reference"),
                                                    ("magnitude", 0.7, "reference")])
def test_owl_ratios_and_masks_equal_reference(windows, method, sparsity, rule):
    from sparse_recover.engine.prune import owl_profile, prune_model

    hyper_m, lamda = 5.0, 0.08
    ours_model, ref_model = _distinct_layers(), _distinct_layers()
    ref_ratios, ref_layer_sparsity = ref_owl_layer_ratios(ref_model, windows, hyper_m, lamda, sparsity)
    ratios, layer_sparsity = owl_profile(ours_model, windows, sparsity, hyper_m, lamda, device=CPU,
                                         show_progress=False)
    assert ratios == ref_ratios and layer_sparsity == ref_layer_sparsity  # bit for bit, float64
    assert ratios[0] != ratios[1] and abs(sum(layer_sparsity) / len(layer_sparsity) - sparsity) < 1e-12
    assert all(abs(s - sparsity) <= lamda + 1e-12 for s in layer_sparsity)
    settings = PruneSettings(pattern=Unstructured(sparsity), rule=rule)
    ours, _, _ = prune_model(ours_model, get_method(method), settings, windows, device=CPU, show_progress=False,
                             block_sparsity=layer_sparsity)
    if method == "magnitude":
        ref = ref_mag_owl(ref_model, ref_layer_sparsity)
    else:
        ref, _ = ref_layerwise(ref_model, windows, method, layer_sparsity=ref_layer_sparsity, sparsity_ratio=sparsity)
    assert_masks_equal(ours, ref)
    if method == "wanda":  # every row of a block prunes int(cols * its ratio)
        for key, keep in ours.items():
            block = int(key.split(".")[2])
            assert ((~keep).sum(1) == int(keep.shape[1] * layer_sparsity[block])).all(), key

