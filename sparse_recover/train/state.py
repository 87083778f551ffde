"""Resumable training state: numbered checkpoints in the fine-tuning work directory.

A checkpoint `checkpoint-<step>/` holds the adapter weights (`adapter.safetensors`), the optimizer and
scheduler state (`optimizer.pt`, `scheduler.pt`), every process's RNG state (`rng-<rank>.pt`) and the
progress (`state.json`: step, tokens, loss history, evals). It is written into a hidden temporary folder
and renamed into place, and only the newest two are kept. A damaged file is a RunDirError naming it
(`safeio`).

Why our own code and not `accelerator.save_state` / `load_state`: resume would be bit-exact either way
(both store optimizer, scheduler and RNG states), but `save_state` writes the whole prepared model (the
frozen sparse base included: gigabytes per checkpoint where the adapters are megabytes), writes in place
(a kill during a save leaves a half-written checkpoint that would look like the newest), and uses another
layout, so runs interrupted under earlier releases could no longer be resumed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from sparse_recover.errors import RunDirError
from sparse_recover.safeio import load_safetensors, load_torch, read_json

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "state.json"
ADAPTER_FILE = "adapter.safetensors"
KEEP_CHECKPOINTS = 2


@dataclass
class Progress:
    """How far a run got: optimizer steps done, tokens seen, the per-step log and the evaluations."""

    step: int = 0
    tokens: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)


def numbered_checkpoints(work_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every `checkpoint-<step>` in `work_dir`, oldest first."""
    if not work_dir.is_dir():
        return []
    found = []
    for p in work_dir.iterdir():
        suffix = p.name[len(CHECKPOINT_PREFIX):]
        if p.name.startswith(CHECKPOINT_PREFIX) and suffix.isdecimal():
            found.append((int(suffix), p))
    return sorted(found)


def latest_checkpoint(work_dir: Path) -> Path | None:
    done = [p for _, p in numbered_checkpoints(work_dir) if (p / STATE_FILE).is_file()]
    return done[-1] if done else None


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------ save


def save_checkpoint(accelerator, work_dir: Path, progress: Progress, *, total: int, adapters, optimizer, scheduler,
                    on_checkpoint: Callable[[Path], None] | None = None, sharded: bool = False) -> None:
    """Checkpoint `progress.step` on every process together (collective: all processes call it).

    sharded (FSDP2): adapters and optimizer state are gathered to whole tensors first, on every process,
    so the files have the unsharded layout whatever the run's sharding."""
    from safetensors.torch import save_file

    from sparse_recover.adapters.model import adapter_state_dict

    main = accelerator.is_main_process
    step = progress.step
    target = work_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = work_dir / f".{CHECKPOINT_PREFIX}{step}.tmp"
    accelerator.wait_for_everyone()
    if main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
    if sharded:
        from sparse_recover.train.shard import full_optimizer_state

        weights, opt_state = adapter_state_dict(adapters), full_optimizer_state(optimizer)
    if main:
        save_file(adapter_state_dict(adapters) if not sharded else weights, str(tmp / ADAPTER_FILE))
        torch.save(optimizer.state_dict() if not sharded else opt_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    accelerator.wait_for_everyone()
    if main:
        (tmp / STATE_FILE).write_text(json.dumps(
            {"step": step, "tokens": progress.tokens, "total_steps": total, "world_size": accelerator.num_processes,
             "history": progress.history, "evals": progress.evals}, indent=1))
        _publish(tmp, target, work_dir)
        if on_checkpoint is not None:
            on_checkpoint(target)
    accelerator.wait_for_everyone()


def _publish(tmp: Path, target: Path, work_dir: Path) -> None:
    """Rename the finished temporary folder into place and drop all but the newest checkpoints."""
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    for _, old in numbered_checkpoints(work_dir)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ load


def read_progress(ckpt: Path) -> Progress:
    path = ckpt / STATE_FILE
    state = read_json(path, what="training state")
    if not isinstance(state, dict) or not all(isinstance(state.get(k), int) for k in ("step", "tokens")):
        raise RunDirError(f"training state {path}: not an object with an integer step and tokens")
    return Progress(step=state["step"], tokens=state["tokens"], history=state.get("history", []),
                    evals=state.get("evals", []))


def load_checkpoint(ckpt: Path, rank: int, *, adapters, optimizer, scheduler, sharded: bool = False) -> Progress:
    """Restore adapters, optimizer, scheduler and this process's RNG from `ckpt`; its progress (sharded:
    each process takes its shard of the whole tensors the checkpoint holds)."""
    from sparse_recover.adapters.model import load_adapter_state

    progress = read_progress(ckpt)
    load_adapter_state(adapters, load_safetensors(ckpt / ADAPTER_FILE, what="adapter weights"))
    opt_state = load_torch(ckpt / "optimizer.pt", what="optimizer state")
    if sharded:
        from sparse_recover.train.shard import shard_optimizer_state

        opt_state = shard_optimizer_state(opt_state, optimizer)
    optimizer.load_state_dict(opt_state)
    scheduler.load_state_dict(load_torch(ckpt / "scheduler.pt", what="scheduler state"))
    rng_file = ckpt / f"rng-{rank}.pt"
    if rng_file.is_file():  # absent when resuming on more processes than the run started with
        set_rng_state(load_torch(rng_file, what="RNG state"))
    return progress

