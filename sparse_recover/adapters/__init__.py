"""Sparsity-preserving adapters: one registry, one attach / merge / save path for all of them."""

from __future__ import annotations

from sparse_recover.adapters.base import AdapterSettings, SparseAdapter
from sparse_recover.adapters.lora_masked import LoraRemaskAdapter, SqftAdapter
from sparse_recover.adapters.lors import LorsAdapter
from sparse_recover.adapters.spp import SppAdapter
from sparse_recover.adapters.model import (attach_adapters, adapter_state_dict, find_targets, load_adapter_state,
                                           merge_adapters, read_adapter_config, unload_adapters)

ADAPTERS: dict[str, type[SparseAdapter]] = {
    "spp": SppAdapter,
    "lors": LorsAdapter,
    "lora-remask": LoraRemaskAdapter,
    "sqft": SqftAdapter,
}


def get_adapter(method: str) -> type[SparseAdapter]:
    from sparse_recover.errors import ConfigError

    try:
        return ADAPTERS[method]
    except KeyError:
        raise ConfigError(f"unknown finetune method {method!r}: choose one of {', '.join(ADAPTERS)}") from None


__all__ = ["ADAPTERS", "AdapterSettings", "SparseAdapter", "get_adapter", "attach_adapters", "adapter_state_dict",
           "find_targets", "load_adapter_state", "merge_adapters", "read_adapter_config", "unload_adapters"]
