"""RIA (`prune --method ria`) equals its reference code, keeps exact budgets, and refuses bad input.

The oracle below restates, in our own words, biomedical-cybernetics/Relative-importance-and-activation-pruning:
lib/prune.py `prune_ria` (the `ria` branch of W_metric, the direct N:M branch, the unstructured branch
with its default `per_outneuron=False`), lib/layerwrapper.py `WrappedGPT.add_batch` (scaler_row) and the
defaults of main.py (a = 0.5; reallocation, lsa, reconstruction, gptq, semi_sparse_acc all off). The
pipeline is the reference's: a Catcher replacing layers[0] stores each window's input (batch 1) and the
keyword arguments (all of them: transformers 5 also passes position_embeddings), forward hooks feed
scaler_row one window at a time, every linear of the block is pruned, and the pruned block is re-run to
produce the next block's inputs.

Reference N:M is "prune n of m" (topk of the smallest); ours is "keep N of M": NM(n, m) <-> prune_n = m - n.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from sparse_recover.pruning import PruneSettings, get_method
from sparse_recover.pruning.ria import ria_keep, ria_score
from sparse_recover.sparsity.patterns import NM, Unstructured
from tests.helpers import assert_clean_error, build_model, run_audit, run_cli, snapshot

NSAMPLES = 8
SEQLEN = 64

pytestmark = pytest.mark.usefixtures("one_thread")


# ==================================================================================================
# The reference, restated


def ref_ria_metric(W: torch.Tensor, scaler_row: torch.Tensor, a: float) -> torch.Tensor:
    """prune_ria's W_metric for prune_method == "ria"."""
    return (torch.abs(W) / torch.sum(torch.abs(W), dim=0) + torch.abs(W) / torch.sum(torch.abs(W), dim=1).reshape(-1, 1)) \
        * (torch.sqrt(scaler_row.reshape((1, -1)))) ** a


def ref_ria_prune_mask(W_metric: torch.Tensor, sparsity_ratio: float, prune_n: int = 0, prune_m: int = 0,
                       per_outneuron: bool = False) -> torch.Tensor:
    """True = prune: the direct N:M branch, or the unstructured one (per matrix unless per_outneuron)."""
    W_mask = torch.zeros_like(W_metric) == 1
    if prune_n != 0:
        for ii in range(W_metric.shape[1]):
            if ii % prune_m == 0:
                tmp = W_metric[:, ii : ii + prune_m].float()
                W_mask.scatter_(1, ii + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
    elif per_outneuron:
        indices = torch.sort(W_metric, dim=-1, stable=True)[1][:, : int(W_metric.shape[1] * sparsity_ratio)]
        W_mask.scatter_(1, indices, True)
    else:
        thresh = torch.sort(W_metric.flatten())[0][int(W_metric.shape[0] * W_metric.shape[1] * sparsity_ratio)]
        W_mask = W_metric <= thresh
    return W_mask


class _Scaler:
    """WrappedGPT.add_batch, the scaler_row part: running mean over windows of squared column norms."""

    def __init__(self, columns: int):
        self.scaler_row = torch.zeros(columns)
        self.nsamples = 0

    def hook(self, _module, inp, _out) -> None:
        x = inp[0].data
        x = x.unsqueeze(0) if x.dim() == 2 else x
        tmp = x.shape[0]
        x = x.reshape(-1, x.shape[-1]).t()
        self.scaler_row *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        self.scaler_row += torch.norm(x.type(torch.float32), p=2, dim=1) ** 2 / self.nsamples


class _Catcher(nn.Module):
    def __init__(self, module, inps, cache):
        super().__init__()
        self.module, self.inps, self.cache = module, inps, cache

    def forward(self, inp, **kwargs):
        self.inps[self.cache["i"]] = inp
        self.cache["i"] += 1
        self.cache["kwargs"] = kwargs
        raise ValueError


@torch.no_grad()
def ref_prune_ria(model, windows: torch.Tensor, *, sparsity_ratio: float, prune_n: int = 0, prune_m: int = 0,
                  a: float = 0.5) -> dict[str, torch.Tensor]:
    """prune_ria on a LLaMA-shaped model; keep masks keyed by parameter name."""
    model.config.use_cache = False
    layers = model.model.layers
    nsamples = windows.shape[0]
    inps = torch.zeros((nsamples, windows.shape[1], model.config.hidden_size), dtype=next(model.parameters()).dtype)
    cache = {"i": 0, "kwargs": None}
    layers[0] = _Catcher(layers[0], inps, cache)
    for j in range(nsamples):
        try:
            model(windows[j : j + 1])
        except ValueError:
            pass
    layers[0] = layers[0].module
    outs, kwargs, keep = torch.zeros_like(inps), cache["kwargs"], {}
    for i, layer in enumerate(layers):
        subset = {n: m for n, m in layer.named_modules() if type(m) is nn.Linear}
        wrapped = {n: _Scaler(m.weight.shape[1]) for n, m in subset.items()}
        handles = [subset[n].register_forward_hook(wrapped[n].hook) for n in subset]
        for j in range(nsamples):
            outs[j] = layer(inps[j].unsqueeze(0), **kwargs)[0]
        for h in handles:
            h.remove()
        for name in subset:
            W = subset[name].weight.data.clone()
            W_mask = ref_ria_prune_mask(ref_ria_metric(W, wrapped[name].scaler_row, a), sparsity_ratio, prune_n, prune_m)
            subset[name].weight.data[W_mask] = 0
            keep[f"model.layers.{i}.{name}.weight"] = ~W_mask
        for j in range(nsamples):
            outs[j] = layer(inps[j].unsqueeze(0), **kwargs)[0]
        inps, outs = outs, inps
    return keep


# ==================================================================================================
# 1. The prune command's masks equal the reference's, bit for bit


def _prune_command(tmp_path, tokenizer_dir, calib_file, pattern: str, sparsity, rule: str, alpha: float = 0.5):
    from transformers import AutoTokenizer

    from sparse_recover.commands.prune import run
    from sparse_recover.config import CalibSection, ModelSection, PruneConfig, PruneSection
    from sparse_recover.rundir import RunDir

    model_dir = tmp_path / "model"
    build_model("llama").save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(model_dir)
    cfg = PruneConfig(
        model=ModelSection(model=str(model_dir), dtype="float32", device="cpu"),
        calib=CalibSection(source=str(calib_file), nsamples=NSAMPLES, seqlen=SEQLEN, seed=0),
        prune=PruneSection(method="ria", pattern=pattern, sparsity=sparsity, threshold_rule=rule, ria_alpha=alpha),
    )
    run(cfg, RunDir(tmp_path / "run"))
    return model_dir, tmp_path / "run"


@pytest.mark.parametrize("pattern, sparsity, ref_nm, group", [
    ("unstructured", 0.5, (0, 0), "none"),
    ("2:4", None, (2, 4), "nm"),
], ids=["unstructured-50", "2:4"])
def test_prune_command_masks_equal_reference(tmp_path, tokenizer_dir, calib_file, pattern, sparsity, ref_nm, group,
                                             capsys):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from sparse_recover.sparsity.io import MASKS_FILE, load_masks

    model_dir, run_dir = _prune_command(tmp_path, tokenizer_dir, calib_file, pattern, sparsity, "reference")
    masks, _ = load_masks(run_dir / "prune" / MASKS_FILE)
    with safe_open(str(run_dir / "calib" / "windows.safetensors"), framework="pt") as fh:
        windows = fh.get_tensor("windows")
    assert windows.shape == (NSAMPLES, SEQLEN)
    ref_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ref = ref_prune_ria(ref_model, windows, sparsity_ratio=0.5, prune_n=ref_nm[0], prune_m=ref_nm[1])
    assert set(masks) == set(ref) and len(ref) == 2 * 7
    bad = {k: int((masks[k] != ref[k]).sum()) for k in ref if not torch.equal(masks[k], ref[k])}
    assert not bad, f"masks differ from the reference (differing entries per matrix): {bad}"
    # RIA only masks: the saved checkpoint is the reference's pruned model exactly
    saved = AutoModelForCausalLM.from_pretrained(run_dir / "prune", dtype=torch.float32).state_dict()
    assert all(torch.equal(saved[k], v) for k, v in ref_model.state_dict().items())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    entry = manifest["stages"]["prune"]
    assert entry["method"] == "ria" and entry["group"] == group
    assert entry["config"]["prune"]["ria_alpha"] == 0.5


def test_prune_command_exact_rule_is_audited_per_matrix(tmp_path, tokenizer_dir, calib_file, capsys):
    """The default rule prunes exactly int(numel * s) per matrix, and the audit checks that budget."""
    from sparse_recover.sparsity.io import MASKS_FILE, load_masks

    _, run_dir = _prune_command(tmp_path, tokenizer_dir, calib_file, "unstructured", 0.6, "exact", alpha=1.0)
    masks, _ = load_masks(run_dir / "prune" / MASKS_FILE)
    for key, keep in masks.items():
        assert int((~keep).sum()) == int(keep.numel() * 0.6), key
    assert json.loads((run_dir / "manifest.json").read_text())["stages"]["prune"]["group"] == "matrix"
    report = run_audit(run_dir)["prune"]
    assert report["ok"] and not report["violations"] and report["pruned_nonzero"] == 0


# ==================================================================================================
# 2. Invariants on plain tensors


def _weights_and_stat(rows: int = 48, cols: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * (1 + 3 * torch.rand(rows, 1, generator=g))
    stat = torch.rand(cols, generator=g) * 10
    return w, stat


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 2.0])
def test_score_is_the_reference_metric_bit_for_bit(alpha):
    w, stat = _weights_and_stat()
    assert torch.equal(ria_score(w, stat, alpha), ref_ria_metric(w, stat, alpha))


@pytest.mark.parametrize("pattern", [Unstructured(0.5), Unstructured(0.7), NM(2, 4), NM(1, 4), NM(4, 8)],
                         ids=["u50", "u70", "2:4", "1:4", "4:8"])
def test_masks_equal_the_reference_branches(pattern):
    w, stat = _weights_and_stat(seed=1)
    metric = ref_ria_metric(w, stat, 0.5)
    if isinstance(pattern, NM):
        ref = ref_ria_prune_mask(metric, pattern.sparsity, pattern.m - pattern.n, pattern.m)
        assert torch.equal(ria_keep(w, stat, pattern), ~ref)
    else:
        assert torch.equal(ria_keep(w, stat, pattern, rule="reference"), ~ref_ria_prune_mask(metric, pattern.sparsity))
        per_row = ref_ria_prune_mask(metric, pattern.sparsity, per_outneuron=True)
        assert torch.equal(ria_keep(w, stat, pattern, per_row=True), ~per_row)


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.8])
def test_exact_kept_counts(sparsity):
    w, stat = _weights_and_stat(seed=2)
    w[:, :8] = 0.25  # ties
    numel, cols = w.numel(), w.shape[1]
    keep = ria_keep(w, stat, Unstructured(sparsity))
    assert int((~keep).sum()) == int(numel * sparsity)
    per_row = ria_keep(w, stat, Unstructured(sparsity), per_row=True)
    assert ((~per_row).sum(dim=1) == int(cols * sparsity)).all()
    # the reference rule prunes everything the exact rule does, plus the entries at its threshold
    ref = ria_keep(w, stat, Unstructured(sparsity), rule="reference")
    assert not (~keep & ref).any() and int((~ref).sum()) > int(numel * sparsity)
    for nm in (NM(2, 4), NM(1, 4), NM(2, 8)):
        counts = ria_keep(w, stat, nm).reshape(w.shape[0], -1, nm.m).sum(dim=-1)
        assert (counts == nm.n).all(), nm


def test_alpha_zero_is_relative_importance_only():
    w, stat = _weights_and_stat(seed=3)
    ri = torch.abs(w) / torch.sum(torch.abs(w), dim=0) + torch.abs(w) / torch.sum(torch.abs(w), dim=1).reshape(-1, 1)
    assert torch.equal(ria_score(w, stat, 0.0), ri)
    other = torch.rand(stat.shape, generator=torch.Generator().manual_seed(9)) * 1000
    for pattern in (Unstructured(0.5), NM(2, 4)):
        # the activations no longer matter, and the mask is the reference's "ri" method (prune_magnitude)
        assert torch.equal(ria_keep(w, stat, pattern, alpha=0.0), ria_keep(w, other, pattern, alpha=0.0))
    ri_ref = ri <= torch.sort(ri.flatten())[0][int(w.numel() * 0.5)]
    assert torch.equal(ria_keep(w, stat, Unstructured(0.5), alpha=0.0, rule="reference"), ~ri_ref)
    # and with a > 0 they do matter
    assert not torch.equal(ria_keep(w, stat, Unstructured(0.5)), ria_keep(w, other, Unstructured(0.5)))


def test_all_zero_row_and_column_score_zero_not_nan():
    w, stat = _weights_and_stat(seed=4)
    w[3] = 0
    w[:, 5] = 0
    score = ria_score(w, stat)
    assert torch.isfinite(score).all()
    assert (score[3] == 0).all() and (score[:, 5] == 0).all()
    keep = ria_keep(w, stat, Unstructured(0.5))
    assert int((~keep).sum()) == w.numel() // 2 and not keep[3].any() and not keep[:, 5].any()


def test_registry_and_groups():
    method = get_method("ria")
    assert method.statistic == "sq_norm"
    assert method.group(PruneSettings(pattern=Unstructured(0.5))) == "matrix"
    assert method.group(PruneSettings(pattern=Unstructured(0.5), rule="reference")) == "none"
    assert method.group(PruneSettings(pattern=NM(2, 4))) == "nm"
    w, stat = _weights_and_stat(seed=5)
    out = method.fn([w, w * 2], stat, PruneSettings(pattern=Unstructured(0.5), ria_alpha=0.0))
    assert torch.equal(out[0].keep, ria_keep(w, stat, Unstructured(0.5), alpha=0.0))
    assert torch.equal(out[0].keep, out[1].keep) and out[0].weight is None


# ==================================================================================================
# 3. Bad input: one line, exit 2, nothing written


@pytest.mark.parametrize("args, needle", [
    (["--ria-alpha", "-0.5"], "--ria-alpha"),
    (["--ria-alpha", "nan"], "--ria-alpha"),
    (["--set", "prune.ria_alpha=-1"], "prune.ria_alpha"),
], ids=["negative", "nan", "set-negative"])
def test_bad_alpha_is_one_line(tmp_path, args, needle):
    run_dir = tmp_path / "run"
    res = run_cli(["prune", "--run-dir", run_dir, "--model", tmp_path / "no-model", "--method", "ria",
                   "--pattern", "2:4", *args], tmp_path, tmp_path / "cache")
    message = assert_clean_error(res, 2, needles=[needle])
    assert "ria_alpha" in message or "--ria-alpha" in message
    assert snapshot(run_dir) is None
