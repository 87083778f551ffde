"""`sparse-recover prune`: calibrate, prune layer by layer, write RUN/prune and the manifest."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from sparse_recover.config import PruneConfig
from sparse_recover.errors import ConfigError, NumericalError
from sparse_recover.rundir import RunDir, now

log = logging.getLogger("sparse_recover")


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


def load_or_sample_windows(rd: RunDir, calib, tokenizer, tokenizer_id: str):
    """Reuse RUN/calib/windows.safetensors when it was drawn with the same settings, else draw anew."""
    from safetensors import safe_open

    from sparse_recover.data import calibration_corpus, sample_windows

    wanted = {"source": calib.source, "nsamples": str(calib.nsamples), "seqlen": str(calib.seqlen),
              "seed": str(calib.seed), "tokenizer": tokenizer_id}
    path = rd.path / "calib" / "windows.safetensors"
    if path.is_file():
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if all(meta.get(k) == v for k, v in wanted.items()):
                return fh.get_tensor("windows"), wanted, False
    corpus = calibration_corpus(calib.source)
    windows = sample_windows(corpus, tokenizer, calib.nsamples, calib.seqlen, calib.seed)
    return windows, wanted, True


def tokenizer_identity(tokenizer) -> str:
    import hashlib

    vocab = tokenizer.get_vocab()
    blob = json.dumps(sorted(vocab.items())[:50000], ensure_ascii=False).encode()
    return f"{type(tokenizer).__name__}:{len(vocab)}:{hashlib.sha256(blob).hexdigest()[:12]}"


def run(cfg: PruneConfig, run_dir: str, force: bool = False) -> dict[str, Any]:
    from sparse_recover.data import tensor_sha256
    from sparse_recover.models import (load_config, load_model, load_tokenizer, resolve_device, resolve_dtype,
                                       resolve_model_source)
    from sparse_recover.pruning import PruneSettings, get_method
    from sparse_recover.runtime import format_seconds, metered, quiet_libraries, versions
    from sparse_recover.sparsity.patterns import NM

    quiet_libraries()
    # ---- validate everything before touching the run directory
    rd = RunDir(run_dir)
    rd.check_location()
    rd.read()  # raises on a corrupted manifest
    pattern = cfg.prune.parsed_pattern()
    method = get_method(cfg.prune.method)
    device = resolve_device(cfg.model.device)
    dtype = resolve_dtype(cfg.model.dtype, device)
    source = resolve_model_source(cfg.model.model, convert=False)
    if rd.exists():
        current = rd.read().get("model") or {}
        if current.get("spec") and current["spec"] != source.spec:
            rd.check_model({"spec": source.spec})
    if rd.is_complete("prune") and not force:
        entry = rd.stage_entry("prune")
        msg = (f"prune stage already complete in {rd.path} ({entry.get('config', {}).get('prune', {}).get('method')}, "
               f"{entry.get('sparsity', {}).get('overall', 0):.2%} sparse): nothing to do (use --force to redo it)")
        print(msg)
        return entry
    source = resolve_model_source(cfg.model.model)  # converts a built-in alias on first use (cache, not RUN)
    hf_config = load_config(source)
    entry_model = model_entry(source, hf_config)
    rd.check_model(entry_model)
    if isinstance(pattern, NM):
        check_divisible(hf_config, pattern.m)
    calib = cfg.calib.model_copy(update={"source": resolve_calib_source(cfg.calib.source, source.kind)})
    tokenizer = load_tokenizer(source.path)
    windows = None
    new_windows = False
    calib_meta: dict[str, Any] = {}
    if method.statistic is not None:
        windows, calib_meta, new_windows = load_or_sample_windows(rd, calib, tokenizer, tokenizer_identity(tokenizer))
    model = load_model(source, dtype=dtype)

    settings = PruneSettings(pattern=pattern, rule=cfg.prune.threshold_rule, use_variant=cfg.prune.use_variant,
                             blocksize=cfg.prune.blocksize, percdamp=cfg.prune.percdamp)
    with metered() as meter:
        masks, layers, transposed = prune_model(model, method, settings, windows, device=device,
                                                offload=cfg.prune.offload, batch_size=calib.batch_size,
                                                propagate=cfg.prune.propagate)
        timing = meter.stop()
    retried = [k for k, v in layers.items() if v.get("cholesky_retries")]
    if retried:
        print(f"sparse-recover: note: SparseGPT needed more damping on {len(retried)} linear(s) "
              f"(e.g. {retried[0]}: damp {layers[retried[0]]['damp']:g}); recorded in the manifest", file=sys.stderr)

    total = sum(v["shape"][0] * v["shape"][1] for v in layers.values() if "shape" in v)
    kept = sum(v["kept"] for v in layers.values() if "shape" in v)
    overall = 1 - kept / total if total else 0.0
    started = now()
    resolved = cfg.model_dump()
    resolved["calib"] = calib.model_dump()
    entry = {
        "status": "complete",
        "finished": started,
        "config": resolved,
        "method": method.name,
        "pattern": pattern.name,
        "group": method.group(settings),
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "seed": calib.seed,
        "versions": versions(),
        "calibration": ({**calib_meta, "windows_sha256": tensor_sha256(windows)} if windows is not None else None),
        "sparsity": {"target": pattern.sparsity, "overall": round(overall, 6), "linears": len(masks),
                     "layers": layers},
        **timing,
    }
    commit_stage(rd, "prune", entry, model, tokenizer, masks, transposed, pattern,
                 windows=windows if new_windows else None, calib_meta=calib_meta,
                 log_header=f"prune {method.name} {pattern.describe()} on {source.spec}", model_entry=entry_model)
    print(f"prune: {method.name} {pattern.describe()} on {source.spec}: {overall:.2%} sparse over {len(masks)} linears "
          f"in {format_seconds(timing['wall_time_s'])}, peak host memory {timing['peak_memory']['host_rss_mib']:.0f} MiB "
          f"-> {rd.path / 'prune'}")
    return entry


def prune_model(model, method, settings, windows, *, device, offload: bool = False, batch_size: int = 1,
                propagate: str = "pruned", show_progress: bool = True):
    """Prune every linear of every decoder block in place; returns (masks, per-layer info, transposed names).

    Knows nothing of run directories: the benchmark and the tests call it directly.
    """
    import torch

    from sparse_recover.calibration import layerwise
    from sparse_recover.models import decoder_blocks, is_conv1d, prunable_linears, weight_2d
    from sparse_recover.runtime import progress

    masks: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, Any]] = {}
    transposed: list[str] = []

    def prune_linears(prefix: str, linears: dict[str, Any], groups: list[list[str]], stats: dict[str, Any]):
        for group in groups:
            stat = stats.get(group[0])
            if method.statistic is not None and stat is None:
                for name in group:  # never called in the forward: nothing to calibrate on
                    layers[f"{prefix}.{name}.weight"] = {"skipped": "not called during calibration"}
                    print(f"sparse-recover: warning: {prefix}.{name} was never called during calibration "
                          "and is left dense", file=sys.stderr)
                continue
            mods = [linears[n] for n in group]
            for name, mod in zip(group, mods):
                if not torch.isfinite(mod.weight).all():
                    raise NumericalError(f"{prefix}.{name} has non-finite weights: refusing to prune it")
            outcomes = method.fn([weight_2d(m).detach() for m in mods], stat.value if stat else None, settings)
            for name, mod, res in zip(group, mods, outcomes):
                with torch.no_grad():
                    if res.weight is not None:
                        w2 = weight_2d(mod)
                        w2.copy_(res.weight.to(w2.dtype))
                    weight_2d(mod).masked_fill_(~res.keep.to(mod.weight.device), 0)
                key = f"{prefix}.{name}.weight"
                keep = res.keep.to("cpu")
                masks[key] = keep
                if is_conv1d(mod):
                    transposed.append(key)
                layers[key] = {"shape": list(keep.shape), "kept": int(keep.sum()),
                               "sparsity": round(1 - keep.float().mean().item(), 6), **res.info}

    blocks_name, blocks = decoder_blocks(model)
    bar = progress(len(blocks), f"prune {method.name} {settings.pattern.name}") if show_progress else None
    tick = (lambda i: bar.update(1)) if bar is not None else None
    try:
        if method.statistic is None:  # data-free: no calibration pass at all
            for i, block in enumerate(blocks):
                lin = prunable_linears(block)
                prune_linears(f"{blocks_name}.{i}", lin, [[n] for n in lin], {})
                if tick:
                    tick(i)
        else:
            layerwise(model, windows, lambda ctx: prune_linears(ctx.prefix, ctx.linears, ctx.groups, ctx.stats),
                      statistic=method.statistic, device=device, offload=offload, batch_size=batch_size,
                      propagate=propagate, progress=tick)
    finally:
        if bar is not None:
            bar.close()
    return masks, layers, transposed


def commit_stage(rd: RunDir, stage: str, entry: dict[str, Any], model, tokenizer, masks, transposed, pattern, *,
                 windows=None, calib_meta: dict[str, Any] | None = None, log_header: str = "",
                 model_entry: dict[str, Any] | None = None) -> None:
    """Write RUN/<stage> (checkpoint, tokenizer, masks) and, when given, RUN/calib atomically; then the
    manifest entry and the stage log. Shared by every stage that produces a sparse checkpoint."""
    from safetensors.torch import save_file

    from sparse_recover.sparsity.io import MASKS_FILE, save_masks

    names = [stage, "calib"] if windows is not None else [stage]
    with rd.staging(*names) as tmps:
        model.save_pretrained(tmps[0])
        tokenizer.save_pretrained(tmps[0])
        entry["masks_sha256"] = save_masks(Path(tmps[0]) / MASKS_FILE, masks, transposed=transposed,
                                           pattern=pattern.name)
        if windows is not None:
            save_file({"windows": windows.contiguous()}, str(Path(tmps[1]) / "windows.safetensors"),
                      metadata=calib_meta or {})
    data = rd.read()
    if model_entry is not None:
        data["model"] = model_entry
    data["stages"][stage] = entry
    rd.write(data)
    log_path = rd.path / "logs" / f"{stage}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as fh:
        fh.write(f"[{entry.get('finished', now())}] {log_header}\n")
        for key, info in entry.get("sparsity", {}).get("layers", {}).items():
            fh.write(f"  {key}: {json.dumps(info, default=str)}\n")
