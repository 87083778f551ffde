"""FSDP2 sharding of the frozen sparse base for fine-tuning (`torch.distributed.fsdp.fully_shard`).

`finetune --shard fsdp` (YAML `finetune.shard: fsdp`) shards every parameter of the model, the frozen
sparse base and the adapters alike, over the launched processes: one FSDP unit per decoder block plus
the root (embeddings, final norm, head). Each process keeps 1/P of every weight between uses; a block's
weights are all-gathered for its forward and again for its backward, then freed.

Why the project applies `fully_shard` itself: accelerate (1.15) enables FSDP only on GPUs (on the CPU it
falls back to DDP over gloo) and its wrapping policies know nothing of adapters. So accelerate (or
`torch.distributed.run`) launches the processes and sets up the process group, and this module shards,
on the CPU and on GPUs alike: one code path, which the CPU tests exercise with gloo.

- dtypes: the frozen base stays in the model's dtype (bf16 on GPUs), the adapters and their optimizer
  state in float32 (master weights); the adapters cast to the base's dtype inside their forward, so no
  FSDP mixed-precision policy is needed, and gradients are reduce-scattered in float32.
- masks: no process holds a mask as one byte per weight. An adapter rebuilds its keep mask inside its
  forward from the all-gathered weight (`W != 0`, plus the rare kept zeros as an index list), as the
  LoRS reference does; every shape read outside forward is the DTensor's global (unsharded) shape.
- checkpoints are written in the unsharded layout (adapters and optimizer state gathered to full
  tensors), so a run can resume on another number of processes, sharded or not; `merge` reads the
  saved adapters on one process.
- one process: with a single process `--shard fsdp` still runs the FSDP2 path (a one-process group is
  created when none exists), which holds the whole base: sharding splits memory only across several
  processes. The command says so in one line.
"""

from __future__ import annotations

from typing import Any

import torch

from sparse_recover.errors import ConfigError

SHARD_CHOICES = ("none", "fsdp")


def fsdp_unavailable() -> str | None:
    """Why FSDP2 cannot run on this torch (None when it can)."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
        from torch.distributed.tensor import DTensor  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no FSDP2 (torch.distributed.fsdp.fully_shard; torch >= 2.6 has it)"
    if not torch.distributed.is_available():
        return f"torch {torch.__version__} is built without torch.distributed"
    return None


def check_shard(shard: str) -> None:
    if shard not in SHARD_CHOICES:
        raise ConfigError(f"unknown --shard {shard!r}: choose one of {', '.join(SHARD_CHOICES)}")
    if shard == "fsdp":
        why = fsdp_unavailable()
        if why:
            raise ConfigError(f"--shard fsdp: {why}; upgrade torch or train unsharded (--shard none)")


def is_sharded(t: Any) -> bool:
    """True for a DTensor (a sharded parameter, gradient or optimizer state)."""
    return hasattr(t, "full_tensor") and hasattr(t, "device_mesh")


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (collective: every process must call it in the same order)."""
    return t.full_tensor() if is_sharded(t) else t


def local_part(whole: torch.Tensor, like: Any) -> torch.Tensor:
    """This process's shard of `whole` laid out as the DTensor `like` (no communication: every
    process holds `whole`)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole.to(like.device), like.device_mesh, like.placements, src_data_rank=None).to_local()


class ShardGroup:
    """The process group and device mesh FSDP2 shards over; creates a one-process group when the
    launcher set up none (a plain `sparse-recover finetune --shard fsdp`) and removes it in `close`."""

    def __init__(self, device: torch.device, world: int):
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        self.created = False
        if not dist.is_initialized():
            if world != 1:
                raise ConfigError("--shard fsdp: the launcher started several processes but set up no process "
                                  "group; launch with `accelerate launch` or `torchrun`")
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
            self.created = True
        self.world = dist.get_world_size()
        self.mesh = init_device_mesh(device.type, (self.world,))

    def close(self) -> None:
        import torch.distributed as dist

        if self.created and dist.is_initialized():
            dist.destroy_process_group()
            self.created = False


def shard_model(model, group: ShardGroup) -> list[str]:
    """fully_shard each decoder block, then the root; returns the units' names (blocks first)."""
    from torch.distributed.fsdp import fully_shard

    from sparse_recover.models import decoder_blocks

    name, blocks = decoder_blocks(model)
    units = []
    for i, block in enumerate(blocks):
        fully_shard(block, mesh=group.mesh, reshard_after_forward=True)
        units.append(f"{name}.{i}")
    fully_shard(model, mesh=group.mesh, reshard_after_forward=True)
    units.append("<root>")
    return units


def decoder_bytes(model) -> tuple[int, int]:
    """(bytes of the decoder blocks' parameters held by this process, their unsharded bytes)."""
    from sparse_recover.models import decoder_blocks

    _, blocks = decoder_blocks(model)
    local = total = 0
    for p in blocks.parameters():
        data = p.to_local() if is_sharded(p) else p
        local += data.numel() * data.element_size()
        total += p.numel() * p.element_size()
    return local, total


# ------------------------------------------------------------------------------------------------ state


def full_optimizer_state(optimizer) -> dict[str, Any]:
    """optimizer.state_dict() with every sharded state gathered to its whole tensor (collective): the
    layout an unsharded run writes, so checkpoints resume across sharded and unsharded runs."""
    sd = optimizer.state_dict()  # its per-parameter dicts are the optimizer's own: build new ones
    state = {idx: {key: (value.full_tensor() if is_sharded(value) else value) for key, value in sorted(entry.items())}
             for idx, entry in sorted(sd["state"].items())}
    return {**sd, "state": state}


def shard_optimizer_state(sd: dict[str, Any], optimizer) -> dict[str, Any]:
    """The inverse of `full_optimizer_state` for this process: each whole state tensor of a sharded
    parameter becomes the DTensor laid out as the parameter."""
    from torch.distributed.tensor import DTensor

    params = [p for g in optimizer.param_groups for p in g["params"]]
    for idx, state in sd["state"].items():
        p = params[int(idx)]
        if not is_sharded(p):
            continue
        for key, value in list(state.items()):
            if torch.is_tensor(value) and not is_sharded(value) and tuple(value.shape) == tuple(p.shape):
                state[key] = DTensor.from_local(local_part(value, p), p.device_mesh, p.placements, run_check=False,
                                                shape=p.shape, stride=p.stride())
    return sd
