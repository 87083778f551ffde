"""The reconstruct engine: keep a stored mask fixed and re-solve the kept weights with SparseGPT's
column-wise OBS updates (llm-compressor's `preserve_sparsity_mask`), writing RUN/reconstruct.

Why a stage of its own rather than `prune --mask-from STAGE`: the mask comes from a stage of the same
run (prune or dsnot), so writing the result into RUN/prune would make the very stage it was read from
stale; a separate stage keeps the chain visible (wanda -> dsnot -> reconstruct), is audited and
evaluated like the others, and fine-tuning picks it up (reconstruct, else dsnot, else prune).

The pass starts from the dense base weights (as SparseGPT does), collects each block's Hessian on the
calibration windows of the prune stage, re-solves every pruned linear with its stored mask, and feeds
the reconstructed block's outputs to the next block. The masks written are the input masks, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sparse_recover.config import ReconstructConfig
from sparse_recover.errors import RunDirError
from sparse_recover.rundir import RunDir, now

SETTINGS_KEYS = ("from_stage", "blocksize", "percdamp")


@dataclass
class ReconstructRequest:
    cfg: ReconstructConfig
    source_stage: str

    def requested(self) -> dict[str, Any]:
        r = self.cfg.reconstruct
        return {"from_stage": self.source_stage, "blocksize": r.blocksize, "percdamp": r.percdamp}


def prepare(cfg: ReconstructConfig, rd: RunDir) -> ReconstructRequest:
    from sparse_recover.engine.stageio import check_calibration, prune_calib
    from sparse_recover.stages import STAGES

    rd.require_run()
    wanted = cfg.reconstruct.from_stage
    if wanted == "auto":
        wanted = next((s for s in STAGES["reconstruct"].inputs if rd.is_complete(s)), "prune")
    rd.require(wanted)
    check_calibration(rd, prune_calib(rd))
    return ReconstructRequest(cfg, wanted)


def reconstruct_stage(req: ReconstructRequest, rd: RunDir) -> dict[str, Any]:
    from sparse_recover.data import tensor_sha256
    from sparse_recover.engine.stageio import commit_checkpoint, dense_calibration, inputs_identity, layer_totals
    from sparse_recover.models import load_model
    from sparse_recover.runtime import format_seconds, metered, summary, versions
    from sparse_recover.sparsity.io import MASKS_FILE, load_masks

    r, runtime, stage = req.cfg.reconstruct, req.cfg.model, req.source_stage
    src = rd.record(stage)
    source, dev, dt, tokenizer, calib, windows, calib_meta, new_windows = dense_calibration(
        rd, runtime, r.batch_size, "reconstruction starts from the dense weights")
    masks, _ = load_masks(rd.stage_dir(stage) / MASKS_FILE)
    model = load_model(source, dtype=dt)
    with metered() as meter:
        layers, transposed = reconstruct_model(model, windows, masks, blocksize=r.blocksize, percdamp=r.percdamp,
                                               device=dev, offload=r.offload, batch_size=r.batch_size)
        timing = meter.stop()
    src_layers = src.sparsity.layers if src.sparsity else {}
    for key, info in layers.items():  # a layer-wise profile's per-linear targets carry over with the mask
        if "target" in src_layers.get(key, {}):
            info["target"] = src_layers[key]["target"]
    overall = layer_totals(layers)
    obs = sum(v["obs_error"] for v in layers.values())
    src_data = rd.stage_entry(stage)
    entry = {
        "status": "complete",
        "finished": now(),
        "method": "sparsegpt-reconstruct",
        "mask_method": src.method,
        "group": src_data.get("group", "none"),
        "from": src_data.get("from", "prune") if src.group == "prune-rows" else stage,
        "source_stage": stage,
        "inputs": inputs_identity(rd, stage),
        "config": {**req.requested(), "offload": r.offload, "batch_size": r.batch_size, "device": runtime.device,
                   "dtype": runtime.dtype},
        "device": str(dev),
        "dtype": str(dt).replace("torch.", ""),
        "seed": calib.seed,
        "versions": versions(),
        "calibration": {**calib_meta, "windows_sha256": tensor_sha256(windows)},
        "obs_error": obs,
        "sparsity": {**({k: v for k, v in src_data["sparsity"].items() if k != "layers"}),
                     "overall": round(overall, 6), "linears": len(layers), "layers": layers},
        **timing,
    }
    commit_checkpoint(rd, "reconstruct", entry, model, tokenizer, masks, transposed, src.parsed_pattern(),
                      windows=windows if new_windows else None, calib_meta=calib_meta,
                      log_header=f"reconstruct {stage} masks with SparseGPT (blocksize {r.blocksize})")
    summary(f"reconstruct: {len(layers)} linears of {stage} re-solved with their masks fixed, OBS error {obs:.4g}, "
            f"{overall:.2%} sparse, in {format_seconds(timing['wall_time_s'])} -> {rd.path / 'reconstruct'}")
    return rd.stage_entry("reconstruct")


def reconstruct_model(model, windows, masks: dict[str, Any], *, blocksize: int = 128, percdamp: float = 0.01,
                      device, offload: bool = False, batch_size: int = 1, show_progress: bool = True):
    """Re-solve, in place on the DENSE `model`, every linear that `masks` names, with its mask fixed;
    returns (per-layer info, transposed names). Linears the masks do not name stay dense."""
    import torch

    from sparse_recover.engine.stageio import layerwise_with_progress
    from sparse_recover.models import is_conv1d, weight_2d
    from sparse_recover.pruning import PruneSettings, sparsegpt_reconstruct
    from sparse_recover.sparsity.masks import count_kept
    from sparse_recover.sparsity.patterns import Unstructured

    layers: dict[str, dict[str, Any]] = {}
    transposed: list[str] = []
    settings = PruneSettings(pattern=Unstructured(0.5), blocksize=blocksize, percdamp=percdamp)  # pattern unused

    def process(ctx) -> None:
        for group in ctx.groups:
            names = [n for n in group if f"{ctx.prefix}.{n}.weight" in masks]
            if not names:
                continue
            stat = ctx.stats.get(group[0])
            if stat is None:
                raise RunDirError(f"{ctx.prefix}.{names[0]} has a stored mask but was never called during "
                                  "calibration: nothing to reconstruct it from")
            mods = [ctx.linears[n] for n in names]
            keeps = [masks[f"{ctx.prefix}.{n}.weight"].to(stat.value.device) for n in names]
            for name, mod, keep in zip(names, mods, keeps):
                if tuple(keep.shape) != tuple(weight_2d(mod).shape):
                    raise RunDirError(f"the stored mask of {ctx.prefix}.{name} has shape {tuple(keep.shape)}, "
                                      f"the weight {tuple(weight_2d(mod).shape)}")
            outcomes = sparsegpt_reconstruct([weight_2d(m).detach() for m in mods], stat.value, keeps, settings)
            for name, mod, keep, res in zip(names, mods, keeps, outcomes):
                key = f"{ctx.prefix}.{name}.weight"
                with torch.no_grad():
                    w2 = weight_2d(mod)
                    w2.copy_(res.weight.to(w2.dtype))
                    w2.masked_fill_(~keep.to(w2.device), 0)
                if is_conv1d(mod):
                    transposed.append(key)
                keep_cpu = keep.to("cpu")
                layers[key] = {"shape": list(keep_cpu.shape), "kept": count_kept(keep_cpu),
                               "sparsity": round(1 - count_kept(keep_cpu) / keep_cpu.numel(), 6), **res.info}

    layerwise_with_progress(model, windows, process, "reconstruct (sparsegpt)", show_progress=show_progress,
                            statistic="hessian", device=device, offload=offload, batch_size=batch_size,
                            propagate="pruned")
    return layers, transposed
