"""`reconstruct`: a stored mask kept fixed, its kept weights re-solved by SparseGPT's OBS sweep.

With the mask SparseGPT itself chose, the re-solved weights are SparseGPT's own; the output mask is
the input mask bit for bit; the stage is audited, evaluated and fine-tuned from like any checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from sparse_recover.config import FinetuneSection
from sparse_recover.errors import RunDirError
from sparse_recover.sparsity.io import load_masks
from sparse_recover.sparsity.patterns import NM, Unstructured
from tests.helpers import (QUICK, assert_clean_error, build_model, prune, run_audit, run_cli, run_dsnot,
                           run_finetune, snapshot)

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


def _reconstruct(run_dir, **settings):
    from sparse_recover.commands import reconstruct
    from sparse_recover.config import ReconstructConfig, validate
    from sparse_recover.rundir import RunDir

    cfg = validate(ReconstructConfig, {"model": {"device": "cpu"}, "reconstruct": settings})
    return reconstruct.run(cfg, RunDir(run_dir))


@pytest.mark.parametrize("pattern", [Unstructured(0.5), NM(2, 4)], ids=["unstructured-50", "2:4"])
def test_reconstruct_with_sparsegpts_own_mask_gives_sparsegpts_weights(pattern):
    from sparse_recover.engine.prune import prune_model
    from sparse_recover.engine.reconstruct import reconstruct_model
    from sparse_recover.pruning import PruneSettings, get_method

    torch.manual_seed(0)
    windows = torch.randint(3, 500, (6, 48))
    pruned, dense = build_model("llama"), build_model("llama")
    masks, _, _ = prune_model(pruned, get_method("sparsegpt"), PruneSettings(pattern=pattern), windows, device=CPU,
                              show_progress=False)
    given = {k: v.clone() for k, v in masks.items()}
    layers, _ = reconstruct_model(dense, windows, masks, device=CPU, show_progress=False)
    assert set(layers) == set(masks)
    a, b = pruned.state_dict(), dense.state_dict()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)
    for key, keep in given.items():
        assert torch.equal(masks[key], keep)  # the input masks are not touched
        assert int((b[key][~keep] != 0).sum()) == 0


def test_wanda_dsnot_reconstruct_pipeline(tiny_models, tmp_path, calib_file, train_file, capsys):
    run = tmp_path / "run"
    prune(tiny_models["llama"], run, calib_file, "wanda", "2:4")
    run_dsnot(run, max_cycles=3, device="cpu")
    entry = _reconstruct(run)
    assert entry["source_stage"] == "dsnot" and entry["group"] == "nm" and entry["pattern"] == "2:4"
    dm, _ = load_masks(run / "dsnot" / "masks.safetensors")
    rm, _ = load_masks(run / "reconstruct" / "masks.safetensors")
    assert dm.keys() == rm.keys() and all(torch.equal(dm[k], rm[k]) for k in dm)
    from safetensors.torch import load_file

    dw = load_file(str(run / "dsnot" / "model.safetensors"))
    rw = load_file(str(run / "reconstruct" / "model.safetensors"))
    assert any(not torch.equal(dw[k], rw[k]) for k in dm)  # kept weights were re-solved
    assert run_audit(run)["reconstruct"]["ok"]
    again = _reconstruct(run)
    assert "already complete" in capsys.readouterr().out and again["finished"] == entry["finished"]
    with pytest.raises(RunDirError, match="other settings"):
        _reconstruct(run, blocksize=32)
    ft = run_finetune(FinetuneSection(method="spp", data=str(train_file), rank=8, **QUICK), run, device="cpu")
    assert ft["from"] == "reconstruct"  # fine-tuning starts from the newest sparse checkpoint
    # a redone dsnot makes reconstruct (and the fine-tune made from it) stale
    run_dsnot(run, max_cycles=3, device="cpu", force=True)
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    assert stages["reconstruct"]["status"] == "stale" and stages["finetune"]["status"] == "stale"


def test_reconstruct_bad_input(tiny_models, tmp_path, calib_file):
    cache = tmp_path / "cache"
    assert_clean_error(run_cli(["reconstruct", "--run-dir", tmp_path / "none"], tmp_path, cache), 5,
                       ["not a run directory"])
    run = tmp_path / "run"
    prune(tiny_models["llama"], run, calib_file, "wanda", "2:4")
    before = snapshot(run)
    assert_clean_error(run_cli(["reconstruct", "--run-dir", run, "--from", "dsnot"], tmp_path, cache), 5,
                       ["no completed dsnot stage", "sparse-recover dsnot"])
    assert_clean_error(run_cli(["reconstruct", "--run-dir", run, "--blocksize", "0"], tmp_path, cache), 2,
                       ["--blocksize"])
    assert snapshot(run) == before


def test_reconstruct_in_a_yaml_pipeline(tiny_models, tmp_path, calib_file, eval_file, capsys):
    from sparse_recover.config import validate_pipeline
    from sparse_recover.errors import ConfigError
    from tests.helpers import run_pipeline

    data = {"model": {"model": str(tiny_models["llama"]), "device": "cpu"},
            "calib": {"source": str(calib_file), "nsamples": 3, "seqlen": 32},
            "prune": {"method": "wanda", "pattern": "2:4"}, "dsnot": {"max_cycles": 3},
            "reconstruct": {"blocksize": 32},
            "eval": {"stages": ["dsnot", "reconstruct"], "tasks": ["ppl"], "ppl_data": str(eval_file),
                     "seqlen": 32, "limit": 2}}
    cfg = validate_pipeline(data)
    assert cfg.stages() == ["prune", "dsnot", "reconstruct", "audit", "eval"]
    run_pipeline(cfg, None, dry_run=True)  # the plan estimates the reconstruct stage too
    assert any(line.startswith("reconstruct ") and "dsnot/ (masks)" in line
               for line in capsys.readouterr().out.splitlines())
    run = tmp_path / "run"
    run_pipeline(cfg, run)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stages"]["reconstruct"]["source_stage"] == "dsnot"
    assert manifest["pipeline"]["audit"]["stages"]["reconstruct"]["ok"]
    assert set(manifest["evals"]) == {"dsnot", "reconstruct"}
    run_pipeline(cfg, run)  # everything complete with the same settings: skipped
    assert json.loads((run / "manifest.json").read_text())["stages"] == manifest["stages"]
    with pytest.raises(ConfigError, match="reconstruct.from_stage: dsnot, but the pipeline has no dsnot stage"):
        validate_pipeline({**data, "dsnot": None, "reconstruct": {"from_stage": "dsnot"},
                           "eval": {"stages": ["reconstruct"]}})
