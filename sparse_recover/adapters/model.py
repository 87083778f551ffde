"""Putting adapters into a model and taking them out again (the model-level half of peft's split)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from sparse_recover.adapters.base import AdapterSettings, SparseAdapter
from sparse_recover.errors import ConfigError


def find_targets(model: nn.Module, suffixes: list[str]) -> dict[str, nn.Module]:
    """Prunable linears of the decoder blocks whose name ends with one of `suffixes` (peft-style)."""
    from sparse_recover.models import decoder_blocks, prunable_linears

    blocks_name, blocks = decoder_blocks(model)
    candidates: dict[str, nn.Module] = {}
    for i, block in enumerate(blocks):
        for lname, mod in prunable_linears(block).items():
            candidates[f"{blocks_name}.{i}.{lname}"] = mod
    found: dict[str, nn.Module] = {}
    unmatched = []
    for suffix in suffixes:
        hits = {n: m for n, m in candidates.items() if n == suffix or n.endswith("." + suffix)}
        if not hits:
            unmatched.append(suffix)
        found.update(hits)
    if unmatched:
        available = sorted({n.rsplit(".", 1)[-1] for n in candidates})
        raise ConfigError(f"target suffix(es) {', '.join(unmatched)} match no linear of the decoder blocks; "
                          f"available: {', '.join(available)}")
    return dict(sorted(found.items(), key=lambda kv: list(candidates).index(kv[0])))


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def check_targets(targets: dict[str, nn.Module], cls: type[SparseAdapter], rank: int) -> None:
    from sparse_recover.models import weight_2d

    problems = []
    for name, mod in targets.items():
        out_f, in_f = weight_2d(mod).shape
        msg = cls.check_shape(int(out_f), int(in_f), rank)
        if msg:
            problems.append(f"{name}: {msg}")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ConfigError(f"{problems[0]}{more}: choose a smaller --rank")


def attach_adapters(model: nn.Module, cls: type[SparseAdapter], masks: dict[str, torch.Tensor],
                    settings: AdapterSettings, suffixes: list[str]) -> dict[str, SparseAdapter]:
    """Wrap every targeted linear in `cls`; its keep mask is masks[<name>.weight] (all-keep if absent)."""
    targets = find_targets(model, suffixes)
    check_targets(targets, cls, settings.rank)
    for p in model.parameters():
        p.requires_grad_(False)
    adapters: dict[str, SparseAdapter] = {}
    for name, mod in targets.items():
        adapter = cls(mod, masks.get(f"{name}.weight"), settings, name=name)
        _set_module(model, name, adapter)
        adapters[name] = adapter
    return adapters


def trainable_parameters(adapters: dict[str, SparseAdapter]) -> list[nn.Parameter]:
    return [p for a in adapters.values() for p in a.adapter_parameters().values()]


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A sharded (FSDP2 DTensor) parameter gathered to its whole tensor (collective); others as they are."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def adapter_state_dict(adapters: dict[str, SparseAdapter]) -> dict[str, torch.Tensor]:
    """Every adapter weight as a whole host tensor (sharded ones gathered: every process must call it)."""
    return {f"{name}.{pname}": _whole(p.detach()).to("cpu").contiguous()
            for name, a in adapters.items() for pname, p in a.adapter_parameters().items()}


def read_adapter_config(path: str | Path) -> dict[str, Any]:
    """adapter_config.json of a fine-tune stage: a JSON object with the adapter `method`, the stage it
    was trained `from` and the `resolved` settings (with the `targets`). Damaged or incomplete, it is
    one line naming the file (RunDirError, exit 5)."""
    from sparse_recover.errors import RunDirError
    from sparse_recover.safeio import read_json

    cfg = read_json(path, error=RunDirError, what="adapter config")
    problem = None
    if not isinstance(cfg, dict):
        problem = "not a JSON object"
    elif not isinstance(cfg.get("method"), str) or not isinstance(cfg.get("from"), str):
        problem = "lacks the adapter 'method' or the stage it was trained 'from'"
    elif not isinstance(cfg.get("resolved"), dict) or not isinstance(cfg["resolved"].get("targets"), list):
        problem = "lacks the 'resolved' settings with their 'targets'"
    if problem:
        raise RunDirError(f"adapter config {path}: {problem}")
    return cfg


def load_adapter_state(adapters: dict[str, SparseAdapter], state: dict[str, torch.Tensor] | str | Path) -> None:
    """Copy saved adapter weights into `adapters`: a state dict, or the path of an adapter.safetensors
    (read through safeio: a damaged file is one line naming it, RunDirError, exit 5)."""
    if isinstance(state, (str, Path)):
        from sparse_recover.errors import RunDirError
        from sparse_recover.safeio import load_safetensors

        state = load_safetensors(state, error=RunDirError, what="adapter weights")
    expected = {f"{name}.{pname}": p for name, a in adapters.items() for pname, p in a.adapter_parameters().items()}
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ConfigError(f"adapter weights do not fit the model: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for key, p in expected.items():
            if tuple(state[key].shape) != tuple(p.shape):
                raise ConfigError(f"adapter weight {key} has shape {tuple(state[key].shape)}, expected {tuple(p.shape)}")
            value = state[key].to(device=p.device, dtype=p.dtype)
            if hasattr(p, "full_tensor"):  # sharded (FSDP2): this process's part of the whole tensor
                from torch.distributed.tensor import distribute_tensor

                p.to_local().copy_(distribute_tensor(value, p.device_mesh, p.placements, src_data_rank=None).to_local())
            else:
                p.copy_(value)


def merge_adapters(adapters: dict[str, SparseAdapter], *, safe_merge: bool = True,
                   remember: bool = False) -> dict[str, Any]:
    """Merge every adapter; returns the largest |dW| at pruned positions over all (0.0 by construction)."""
    worst = 0.0
    for adapter in adapters.values():
        worst = max(worst, adapter.merge(safe_merge=safe_merge, remember=remember))
    return {"max_pruned_abs_delta": worst, "merged_linears": len(adapters)}


def unload_adapters(model: nn.Module, adapters: dict[str, SparseAdapter]) -> None:
    """Put the (merged or untouched) base linears back: a plain transformers model again."""
    for name, adapter in adapters.items():
        _set_module(model, name, adapter.base)
