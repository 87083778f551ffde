"""Ctrl-C ends any stage with exit 130 and one line, leaves the run directory as it was, and the next
run resumes or restarts cleanly; an unexpected error keeps its own traceback.

The SIGINTs are real: sent to a running `sparse-recover` subprocess once it is provably mid-way
(SparseGPT has finished at least one of the 48 decoder blocks of a deep tiny llama; fine-tuning has
written its first resumable checkpoint). Exit 0 with no message on Ctrl-C was once seen: typer >= 0.29
catches KeyboardInterrupt itself and, with standalone_mode=False, *returns* 130 from `app(...)`
instead of raising, so `cli.main` must look at that return value.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import build_model, snapshot

LAYERS = 48  # SparseGPT takes ~50 ms per tiny block on one thread: the prune lasts seconds, never an instant
INTERRUPTED = "sparse-recover: interrupted; completed stages are intact"
WAIT_S = 120  # for a marker to appear, or for the process to end
FINETUNE = ["--method", "lors", "--no-ga-init", "--max-steps", "12", "--save-every", "2", "--eval-every", "100",
            "--seqlen", "32", "--batch-size", "2", "--micro-batch-size", "2", "--val-size", "2",
            "--max-train-samples", "16", "--lr", "1e-3", "--device", "cpu"]


def _env(progress: bool = False) -> dict[str, str]:
    env = dict(os.environ)
    # one intra-op thread: tiny tensors on a shared 2-core machine run ~10x faster than with two
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", SPARSE_RECOVER_NO_PROGRESS="0" if progress else "1")
    if progress:  # off a terminal a progress line comes at most once a minute by default: one per block here
        env["SPARSE_RECOVER_PROGRESS_INTERVAL"] = "0"
    return env


def _default_sigint() -> None:
    """In the child before exec: SIGINT back to its default. A test run started in the background by a
    non-interactive shell (`nohup make test &`) inherits SIGINT ignored, and Python then installs no
    KeyboardInterrupt handler, so the Ctrl-C these tests send would be dropped and the stage run to its end."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Running:
    """A CLI subprocess whose stdout and stderr are collected as they come (for markers)."""

    def __init__(self, args: list, cwd: Path, progress: bool = False):
        self.args = [str(a) for a in args]
        self.proc = subprocess.Popen([sys.executable, "-m", "sparse_recover", *self.args], cwd=cwd,
                                     env=_env(progress), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     preexec_fn=_default_sigint)
        self.out, self.err = bytearray(), bytearray()
        self._readers = [threading.Thread(target=self._drain, args=(pipe, buf), daemon=True)
                         for pipe, buf in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self._readers:
            t.start()

    @staticmethod
    def _drain(pipe, buf: bytearray) -> None:
        for chunk in iter(lambda: os.read(pipe.fileno(), 65536), b""):
            buf.extend(chunk)

    def wait_for(self, ready, what: str) -> None:
        """Poll until `ready()`; fail if the process ends first or nothing happens in WAIT_S."""
        deadline = time.monotonic() + WAIT_S
        while not ready():
            if self.proc.poll() is not None:
                self.finish()
                pytest.fail(f"{' '.join(self.args)} ended (rc={self.proc.returncode}) before {what}" + self.where())
            if time.monotonic() > deadline:
                self.proc.kill()
                self.finish()
                pytest.fail(f"no {what} within {WAIT_S}s" + self.where())
            time.sleep(0.02)

    def finish(self) -> int:
        try:
            rc = self.proc.wait(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        for t in self._readers:
            t.join(timeout=10)
        return rc

    @property
    def stderr(self) -> str:
        return self.err.decode(errors="replace")

    def where(self) -> str:
        return (f"\n--- {' '.join(self.args)}\n--- rc={self.proc.returncode}\n--- stdout:\n"
                f"{self.out.decode(errors='replace')[-2000:]}\n--- stderr:\n{self.stderr[-3000:]}")


def run_to_end(args: list, cwd: Path) -> Running:
    running = Running(args, cwd)
    running.finish()
    return running


def assert_interrupted(running: Running) -> None:
    assert running.proc.returncode == 130, "Ctrl-C did not exit 130" + running.where()
    assert INTERRUPTED in running.stderr, "no 'interrupted' line" + running.where()
    assert "Traceback" not in running.stderr, "traceback printed" + running.where()


def changed(before: dict, after: dict | None) -> list[str]:
    after = after or {}
    return sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))


@pytest.fixture(scope="module")
def deep_run(tmp_path_factory, tokenizer_dir, calib_file) -> dict[str, Path]:
    """A tiny llama with LAYERS decoder blocks, and a run directory holding its completed magnitude prune."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("interrupts")
    model = root / "deep-llama"
    build_model("llama", layers=LAYERS).save_pretrained(model)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(model)
    run = root / "RUN"
    res = run_to_end(["prune", "--run-dir", run, "--model", model, "--method", "magnitude", "--sparsity", "0.5",
                      "--calib", calib_file, "--nsamples", "4", "--seqlen", "32"], root)
    assert res.proc.returncode == 0, res.where()
    return {"model": model, "run": run}


def _copy(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "RUN"
    shutil.copytree(run, target)
    return target


def test_sigint_during_prune(deep_run, calib_file, tmp_path):
    """Ctrl-C mid-way through a forced SparseGPT redo: the completed magnitude prune stays exactly as it was
    (no hidden staging folder, no calib/, manifest unchanged)."""
    run = _copy(deep_run["run"], tmp_path)
    before = snapshot(run)
    running = Running(["prune", "--run-dir", run, "--model", deep_run["model"], "--method", "sparsegpt",
                       "--sparsity", "0.5", "--calib", calib_file, "--nsamples", "16", "--seqlen", "32", "--force"],
                      tmp_path, progress=True)
    block_done = re.compile(rb"prune[^\r\n]*?\b([1-9]\d*)/%d\b" % LAYERS)
    running.wait_for(lambda: block_done.search(running.err), "a pruned decoder block")
    running.proc.send_signal(signal.SIGINT)
    running.finish()
    assert_interrupted(running)
    assert f"{LAYERS}/{LAYERS}" not in running.stderr, "the prune finished before the signal" + running.where()
    assert snapshot(run) == before, f"{run} changed: {changed(before, snapshot(run))}"


def test_sigint_during_finetune_then_resume(deep_run, calib_file, tmp_path):
    """Ctrl-C after the first resumable checkpoint: exit 130, nothing committed (no finetune/, manifest
    unchanged, no staging folder); the same command with --resume then completes from that checkpoint."""
    run = _copy(deep_run["run"], tmp_path)
    manifest = (run / "manifest.json").read_bytes()
    args = ["finetune", "--run-dir", run, "--data", calib_file, *FINETUNE]
    running = Running(args, tmp_path)
    work = run / ".finetune.partial"
    running.wait_for(lambda: any(work.glob("checkpoint-*/state.json")), "a fine-tuning checkpoint")
    running.proc.send_signal(signal.SIGINT)
    running.finish()
    assert_interrupted(running)
    assert (run / "manifest.json").read_bytes() == manifest, "the manifest changed"
    assert not (run / "finetune").exists(), "an interrupted fine-tune was committed" + running.where()
    assert not list(run.glob(".finetune.tmp-*")), "a staging folder was left behind"
    assert list(work.glob("checkpoint-*/state.json")), "the resumable checkpoint is gone"

    resumed = run_to_end([*args, "--resume"], tmp_path)
    assert resumed.proc.returncode == 0, resumed.where()
    assert "Traceback" not in resumed.stderr, resumed.where()
    assert (run / "finetune" / "adapter.safetensors").is_file(), resumed.where()
    assert not work.exists(), "the work folder outlived the completed stage"
    entry = json.loads((run / "manifest.json").read_text())["stages"]["finetune"]
    assert entry["status"] == "complete"
    assert (entry.get("train") or {}).get("resumed_from"), entry.get("train")


# --------------------------------------------------------------------------------------------------
# cli.main with a command that raises (in a fresh interpreter: no torch import, ~1 s each)

RAISE_IN_COMMAND = """\
import sys
import sparse_recover.commands.audit as audit
def run(*args, **kwargs):
    raise {exc}
audit.run = run
from sparse_recover.cli import main
main(["audit", "--run-dir", sys.argv[1]])
"""


def _raise_in_audit(exc: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RAISE_IN_COMMAND.format(exc=exc), str(tmp_path / "RUN")],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=WAIT_S)


def test_unexpected_error_keeps_its_traceback(tmp_path):
    res = _raise_in_audit('ValueError("boom")', tmp_path)
    assert res.returncode == 1, res.stderr
    assert "Traceback (most recent call last)" in res.stderr and "ValueError: boom" in res.stderr, res.stderr
    assert "AttributeError" not in res.stderr and "Abort" not in res.stderr, res.stderr
    assert "sparse-recover: error:" not in res.stderr and INTERRUPTED not in res.stderr, res.stderr


def test_keyboard_interrupt_in_a_command(tmp_path):
    res = _raise_in_audit("KeyboardInterrupt", tmp_path)
    assert res.returncode == 130, res.stderr
    assert res.stderr.strip() == INTERRUPTED, res.stderr
