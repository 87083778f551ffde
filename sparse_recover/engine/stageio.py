"""Run-directory stage I/O shared by every engine: the model entry, calibration windows, committing a
checkpoint stage (checkpoint + tokenizer + masks, atomically), loading one back, and stage logs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sparse_recover.errors import ConfigError, DataError, RunDirError
from sparse_recover.rundir import RunDir, now

WINDOWS_FILE = "windows.safetensors"
WINDOW_KEYS = ("source", "nsamples", "seqlen", "seed")  # with the tokenizer: what identifies stored windows
FINETUNE_DATA = "fine-tuning data"
OFFLINE_ALTERNATIVE = {"calibration": "wiki-en (built in) or a local .txt/.json/.jsonl file",
                       "perplexity data": "wiki-en (built in) or a local .txt/.json/.jsonl file",
                       FINETUNE_DATA: "wiki-en (built in) or a local .json/.jsonl (instruction or text rows) or .txt "
                                      "file"}


def model_entry(source, config) -> dict[str, Any]:
    from sparse_recover.models import config_fingerprint

    return {
        **source.to_json(),
        "architecture": (getattr(config, "architectures", None) or [type(config).__name__])[0],
        "model_type": config.model_type,
        "fingerprint": config_fingerprint(config),
    }


def resolve_calib_source(source: str, model_kind: str) -> str:
    if source.strip().lower() == "auto":
        return "wiki-en" if model_kind == "builtin" else "c4"
    return source


def check_data_source(source: str, what: str = "calibration") -> None:
    """A local data file that does not exist, an unknown source name, or a hub dataset that cannot be reached
    offline fails before any work. `what`: calibration | perplexity data | fine-tuning data (FINETUNE_DATA)."""
    import os

    from sparse_recover.data import BUILTIN_SOURCES, FINETUNE_HUB_SOURCES, HUB_SOURCES, is_local_path, known_sources

    key = source.strip().lower()
    hub = FINETUNE_HUB_SOURCES if what == FINETUNE_DATA else HUB_SOURCES
    if key in BUILTIN_SOURCES or key == "auto":
        return
    if key in hub:
        check_hub_dataset(key, what)
        return
    if is_local_path(source):
        if not os.path.isfile(os.path.expanduser(source)):
            raise DataError(f"{what} file not found: {source}")
        return
    if what == FINETUNE_DATA:
        raise DataError(f"unknown {what} {source!r}: use {', '.join(BUILTIN_SOURCES + hub)} or a local "
                        ".json/.jsonl/.txt file")
    raise DataError(f"unknown data source {source!r}: use {known_sources()}")


def check_hub_dataset(key: str, what: str) -> None:
    """Offline, a hub dataset must be in the local datasets cache: `datasets.load_dataset_builder` answers
    from the cache at once when offline (no retries), exactly as the loader in data.py would resolve it."""
    import logging

    from sparse_recover.data import HUB_DATASETS
    from sparse_recover.hub import unreachable

    why = unreachable()
    if why is None:
        return
    path, name, files = HUB_DATASETS[key]
    logger = logging.getLogger("datasets")  # a cache hit logs "Using the latest cached version ..."
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from datasets import load_dataset_builder

        load_dataset_builder(path, name, data_files=files)
    except Exception:  # noqa: BLE001 - datasets raises ConnectionError, FileNotFoundError, ValueError...
        raise DataError(f"{what} {key} is the hub dataset {path}, which cannot be reached: {why} and it is "
                        f"not in the local datasets cache; offline, use {OFFLINE_ALTERNATIVE[what]}") from None
    finally:
        logger.setLevel(level)


def stored_windows(rd: RunDir, calib) -> bool:
    """RUN/calib holds windows drawn with these calibration settings (the tokenizer is checked on use)."""
    from sparse_recover.safeio import safetensors_metadata

    path = rd.path / "calib" / WINDOWS_FILE
    if not path.is_file():
        return False
    meta = safetensors_metadata(path, error=RunDirError, what="calibration windows")
    return all(meta.get(k) == str(getattr(calib, k)) for k in WINDOW_KEYS)


def check_calibration(rd: RunDir, calib) -> None:
    """The calibration source a stage will draw windows from (none when RUN/calib already holds them)."""
    if not stored_windows(rd, calib):
        check_data_source(calib.source)


def prune_calib(rd: RunDir, **update: Any):
    """The prune stage's calibration settings (dsnot and reconstruct reuse them and its windows)."""
    from sparse_recover.config import CalibSection

    return CalibSection(**{**rd.record("prune").config.get("calib", {}), **update})


def context_length(hf_config) -> int | None:
    """max_position_embeddings of a model config (GPT-2's n_positions through its attribute map)."""
    n = getattr(getattr(hf_config, "text_config", None) or hf_config, "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 0 else None


def check_seqlen(seqlen: int, hf_config, what: str, model: str) -> None:
    """A window longer than the model's context is refused (its positions past the end mean nothing)."""
    n = context_length(hf_config)
    if n is not None and seqlen > n:
        raise ConfigError(f"{what} {seqlen} is longer than the context of {model} (max_position_embeddings {n}): "
                          f"use a {what} of at most {n}")


def check_divisible(hf_config, m: int) -> None:
    """Every prunable input width must be a multiple of M; checked on a weightless (meta) model."""
    import torch
    from transformers import AutoModelForCausalLM

    from sparse_recover.models import decoder_blocks, in_features, prunable_linears

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    name, blocks = decoder_blocks(model)
    for i, block in enumerate(blocks):
        for lname, mod in prunable_linears(block).items():
            width = in_features(mod)
            if width % m:
                raise ConfigError(
                    f"layer {name}.{i}.{lname} has input width {width}, not divisible by M={m}: choose another N:M"
                )


def tokenizer_identity(tokenizer) -> str:
    import hashlib

    vocab = tokenizer.get_vocab()
    blob = json.dumps(sorted(vocab.items())[:50000], ensure_ascii=False).encode()
    return f"{type(tokenizer).__name__}:{len(vocab)}:{hashlib.sha256(blob).hexdigest()[:12]}"


def load_or_sample_windows(rd: RunDir, calib, tokenizer, tokenizer_id: str):
    """Reuse RUN/calib/windows.safetensors when it was drawn with the same settings, else draw anew.
    Returns (windows, metadata, drawn_now)."""
    from sparse_recover.data import calibration_corpus, sample_windows
    from sparse_recover.safeio import safetensors_metadata, load_safetensors

    wanted = {**{k: str(getattr(calib, k)) for k in WINDOW_KEYS}, "tokenizer": tokenizer_id}
    path = rd.path / "calib" / WINDOWS_FILE
    if path.is_file():
        meta = safetensors_metadata(path, error=RunDirError, what="calibration windows")
        if all(meta.get(k) == v for k, v in wanted.items()):
            return load_safetensors(path, error=RunDirError, what="calibration windows")["windows"], wanted, False
    corpus = calibration_corpus(calib.source)
    windows = sample_windows(corpus, tokenizer, calib.nsamples, calib.seqlen, calib.seed)
    return windows, wanted, True


def dense_source(rd: RunDir, needs: str):
    """The dense base model named in the manifest (with the revision and trust_remote_code prune loaded it
    with); one line when it is gone."""
    from sparse_recover.models import source_from_entry

    model = rd.manifest().model
    spec = model.spec if model else ""
    if not spec:
        raise RunDirError(f"the manifest of {rd.path} names no base model")
    try:
        return source_from_entry(model)
    except Exception as exc:  # noqa: BLE001 - any failure here means the base is gone
        raise RunDirError(f"the dense base model {spec!r} named in the manifest is no longer available ({exc}); "
                          f"{needs}") from None


def load_sparse_stage(rd: RunDir, stage: str, dtype, device):
    """(model, tokenizer, masks, transposed names) of a checkpoint stage."""
    from sparse_recover.models import load_model, load_tokenizer
    from sparse_recover.sparsity.io import MASKS_FILE, load_masks

    folder = rd.stage_dir(stage)
    masks, meta = load_masks(folder / MASKS_FILE)
    model = load_model(str(folder), dtype=dtype, device=device)
    tokenizer = load_tokenizer(str(folder))
    return model, tokenizer, masks, json.loads(meta.get("transposed", "[]"))


def layer_totals(layers: dict[str, dict[str, Any]]) -> float:
    """Overall sparsity over the linears that were pruned (entries with a shape)."""
    total = sum(v["shape"][0] * v["shape"][1] for v in layers.values() if "shape" in v)
    kept = sum(v["kept"] for v in layers.values() if "shape" in v)
    return 1 - kept / total if total else 0.0


def commit_checkpoint(rd: RunDir, stage: str, entry: dict[str, Any], model, tokenizer, masks, transposed, pattern,
                      *, windows=None, calib_meta: dict[str, Any] | None = None, log_header: str = "",
                      model_entry: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write RUN/<stage> (checkpoint, tokenizer, masks) and, when given, RUN/calib atomically; then the
    manifest record (which makes every stage computed from the previous version stale) and the log."""
    from safetensors.torch import save_file

    from sparse_recover.sparsity.io import MASKS_FILE, save_masks

    entry["pattern"] = pattern.spec
    names = [stage, "calib"] if windows is not None else [stage]
    with rd.staging(*names, replacing=stage) as tmps:
        model.save_pretrained(tmps[0])
        tokenizer.save_pretrained(tmps[0])
        entry["masks_sha256"] = save_masks(Path(tmps[0]) / MASKS_FILE, masks, transposed=transposed,
                                           pattern=pattern.name)
        if windows is not None:
            save_file({"windows": windows.contiguous()}, str(Path(tmps[1]) / WINDOWS_FILE),
                      metadata=calib_meta or {})
    rd.commit(stage, entry, model_entry=model_entry)
    lines = [f"  {key}: {json.dumps(info, default=str)}" for key, info in entry["sparsity"]["layers"].items()]
    write_log(rd, stage, log_header, lines, entry.get("finished"))
    return entry


def write_log(rd: RunDir, stage: str, header: str, lines: list[str], when: str | None = None) -> None:
    path = rd.path / "logs" / f"{stage}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(f"[{when or now()}] {header}\n")
        for line in lines:
            fh.write(line + "\n")


def inputs_identity(rd: RunDir, *stages: str) -> dict[str, str | None]:
    manifest = rd.manifest()
    return {s: (manifest.stages[s].identity() if s in manifest.stages else None) for s in stages}


def layerwise_with_progress(model, windows, process, label: str, *, show_progress: bool = True, **kwargs) -> None:
    """calibration.layerwise over every decoder block with one progress bar (unit: block); a resumed pass
    (`start` > 0) starts its bar at the blocks already done."""
    from sparse_recover.calibration import layerwise
    from sparse_recover.models import decoder_blocks
    from sparse_recover.runtime import progress

    _, blocks = decoder_blocks(model)
    bar = progress(len(blocks), label, unit="block") if show_progress else None
    if bar is not None and kwargs.get("start"):
        bar.update(kwargs["start"])
    try:
        layerwise(model, windows, process, progress=(lambda i: bar.update(1)) if bar else None, **kwargs)
    finally:
        if bar is not None:
            bar.close()


def dense_calibration(rd: RunDir, runtime, batch_size: int, needs: str):
    """What a pass over the dense base model needs: (source, device, dtype, tokenizer, calib settings,
    windows, windows metadata, drawn now) with the prune stage's calibration settings."""
    from sparse_recover.models import load_tokenizer, resolve_device, resolve_dtype

    source = dense_source(rd, needs)
    dev = resolve_device(runtime.device)
    dt = resolve_dtype(runtime.dtype, dev)
    tokenizer = load_tokenizer(source)
    calib = prune_calib(rd, batch_size=batch_size)
    windows, calib_meta, new_windows = load_or_sample_windows(rd, calib, tokenizer, tokenizer_identity(tokenizer))
    return source, dev, dt, tokenizer, calib, windows, calib_meta, new_windows
