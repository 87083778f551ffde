"""masks.safetensors: one keep mask per pruned linear, keyed by its weight's parameter name.

Every mask is logically a bool tensor (out, in), True = keep, also for GPT-2's Conv1D whose parameter
is stored (in, out); the metadata lists those names under "transposed" so tools can map a mask onto
the raw parameter.

On disk (metadata "mask_format": "packed-bits-v1") each mask is bit-packed along its input dimension:
a uint8 tensor (out, ceil(in / 8)) whose byte k of a row holds entries 8k..8k+7, entry 8k+b in bit b
(little-endian within the byte, as numpy.packbits(bitorder="little")); the bits past `in` in a row's
last byte are zero. The logical shapes are the metadata "shapes", a JSON object {name: [out, in]}.
Files written before this format (no "mask_format": one bool tensor per mask) still read.

`load_masks` returns a read-only Mapping that reads and unpacks a mask each time it is accessed and
keeps nothing, so `for key, keep in masks.items()` holds the mask in hand (and the next while it is
read), never all of them; `dict(masks)` unpacks them all. `masks_sha256` hashes the logical bool masks, so it does not depend on the format.
`CheckpointTensors` reads a stage's checkpoint tensors by name without loading a model. Both read
through `sparse_recover.safeio`: a damaged file is one line naming it (RunDirError, exit 5).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import ItemsView, Iterable, Iterator, Mapping, ValuesView
from pathlib import Path

import numpy as np
import torch

from sparse_recover.errors import RunDirError
from sparse_recover.safeio import check_checkpoint, open_safetensors

MASKS_FILE = "masks.safetensors"
PACKED_FORMAT = "packed-bits-v1"
REOPEN_BYTES = 16 * 2**20  # MaskFile.read opens the file again after this many stored bytes


# numpy (already a dependency, through torch's .numpy() and transformers) packs and unpacks ~10-100x
# faster on a CPU than the same arithmetic in torch ops; the tensors are shared, not copied.


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bool (..., in) -> uint8 (..., ceil(in / 8)): bit b of byte k is entry 8k + b; padding bits zero."""
    keep = mask.detach().to("cpu", torch.bool).contiguous()
    return torch.from_numpy(np.packbits(keep.numpy(), axis=-1, bitorder="little"))


def unpack_mask(packed: torch.Tensor, width: int) -> torch.Tensor:
    """The inverse of `pack_mask`: uint8 (..., ceil(width / 8)) -> a new bool (..., width)."""
    bits = np.unpackbits(packed.contiguous().numpy(), axis=-1, count=width, bitorder="little")
    return torch.from_numpy(bits.view(np.bool_))


def save_masks(path: str | Path, masks: Mapping[str, torch.Tensor], *, transposed: list[str], pattern: str) -> str:
    """Write `masks` packed (one mask unpacked at a time when `masks` is a lazy MaskFile); returns
    masks_sha256 of the logical masks."""
    from safetensors.torch import save_file

    digest = hashlib.sha256()
    tensors, shapes = {}, {}
    for key, keep in _sorted_items(masks):
        keep = keep.detach().to("cpu", torch.bool).contiguous()
        if keep.dim() == 0:
            raise ValueError(f"mask {key} is a scalar: a mask is (out, in)")
        _hash_mask(digest, key, keep)
        tensors[key], shapes[key] = pack_mask(keep), list(keep.shape)
    meta = {"format": "sparse-recover-masks/2", "convention": "True=keep, (out, in)", "pattern": pattern,
            "transposed": json.dumps(sorted(transposed)), "mask_format": PACKED_FORMAT, "bit_order": "little",
            "shapes": json.dumps(shapes)}
    save_file(tensors, str(path), metadata=meta)
    return digest.hexdigest()


class MaskFile(Mapping[str, torch.Tensor]):
    """{name: bool keep mask} of a masks file, read-only. Each access reads that one mask from the
    file (and unpacks it) and returns a new tensor; nothing is cached. `items()` and `values()` read
    the masks one after another through `read`. Names, `len`, `in` and `shapes` come from the
    header alone."""

    def __init__(self, path: Path, shapes: dict[str, tuple[int, ...]], packed: bool):
        self.path, self.packed = path, packed
        self._shapes = shapes

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """{name: logical (out, in)} without reading any mask."""
        return dict(self._shapes)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._shapes:
            raise KeyError(key)
        with open_safetensors(self.path, error=RunDirError, what="masks") as fh:
            stored = fh.get_tensor(key)
        return self._decode(key, stored)

    def read(self, keys: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, mask) for each of `keys` in turn. The file is opened once per REOPEN_BYTES of
        stored masks read: few openings, and the file's mapped pages stay bounded on a large model."""
        pending = list(keys)
        missing = [k for k in pending if k not in self._shapes]
        if missing:
            raise KeyError(missing[0])
        pending.reverse()
        while pending:
            with open_safetensors(self.path, error=RunDirError, what="masks") as fh:
                mapped = 0
                while pending and mapped < REOPEN_BYTES:
                    key = pending.pop()
                    stored = fh.get_tensor(key)
                    mapped += stored.nbytes
                    yield key, self._decode(key, stored)

    def items(self) -> ItemsView[str, torch.Tensor]:
        return _Items(self)

    def values(self) -> ValuesView[torch.Tensor]:
        return _Values(self)

    def _decode(self, key: str, stored: torch.Tensor) -> torch.Tensor:
        shape = self._shapes[key]
        if tuple(stored.shape) != _stored_shape(shape, self.packed):
            raise _bad(self.path, f"{key} changed on disk since the file was opened")
        if not self.packed:
            if stored.numel() and int(stored.view(torch.uint8).numpy().max()) > 1:
                raise _bad(self.path, f"{key} holds bytes other than 0/1 (garbled)")
            return stored
        pad = shape[-1] % 8
        if pad and stored.numel() and int(stored[..., -1].numpy().max()) >> pad:
            raise _bad(self.path, f"packed mask {key} has bits set past its width {shape[-1]} (garbled)")
        return unpack_mask(stored, shape[-1])

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def __contains__(self, key: object) -> bool:
        return key in self._shapes

    def __repr__(self) -> str:
        kind = PACKED_FORMAT if self.packed else "bool"
        return f"MaskFile({str(self.path)!r}, {len(self)} masks, {kind})"


class _Items(ItemsView):
    def __iter__(self):
        return self._mapping.read(self._mapping)


class _Values(ValuesView):
    def __iter__(self):
        return (mask for _, mask in self._mapping.read(self._mapping))


def _sorted_items(masks: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, mask) in name order, one mask at a time (one opening of the file for a MaskFile)."""
    keys = sorted(masks)
    if isinstance(masks, MaskFile):
        return masks.read(keys)
    return ((key, masks[key]) for key in keys)


def _bad(path: str | Path, problem: str) -> RunDirError:
    return RunDirError(f"masks {path}: {problem}")


def _stored_shape(shape: tuple[int, ...], packed: bool) -> tuple[int, ...]:
    return (*shape[:-1], (shape[-1] + 7) // 8) if packed else shape


def _json_meta(path: Path, meta: dict[str, str], name: str, default: str, kind: type, what: str):
    try:
        value = json.loads(meta.get(name, default))
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, kind):
        raise _bad(path, f"its {name!r} metadata is not {what}")
    return value


def _packed_shapes(path: Path, meta: dict[str, str], stored: dict[str, tuple[str, tuple[int, ...]]]):
    if "shapes" not in meta:
        raise _bad(path, f"its masks are packed ({PACKED_FORMAT}) but it has no 'shapes' metadata")
    shapes = _json_meta(path, meta, "shapes", "null", dict, "a JSON object of name -> [out, in]")
    out = {}
    for key, (dtype, on_disk) in stored.items():
        shape = shapes.get(key)
        if shape is None:
            raise _bad(path, f"packed mask {key} has no shape in the 'shapes' metadata")
        if not (isinstance(shape, list) and shape and all(type(n) is int and n >= 0 for n in shape)):
            raise _bad(path, f"packed mask {key} has shape {json.dumps(shape)} in the metadata, not [out, in]")
        if dtype != "U8":
            raise _bad(path, f"packed mask {key} is stored as {dtype}, not uint8 bits")
        if on_disk != _stored_shape(tuple(shape), True):
            raise _bad(path, f"packed mask {key} is stored as {list(on_disk)} bytes, which does not fit its "
                             f"metadata shape {shape} (needs {list(_stored_shape(tuple(shape), True))})")
        out[key] = tuple(shape)
    extra = sorted(set(shapes) - set(stored))
    if extra:
        raise _bad(path, f"the 'shapes' metadata names {extra[0]}, which the file does not hold")
    return out


def load_masks(path: str | Path) -> tuple[MaskFile, dict[str, str]]:
    """(masks, metadata) of a run directory's masks file, packed or bool. Only the header is read
    here: a missing, truncated or garbled file, a packed mask whose stored bytes disagree with its
    metadata shape (or that has none), a bool-format mask that is not boolean, or unreadable
    "transposed" metadata is one line naming the file (RunDirError, exit 5); a mask whose bytes are
    garbled is the same line when it is read."""
    path = Path(path)
    with open_safetensors(path, error=RunDirError, what="masks") as fh:
        meta = dict(fh.metadata() or {})
        stored = {}
        for key in fh.keys():
            part = fh.get_slice(key)
            stored[key] = (part.get_dtype(), tuple(part.get_shape()))
        kind = meta.get("mask_format")
        if kind is None:
            for key, (dtype, _) in stored.items():
                if dtype != "BOOL":
                    name = str(fh.get_tensor(key).dtype).replace("torch.", "")
                    raise _bad(path, f"{key} is {name}, not a boolean mask")
    _json_meta(path, meta, "transposed", "[]", list, "a JSON list of names")
    if kind is None:
        return MaskFile(path, {k: shape for k, (_, shape) in stored.items()}, packed=False), meta
    if kind != PACKED_FORMAT:
        raise _bad(path, f"unknown mask_format {kind!r} (this version reads {PACKED_FORMAT!r} and bool masks)")
    return MaskFile(path, _packed_shapes(path, meta, stored), packed=True), meta


def _hash_mask(digest, key: str, keep: torch.Tensor) -> None:
    digest.update(key.encode())
    digest.update(keep.view(torch.uint8).numpy())


class MaskDigest:
    """masks_sha256 built while the masks are read for something else (the audit reads each once)."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256()

    def update(self, key: str, keep: torch.Tensor) -> None:
        _hash_mask(self._digest, key, keep.to("cpu", torch.bool).contiguous())

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def sorted_items(masks: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, mask) in the order masks_sha256 hashes them, one mask at a time."""
    return _sorted_items(masks)


def masks_sha256(masks: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the sorted names and each LOGICAL bool mask's bytes (one byte per entry), whatever
    the file format; reads one mask at a time from a MaskFile."""
    digest = hashlib.sha256()
    for key, keep in _sorted_items(masks):
        _hash_mask(digest, key, keep.to("cpu", torch.bool).contiguous())
    return digest.hexdigest()


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
