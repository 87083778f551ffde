"""`sparse-recover finetune`: sparsity-preserving fine-tuning of the newest sparse checkpoint.

Reads RUN/dsnot (or RUN/prune, or --from STAGE) and its stored masks, wraps the targeted linears in
adapters (SPP, LoRS, LoRA-then-remask, SQFT), trains only the adapters with one accelerate loop,
and writes RUN/finetune: adapter.safetensors, adapter_config.json, trainer_log.json and
training_state/ (the last checkpoint: optimizer, scheduler, RNG, step). While training, resumable
checkpoints live in RUN/.finetune.partial/; `--resume` continues from the newest one exactly.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

from sparse_recover.config import FinetuneSection
from sparse_recover.errors import ConfigError, RunDirError
from sparse_recover.rundir import RunDir, now

WORK_DIR = ".finetune.partial"
ADAPTER_FILE = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# settings that change the training result; anything else (logging cadence) may differ on --resume
RESUME_KEYS = ("method", "from_stage", "targets", "rank", "lora_alpha", "scaling", "dropout", "exact_grad", "ga_init",
               "init_samples", "data", "data_format", "seqlen", "train_on_inputs", "val_size", "max_train_samples",
               "epochs", "max_steps", "batch_size", "micro_batch_size", "lr", "min_lr", "weight_decay",
               "warmup_ratio", "scheduler", "max_grad_norm", "seed")


def source_stage(rd: RunDir, from_stage: str) -> str:
    """The sparse checkpoint fine-tuning starts from: dsnot if complete, else prune (or the one asked for)."""
    if not rd.exists():
        raise RunDirError(f"{rd.path} is not a run directory (no manifest.json): run `sparse-recover prune "
                          f"--run-dir {rd.path} --model ... --method wanda` first")
    if from_stage == "auto":
        for stage in ("dsnot", "prune"):
            if rd.is_complete(stage):
                return stage
        raise RunDirError(f"run directory {rd.path} has no sparse checkpoint to fine-tune: run "
                          f"`sparse-recover prune --run-dir {rd.path} --model ... --method wanda` first")
    rd.require(from_stage)
    return from_stage


def adapter_settings(resolved: dict[str, Any]):
    from sparse_recover.adapters import AdapterSettings

    return AdapterSettings(rank=resolved["rank"], scaling=resolved["scaling"], dropout=resolved["dropout"],
                           exact_grad=resolved["exact_grad"])


def train_settings(resolved: dict[str, Any]):
    from sparse_recover.train import TrainSettings

    keys = TrainSettings.__dataclass_fields__
    return TrainSettings(**{k: v for k, v in resolved.items() if k in keys})


def load_sparse_stage(rd: RunDir, stage: str, dtype, device):
    """(model, tokenizer, masks, transposed names) of a checkpoint stage."""
    from sparse_recover.models import load_model, load_tokenizer
    from sparse_recover.sparsity.io import MASKS_FILE, load_masks

    folder = rd.stage_dir(stage)
    masks, meta = load_masks(folder / MASKS_FILE)
    model = load_model(str(folder), dtype=dtype, device=device)
    tokenizer = load_tokenizer(str(folder))
    return model, tokenizer, masks, json.loads(meta.get("transposed", "[]"))


def pad_token_id(tokenizer) -> int:
    for cand in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if cand is not None:
            return int(cand)
    return 0


def make_accelerator(device: str, mixed_precision: str):
    import torch
    from accelerate import Accelerator

    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if mixed_precision == "auto":
        mixed_precision = "bf16" if (not cpu and torch.cuda.is_bf16_supported()) else "no"
    if cpu and mixed_precision != "no":
        raise ConfigError(f"mixed precision {mixed_precision} needs a GPU; on the CPU training runs in float32")
    return Accelerator(cpu=cpu, mixed_precision=mixed_precision)


def run(section: FinetuneSection, run_dir: str, *, device: str = "auto", dtype: str = "auto", resume: bool = False,
        force: bool = False) -> dict[str, Any]:
    import torch
    from safetensors.torch import save_file

    from sparse_recover.adapters import attach_adapters, adapter_state_dict, get_adapter
    from sparse_recover.adapters.lors import top_right_singular_vectors
    from sparse_recover.adapters.model import check_targets, find_targets
    from sparse_recover.data import training_data
    from sparse_recover.models import resolve_dtype
    from sparse_recover.runtime import format_seconds, metered, quiet_libraries, versions
    from sparse_recover.train import latest_checkpoint, train, weight_gradients

    quiet_libraries()
    # ---- validate everything before touching the run directory
    resolved = section.resolved()
    cls = get_adapter(section.method)
    rd = RunDir(run_dir)
    stage = source_stage(rd, section.from_stage)
    manifest = rd.read()
    work_dir = rd.path / WORK_DIR
    if rd.is_complete("finetune") and not force:
        entry = manifest["stages"]["finetune"]
        print(f"finetune stage already complete in {rd.path} ({entry.get('method')}, "
              f"{entry.get('train', {}).get('steps')} steps): nothing to do (use --force to redo it)")
        return entry
    ckpt = latest_checkpoint(work_dir)
    if resume:
        if ckpt is None:
            raise RunDirError(f"--resume: {rd.path} has no interrupted fine-tuning to continue "
                              f"(no checkpoint in {work_dir}); run without --resume")
        saved = json.loads((work_dir / "config.json").read_text())
        changed = [k for k in RESUME_KEYS if saved.get("resolved", {}).get(k) != resolved.get(k)]
        if changed or saved.get("from") != stage:
            raise ConfigError(f"--resume: settings differ from the interrupted run ({', '.join(changed) or 'from'}); "
                              "resume with the same settings or start over with --force")
    elif ckpt is not None and not force:
        raise RunDirError(f"an interrupted fine-tuning run in {rd.path} has a checkpoint at "
                          f"{ckpt.name}: continue it with --resume, or start over with --force")
    accelerator = make_accelerator(device, section.mixed_precision)
    dev = accelerator.device
    torch_dtype = resolve_dtype(dtype, dev)
    model, tokenizer, masks, transposed = load_sparse_stage(rd, stage, torch_dtype, dev)
    targets = find_targets(model, section.targets)
    check_targets(targets, cls, section.rank)
    data = training_data(section.data, tokenizer, data_format=section.data_format, seqlen=section.seqlen,
                         train_on_inputs=section.train_on_inputs, val_size=section.val_size, seed=section.seed,
                         max_train_samples=section.max_train_samples)
    settings = train_settings(resolved)
    from sparse_recover.train import BatchPlan

    plan = BatchPlan(len(data.train), settings, accelerator.num_processes, accelerator.process_index)
    pad_id = pad_token_id(tokenizer)
    main = accelerator.is_main_process
    if main and not resume:
        if work_dir.exists():
            shutil.rmtree(work_dir)
        work_dir.mkdir(parents=True)
        (work_dir / "config.json").write_text(json.dumps({"resolved": resolved, "from": stage}, indent=1))
    accelerator.wait_for_everyone()

    with metered() as meter:
        init_info: dict[str, Any] = {"kind": "default"}
        grads = None
        if section.method == "lors" and section.ga_init and not resume:
            examples = data.train[: section.init_samples]
            grads = weight_gradients(model, targets, examples, section.micro_batch_size, pad_id, accelerator)
            init_info = {"kind": "gradient (LoRA-GA style)", "examples": len(examples)}
        torch.manual_seed(section.seed)  # adapter init (SPP alpha, LoRA A, LoRS B) is seeded
        adapters = attach_adapters(model, cls, masks, adapter_settings(resolved), section.targets)
        if grads is not None:
            for i, (name, adapter) in enumerate(adapters.items()):
                adapter.set_gradient_init(top_right_singular_vectors(grads[name].to(dev), section.rank,
                                                                     seed=section.seed + i).cpu())
            del grads
        n_train = sum(a.trainable_count() for a in adapters.values())
        n_base = sum(p.numel() for p in model.parameters()) - n_train
        if main:
            print(f"finetune: {section.method} on {stage} ({len(adapters)} linears, {n_train:,} trainable parameters "
                  f"= {n_train / n_base:.3%} of {n_base:,}); {data.info['train']} training / {data.info['val']} "
                  f"held-out {data.kind} examples from {data.name}; {plan.total_steps} steps of {section.batch_size} "
                  f"sequences on {accelerator.num_processes} process(es)" + (" (resuming)" if resume else ""))
        result = train(model, adapters, data, settings, accelerator, pad_id=pad_id, work_dir=work_dir, resume=resume,
                       describe=f"finetune {section.method}")
        timing = meter.stop()

    entry: dict[str, Any] = {}
    if main:
        final = latest_checkpoint(work_dir)
        adapter_config = {"method": section.method, "from": stage, "targets": list(adapters), "resolved": resolved,
                          "trainable_params": n_train, "masks_sha256": manifest["stages"][stage].get("masks_sha256"),
                          "init": init_info}
        entry = {
            "status": "complete",
            "finished": now(),
            "config": section.model_dump(),
            "resolved": resolved,
            "method": section.method,
            "from": stage,
            "adapted_linears": len(adapters),
            "trainable_params": n_train,
            "init": init_info,
            "data": data.info,
            "device": str(dev),
            "dtype": str(torch_dtype).replace("torch.", ""),
            "mixed_precision": accelerator.mixed_precision,
            "world_size": accelerator.num_processes,
            "versions": versions(),
            "train": {"method": section.method, "steps": result.steps, "tokens": result.tokens,
                      "wall_time_s": round(result.wall_time_s, 3), "trainable_params": n_train,
                      "final_loss": result.history[-1]["loss"] if result.history else None,
                      "final_eval_loss": result.evals[-1]["eval_loss"] if result.evals else None,
                      "resumed_from": result.resumed_from},
            **timing,
        }
        with rd.staging("finetune") as (tmp,):
            save_file(adapter_state_dict(adapters), str(tmp / ADAPTER_FILE))
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=1))
            (tmp / "trainer_log.json").write_text(json.dumps({"history": result.history, "evals": result.evals},
                                                             indent=1))
            shutil.copytree(final, tmp / "training_state")
        data_m = rd.read()
        data_m["stages"]["finetune"] = entry
        if "merge" in data_m["stages"]:  # merged from the old adapters: no longer what finetune holds
            data_m["stages"]["merge"]["status"] = "stale"
            data_m["stages"]["merge"]["stale_since"] = entry["finished"]
            if "merge" in data_m.get("evals", {}):
                data_m["stages"]["merge"]["stale_evals"] = data_m["evals"].pop("merge")
            print(f"finetune: RUN/merge was made from the previous adapters and is now marked stale: run "
                  f"`sparse-recover merge --run-dir {rd.path} --force`")
        rd.write(data_m)
        shutil.rmtree(work_dir, ignore_errors=True)
        log_path = rd.path / "logs" / "finetune.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a", encoding="utf-8") as fh:
            fh.write(f"[{entry['finished']}] finetune {section.method} from {stage}\n")
            for rec in result.history:
                fh.write(f"  {json.dumps(rec)}\n")
            for rec in result.evals:
                fh.write(f"  eval {json.dumps(rec)}\n")
        last = result.evals[-1] if result.evals else {}
        print(f"finetune: {result.steps} steps, {result.tokens:,} tokens in {format_seconds(timing['wall_time_s'])}; "
              f"final train loss {entry['train']['final_loss']}, held-out loss {last.get('eval_loss', float('nan')):.4f} "
              f"-> {rd.path / 'finetune'}", file=sys.stdout)
    accelerator.wait_for_everyone()
    return entry
