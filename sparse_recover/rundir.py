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
from sparse_recover.records import Manifest, ModelEntry, StageRecord, schema_problem
from sparse_recover.stages import STAGES, command_for, dependents, differences

MANIFEST = "manifest.json"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _public(path: str | Path, directory: bool = False) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; give them the permissions of a normal one."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def recorded_inputs(stage: str, rec: StageRecord) -> list[str]:
    """The stages a record was computed from (records of the first release name them differently)."""
    if rec.inputs:
        return list(rec.inputs)
    extra = rec.model_extra or {}
    if stage == "finetune" and extra.get("from"):
        return [extra["from"]]
    if stage == "merge":
        return ["finetune"]
    return list(STAGES[stage].inputs) if stage in STAGES else []


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

    def manifest(self) -> Manifest:
        """The typed manifest (an empty one before the first stage). A manifest that is not JSON or
        fails the schema is one line naming the file and the field (exit 5)."""
        from pydantic import ValidationError

        if not self.exists():
            return Manifest()
        from sparse_recover.safeio import read_json

        data = read_json(self.manifest_path, error=RunDirError, what="manifest")
        if not isinstance(data, dict):
            raise RunDirError(f"corrupted manifest {self.manifest_path}: not a JSON object")
        try:
            return Manifest.model_validate(data)
        except ValidationError as exc:
            raise RunDirError(f"corrupted manifest {self.manifest_path}: {schema_problem(exc)}") from None

    def read(self) -> dict[str, Any]:
        """The manifest as plain data (validated through the typed schema)."""
        return self.manifest().dump()

    def write(self, data: dict[str, Any] | Manifest) -> None:
        from pydantic import ValidationError

        if not isinstance(data, Manifest):
            try:
                data = Manifest.model_validate(data)
            except ValidationError as exc:  # a bug of ours: never write what we could not read back
                raise ValueError(f"refusing to write an invalid manifest: {schema_problem(exc)}") from None
        data = data.dump()
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

    def record(self, stage: str) -> StageRecord | None:
        return self.manifest().stage(stage)

    def is_complete(self, stage: str) -> bool:
        rec = self.record(stage)
        return bool(rec is not None and rec.complete and self.stage_dir(stage).is_dir())

    def require_run(self) -> Manifest:
        """The manifest of an existing run directory, or the one line saying it is not one."""
        if not self.exists():
            raise RunDirError(f"{self.path} is not a run directory (no {MANIFEST}): run "
                              f"`{command_for('prune', self.path)}` first")
        return self.manifest()

    def require(self, stage: str) -> Path:
        """RUN/<stage> of a completed stage, or one line naming the command that produces it."""
        rec = self.require_run().stage(stage)
        if rec is not None and rec.status == "stale" and self.stage_dir(stage).is_dir():
            raise RunDirError(f"{self.path / stage} is stale ({rec.stale_reason or 'its input was recomputed'}): "
                              f"run `{command_for(stage, self.path)}` to bring it up to date")
        if not self.is_complete(stage):
            raise RunDirError(f"run directory {self.path} has no completed {stage} stage: "
                              f"run `{command_for(stage, self.path)}` first")
        return self.stage_dir(stage)

    def guard(self, stage: str, requested: dict[str, Any], *, force: bool, summary: str = "",
              recorded: dict[str, Any] | None = None) -> bool:
        """Whether `stage` must be computed. Call it after validating the request.

        recorded: the record's settings normalised by the caller (default: as stored).
        Not complete (or stale), or --force: compute. Complete with the same settings: a no-op that says
        so (False). Complete with other settings: refused with one line naming the differences (exit 5).
        """
        rec = self.record(stage)
        if rec is None or not rec.complete or not self.stage_dir(stage).is_dir() or force:
            return True
        diffs = differences(stage, rec.config if recorded is None else recorded, requested)
        if diffs:
            raise RunDirError(f"{stage} stage in {self.path} is already complete with other settings "
                              f"({'; '.join(diffs)}): use --force to recompute it (and every stage computed "
                              "from it), or another --run-dir")
        print(f"{stage} stage already complete in {self.path} with the same settings{summary}: nothing to do "
              "(use --force to redo it)")
        return False

    def commit(self, stage: str, record: StageRecord | dict[str, Any], *,
               model_entry: dict[str, Any] | None = None) -> StageRecord:
        """Record a stage whose folder is in place: every stage computed from its previous version becomes
        stale, and their evaluation results (and this stage's) are dropped, so nothing stale is reported."""
        manifest = self.manifest()
        record = record if isinstance(record, StageRecord) else StageRecord.model_validate(record)
        manifest.stages[stage] = record
        if model_entry is not None:
            manifest.model = ModelEntry.model_validate(model_entry)
        for name in [stage, *self.invalidate(manifest, stage)]:
            self._drop_evals(manifest, name)
        self.write(manifest)
        return record

    def begin_replace(self, stage: str) -> None:
        """Before RUN/<stage> is swapped: its record, its dependents and their evaluations stop counting."""
        if not self.exists():
            return
        manifest = self.manifest()
        rec = manifest.stages.get(stage)
        if rec is None:
            return
        rec.status, rec.stale_reason = "stale", "being replaced (re-run the command if it was interrupted)"
        for name in [stage, *self.invalidate(manifest, stage)]:
            self._drop_evals(manifest, name)
        self.write(manifest)

    def invalidate(self, manifest: Manifest, stage: str) -> list[str]:
        """Mark every complete stage computed from `stage` stale; returns their names."""
        reads = {name: recorded_inputs(name, rec) for name, rec in manifest.stages.items()}
        stale = []
        for name in dependents(stage, reads):
            rec = manifest.stages.get(name)
            if rec is not None and rec.complete:
                rec.status, rec.stale_reason = "stale", f"computed from an earlier {stage} stage"
                stale.append(name)
                print(f"{name}: computed from the previous {stage} stage and now stale: run "
                      f"`{command_for(name, self.path)}`")
        return stale

    def _drop_evals(self, manifest: Manifest, stage: str) -> None:
        dropped = manifest.evals.pop(stage, None)
        file = self.path / "eval" / f"{stage}.json"
        if file.is_file():
            file.unlink()
        if dropped and stage in manifest.stages and manifest.stages[stage].status == "stale":
            setattr(manifest.stages[stage], "stale_evals", dropped)

    @contextlib.contextmanager
    def staging(self, *names: str, replacing: str | None = None) -> Iterator[list[Path]]:
        """Temporary folders that replace RUN/<name> atomically when the block succeeds.

        On any exception they are deleted and RUN is left as it was (a run directory created for
        this stage and still empty is removed too). `replacing`: the stage whose folder is swapped in;
        its old record (and everything computed from it) is marked stale just before the swap, so a
        kill between the swap and the new record leaves a stage that is recomputed, never one whose
        record describes other files.
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
            if replacing is not None:
                self.begin_replace(replacing)
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
