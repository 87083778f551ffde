"""The prune engine: calibrate, prune every decoder linear layer by layer, commit RUN/prune."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from sparse_recover.config import PruneConfig
from sparse_recover.errors import NumericalError
from sparse_recover.rundir import RunDir, now


@dataclass
class PruneRequest:
    """A validated prune request: what the guard compares and the engine computes."""

    cfg: PruneConfig
    source: Any  # ModelSource, resolved
    hf_config: Any
    pattern: Any
    method: Any
    device: Any
    dtype: Any
    calib: Any  # CalibSection with the source resolved

    def requested(self) -> dict[str, Any]:
        """The config the manifest records (and a re-run is compared with)."""
        data = self.cfg.model_dump()
        data["calib"] = self.calib.model_dump()
        return data


def prepare(cfg: PruneConfig, rd: RunDir) -> PruneRequest:
    """Validate everything that can be validated without computing: run directory, model, pattern
    against the layer widths, calibration source. Nothing is written."""
    from sparse_recover.engine.stageio import check_calibration, check_divisible, check_seqlen, resolve_calib_source
    from sparse_recover.models import load_config, resolve_device, resolve_dtype, source_for
    from sparse_recover.pruning import get_method
    from sparse_recover.sparsity.patterns import NM

    rd.check_location()
    manifest = rd.manifest()  # raises on a corrupted manifest
    pattern = cfg.prune.parsed_pattern()
    method = get_method(cfg.prune.method)
    device = resolve_device(cfg.model.device)
    dtype = resolve_dtype(cfg.model.dtype, device)
    source = source_for(cfg.model, convert=False)
    if manifest.model is not None and manifest.model.spec != source.spec:
        rd.check_model({"spec": source.spec})
    source = source_for(cfg.model)  # converts a built-in alias on first use (cache, not RUN)
    hf_config = load_config(source)
    if isinstance(pattern, NM):
        check_divisible(hf_config, pattern.m)
    calib = cfg.calib.model_copy(update={"source": resolve_calib_source(cfg.calib.source, source.kind)})
    if method.statistic is not None or cfg.prune.profile != "uniform":
        check_seqlen(calib.seqlen, hf_config, "calibration seqlen", source.spec)
        check_calibration(rd, calib)
    return PruneRequest(cfg, source, hf_config, pattern, method, device, dtype, calib)


def prune_stage(req: PruneRequest, rd: RunDir) -> dict[str, Any]:
    """Compute and commit RUN/prune; returns the manifest record."""
    from sparse_recover.data import tensor_sha256
    from sparse_recover.engine.snapshot import BlockRecorder, resolve_every, stage_snapshot
    from sparse_recover.engine.stageio import (commit_checkpoint, layer_totals, load_or_sample_windows, model_entry,
                                               tokenizer_identity)
    from sparse_recover.models import decoder_blocks, load_model, load_tokenizer
    from sparse_recover.pruning import PruneSettings
    from sparse_recover.runtime import format_seconds, metered, summary, versions

    cfg, method, pattern, calib = req.cfg, req.method, req.pattern, req.calib
    entry_model = model_entry(req.source, req.hf_config)
    rd.check_model(entry_model)
    snap = stage_snapshot(rd, "prune", req.requested(), {"model": entry_model["spec"],
                                                         "fingerprint": entry_model.get("fingerprint"),
                                                         "dtype": str(req.dtype).replace("torch.", "")})
    snap.check()  # an interrupted run with other settings: refused before anything is loaded
    tokenizer = load_tokenizer(req.source)
    windows, calib_meta, new_windows = None, {}, False
    if method.statistic is not None or cfg.prune.profile != "uniform":
        windows, calib_meta, new_windows = load_or_sample_windows(rd, calib, tokenizer, tokenizer_identity(tokenizer))
    snap.inputs = {"windows_sha256": tensor_sha256(windows) if windows is not None else None}
    model = load_model(req.source, dtype=req.dtype)
    blocks_name, model_blocks = decoder_blocks(model)
    found = snap.find(len(model_blocks))
    tokens = calib.nsamples * calib.seqlen if method.statistic is not None else 0
    snap.every = resolve_every(cfg.prune.checkpoint_every, model, tokens)
    settings = PruneSettings(pattern=pattern, rule=cfg.prune.threshold_rule, use_variant=cfg.prune.use_variant,
                             blocksize=cfg.prune.blocksize, percdamp=cfg.prune.percdamp, ria_alpha=cfg.prune.ria_alpha)
    profile: dict[str, Any] = {"profile": cfg.prune.profile}
    with metered() as meter:
        blocks = None
        stored_owl = (found.state.get("extra") or {}).get("owl") if found is not None else None
        if cfg.prune.profile == "owl" and stored_owl is None:  # on the dense model, before any restore
            ratios, blocks = owl_profile(model, windows, pattern.sparsity, cfg.prune.owl_m, cfg.prune.owl_lambda,
                                         device=req.device, offload=cfg.prune.offload, batch_size=calib.batch_size)
        resume = snap.restore(model, found) if found is not None else None
        if cfg.prune.profile == "owl":
            if stored_owl is not None:  # the first pass's result, kept with the snapshot
                ratios, blocks = stored_owl["ratios"], stored_owl["blocks"]
            snap.extra["owl"] = {"ratios": ratios, "blocks": blocks}
            profile.update(owl_m=cfg.prune.owl_m, owl_lambda=cfg.prune.owl_lambda, outlier_ratios=ratios,
                           block_targets=blocks)
        masks, layers, transposed = prune_model(model, method, settings, windows, device=req.device,
                                                offload=cfg.prune.offload, batch_size=calib.batch_size,
                                                propagate=cfg.prune.propagate, block_sparsity=blocks, resume=resume,
                                                after_block=BlockRecorder(snap, len(model_blocks), blocks_name))
        timing = meter.stop()
    retried = [k for k, v in layers.items() if v.get("cholesky_retries")]
    if retried:
        print(f"sparse-recover: note: SparseGPT needed more damping on {len(retried)} linear(s) "
              f"(e.g. {retried[0]}: damp {layers[retried[0]]['damp']:g}); recorded in the manifest", file=sys.stderr)
    overall = layer_totals(layers)
    group = method.group(settings)
    entry = {
        "status": "complete",
        "finished": now(),
        "config": req.requested(),
        "method": method.name,
        "group": group,
        "device": str(req.device),
        "dtype": str(req.dtype).replace("torch.", ""),
        "seed": calib.seed,
        "versions": versions(),
        "calibration": ({**calib_meta, "windows_sha256": tensor_sha256(windows)} if windows is not None else None),
        "sparsity": {"target": pattern.sparsity, "overall": round(overall, 6), "linears": len(masks),
                     **profile, "layers": layers},
        **timing,
    }
    if resume is not None:
        entry["resumed_at_block"] = resume.start + 1
    commit_checkpoint(rd, "prune", entry, model, tokenizer, masks, transposed, pattern,
                      windows=windows if new_windows else None, calib_meta=calib_meta,
                      log_header=f"prune {method.name} {pattern.describe()} on {req.source.spec}",
                      model_entry=entry_model)
    snap.discard()  # the stage is committed: its progress is no longer needed
    summary(f"prune: {method.name} {pattern.describe()} on {req.source.spec}: {overall:.2%} sparse over {len(masks)} "
          f"linears in {format_seconds(timing['wall_time_s'])}, peak host memory "
          f"{timing['peak_memory']['host_rss_mib']:.0f} MiB -> {rd.path / 'prune'}")
    return rd.stage_entry("prune")


def owl_profile(model, windows, target: float, m: float, lam: float, *, device, offload: bool = False,
                batch_size: int = 1, show_progress: bool = True) -> tuple[list[float], list[float]]:
    """OWL's first pass: (outlier ratio, sparsity) per decoder block, from the Wanda scores of the dense
    model on dense activations (see pruning/owl.py). The model is not modified."""
    from sparse_recover.engine.stageio import layerwise_with_progress
    from sparse_recover.models import weight_2d
    from sparse_recover.pruning.owl import block_sparsities, outlier_ratio
    from sparse_recover.pruning.wanda import wanda_score

    ratios: list[float] = []

    def score_block(ctx) -> None:
        stat_of = {name: ctx.stats[group[0]].value for group in ctx.groups if group[0] in ctx.stats for name in group}
        scores = [wanda_score(weight_2d(mod), stat_of[name]) for name, mod in ctx.linears.items() if name in stat_of]
        ratios.append(outlier_ratio(scores, m))

    layerwise_with_progress(model, windows, score_block, "owl outlier ratios", show_progress=show_progress,
                            statistic="sq_norm", device=device, offload=offload, batch_size=batch_size,
                            propagate="dense")
    return ratios, block_sparsities(ratios, target, lam)


def prune_model(model, method, settings, windows, *, device, offload: bool = False, batch_size: int = 1,
                propagate: str = "pruned", show_progress: bool = True, block_sparsity: list[float] | None = None,
                resume=None, after_block=None):
    """Prune every linear of every decoder block in place; returns (masks, per-layer info, transposed names).

    block_sparsity: one unstructured target per decoder block (a layer-wise profile such as OWL) instead of
    the settings' pattern. Knows nothing of run directories: the benchmark and the tests call it directly.
    resume: a snapshot.Resume (the first blocks already pruned in `model`, their masks and stats, the next
    block's inputs); after_block(i, block, hidden, masks, layers, transposed): called after every block.
    """
    from dataclasses import replace

    from sparse_recover.sparsity.patterns import Unstructured

    import torch

    from sparse_recover.calibration import layerwise
    from sparse_recover.models import decoder_blocks, is_conv1d, prunable_linears, weight_2d
    from sparse_recover.runtime import progress
    from sparse_recover.sparsity.masks import all_finite, count_kept

    masks: dict[str, torch.Tensor] = dict(resume.masks) if resume else {}
    layers: dict[str, dict[str, Any]] = dict(resume.layers) if resume else {}
    transposed: list[str] = list(resume.transposed) if resume else []
    start = resume.start if resume else 0
    on_block = None
    if after_block is not None:
        def on_block(i, block, hidden):
            after_block(i, block, hidden, masks, layers, transposed)

    def prune_linears(index: int, prefix: str, linears: dict[str, Any], groups: list[list[str]],
                      stats: dict[str, Any]):
        block_settings = settings if block_sparsity is None else replace(
            settings, pattern=Unstructured(block_sparsity[index]))
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
                if not all_finite(mod.weight):
                    raise NumericalError(f"{prefix}.{name} has non-finite weights: refusing to prune it")
            outcomes = method.fn([weight_2d(m).detach() for m in mods], stat.value if stat else None, block_settings)
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
                kept = count_kept(keep)
                layers[key] = {"shape": list(keep.shape), "kept": kept, "sparsity": round(1 - kept / keep.numel(), 6),
                               **res.info}
                if block_sparsity is not None:
                    layers[key]["target"] = block_sparsity[index]

    blocks_name, blocks = decoder_blocks(model)
    bar = (progress(len(blocks), f"prune {method.name} {settings.pattern.name}", unit="block")
           if show_progress else None)
    tick = (lambda i: bar.update(1)) if bar is not None else None
    if bar is not None and start:
        bar.update(start)
    try:
        if method.statistic is None:  # data-free: no calibration pass at all
            for i, block in enumerate(blocks):
                if i < start:
                    continue
                lin = prunable_linears(block)
                prune_linears(i, f"{blocks_name}.{i}", lin, [[n] for n in lin], {})
                if on_block:
                    on_block(i, block, None)
                if tick:
                    tick(i)
        else:
            layerwise(model, windows, lambda ctx: prune_linears(ctx.index, ctx.prefix, ctx.linears, ctx.groups, ctx.stats),
                      statistic=method.statistic, device=device, offload=offload, batch_size=batch_size,
                      propagate=propagate, progress=tick, start=start,
                      resume_hidden=resume.hidden if resume else None, after_block=on_block)
    finally:
        if bar is not None:
            bar.close()
    return masks, layers, transposed
