"""OWL through the prune command: per-block targets recorded and audited, overall sparsity at the target,
DSnoT keeping each layer's count, and bad OWL settings refused in one line with the run directory untouched."""

from __future__ import annotations

import json

import pytest
import torch

from sparse_recover.errors import AuditError
from sparse_recover.sparsity.io import load_masks
from tests.helpers import assert_clean_error, prune, run_audit, run_cli, run_dsnot, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")


def _owl_run(tiny_models, tmp_path, calib_file, method="wanda", sparsity=0.6):
    run = tmp_path / f"owl-{method}"
    prune(tiny_models["llama"], run, calib_file, method, "unstructured", sparsity, profile="owl", owl_m=3.0,
          owl_lambda=0.1)
    return run, json.loads((run / "manifest.json").read_text())["stages"]["prune"]


@pytest.mark.parametrize("method", ["wanda", "magnitude", "sparsegpt"])
def test_owl_prune_records_and_audits_per_block_targets(tiny_models, tmp_path, calib_file, method):
    run, entry = _owl_run(tiny_models, tmp_path, calib_file, method)
    sp = entry["sparsity"]
    assert sp["profile"] == "owl" and sp["owl_m"] == 3.0 and sp["owl_lambda"] == 0.1
    targets = sp["block_targets"]
    assert len(targets) == 2 == len(sp["outlier_ratios"])
    assert abs(sum(targets) / len(targets) - 0.6) < 1e-12 and all(abs(t - 0.6) <= 0.1 + 1e-12 for t in targets)
    masks, _ = load_masks(run / "prune" / "masks.safetensors")
    total = sum(k.numel() for k in masks.values())
    pruned = sum(int((~k).sum()) for k in masks.values())
    if method == "wanda":  # per row: int(cols * block target), so within one weight per row of the target
        rows = sum(k.shape[0] for k in masks.values())
        assert abs(pruned - 0.6 * total) <= rows
    else:
        assert abs(pruned - 0.6 * total) <= len(masks) * (128 if method == "sparsegpt" else 1)
    for key, keep in masks.items():
        assert sp["layers"][key]["target"] == targets[int(key.split(".")[2])]
    assert run_audit(run)["prune"]["ok"]


def test_owl_budget_is_audited_and_dsnot_keeps_each_layer_count(tiny_models, tmp_path, calib_file):
    run, entry = _owl_run(tiny_models, tmp_path, calib_file)
    run_dsnot(run, targets="all", threshold=0.0, device="cpu")
    pm, _ = load_masks(run / "prune" / "masks.safetensors")
    dm, _ = load_masks(run / "dsnot" / "masks.safetensors")
    assert any(not torch.equal(pm[k], dm[k]) for k in pm)  # DSnoT changed masks ...
    for key in pm:  # ... but every row keeps the count its block's OWL target gave it
        assert torch.equal(pm[key].sum(1), dm[key].sum(1)), key
    assert run_audit(run)["dsnot"]["ok"]
    # the audit checks each block against its own target: a record claiming the uniform target fails
    path = run / "manifest.json"
    data = json.loads(path.read_text())
    for info in data["stages"]["prune"]["sparsity"]["layers"].values():
        info["target"] = 0.6
    path.write_text(json.dumps(data))
    with pytest.raises(AuditError):
        run_audit(run, stages=["prune"])


@pytest.mark.parametrize("args, needle", [
    (["--pattern", "2:4", "--sparsity-profile", "owl"], "unstructured target"),
    (["--sparsity", "0.7", "--sparsity-profile", "owl", "--owl-lambda", "0.35"], "owl_lambda 0.35"),
    (["--sparsity", "0.7", "--sparsity-profile", "owl", "--owl-m", "0"], "--owl-m"),
    (["--sparsity", "0.7", "--sparsity-profile", "banana"], "--sparsity-profile"),
])
def test_owl_bad_input_is_one_line(tiny_models, tmp_path, calib_file, args, needle):
    run = tmp_path / "run"
    prune(tiny_models["llama"], run, calib_file, "wanda", "2:4")
    before = snapshot(run)
    res = run_cli(["prune", "--run-dir", run, "--model", tiny_models["llama"], "--calib", calib_file,
                   "--nsamples", "3", "--seqlen", "32", "--device", "cpu", *args], tmp_path, tmp_path / "cache")
    assert_clean_error(res, 2, [needle])
    assert snapshot(run) == before
