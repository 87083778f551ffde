"""`dsnot` as a stage of its own on pruned run directories of tiny models."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from sparse_recover.errors import ConfigError, RunDirError
from sparse_recover.sparsity.io import load_masks
from sparse_recover.sparsity.masks import nm_group_counts
from tests.helpers import prune, run_dsnot, run_eval, run_audit


def _masks(run, stage):
    return load_masks(run / stage / "masks.safetensors")[0]


def test_dsnot_unstructured_reference_defaults(tiny_models, tmp_path, calib_file, eval_file):
    run = tmp_path / "run"
    prune(tiny_models["llama"], run, calib_file, "wanda", "unstructured", 0.6)
    entry = run_dsnot(run, max_cycles=20, threshold=0.0)
    assert entry["config"]["init"] == "recompute" and entry["config"]["targets"] == "attn"
    files = sorted(p.name for p in (run / "dsnot").iterdir())
    assert files == sorted(p.name for p in (run / "prune").iterdir())
    pm, dm = _masks(run, "prune"), _masks(run, "dsnot")
    assert pm.keys() == dm.keys()
    for key in dm:
        assert torch.equal(dm[key].sum(1), pm[key].sum(1))  # per-row budgets preserved
        info = entry["sparsity"]["layers"][key]
        assert info["refined"] == ("self_attn" in key)
    refined = [k for k in dm if "self_attn" in k]
    assert sum(entry["sparsity"]["layers"][k]["swaps"] for k in refined) > 0
    assert entry["mean_error_after"] <= entry["mean_error_before"]
    # kept weights keep the dense base values (Wanda never updates weights), pruned ones are zero
    dense = load_file(str(tiny_models["llama"] / "model.safetensors"))
    out = load_file(str(run / "dsnot" / "model.safetensors"))
    for key, keep in dm.items():
        assert torch.equal(out[key][keep], dense[key][keep]) and (out[key][~keep] == 0).all()
    report = run_audit(run)
    assert report["dsnot"]["ok"] and report["prune"]["ok"]
    res, = run_eval(run, "dsnot", ["ppl"], ppl_data=str(eval_file), seqlen=64, limit=2).values()
    assert res["ppl"] > 1


def test_max_cycles_zero_reproduces_prune_stage_exactly(tiny_models, tmp_path, calib_file):
    run = tmp_path / "run"
    prune(tiny_models["qwen2"], run, calib_file, "wanda", "unstructured", 0.5)
    run_dsnot(run, max_cycles=0, targets="all")
    pm, dm = _masks(run, "prune"), _masks(run, "dsnot")
    assert all(torch.equal(pm[k], dm[k]) for k in pm)
    a = load_file(str(run / "prune" / "model.safetensors"))
    b = load_file(str(run / "dsnot" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dsnot_nm_all_targets_sign_check(tiny_models, tmp_path, calib_file):
    run = tmp_path / "run"
    prune(tiny_models["mistral"], run, calib_file, "wanda", "2:4")
    entry = run_dsnot(run, targets="all", sign_check=True, threshold=0.0)
    for key, keep in _masks(run, "dsnot").items():
        assert (nm_group_counts(keep, 4) == 2).all()
        assert entry["sparsity"]["layers"][key]["refined"]
    assert run_audit(run, stages=["dsnot"])["dsnot"]["ok"]


def test_dsnot_after_sparsegpt_uses_stored_mask_and_values(tiny_models, tmp_path, calib_file):
    run = tmp_path / "run"
    prune(tiny_models["llama"], run, calib_file, "sparsegpt", "unstructured", 0.5)
    with pytest.raises(ConfigError, match="--init stored"):
        run_dsnot(run, init="recompute")
    entry = run_dsnot(run, targets="all", threshold=0.0)
    assert entry["config"]["init"] == "stored" and entry["group"] == "prune-rows"
    pm, dm = _masks(run, "prune"), _masks(run, "dsnot")
    pw = load_file(str(run / "prune" / "model.safetensors"))
    dw = load_file(str(run / "dsnot" / "model.safetensors"))
    dense = load_file(str(tiny_models["llama"] / "model.safetensors"))
    for key in dm:
        both = pm[key] & dm[key]
        regrown = dm[key] & ~pm[key]
        assert torch.equal(dw[key][both], pw[key][both])  # SparseGPT's updated values stay
        assert torch.equal(dw[key][regrown], dense[key][regrown])  # regrown weights take dense values
        assert torch.equal(dm[key].sum(1), pm[key].sum(1))
    assert run_audit(run)["dsnot"]["ok"]


def test_dsnot_deterministic_and_rerun(tiny_models, tmp_path, calib_file, capsys):
    run = tmp_path / "run"
    prune(tiny_models["opt"], run, calib_file, "magnitude", "unstructured", 0.5)  # no windows yet: drawn now
    a = run_dsnot(run, targets="all", threshold=0.0)
    assert (run / "calib" / "windows.safetensors").is_file()
    again = run_dsnot(run, targets="all", threshold=0.0)
    assert "already complete" in capsys.readouterr().out and again["finished"] == a["finished"]
    with pytest.raises(RunDirError, match="other settings .*threshold: 0.0 -> 0.1"):
        run_dsnot(run)  # a completed stage with other settings is refused, not reported as done
    b = run_dsnot(run, targets="all", threshold=0.0, force=True)
    assert a["masks_sha256"] == b["masks_sha256"]


def test_dsnot_bad_input(tiny_models, tmp_path, calib_file):
    with pytest.raises(RunDirError, match="sparse-recover prune"):
        run_dsnot(tmp_path / "nothing")
    run = tmp_path / "run"
    prune(tiny_models["llama"], run, calib_file, "wanda", "2:4")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for kwargs in ({"max_cycles": -1}, {"threshold": -0.5}, {"targets": "ffn"}, {"init": "random"}):
        with pytest.raises(ConfigError):
            run_dsnot(run, **kwargs)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["model"]["spec"] = str(tmp_path / "deleted-model")
    (run / "manifest.json").write_text(json.dumps(manifest))
    before[run / "manifest.json"] = (run / "manifest.json").read_bytes()
    with pytest.raises(RunDirError, match="no longer available"):
        run_dsnot(run)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_dsnot_cli_error_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "sparse_recover", "dsnot", "--run-dir", str(tmp_path / "x"),
                          "--max-cycles", "-3"], capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0 and "max-cycles" in out.stderr
