"""`report` on run directories of tiny models made by the real prune / dsnot / finetune / merge / eval commands:
the rows, their order and every number equal what the manifests and eval files hold; md / csv / json / PNG
outputs through the real CLI; bad input is one line, a documented exit code, nothing changed."""

from __future__ import annotations

import csv
import io
import json
import shutil
import struct
from pathlib import Path

import pytest

from sparse_recover import reporting
from sparse_recover.config import FinetuneSection
from sparse_recover.errors import ConfigError, RunDirError
from tests.helpers import HIDE_PACKAGES, QUICK, assert_clean_error, prune, run_cli, snapshot, run_dsnot, run_eval, run_finetune, run_merge, run_report

pytestmark = pytest.mark.usefixtures("one_thread")

WIKI = ("wiki_lambada", "wiki_continuation")


def _eval(run: Path, stage: str, tasks: list[str], eval_file: Path, seqlen: int = 64):
    return run_eval(run, stage, tasks, ppl_data=str(eval_file), seqlen=seqlen, limit=2, batch_size=2,
                        device="cpu")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_models, calib_file, eval_file):
    """runs/w24: Wanda 2:4 + DSnoT; dense, prune: ppl + wiki-suite; dsnot: ppl only; prune also has a
    second perplexity at another seqlen. runs/mag50: magnitude 50%, prune: ppl + wiki-suite."""
    root = tmp_path_factory.mktemp("report-runs")
    w24, mag = root / "w24", root / "mag50"
    prune(tiny_models["llama"], w24, calib_file, "wanda", "2:4")
    run_dsnot(w24, max_cycles=5, device="cpu")
    for stage in ("dense", "prune"):
        _eval(w24, stage, ["ppl", "wiki-suite"], eval_file)
    _eval(w24, "prune", ["ppl"], eval_file, seqlen=32)
    _eval(w24, "dsnot", ["ppl"], eval_file)
    prune(tiny_models["llama"], mag, calib_file, "magnitude", "unstructured", 0.5)
    _eval(mag, "prune", ["ppl", "wiki-suite"], eval_file)
    return root, w24, mag


def _evals(run: Path, stage: str) -> dict:
    return json.loads((run / "eval" / f"{stage}.json").read_text())


def _one(results: dict, prefix: str) -> dict:
    found = [v for k, v in results.items() if k.startswith(prefix)]
    assert len(found) == 1, list(results)
    return found[0]


def test_rows_equal_manifests_and_eval_files(runs):
    _, w24, mag = runs
    rows, tasks, notes, _ = reporting.collect([str(w24), str(mag)])
    assert [(r["run"], r["stage"]) for r in rows] == [("w24", "dense"), ("w24", "prune"), ("w24", "dsnot"),
                                                      ("mag50", "prune")]
    assert tasks == list(WIKI)
    assert [r["method"] for r in rows] == ["dense", "wanda", "wanda + dsnot", "magnitude"]
    assert [r["pattern"] for r in rows] == ["dense", "2:4", "2:4", "unstructured"]
    for row in rows:
        run = w24 if row["run"] == "w24" else mag
        manifest = json.loads((run / "manifest.json").read_text())
        if row["stage"] == "dense":
            assert row["sparsity"] == 0.0
        else:
            assert row["sparsity"] == manifest["stages"][row["stage"]]["sparsity"]["overall"]
        evals = _evals(run, row["stage"])
        # seqlen 64 is shared by every stage of w24; prune's extra seqlen-32 value is not used
        assert row["ppl_eval"] in evals and row["ppl_eval"].endswith("/64/limit2")
        assert row["ppl"] == evals[row["ppl_eval"]]["ppl"]
        if row["stage"] == "dsnot":
            assert all(row[t] is None for t in WIKI) and row["avg_acc"] is None
            continue
        lm = _one(evals, "lm-eval/")
        for task in WIKI:
            assert row[task] == lm["tasks"][task]["acc"]
        assert row["avg_acc"] == pytest.approx(sum(lm["tasks"][t]["acc"] for t in WIKI) / 2)
        assert not any(k.startswith("train_") for k in row)
    assert any(n.startswith("perplexity: ") and "64-token windows, 2 windows" in n for n in notes)
    assert any("first 2 examples per task" in n for n in notes)


def test_cli_json_csv_md_and_output_file(runs, tmp_path):
    root, w24, mag = runs
    rows, tasks, _, _ = reporting.collect([str(w24), str(mag)])
    cache = tmp_path / "cache"
    res = run_cli(["report", w24, mag, "--format", "json"], tmp_path, cache)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert isinstance(data, list) and len(data) == 4
    cols = reporting.columns(rows, tasks, with_ppl_eval=True)
    assert [list(d) for d in data] == [cols] * 4
    assert data == [{c: r[c] for c in cols} for r in rows]

    res = run_cli(["report", w24, mag, "--format", "csv"], tmp_path, cache)
    assert res.returncode == 0, res.stderr
    parsed = list(csv.DictReader(io.StringIO(res.stdout)))
    assert [p["stage"] for p in parsed] == ["dense", "prune", "dsnot", "prune"]
    for p, r in zip(parsed, rows):
        assert float(p["ppl"]) == r["ppl"] and float(p["sparsity"]) == r["sparsity"]
        for task in WIKI:
            assert (p[task] == "" and r[task] is None) or float(p[task]) == r[task]

    out = tmp_path / "deep" / "table.md"
    res = run_cli(["report", w24, mag, "--output", out], tmp_path, cache)
    assert res.returncode == 0 and res.stdout == "", res.stderr
    text = out.read_text()
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert lines[0] == "| " + " | ".join(reporting.columns(rows, tasks, with_ppl_eval=False)) + " |"
    assert len(lines) == 2 + 4
    assert lines[2].startswith("| w24 | dense | dense | dense | 0.0% | ")
    assert f"| {rows[1]['ppl']:.2f} |" in lines[3] and f"{100 * rows[1]['wiki_lambada']:.2f}" in lines[3]
    assert text.startswith("perplexity: ")


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_plot_writes_png(runs, tmp_path):
    pytest.importorskip("matplotlib")
    _, w24, mag = runs
    before = snapshot(w24)
    png = tmp_path / "plots" / "report.png"
    res = run_cli(["report", w24, mag, "--plot", png, "--format", "csv"], tmp_path, tmp_path / "cache")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("run,stage,")
    width, height = _png_size(png)
    assert width > 800 and height > 300 and png.stat().st_size > 20_000
    assert snapshot(w24) == before  # read only


def test_merge_row_carries_training_cost(runs, tmp_path, eval_file, train_file):
    """Real finetune (LoRS, a few steps) and merge on a copy of the Wanda 2:4 + DSnoT run; the merge row
    carries the manifest's training cost and the chain of methods."""
    _, w24, _ = runs
    run = tmp_path / "ft"
    shutil.copytree(w24, run)
    ft = run_finetune(FinetuneSection(method="lors", data=str(train_file), rank=8, **QUICK), str(run), device="cpu")
    run_merge(run, device="cpu", ppl_seqlen=32, ppl_windows=2)
    _eval(run, "merge", ["ppl", "wiki-suite"], eval_file)
    rows, tasks, _, info = reporting.collect([str(run)])
    assert [r["stage"] for r in rows] == ["dense", "prune", "dsnot", "merge"]
    merge = rows[-1]
    assert merge["method"] == "wanda + dsnot + lors" and merge["pattern"] == "2:4"
    train = ft["train"]
    assert (merge["train_steps"], merge["train_tokens"], merge["train_time_s"], merge["trainable_params"]) == (
        train["steps"], train["tokens"], train["wall_time_s"], train["trainable_params"])
    assert merge["train_steps"] == QUICK["max_steps"] and merge["trainable_params"] == ft["trainable_params"]
    manifest = json.loads((run / "manifest.json").read_text())
    assert merge["sparsity"] == manifest["stages"]["merge"]["sparsity"]["overall"]
    assert all(r["train_steps"] is None for r in rows[:-1])
    evals = _evals(run, "merge")
    assert merge["ppl"] == _one(evals, "ppl/")["ppl"]
    assert merge["wiki_continuation"] == _one(evals, "lm-eval/")["tasks"]["wiki_continuation"]["acc"]
    assert reporting._newest_checkpoint(info[0]["manifest"]) == "merge"
    md = reporting.to_markdown(rows, tasks, [])
    assert f"| {train['steps']} | {train['tokens']:,} |" in md

    del manifest["stages"]["finetune"]["train"]  # an entry without the cost: empty cells, no crash
    (run / "manifest.json").write_text(json.dumps(manifest))
    merge = reporting.collect([str(run)])[0][-1]
    assert merge["method"] == "wanda + dsnot + lors" and merge["train_steps"] is None


def test_library_bad_input(runs, tmp_path):
    _, w24, _ = runs
    with pytest.raises(ConfigError, match="at least one"):
        run_report([])
    with pytest.raises(ConfigError, match="md, csv, json"):
        run_report([str(w24)], fmt="xlsx")
    with pytest.raises(RunDirError, match="not a run directory"):
        run_report([str(tmp_path)])


def _foreign(tmp_path: Path) -> Path:
    folder = tmp_path / "not-a-run"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine\n")
    return folder


@pytest.mark.parametrize("case", ["not-a-run-dir", "missing-folder", "no-runs", "bad-format", "plot-not-png",
                                  "corrupt-eval-file", "no-matplotlib"])
def test_cli_bad_input_is_one_line(case, runs, tmp_path):
    _, w24, _ = runs
    run = tmp_path / "RUN"
    shutil.copytree(w24, run)
    python_args = ("-m", "sparse_recover")
    args, code, needles = {
        "not-a-run-dir": (["report", run, _foreign(tmp_path)], RunDirError.exit_code, ("not-a-run", "manifest")),
        "missing-folder": (["report", tmp_path / "nope"], RunDirError.exit_code, ("nope", "not a run directory")),
        "no-runs": (["report", "--format", "md"], ConfigError.exit_code, ("missing argument",)),
        "bad-format": (["report", run, "--format", "xlsx"], ConfigError.exit_code, ("xlsx", "md, csv, json")),
        "plot-not-png": (["report", run, "--plot", tmp_path / "r.jpg"], ConfigError.exit_code, (".png",)),
        "corrupt-eval-file": (["report", run], RunDirError.exit_code, ("prune.json",)),
        "no-matplotlib": (["matplotlib", "report", run, "--plot", tmp_path / "r.png"], ConfigError.exit_code,
                          ("matplotlib", "pip install")),
    }[case]
    if case == "corrupt-eval-file":
        (run / "eval" / "prune.json").write_text("{not json")
    if case == "no-matplotlib":
        python_args = ("-c", HIDE_PACKAGES)
    before = snapshot(run)
    res = run_cli(args, tmp_path, tmp_path / "cache", python_args=python_args)
    assert_clean_error(res, code, needles)
    assert res.stdout == ""  # no partial table
    assert snapshot(run) == before
    assert not (tmp_path / "r.png").exists() and not (tmp_path / "r.jpg").exists()
