"""`eval` on a stage of a real run directory: bad input at the command line (one line, the documented exit
code, the results already measured left byte for byte), and zero-shot numbers for a stage equal to the
stock `lm_eval` command line on the stage's checkpoint with the same local task files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sparse_recover.errors import ConfigError, DataError, RunDirError
from tests.helpers import assert_clean_error, prune, run_cli, snapshot, stock_lm_eval_cli, run_eval

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def measured_run(tmp_path_factory, tiny_models, calib_file, eval_file):
    """A Wanda 2:4 run of the tiny LLaMA whose prune stage already has a perplexity result."""
    run = tmp_path_factory.mktemp("eval-run") / "RUN"
    prune(tiny_models["llama"], run, calib_file, "wanda", "2:4")
    run_eval(run, "prune", ["ppl"], ppl_data=str(eval_file), seqlen=64, limit=2, device="cpu")
    assert (run / "eval" / "prune.json").is_file()
    return run


def _boolq_only(tmp_path: Path, data_dir: Path) -> Path:
    folder = tmp_path / "local-tasks"
    shutil.copytree(data_dir / "boolq", folder / "boolq")
    return folder


CASES = {
    # id: (extra eval arguments (a callable of tmp_path, data_dir), exit code, needles)
    "unknown-task-close-match": (lambda t, d: ["--tasks", "ppl,arc_easyy"], ConfigError.exit_code,
                                 ("arc_easyy", "did you mean", "arc_easy")),
    "unknown-group-close-match": (lambda t, d: ["--tasks", "wiki-suit"], ConfigError.exit_code,
                                  ("wiki-suit", "wiki-suite")),
    "stage-not-in-run": (lambda t, d: ["--stage", "merge"], RunDirError.exit_code,
                         ("no completed merge stage", "sparse-recover merge")),
    "stage-unknown": (lambda t, d: ["--stage", "final"], RunDirError.exit_code, ("final", "dense, prune")),
    "data-dir-missing-file": (lambda t, d: ["--tasks", "boolq,arc_easy", "--data-dir", _boolq_only(t, d)],
                              DataError.exit_code, ("arc_easy/test.jsonl", "arc_easy")),
    "data-dir-not-a-folder": (lambda t, d: ["--tasks", "boolq", "--data-dir", t / "nowhere"], DataError.exit_code,
                              ("nowhere", "not a folder")),
    "hub-task-offline": (lambda t, d: ["--tasks", "arc_easy", "--limit", "2"], DataError.exit_code,
                         ("arc_easy", "allenai/ai2_arc", "--data-dir", "wiki-suite")),
}


# These need lm-eval's whole task index (close matches, dataset names): about a minute each on a busy
# 2-core machine, and test_harness.py checks the same messages in-process, so they run with -m slow.
SLOW_CASES = ("unknown-task-close-match", "unknown-group-close-match", "hub-task-offline")


@pytest.mark.parametrize("case", [pytest.param(c, marks=[pytest.mark.slow] if c in SLOW_CASES else [])
                                  for c in CASES])
def test_eval_bad_input_leaves_results(case, measured_run, data_dir, tmp_path):
    run = tmp_path / "RUN"
    shutil.copytree(measured_run, run)
    build, code, needles = CASES[case]
    before = snapshot(run)
    results_before = (run / "eval" / "prune.json").read_bytes()
    res = run_cli(["eval", "--run-dir", run, "--stage", "prune", *build(tmp_path, data_dir)], tmp_path,
                  tmp_path / "cache", env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    # lm-eval may log a warning of its own before our line when it builds its task index
    assert_clean_error(res, code, needles, strict_stderr=case not in SLOW_CASES)
    assert snapshot(run) == before
    assert (run / "eval" / "prune.json").read_bytes() == results_before


@pytest.mark.integration
def test_stage_zero_shot_equals_stock_lm_eval_cli(measured_run, data_dir, tmp_path):
    """`sparse-recover eval --stage prune --data-dir` gives the accuracies of `lm_eval --model hf
    --model_args pretrained=RUN/prune` on the same rows with the stock prompts (hand-written YAMLs)."""
    run = tmp_path / "RUN"
    shutil.copytree(measured_run, run)
    res = run_eval(run, "prune", ["boolq", "arc_easy"], data_dir=str(data_dir), batch_size=1, device="cpu")
    ours, = res.values()
    stored = json.loads((run / "eval" / "prune.json").read_text())
    assert stored[next(k for k in stored if k.startswith("lm-eval/"))]["tasks"] == ours["tasks"]

    cli = stock_lm_eval_cli(run / "prune", data_dir, tmp_path)
    assert ours["tasks"]["boolq"]["n_samples"]["effective"] == 16
    assert ours["tasks"]["boolq"]["acc"] == cli["boolq_local"]["acc,none"]
    assert ours["tasks"]["arc_easy"]["acc"] == cli["arc_local"]["acc,none"]
    assert ours["tasks"]["arc_easy"]["metrics"]["acc_norm"] == cli["arc_local"]["acc_norm,none"]


def _stored(run: Path, stage: str = "prune") -> tuple[dict, dict]:
    """(RUN/eval/<stage>.json, the manifest's copy) of the stage's results."""
    manifest = json.loads((run / "manifest.json").read_text())
    return json.loads((run / "eval" / f"{stage}.json").read_text()), manifest["evals"].get(stage, {})


def _text_sha(path: Path) -> str:
    """sha256 of the text the perplexity of `path` is measured on."""
    import hashlib

    from sparse_recover.data import evaluation_text

    return hashlib.sha256(evaluation_text(str(path))[1].encode("utf-8")).hexdigest()


def test_ppl_data_is_keyed_canonically(measured_run, eval_file, tmp_path, monkeypatch, capsys):
    """`--ppl-data m/corpus.txt` and `--ppl-data /abs/m/corpus.txt` are one measurement, stored once under the
    resolved path with the text's hash; a result an earlier version keyed by the relative path (no hash) is
    still read (by eval and report) and is replaced, not duplicated, once the file's text changes."""
    run = tmp_path / "RUN"
    shutil.copytree(measured_run, run)
    corpus = tmp_path / "m" / "corpus.txt"
    corpus.parent.mkdir()
    shutil.copy(eval_file, corpus)
    cache = tmp_path / "cache"
    args = ["eval", "--run-dir", run, "--stage", "prune", "--tasks", "ppl", "--seqlen", "64", "--limit", "2",
            "--device", "cpu"]
    res = run_cli([*args, "--ppl-data", "m/corpus.txt"], tmp_path, cache)  # relative, as typed in tmp_path
    assert res.returncode == 0, res.stderr
    key = f"ppl/{corpus.resolve()}/64/limit2"
    results, in_manifest = _stored(run)
    assert key in results and key in in_manifest
    assert sorted(k for k in results if "corpus" in k) == [key]
    first_sha = _text_sha(corpus)
    assert results[key]["data_sha256"] == first_sha

    before = snapshot(run)
    monkeypatch.chdir(corpus.parent)  # the absolute path, from another folder: the same measurement
    run_eval(run, "prune", ["ppl"], ppl_data=str(corpus), seqlen=64, limit=2, device="cpu")
    assert "already measured" in capsys.readouterr().out and snapshot(run) == before

    # as an earlier version stored it: keyed by the path as typed, no text hash
    legacy = "ppl/m/corpus.txt/64/limit2"
    manifest = json.loads((run / "manifest.json").read_text())
    for holder in (results, manifest["evals"]["prune"]):
        old = holder.pop(key)
        old.pop("data_sha256")
        holder[legacy] = old
    (run / "eval" / "prune.json").write_text(json.dumps(results))
    (run / "manifest.json").write_text(json.dumps(manifest))
    from sparse_recover.reporting import collect

    prune_row = next(r for r in collect([str(run)])[0] if r["stage"] == "prune")
    assert prune_row["ppl corpus.txt/64/limit2"] == results[legacy]["ppl"]
    before = snapshot(run)
    run_eval(run, "prune", ["ppl"], ppl_data=str(corpus), seqlen=64, limit=2, device="cpu")
    assert snapshot(run) == before  # read as measured: nothing new

    run_eval(run, "prune", ["ppl"], ppl_data=str(corpus), seqlen=64, limit=2, device="cpu", force=True)
    for stored in _stored(run):
        assert [k for k in stored if "corpus" in k] == [key]  # once, under today's key
        assert stored[key]["data_sha256"] == first_sha

    corpus.write_text(corpus.read_text(encoding="utf-8")[:20000], encoding="utf-8")  # other text: measured again
    run_eval(run, "prune", ["ppl"], ppl_data=str(corpus), seqlen=64, limit=2, device="cpu")
    for stored in _stored(run):
        assert [k for k in stored if "corpus" in k] == [key]
        assert stored[key]["data_sha256"] == _text_sha(corpus) != first_sha


def test_dense_results_are_measured_once_per_model(tmp_path, tiny_models, calib_file, eval_file, monkeypatch):
    """Two runs of one model: the second run's dense perplexity comes from the cache outside the run directory
    (same number, `cached_from` set); other weights or other text are measured anew."""
    monkeypatch.setenv("SPARSE_RECOVER_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SPARSE_RECOVER_NO_EVAL_CACHE", raising=False)
    settings = dict(ppl_data=str(eval_file), seqlen=64, limit=2, device="cpu")
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        prune(tiny_models["llama"], run, calib_file, "magnitude", "2:4")
    first = run_eval(runs[0], "dense", ["ppl"], **settings)
    second = run_eval(runs[1], "dense", ["ppl"], **settings)
    (key, a), = first.items()
    b = second[key]
    assert "cached_from" not in a and b["cached_from"].startswith(str(tmp_path / "cache" / "evals"))
    assert b["ppl"] == a["ppl"] and b["windows"] == a["windows"]
    stored = json.loads((runs[1] / "manifest.json").read_text())["evals"]["dense"][key]
    assert stored["ppl"] == a["ppl"] and stored["checkpoint"].startswith("dense|")
    # other text: measured, not taken from the cache
    other = tmp_path / "other.txt"
    other.write_text(eval_file.read_text()[::-1])
    third = run_eval(runs[1], "dense", ["ppl"], **{**settings, "ppl_data": str(other)})
    assert all("cached_from" not in r for k, r in third.items() if "other.txt" in k)
    # other weights (another model folder): measured anew
    gpt = tmp_path / "c"
    prune(tiny_models["gpt2"], gpt, calib_file, "magnitude", "2:4")
    assert all("cached_from" not in r for r in run_eval(gpt, "dense", ["ppl"], **settings).values())
