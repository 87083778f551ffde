"""The one RunDir guard behind every stage command: input validated first; a completed stage with the same
settings is a no-op that says so (exit 0); with other settings it is refused with one line naming the
differences (exit 5) unless --force; and --force on a stage makes every stage and evaluation computed
from its previous version stale, so no stale result is ever reported, audited, merged or evaluated."""

from __future__ import annotations

import json

import pytest

from sparse_recover.config import FinetuneSection
from sparse_recover.errors import RunDirError
from tests.helpers import (QUICK, assert_clean_error, prune, run_audit, run_cli, run_dsnot, run_eval, run_finetune,
                           run_merge, run_report, snapshot)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_single_commands_refuse_other_settings_before_saying_done(tiny_models, tmp_path, calib_file):
    run = tmp_path / "run"
    prune(tiny_models["llama"], run, calib_file, "wanda", "2:4")
    base = ["prune", "--run-dir", run, "--model", tiny_models["llama"], "--calib", calib_file, "--nsamples", "3",
            "--seqlen", "32", "--device", "cpu"]
    cache = tmp_path / "cache"
    before = snapshot(run)
    msg = assert_clean_error(run_cli([*base, "--method", "sparsegpt", "--pattern", "4:8"], tmp_path, cache), 5,
                             ["already complete with other settings", "--force"])
    assert "prune.method: 'wanda' -> 'sparsegpt'" in msg and "prune.pattern: '2:4' -> '4:8'" in msg
    assert_clean_error(run_cli([*base, "--pattern", "2:3"], tmp_path, cache), 2, ["not divisible by M=3"])
    bad_calib = ["prune", "--run-dir", run, "--model", tiny_models["llama"], "--calib", tmp_path / "missing.jsonl",
                 "--nsamples", "3", "--seqlen", "32", "--device", "cpu", "--pattern", "2:4"]
    assert_clean_error(run_cli(bad_calib, tmp_path, cache), 4, ["missing.jsonl"])
    same = run_cli([*base, "--method", "wanda", "--pattern", "2:4"], tmp_path, cache)
    assert same.returncode == 0 and "already complete" in same.stdout and "same settings" in same.stdout
    assert snapshot(run) == before


def test_force_makes_everything_downstream_stale(tiny_models, tmp_path, calib_file, eval_file, train_file, capsys):
    run = tmp_path / "run"
    prune(tiny_models["llama"], run, calib_file, "wanda", "2:4")
    run_dsnot(run, max_cycles=3, device="cpu")
    run_finetune(FinetuneSection(method="lors", data=str(train_file), rank=8, **QUICK), run, device="cpu")
    run_merge(run, device="cpu", ppl_seqlen=32, ppl_windows=2)
    ppl = dict(ppl_data=str(eval_file), seqlen=32, limit=2, device="cpu")
    for stage in ("prune", "dsnot", "merge"):
        run_eval(run, stage, ["ppl"], **ppl)
    old_prune_ppl = next(iter(run_eval(run, "prune", ["ppl"], **ppl).values()))["ppl"]
    capsys.readouterr()

    prune(tiny_models["llama"], run, calib_file, "magnitude", "unstructured", 0.7, force=True)
    out = capsys.readouterr().out
    for stage in ("dsnot", "finetune", "merge"):
        assert f"{stage}: computed from the previous prune stage and now stale" in out
    manifest = json.loads((run / "manifest.json").read_text())
    assert {s: manifest["stages"][s]["status"] for s in manifest["stages"]} == {
        "prune": "complete", "dsnot": "stale", "finetune": "stale", "merge": "stale"}
    assert set(manifest["evals"]) == set() and not (run / "eval" / "dsnot.json").exists()
    # every reader refuses the stale stages with the command that brings them up to date
    for call in (lambda: run_eval(run, "dsnot", ["ppl"], **ppl), lambda: run_audit(run, stages=["merge"]),
                 lambda: run_merge(run, device="cpu", force=True)):
        with pytest.raises(RunDirError, match="stale .*: run `sparse-recover"):
            call()
    # the prune stage is measured anew, and the report shows only what is current
    again = next(iter(run_eval(run, "prune", ["ppl"], **ppl).values()))
    assert "already measured" not in capsys.readouterr().out and again["ppl"] != old_prune_ppl
    table = run_report([str(run)], fmt="json")
    rows = json.loads(table)
    rows = rows["rows"] if isinstance(rows, dict) else rows
    assert [(r["stage"], r["method"]) for r in rows] == [("prune", "magnitude")]
    assert run_audit(run)["prune"]["ok"]
    # the stale dsnot is recomputed by its own command, with no --force needed
    run_dsnot(run, max_cycles=3, device="cpu")
    assert json.loads((run / "manifest.json").read_text())["stages"]["dsnot"]["status"] == "complete"


def test_eval_result_is_keyed_to_the_checkpoint(tiny_models, tmp_path, calib_file, eval_file):
    run = tmp_path / "run"
    prune(tiny_models["llama"], run, calib_file, "wanda", "2:4")
    first = next(iter(run_eval(run, "prune", ["ppl"], ppl_data=str(eval_file), seqlen=32, limit=2).values()))
    manifest = json.loads((run / "manifest.json").read_text())
    prune_rec = manifest["stages"]["prune"]
    assert first["checkpoint"] == f"{prune_rec['finished']}|{prune_rec['masks_sha256']}"


def test_eval_of_finetune_explains_merge_and_yaml_tasks_take_a_comma_list(tiny_models, tmp_path, calib_file):
    from sparse_recover.config import EvalSection

    assert EvalSection(tasks="ppl, wiki-suite").tasks == ["ppl", "wiki-suite"]  # YAML form = CLI form
    assert EvalSection(tasks=["ppl"]).tasks == ["ppl"]
    run = tmp_path / "run"
    prune(tiny_models["llama"], run, calib_file, "wanda", "2:4")
    before = snapshot(run)
    res = run_cli(["eval", "--run-dir", run, "--stage", "finetune", "--seqlen", "32"], tmp_path, tmp_path / "cache")
    assert_clean_error(res, 5, ["holds adapters", "sparse-recover merge --run-dir", "--stage merge"])
    assert snapshot(run) == before


def test_kill_between_swap_and_record_leaves_nothing_stale_counted(tiny_models, tmp_path, calib_file, eval_file,
                                                                     monkeypatch):
    """A --force prune killed after its new folder is swapped in but before its record is written: the old
    record must not describe the new files; the stage and its dependents are stale and a re-run completes."""
    from sparse_recover.rundir import RunDir

    run = tmp_path / "run"
    prune(tiny_models["llama"], run, calib_file, "wanda", "2:4")
    run_dsnot(run, max_cycles=3, device="cpu")
    run_eval(run, "prune", ["ppl"], ppl_data=str(eval_file), seqlen=32, limit=2, device="cpu")

    def killed(self, *args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(RunDir, "commit", killed)
        with pytest.raises(KeyboardInterrupt):
            prune(tiny_models["llama"], run, calib_file, "magnitude", "unstructured", 0.7, force=True)
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    assert stages["prune"]["status"] == "stale" and stages["dsnot"]["status"] == "stale"
    assert not (run / "eval" / "prune.json").exists()
    with pytest.raises(RunDirError, match="stale"):
        run_audit(run, stages=["prune"])
    entry = prune(tiny_models["llama"], run, calib_file, "magnitude", "unstructured", 0.7)  # no --force needed
    assert entry["status"] == "complete" and entry["method"] == "magnitude"
    assert run_audit(run, stages=["prune"])["prune"]["ok"]


def test_audit_checks_the_recorded_masks_hash(tiny_models, tmp_path, calib_file, capsys):
    from sparse_recover.errors import AuditError

    run = tmp_path / "run"
    prune(tiny_models["llama"], run, calib_file, "wanda", "2:4")
    assert run_audit(run)["prune"]["ok"]
    path = run / "manifest.json"
    data = json.loads(path.read_text())
    data["stages"]["prune"]["masks_sha256"] = "0" * 64
    path.write_text(json.dumps(data))
    capsys.readouterr()
    with pytest.raises(AuditError):
        run_audit(run)
    assert "masks.safetensors does not match the hash recorded in the manifest" in capsys.readouterr().out
