"""masks.safetensors: one bool tensor per pruned linear, keyed by its weight's parameter name.

Every mask is (out, in), True = keep, also for GPT-2's Conv1D whose parameter is stored (in, out);
the metadata lists those names under "transposed" so tools can map a mask onto the raw parameter.
`CheckpointTensors` reads a stage's checkpoint tensors by name without loading a model. Both read
through `sparse_recover.safeio`: a damaged file is one line naming it (RunDirError, exit 5).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from sparse_recover.errors import RunDirError
from sparse_recover.safeio import check_checkpoint, open_safetensors

MASKS_FILE = "masks.safetensors"


def save_masks(path: str | Path, masks: dict[str, torch.Tensor], *, transposed: list[str], pattern: str) -> str:
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu", torch.bool).contiguous() for k, v in sorted(masks.items())}
    meta = {"format": "sparse-recover-masks/1", "convention": "True=keep, (out, in)", "pattern": pattern,
            "transposed": json.dumps(sorted(transposed))}
    save_file(tensors, str(path), metadata=meta)
    return masks_sha256(tensors)


def load_masks(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(masks, metadata) of a run directory's masks file. A missing, truncated or garbled file, a mask
    that is not boolean (or holds bytes other than 0/1), or unreadable "transposed" metadata is one
    line naming the file (RunDirError, exit 5)."""

    def bad(problem: str) -> RunDirError:
        return RunDirError(f"masks {path}: {problem}")

    out = {}
    with open_safetensors(path, error=RunDirError, what="masks") as fh:
        meta = dict(fh.metadata() or {})
        for key in fh.keys():
            out[key] = fh.get_tensor(key)
    for key, mask in out.items():
        if mask.dtype != torch.bool:
            raise bad(f"{key} is {str(mask.dtype).replace('torch.', '')}, not a boolean mask")
        if mask.numel() and int(mask.view(torch.uint8).max()) > 1:
            raise bad(f"{key} holds bytes other than 0/1 (garbled)")
    try:
        transposed = json.loads(meta.get("transposed", "[]"))
    except json.JSONDecodeError:
        transposed = None
    if not isinstance(transposed, list):
        raise bad("its 'transposed' metadata is not a JSON list of names")
    return out, meta


def masks_sha256(masks: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(masks):
        h.update(key.encode())
        h.update(masks[key].to("cpu", torch.bool).contiguous().numpy().tobytes())
    return h.hexdigest()


class CheckpointTensors:
    """Named tensors of a (possibly sharded) safetensors checkpoint folder, read one at a time.

    The folder is checked when this is built (config, shard index, every shard header); a damaged
    file is one line naming it (RunDirError, exit 5), as is a folder with no safetensors weights.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.files = check_checkpoint(self.folder, error=RunDirError)
        if not self.files:
            raise RunDirError(f"checkpoint folder {self.folder}: has no model.safetensors")

    def get(self, key: str) -> torch.Tensor | None:
        path = self.files.get(key)
        if path is None:
            return None
        with open_safetensors(path, error=RunDirError, what="checkpoint shard") as fh:
            return fh.get_tensor(key)
