"""Damaged files are one line naming the file, a documented exit code, no traceback, and nothing changed.

A real run directory is built once with the CLI (magnitude 50% on the tiny llama of conftest.py);
each case damages a private copy of it (truncates RUN/prune/masks.safetensors or garbles
RUN/prune/model.safetensors) and runs `audit`, `dsnot` or `eval` on it in a subprocess: exit 5, one
`sparse-recover: error:` line naming the file, the copy unchanged (names, sizes and mtimes). A
damaged user data file (`--calib bad.jsonl`) is exit 4 and names the line. The readers of
`sparse_recover.safeio` are also checked in-process on every kind of damage.
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from sparse_recover.errors import DataError, RunDirError
from tests.helpers import Result, assert_clean_error, run_cli

WORKERS = 2  # concurrent subprocesses (mostly the torch import)
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny tensors on a shared 2-core machine: ~10x faster than two threads
SMALL = ["--nsamples", "4", "--seqlen", "32"]


def tree_stat(path: Path) -> dict[str, tuple] | None:
    """{relative name: (size, mtime_ns)} of everything under `path` (folders too); None if absent."""
    if not path.exists():
        return None
    out = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            full = os.path.join(root, name)
            st = os.stat(full)
            out[os.path.relpath(full, path)] = (st.st_size if name in files else None, st.st_mtime_ns)
    return out


def truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def garble(path: Path) -> None:
    """Overwrite bytes inside the JSON header (after its 8-byte length): the size stays the same."""
    raw = bytearray(path.read_bytes())
    raw[8:40] = b"\xa5" * 32
    path.write_bytes(bytes(raw))


DAMAGE = {"truncated": truncate, "garbled": garble}


def command(name: str, run: Path, calib: Path) -> list:
    if name == "audit":
        return ["audit", "--run-dir", run]
    if name == "dsnot":
        return ["dsnot", "--run-dir", run]
    return ["eval", "--run-dir", run, "--stage", "prune", "--tasks", "ppl", "--ppl-data", calib, "--seqlen", "32",
            "--limit", "1"]


@dataclass
class Outcome:
    run: Path | None
    before: dict | None
    after: dict | None
    result: Result


def _run_case(args: list, run: Path | None, cwd: Path, cache: Path) -> Outcome:
    before = tree_stat(run) if run else None
    result = run_cli(args, cwd, cache, env=ONE_THREAD)
    return Outcome(run, before, tree_stat(run) if run else None, result)


# each command meets both files and both kinds of damage; every (reader, damage) pair is checked
# in-process below, which keeps this at 6 subprocesses of ~4 s each
CASES = [("masks.safetensors", "truncated", c) for c in ("audit", "dsnot", "eval")] + [
    ("model.safetensors", "garbled", c) for c in ("audit", "dsnot", "eval")]


def case_id(case) -> str:
    return "-".join(case)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, tiny_models, calib_file) -> dict[str, Outcome]:
    """The reference run (key "prune"), an audit of it ("audit-intact"), every damaged case, and the
    damaged calibration file ("bad-calib")."""
    cache = tmp_path_factory.mktemp("sr-cache")
    base = tmp_path_factory.mktemp("corrupt") / "RUN"
    prune = run_cli(["prune", "--run-dir", base, "--model", tiny_models["llama"], "--method", "magnitude",
                     "--sparsity", "0.5", "--calib", calib_file, *SMALL], base.parent, cache, env=ONE_THREAD)
    out: dict[str, Outcome] = {"prune": Outcome(base, None, None, prune)}
    if prune.returncode != 0:
        return out
    bad = tmp_path_factory.mktemp("bad-data") / "bad.jsonl"
    bad.write_text('{"text": "a fine first document"}\n{"text": "cut sh\n', encoding="utf-8")
    jobs = {"audit-intact": (command("audit", base, calib_file), base),
            "bad-calib": (["prune", "--run-dir", bad.parent / "RUN", "--model", tiny_models["llama"], "--method",
                           "wanda", "--sparsity", "0.5", "--calib", bad, *SMALL], bad.parent / "RUN")}
    for case in CASES:
        file, damage, cmd = case
        run = tmp_path_factory.mktemp(case_id(case)) / "RUN"
        shutil.copytree(base, run)
        DAMAGE[damage](run / "prune" / file)
        jobs[case_id(case)] = (command(cmd, run, calib_file), run)
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        futures = {key: pool.submit(_run_case, args, run, run.parent, cache) for key, (args, run) in jobs.items()}
        out.update({key: fut.result() for key, fut in futures.items()})
    return out


def _reference(outcomes) -> None:
    ref = outcomes["prune"].result
    assert ref.returncode == 0, f"the reference prune failed (rc={ref.returncode}):\n{ref.stderr[-3000:]}"


def test_reference_run_is_intact(outcomes):
    _reference(outcomes)
    audit = outcomes["audit-intact"].result
    assert audit.returncode == 0 and "audit prune" in audit.stdout and ": ok" in audit.stdout, audit.stderr


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_damaged_stage_file_is_one_line_exit_5(case, outcomes):
    _reference(outcomes)
    file, damage, cmd = case
    out = outcomes[case_id(case)]
    message = assert_clean_error(out.result, RunDirError.exit_code, needles=(f"prune/{file}",))
    assert "truncated or corrupt" in message, message
    assert out.after == out.before, f"{out.run} changed: " + ", ".join(
        sorted(k for k in set(out.before) | set(out.after) if out.before.get(k) != out.after.get(k)))


def test_damaged_calibration_file_is_one_line_exit_4(outcomes):
    _reference(outcomes)
    out = outcomes["bad-calib"]
    assert_clean_error(out.result, DataError.exit_code, needles=("bad.jsonl", "line 2", "not valid JSON"))
    assert out.before is None and out.after is None, "the run directory was created"


# --------------------------------------------------------------------------------------------------
# the readers themselves, in-process


def _message(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text, text
    return text


@pytest.fixture()
def tensors_file(tmp_path) -> Path:
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "t.safetensors"
    save_file({"w": torch.arange(64, dtype=torch.float32).reshape(8, 8)}, str(path), metadata={"k": "v"})
    return path


@pytest.mark.parametrize("damage, needle", [
    (lambda p: p.write_bytes(b""), "is empty"),
    (truncate, "truncated or corrupt"),
    (garble, "truncated or corrupt"),
    (lambda p: p.write_bytes(p.read_bytes() + b"\0" * 16), "truncated or corrupt"),  # header lies about the size
    (lambda p: p.unlink(), "missing"),
], ids=["empty", "truncated", "garbled", "trailing-bytes", "missing"])
def test_safetensors_readers(tensors_file, damage, needle):
    from sparse_recover import safeio

    assert safeio.safetensors_metadata(tensors_file, what="weights") == {"k": "v"}
    damage(tensors_file)
    for reader in (safeio.load_safetensors, safeio.safetensors_metadata):
        with pytest.raises(DataError) as exc:
            reader(tensors_file, error=DataError, what="weights")
        assert _message(exc).startswith(f"weights {tensors_file}: {needle}")


def test_json_readers_name_the_problem(tmp_path):
    from sparse_recover import safeio

    path = tmp_path / "f.json"
    for content, needle in [(b"", "is empty"), (b'{"a": 1,', "not valid JSON"), (b"\xff{}", "not UTF-8 text")]:
        path.write_bytes(content)
        with pytest.raises(RunDirError) as exc:
            safeio.read_json(path, what="manifest")
        assert _message(exc).startswith(f"manifest {path}: {needle}")
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(DataError) as exc:
        safeio.read_json_lines(path, error=DataError, what="data file")
    assert "line 4 is not valid JSON" in _message(exc)
    path.write_text('{"text": "a"}\n\n', encoding="utf-8")
    assert safeio.read_json_lines(path) == [{"text": "a"}]
    with pytest.raises(RunDirError, match="is a folder"):
        safeio.read_json(tmp_path)


def test_torch_state_truncated(tmp_path):
    import torch

    from sparse_recover import safeio

    path = tmp_path / "optimizer.pt"
    torch.save({"x": torch.ones(256)}, path)
    assert torch.equal(safeio.load_torch(path)["x"], torch.ones(256))
    truncate(path)
    with pytest.raises(RunDirError) as exc:
        safeio.load_torch(path, what="optimizer state")
    assert _message(exc).startswith(f"optimizer state {path}: truncated or corrupt")


def test_check_checkpoint_sharded_index(tmp_path):
    import torch
    from safetensors.torch import save_file

    from sparse_recover import safeio
    from sparse_recover.sparsity.io import CheckpointTensors

    (tmp_path / "config.json").write_text("{}")
    save_file({"a": torch.ones(2)}, str(tmp_path / "s1.safetensors"))
    save_file({"b": torch.zeros(3)}, str(tmp_path / "s2.safetensors"))
    index = tmp_path / safeio.INDEX_FILE
    index.write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    assert safeio.check_checkpoint(tmp_path) == {"a": tmp_path / "s1.safetensors", "b": tmp_path / "s2.safetensors"}
    assert torch.equal(CheckpointTensors(tmp_path).get("b"), torch.zeros(3))
    index.write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors"}}))
    with pytest.raises(RunDirError, match="s1.safetensors: lacks 1 tensor"):
        safeio.check_checkpoint(tmp_path)
    index.write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s3.safetensors"}}))
    with pytest.raises(RunDirError, match="s3.safetensors: missing"):
        safeio.check_checkpoint(tmp_path)
    index.write_text("[]")
    with pytest.raises(RunDirError, match="weight_map"):
        safeio.check_checkpoint(tmp_path)


def test_adapter_files(tmp_path):
    import torch
    from safetensors.torch import save_file

    from sparse_recover.adapters import load_adapter_state, read_adapter_config

    cfg = tmp_path / "adapter_config.json"
    cfg.write_text(json.dumps({"method": "lors", "from": "prune", "resolved": {"targets": ["q_proj"]}}))
    assert read_adapter_config(cfg)["method"] == "lors"
    cfg.write_text(json.dumps({"method": "lors"}))
    with pytest.raises(RunDirError, match="adapter config .*'from'"):
        read_adapter_config(cfg)
    weights = tmp_path / "adapter.safetensors"
    save_file({"x.lora_A": torch.ones(2, 2)}, str(weights))
    truncate(weights)
    with pytest.raises(RunDirError, match=r"adapter weights .*adapter\.safetensors: truncated or corrupt"):
        load_adapter_state({}, weights)


def test_garbled_mask_bytes(tmp_path):
    import torch
    from safetensors.torch import save_file

    from sparse_recover.sparsity.io import load_masks

    path = tmp_path / "masks.safetensors"
    save_file({"w": torch.ones(4, 4, dtype=torch.bool)}, str(path))  # the bool format of the first release
    raw = bytearray(path.read_bytes())
    raw[-1] = 7  # a bool byte that is neither 0 nor 1
    path.write_bytes(bytes(raw))
    with pytest.raises(RunDirError, match="bytes other than 0/1"):
        load_masks(path)[0]["w"]  # contents are checked when the mask is read
    save_file({"w": torch.ones(4, 4)}, str(path))
    with pytest.raises(RunDirError, match="not a boolean mask"):
        load_masks(path)
