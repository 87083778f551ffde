"""The stage table: every stage of a run directory, the command that produces it, what it reads and
whether it is a checkpoint. Every other place (RunDir's guard, the pipeline, the report, eval, audit)
derives its stage lists from here.

A stage's settings are compared with the recorded ones on a re-run; `ignored` names the settings that
change only speed or memory (they may differ without making the stage a different computation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Stage:
    name: str
    command: str  # how a user produces it, `{run}` is the run directory
    inputs: tuple[str, ...]  # stages it may read; finetune reads one of them (dsnot if present, else prune)
    checkpoint: bool  # a save_pretrained checkpoint + masks.safetensors
    ignored: frozenset[str] = field(default_factory=frozenset)


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("prune", "sparse-recover prune --run-dir {run} --model ... --method ...", (), True,
          frozenset({"model.model", "model.device", "calib.batch_size", "prune.offload", "prune.checkpoint_every"})),
    Stage("dsnot", "sparse-recover dsnot --run-dir {run}", ("prune",), True,
          frozenset({"offload", "batch_size", "device", "dtype", "reference_defaults", "checkpoint_every"})),
    Stage("reconstruct", "sparse-recover reconstruct --run-dir {run}", ("dsnot", "prune"), True,
          frozenset({"offload", "batch_size", "device", "dtype"})),
    Stage("finetune", "sparse-recover finetune --run-dir {run}", ("reconstruct", "dsnot", "prune"), False,
          frozenset({"log_every", "eval_every", "save_every", "eval_batches", "gradient_checkpointing", "shard",
                     "report_to"})),
    Stage("merge", "sparse-recover merge --run-dir {run}", ("finetune",), True,
          frozenset({"device", "dtype"})),
)}

STAGE_NAMES = tuple(STAGES)
CHECKPOINT_STAGES = tuple(s.name for s in STAGES.values() if s.checkpoint)
EVAL_STAGES = ("dense", *CHECKPOINT_STAGES)  # what `eval` measures (finetune through merge)
PIPELINE_STAGES = (*STAGE_NAMES, "audit", "eval")  # the order of a YAML pipeline


def command_for(stage: str, run: Any) -> str:
    spec = STAGES.get(stage)
    return (spec.command if spec else f"sparse-recover {stage} --run-dir {{run}}").format(run=run)


def dependents(stage: str, recorded_inputs: dict[str, list[str]]) -> list[str]:
    """Stages computed (directly or through others) from `stage`, in table order.

    recorded_inputs: stage -> the input stages its record names (a fine-tune from prune does not depend
    on dsnot); stages without a record fall back to the table's inputs."""
    out: list[str] = []
    frontier = {stage}
    for name in STAGE_NAMES:
        reads = recorded_inputs.get(name, list(STAGES[name].inputs))
        if name != stage and frontier & set(reads):
            out.append(name)
            frontier.add(name)
    return out


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(flatten(value, f"{prefix}{key}." if isinstance(value, dict) else f"{prefix}{key}"))
    return out


def differences(stage: str, recorded: dict[str, Any], requested: dict[str, Any]) -> list[str]:
    """`key: recorded -> requested` for every setting that changes the result and differs. Keys the
    record does not hold (written by an earlier version) are not compared."""
    rec, req = flatten(recorded), flatten(requested)
    ignore = STAGES[stage].ignored if stage in STAGES else frozenset()
    out = []
    for key, want in req.items():
        if key in ignore or key not in rec:
            continue
        have = rec[key]
        if isinstance(have, (int, float)) and isinstance(want, (int, float)) and not isinstance(have, bool):
            same = float(have) == float(want)
        else:
            same = have == want
        if not same:
            out.append(f"{key}: {have!r} -> {want!r}")
    return out
