"""The DSnoT engine: refine the prune stage's masks on the dense model, commit RUN/dsnot.

Reads RUN/prune (masks, the pruning method, the calibration windows) and the dense base model named
in the manifest, runs the layer-wise engine on the dense model collecting DSnoT's statistics, refines
each targeted linear's mask, and writes RUN/dsnot with the same shape as RUN/prune.

Reference defaults (what produced the published tables): only attention linears are refined (the
reference's `--skip_layer mlp`), and the unstructured path skips the same-sign test (its
`--without_same_sign` argparse flag is always true); MLP linears get the initial mask only.
`--targets all --sign-check` runs the paper's algorithm on every linear.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sparse_recover.config import DsnotConfig
from sparse_recover.errors import ConfigError
from sparse_recover.rundir import RunDir, now

RECOMPUTE_METHODS = ("wanda", "magnitude")
SETTINGS_KEYS = ("init", "targets", "sign_check", "max_cycles", "threshold", "pow_var_regrow")


def is_attention(name: str) -> bool:
    lowered = name.lower()
    return "attn" in lowered or "attention" in lowered


def targeted(name: str, targets: str) -> bool:
    return targets == "all" or (targets == "attn") == is_attention(name)


def resolve_init(init: str | None, prune_method: str | None) -> str:
    """`init: null` means recompute after magnitude/Wanda (the reference), stored after SparseGPT."""
    if init is None:
        return "recompute" if prune_method in RECOMPUTE_METHODS else "stored"
    if init == "recompute" and prune_method not in RECOMPUTE_METHODS:
        raise ConfigError(
            f"--init recompute rebuilds the initial mask from {'/'.join(RECOMPUTE_METHODS)} scores inside the pass, "
            f"which cannot reproduce a {prune_method} mask (SparseGPT's mask comes with OBS-updated weights, and the "
            "reference's sparsegpt initial path is broken); use --init stored"
        )
    return init


def layer_targets(prune) -> dict[str, float]:
    """Per-linear targets of a layer-wise profile (OWL): DSnoT keeps each layer's count."""
    layers = prune.sparsity.layers if prune.sparsity else {}
    return {k: float(v["target"]) for k, v in layers.items() if "target" in v}


@dataclass
class DsnotRequest:
    cfg: DsnotConfig
    init: str
    prune_method: str
    pattern: Any

    def requested(self) -> dict[str, Any]:
        d = self.cfg.dsnot
        return {**{k: getattr(d, k) for k in SETTINGS_KEYS}, "init": self.init}


def prepare(cfg: DsnotConfig, rd: RunDir) -> DsnotRequest:
    from sparse_recover.engine.stageio import check_calibration, prune_calib

    rd.require("prune")
    prune = rd.record("prune")
    check_calibration(rd, prune_calib(rd))
    init = resolve_init(cfg.dsnot.init, prune.method)
    return DsnotRequest(cfg, init, prune.method, prune.parsed_pattern())


def dsnot_stage(req: DsnotRequest, rd: RunDir) -> dict[str, Any]:
    """Compute and commit RUN/dsnot; returns the manifest record."""
    from sparse_recover.data import tensor_sha256
    from sparse_recover.engine.snapshot import BlockRecorder, resolve_every, stage_snapshot
    from sparse_recover.engine.stageio import commit_checkpoint, dense_calibration, inputs_identity, layer_totals
    from sparse_recover.models import decoder_blocks, load_model
    from sparse_recover.refine.dsnot import DSnoTSettings
    from sparse_recover.runtime import format_seconds, metered, summary, versions
    from sparse_recover.sparsity.audit import CheckpointTensors
    from sparse_recover.sparsity.io import MASKS_FILE, load_masks
    from sparse_recover.sparsity.patterns import NM

    d, runtime, pattern, init = req.cfg.dsnot, req.cfg.model, req.pattern, req.init
    prune_dir, prune = rd.stage_dir("prune"), rd.record("prune")
    source, dev, dt, tokenizer, calib, windows, calib_meta, new_windows = dense_calibration(
        rd, runtime, d.batch_size, "DSnoT needs the dense weights")
    snap = stage_snapshot(rd, "dsnot", req.requested(), {"dtype": str(dt).replace("torch.", "")})
    snap.inputs = {"prune": prune.identity(), "windows_sha256": tensor_sha256(windows)}
    snap.check()  # an interrupted run with other settings: refused before the model is loaded
    stored_masks, _ = load_masks(prune_dir / MASKS_FILE)
    prune_tensors = CheckpointTensors(prune_dir)
    model = load_model(source, dtype=dt)
    blocks_name, model_blocks = decoder_blocks(model)
    found = snap.find(len(model_blocks))
    snap.every = resolve_every(d.checkpoint_every, model, calib.nsamples * calib.seqlen)
    settings = DSnoTSettings(max_cycles=d.max_cycles, threshold=d.threshold, pow_var_regrow=d.pow_var_regrow,
                             sign_check=d.sign_check)
    with metered() as meter:
        resume = snap.restore(model, found) if found is not None else None
        masks, layers, transposed = dsnot_model(
            model, windows, pattern, settings, init=init, targets=d.targets, prune_method=req.prune_method,
            stored_masks=stored_masks, prune_tensors=prune_tensors, device=dev, offload=d.offload,
            batch_size=d.batch_size, layer_targets=layer_targets(prune), resume=resume,
            after_block=BlockRecorder(snap, len(model_blocks), blocks_name))
        timing = meter.stop()
    overall = layer_totals(layers)
    swaps = sum(v.get("swaps", 0) for v in layers.values())
    refined = [v for v in layers.values() if v.get("refined")]
    err_before = sum(v["error_before"] for v in refined) / max(len(refined), 1)
    err_after = sum(v["error_after"] for v in refined) / max(len(refined), 1)
    group = "nm" if isinstance(pattern, NM) else ("row" if init == "recompute" else "prune-rows")
    reference = all(getattr(d, k) == type(d).model_fields[k].default for k in SETTINGS_KEYS if k != "init")
    entry = {
        "status": "complete",
        "finished": now(),
        "method": "dsnot",
        "group": group,
        "from": "prune",
        "inputs": inputs_identity(rd, "prune"),
        "prune_method": req.prune_method,
        "config": {**req.requested(), "offload": d.offload, "batch_size": d.batch_size, "device": runtime.device,
                   "dtype": runtime.dtype, "checkpoint_every": d.checkpoint_every, "reference_defaults": reference},
        "device": str(dev),
        "dtype": str(dt).replace("torch.", ""),
        "seed": calib.seed,
        "versions": versions(),
        "calibration": {**calib_meta, "windows_sha256": tensor_sha256(windows)},
        "swaps": swaps,
        "mean_error_before": err_before,
        "mean_error_after": err_after,
        "sparsity": {"target": pattern.sparsity, "overall": round(overall, 6), "linears": len(masks), "layers": layers},
        **timing,
    }
    if resume is not None:
        entry["resumed_at_block"] = resume.start + 1
    commit_checkpoint(rd, "dsnot", entry, model, tokenizer, masks, transposed, pattern,
                      windows=windows if new_windows else None, calib_meta=calib_meta,
                      log_header=f"dsnot {pattern.describe()} init={init} targets={d.targets} sign_check={d.sign_check}")
    snap.discard()  # the stage is committed: its progress is no longer needed
    summary(f"dsnot: {swaps} swaps over {len(refined)} refined linears ({d.targets}, init {init}), mean |error| "
            f"{err_before:.4g} -> {err_after:.4g}, {overall:.2%} sparse, in {format_seconds(timing['wall_time_s'])} "
            f"-> {rd.path / 'dsnot'}")
    return rd.stage_entry("dsnot")


def dsnot_model(model, windows, pattern, settings, *, init: str, targets: str, prune_method: str,
                stored_masks: dict[str, Any] | None, prune_tensors=None, device, offload: bool = False,
                batch_size: int = 1, show_progress: bool = True, layer_targets: dict[str, float] | None = None,
                resume=None, after_block=None):
    """Refine the masks of every decoder linear in place on the DENSE `model`; returns
    (masks, per-layer info, transposed names). Knows nothing of run directories.

    stored_masks: the prune stage's masks (which linears were pruned; the initial masks when
    init == "stored"); None refines every linear from a recomputed initial mask. prune_tensors: the prune checkpoint's tensors (kept values when "stored").
    layer_targets: per-linear unstructured targets of a layer-wise profile (OWL) instead of `pattern`.
    resume / after_block: as in prune.prune_model (continue after the blocks of a snapshot; see each block).
    """
    import torch

    from sparse_recover import refine
    from sparse_recover.engine.stageio import layerwise_with_progress
    from sparse_recover.models import is_conv1d, weight_2d
    from sparse_recover.sparsity.masks import count_kept
    from sparse_recover.sparsity.patterns import Unstructured

    own_targets = layer_targets or {}

    masks: dict[str, torch.Tensor] = dict(resume.masks) if resume else {}
    layers: dict[str, dict[str, Any]] = dict(resume.layers) if resume else {}
    transposed: list[str] = list(resume.transposed) if resume else []
    on_block = None
    if after_block is not None:
        def on_block(i, block, hidden):
            after_block(i, block, hidden, masks, layers, transposed)

    def process(ctx) -> None:
        for group in ctx.groups:
            stat = ctx.stats.get(group[0])
            for name in group:
                mod = ctx.linears[name]
                key = f"{ctx.prefix}.{name}.weight"
                if stored_masks is not None and key not in stored_masks:
                    continue  # the prune stage left this linear dense (never called): so does DSnoT
                if stat is None:
                    raise RuntimeError(f"{key} was pruned but never called during the DSnoT pass")
                dense = weight_2d(mod).detach()
                own = Unstructured(own_targets[key]) if key in own_targets else pattern
                if init == "recompute":
                    metric = dense.abs().float() if prune_method == "magnitude" else None
                    keep0 = refine.dsnot_initial_keep(dense, stat.sq_norm, own, initial_metric=metric)
                    base = dense
                else:
                    metric = None
                    keep0 = stored_masks[key].to(dense.device)
                    pruned_w = prune_tensors.get(key)
                    pruned_w = (pruned_w.t() if is_conv1d(mod) else pruned_w).to(dense.device, dense.dtype)
                    base = torch.where(keep0, pruned_w, dense)  # kept: prune-stage values; regrown: dense
                info: dict[str, Any] = {"refined": targeted(name, targets)}
                if info["refined"]:
                    res = refine.dsnot_refine(dense, keep0, stat.sq_norm, stat.sum, stat.var, own, settings,
                                              initial_metric=metric)
                    keep = res.keep
                    info.update(swaps=res.swaps, error_before=res.error_before.mean_abs,
                                error_after=res.error_after.mean_abs, error_sq_before=res.error_before.sum_sq,
                                error_sq_after=res.error_after.sum_sq, cycles=res.cycles_run)
                    if res.list_end_rows:
                        info["list_end_rows"] = res.list_end_rows
                    if res.skipped_groups:
                        info["skipped_groups"] = res.skipped_groups
                else:
                    keep = keep0
                with torch.no_grad():
                    weight_2d(mod).copy_(torch.where(keep, base, torch.zeros_like(base)))
                keep_cpu = keep.to("cpu")
                masks[key] = keep_cpu
                if is_conv1d(mod):
                    transposed.append(key)
                info.update(shape=list(keep_cpu.shape), kept=count_kept(keep_cpu),
                            sparsity=round(1 - count_kept(keep_cpu) / keep_cpu.numel(), 6))
                if key in own_targets:
                    info["target"] = own_targets[key]
                if stored_masks is not None:
                    info["changed_vs_prune"] = int((keep_cpu != stored_masks[key].to(torch.bool)).sum())
                layers[key] = info

    layerwise_with_progress(model, windows, process, f"dsnot {pattern.name} ({targets})", show_progress=show_progress,
                            statistic="dsnot", device=device, offload=offload, batch_size=batch_size,
                            propagate="pruned", start=resume.start if resume else 0,
                            resume_hidden=resume.hidden if resume else None, after_block=on_block)
    return masks, layers, transposed
