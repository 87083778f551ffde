"""Issue 15, parts 2 and 3: quiet by default (--verbose / --quiet), a log per stage, eval and audit, and
checks before spending time (a hub dataset offline, a window longer than the model's context).

The pipeline runs in a subprocess outside any git repository with our progress bars on, so what a user
would see is counted: every non-blank piece of stdout and stderr between "\\n" or "\\r" is one line (a bar
redrawn with carriage returns counts once per redraw)."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import PREFIX, run_cli, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")

BARS_ON = {"SPARSE_RECOVER_NO_PROGRESS": "0"}
NOISE = ("Loading weights", "Writing model shards", "bootstrapping for stddev", "fatal: not a git repository",
         "Running loglikelihood requests", "it/s]")


def pipeline(model, calib_file, eval_file, **sections) -> dict:
    """The demo's shape at toy sizes, with lm-eval (wiki-suite) on one stage so its noise would show."""
    data = {
        "model": {"model": str(model), "device": "cpu"},
        "calib": {"source": str(calib_file), "nsamples": 3, "seqlen": 32},
        "prune": {"method": "wanda", "pattern": "2:4"},
        "dsnot": {"max_cycles": 5},
        "finetune": {"method": "lors", "data": str(calib_file), "seqlen": 32, "max_steps": 2, "batch_size": 2,
                     "micro_batch_size": 2, "val_size": 4, "max_train_samples": 16, "init_samples": 4,
                     "save_every": 2, "eval_every": 2, "mixed_precision": "no"},
        "merge": {"ppl_windows": 2, "ppl_seqlen": 64},
        "eval": {"stages": ["prune", "merge"], "tasks": ["ppl", "wiki-suite"], "ppl_data": str(eval_file),
                 "seqlen": 64, "limit": 2},
    }
    data.update(sections)
    return data


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def shown(res) -> list[str]:
    """What a user sees, one entry per line or bar redraw."""
    return [s for s in re.split(r"[\r\n]", res.stdout + res.stderr) if s.strip()]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, tiny_models, calib_file, eval_file):
    """A whole tiny pipeline with the default output, from a folder that is not a git repository."""
    base = tmp_path_factory.mktemp("quiet-default")
    cfg = write_yaml(base / "pipe.yaml", pipeline(tiny_models["llama"], calib_file, eval_file))
    run = base / "RUN"
    res = run_cli(["run", cfg, "--run-dir", run], base, base / "cache", env=BARS_ON)
    assert res.returncode == 0, res.stdout + res.stderr
    return {"base": base, "cfg": cfg, "run": run, "res": res}


def test_default_output_is_short_and_free_of_library_noise(default_run):
    res = default_run["res"]
    lines = shown(res)
    assert len(lines) < 30, "\n".join(lines)
    assert lines[-1].startswith("run: ") and "Traceback" not in res.stderr
    for noise in NOISE:
        assert noise not in res.stdout + res.stderr, noise
    for stage in ("prune", "dsnot", "finetune", "merge", "audit prune", "eval prune", "eval merge"):
        assert any(line.startswith(stage) for line in lines), stage


def test_verbose_shows_the_libraries_too(default_run):
    """The same evaluations again with --verbose: the silenced output is still there on request."""
    d = default_run
    res = run_cli(["--verbose", "run", d["cfg"], "--run-dir", d["run"], "--from", "eval", "--force"], d["base"],
                  d["base"] / "cache", env=BARS_ON)
    assert res.returncode == 0, res.stdout + res.stderr
    text = res.stdout + res.stderr
    assert "== eval: run" in text and "Loading weights" in text and "bootstrapping for stddev" in text
    eval_lines = [line for line in shown(d["res"]) if line.startswith("eval ")]
    assert len(shown(res)) > len(eval_lines) + 1 + 10, "\n".join(shown(res))


def test_quiet_prints_only_the_summary(default_run):
    d = default_run
    res = run_cli(["--quiet", "run", d["cfg"], "--run-dir", d["run"], "--from", "audit"], d["base"],
                  d["base"] / "cache", env=BARS_ON)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stderr == ""
    assert len(res.stdout.splitlines()) == 1 and res.stdout.startswith("run: audit "), res.stdout
    res = run_cli(["-q", "audit", "--run-dir", d["run"]], d["base"], d["base"] / "cache", env=BARS_ON)
    assert res.returncode == 0 and res.stderr == ""
    assert [line.split(":")[0] for line in res.stdout.splitlines()] == ["audit prune", "audit dsnot", "audit merge"]


def test_eval_and_audit_logs(default_run):
    logs = default_run["run"] / "logs"
    assert {p.name for p in logs.iterdir()} >= {"prune.log", "dsnot.log", "finetune.log", "merge.log", "eval.log",
                                                 "audit.log"}
    evals = (logs / "eval.log").read_text()
    for stage in ("prune", "merge"):
        assert re.search(rf"\] eval {stage} ppl/\S+/64/limit2\n  perplexity \d", evals), evals
        assert re.search(rf"\] eval {stage} lm-eval/\S+\n(  .*\n)*  wiki-suite: acc ", evals), evals
    assert evals.count("  checkpoint ") == evals.count("] eval ") >= 4
    audit = (logs / "audit.log").read_text()
    assert "audit prune, dsnot, merge: ok" in audit and "  audit merge: 14 linears" in audit, audit


def test_quiet_and_verbose_exclude_each_other(capsys):
    code, _, err = _main(capsys, ["--quiet", "--verbose", "report", "x"])
    assert code == 2 and err.strip() == f"{PREFIX} --verbose and --quiet exclude each other"


def test_progress_lines_off_a_terminal(capsys, monkeypatch):
    """Off a terminal: no carriage returns; a short loop leaves nothing, a long one a line per interval and
    a final line; --verbose leaves every loop's final line."""
    from sparse_recover import runtime

    monkeypatch.delenv("SPARSE_RECOVER_NO_PROGRESS", raising=False)
    bar = runtime.progress(3, "ppl merge wiki-en", unit="window")
    for _ in range(3):
        bar.update(1)
    bar.close()
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("SPARSE_RECOVER_PROGRESS_INTERVAL", "0")
    bar = runtime.progress(2, "prune wanda 2:4", unit="block")
    bar.update(1)
    bar.update(1)
    bar.close()
    err = capsys.readouterr().err
    assert "\r" not in err and re.findall(r"prune wanda 2:4: (\d)/2 blocks", err) == ["1", "2"], err
    monkeypatch.delenv("SPARSE_RECOVER_PROGRESS_INTERVAL")
    runtime.configure_output(runtime.VERBOSE)
    try:
        with runtime.progress(4, "finetune lors", unit="step") as bar:
            bar.update(4)
    finally:
        runtime.finish_output()
    assert re.fullmatch(r"finetune lors: 4/4 steps \(100%\) in \d\.\ds\n", capsys.readouterr().err)


# --------------------------------------------------------------------------------------------------
# checks before spending time: in-process through cli.main (conftest sets HF_HUB_OFFLINE=1)


def _main(capsys, argv) -> tuple[int, str, str]:
    from sparse_recover.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def _refused(capsys, argv, code: int, needles) -> str:
    start = time.monotonic()
    got, out, err = _main(capsys, argv)
    elapsed = time.monotonic() - start
    assert got == code, out + err
    assert err.count("\n") == 1 and err.startswith(PREFIX) and out == "", out + err
    assert "Retrying" not in err and elapsed < 15, f"{elapsed:.1f}s"
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def test_offline_hub_data_fails_at_once(capsys, tiny_models, calib_file, eval_file, default_run, tmp_path):
    model = tiny_models["llama"]
    new = tmp_path / "NEW"
    _refused(capsys, ["prune", "--run-dir", new, "--model", model, "--calib", "c4", "--pattern", "2:4",
                      "--nsamples", "2", "--seqlen", "32"], 4,
             ["calibration c4", "allenai/c4", "HF_HUB_OFFLINE=1", "wiki-en"])
    assert snapshot(new) is None
    run = tmp_path / "RUN"
    shutil.copytree(default_run["run"], run)
    before = snapshot(run)
    _refused(capsys, ["eval", "--run-dir", run, "--stage", "prune", "--tasks", "ppl", "--ppl-data", "wikitext2",
                      "--seqlen", "32"], 4, ["perplexity data wikitext2", "not in the local datasets cache"])
    data = pipeline(model, calib_file, eval_file)
    for name, sections, needles in (
            ("alpaca", {"finetune": {**data["finetune"], "data": "alpaca"}}, ["fine-tuning data alpaca",
                                                                              "tatsu-lab/stanford_alpaca"]),
            ("auto-ppl", {"eval": {**data["eval"], "ppl_data": "auto"}}, ["perplexity data wikitext2"]),
            ("c4", {"calib": {**data["calib"], "source": "c4"}}, ["calibration c4"])):
        cfg = write_yaml(tmp_path / f"{name}.yaml", pipeline(model, calib_file, eval_file, **sections))
        _refused(capsys, ["run", cfg, "--run-dir", new], 4, needles)
        assert snapshot(new) is None, name
        _refused(capsys, ["run", cfg, "--run-dir", run, "--force"], 4, needles)  # before the first stage
    assert snapshot(run) == before


def test_seqlen_above_the_context_is_refused(capsys, tiny_models, calib_file, eval_file, default_run, tmp_path):
    model = tiny_models["llama"]
    new = tmp_path / "NEW"
    _refused(capsys, ["prune", "--run-dir", new, "--model", model, "--calib", calib_file, "--pattern", "2:4",
                      "--nsamples", "2", "--seqlen", "1024"], 2,
             ["calibration seqlen 1024", "max_position_embeddings 512"])
    run = tmp_path / "RUN"
    shutil.copytree(default_run["run"], run)
    before = snapshot(run)
    _refused(capsys, ["eval", "--run-dir", run, "--stage", "merge", "--tasks", "ppl", "--ppl-data", eval_file,
                      "--seqlen", "600"], 2, ["perplexity seqlen 600", "max_position_embeddings 512",
                                              "merge/config.json"])
    data = pipeline(model, calib_file, eval_file)
    for section, key in (("calib", "calibration seqlen 513"), ("eval", "perplexity seqlen 513")):
        cfg = write_yaml(tmp_path / f"{section}.yaml",
                         pipeline(model, calib_file, eval_file, **{section: {**data[section], "seqlen": 513}}))
        _refused(capsys, ["run", cfg, "--run-dir", new], 2, [key, "max_position_embeddings 512"])
        assert snapshot(new) is None
    cfg = write_yaml(tmp_path / "from-eval.yaml", pipeline(model, calib_file, eval_file,
                                                           eval={**data["eval"], "seqlen": 513}))
    _refused(capsys, ["run", cfg, "--run-dir", run, "--from", "eval"], 2, ["perplexity seqlen 513"])
    assert snapshot(run) == before
