"""`sparse-recover merge`: fold the fine-tuned adapters into the sparse checkpoint, reviving nothing.

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

import json
from typing import Any

from sparse_recover.errors import NumericalError, RunDirError
from sparse_recover.rundir import RunDir, now

EXACT_METHODS = ("spp", "lors", "sqft")
PPL_SOURCE = "wiki-en"  # built in, so merge never needs the network
AGREE_RTOL = 1e-3


def run(run_dir: str, *, device: str = "auto", dtype: str = "auto", force: bool = False, ppl_windows: int = 8,
        ppl_seqlen: int = 512) -> dict[str, Any]:
    from safetensors.torch import load_file

    from sparse_recover.adapters import attach_adapters, get_adapter, load_adapter_state, merge_adapters, unload_adapters
    from sparse_recover.commands.finetune import ADAPTER_CONFIG, ADAPTER_FILE, adapter_settings, load_sparse_stage
    from sparse_recover.commands.prune import commit_stage
    from sparse_recover.data import evaluation_text
    from sparse_recover.evaluate.ppl import perplexity, tokenize_text
    from sparse_recover.models import resolve_device, resolve_dtype
    from sparse_recover.runtime import format_seconds, metered, quiet_libraries, versions
    from sparse_recover.sparsity.patterns import Unstructured, parse_pattern

    quiet_libraries()
    rd = RunDir(run_dir)
    if not rd.exists():
        raise RunDirError(f"{rd.path} is not a run directory (no manifest.json)")
    ft_dir = rd.require("finetune")
    manifest = rd.read()
    if rd.is_complete("merge") and not force:
        entry = manifest["stages"]["merge"]
        print(f"merge stage already complete in {rd.path} (max |dW| at pruned positions "
              f"{entry.get('max_pruned_abs_delta')}): re-merging is a no-op (use --force to merge again)")
        return entry
    cfg = json.loads((ft_dir / ADAPTER_CONFIG).read_text())
    stage = cfg["from"]
    rd.require(stage)
    src_entry = manifest["stages"][stage]
    if cfg.get("masks_sha256") and src_entry.get("masks_sha256") and cfg["masks_sha256"] != src_entry["masks_sha256"]:
        raise RunDirError(f"RUN/{stage} changed after fine-tuning (its masks differ from the ones the adapters were "
                          f"trained on): run `sparse-recover finetune --run-dir {rd.path} --force` again")
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    with metered() as meter:
        model, tokenizer, masks, transposed = load_sparse_stage(rd, stage, torch_dtype, dev)
        resolved = cfg["resolved"]
        adapters = attach_adapters(model, get_adapter(cfg["method"]), masks, adapter_settings(resolved),
                                   resolved["targets"])
        load_adapter_state(adapters, load_file(str(ft_dir / ADAPTER_FILE)))
        name, text = evaluation_text(PPL_SOURCE)
        ids = tokenize_text(tokenizer, text)
        model.eval()
        before = perplexity(model, ids, ppl_seqlen, dev, max_windows=ppl_windows)
        stats = merge_adapters(adapters, safe_merge=True, remember=False)
        unload_adapters(model, adapters)
        after = perplexity(model, ids, ppl_seqlen, dev, max_windows=ppl_windows)
        timing = meter.stop()
    rel = abs(after["ppl"] - before["ppl"]) / before["ppl"]
    agree = rel <= AGREE_RTOL
    if cfg["method"] in EXACT_METHODS and not agree:
        raise NumericalError(f"merged perplexity {after['ppl']:.4f} differs from the unmerged {before['ppl']:.4f} "
                             f"by {rel:.2%}: the merge does not reproduce the trained forward; RUN/merge not written")
    pattern_name = src_entry.get("pattern", "unstructured")
    target = (src_entry.get("sparsity") or {}).get("target")
    pattern = Unstructured(float(target)) if pattern_name == "unstructured" else parse_pattern(pattern_name)
    group = src_entry.get("group", "none")
    entry = {
        "status": "complete",
        "finished": now(),
        "method": src_entry.get("method"),
        "finetune_method": cfg["method"],
        "pattern": pattern_name,
        "group": group,
        "from": src_entry.get("from", "prune") if group == "prune-rows" else stage,
        "source_stage": stage,
        "sparsity": src_entry.get("sparsity"),
        "merged_linears": stats["merged_linears"],
        "max_pruned_abs_delta": stats["max_pruned_abs_delta"],
        "ppl_check": {"data": name, "seqlen": ppl_seqlen, "windows": before["windows"],
                      "unmerged": before["ppl"], "merged": after["ppl"], "relative_change": rel,
                      "agree": agree, "tolerance": AGREE_RTOL},
        "device": str(dev),
        "dtype": str(torch_dtype).replace("torch.", ""),
        "versions": versions(),
        **timing,
    }
    commit_stage(rd, "merge", entry, model, tokenizer, masks, transposed, pattern,
                 log_header=f"merge {cfg['method']} adapters into {stage}")
    if cfg["method"] == "lora-remask":
        note = (f"re-masking changed held-out ppl {before['ppl']:.4f} -> {after['ppl']:.4f} ({rel:+.2%}): "
                "the LoRA-then-remask baseline's cost")
    else:
        note = f"held-out ppl {before['ppl']:.4f} unmerged = {after['ppl']:.4f} merged"
    print(f"merge: {stats['merged_linears']} {cfg['method']} adapters into {stage}; max |dW| at pruned positions "
          f"{stats['max_pruned_abs_delta']:g}; {note}; {format_seconds(timing['wall_time_s'])} -> {rd.path / 'merge'}")
    return entry
