"""Layer-wise calibration engine: capture, collect statistics per block, prune, propagate.

1. Capture. A forward pass per batch of calibration windows runs with every decoder block's forward
   temporarily replaced by a recorder: it stores the hidden state entering block 0 and, for every
   block, the positional and keyword arguments the model passes to it (position_embeddings,
   attention_mask possibly None, cache_position, per-layer-type masks as in Gemma-3 / Qwen2 sliding
   layers, ...). Recorders pass the hidden state through unchanged, and the last one stops the
   forward, so the capture costs the embeddings only.
2. For each block in order: register pre-hooks on its linears, run every batch through it and
   accumulate only the statistic the method declares (float32 running means). Linears that receive
   the same input tensor (q/k/v, gate/up) share one statistic. All sublayers of a block see inputs
   from the dense block, as in the reference.
3. The caller's `process_block` prunes the block.
4. Propagate: the pruned block's outputs become the next block's inputs (reference protocol,
   `propagate="pruned"`), or the dense block's outputs (`propagate="dense"`, computed in step 2).

With `offload=True` the model stays on the CPU and only the current block moves to the device, so
one accelerator handles a model larger than its memory. Hooks, forwards, `use_cache` and devices are
restored in `finally`, also when a pruner raises.

Resuming (engine/snapshot.py): `start` skips the blocks already finished (their weights are back in the
model), and `resume_hidden`, the stored inputs of block `start` for all windows, replaces the captured
block-0 inputs; the call arguments are captured again, which is exact because pruning never changes what
comes before the first block. `after_block(i, block, hidden)` sees every finished block with the inputs
of the next one (a snapshot point); for the last block `hidden` is None: its outputs feed nothing, so they
are not computed.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
import torch.nn as nn

from sparse_recover.models import decoder_blocks, in_features, prunable_linears
from sparse_recover.sparsity.stats import STATISTICS, Statistic

Propagate = Literal["pruned", "dense"]


class _StopForward(Exception):
    """Raised by the last recorder to end a capture forward pass early."""


@dataclass
class BlockInputs:
    hidden: list[torch.Tensor]  # one tensor (b, L, d) per batch, the current block's inputs
    call_args: list[list[tuple[tuple, dict]]]  # [batch][block] -> (positional args after hidden, kwargs)


@dataclass
class BlockContext:
    index: int
    block: nn.Module
    linears: dict[str, nn.Module]  # name relative to the block -> module
    groups: list[list[str]]  # linears sharing one input (first one owns the statistic)
    stats: dict[str, Statistic] = field(default_factory=dict)  # owner name -> statistic
    prefix: str = ""  # dotted name of the block in the model


def _block_out(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@contextlib.contextmanager
def calibration_mode(model: nn.Module, device: torch.device, offload: bool):
    """Place the model for layer-wise work and undo every change afterwards."""
    blocks_name, blocks = decoder_blocks(model)
    use_cache = getattr(model.config, "use_cache", None)
    was_training = model.training
    orig_device = next(model.parameters()).device
    model.config.use_cache = False
    model.eval()
    try:
        if offload and device.type != "cpu":
            parent_name, _, attr = blocks_name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, nn.ModuleList())
            try:
                model.to(device)
            finally:
                setattr(parent, attr, blocks)
            blocks.to("cpu")
        else:
            model.to(device)
        yield blocks_name, blocks
    finally:
        model.to(orig_device)
        if use_cache is not None:
            model.config.use_cache = use_cache
        model.train(was_training)


def _move(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_move(o, device) for o in obj)
    if isinstance(obj, list):
        return [_move(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_inputs(model: nn.Module, blocks: nn.ModuleList, windows: torch.Tensor, device: torch.device,
                   batch_size: int) -> BlockInputs:
    """Run the calibration windows up to the first block, recording every block's call arguments."""
    hidden: list[torch.Tensor] = []
    call_args: list[list[tuple[tuple, dict]]] = []
    n_blocks = len(blocks)
    current: list[tuple[tuple, dict]] = []

    def recorder(i: int):
        def forward(*args, **kwargs):
            if i == 0:
                hidden.append(args[0].detach())
            current.append((tuple(args[1:]), dict(kwargs)))
            if i == n_blocks - 1:
                raise _StopForward
            return args[0]

        return forward

    for i, block in enumerate(blocks):
        block.forward = recorder(i)  # instance attribute shadows the class method
    try:
        for start in range(0, windows.shape[0], batch_size):
            current = []
            batch = windows[start : start + batch_size].to(device)
            try:
                model(input_ids=batch, use_cache=False)
            except _StopForward:
                pass
            if len(current) != n_blocks:
                raise RuntimeError(f"captured {len(current)} of {n_blocks} decoder blocks: unsupported model forward")
            call_args.append(current)
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)

    return BlockInputs(hidden=hidden, call_args=call_args)


class _StopBlock(Exception):
    """Raised by the statistics hook of a block's last linear once the rest of the forward is not needed."""


class _StatCollector:
    """Pre-hooks that accumulate one statistic per distinct input tensor of the block's linears.

    During the first batch, a linear whose input is the very tensor object another linear already
    received (q/k/v, gate/up) is marked as sharing that linear's statistic; afterwards only owners
    accumulate.

    With `stop_early` (the block's outputs of this pass are not kept), from the second batch on the
    forward ends right after the last linear's input is recorded: the last linear's matmul and what
    follows it (down_proj and the residual in a LLaMA block) are skipped. The statistics are the same
    bits. Only when the first batch called every linear, in an order that then fixes the last one.
    """

    def __init__(self, linears: dict[str, nn.Module], stat_cls: type[Statistic], device: torch.device,
                 stop_early: bool = False):
        self.linears = linears
        self.stat_cls = stat_cls
        self.device = device
        self.owner: dict[str, str] = {}
        self.stats: dict[str, Statistic] = {}
        self._seen: dict[int, tuple[torch.Tensor, str]] = {}
        self._order: list[str] = []
        self._stop_early = stop_early
        self._last: str | None = None
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in linears.items()]

    def _hook(self, name: str):
        def pre(_module, args):
            if name == self._last:
                if self.owner[name] == name:
                    self.stats[name].add(args[0])
                raise _StopBlock
            x = args[0]
            if self._stop_early:
                self._order.append(name)
            owner = self.owner.get(name)
            if owner is None:
                hit = self._seen.get(id(x))
                if hit is not None and hit[0] is x:
                    self.owner[name] = hit[1]
                    return
                self.owner[name] = owner = name
                self._seen[id(x)] = (x, name)
                self.stats[name] = self.stat_cls(in_features(self.linears[name]), self.device)
            if owner == name:
                self.stats[name].add(x)

        return pre

    def first_batch_done(self) -> None:
        self._seen.clear()  # drop the references that kept input tensors alive
        if self._stop_early and len(self._order) == len(set(self._order)) == len(self.linears):
            self._last = self._order[-1]
        self._stop_early = False
        self._order = []

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._seen.clear()

    def groups(self) -> list[list[str]]:
        """Linears sharing one statistic, the owner (first called) first, the rest in module order."""
        groups: dict[str, list[str]] = {}
        for name in self.linears:  # linears never called form their own group
            owner = self.owner.get(name, name)
            groups.setdefault(owner, [owner])
            if name != owner:
                groups[owner].append(name)
        return list(groups.values())


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs, index: int, device: torch.device,
              store_outputs: bool, after_first: Callable[[], None] | None = None) -> None:
    """Run every batch through one block; with store_outputs, each batch's output replaces its input."""
    for b, x in enumerate(inputs.hidden):
        args, kwargs = inputs.call_args[b][index]
        try:
            out = _block_out(block(x.to(device), *_move(args, device), **_move(kwargs, device)))
        except _StopBlock:  # a statistics pass whose outputs are not needed (_StatCollector stop_early)
            out = None
        if store_outputs:
            inputs.hidden[b] = out.to(x.device, x.dtype)
        del out
        if b == 0 and after_first is not None:
            after_first()


@torch.no_grad()
def layerwise(
    model: nn.Module,
    windows: torch.Tensor,
    process_block: Callable[[BlockContext], None],
    *,
    statistic: str | None,
    device: torch.device,
    offload: bool = False,
    batch_size: int = 1,
    propagate: Propagate = "pruned",
    progress: Callable[[int], Any] | None = None,
    start: int = 0,
    resume_hidden: torch.Tensor | None = None,
    after_block: Callable[[int, nn.Module, list[torch.Tensor]], Any] | None = None,
) -> None:
    """Drive `process_block` over every decoder block with the calibration windows (from block `start`,
    whose inputs are `resume_hidden` when start > 0)."""
    stat_cls = STATISTICS[statistic] if statistic else None
    with calibration_mode(model, device, offload) as (blocks_name, blocks):
        if start >= len(blocks):
            return
        inputs = capture_inputs(model, blocks, windows, device, batch_size)
        if start > 0:
            restore_hidden(inputs, resume_hidden)
        for i, block in enumerate(blocks):
            if i < start:
                continue
            if offload:
                block.to(device)
            try:
                linears = prunable_linears(block)
                collector = (_StatCollector(linears, stat_cls, device, stop_early=(propagate != "dense"))
                             if stat_cls is not None else None)
                try:
                    if collector is not None or propagate == "dense":
                        run_block(block, inputs, i, device, store_outputs=(propagate == "dense"),
                                  after_first=collector.first_batch_done if collector else None)
                finally:
                    if collector is not None:
                        collector.remove()
                ctx = BlockContext(index=i, block=block, linears=linears, prefix=f"{blocks_name}.{i}",
                                   groups=collector.groups() if collector else [[n] for n in linears],
                                   stats=collector.stats if collector else {})
                process_block(ctx)
                ctx.stats = {}
                del collector
                last = i == len(blocks) - 1
                if propagate == "pruned" and not last:  # the last block's outputs feed nothing
                    run_block(block, inputs, i, device, store_outputs=True)
            finally:
                if offload:
                    block.to("cpu")
            if after_block is not None:
                after_block(i, block, None if last else inputs.hidden)
            if progress is not None:
                progress(i)


def restore_hidden(inputs: BlockInputs, hidden: torch.Tensor | None) -> None:
    """Replace the captured block inputs by stored ones (all windows, in order), batched as captured."""
    if hidden is None:
        raise ValueError("resuming a layer-wise pass needs the stored inputs of its first block")
    total = sum(h.shape[0] for h in inputs.hidden)
    if hidden.shape[0] != total or tuple(hidden.shape[1:]) != tuple(inputs.hidden[0].shape[1:]):
        raise ValueError(f"stored block inputs {tuple(hidden.shape)} do not fit the calibration windows "
                         f"({total} x {tuple(inputs.hidden[0].shape[1:])})")
    at = 0
    for b, h in enumerate(inputs.hidden):
        n = h.shape[0]
        inputs.hidden[b] = hidden[at:at + n].to(h.device, h.dtype).contiguous()
        at += n
