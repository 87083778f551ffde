"""Resumable layer-wise passes (prune, dsnot): progress snapshots in RUN/.<stage>.partial/.

While a layer-wise pass runs, every finished decoder block is written to the stage's hidden work
folder (its weights, its masks packed 8 per byte, its manifest per-layer stats), and after every K
finished blocks a *generation* is committed: the propagated activations that enter the next block
(nsamples x seqlen x hidden in the calibration dtype) and a small state file naming every file of the
generation with its size and sha256. Files are written to a temporary name, flushed and renamed
(os.replace), and the state file comes last, so a kill at any point leaves the previous generation
intact. The two newest generations are kept: when the newest is truncated or damaged, the pass resumes
from the one before it (or from the first block when neither is whole), and says so in one line.

Re-running the same command continues at the next unfinished block and gives a bit-identical result:
the finished blocks' weights are copied back into the freshly loaded model, the calibration call
arguments (positions, masks) are captured again from the embeddings (which pruning never changes),
and the stored activations replace the block-0 inputs. Nothing is random in these passes.

What identifies a snapshot: the stage's settings (compared with `stages.differences`, so the settings
a stage ignores - offload, batch size, checkpoint cadence - may differ), the model and the calibration
dtype; a difference refuses to resume with one line and deletes nothing. Its inputs (the calibration
windows; for dsnot, the prune stage it refines) changing makes it obsolete: it is dropped, with one line,
and the pass starts over. A snapshot whose stage has been committed since it was started (a kill between
the commit and the clean-up) is a leftover and is dropped silently.

The default cadence (`checkpoint_every: null`, see `auto_checkpoint_every`): off for models under 1B
parameters and for data-free methods; otherwise the number of blocks that take about ten minutes on a
GPU, estimated from one block's parameter count and the calibration tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from sparse_recover.errors import RunDirError
from sparse_recover.rundir import RunDir, now
from sparse_recover.stages import differences

KILL_ENV = "SPARSE_RECOVER_KILL_AFTER_BLOCK"  # fault injection for tests: SIGKILL after this many blocks
FORMAT = "sparse-recover-layerwise/1"
KEEP_GENERATIONS = 2
_STATE = re.compile(r"^state-(\d{5})\.json$")

# The default cadence. Reference point: one decoder block of a 70B LLaMA (856M parameters) with the
# reference calibration (128 windows x 2048 tokens) takes about a minute of layer-wise work on a current
# GPU (SparseGPT's Hessians and sweep, or DSnoT's refinement, plus the two forward passes); a block's
# time grows with its parameters times the calibration tokens.
AUTO_MIN_PARAMS = 1_000_000_000
AUTO_TARGET_S = 600.0
REF_BLOCK_PARAMS = 856_000_000
REF_TOKENS = 128 * 2048
REF_BLOCK_S = 60.0


def auto_checkpoint_every(params: int, block_params: int, tokens: int) -> int | None:
    """Blocks between snapshots when `checkpoint_every` is null: None (off) under 1B parameters or without
    calibration tokens (a data-free method), else round(600 s / estimated seconds per block), at least 1,
    where seconds per block = 60 x (block parameters / 856M) x (tokens / (128 x 2048)): a 70B LLaMA with
    the reference calibration snapshots every 10 blocks."""
    if params < AUTO_MIN_PARAMS or tokens <= 0 or block_params <= 0:
        return None
    seconds = REF_BLOCK_S * (block_params / REF_BLOCK_PARAMS) * (tokens / REF_TOKENS)
    return max(1, round(AUTO_TARGET_S / seconds))


def resolve_every(requested: int | None, model, tokens: int) -> int | None:
    """The cadence of this pass: the requested K, else the automatic one for this model."""
    if requested is not None:
        return requested
    from sparse_recover.models import decoder_blocks

    _, blocks = decoder_blocks(model)
    params = sum(p.numel() for p in model.parameters())
    block_params = sum(p.numel() for p in blocks[0].parameters()) if len(blocks) else 0
    return auto_checkpoint_every(params, block_params, tokens)


def snapshot_bytes(*, n_blocks: int, block_params: int, linear_elems_per_block: int, nsamples: int, seqlen: int,
                   hidden: int, nbytes: int, every: int | None) -> dict[str, int]:
    """Largest disk footprint of a pass's snapshots: the finished blocks' weights and packed masks (all
    blocks but the last generation's remainder) and two generations of activations."""
    if not every or every >= n_blocks:
        return {}
    saved = ((n_blocks - 1) // every) * every  # blocks written before the last generation
    acts = nsamples * seqlen * hidden * nbytes if nsamples else 0
    return {"weights": saved * block_params * nbytes, "masks": saved * ((linear_elems_per_block + 7) // 8),
            "activations": min(KEEP_GENERATIONS, (n_blocks - 1) // every) * acts}


# --------------------------------------------------------------------------------------------------
# files


def _write_atomic(path: Path, data: bytes) -> str:
    """Write `data` under a temporary name, flush it to disk, rename it to `path`; returns its sha256. A
    failed write (a full disk) is one line; the files of the previous generation are untouched."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise RunDirError(f"could not write the progress snapshot {path}: {exc.strerror or exc}; the previous "
                          "snapshot (if any) is intact") from None
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _file_problem(folder: Path, ref: dict[str, Any]) -> str | None:
    """Why a file a state names is not the one it wrote (None when it is)."""
    path = folder / ref["file"]
    try:
        size = path.stat().st_size
    except OSError:
        return f"{ref['file']} is missing"
    if size != ref["size"]:
        return f"{ref['file']} is truncated ({size} of {ref['size']} bytes)"
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            digest.update(chunk)
    if digest.hexdigest() != ref["sha256"]:
        return f"{ref['file']} is corrupt (sha256 differs)"
    return None


def _block_file(i: int) -> str:
    return f"block-{i:05d}.safetensors"


def _acts_file(done: int) -> str:
    return f"acts-{done:05d}.safetensors"


def _state_file(done: int) -> str:
    return f"state-{done:05d}.json"


# --------------------------------------------------------------------------------------------------
# the snapshot of one stage


@dataclass
class Resume:
    """What a resumed pass starts from (see calibration.layerwise's `start` and `resume_hidden`)."""

    start: int  # first block to compute
    n_blocks: int
    hidden: Any  # (nsamples, seqlen, hidden) inputs of block `start`, or None (data-free)
    masks: dict[str, Any]
    layers: dict[str, dict[str, Any]]
    transposed: list[str]
    extra: dict[str, Any]


@dataclass
class _Found:
    state: dict[str, Any]
    note: str = ""  # the one line saying the newest generation was damaged


@dataclass
class LayerwiseSnapshot:
    """Progress of one layer-wise stage in RUN/.<stage>.partial/ (see the module docstring).

    settings: what must be equal to resume (compared through `stages.differences`, with the stage's
    ignored keys); engine: further settings compared exactly (model, dtype); inputs: what the pass was
    computed from (a change makes the snapshot obsolete); base: the identity of the stage's record when
    the pass started (a different one now means the snapshot is a leftover of a committed run)."""

    rd: RunDir
    stage: str
    settings: dict[str, Any]
    engine: dict[str, Any]
    inputs: dict[str, Any]
    every: int | None = None
    base: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    echo: Callable[[str], None] = print
    _blocks: dict[int, dict[str, Any]] = field(default_factory=dict)  # index -> file reference
    _done: int = 0

    @property
    def folder(self) -> Path:
        return self.rd.path / f".{self.stage}.partial"

    # ---- reading ----------------------------------------------------------------------------------

    def _states(self) -> list[tuple[int, Path]]:
        if not self.folder.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.folder.iterdir() if (m := _STATE.match(p.name))]
        return sorted(found, reverse=True)

    def _read_state(self, path: Path) -> dict[str, Any] | None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            return None
        keys = ("format", "settings", "engine", "inputs", "done", "n_blocks", "blocks", "acts", "layers")
        if not isinstance(data, dict) or data.get("format") != FORMAT or any(k not in data for k in keys):
            return None
        return data

    def _problem(self, state: dict[str, Any]) -> str | None:
        if len(state["blocks"]) != state["done"]:
            return f"{_state_file(state['done'])} names {len(state['blocks'])} blocks, not {state['done']}"
        for ref in [*state["blocks"], *([state["acts"]] if state["acts"] else [])]:
            problem = _file_problem(self.folder, ref)
            if problem:
                return problem
        return None

    def _newest_readable(self) -> dict[str, Any] | None:
        for _, path in self._states():
            state = self._read_state(path)
            if state is not None:
                return state
        return None

    def _changed_inputs(self, state: dict[str, Any]) -> list[str]:
        return [k for k in sorted(set(state["inputs"]) | set(self.inputs))
                if state["inputs"].get(k) != self.inputs.get(k)]

    def check(self) -> None:
        """Refuse early (before any loading) when the newest readable generation has other settings. A
        leftover snapshot is dropped; an obsolete one is left for `find` to report (its inputs, when not
        known yet, are not compared)."""
        state = self._newest_readable()
        if state is None:
            return
        if state.get("base") != self.base:
            self.discard()  # the stage was committed after this pass started: a leftover
            return
        if self.inputs and self._changed_inputs(state):
            return
        self._check_settings(state)

    def find(self, n_blocks: int) -> _Found | None:
        """The newest whole generation to resume from, or None (start at the first block).

        Refuses (RunDirError, nothing deleted) when the snapshot was taken with other settings; drops an
        obsolete or leftover snapshot; says in one line when a damaged generation is passed over."""
        states = self._states()
        if not states:
            if self.folder.exists():
                self.discard()
            return None
        parsed = [(done, path, self._read_state(path)) for done, path in states]
        readable = [s for _, _, s in parsed if s is not None]
        if readable:
            newest = readable[0]
            if newest.get("base") != self.base:
                self.discard()  # the stage was committed after this pass started: a leftover
                return None
            changed = self._changed_inputs(newest)
            if changed or newest["n_blocks"] != n_blocks:
                what = ", ".join(changed) or "the number of decoder blocks"
                self.echo(f"{self.stage}: the snapshot in {self.folder} was computed from other inputs ({what}): "
                          f"starting from block 1 of {n_blocks}")
                self.discard()
                return None
            self._check_settings(newest)
        damaged: list[str] = []
        for done, path, state in parsed:
            problem = "unreadable" if state is None else self._problem(state)
            if problem is None:
                note = ""
                if damaged:
                    note = (f"{self.stage}: the snapshot after block {states[0][0]} is damaged ({damaged[0]}): "
                            f"resuming at block {done + 1} of {n_blocks} from the one after block {done}")
                for newer, newer_path, _ in parsed:
                    if newer > done:
                        newer_path.unlink(missing_ok=True)
                return _Found(state, note)
            damaged.append(f"{path.name} unreadable" if state is None else problem)
        self.echo(f"{self.stage}: the snapshot in {self.folder} is damaged ({damaged[0]}): starting from block 1 "
                  f"of {n_blocks}")
        self.discard()
        return None

    def _check_settings(self, state: dict[str, Any]) -> None:
        diffs = differences(self.stage, state["settings"], self.settings)
        for key in sorted(set(state["engine"]) | set(self.engine)):
            have, want = state["engine"].get(key), self.engine.get(key)
            if have != want:
                diffs.append(f"{key}: {have!r} -> {want!r}")
        if diffs:
            raise RunDirError(
                f"{self.stage} stage in {self.rd.path} has an interrupted run ({state['done']} of {state['n_blocks']} "
                f"blocks done) with other settings ({'; '.join(diffs)}): re-run with those settings to resume it, "
                f"or start over with --force (which drops {self.folder})")

    def restore(self, model, found: _Found) -> Resume:
        """Copy the finished blocks' weights into `model` and return where the pass continues."""
        import torch
        from safetensors.torch import load_file

        from sparse_recover.models import decoder_blocks
        from sparse_recover.sparsity.io import unpack_mask

        state = found.state
        _, blocks = decoder_blocks(model)
        masks: dict[str, torch.Tensor] = {}
        for i, ref in enumerate(state["blocks"]):
            tensors = load_file(str(self.folder / ref["file"]))
            weights = {k[3:]: v for k, v in tensors.items() if k.startswith("w::")}
            with torch.no_grad():
                block = blocks[i]
                own = block.state_dict()
                if set(own) != set(weights):
                    raise RunDirError(f"snapshot {self.folder / ref['file']} does not fit block {i} of the model: "
                                      f"remove {self.folder} to start over")
                for name, value in weights.items():
                    own[name].copy_(value)
            for key, shape in ref["masks"].items():
                masks[key] = unpack_mask(tensors[f"m::{key}"], shape[-1]).reshape(shape)
            del tensors, weights
        hidden = None
        if state["acts"]:
            hidden = load_file(str(self.folder / state["acts"]["file"]))["hidden"]
        self._blocks = dict(enumerate(state["blocks"]))
        self._done = state["done"]
        self.base = state.get("base")
        self.extra = dict(state.get("extra") or {})
        self.echo(found.note or f"{self.stage}: resuming at block {state['done'] + 1} of {state['n_blocks']} "
                  f"(snapshot in {self.folder})")
        return Resume(start=state["done"], n_blocks=state["n_blocks"], hidden=hidden, masks=masks,
                      layers=state["layers"], transposed=list(state["transposed"]), extra=self.extra)

    # ---- writing ----------------------------------------------------------------------------------

    def due(self, done: int, n_blocks: int) -> bool:
        """Whether a generation is committed after `done` finished blocks (never after the last one)."""
        return bool(self.every) and done < n_blocks and done % self.every == 0

    def needs_block(self, index: int, n_blocks: int) -> bool:
        """Whether block `index` belongs to a generation that will be committed."""
        if not self.every:
            return False
        last = ((n_blocks - 1) // self.every) * self.every
        return index < last

    def save_block(self, index: int, block, masks: dict[str, Any], transposed: list[str]) -> None:
        """Write one finished block: its weights, the packed masks of its linears."""
        from safetensors.torch import save

        from sparse_recover.sparsity.io import pack_mask

        self.folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"w::{k}": v.detach().to("cpu").contiguous() for k, v in block.state_dict().items()}
        shapes = {}
        for key, keep in masks.items():
            tensors[f"m::{key}"] = pack_mask(keep)
            shapes[key] = list(keep.shape)
        name = _block_file(index)
        data = save(tensors, metadata={"format": FORMAT, "block": str(index)})
        del tensors
        digest = _write_atomic(self.folder / name, data)
        self._blocks[index] = {"file": name, "size": len(data), "sha256": digest, "masks": shapes,
                               "transposed": sorted(transposed)}

    def commit(self, done: int, n_blocks: int, hidden, layers: dict[str, Any], transposed: list[str]) -> None:
        """Commit the generation after `done` finished blocks: the activations entering block `done`, then
        the state file naming every file; then drop generations older than the previous one."""
        import torch
        from safetensors.torch import save

        acts = None
        if hidden is not None:
            whole = torch.cat([h.detach().to("cpu") for h in hidden]).contiguous()
            data = save({"hidden": whole}, metadata={"format": FORMAT, "done": str(done)})
            del whole
            acts = {"file": _acts_file(done), "size": len(data), "sha256": _write_atomic(
                self.folder / _acts_file(done), data)}
            del data
        state = {"format": FORMAT, "stage": self.stage, "written": now(), "settings": self.settings,
                 "engine": self.engine, "inputs": self.inputs, "base": self.base, "done": done, "n_blocks": n_blocks,
                 "blocks": [self._blocks[i] for i in range(done)], "acts": acts, "layers": layers,
                 "transposed": sorted(transposed), "extra": self.extra}
        _fsync_dir(self.folder)
        _write_atomic(self.folder / _state_file(done), json.dumps(state, default=str).encode())
        _fsync_dir(self.folder)
        self._done = done
        self._prune_generations()

    def _prune_generations(self) -> None:
        states = self._states()
        keep = states[:KEEP_GENERATIONS]
        for _, path in states[KEEP_GENERATIONS:]:
            path.unlink(missing_ok=True)
        wanted = {_acts_file(done) for done, _ in keep} | {p.name for _, p in keep}
        wanted |= {ref["file"] for ref in self._blocks.values()}
        for path in self.folder.iterdir():
            if path.name not in wanted and (path.name.startswith("acts-") or path.name.startswith("state-")):
                path.unlink(missing_ok=True)

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def stage_snapshot(rd: RunDir, stage: str, settings: dict[str, Any], engine: dict[str, Any]) -> LayerwiseSnapshot:
    """The snapshot of `stage` in `rd` for a pass with these settings (inputs are set once known)."""
    rec = rd.record(stage)
    return LayerwiseSnapshot(rd, stage, settings=settings, engine=engine, inputs={},
                             base=rec.identity() if rec is not None else None)


def discard_snapshot(rd: RunDir, stage: str) -> bool:
    """`--force`: drop an interrupted pass's snapshot of `stage` (the user asked to start over); True if
    there was one."""
    folder = rd.path / f".{stage}.partial"
    if not folder.exists():
        return False
    shutil.rmtree(folder, ignore_errors=True)
    return True


def kill_after() -> int:
    """The block count after which the process SIGKILLs itself (tests), or 0."""
    try:
        return int(os.environ.get(KILL_ENV, "0") or 0)
    except ValueError:
        return 0


class BlockRecorder:
    """The `after_block` hook of a resumable pass (prune_model, dsnot_model): writes each finished block
    that a later generation will name, commits a generation every `every` blocks, and honours the
    fault-injection variable (SIGKILL once that many blocks are finished, after their snapshot)."""

    def __init__(self, snapshot: LayerwiseSnapshot | None, n_blocks: int, prefix: str):
        self.snapshot, self.n_blocks, self.prefix = snapshot, n_blocks, prefix
        self.kill = kill_after()

    def __call__(self, index: int, block, hidden, masks: dict[str, Any], layers: dict[str, Any],
                 transposed: list[str]) -> None:
        snap = self.snapshot
        if snap is not None and snap.needs_block(index, self.n_blocks):
            mine = f"{self.prefix}.{index}."
            snap.save_block(index, block, {k: v for k, v in masks.items() if k.startswith(mine)},
                            [k for k in transposed if k.startswith(mine)])
            if snap.due(index + 1, self.n_blocks):
                snap.commit(index + 1, self.n_blocks, hidden, layers, transposed)
        if self.kill and index + 1 == self.kill:
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
