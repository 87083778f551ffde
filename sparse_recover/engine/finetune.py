"""The fine-tuning engine: sparsity-preserving fine-tuning of the newest sparse checkpoint.

Reads RUN/dsnot (or RUN/prune, or --from STAGE) and its stored masks, wraps the targeted linears in
adapters (SPP, LoRS, LoRA-then-remask, SQFT), trains only the adapters with one accelerate loop,
and writes RUN/finetune: adapter.safetensors, adapter_config.json, trainer_log.json and
training_state/ (the last checkpoint: optimizer, scheduler, RNG, step). While training, resumable
checkpoints live in RUN/.finetune.partial/; `--resume` continues from the newest one exactly, with
the interrupted run's stored settings. With `distill` kl | squarehead a frozen teacher (the dense base
model by default) is loaded once and the loss is train/distill.py's (1 - alpha) CE + alpha KD.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from typing import Any

from sparse_recover.config import FinetuneConfig, FinetuneSection
from sparse_recover.errors import ConfigError, RunDirError
from sparse_recover.rundir import RunDir, now

WORK_DIR = ".finetune.partial"
ADAPTER_FILE = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# settings that change the training result; anything else (logging cadence) may differ on --resume
RESUME_KEYS = ("method", "from_stage", "targets", "rank", "lora_alpha", "scaling", "dropout", "exact_grad", "ga_init",
               "init_samples", "data", "data_format", "seqlen", "train_on_inputs", "val_size", "max_train_samples",
               "epochs", "max_steps", "batch_size", "micro_batch_size", "lr", "min_lr", "weight_decay",
               "warmup_ratio", "scheduler", "max_grad_norm", "seed", "distill", "distill_alpha",
               "distill_temperature", "teacher")


def source_stage(rd: RunDir, from_stage: str) -> str:
    """The sparse checkpoint fine-tuning starts from: dsnot if complete, else prune (or the one asked for)."""
    rd.require_run()
    if from_stage == "auto":
        from sparse_recover.stages import STAGES

        for stage in STAGES["finetune"].inputs:  # in preference order
            if rd.is_complete(stage):
                return stage
        rd.require("prune")
    rd.require(from_stage)
    return from_stage


def stored_section(rd: RunDir) -> dict[str, Any] | None:
    """The settings of an interrupted fine-tuning run (what `--resume` continues with), or None."""
    from sparse_recover.safeio import read_json

    path = rd.path / WORK_DIR / "config.json"
    if not path.is_file():
        return None
    saved = read_json(path, error=RunDirError, what="interrupted fine-tuning settings")
    section = saved.get("section") or saved.get("resolved") or {}
    return {k: v for k, v in section.items() if k in FinetuneSection.model_fields}


def adapter_settings(resolved: dict[str, Any]):
    from sparse_recover.adapters import AdapterSettings

    return AdapterSettings(rank=resolved["rank"], scaling=resolved["scaling"], dropout=resolved["dropout"],
                           exact_grad=resolved["exact_grad"])


def train_settings(resolved: dict[str, Any]):
    from sparse_recover.train import TrainSettings

    keys = TrainSettings.__dataclass_fields__
    return TrainSettings(**{k: v for k, v in resolved.items() if k in keys})


def pad_token_id(tokenizer) -> int:
    for cand in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if cand is not None:
            return int(cand)
    return 0


TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_tracker(report_to: str) -> None:
    """One line (exit 2) when the tracker's package is not installed."""
    import importlib.util

    package = TRACKER_PACKAGES.get(report_to)
    if package and importlib.util.find_spec(package) is None:
        raise ConfigError(f"--report-to {report_to} needs the {package} package: pip install {package} "
                          "(or --report-to none)")


def make_accelerator(device: str, mixed_precision: str, report_to: str = "none", log_dir=None):
    import torch
    from accelerate import Accelerator

    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if mixed_precision == "auto":
        mixed_precision = "bf16" if (not cpu and torch.cuda.is_bf16_supported()) else "no"
    if cpu and mixed_precision != "no":
        raise ConfigError(f"mixed precision {mixed_precision} needs a GPU; on the CPU training runs in float32")
    if report_to == "none":
        return Accelerator(cpu=cpu, mixed_precision=mixed_precision)
    return Accelerator(cpu=cpu, mixed_precision=mixed_precision, log_with=report_to, project_dir=str(log_dir))


def teacher_source(rd: RunDir, teacher: str):
    """The distillation teacher's ModelSource: `dense` (the base model the manifest names), a checkpoint
    stage of this run (stages.CHECKPOINT_STAGES), or a model folder, hub id or built-in alias."""
    from sparse_recover.engine.stageio import dense_source
    from sparse_recover.errors import ModelSourceError
    from sparse_recover.models import ModelSource, resolve_model_source
    from sparse_recover.stages import CHECKPOINT_STAGES

    key = teacher.strip()
    if key.lower() == "dense":
        return dense_source(rd, "distillation needs it as the teacher: give --teacher STAGE|PATH")
    if key.lower() in CHECKPOINT_STAGES:
        return ModelSource(spec=key.lower(), kind="local", path=str(rd.require(key.lower())))
    try:
        return resolve_model_source(key)
    except ModelSourceError as exc:
        raise ModelSourceError(f"teacher {key}: {exc}") from None


def check_teacher(source, student_dir, distill: str) -> None:
    """One ConfigError line unless the teacher reads the student's tokens (same tokenizer and logit width)
    and, for SquareHead, has as many decoder blocks of the same width."""
    from sparse_recover.engine.stageio import tokenizer_identity
    from sparse_recover.errors import ModelSourceError
    from sparse_recover.models import ModelSource, load_config, load_tokenizer

    student = ModelSource(spec=str(student_dir), kind="local", path=str(student_dir))
    mine = tokenizer_identity(load_tokenizer(student.path))
    try:
        theirs = tokenizer_identity(load_tokenizer(source))
    except ModelSourceError as exc:  # a hub id that cannot be reached, a folder without a tokenizer
        raise ModelSourceError(f"teacher {source.spec}: {exc}") from None
    if mine != theirs:
        raise ConfigError(f"the teacher {source.spec} has another tokenizer ({theirs}) than the student ({mine}): "
                          "distillation compares the two models token by token over one vocabulary")
    scfg, tcfg = load_config(student), load_config(source)
    keys = {"vocab_size": "vocabulary size"}
    if distill == "squarehead":
        keys.update(num_hidden_layers="number of decoder blocks", hidden_size="hidden width")
    for key, what in keys.items():
        if getattr(scfg, key, None) != getattr(tcfg, key, None):
            raise ConfigError(f"the teacher {source.spec} has another {what} ({getattr(tcfg, key, None)}) than the "
                              f"student ({getattr(scfg, key, None)})" + (": SquareHead pairs the blocks one to one"
                                                                        if key != "vocab_size" else ""))


def load_distiller(section: FinetuneSection, source, student, dtype, dev):
    """(Distiller, record entry): the teacher loaded once, frozen, in the training dtype, on its device."""
    import torch

    from sparse_recover.models import config_fingerprint, load_model
    from sparse_recover.train.distill import Distiller, DistillSettings

    where = section.teacher_device
    tdev = dev if where == "same" or (where == "cuda" and dev.type == "cuda") else torch.device(where)
    if tdev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--teacher-device {where} needs a GPU")
    teacher = load_model(source, dtype=dtype, device=tdev)
    settings = DistillSettings(section.distill, section.distill_alpha, section.distill_temperature)
    try:
        distiller = Distiller(teacher, student, settings)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    info = {"kind": settings.kind, "alpha": settings.alpha, "temperature": settings.temperature,
            "teacher": section.teacher, "teacher_source": source.to_json(),
            "teacher_fingerprint": config_fingerprint(teacher.config), "teacher_device": str(tdev)}
    return distiller, info


@dataclass
class FinetuneRequest:
    cfg: FinetuneConfig
    stage: str
    resolved: dict[str, Any]
    teacher: Any = None  # the distillation teacher's ModelSource, or None

    def requested(self) -> dict[str, Any]:
        return {**self.resolved, "from_stage": self.stage}


def prepare(cfg: FinetuneConfig, rd: RunDir) -> FinetuneRequest:
    from sparse_recover.adapters import get_adapter
    from sparse_recover.train import latest_checkpoint

    from sparse_recover.engine.stageio import FINETUNE_DATA, check_data_source, check_seqlen
    from sparse_recover.models import ModelSource, load_config

    section = cfg.finetune
    get_adapter(section.method)
    check_tracker(section.report_to)
    if section.shard != "none":
        from sparse_recover.train.shard import check_shard

        check_shard(section.shard)
    check_data_source(section.data, FINETUNE_DATA)
    stage = source_stage(rd, section.from_stage)
    folder = str(rd.stage_dir(stage))
    check_seqlen(section.seqlen, load_config(ModelSource(spec=folder, kind="local", path=folder)),
                 "fine-tuning seqlen", folder)
    resolved = section.resolved()
    work_dir = rd.path / WORK_DIR
    if cfg.resume:
        if latest_checkpoint(work_dir) is None:
            raise RunDirError(f"--resume: {rd.path} has no interrupted fine-tuning to continue "
                              f"(no checkpoint in {work_dir}); run without --resume")
        from sparse_recover.safeio import read_json

        saved = read_json(work_dir / "config.json", error=RunDirError, what="interrupted fine-tuning settings")
        stored = saved.get("resolved", {})
        changed = [f"{k}: stored {stored.get(k)!r}, given {resolved.get(k)!r}"
                   for k in RESUME_KEYS if stored.get(k) != resolved.get(k)]
        if saved.get("from") != stage:
            changed.append(f"from: stored {saved.get('from')!r}, given {stage!r}")
        if changed:
            raise ConfigError(f"--resume: settings differ from the interrupted run ({'; '.join(changed)}); "
                              "resume with --resume alone (the stored settings) or start over with --force")
    teacher = None
    if section.distill != "none":
        teacher = teacher_source(rd, section.teacher)
        check_teacher(teacher, rd.stage_dir(stage), section.distill)
    return FinetuneRequest(cfg, stage, resolved, teacher)


def recorded_config(rec) -> dict[str, Any]:
    """A finetune record's settings with the method defaults filled in (records of the first release
    stored the section as typed, with None for each method default)."""
    config = rec.config
    source = config.get("from_stage")
    if source in (None, "auto"):
        source = (rec.model_extra or {}).get("from", source)
    known = {k: v for k, v in config.items() if k in FinetuneSection.model_fields}
    try:
        return {**FinetuneSection(**known).resolved(), "from_stage": source}
    except Exception:  # noqa: BLE001 - a record we cannot read back compares as it stands
        return dict(config)


def check_no_partial(req: FinetuneRequest, rd: RunDir, force: bool) -> None:
    """Starting anew over an interrupted run's checkpoint would lose it: say how to continue instead."""
    from sparse_recover.train import latest_checkpoint

    ckpt = latest_checkpoint(rd.path / WORK_DIR)
    if ckpt is not None and not req.cfg.resume and not force:
        raise RunDirError(f"an interrupted fine-tuning run in {rd.path} has a checkpoint at "
                          f"{ckpt.name}: continue it with --resume, or start over with --force")


def finetune_stage(req: FinetuneRequest, rd: RunDir) -> dict[str, Any]:
    import torch
    from safetensors.torch import save_file

    from sparse_recover.adapters import adapter_state_dict, attach_adapters, get_adapter
    from sparse_recover.adapters.lors import top_right_singular_vectors
    from sparse_recover.adapters.model import check_targets, find_targets
    from sparse_recover.data import training_data
    from sparse_recover.engine.stageio import inputs_identity, load_sparse_stage, write_log
    from sparse_recover.models import is_conv1d, resolve_dtype
    from sparse_recover.runtime import format_seconds, metered, versions
    from sparse_recover.train import BatchPlan, latest_checkpoint, train, weight_gradients

    section, stage, resolved, resume = req.cfg.finetune, req.stage, req.resolved, req.cfg.resume
    device, dtype = req.cfg.model.device, req.cfg.model.dtype
    cls = get_adapter(section.method)
    work_dir = rd.path / WORK_DIR
    manifest = rd.read()
    accelerator = make_accelerator(device, section.mixed_precision, section.report_to,
                                   rd.path / "logs" / section.report_to)
    dev = accelerator.device
    torch_dtype = resolve_dtype(dtype, dev)
    # Sharded on GPUs: the checkpoint is read into host memory and fully_shard moves one decoder block at a
    # time to the GPU and keeps this process's shard of it, so no GPU ever holds the whole model.
    load_dev = torch.device("cpu") if section.shard == "fsdp" else dev
    model, tokenizer, masks, transposed = load_sparse_stage(rd, stage, torch_dtype, load_dev)
    distiller, distill_info = None, None
    if req.teacher is not None:  # loaded before anything is written: a teacher that fails leaves RUN as it was
        distiller, distill_info = load_distiller(section, req.teacher, model, torch_dtype, dev)
    targets = find_targets(model, section.targets)
    check_targets(targets, cls, section.rank)
    data = training_data(section.data, tokenizer, data_format=section.data_format, seqlen=section.seqlen,
                         train_on_inputs=section.train_on_inputs, val_size=section.val_size, seed=section.seed,
                         max_train_samples=section.max_train_samples)
    settings = train_settings(resolved)
    plan = BatchPlan(len(data.train), settings, accelerator.num_processes, accelerator.process_index)
    pad_id = pad_token_id(tokenizer)
    main = accelerator.is_main_process
    if main and not resume:
        if work_dir.exists():
            shutil.rmtree(work_dir)
        work_dir.mkdir(parents=True)
        (work_dir / "config.json").write_text(json.dumps({"resolved": resolved, "section": section.model_dump(),
                                                          "from": stage}, indent=1))
    accelerator.wait_for_everyone()

    with metered() as meter:
        init_info: dict[str, Any] = {"kind": "default"}
        grads = None
        if section.method == "lors" and section.ga_init and not resume:
            examples = data.train[: section.init_samples]
            grads = weight_gradients(model, targets, examples, section.micro_batch_size, pad_id, accelerator,
                                     device=load_dev)
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
                  f"sequences on {accelerator.num_processes} process(es)" + (" (resuming)" if resume else "")
                  + (f"; distilling ({section.distill}, alpha {section.distill_alpha}, T {section.distill_temperature}) "
                     f"from {req.teacher.spec} on {distill_info['teacher_device']}" if distiller else ""))
        if main and section.shard == "fsdp" and accelerator.num_processes == 1:
            print("finetune: --shard fsdp on one process runs the FSDP2 path but holds the whole model; launch "
                  "several processes (accelerate launch --num_processes N) to split it")
        if section.report_to != "none":  # one tracker run per stage; a resumed run logs into the same one
            accelerator.init_trackers("finetune", config={k: v for k, v in resolved.items()
                                                          if isinstance(v, (int, float, str, bool))})
        try:
            result = train(model, adapters, data, settings, accelerator, pad_id=pad_id, work_dir=work_dir,
                           resume=resume, describe=f"finetune {section.method}", distiller=distiller)
        finally:
            if section.report_to != "none":
                accelerator.end_training()
            if distiller is not None:
                distiller.close()
                del distiller
        timing = meter.stop()
    weights = adapter_state_dict(adapters)  # every process: sharded adapters are gathered (collective)

    entry: dict[str, Any] = {}
    if main:
        final = latest_checkpoint(work_dir)
        adapter_config = {"method": section.method, "from": stage, "targets": list(adapters), "resolved": resolved,
                          "trainable_params": n_train, "masks_sha256": manifest["stages"][stage].get("masks_sha256"),
                          "init": init_info}
        entry = {
            "status": "complete",
            "finished": now(),
            "config": req.requested(),
            "section": section.model_dump(),
            "resolved": resolved,
            "method": section.method,
            "from": stage,
            "inputs": inputs_identity(rd, stage),
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
        if distill_info is not None:
            entry["distill"] = distill_info
        if result.shard:
            entry["shard"] = result.shard
        with rd.staging("finetune", replacing="finetune") as (tmp,):
            save_file(weights, str(tmp / ADAPTER_FILE))
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=1))
            (tmp / "trainer_log.json").write_text(json.dumps({"history": result.history, "evals": result.evals},
                                                             indent=1))
            shutil.copytree(final, tmp / "training_state")
            if section.method == "lora-remask":  # plain LoRA while training: peft can load it as it is
                from sparse_recover.adapters.peft_export import write_peft_adapter

                write_peft_adapter(tmp / "peft", weights, targets=list(adapters), resolved=resolved,
                                   base=str(rd.stage_dir(stage)), conv1d=any(is_conv1d(a.base)
                                                                             for a in adapters.values()))
        rd.commit("finetune", entry)  # a merge of the previous adapters becomes stale
        shutil.rmtree(work_dir, ignore_errors=True)
        write_log(rd, "finetune", f"finetune {section.method} from {stage}",
                  [f"  {json.dumps(rec)}" for rec in result.history]
                  + [f"  eval {json.dumps(rec)}" for rec in result.evals], entry["finished"])
        last = result.evals[-1] if result.evals else {}
        print(f"finetune: {result.steps} steps, {result.tokens:,} tokens in {format_seconds(timing['wall_time_s'])}; "
              f"final train loss {entry['train']['final_loss']}, held-out loss {last.get('eval_loss', float('nan')):.4f} "
              f"-> {rd.path / 'finetune'}", file=sys.stdout)
    accelerator.wait_for_everyone()
    return entry
