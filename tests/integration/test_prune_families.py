"""`prune` end to end on seeded tiny models of five families: masks, audit, untouched layers."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from sparse_recover.commands import prune as prune_cmd
from sparse_recover.config import PruneConfig, validate
from sparse_recover.rundir import RunDir
from sparse_recover.sparsity.io import load_masks
from sparse_recover.sparsity.masks import nm_group_counts
from tests.helpers import FAMILIES, SMALL_CALIB, prune, run_eval, run_audit

def _state(folder):
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method,pattern,sparsity", [
    ("wanda", "2:4", None), ("sparsegpt", "unstructured", 0.5), ("magnitude", "unstructured", 0.6),
    ("wanda", "unstructured", 0.7),
])
def test_prune_audit_every_family(tiny_models, tmp_path, calib_file, family, method, pattern, sparsity):
    run = tmp_path / "run"
    entry = prune(tiny_models[family], run, calib_file, method, pattern, sparsity)
    assert (run / "prune" / "masks.safetensors").is_file()
    assert (run / "calib" / "windows.safetensors").is_file() or method == "magnitude"
    masks, meta = load_masks(run / "prune" / "masks.safetensors")
    transposed = set(json.loads(meta["transposed"]))
    dense = _state(tiny_models[family])
    pruned = _state(run / "prune")
    linear_keys = set(masks)
    expected = 14 if family in ("llama", "mistral", "qwen2") else (12 if family == "opt" else 8)
    assert len(masks) == expected  # every linear inside the blocks, GPT-2 Conv1D included
    for key, keep in masks.items():
        w = pruned[key].t() if key in transposed else pruned[key]
        assert (w[~keep] == 0).all()
        rows, cols = keep.shape
        if pattern == "2:4":
            assert (nm_group_counts(keep, 4) == 2).all()
        elif method == "wanda":
            assert (keep.sum(1) == cols - int(cols * sparsity)).all()
        elif method == "magnitude":
            assert int((~keep).sum()) == int(keep.numel() * sparsity)
    # embeddings, norms, lm_head and biases untouched
    for key, value in dense.items():
        if key not in linear_keys:
            assert torch.equal(pruned[key], value), key
    if family == "gpt2":
        assert transposed == linear_keys
    report = run_audit(run)
    assert report["prune"]["ok"] and report["prune"]["pruned_nonzero"] == 0
    # floor(width * s) per row / matrix: on 64-wide toy layers that is up to 1/64 under target
    assert 0 <= (sparsity or 0.5) - entry["sparsity"]["overall"] < 1 / 64


def test_masks_deterministic_for_same_seed(tiny_models, tmp_path, calib_file):
    a = prune(tiny_models["llama"], tmp_path / "a", calib_file, "sparsegpt", "2:4")
    b = prune(tiny_models["llama"], tmp_path / "b", calib_file, "sparsegpt", "2:4")
    c = prune(tiny_models["llama"], tmp_path / "c", calib_file, "sparsegpt", "2:4", seed=1)
    assert a["masks_sha256"] == b["masks_sha256"]
    assert a["calibration"]["windows_sha256"] == b["calibration"]["windows_sha256"]
    assert c["calibration"]["windows_sha256"] != a["calibration"]["windows_sha256"]
    ma, _ = load_masks(tmp_path / "a" / "prune" / "masks.safetensors")
    mb, _ = load_masks(tmp_path / "b" / "prune" / "masks.safetensors")
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    assert _state(tmp_path / "a" / "prune").keys() == _state(tmp_path / "b" / "prune").keys()


def test_calib_batch_size_gives_same_wanda_masks(tiny_models, tmp_path, calib_file):
    a = prune(tiny_models["qwen2"], tmp_path / "a", calib_file, "wanda", "unstructured", 0.5)
    b = prune(tiny_models["qwen2"], tmp_path / "b", calib_file, "wanda", "unstructured", 0.5, batch_size=3)
    assert a["masks_sha256"] == b["masks_sha256"]


def test_rerun_is_noop_and_force_redoes(tiny_models, tmp_path, calib_file, capsys):
    run = tmp_path / "run"
    first = prune(tiny_models["llama"], run, calib_file)
    mtime = (run / "prune" / "model.safetensors").stat().st_mtime_ns
    again = prune(tiny_models["llama"], run, calib_file)
    assert "already complete" in capsys.readouterr().out
    assert again["finished"] == first["finished"]
    assert (run / "prune" / "model.safetensors").stat().st_mtime_ns == mtime
    cfg = validate(PruneConfig, {"model": {"model": str(tiny_models["llama"]), "device": "cpu"},
                                 "calib": {"source": str(calib_file), **SMALL_CALIB},
                                 "prune": {"method": "magnitude", "pattern": "4:8"}})
    redo = prune_cmd.run(cfg, RunDir(run), force=True)
    assert redo["method"] == "magnitude" and redo["pattern"] == "4:8"
    assert sorted(p.name for p in run.iterdir()) == ["calib", "logs", "manifest.json", "prune"]


def test_failed_stage_leaves_run_dir_untouched(tiny_models, tmp_path, calib_file, monkeypatch):
    run = tmp_path / "run"
    prune(tiny_models["llama"], run, calib_file)
    snapshot = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}

    def broken(*a, **k):
        raise RuntimeError("disk on fire")

    import transformers

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        prune(tiny_models["llama"], run, calib_file, "magnitude", "4:8", force=True)
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == snapshot


def test_eval_ppl_and_stage_dense(tiny_models, tmp_path, calib_file, eval_file):
    run = tmp_path / "run"
    prune(tiny_models["llama"], run, calib_file, "wanda", "unstructured", 0.5)
    pruned, = run_eval(run, "prune", ["ppl"], ppl_data=str(eval_file), seqlen=64, limit=4).values()
    dense, = run_eval(run, "dense", ["ppl"], ppl_data=str(eval_file), seqlen=64, limit=4).values()
    assert pruned["windows"] == dense["windows"] == 4
    assert pruned["ppl"] > 1 and dense["ppl"] > 1
    saved = json.loads((run / "eval" / "prune.json").read_text())
    assert list(saved.values())[0]["ppl"] == pruned["ppl"]
    manifest = json.loads((run / "manifest.json").read_text())
    assert "prune" in manifest["evals"] and "dense" in manifest["evals"]


def test_console_script_help_is_fast_and_lists_commands():
    out = subprocess.run([sys.executable, "-m", "sparse_recover", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for cmd in ("prune", "audit", "eval"):
        assert cmd in out.stdout
    # --help must not import torch (instant CLI)
    probe = subprocess.run([sys.executable, "-c", "import sys, sparse_recover.cli; print('torch' in sys.modules)"],
                           capture_output=True, text=True)
    assert probe.stdout.strip() == "False"


def test_eval_wiki_suite_and_ppl_in_one_call(tiny_models, tmp_path, calib_file, eval_file, capsys):
    run = tmp_path / "run"
    prune(tiny_models["llama"], run, calib_file, "wanda", "2:4")
    res = run_eval(run, "prune", ["ppl", "wiki-suite"], ppl_data=str(eval_file), seqlen=64, limit=8,
                       batch_size=4)
    assert set(res) == {"ppl/" + str(eval_file) + "/64/limit8", "lm-eval/wiki-suite/limit8"}
    suite = res["lm-eval/wiki-suite/limit8"]
    assert 0 <= suite["groups"]["wiki-suite"]["acc"] <= 1
    saved = json.loads((run / "eval" / "prune.json").read_text())
    assert set(saved) == set(res)
    again = run_eval(run, "prune", ["wiki-suite"], limit=8)
    assert "already measured" in capsys.readouterr().out
    assert again["lm-eval/wiki-suite/limit8"]["groups"] == suite["groups"]


def test_cli_config_file_set_and_usage_errors(tiny_models, tmp_path, calib_file):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {{model: {tiny_models['llama']}, device: cpu}}\n"
                   f"calib: {{source: {calib_file}, nsamples: 2, seqlen: 32}}\n"
                   "prune: {method: wanda, pattern: 2:4}\n")
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "sparse_recover", "prune", "--config", str(cfg), "--run-dir", str(run),
                          "--set", "prune.pattern=4:8", "--method", "magnitude"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    stage = json.loads((run / "manifest.json").read_text())["stages"]["prune"]
    assert stage["pattern"] == "4:8" and stage["method"] == "magnitude"  # --set and typed options win
    assert stage["config"]["calib"]["nsamples"] == 2  # the file wins over defaults
    usage = subprocess.run([sys.executable, "-m", "sparse_recover", "prune", "--model", "x"], capture_output=True, text=True)
    assert usage.returncode == 2 and "Traceback" not in usage.stderr and "--run-dir" in usage.stderr
