"""The merge engine: fold the fine-tuned adapters into the sparse checkpoint, reviving nothing.

One code path for every adapter: rebuild the adapted model from the stage fine-tuning started from
(its checkpoint and stored masks) and RUN/finetune, measure held-out perplexity with the adapters
unmerged, merge (every adapter checks that each pruned position stays exactly zero and refuses to
write otherwise), put the plain linears back, measure again, and write RUN/merge: a save_pretrained
checkpoint (+ tokenizer + the same masks.safetensors) that AutoModelForCausalLM and lm-eval load.

The manifest records the largest |dW| at pruned positions (0 by construction; the audit re-checks
it from the files) and both perplexities. For SPP, LoRS and SQFT they agree up to float rounding.
LoRA-then-remask trains without the mask, so re-masking at merge time changes the model: the
difference is the baseline's cost and is recorded, not hidden.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sparse_recover.config import MergeConfig
from sparse_recover.errors import NumericalError, RunDirError
from sparse_recover.rundir import RunDir, now

EXACT_METHODS = ("spp", "lors", "sqft")
PPL_SOURCE = "wiki-en"  # built in, so merge never needs the network
AGREE_RTOL = 1e-3


@dataclass
class MergeRequest:
    cfg: MergeConfig
    adapter_config: dict[str, Any]
    source_stage: str

    def requested(self) -> dict[str, Any]:
        return {"ppl_windows": self.cfg.merge.ppl_windows, "ppl_seqlen": self.cfg.merge.ppl_seqlen}


def prepare(cfg: MergeConfig, rd: RunDir) -> MergeRequest:
    from sparse_recover.engine.finetune import ADAPTER_CONFIG
    from sparse_recover.safeio import read_json

    ft_dir = rd.require("finetune")
    adapter_config = read_json(ft_dir / ADAPTER_CONFIG, error=RunDirError, what="adapter config")
    stage = adapter_config["from"]
    rd.require(stage)
    src = rd.record(stage)
    trained_on = adapter_config.get("masks_sha256")
    if trained_on and src.masks_sha256 and trained_on != src.masks_sha256:
        raise RunDirError(f"RUN/{stage} changed after fine-tuning (its masks differ from the ones the adapters were "
                          f"trained on): run `sparse-recover finetune --run-dir {rd.path} --force` again")
    return MergeRequest(cfg, adapter_config, stage)


def merge_stage(req: MergeRequest, rd: RunDir) -> dict[str, Any]:
    from sparse_recover.adapters import attach_adapters, get_adapter, load_adapter_state, merge_adapters, unload_adapters
    from sparse_recover.data import evaluation_text
    from sparse_recover.engine.finetune import ADAPTER_FILE, adapter_settings
    from sparse_recover.engine.stageio import commit_checkpoint, inputs_identity, load_sparse_stage
    from sparse_recover.evaluate.ppl import perplexity, tokenize_text
    from sparse_recover.models import resolve_device, resolve_dtype
    from sparse_recover.runtime import format_seconds, metered, summary, versions
    from sparse_recover.safeio import load_safetensors

    cfg, stage, ft = req.adapter_config, req.source_stage, rd.stage_dir("finetune")
    windows, seqlen = req.cfg.merge.ppl_windows, req.cfg.merge.ppl_seqlen
    dev = resolve_device(req.cfg.model.device)
    torch_dtype = resolve_dtype(req.cfg.model.dtype, dev)
    with metered() as meter:
        model, tokenizer, masks, transposed = load_sparse_stage(rd, stage, torch_dtype, dev)
        resolved = cfg["resolved"]
        adapters = attach_adapters(model, get_adapter(cfg["method"]), masks, adapter_settings(resolved),
                                   resolved["targets"])
        load_adapter_state(adapters, load_safetensors(ft / ADAPTER_FILE, error=RunDirError, what="adapter weights"))
        name, text = evaluation_text(PPL_SOURCE)
        ids = tokenize_text(tokenizer, text)
        model.eval()
        before = perplexity(model, ids, seqlen, dev, max_windows=windows)
        stats = merge_adapters(adapters, safe_merge=True, remember=False)
        unload_adapters(model, adapters)
        after = perplexity(model, ids, seqlen, dev, max_windows=windows)
        timing = meter.stop()
    rel = abs(after["ppl"] - before["ppl"]) / before["ppl"]
    agree = rel <= AGREE_RTOL
    if cfg["method"] in EXACT_METHODS and not agree:
        raise NumericalError(f"merged perplexity {after['ppl']:.4f} differs from the unmerged {before['ppl']:.4f} "
                             f"by {rel:.2%}: the merge does not reproduce the trained forward; RUN/merge not written")
    src = rd.record(stage)
    src_data = rd.stage_entry(stage)
    entry = {
        "status": "complete",
        "finished": now(),
        "config": {**req.requested(), "device": req.cfg.model.device, "dtype": req.cfg.model.dtype},
        "method": src.method,
        "finetune_method": cfg["method"],
        "group": src_data.get("group", "none"),
        "from": src_data.get("from", "prune") if src.group == "prune-rows" else stage,
        "source_stage": stage,
        "inputs": inputs_identity(rd, "finetune"),
        "sparsity": src_data.get("sparsity"),
        "merged_linears": stats["merged_linears"],
        "max_pruned_abs_delta": stats["max_pruned_abs_delta"],
        "ppl_check": {"data": name, "seqlen": seqlen, "windows": before["windows"],
                      "unmerged": before["ppl"], "merged": after["ppl"], "relative_change": rel,
                      "agree": agree, "tolerance": AGREE_RTOL},
        "device": str(dev),
        "dtype": str(torch_dtype).replace("torch.", ""),
        "versions": versions(),
        **timing,
    }
    commit_checkpoint(rd, "merge", entry, model, tokenizer, masks, transposed, src.parsed_pattern(),
                      log_header=f"merge {cfg['method']} adapters into {stage}")
    if cfg["method"] == "lora-remask":
        note = (f"re-masking changed held-out ppl {before['ppl']:.4f} -> {after['ppl']:.4f} ({rel:+.2%}): "
                "the LoRA-then-remask baseline's cost")
    else:
        note = f"held-out ppl {before['ppl']:.4f} unmerged = {after['ppl']:.4f} merged"
    summary(f"merge: {stats['merged_linears']} {cfg['method']} adapters into {stage}; max |dW| at pruned positions "
            f"{stats['max_pruned_abs_delta']:g}; {note}; {format_seconds(timing['wall_time_s'])} -> {rd.path / 'merge'}")
    return rd.stage_entry("merge")
