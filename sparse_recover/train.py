"""One training loop on accelerate for every adapter.

Only adapter parameters train; the sparse base is frozen. The data order is a pure function of the
seed and the step: step k uses epoch k // steps_per_epoch, whose order is a seeded permutation, and
the global batch of `batch_size` sequences is cut into micro-batches that processes take in turn.
So a run on P processes sees exactly the batches a 1-process run sees (same global batch), and a
resumed run continues with the very next batch. Gradient accumulation sums micro-batch mean losses
divided by the number of micro-batches; DDP averages across processes: the same gradient.

Checkpoints (every `save_every` steps, atomically, the newest two kept) hold the adapter weights,
the optimizer and scheduler state, the step, the loss history and every process's RNG state.
A non-finite loss or gradient norm stops the run with a NumericalError; the last good checkpoint
stays.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from sparse_recover.errors import ConfigError, NumericalError

CHECKPOINT_PREFIX = "checkpoint-"
KILL_ENV = "SPARSE_RECOVER_KILL_AFTER_STEP"  # fault injection for tests: SIGKILL after this step


@dataclass
class TrainSettings:
    lr: float
    min_lr: float = 0.0
    weight_decay: float = 0.001
    warmup_ratio: float = 0.03
    scheduler: str = "linear"
    max_grad_norm: float | None = 1.0
    batch_size: int = 16
    micro_batch_size: int = 4
    epochs: float = 1.0
    max_steps: int | None = None
    seed: int = 42
    eval_every: int = 200
    eval_batches: int | None = None
    save_every: int = 200
    log_every: int = 10
    gradient_checkpointing: bool = False


@dataclass
class TrainResult:
    steps: int
    tokens: int
    wall_time_s: float
    history: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: int | None = None


# ------------------------------------------------------------------------------------------------ schedule


def lr_factor(step: int, total: int, warmup: int, kind: str, floor: float) -> float:
    """Multiplier of the peak lr after `step` optimizer steps: linear warmup, then linear / cosine decay
    to `floor` (= min_lr / lr), or constant (HF's schedules when floor = 0)."""
    if warmup and step < warmup:
        return step / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    progress = min(max(progress, 0.0), 1.0)
    decay = 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return floor + (1.0 - floor) * decay


# ------------------------------------------------------------------------------------------------ batches


def pad_batch(examples: list[tuple[list[int], list[int]]], pad_id: int, multiple: int = 8) -> dict[str, torch.Tensor]:
    """Right-pad to a multiple of 8 (labels -100 on padding)."""
    longest = max(len(ids) for ids, _ in examples)
    width = ((longest + multiple - 1) // multiple) * multiple
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class BatchPlan:
    def __init__(self, n_train: int, settings: TrainSettings, world: int, rank: int):
        if settings.batch_size % (settings.micro_batch_size * world):
            raise ConfigError(f"batch_size {settings.batch_size} must be a multiple of micro_batch_size "
                              f"{settings.micro_batch_size} x {world} process(es)")
        if n_train < settings.batch_size:
            raise ConfigError(f"the training set has {n_train} examples, fewer than one batch of "
                              f"{settings.batch_size}: lower batch_size or add data")
        self.n = n_train
        self.s = settings
        self.world, self.rank = world, rank
        self.steps_per_epoch = n_train // settings.batch_size
        self.total_steps = settings.max_steps or max(1, math.ceil(settings.epochs * self.steps_per_epoch))
        self.micro_per_step = settings.batch_size // settings.micro_batch_size
        self._perms: dict[int, list[int]] = {}

    def order(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.s.seed * 1000003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=gen).tolist()}
        return self._perms[epoch]

    def micro_batches(self, step: int) -> list[list[int]]:
        """This process's micro-batches (example indices) for optimizer step `step` (0-based)."""
        epoch, offset = divmod(step, self.steps_per_epoch)
        idx = self.order(epoch)[offset * self.s.batch_size : (offset + 1) * self.s.batch_size]
        mb = self.s.micro_batch_size
        chunks = [idx[i : i + mb] for i in range(0, len(idx), mb)]
        return [c for j, c in enumerate(chunks) if j % self.world == self.rank]


# ------------------------------------------------------------------------------------------------ checkpoints


def latest_checkpoint(work_dir: Path) -> Path | None:
    if not work_dir.is_dir():
        return None
    done = []
    for p in work_dir.iterdir():
        if p.name.startswith(CHECKPOINT_PREFIX) and (p / "state.json").is_file():
            try:
                done.append((int(p.name[len(CHECKPOINT_PREFIX):]), p))
            except ValueError:
                continue
    return max(done)[1] if done else None


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------ loop


def train(model, adapters: dict[str, Any], data, settings: TrainSettings, accelerator, *, pad_id: int,
          work_dir: Path, resume: bool = False, describe: str = "finetune",
          on_checkpoint: Callable[[Path], None] | None = None) -> TrainResult:
    from safetensors.torch import load_file, save_file

    from sparse_recover.adapters.model import adapter_state_dict, load_adapter_state, trainable_parameters
    from sparse_recover.runtime import progress

    world, rank = accelerator.num_processes, accelerator.process_index
    plan = BatchPlan(len(data.train), settings, world, rank)
    total = plan.total_steps
    warmup = math.ceil(total * settings.warmup_ratio)
    params = trainable_parameters(adapters)
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    floor = settings.min_lr / settings.lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, warmup, settings.scheduler, floor))
    if settings.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    wrapped, optimizer = accelerator.prepare(model, optimizer)

    start_step, tokens, history, evals, resumed_from = 0, 0, [], [], None
    if resume:
        ckpt = latest_checkpoint(work_dir)
        if ckpt is None:
            raise ConfigError(f"--resume: no checkpoint in {work_dir}")
        state = json.loads((ckpt / "state.json").read_text())
        load_adapter_state(adapters, load_file(str(ckpt / "adapter.safetensors")))
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=False))
        scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", map_location="cpu", weights_only=False))
        rng_file = ckpt / f"rng-{rank}.pt"
        if rng_file.is_file():
            _set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
        start_step, tokens = state["step"], state["tokens"]
        history, evals = state.get("history", []), state.get("evals", [])
        resumed_from = start_step

    def evaluate() -> dict[str, Any]:
        model.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        count = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        mb = settings.micro_batch_size
        chunks = [list(range(i, min(i + mb, len(data.val)))) for i in range(0, len(data.val), mb)]
        if settings.eval_batches is not None:
            chunks = chunks[: settings.eval_batches]
        with torch.no_grad():
            for j, chunk in enumerate(chunks):
                if j % world != rank:
                    continue
                batch = {k: v.to(accelerator.device) for k, v in pad_batch([data.val[i] for i in chunk], pad_id).items()}
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
                logits = out.logits[:, :-1].float()
                labels = batch["labels"][:, 1:]
                ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                       ignore_index=-100, reduction="sum")
                loss_sum += ce.double()
                count += (labels != -100).sum().double()
        loss_sum = accelerator.reduce(loss_sum, "sum")
        count = accelerator.reduce(count, "sum")
        model.train()
        loss = float(loss_sum / count.clamp_min(1))
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": int(count)}

    def save_checkpoint(step: int) -> None:
        accelerator.wait_for_everyone()
        target = work_dir / f"{CHECKPOINT_PREFIX}{step}"
        tmp = work_dir / f".{CHECKPOINT_PREFIX}{step}.tmp"
        if accelerator.is_main_process:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        torch.save(_rng_state(), tmp / f"rng-{rank}.pt")
        if accelerator.is_main_process:
            save_file(adapter_state_dict(adapters), str(tmp / "adapter.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / "state.json").write_text(json.dumps(
                {"step": step, "tokens": tokens, "total_steps": total, "world_size": world,
                 "history": history, "evals": evals}, indent=1))
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
            done = sorted((int(p.name[len(CHECKPOINT_PREFIX):]), p) for p in work_dir.iterdir()
                          if p.name.startswith(CHECKPOINT_PREFIX) and p.name[len(CHECKPOINT_PREFIX):].isdigit())
            for _, old in done[:-2]:
                shutil.rmtree(old, ignore_errors=True)
            if on_checkpoint is not None:
                on_checkpoint(target)
        accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        work_dir.mkdir(parents=True, exist_ok=True)
    kill_after = int(os.environ.get(KILL_ENV, "0") or 0)
    bar = progress(total, describe) if accelerator.is_main_process else None
    if bar is not None:
        bar.unit = "step"
    if bar is not None:
        bar.update(start_step)
    t0 = time.perf_counter()
    tokens_at_start = tokens
    try:
        for step in range(start_step, total):
            micro = plan.micro_batches(step)
            step_loss = torch.zeros((), dtype=torch.float64, device=accelerator.device)
            step_tokens = 0
            for j, chunk in enumerate(micro):
                batch = {k: v.to(accelerator.device) for k, v in pad_batch([data.train[i] for i in chunk], pad_id).items()}
                step_tokens += int(batch["attention_mask"].sum())
                sync = j == len(micro) - 1
                ctx = accelerator.no_sync(wrapped) if (not sync and world > 1) else _null()
                with ctx, accelerator.autocast():
                    out = wrapped(**batch, use_cache=False)
                    loss = out.loss / len(micro)
                    accelerator.backward(loss)
                step_loss += loss.detach().double()
            grad_norm = None
            if settings.max_grad_norm is not None:
                grad_norm = accelerator.clip_grad_norm_(params, settings.max_grad_norm)
            mean_loss = float(accelerator.reduce(step_loss, "mean"))
            gnorm = float(grad_norm) if grad_norm is not None else 0.0
            if not math.isfinite(mean_loss) or not math.isfinite(gnorm):
                good = latest_checkpoint(work_dir)
                where = f"the last good checkpoint is {good}" if good else "no checkpoint was written yet"
                raise NumericalError(
                    f"training loss became {'non-finite' if not math.isfinite(mean_loss) else 'finite but the gradient is not'} "
                    f"at step {step + 1} (loss {mean_loss}, grad norm {gnorm}); {where}: lower the learning rate "
                    "and run again with --resume")
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            tok = torch.tensor(step_tokens, device=accelerator.device)
            tokens += int(accelerator.reduce(tok, "sum"))
            done = step + 1
            record = {"step": done, "loss": round(mean_loss, 6), "lr": scheduler.get_last_lr()[0],
                      "grad_norm": round(gnorm, 6), "tokens": tokens}
            history.append(record)
            if bar is not None:
                elapsed = max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{record['lr']:.2e}",
                                tok_s=f"{(tokens - tokens_at_start) / elapsed:.0f}")
                bar.update(1)
            if done % settings.eval_every == 0 or done == total:
                evals.append({"step": done, **evaluate()})
                if bar is not None:
                    bar.write(f"step {done}: eval loss {evals[-1]['eval_loss']:.4f} "
                              f"(ppl {evals[-1]['eval_ppl']:.3f})")
            if done % settings.save_every == 0 or done == total:
                save_checkpoint(done)
            if kill_after and done == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
    finally:
        if bar is not None:
            bar.close()
        if settings.gradient_checkpointing:
            model.gradient_checkpointing_disable()
        model.eval()
    wall = time.perf_counter() - t0
    return TrainResult(steps=total, tokens=tokens, wall_time_s=wall, history=history, evals=evals,
                       resumed_from=resumed_from)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ------------------------------------------------------------------------------------------------ LoRS init


def weight_gradients(model, targets: dict[str, Any], examples, micro_batch_size: int, pad_id: int,
                     accelerator) -> dict[str, torch.Tensor]:
    """Mean gradient of the training loss w.r.t. each targeted (out, in) weight over `examples`.

    Gradients leave the accelerator as they are produced (post-accumulate hooks move them to the
    host and free them), so the peak is about one layer's gradient on top of the forward/backward.
    """
    from sparse_recover.models import is_conv1d

    world, rank = accelerator.num_processes, accelerator.process_index
    sums: dict[str, torch.Tensor] = {}
    hooks = []
    for p in model.parameters():  # only the targeted weights get gradients (the model stays frozen)
        p.requires_grad_(False)
    for name, mod in targets.items():
        p = mod.weight
        p.requires_grad_(True)
        conv = is_conv1d(mod)

        def hook(param, name=name, conv=conv):
            g = param.grad.detach().float()
            g = (g.t() if conv else g).to("cpu")
            sums[name] = sums[name].add_(g) if name in sums else g.clone()
            param.grad = None

        hooks.append(p.register_post_accumulate_grad_hook(hook))
    model.config.use_cache = False
    chunks = [list(range(i, min(i + micro_batch_size, len(examples)))) for i in range(0, len(examples), micro_batch_size)]
    try:
        for j, chunk in enumerate(chunks):
            if j % world != rank:
                continue
            batch = {k: v.to(accelerator.device) for k, v in pad_batch([examples[i] for i in chunk], pad_id).items()}
            with accelerator.autocast():
                loss = model(**batch, use_cache=False).loss
            loss.backward()
    finally:
        for h in hooks:
            h.remove()
        for mod in targets.values():
            mod.weight.requires_grad_(False)
            mod.weight.grad = None
    out = {}
    for name in targets:
        g = sums.get(name)
        if g is None:
            from sparse_recover.models import weight_2d

            g = torch.zeros(tuple(weight_2d(targets[name]).shape))
        if world > 1:
            g = accelerator.reduce(g.to(accelerator.device), "sum").cpu()
        out[name] = g / len(chunks)
    return out
