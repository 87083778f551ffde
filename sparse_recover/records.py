"""Typed run records: the manifest, its stage records and the keys of evaluation results.

Written and read only through `RunDir`. Every record keeps the fields it does not know (`extra="allow"`)
so a manifest written by a newer minor version, or a field one stage adds for its own report, round-trips;
what the project reads is typed and validated here, once, with one line naming the bad field.

Manifests of the first release (format 1) read unchanged: their `pattern: "unstructured"` plus
`sparsity.target` becomes the round-trippable `unstructured:0.5`, and a comparison group such as
`block128` becomes `group: block, group_size: 128`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

FORMAT_VERSION = 1

Group = Literal["matrix", "row", "block", "nm", "none", "prune-rows"]
Status = Literal["complete", "stale"]


class Record(BaseModel):
    model_config = ConfigDict(extra="allow", validate_assignment=True)


class ModelEntry(Record):
    spec: str
    kind: str | None = None
    path: str | None = None
    architecture: str | None = None
    model_type: str | None = None
    fingerprint: str | None = None


class SparsityRecord(Record):
    target: float | None = None
    overall: float = 0.0
    linears: int = 0
    layers: dict[str, dict[str, Any]] = Field(default_factory=dict)


class StageRecord(Record):
    """One stage's record. Checkpoint stages carry pattern, group and masks; finetune carries train."""

    status: Status = "complete"
    finished: str | None = None
    method: str | None = None
    pattern: str | None = None
    group: Group | None = None
    group_size: int | None = Field(None, ge=1)
    config: dict[str, Any] = Field(default_factory=dict)
    sparsity: SparsityRecord | None = None
    masks_sha256: str | None = None
    inputs: dict[str, str | None] = Field(default_factory=dict, description="input stage -> its identity")
    stale_reason: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _legacy(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        group = data.get("group")
        if isinstance(group, str) and group.startswith("block") and group[5:].isdigit():
            data["group"], data["group_size"] = "block", int(group[5:])
        pattern, sparsity = data.get("pattern"), data.get("sparsity")
        if pattern == "unstructured" and isinstance(sparsity, dict) and sparsity.get("target") is not None:
            data["pattern"] = f"unstructured:{float(sparsity['target'])!r}"
        return data

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from sparse_recover.errors import ConfigError
        from sparse_recover.sparsity.patterns import parse_pattern

        try:
            return parse_pattern(v).spec
        except ConfigError as exc:
            raise ValueError(str(exc)) from None

    def parsed_pattern(self):
        from sparse_recover.sparsity.patterns import parse_pattern

        return parse_pattern(self.pattern) if self.pattern else None

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    def identity(self) -> str:
        """What identifies one computation of the stage: when it finished and, for checkpoints, its masks."""
        return f"{self.finished}|{self.masks_sha256 or ''}"


class Manifest(Record):
    format: StrictInt = FORMAT_VERSION
    model: ModelEntry | None = None
    stages: dict[str, StageRecord] = Field(default_factory=dict)
    evals: dict[str, dict[str, dict[str, Any]]] = Field(default_factory=dict)
    pipeline: dict[str, Any] | None = None

    @field_validator("format")
    @classmethod
    def _format(cls, v: int) -> int:
        if v > FORMAT_VERSION:
            raise ValueError(f"written by a newer sparse-recover (format {v}; this one reads {FORMAT_VERSION})")
        return v

    def stage(self, name: str) -> StageRecord | None:
        return self.stages.get(name)

    def dump(self) -> dict[str, Any]:
        data = _compact(self)
        data["stages"] = {name: _compact(rec) for name, rec in self.stages.items()}
        for record in data.get("stages", {}).values():
            if record.get("group") == "block" and record.get("group_size"):  # the format-1 spelling, kept
                record["group"] = f"block{record.pop('group_size')}"
        return data


def _compact(record: Record) -> dict[str, Any]:
    """A record as plain data, without the declared fields it never set and leaves at their default
    (so a record written by this version reads like one of the first release)."""
    data = record.model_dump(mode="json")
    for name, field in type(record).model_fields.items():
        if name not in record.model_fields_set and getattr(record, name) == field.get_default(
                call_default_factory=True) and name not in ("format", "stages", "evals"):
            data.pop(name, None)
    return data


def schema_problem(exc) -> str:
    """The first problem of a pydantic ValidationError on a manifest: `field.path: message`."""
    err = exc.errors()[0]
    path = ".".join(str(p) for p in err["loc"]) or "manifest"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    more = len(exc.errors()) - 1
    return f"{path}: {msg}" + (f" (and {more} more)" if more else "")


# ------------------------------------------------------------------------------------------------
# evaluation result keys

_PPL_RE = re.compile(r"ppl/(.*)/(\d+)(?:/limit(\d+))?")


@dataclass(frozen=True)
class EvalKey:
    """The key of one evaluation result in RUN/eval/<stage>.json: `ppl/<data>/<seqlen>[/limit<N>]` or
    `lm-eval/<tasks>[/limit<N>][/shots<K>][/data-dir]`. Formatted and parsed only here.

    `<data>` is canonical: the resolved absolute path of a local file, or the lower-case source name
    (`wiki-en`, `wikitext2`); the result also stores `data_sha256`, the hash of the text measured, and a
    result of the same key whose text hash differs is a different measurement (see engine/evaluate.py)."""

    kind: Literal["ppl", "lm-eval"]
    data: str = ""  # ppl: the data source; lm-eval: comma-joined sorted task names
    seqlen: int = 0
    limit: int | None = None
    shots: int | None = None
    data_dir: bool = False

    @classmethod
    def ppl(cls, data: str, seqlen: int, limit: int | None = None) -> "EvalKey":
        return cls("ppl", data, seqlen, limit)

    @classmethod
    def lm_eval(cls, tasks: list[str], limit: int | None = None, shots: int | None = None,
                data_dir: bool = False) -> "EvalKey":
        return cls("lm-eval", ",".join(sorted(dict.fromkeys(tasks))), 0, limit, shots, data_dir)

    def __str__(self) -> str:
        limit = f"/limit{self.limit}" if self.limit else ""
        if self.kind == "ppl":
            return f"ppl/{self.data}/{self.seqlen}{limit}"
        shots = f"/shots{self.shots}" if self.shots is not None else ""
        return f"lm-eval/{self.data}{limit}{shots}" + ("/data-dir" if self.data_dir else "")

    @classmethod
    def canonical(cls, key: str, result: Any) -> str:
        """The key a stored result is kept under now. Perplexity keys name their data canonically (the resolved
        absolute path of a file, the lower-case name of a source); earlier versions keyed a file as it was
        typed (`ppl/m/corpus.jsonl/64`), but every result records the canonical name in `data`, so an old key
        maps onto the key the same measurement gets today. Other keys are returned unchanged."""
        parsed = cls.parse(key)
        if parsed is None or parsed.kind != "ppl" or not parsed.seqlen or not isinstance(result, dict):
            return key
        data = result.get("data")
        if not isinstance(data, str) or not data:
            return key
        return str(cls.ppl(data, parsed.seqlen, parsed.limit))

    @classmethod
    def parse(cls, key: str) -> "EvalKey | None":
        if key.startswith("ppl/"):
            m = _PPL_RE.fullmatch(key)
            if not m:
                return cls("ppl", key[4:], 0, None)
            return cls("ppl", m.group(1), int(m.group(2)), int(m.group(3)) if m.group(3) else None)
        if key.startswith("lm-eval/"):
            parts = key[len("lm-eval/"):].split("/")
            limit = shots = None
            for part in parts[1:]:
                if part.startswith("limit") and part[5:].isdigit():
                    limit = int(part[5:])
                elif part.startswith("shots") and part[5:].isdigit():
                    shots = int(part[5:])
            return cls("lm-eval", parts[0], 0, limit, shots, "data-dir" in parts[1:])
        return None
