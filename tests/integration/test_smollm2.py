"""The built-in SmolLM2-135M (a real LLaMA-architecture model from a PyPI package), end to end."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def cli(*args):
    return subprocess.run([sys.executable, "-m", "sparse_recover", *args], capture_output=True, text=True)


def test_smollm2_wanda_2of4_prune_audit_ppl(tmp_path):
    run = tmp_path / "run"
    out = cli("prune", "--model", "smollm2-135m", "--method", "wanda", "--pattern", "2:4", "--run-dir", str(run),
              "--nsamples", "4", "--seqlen", "128", "--device", "cpu")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "50.00% sparse over 210 linears" in out.stdout
    manifest = json.loads((run / "manifest.json").read_text())
    stage = manifest["stages"]["prune"]
    assert manifest["model"]["spec"] == "smollm2-135m" and manifest["model"]["model_type"] == "llama"
    assert stage["calibration"]["source"] == "wiki-en"
    assert stage["sparsity"]["overall"] == 0.5 and stage["sparsity"]["linears"] == 30 * 7
    audit = cli("audit", "--run-dir", str(run), "--json")
    assert audit.returncode == 0, audit.stderr
    report = json.loads(audit.stdout)
    assert report["ok"] and report["stages"]["prune"]["pruned_nonzero"] == 0
    # the 4-bit source already has exact zeros at kept positions: allowed, and counted
    assert sum(r["kept_zero"] for r in report["stages"]["prune"]["layers"].values()) > 0
    ppl = {}
    for stage_name in ("dense", "prune"):
        out = cli("eval", "--run-dir", str(run), "--stage", stage_name, "--tasks", "ppl", "--seqlen", "256",
                  "--limit", "4", "--device", "cpu")
        assert out.returncode == 0, out.stderr[-2000:]
        ppl[stage_name] = json.loads((run / "eval" / f"{stage_name}.json").read_text())["ppl/wiki-en/256/limit4"]["ppl"]
    assert 5 < ppl["dense"] < 40
    assert ppl["prune"] > ppl["dense"] * 1.2
