"""`report` on run directories of tiny models made by the real prune / dsnot / finetune / merge / eval commands:
the rows, their order and every number equal what the manifests and eval files hold; md / csv / json / PNG
outputs through the real CLI; bad input is one line, a documented exit code, nothing changed."""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import struct
from pathlib import Path

import pytest

from sparse_recover import reporting
from sparse_recover.config import FinetuneSection
from sparse_recover.errors import ConfigError, RunDirError
from sparse_recover.records import EvalKey
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


def _model_label(run: Path) -> str:
    return Path(json.loads((run / "manifest.json").read_text())["model"]["spec"]).name


def _ppl_col(run: Path, stage: str, seqlen: int) -> str:
    [key] = [k for k in _evals(run, stage) if k.startswith("ppl/") and k.endswith(f"/{seqlen}/limit2")]
    return f"ppl {Path(_evals(run, stage)[key]['data']).name}/{seqlen}/limit2"


def test_rows_equal_manifests_and_eval_files(runs, eval_file):
    _, w24, mag = runs
    rows, tasks, notes, _ = reporting.collect([str(w24), str(mag)])
    model = _model_label(w24)
    # one dense row for the model both runs prune (only w24 evaluated it), then each run's stages
    assert [(r["run"], r["stage"]) for r in rows] == [(model, "dense"), ("w24", "prune"), ("w24", "dsnot"),
                                                      ("mag50", "prune")]
    assert tasks == list(WIKI)
    assert [r["method"] for r in rows] == ["dense", "wanda", "wanda + dsnot", "magnitude"]
    assert [r["pattern"] for r in rows] == ["dense", "2:4", "2:4", "unstructured"]
    col64, col32 = _ppl_col(w24, "prune", 64), _ppl_col(w24, "prune", 32)
    ppl_cols = [c for c in rows[0] if c.startswith("ppl ") and not c.endswith(reporting.CHANGES)]
    assert ppl_cols == [col64, col32]  # one column per setting, the most shared first
    dense = rows[0]
    for row in rows:
        run = w24 if row["run"] in ("w24", model) else mag
        manifest = json.loads((run / "manifest.json").read_text())
        stage = row["stage"]
        if stage == "dense":
            assert row["sparsity"] == 0.0
        else:
            assert row["sparsity"] == manifest["stages"][stage]["sparsity"]["overall"]
        evals = _evals(run, stage)
        by_seqlen = {EvalKey.parse(k).seqlen: v["ppl"] for k, v in evals.items() if k.startswith("ppl/")}
        assert row[col64] == by_seqlen[64]
        # the seqlen-32 perplexity only prune of w24 has: no other row shows a number of that setting
        assert row[col32] == (by_seqlen[32] if (row["run"], stage) == ("w24", "prune") else None)
        pruned = next((r for r in rows if r["run"] == row["run"] and r["stage"] == "prune"), None)
        if stage == "dense":
            assert all(row[f"{col64} {c}"] is None for c in reporting.CHANGES)
        else:
            assert row[f"{col64} vs dense"] == pytest.approx(row[col64] / dense[col64] - 1)
        if stage == "dsnot":
            assert row[f"{col64} vs pruned"] == pytest.approx(row[col64] / pruned[col64] - 1)
            lost = math.log(pruned[col64]) - math.log(dense[col64])
            share = (math.log(pruned[col64]) - math.log(row[col64])) / lost if lost > 0 else None
            assert row[f"{col64} recovered"] == (pytest.approx(share) if share is not None else None)
            assert all(row[t] is None for t in WIKI) and row["avg_acc"] is None
            continue
        lm = _one(evals, "lm-eval/")
        for task in WIKI:
            assert row[task] == lm["tasks"][task]["acc"]
            assert row[f"{task}_stderr"] == lm["tasks"][task]["acc_stderr"] is not None
        assert row["avg_acc"] == pytest.approx(sum(lm["tasks"][t]["acc"] for t in WIKI) / 2)
        assert row["avg_acc_stderr"] == pytest.approx(lm["groups"]["wiki-suite"]["acc_stderr"])
        if stage == "prune":
            assert row["avg_acc vs dense"] == pytest.approx(row["avg_acc"] - dense["avg_acc"])
            assert row["avg_acc vs pruned"] is None and row["avg_acc recovered"] is None
        assert not any(k.startswith("train_") for k in row)
    assert any(n.startswith("perplexity: ") and f"`{col64}` = {eval_file.resolve()}, 64-token windows, 2 windows"
               in n for n in notes)
    assert any("first 2 examples per task" in n and "standard error" in n for n in notes)


def test_cli_json_csv_md_and_output_file(runs, tmp_path):
    root, w24, mag = runs
    rows, tasks, _, _ = reporting.collect([str(w24), str(mag)])
    cache = tmp_path / "cache"
    res = run_cli(["report", w24, mag, "--format", "json"], tmp_path, cache)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert isinstance(data, list) and len(data) == 4
    cols = reporting.columns(rows, tasks)
    assert [list(d) for d in data] == [cols] * 4
    assert data == [{c: r[c] for c in cols} for r in rows]

    res = run_cli(["report", w24, mag, "--format", "csv"], tmp_path, cache)
    assert res.returncode == 0, res.stderr
    parsed = list(csv.DictReader(io.StringIO(res.stdout)))
    assert [p["stage"] for p in parsed] == ["dense", "prune", "dsnot", "prune"]
    col64 = _ppl_col(w24, "prune", 64)
    for p, r in zip(parsed, rows):
        assert float(p[col64]) == r[col64] and float(p["sparsity"]) == r["sparsity"]
        for task in WIKI:
            assert (p[task] == "" and r[task] is None) or float(p[task]) == r[task]
            assert (p[f"{task}_stderr"] == "" and r[f"{task}_stderr"] is None) or float(
                p[f"{task}_stderr"]) == r[f"{task}_stderr"]

    out = tmp_path / "deep" / "table.md"
    res = run_cli(["report", w24, mag, "--output", out], tmp_path, cache)
    assert res.returncode == 0 and res.stdout == "", res.stderr
    text = out.read_text()
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = reporting.columns(rows, tasks, markdown=True)
    assert lines[0] == "| " + " | ".join(header) + " |"
    assert not any(c.endswith("_stderr") for c in header) and f"{col64} vs dense" in header
    assert len(lines) == 2 + 4
    assert lines[2].startswith(f"| {_model_label(w24)} | dense | dense | dense | 0.0% | ")
    prune_row = rows[1]
    assert f"| {prune_row[col64]:.2f} |" in lines[3]
    acc, se = prune_row["wiki_continuation"], prune_row["wiki_continuation_stderr"]
    assert f"| {100 * acc:.2f} ± {100 * se:.2f} |" in lines[3]
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
    assert merge[_ppl_col(run, "merge", 64)] == _one(evals, "ppl/")["ppl"]
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


# --------------------------------------------------------------------------------------------------
# the story: dense -> pruned -> refined, its changes and the recovered share; runs that coincide


def _put(run: Path, stage: str, ppl: float, accs: tuple[float, float] | None, lm_from: str = "prune"):
    """Chosen numbers in the run's eval file of `stage` (the report reads only the files): the seqlen-64
    perplexity, and the wiki-suite accuracies (stderr 0.05 each) of an lm-eval result like `lm_from`'s."""
    path = run / "eval" / f"{stage}.json"
    data = json.loads(path.read_text())
    [key] = [k for k in data if k.startswith("ppl/") and k.endswith("/64/limit2")]
    data[key]["ppl"] = ppl
    if accs is not None:
        lm_key, lm = next((k, v) for k, v in _evals(run, lm_from).items() if k.startswith("lm-eval/"))
        lm = json.loads(json.dumps(lm))
        for task, acc in zip(WIKI, accs):
            lm["tasks"][task].update(acc=acc, acc_stderr=0.05)
        data[lm_key] = lm
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def story(runs, tmp_path_factory):
    """Copies of w24 with round numbers: dense ppl 10 / acc 55%, prune 40 / 25%, dsnot 20 / 40%; `twin` is
    an identical copy (the degenerate report: two runs that coincide)."""
    _, w24, _ = runs
    root = tmp_path_factory.mktemp("story")
    run = root / "a"
    shutil.copytree(w24, run)
    _put(run, "dense", 10.0, (0.6, 0.5))
    _put(run, "prune", 40.0, (0.2, 0.3))
    _put(run, "dsnot", 20.0, (0.4, 0.4))
    twin = root / "twin"
    shutil.copytree(run, twin)
    return run, twin


def test_story_changes_and_recovered_share(story, tmp_path):
    run, twin = story
    res = run_cli(["report", run, twin, "--format", "json"], tmp_path, tmp_path / "cache")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    model = _model_label(run)
    # the dense row once per model, not once per run
    assert [(r["run"], r["stage"]) for r in rows] == [(model, "dense"), ("a", "prune"), ("a", "dsnot"),
                                                      ("twin", "prune"), ("twin", "dsnot")]
    col = _ppl_col(run, "dsnot", 64)
    dense, prune, dsnot = rows[0], rows[1], rows[2]
    assert (dense[col], prune[col], dsnot[col]) == (10.0, 40.0, 20.0)
    assert prune[f"{col} vs dense"] == pytest.approx(3.0) and prune[f"{col} vs pruned"] is None
    assert dsnot[f"{col} vs dense"] == pytest.approx(1.0) and dsnot[f"{col} vs pruned"] == pytest.approx(-0.5)
    # log scale: (log 40 - log 20) / (log 40 - log 10) = 1/2
    assert dsnot[f"{col} recovered"] == pytest.approx(0.5) and prune[f"{col} recovered"] is None
    assert (dense["avg_acc"], prune["avg_acc"], dsnot["avg_acc"]) == pytest.approx((0.55, 0.25, 0.4))
    assert dsnot["avg_acc vs dense"] == pytest.approx(-0.15) and dsnot["avg_acc vs pruned"] == pytest.approx(0.15)
    assert dsnot["avg_acc recovered"] == pytest.approx(0.5)  # (0.40 - 0.25) / (0.55 - 0.25)
    assert dsnot["wiki_lambada_stderr"] == 0.05 and dsnot["avg_acc_stderr"] == pytest.approx(0.05 / math.sqrt(2))
    assert rows[3:] == [{**r, "run": "twin"} for r in rows[1:3]]

    res = run_cli(["report", run, twin], tmp_path, tmp_path / "cache")
    assert res.returncode == 0, res.stderr
    lines = [line for line in res.stdout.splitlines() if line.startswith("| a | dsnot")]
    cells = [c.strip() for c in lines[0].strip("|").split("|")]
    header = [c.strip() for c in res.stdout.splitlines()[[i for i, line in enumerate(res.stdout.splitlines())
                                                          if line.startswith("| run")][0]].strip("|").split("|")]
    cell = dict(zip(header, cells))
    assert (cell[col], cell[f"{col} vs dense"], cell[f"{col} vs pruned"], cell[f"{col} recovered"]) == (
        "20.00", "+100.0%", "-50.0%", "50.0%")
    assert (cell["avg_acc"], cell["avg_acc vs dense"], cell["avg_acc recovered"]) == ("40.00 ± 3.54", "-15.00",
                                                                                     "50.0%")
    assert f"dense: one row per model, shared by its runs: {model} (a, twin)" in res.stdout
    assert res.stdout.count(f"| {model} | dense |") == 1


def test_a_recovered_share_needs_a_pruning_loss(story, tmp_path):
    """Pruning that lost nothing (prune as good as dense) has no share to recover: the cell stays empty."""
    run, _ = story
    flat = tmp_path / "flat"
    shutil.copytree(run, flat)
    _put(flat, "prune", 10.0, None)
    dsnot = reporting.collect([str(flat)])[0][2]
    col = _ppl_col(flat, "dsnot", 64)
    assert dsnot["stage"] == "dsnot" and dsnot[f"{col} vs pruned"] == pytest.approx(1.0)
    assert dsnot[f"{col} recovered"] is None and dsnot["avg_acc recovered"] == pytest.approx(0.5)


def test_plot_keeps_coinciding_runs_visible(story, runs, tmp_path):
    """The degenerate picture (two identical runs) and the realistic one (w24 + mag50), through the CLI;
    then the same figures in-process to read what they show."""
    pytest.importorskip("matplotlib")
    run, twin = story
    _, w24, mag = runs
    for name, pair in (("twins.png", (run, twin)), ("real.png", (w24, mag))):
        res = run_cli(["report", *pair, "--plot", tmp_path / name, "--format", "csv"], tmp_path, tmp_path / "cache")
        assert res.returncode == 0, res.stderr
        assert _png_size(tmp_path / name)[0] > 800

    rows, _, _, info = reporting.collect([str(run), str(twin)])
    fig = reporting.plot(rows, info, tmp_path / "again.png")
    ax_ppl, ax_acc, ax_layers = fig.axes[:3]
    for ax in (ax_ppl, ax_acc):
        first, second = ax.lines[:2]
        assert list(first.get_ydata()) == list(second.get_ydata())  # the same numbers ...
        assert all(x1 < x2 for x1, x2 in zip(first.get_xdata(), second.get_xdata()))  # ... side by side
        assert first.get_marker() != second.get_marker()
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "twin (same as a)"]
    assert ax_ppl.get_yscale() == "log"  # 10 .. 40 spans a factor of 3 or more
    assert sorted(t.get_text() for t in ax_ppl.texts) == ["10.0", "20.0", "40.0"]  # each number printed once
    assert all(float(t).is_integer() for t in ax_layers.get_xticks())  # decoder blocks

    rows, _, _, info = reporting.collect([str(w24), str(mag)])
    fig = reporting.plot(rows, info, tmp_path / "again.png")
    ax_ppl = fig.axes[0]
    values = sorted({r[c] for r in rows for c in [_ppl_col(w24, "prune", 64)] if r[c] is not None})
    assert ax_ppl.get_yscale() == "linear" and max(values) / min(values) < 3
    labels = [t.get_text() for t in ax_ppl.texts]
    assert len(labels) == len(values) and len(set(labels)) == len(values)  # distinct numbers, distinct labels


def test_label_decimals_tell_numbers_apart():
    assert reporting.label_decimals([550.54, 550.52, 560.5]) == 2 and reporting.label_decimals([550.59, 550.52]) == 1
    assert reporting.label_decimals([12.5, 25.0]) == 1
    assert reporting.label_decimals([1.00004, 1.00001]) == 5
    assert reporting.wants_log([10, 29.9]) is False and reporting.wants_log([10, 30]) is True
