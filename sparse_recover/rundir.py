"""The run directory: one manifest, one folder per stage, atomic writes.

    RUN/manifest.json       stages, status, inputs, config, metrics, versions, hashes, timings
    RUN/calib/              windows.safetensors: the tokenised calibration windows, reused by later stages
    RUN/prune/              save_pretrained checkpoint + tokenizer + masks.safetensors (True = keep)
    RUN/eval/<stage>.json   metrics of each evaluated stage
    RUN/logs/<stage>.log

A stage writes into a hidden temporary folder inside RUN and renames it into place when complete,
then rewrites the manifest through a temporary file and os.replace: a crash never leaves something
that looks complete, and never a half-written manifest.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from sparse_recover.errors import RunDirError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
STAGE_COMMANDS = {
    "prune": "sparse-recover prune --run-dir {run} --model ... --method ...",
    "dsnot": "sparse-recover dsnot --run-dir {run}",
    "finetune": "sparse-recover finetune --run-dir {run}",
    "merge": "sparse-recover merge --run-dir {run}",
}
CHECKPOINT_STAGES = ("prune", "dsnot", "merge")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _public(path: str | Path, directory: bool = False) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; give them the permissions of a normal one."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _manifest_problem(data: Any) -> str | None:
    """What makes `data` not a manifest of ours, or None."""
    if not isinstance(data, dict):
        return "not a JSON object"
    fmt = data.get("format", FORMAT_VERSION)
    if not isinstance(fmt, int) or isinstance(fmt, bool):
        return f"'format' must be an integer, got {fmt!r}"
    if "model" in data and not isinstance(data["model"], dict):
        return "'model' must be an object"
    for section in ("stages", "evals"):
        value = data.get(section, {})
        if not isinstance(value, dict):
            return f"'{section}' must be an object"
        for key, entry in value.items():
            if not isinstance(entry, dict):
                return f"'{section}.{key}' must be an object"
    return None


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()

    # ---------------------------------------------------------------------------------------------
    # manifest

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def check_location(self) -> None:
        """Refuse a path that is a file, or a non-empty folder that is not a run directory."""
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"run directory {self.path} is a file")
        if self.path.is_dir() and not self.exists():
            extra = [p.name for p in self.path.iterdir() if not p.name.startswith(".")]
            if extra:
                raise RunDirError(
                    f"{self.path} is not empty and has no {MANIFEST}: not a run directory (choose a new --run-dir)"
                )

    def read(self) -> dict[str, Any]:
        if not self.exists():
            return {"format": FORMAT_VERSION, "stages": {}, "evals": {}}
        try:
            data = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RunDirError(f"corrupted manifest {self.manifest_path}: {exc}") from None
        problem = _manifest_problem(data)
        if problem:
            raise RunDirError(f"corrupted manifest {self.manifest_path}: {problem}")
        if data.get("format", FORMAT_VERSION) > FORMAT_VERSION:
            raise RunDirError(f"{self.manifest_path} was written by a newer sparse-recover (format {data['format']})")
        data.setdefault("stages", {})
        data.setdefault("evals", {})
        return data

    def write(self, data: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".manifest.", suffix=".tmp", dir=self.path)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(data, fh, indent=2, sort_keys=False, default=str)
                fh.write("\n")
            _public(tmp)
            os.replace(tmp, self.manifest_path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def update(self, **sections: Any) -> dict[str, Any]:
        data = self.read()
        for key, value in sections.items():
            if key in ("stages", "evals") and isinstance(value, dict):
                data[key].update(value)
            else:
                data[key] = value
        self.write(data)
        return data

    # ---------------------------------------------------------------------------------------------
    # model identity

    def check_model(self, model_entry: dict[str, Any]) -> None:
        """Refuse to mix models in one run directory."""
        if not self.exists():
            return
        current = self.read().get("model")
        if not current:
            return
        if current.get("spec") != model_entry.get("spec") or (
            current.get("fingerprint") and model_entry.get("fingerprint")
            and current["fingerprint"] != model_entry["fingerprint"]
        ):
            raise RunDirError(
                f"run directory {self.path} belongs to model {current.get('spec')!r}, not {model_entry.get('spec')!r}: "
                "use another --run-dir"
            )

    # ---------------------------------------------------------------------------------------------
    # stages

    def stage_dir(self, stage: str) -> Path:
        return self.path / stage

    def stage_entry(self, stage: str) -> dict[str, Any] | None:
        return self.read()["stages"].get(stage)

    def is_complete(self, stage: str) -> bool:
        entry = self.stage_entry(stage)
        return bool(entry and entry.get("status") == "complete" and self.stage_dir(stage).is_dir())

    def require(self, stage: str) -> Path:
        if not self.exists():
            raise RunDirError(f"{self.path} is not a run directory (no {MANIFEST}); start with `sparse-recover prune`")
        if not self.is_complete(stage):
            cmd = STAGE_COMMANDS.get(stage, f"sparse-recover {stage}").format(run=self.path)
            raise RunDirError(f"run directory {self.path} has no completed {stage} stage: run `{cmd}` first")
        return self.stage_dir(stage)

    @contextlib.contextmanager
    def staging(self, *names: str) -> Iterator[list[Path]]:
        """Temporary folders that replace RUN/<name> atomically when the block succeeds.

        On any exception they are deleted and RUN is left as it was (a run directory created for
        this stage and still empty is removed too).
        """
        created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        tmps = [Path(tempfile.mkdtemp(prefix=f".{n}.tmp-", dir=self.path)) for n in names]
        for tmp in tmps:
            _public(tmp, directory=True)
        try:
            yield tmps
            for tmp in tmps:
                for root, dirs, files in os.walk(tmp):
                    for f in files:
                        _public(os.path.join(root, f))
                    for d in dirs:
                        _public(os.path.join(root, d), directory=True)
            for name, tmp in zip(names, tmps):
                final = self.path / name
                if final.exists():
                    trash = Path(tempfile.mkdtemp(prefix=f".{name}.old-", dir=self.path))
                    os.replace(final, trash / name)
                    shutil.rmtree(trash, ignore_errors=True)
                os.replace(tmp, final)
        finally:
            for tmp in tmps:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
            if created and self.path.is_dir() and not any(self.path.iterdir()):
                self.path.rmdir()

    def write_json(self, relative: str, data: Any) -> Path:
        target = self.path / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(data, fh, indent=2, default=str)
                fh.write("\n")
            _public(tmp)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return target
