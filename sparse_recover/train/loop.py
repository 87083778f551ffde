"""The training loop on accelerate, the deterministic batch plan, and the LoRS gradient pass.

Only adapter parameters train; the sparse base is frozen. The data order is a pure function of the
seed and the step: step k uses epoch k // steps_per_epoch, whose order is a seeded permutation, and
the global batch of `batch_size` sequences is cut into micro-batches that processes take in turn.
So a run on P processes sees exactly the batches a 1-process run sees (same global batch), and a
resumed run continues with the very next batch. Gradient accumulation sums micro-batch mean losses
divided by the number of micro-batches; DDP averages across processes: the same gradient.

Checkpoints (every `save_every` steps and at the end; see `state`) make the run resumable.
A non-finite loss or gradient norm stops the run with a NumericalError; the last good checkpoint
stays.
"""

from __future__ import annotations

import math
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch

from sparse_recover.errors import ConfigError, NumericalError
from sparse_recover.train.schedule import build_scheduler
from sparse_recover.train.state import Progress, latest_checkpoint, load_checkpoint, save_checkpoint

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
    shard: str = "none"  # "fsdp": FSDP2 over the launched processes (train/shard.py)


@dataclass
class TrainResult:
    steps: int
    tokens: int
    wall_time_s: float
    history: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: int | None = None
    shard: dict[str, Any] = field(default_factory=dict)


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


def device_batch(examples, indices: list[int], pad_id: int, device) -> dict[str, torch.Tensor]:
    """`pad_batch` of `examples[i] for i in indices`, on `device`."""
    return {k: v.to(device) for k, v in pad_batch([examples[i] for i in indices], pad_id).items()}


def consecutive_chunks(n: int, size: int) -> list[list[int]]:
    """0..n-1 cut into consecutive runs of `size` (the last one may be shorter)."""
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


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


# ------------------------------------------------------------------------------------------------ loop


def train(model, adapters: dict[str, Any], data, settings: TrainSettings, accelerator, *, pad_id: int,
          work_dir: Path, resume: bool = False, describe: str = "finetune",
          on_checkpoint: Callable[[Path], None] | None = None, distiller=None) -> TrainResult:
    trainer = Trainer(model, adapters, data, settings, accelerator, pad_id=pad_id, work_dir=work_dir,
                      on_checkpoint=on_checkpoint, distiller=distiller)
    try:
        if resume:
            trainer.resume()
        result = trainer.run(describe)
        result.shard = trainer.shard_info
        return result
    finally:
        trainer.close()


class Trainer:
    """One fine-tuning run: optimizer, schedule and batch plan are built once; `run` trains to the end."""

    def __init__(self, model, adapters: dict[str, Any], data, settings: TrainSettings, accelerator, *, pad_id: int,
                 work_dir: Path, on_checkpoint: Callable[[Path], None] | None = None, distiller=None):
        from sparse_recover.adapters.model import trainable_parameters

        self.model, self.adapters, self.data, self.s = model, adapters, data, settings
        self.distiller = distiller  # train.distill.Distiller: the loss becomes (1 - a) CE + a KD
        self.step_parts: dict[str, float] = {}
        self.acc, self.pad_id, self.work_dir, self.on_checkpoint = accelerator, pad_id, work_dir, on_checkpoint
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        self.plan = BatchPlan(len(data.train), settings, self.world, self.rank)
        self.total = self.plan.total_steps
        self.shard_group = None
        self.sharded = settings.shard == "fsdp"
        self.shard_info: dict[str, Any] = {}
        if self.sharded:  # before the optimizer: fully_shard replaces every parameter by its DTensor shard
            self.shard_info = self._shard()
        self.params = trainable_parameters(adapters)
        optimizer = torch.optim.AdamW(self.params, lr=settings.lr, weight_decay=settings.weight_decay)
        self.scheduler = build_scheduler(optimizer, settings.scheduler, self.total,
                                         math.ceil(self.total * settings.warmup_ratio), settings.min_lr / settings.lr)
        if settings.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        model.train()
        if self.sharded:  # accelerate would wrap the model in DDP: the sharded model trains as it is
            self.wrapped, self.optimizer = model, optimizer
        else:
            self.wrapped, self.optimizer = accelerator.prepare(model, optimizer)
        self.progress = Progress()
        self.resumed_from: int | None = None

    def _shard(self) -> dict[str, Any]:
        """fully_shard the model (train/shard.py); what each process holds of the decoder blocks."""
        from sparse_recover.train.shard import ShardGroup, check_shard, decoder_bytes, shard_model

        check_shard("fsdp")
        self.shard_group = ShardGroup(self.acc.device, self.world)
        units = shard_model(self.model, self.shard_group)
        local, total = decoder_bytes(self.model)
        held = [int(b) for b in self.acc.gather(torch.tensor([local], device=self.acc.device)).cpu().tolist()]
        return {"kind": "fsdp2", "processes": self.shard_group.world, "units": len(units),
                "decoder_bytes": total, "decoder_bytes_per_process": held}

    def close(self) -> None:
        if self.shard_group is not None:
            self.shard_group.close()

    def resume(self) -> None:
        ckpt = latest_checkpoint(self.work_dir)
        if ckpt is None:
            raise ConfigError(f"--resume: no checkpoint in {self.work_dir}")
        self.progress = load_checkpoint(ckpt, self.rank, adapters=self.adapters, optimizer=self.optimizer,
                                        scheduler=self.scheduler, sharded=self.sharded)
        self.resumed_from = self.progress.step

    def run(self, describe: str) -> TrainResult:
        from sparse_recover.runtime import progress

        if self.acc.is_main_process:
            self.work_dir.mkdir(parents=True, exist_ok=True)
        kill_after = int(os.environ.get(KILL_ENV, "0") or 0)
        bar = progress(self.total, describe, unit="step") if self.acc.is_main_process else None
        if bar is not None:
            bar.update(self.progress.step)
        meter = _Throughput(self.progress.tokens)
        try:
            for step in range(self.progress.step, self.total):
                self.train_step(step, bar, meter)
                if kill_after and step + 1 == kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
        finally:
            if bar is not None:
                bar.close()
            if self.s.gradient_checkpointing:
                self.model.gradient_checkpointing_disable()
            self.model.eval()
        p = self.progress
        return TrainResult(steps=self.total, tokens=p.tokens, wall_time_s=meter.elapsed(), history=p.history,
                           evals=p.evals, resumed_from=self.resumed_from)

    def train_step(self, step: int, bar, meter: _Throughput) -> None:
        """Optimizer step `step` (0-based): forward/backward, update, log, and evaluate / save when due."""
        mean_loss, gnorm, step_tokens = self.accumulate(step)
        self.check_finite(step, mean_loss, gnorm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        p = self.progress
        p.tokens += int(self.acc.reduce(torch.tensor(step_tokens, device=self.acc.device), "sum"))
        p.step = done = step + 1
        record = {"step": done, "loss": round(mean_loss, 6), "lr": self.scheduler.get_last_lr()[0],
                  "grad_norm": round(gnorm, 6), "tokens": p.tokens, **self.step_parts}
        p.history.append(record)
        if self.acc.log_with:  # accelerate's trackers (--report-to); the main process writes
            self.acc.log({"train/loss": mean_loss, "train/lr": record["lr"], "train/grad_norm": gnorm,
                          "train/tokens_per_s": float(meter.rate(p.tokens)),
                          **{f"train/{k}": v for k, v in self.step_parts.items()}}, step=done)
        if bar is not None:
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{record['lr']:.2e}", tok_s=meter.rate(p.tokens))
            bar.update(1)
        if done % self.s.eval_every == 0 or done == self.total:
            p.evals.append({"step": done, **self.evaluate()})
            if self.acc.log_with:
                self.acc.log({"eval/loss": p.evals[-1]["eval_loss"], "eval/ppl": p.evals[-1]["eval_ppl"]}, step=done)
            if bar is not None:
                bar.write(f"step {done}: eval loss {p.evals[-1]['eval_loss']:.4f} (ppl {p.evals[-1]['eval_ppl']:.3f})")
        if done % self.s.save_every == 0 or done == self.total:
            save_checkpoint(self.acc, self.work_dir, p, total=self.total, adapters=self.adapters,
                            optimizer=self.optimizer, scheduler=self.scheduler, on_checkpoint=self.on_checkpoint,
                            sharded=self.sharded)

    def accumulate(self, step: int) -> tuple[float, float, int]:
        """Gradients of step `step` summed over this process's micro-batches, then clipped:
        (mean loss over processes, gradient norm or 0, this process's tokens)."""
        acc = self.acc
        micro = self.plan.micro_batches(step)
        step_loss = torch.zeros((), dtype=torch.float64, device=acc.device)
        step_tokens = 0
        parts: dict[str, torch.Tensor] = {}
        for j, chunk in enumerate(micro):
            batch = device_batch(self.data.train, chunk, self.pad_id, acc.device)
            step_tokens += int(batch["attention_mask"].sum())
            sync = j == len(micro) - 1
            if self.sharded:  # FSDP2: reduce-scatter the gradients only after the last micro-batch
                self.wrapped.set_requires_gradient_sync(sync)
                ctx = nullcontext()
            else:
                ctx = acc.no_sync(self.wrapped) if (not sync and self.world > 1) else nullcontext()
            with ctx, acc.autocast():
                if self.distiller is None:
                    loss = self.wrapped(**batch, use_cache=False).loss / len(micro)
                else:
                    loss, terms = self.distiller.loss(self.wrapped, batch)
                    loss = loss / len(micro)
                    for k, v in terms.items():
                        parts[k] = parts.get(k, 0.0) + v.double() / len(micro)
                if self.sharded:
                    loss.backward()
                else:
                    acc.backward(loss)
            step_loss += loss.detach().double()
        grad_norm = None
        if self.s.max_grad_norm is not None:
            if self.sharded:  # the norm of the sharded gradients (all-reduced), as one replicated value
                from sparse_recover.train.shard import full

                grad_norm = full(torch.nn.utils.clip_grad_norm_(self.params, self.s.max_grad_norm))
            else:
                grad_norm = acc.clip_grad_norm_(self.params, self.s.max_grad_norm)
        mean_loss = float(acc.reduce(step_loss, "mean"))
        self.step_parts = {k: round(float(acc.reduce(v, "mean")), 6) for k, v in parts.items()}  # distillation terms
        return mean_loss, float(grad_norm) if grad_norm is not None else 0.0, step_tokens

    def check_finite(self, step: int, mean_loss: float, gnorm: float) -> None:
        if math.isfinite(mean_loss) and math.isfinite(gnorm):
            return
        good = latest_checkpoint(self.work_dir)
        where = f"the last good checkpoint is {good}" if good else "no checkpoint was written yet"
        what = "non-finite" if not math.isfinite(mean_loss) else "finite but the gradient is not"
        raise NumericalError(f"training loss became {what} at step {step + 1} (loss {mean_loss}, grad norm {gnorm}); "
                             f"{where}: lower the learning rate and run again with --resume")

    def evaluate(self) -> dict[str, Any]:
        """Token-weighted loss on the held-out set (the first `eval_batches` micro-batches), all processes."""
        acc, val = self.acc, self.data.val
        self.model.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=acc.device)
        count = torch.zeros((), dtype=torch.float64, device=acc.device)
        chunks = consecutive_chunks(len(val), self.s.micro_batch_size)
        if self.s.eval_batches is not None:
            chunks = chunks[: self.s.eval_batches]
        rounds = math.ceil(len(chunks) / self.world)
        with torch.no_grad():
            for j in range(rounds * self.world if self.sharded else len(chunks)):
                if j % self.world != self.rank:
                    continue
                # sharded: every process runs as many forwards (each all-gathers); a process without a
                # chunk in the last round runs the first one again and discards it
                idle = j >= len(chunks)
                batch = device_batch(val, chunks[0 if idle else j], self.pad_id, acc.device)
                out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
                if idle:
                    continue
                logits = out.logits[:, :-1].float()
                labels = batch["labels"][:, 1:]
                ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                       ignore_index=-100, reduction="sum")
                loss_sum += ce.double()
                count += (labels != -100).sum().double()
        loss_sum = acc.reduce(loss_sum, "sum")
        count = acc.reduce(count, "sum")
        self.model.train()
        loss = float(loss_sum / count.clamp_min(1))
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": int(count)}


class _Throughput:
    """Wall time since the run (re)started and tokens per second over it, for the progress bar."""

    def __init__(self, tokens_at_start: int):
        self.t0 = time.perf_counter()
        self.tokens_at_start = tokens_at_start

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def rate(self, tokens: int) -> str:
        return f"{(tokens - self.tokens_at_start) / max(self.elapsed(), 1e-9):.0f}"


# ------------------------------------------------------------------------------------------------ LoRS init


class _HostGradientSums:
    """Target of post-accumulate-grad hooks: moves each weight's gradient to the host as it arrives,
    adds it to that weight's running sum (as (out, in)) and frees it on the device."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, param, *, name: str, conv: bool) -> None:
        g = param.grad.detach().float()
        g = (g.t() if conv else g).to("cpu")
        self.sums[name] = self.sums[name].add_(g) if name in self.sums else g.clone()
        param.grad = None


def weight_gradients(model, targets: dict[str, Any], examples, micro_batch_size: int, pad_id: int,
                     accelerator, device=None) -> dict[str, torch.Tensor]:
    """Mean gradient of the training loss w.r.t. each targeted (out, in) weight over `examples`.

    Gradients leave the accelerator as they are produced (post-accumulate hooks move them to the
    host and free them), so the peak is about one layer's gradient on top of the forward/backward.
    """
    from sparse_recover.models import is_conv1d, weight_2d

    world, rank = accelerator.num_processes, accelerator.process_index
    sink = _HostGradientSums()
    hooks = []
    for p in model.parameters():  # only the targeted weights get gradients (the model stays frozen)
        p.requires_grad_(False)
    for name, mod in targets.items():
        mod.weight.requires_grad_(True)
        hooks.append(mod.weight.register_post_accumulate_grad_hook(partial(sink.add, name=name, conv=is_conv1d(mod))))
    model.config.use_cache = False
    chunks = consecutive_chunks(len(examples), micro_batch_size)
    try:
        for j, chunk in enumerate(chunks):
            if j % world != rank:
                continue
            batch = device_batch(examples, chunk, pad_id, device or accelerator.device)
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
        g = sink.sums.get(name)
        if g is None:
            g = torch.zeros(tuple(weight_2d(targets[name]).shape))
        if world > 1:
            g = accelerator.reduce(g.to(accelerator.device), "sum").cpu()
        out[name] = g / len(chunks)
    return out
