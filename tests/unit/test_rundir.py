"""RunDir: a stage appears whole or not at all, and the manifest is never half-written."""

from __future__ import annotations

import json
import os

import pytest

from sparse_recover.errors import RunDirError
from sparse_recover.rundir import MANIFEST, RunDir


class Boom(Exception):
    pass


def tree(path) -> dict[str, bytes]:
    """Every file below `path` (hidden ones included) -> its bytes."""
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def hidden(path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.name.startswith("."))


def existing_stage(rd: RunDir) -> dict[str, bytes]:
    """RUN/prune holding an old checkpoint (a nested folder too), and a manifest saying so."""
    with rd.staging("prune") as (tmp,):
        (tmp / "model.safetensors").write_bytes(b"old weights")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "old-only.txt").write_text("only in the old stage")
    rd.update(stages={"prune": {"status": "complete", "method": "wanda"}})
    return tree(rd.path)


def test_staging_success_publishes_the_folder(tmp_path):
    rd = RunDir(tmp_path / "run")
    with rd.staging("prune", "calib") as tmps:
        assert [t.parent for t in tmps] == [rd.path, rd.path]
        assert all(t.name.startswith(".") for t in tmps)  # invisible until complete
        assert not (rd.path / "prune").exists() and not (rd.path / "calib").exists()
        (tmps[0] / "a.txt").write_text("a")
        (tmps[1] / "windows.safetensors").write_bytes(b"w")
    assert tree(rd.path) == {"prune/a.txt": b"a", "calib/windows.safetensors": b"w"}
    assert hidden(rd.path) == []
    # mkdtemp's private 0700 is not kept: the published folder and files have the ordinary permissions
    umask = os.umask(0)
    os.umask(umask)
    assert (rd.path / "prune").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (rd.path / "prune" / "a.txt").stat().st_mode & 0o777 == 0o666 & ~umask


def test_staging_failure_leaves_nothing_behind(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.write({"format": 1, "stages": {}, "evals": {}})
    before = tree(rd.path)
    with pytest.raises(Boom):
        with rd.staging("prune", "calib") as (prune, calib):
            (prune / "model.safetensors").write_bytes(b"half")
            (calib / "windows.safetensors").write_bytes(b"half")
            raise Boom
    assert not (rd.path / "prune").exists() and not (rd.path / "calib").exists()
    assert hidden(rd.path) == []  # no .prune.tmp-* / .calib.tmp-* left
    assert tree(rd.path) == before


def test_staging_failure_keeps_an_existing_stage_untouched(tmp_path):
    rd = RunDir(tmp_path / "run")
    before = existing_stage(rd)
    with pytest.raises(Boom):
        with rd.staging("prune") as (tmp,):
            (tmp / "model.safetensors").write_bytes(b"new weights, half written")
            raise Boom
    assert tree(rd.path) == before
    assert hidden(rd.path) == []


def test_staging_success_replaces_an_existing_stage_completely(tmp_path):
    rd = RunDir(tmp_path / "run")
    existing_stage(rd)
    manifest = rd.manifest_path.read_bytes()
    with rd.staging("prune") as (tmp,):
        (tmp / "model.safetensors").write_bytes(b"new weights")
        (tmp / "masks.safetensors").write_bytes(b"new masks")
    # nothing of the old folder survives (not merged), no .prune.old-* trash is left, the manifest is the caller's
    assert tree(rd.path / "prune") == {"model.safetensors": b"new weights", "masks.safetensors": b"new masks"}
    assert hidden(rd.path) == []
    assert rd.manifest_path.read_bytes() == manifest


def test_run_dir_created_for_a_failed_stage_is_removed(tmp_path):
    rd = RunDir(tmp_path / "nested" / "run")
    with pytest.raises(Boom):
        with rd.staging("prune") as (tmp,):
            assert rd.path.is_dir()
            (tmp / "x").write_text("x")
            raise Boom
    assert not rd.path.exists()
    assert (tmp_path / "nested").is_dir()  # only the run directory itself was created for the stage


def test_existing_empty_run_dir_survives_a_failed_stage(tmp_path):
    """The user's own (empty) folder is not removed: only one created by the stage is."""
    rd = RunDir(tmp_path / "run")
    rd.path.mkdir()
    with pytest.raises(Boom):
        with rd.staging("prune"):
            raise Boom
    assert rd.path.is_dir() and list(rd.path.iterdir()) == []


def test_manifest_write_roundtrips_and_leaves_no_temp_file(tmp_path):
    rd = RunDir(tmp_path / "run")
    assert not rd.exists() and rd.read()["stages"] == {}
    rd.write({"format": 1, "model": {"spec": "m"}, "stages": {"prune": {"status": "complete"}}, "evals": {}})
    rd.update(stages={"dsnot": {"status": "complete"}})
    data = rd.read()
    assert data == json.loads(rd.manifest_path.read_text())
    assert data["model"]["spec"] == "m" and set(data["stages"]) == {"prune", "dsnot"}
    assert data["stages"]["prune"]["status"] == "complete"
    assert sorted(p.name for p in rd.path.iterdir()) == [MANIFEST]


def test_manifest_write_that_fails_keeps_the_old_one(tmp_path, monkeypatch):
    """A crash before the temporary file is renamed over the manifest: the old manifest is intact and
    the temporary file is gone."""
    rd = RunDir(tmp_path / "run")
    rd.write({"format": 1, "stages": {"prune": {"status": "complete"}}, "evals": {}})
    before = rd.manifest_path.read_bytes()

    def crash(src, dst):
        assert os.path.getsize(src) > 0  # the new manifest was written in full, next to the old one
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        rd.write({"format": 1, "stages": {"dsnot": {"status": "complete"}}, "evals": {}})
    monkeypatch.undo()
    assert rd.manifest_path.read_bytes() == before
    assert sorted(p.name for p in rd.path.iterdir()) == [MANIFEST]


@pytest.mark.parametrize("text, field", [
    ('{"format": 1, "stages": {', ""),  # truncated
    ("\xff\xfe not utf-8", ""),
    ("[1, 2]", "not a JSON object"),
    ('{"format": "one"}', "format"),
    ('{"format": 99, "stages": {}}', "newer sparse-recover"),
    ('{"format": 1, "stages": []}', "stages"),
    ('{"format": 1, "stages": {"prune": 3}}', "stages.prune"),
    ('{"format": 1, "evals": {"dense": "x"}}', "evals.dense"),
    ('{"format": 1, "model": "m"}', "model"),
])
def test_corrupt_manifest_is_one_line_naming_the_file(tmp_path, text, field):
    rd = RunDir(tmp_path / "run")
    rd.path.mkdir()
    rd.manifest_path.write_bytes(text.encode("latin-1"))
    with pytest.raises(RunDirError) as err:
        rd.read()
    message = str(err.value)
    assert str(rd.manifest_path) in message and field in message and "\n" not in message
    # a command that needs a stage gets the same error, and nothing is changed
    with pytest.raises(RunDirError):
        rd.require("prune")
    assert sorted(p.name for p in rd.path.iterdir()) == [MANIFEST]
    assert rd.manifest_path.read_bytes() == text.encode("latin-1")
