"""masks.safetensors: one bool tensor per pruned linear, keyed by its weight's parameter name.

Every mask is (out, in), True = keep, also for GPT-2's Conv1D whose parameter is stored (in, out);
the metadata lists those names under "transposed" so tools can map a mask onto the raw parameter.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

MASKS_FILE = "masks.safetensors"


def save_masks(path: str | Path, masks: dict[str, torch.Tensor], *, transposed: list[str], pattern: str) -> str:
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu", torch.bool).contiguous() for k, v in sorted(masks.items())}
    meta = {"format": "sparse-recover-masks/1", "convention": "True=keep, (out, in)", "pattern": pattern,
            "transposed": json.dumps(sorted(transposed))}
    save_file(tensors, str(path), metadata=meta)
    return masks_sha256(tensors)


def load_masks(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        for key in fh.keys():
            out[key] = fh.get_tensor(key)
    return out, meta


def masks_sha256(masks: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(masks):
        h.update(key.encode())
        h.update(masks[key].to("cpu", torch.bool).contiguous().numpy().tobytes())
    return h.hexdigest()
