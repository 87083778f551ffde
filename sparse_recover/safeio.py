"""Reading the files sparse-recover depends on, with one clear line when a file is damaged.

A missing, empty, truncated or garbled file (not UTF-8, not JSON, a safetensors header that does not
fit the file, a torch pickle cut short) becomes ONE line that names the file and what is wrong,

    <what> <path>: <what is wrong>

raised as the SparseRecoverError subclass given as `error`, never a traceback from json, safetensors
or torch. Pick `error` by whose file it is: RunDirError (exit 5, the default) for a file of a run
directory, DataError (exit 4) for a user's data file, ModelSourceError (exit 3) for a model folder.
`what` says what the file is ("masks", "manifest", "adapter weights", "data file"). Anything else
(a bug) propagates unchanged, with its traceback.

    read_text(path)              -> str (UTF-8)
    read_json(path)              -> the parsed value
    read_json_lines(path)        -> the parsed non-blank lines; a bad line is named by its number
    load_safetensors(path)       -> {name: tensor} (on the CPU)
    safetensors_metadata(path)   -> the header's metadata {str: str}
    open_safetensors(path)       -> context manager around safetensors.safe_open
    check_checkpoint(folder)     -> {tensor name: shard file} of a Hugging Face safetensors checkpoint
    load_torch(path)             -> torch.load(path, map_location="cpu")

Every function takes `path` (str or Path) and the keywords `error` and `what`; `check_checkpoint`
takes `error` only. Opening a safetensors file reads its header alone (the tensors are mapped, not
read), so checking a checkpoint before from_pretrained costs milliseconds.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from sparse_recover.errors import RunDirError, SparseRecoverError

ErrorType = type[SparseRecoverError]
_MAX_REASON = 200


def _fail(error: ErrorType, what: str, path: str | Path, problem: str) -> SparseRecoverError:
    problem = " ".join(problem.split())
    if len(problem) > _MAX_REASON:
        problem = problem[: _MAX_REASON - 3] + "..."
    return error(f"{what} {path}: {problem}")


def _os_problem(exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return "missing"
    if isinstance(exc, IsADirectoryError):
        return "is a folder, not a file"
    if isinstance(exc, PermissionError):
        return "not readable (permission denied)"
    return f"not readable ({exc.strerror or exc})"


def _damaged(path: str | Path, detail: str) -> str:
    """'is empty' for a 0-byte file, else 'truncated or corrupt (detail)'."""
    try:
        if os.path.getsize(path) == 0:
            return "is empty"
    except OSError:
        pass
    return f"truncated or corrupt ({detail})"


# --------------------------------------------------------------------------------------------------
# text and JSON


def read_text(path: str | Path, *, error: ErrorType = RunDirError, what: str = "file") -> str:
    """The file's text (UTF-8); a byte that is not UTF-8 is named by its line and offset."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise _fail(error, what, path, _os_problem(exc)) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise _fail(error, what, path, f"not UTF-8 text (byte 0x{raw[exc.start]:02x} on line {line}, "
                                        f"offset {exc.start})") from None


def _json_problem(exc: json.JSONDecodeError, *, with_line: bool = True) -> str:
    if not exc.doc.strip():
        return "is empty"
    where = f"line {exc.lineno} column {exc.colno}" if with_line else f"column {exc.colno}"
    return f"not valid JSON ({exc.msg} at {where})"


def read_json(path: str | Path, *, error: ErrorType = RunDirError, what: str = "file") -> Any:
    """The parsed JSON value (any type: callers check the shape they need)."""
    text = read_text(path, error=error, what=what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise _fail(error, what, path, _json_problem(exc)) from None


def read_json_lines(path: str | Path, *, error: ErrorType = RunDirError, what: str = "file") -> list[Any]:
    """One parsed value per non-blank line; a line that is not JSON is named by its number."""
    rows = []
    for number, line in enumerate(read_text(path, error=error, what=what).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise _fail(error, what, path, f"line {number} is {_json_problem(exc, with_line=False)}") from None
    return rows


# --------------------------------------------------------------------------------------------------
# safetensors


def _safetensors_problem(path: str | Path, exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return _os_problem(exc)
    detail = str(exc).replace("Error while deserializing header:", "").strip() or type(exc).__name__
    return _damaged(path, detail)


@contextmanager
def open_safetensors(path: str | Path, *, error: ErrorType = RunDirError, what: str = "file") -> Iterator[Any]:
    """`safetensors.safe_open(path, framework="pt")`; a failure to open it or to read a tensor from it
    is one line. The header is checked against the file's size when it is opened."""
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as exc:
        raise _fail(error, what, path, _safetensors_problem(path, exc)) from None
    with handle as fh:
        try:
            yield fh
        except SafetensorError as exc:  # from get_tensor / get_slice inside the block
            raise _fail(error, what, path, _safetensors_problem(path, exc)) from None


def load_safetensors(path: str | Path, *, error: ErrorType = RunDirError, what: str = "file") -> dict[str, Any]:
    """Every tensor of the file, by name, on the CPU."""
    with open_safetensors(path, error=error, what=what) as fh:
        return {key: fh.get_tensor(key) for key in fh.keys()}


def safetensors_metadata(path: str | Path, *, error: ErrorType = RunDirError, what: str = "file") -> dict[str, str]:
    """The string metadata of the header ({} when there is none); reads no tensor."""
    with open_safetensors(path, error=error, what=what) as fh:
        return dict(fh.metadata() or {})


# --------------------------------------------------------------------------------------------------
# Hugging Face checkpoint folders

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def _shard_keys(path: Path, error: ErrorType, what: str) -> list[str]:
    with open_safetensors(path, error=error, what=what) as fh:
        return list(fh.keys())


def check_checkpoint(folder: str | Path, *, error: ErrorType = RunDirError) -> dict[str, Path]:
    """Check a save_pretrained folder before it is loaded: config.json is a JSON object, the shard index
    (if any) is readable and every tensor it lists is in the shard it names, and every `*.safetensors`
    file in the folder (the shards, and e.g. masks.safetensors in a run-directory stage) has a header
    that fits the file. Returns {tensor name: shard file}; {} when the weights are not safetensors
    (e.g. pytorch_model.bin, left to from_pretrained)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise _fail(error, "checkpoint folder", folder, "missing" if not folder.exists() else "is not a folder")
    config = read_json(folder / "config.json", error=error, what="model config")
    if not isinstance(config, dict):
        raise _fail(error, "model config", folder / "config.json", "not a JSON object")
    files: dict[str, Path] = {}
    index = folder / INDEX_FILE
    if index.exists():
        weight_map = read_json(index, error=error, what="checkpoint index")
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise _fail(error, "checkpoint index", index, "has no 'weight_map' object of tensor -> shard file")
        by_shard: dict[str, list[str]] = {}
        for key, shard in weight_map.items():
            by_shard.setdefault(shard, []).append(key)
        for shard, keys in sorted(by_shard.items()):
            present = set(_shard_keys(folder / shard, error, "checkpoint shard"))
            absent = [k for k in keys if k not in present]
            if absent:
                raise _fail(error, "checkpoint shard", folder / shard,
                            f"lacks {len(absent)} tensor(s) that {INDEX_FILE} places there (e.g. {absent[0]})")
            files.update({k: folder / shard for k in keys})
    elif (folder / SINGLE_FILE).exists():
        files = {k: folder / SINGLE_FILE for k in _shard_keys(folder / SINGLE_FILE, error, "checkpoint shard")}
    checked = set(files.values())
    for other in sorted(folder.glob("*.safetensors")):
        if other not in checked:
            _shard_keys(other, error, "safetensors file")
    return files


# --------------------------------------------------------------------------------------------------
# torch pickles (optimizer, scheduler and RNG states)


def load_torch(path: str | Path, *, error: ErrorType = RunDirError, what: str = "file",
               weights_only: bool = False) -> Any:
    """torch.load onto the CPU. A truncated or garbled file (torch raises RuntimeError, EOFError,
    UnpicklingError or a zip error for those) is one line."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except OSError as exc:
        raise _fail(error, what, path, _os_problem(exc)) from None
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as exc:
        first = str(exc).strip().splitlines()[0].split(". ")[0] if str(exc).strip() else type(exc).__name__
        raise _fail(error, what, path, _damaged(path, first)) from None
