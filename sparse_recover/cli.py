"""The `sparse-recover` command line. Thin: options -> config -> commands.<name>.run.

Heavy imports (torch, transformers) happen inside the commands, so `--help` is instant. A
SparseRecoverError ends the process with one line on stderr and its exit code, no traceback.
"""

from __future__ import annotations

import os
import sys
from typing import List, Optional

import typer

try:  # typer >= 0.20 vendors click as typer._click; older typer uses the click package
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover
    from click import exceptions as click_exceptions

from sparse_recover.errors import SparseRecoverError

app = typer.Typer(
    name="sparse-recover",
    help="Prune causal LMs (magnitude, Wanda, SparseGPT, RIA; unstructured or N:M = keep N of M), "
    "refine the masks, recover accuracy, and audit every zero.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _print_version(value: bool) -> None:
    if value:
        from sparse_recover import __version__

        print(f"sparse-recover {__version__}")
        raise typer.Exit(0)


@app.callback()
def _output(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
    verbose: bool = typer.Option(False, "--verbose", help="Also the libraries' progress bars and messages "
                                 "(Hugging Face, lm-eval, git) and a header per pipeline stage."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only the summary line(s) and errors; no progress bars."),
):
    # global options (`sparse-recover --quiet run ...`): the output policy of runtime.py, not a command setting
    from sparse_recover.runtime import NORMAL, QUIET, VERBOSE, configure_output

    if verbose and quiet:
        raise SparseRecoverError("--verbose and --quiet exclude each other")
    configure_output(VERBOSE if verbose else QUIET if quiet else NORMAL)


# ------------------------------------------------------------------------------------------------
# Options -> typed config. Every option names the config field it sets; its default is read from
# that field (config.py is the only place defaults live). Precedence: defaults < --config FILE <
# options typed here < --set section.key=value.

def _field(cls, path: str):
    """The pydantic field behind `section.key` of config class `cls`."""
    *sections, key = path.split(".")
    for name in sections:
        cls = cls.model_fields[name].annotation
    return cls.model_fields[key]


def _default(cls, path: str, *flags: str, help: str | None = None, **kw):
    """A typer.Option whose default and help come from the config field at `path`."""
    field = _field(cls, path)
    default = field.get_default(call_default_factory=True)
    if isinstance(default, list):
        default = ",".join(map(str, default))
    return typer.Option(default, *flags, help=help or field.description, **kw)


def _explicit(ctx: typer.Context) -> set[str]:
    """The options typed on the command line (not defaults)."""
    return {name for name in ctx.params
            if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")}


def _nest(path: str, value) -> dict:
    out: dict = {}
    node = out
    *sections, key = path.split(".")
    for name in sections:
        node = node.setdefault(name, {})
    node[key] = value
    return out


def _file_sections(cls, path: str) -> dict:
    """The sections of a YAML file that `cls` has (a whole pipeline YAML serves every command); the
    model section of a stage after prune keeps only where it runs (the run directory names the model)."""
    from sparse_recover.config import load_yaml

    data = load_yaml(path)
    out = {k: v for k, v in data.items() if k in cls.model_fields}
    if "model" in out and isinstance(out["model"], dict) and "model" not in _field(cls, "model").annotation.model_fields:
        from sparse_recover.config import ModelSection, RuntimeSection

        only_base = set(ModelSection.model_fields) - set(RuntimeSection.model_fields)  # model, revision, ...
        out["model"] = {k: v for k, v in out["model"].items() if k not in only_base}
    return out


def build_config(cls, ctx: typer.Context, fields: dict[str, str], *, config: str | None = None,
                 sets: list[str] = (), base: dict | None = None, convert: dict | None = None):
    """The typed config of one command from its options (see the note above)."""
    from sparse_recover.config import apply_overrides, deep_merge, validate

    data = deep_merge({}, base or {})
    if config:
        data = deep_merge(data, _file_sections(cls, config))
    explicit = _explicit(ctx)
    for param, path in fields.items():
        if param in explicit:
            value = ctx.params[param]
            if convert and param in convert:
                value = convert[param](value)
            data = deep_merge(data, _nest(path, value))
    data = apply_overrides(data, list(sets))
    try:
        return validate(cls, data)
    except SparseRecoverError as exc:  # name the options the user typed in their own words
        flags = {p.name: p.opts[0] for p in ctx.command.params if p.opts}
        msg = str(exc)
        for param, path in fields.items():
            if param in explicit and param in flags:
                msg = msg.replace(f"{path}:", f"{flags[param]}:")
        raise type(exc)(msg) from None


def _csv(value: str) -> list[str]:
    return [t.strip() for t in str(value).split(",") if t.strip()]


def _rd(path: str):
    from sparse_recover.rundir import RunDir

    return RunDir(path)


CONFIG_HELP = "YAML file: the command's sections (a whole pipeline YAML works); options typed here win."
SET_HELP = "Override section.key=value (repeatable; wins over everything)."
CHECKPOINT_EVERY_HELP = ("Snapshot the layer-wise pass every K decoder blocks (K >= 1) in RUN/.<stage>.partial; "
                         "re-running the same command resumes at the next block with a bit-identical result. "
                         "Default: off for models under 1B parameters, else K = round(600 s / estimated seconds "
                         "per block), ~10 for a 70B LLaMA with 128 x 2048 calibration tokens.")


from sparse_recover import config as _c  # noqa: E402 - pydantic only; no torch

PRUNE_FIELDS = {"model": "model.model", "dtype": "model.dtype", "device": "model.device", "calib": "calib.source",
                "nsamples": "calib.nsamples", "seqlen": "calib.seqlen", "seed": "calib.seed",
                "calib_batch_size": "calib.batch_size", "method": "prune.method", "pattern": "prune.pattern",
                "sparsity": "prune.sparsity", "use_variant": "prune.use_variant", "blocksize": "prune.blocksize",
                "percdamp": "prune.percdamp", "ria_alpha": "prune.ria_alpha", "threshold_rule": "prune.threshold_rule",
                "propagate": "prune.propagate", "offload": "prune.offload",
                "checkpoint_every": "prune.checkpoint_every", "profile": "prune.profile",
                "owl_m": "prune.owl_m", "owl_lambda": "prune.owl_lambda", "revision": "model.revision",
                "trust_remote_code": "model.trust_remote_code"}


@app.command()
def prune(
    ctx: typer.Context,
    run_dir: str = typer.Option(..., "--run-dir", help="Run directory (created if missing)."),
    model: Optional[str] = typer.Option(None, "--model", help="HF id, local folder, or built-in alias (smollm2-135m, gemma3-270m, tiny-llama-random)."),
    revision: Optional[str] = _default(_c.PruneConfig, "model.revision", "--revision", help="Hub model: branch, tag or commit to load; recorded, so later stages read the same dense weights."),
    trust_remote_code: bool = _default(_c.PruneConfig, "model.trust_remote_code", "--trust-remote-code", help="Hub model: run the modelling code shipped with the checkpoint (off by default: it is arbitrary Python)."),
    method: str = _default(_c.PruneConfig, "prune.method", "--method", help="magnitude | wanda | sparsegpt | ria"),
    pattern: str = _default(_c.PruneConfig, "prune.pattern", "--pattern", help="'unstructured' or N:M = keep N of every M (2:4, 4:8, 2:8)."),
    sparsity: Optional[float] = _default(_c.PruneConfig, "prune.sparsity", "--sparsity", help="Fraction pruned (unstructured); optional for N:M."),
    calib: str = _default(_c.PruneConfig, "calib.source", "--calib", help="c4 | wikitext2 | wiki-en | FILE.txt/.json/.jsonl (auto: wiki-en for built-in models, else c4)."),
    nsamples: int = _default(_c.PruneConfig, "calib.nsamples", "--nsamples", help="Calibration windows."),
    seqlen: int = _default(_c.PruneConfig, "calib.seqlen", "--seqlen", help="Tokens per calibration window."),
    seed: int = _default(_c.PruneConfig, "calib.seed", "--seed", help="Seed of the window draw."),
    calib_batch_size: int = _default(_c.PruneConfig, "calib.batch_size", "--calib-batch-size", help="Windows per forward call."),
    use_variant: bool = _default(_c.PruneConfig, "prune.use_variant", "--use-variant", help="Wanda appendix variant (unstructured)."),
    blocksize: int = _default(_c.PruneConfig, "prune.blocksize", "--blocksize", help="SparseGPT column block size."),
    percdamp: float = _default(_c.PruneConfig, "prune.percdamp", "--percdamp", help="SparseGPT damping, fraction of mean(diag H)."),
    ria_alpha: float = _default(_c.PruneConfig, "prune.ria_alpha", "--ria-alpha", help="RIA: exponent a of the input norm (>= 0; 0 = relative importance only)."),
    threshold_rule: str = _default(_c.PruneConfig, "prune.threshold_rule", "--threshold-rule", help="exact | reference (the reference's '<= sorted[k]' threshold)."),
    propagate: str = _default(_c.PruneConfig, "prune.propagate", "--propagate", help="pruned (reference) | dense: what feeds the next block."),
    offload: bool = _default(_c.PruneConfig, "prune.offload", "--offload", help="Keep the model on the CPU; only the current block on the device."),
    checkpoint_every: Optional[int] = _default(_c.PruneConfig, "prune.checkpoint_every", "--checkpoint-every", help=CHECKPOINT_EVERY_HELP),
    profile: str = _default(_c.PruneConfig, "prune.profile", "--sparsity-profile"),
    owl_m: float = _default(_c.PruneConfig, "prune.owl_m", "--owl-m"),
    owl_lambda: float = _default(_c.PruneConfig, "prune.owl_lambda", "--owl-lambda"),
    device: str = _default(_c.PruneConfig, "model.device", "--device", help="auto | cpu | cuda | cuda:N"),
    dtype: str = _default(_c.PruneConfig, "model.dtype", "--dtype", help="auto | float32 | float16 | bfloat16"),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
    force: bool = typer.Option(False, "--force", help="Redo a completed stage (every stage computed from it becomes stale)."),
):
    """Prune a model layer by layer and write RUN/prune (checkpoint, tokenizer, masks)."""
    from sparse_recover.commands import prune as cmd
    from sparse_recover.config import PruneConfig

    if not config and not set_:  # plain CLI use: report option mistakes in the options' own words
        from sparse_recover.pruning import get_method
        from sparse_recover.sparsity.patterns import parse_pattern

        get_method(method)
        parse_pattern(pattern, sparsity)
        for flag, value, low in (("--nsamples", nsamples, 1), ("--seqlen", seqlen, 2),
                                 ("--calib-batch-size", calib_batch_size, 1), ("--blocksize", blocksize, 1),
                                 ("--checkpoint-every", 1 if checkpoint_every is None else checkpoint_every, 1)):
            if value < low:
                raise SparseRecoverError(f"{flag} must be at least {low}, got {value}")
    if model is None and not (config or any(s.startswith("model.model=") for s in set_)):
        raise SparseRecoverError("--model is required (a HF id, a local folder, or a built-in alias such as smollm2-135m)")
    base = {"model": {"model": model}, "prune": {}} if model else {"prune": {}}
    try:
        cfg = build_config(PruneConfig, ctx, PRUNE_FIELDS, config=config, sets=set_, base=base)
    except SparseRecoverError as exc:
        if "model.model: Field required" in str(exc):
            raise SparseRecoverError("--model is required (a HF id, a local folder, or a built-in alias such as "
                                     "smollm2-135m)") from None
        raise
    cmd.run(cfg, _rd(run_dir), force=force)


DSNOT_FIELDS = {"init": "dsnot.init", "targets": "dsnot.targets", "sign_check": "dsnot.sign_check",
                "max_cycles": "dsnot.max_cycles", "threshold": "dsnot.threshold",
                "pow_var_regrow": "dsnot.pow_var_regrow", "calib_batch_size": "dsnot.batch_size",
                "offload": "dsnot.offload", "checkpoint_every": "dsnot.checkpoint_every", "device": "model.device",
                "dtype": "model.dtype"}


@app.command()
def dsnot(
    ctx: typer.Context,
    run_dir: str = typer.Option(..., "--run-dir", help="Run directory with a completed prune stage."),
    init: Optional[str] = _default(_c.DsnotConfig, "dsnot.init", "--init"),
    targets: str = _default(_c.DsnotConfig, "dsnot.targets", "--targets"),
    sign_check: bool = _default(_c.DsnotConfig, "dsnot.sign_check", "--sign-check/--no-sign-check"),
    max_cycles: int = _default(_c.DsnotConfig, "dsnot.max_cycles", "--max-cycles"),
    threshold: float = _default(_c.DsnotConfig, "dsnot.threshold", "--threshold"),
    pow_var_regrow: float = _default(_c.DsnotConfig, "dsnot.pow_var_regrow", "--pow-var-regrow"),
    calib_batch_size: int = _default(_c.DsnotConfig, "dsnot.batch_size", "--calib-batch-size"),
    offload: bool = _default(_c.DsnotConfig, "dsnot.offload", "--offload"),
    checkpoint_every: Optional[int] = _default(_c.DsnotConfig, "dsnot.checkpoint_every", "--checkpoint-every", help=CHECKPOINT_EVERY_HELP),
    device: str = _default(_c.DsnotConfig, "model.device", "--device"),
    dtype: str = _default(_c.DsnotConfig, "model.dtype", "--dtype"),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
    force: bool = typer.Option(False, "--force", help="Redo a completed stage (every stage computed from it becomes stale)."),
):
    """Refine the prune stage's masks with DSnoT (training-free prune-and-regrow) into RUN/dsnot."""
    from sparse_recover.commands import dsnot as cmd
    from sparse_recover.config import DsnotConfig

    cmd.run(build_config(DsnotConfig, ctx, DSNOT_FIELDS, config=config, sets=set_), _rd(run_dir), force=force)


RECONSTRUCT_FIELDS = {"from_stage": "reconstruct.from_stage", "blocksize": "reconstruct.blocksize",
                      "percdamp": "reconstruct.percdamp", "calib_batch_size": "reconstruct.batch_size",
                      "offload": "reconstruct.offload", "device": "model.device", "dtype": "model.dtype"}


@app.command()
def reconstruct(
    ctx: typer.Context,
    run_dir: str = typer.Option(..., "--run-dir", help="Run directory with a completed prune (or dsnot) stage."),
    from_stage: str = _default(_c.ReconstructConfig, "reconstruct.from_stage", "--from"),
    blocksize: int = _default(_c.ReconstructConfig, "reconstruct.blocksize", "--blocksize"),
    percdamp: float = _default(_c.ReconstructConfig, "reconstruct.percdamp", "--percdamp"),
    calib_batch_size: int = _default(_c.ReconstructConfig, "reconstruct.batch_size", "--calib-batch-size"),
    offload: bool = _default(_c.ReconstructConfig, "reconstruct.offload", "--offload"),
    device: str = _default(_c.ReconstructConfig, "model.device", "--device"),
    dtype: str = _default(_c.ReconstructConfig, "model.dtype", "--dtype"),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
    force: bool = typer.Option(False, "--force", help="Redo a completed stage (every stage computed from it becomes stale)."),
):
    """Keep a stored mask fixed and re-solve its kept weights with SparseGPT (wanda -> dsnot -> reconstruct)
    into RUN/reconstruct."""
    from sparse_recover.commands import reconstruct as cmd
    from sparse_recover.config import ReconstructConfig

    cmd.run(build_config(ReconstructConfig, ctx, RECONSTRUCT_FIELDS, config=config, sets=set_), _rd(run_dir),
            force=force)


FINETUNE_FIELDS = {**{name: f"finetune.{name}" for name in (
    "method", "targets", "rank", "lora_alpha", "scaling", "dropout", "exact_grad", "ga_init", "init_samples", "data",
    "data_format", "seqlen", "train_on_inputs", "val_size", "max_train_samples", "epochs", "max_steps", "batch_size",
    "micro_batch_size", "lr", "min_lr", "weight_decay", "warmup_ratio", "scheduler", "max_grad_norm",
    "mixed_precision", "gradient_checkpointing", "shard", "report_to", "seed", "eval_every", "eval_batches", "save_every",
    "distill", "distill_alpha", "distill_temperature", "teacher", "teacher_device")},
    "from_stage": "finetune.from_stage", "resume": "resume", "device": "model.device", "dtype": "model.dtype"}


@app.command()
def finetune(
    ctx: typer.Context,
    run_dir: str = typer.Option(..., "--run-dir", help="Run directory with a completed prune (or dsnot) stage."),
    method: str = _default(_c.FinetuneConfig, "finetune.method", "--method", help="lors | spp | lora-remask | sqft"),
    from_stage: str = _default(_c.FinetuneConfig, "finetune.from_stage", "--from", help="auto (reconstruct, else dsnot, else prune) | prune | dsnot | reconstruct"),
    targets: str = _default(_c.FinetuneConfig, "finetune.targets", "--targets", help="Comma-separated module-name suffixes to adapt."),
    rank: int = _default(_c.FinetuneConfig, "finetune.rank", "--rank", help="Adapter rank (SPP: expansion rank; must divide each output width)."),
    lora_alpha: Optional[float] = _default(_c.FinetuneConfig, "finetune.lora_alpha", "--lora-alpha"),
    scaling: Optional[float] = _default(_c.FinetuneConfig, "finetune.scaling", "--scaling"),
    dropout: Optional[float] = _default(_c.FinetuneConfig, "finetune.dropout", "--dropout"),
    exact_grad: bool = _default(_c.FinetuneConfig, "finetune.exact_grad", "--exact-grad"),
    ga_init: bool = _default(_c.FinetuneConfig, "finetune.ga_init", "--ga-init/--no-ga-init"),
    init_samples: int = _default(_c.FinetuneConfig, "finetune.init_samples", "--init-samples"),
    data: str = _default(_c.FinetuneConfig, "finetune.data", "--data"),
    data_format: str = _default(_c.FinetuneConfig, "finetune.data_format", "--data-format", help="auto | instruct | text"),
    seqlen: int = _default(_c.FinetuneConfig, "finetune.seqlen", "--seqlen"),
    train_on_inputs: bool = _default(_c.FinetuneConfig, "finetune.train_on_inputs", "--train-on-inputs/--no-train-on-inputs", help="Loss on prompt and response (reference) or response only."),
    val_size: Optional[int] = _default(_c.FinetuneConfig, "finetune.val_size", "--val-size"),
    max_train_samples: Optional[int] = _default(_c.FinetuneConfig, "finetune.max_train_samples", "--max-train-samples"),
    epochs: float = _default(_c.FinetuneConfig, "finetune.epochs", "--epochs"),
    max_steps: Optional[int] = _default(_c.FinetuneConfig, "finetune.max_steps", "--max-steps"),
    batch_size: int = _default(_c.FinetuneConfig, "finetune.batch_size", "--batch-size"),
    micro_batch_size: int = _default(_c.FinetuneConfig, "finetune.micro_batch_size", "--micro-batch-size"),
    lr: Optional[float] = _default(_c.FinetuneConfig, "finetune.lr", "--lr"),
    min_lr: float = _default(_c.FinetuneConfig, "finetune.min_lr", "--min-lr"),
    weight_decay: float = _default(_c.FinetuneConfig, "finetune.weight_decay", "--weight-decay"),
    warmup_ratio: float = _default(_c.FinetuneConfig, "finetune.warmup_ratio", "--warmup-ratio"),
    scheduler: str = _default(_c.FinetuneConfig, "finetune.scheduler", "--scheduler", help="linear | cosine | constant"),
    max_grad_norm: Optional[float] = _default(_c.FinetuneConfig, "finetune.max_grad_norm", "--max-grad-norm"),
    mixed_precision: str = _default(_c.FinetuneConfig, "finetune.mixed_precision", "--mixed-precision", help="auto (bf16 on GPU, no on CPU) | no | bf16 | fp16"),
    gradient_checkpointing: bool = _default(_c.FinetuneConfig, "finetune.gradient_checkpointing", "--gradient-checkpointing"),
    report_to: str = _default(_c.FinetuneConfig, "finetune.report_to", "--report-to", help="none | tensorboard | wandb: log loss, learning rate, tokens/s and held-out loss through accelerate's trackers"),
    shard: str = _default(_c.FinetuneConfig, "finetune.shard", "--shard", help="none | fsdp (FSDP2: shard the frozen base over the processes `accelerate launch` starts)"),
    seed: int = _default(_c.FinetuneConfig, "finetune.seed", "--seed"),
    eval_every: int = _default(_c.FinetuneConfig, "finetune.eval_every", "--eval-every"),
    eval_batches: Optional[int] = _default(_c.FinetuneConfig, "finetune.eval_batches", "--eval-batches"),
    save_every: int = _default(_c.FinetuneConfig, "finetune.save_every", "--save-every"),
    distill: str = _default(_c.FinetuneConfig, "finetune.distill", "--distill", help="none | kl (KL on the logits) | squarehead (KL + per-block normalised hidden-state MSE)"),
    distill_alpha: float = _default(_c.FinetuneConfig, "finetune.distill_alpha", "--distill-alpha", help="Loss = (1 - alpha) CE + alpha KD, alpha in [0, 1]."),
    distill_temperature: float = _default(_c.FinetuneConfig, "finetune.distill_temperature", "--distill-temperature"),
    teacher: str = _default(_c.FinetuneConfig, "finetune.teacher", "--teacher", help="dense (the base model in the manifest) | STAGE (a checkpoint stage: prune, dsnot, reconstruct, merge) | PATH (folder, hub id, alias)"),
    teacher_device: str = _default(_c.FinetuneConfig, "finetune.teacher_device", "--teacher-device", help="same (the training device) | cpu | cuda | cuda:N"),
    resume: bool = _default(_c.FinetuneConfig, "resume", "--resume"),
    device: str = _default(_c.FinetuneConfig, "model.device", "--device", help="auto | cpu | cuda"),
    dtype: str = _default(_c.FinetuneConfig, "model.dtype", "--dtype", help="Base weights: auto (float32 CPU, bfloat16 GPU) | float32 | bfloat16 | float16"),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
    force: bool = typer.Option(False, "--force", help="Redo a completed (or discard an interrupted) stage."),
):
    """Sparsity-preserving fine-tuning (SPP, LoRS, LoRA-then-remask, SQFT) of the newest sparse checkpoint.
    `--resume` alone continues an interrupted run with its stored settings."""
    from sparse_recover.commands import finetune as cmd
    from sparse_recover.config import FinetuneConfig
    from sparse_recover.engine.finetune import stored_section

    rd = _rd(run_dir)
    base = None
    if resume and rd.exists():
        stored = stored_section(rd)
        base = {"finetune": stored} if stored else None
    cfg = build_config(FinetuneConfig, ctx, FINETUNE_FIELDS, config=config, sets=set_, base=base,
                       convert={"targets": _csv})
    cmd.run(cfg, rd, force=force)


MERGE_FIELDS = {"ppl_windows": "merge.ppl_windows", "ppl_seqlen": "merge.ppl_seqlen", "ppl_data": "merge.ppl_data",
                "device": "model.device", "dtype": "model.dtype"}


@app.command()
def merge(
    ctx: typer.Context,
    run_dir: str = typer.Option(..., "--run-dir", help="Run directory with a completed finetune stage."),
    ppl_windows: int = _default(_c.MergeConfig, "merge.ppl_windows", "--ppl-windows"),
    ppl_seqlen: int = _default(_c.MergeConfig, "merge.ppl_seqlen", "--ppl-seqlen"),
    ppl_data: str = _default(_c.MergeConfig, "merge.ppl_data", "--ppl-data"),
    device: str = _default(_c.MergeConfig, "model.device", "--device"),
    dtype: str = _default(_c.MergeConfig, "model.dtype", "--dtype"),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
    force: bool = typer.Option(False, "--force", help="Merge again."),
):
    """Fold the adapters into the sparse checkpoint (no pruned weight revived) and write RUN/merge."""
    from sparse_recover.commands import merge as cmd
    from sparse_recover.config import MergeConfig
    from sparse_recover.errors import ConfigError

    if ppl_windows < 1 or ppl_seqlen < 2:
        raise ConfigError("--ppl-windows must be at least 1 and --ppl-seqlen at least 2")
    cmd.run(build_config(MergeConfig, ctx, MERGE_FIELDS, config=config, sets=set_), _rd(run_dir), force=force)


AUDIT_FIELDS = {"stage": "audit.stages", "json_out": "audit.json_out", "verbose": "audit.verbose"}


@app.command()
def audit(
    ctx: typer.Context,
    run_dir: str = typer.Option(..., "--run-dir", help="Run directory."),
    stage: List[str] = typer.Option([], "--stage", help="Stage(s) to audit (default: every checkpoint stage)."),
    json_out: bool = _default(_c.AuditConfig, "audit.json_out", "--json"),
    verbose: bool = _default(_c.AuditConfig, "audit.verbose", "--verbose", "-v"),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
):
    """Check each stage's zeros against its stored masks, N:M groups and per-group budgets."""
    from sparse_recover.commands import audit as cmd
    from sparse_recover.config import AuditConfig

    cfg = build_config(AuditConfig, ctx, AUDIT_FIELDS, config=config, sets=set_,
                       convert={"stage": lambda v: list(v) or None})
    cmd.run(cfg, _rd(run_dir))


EVAL_FIELDS = {"stage": "stage", "tasks": "eval.tasks", "ppl_data": "eval.ppl_data", "seqlen": "eval.seqlen",
               "limit": "eval.limit", "batch_size": "eval.batch_size", "data_dir": "eval.data_dir",
               "num_fewshot": "eval.num_fewshot", "device": "model.device", "dtype": "model.dtype"}


def _batch_size(value: str):
    from sparse_recover.errors import ConfigError

    if value != "auto" and (not value.isdigit() or int(value) < 1):
        raise ConfigError(f"--batch-size must be auto or a positive integer, got {value!r}")
    return value if value == "auto" else int(value)


@app.command("eval")
def eval_(
    ctx: typer.Context,
    run_dir: str = typer.Option(..., "--run-dir", help="Run directory."),
    stage: str = _default(_c.EvalCommandConfig, "stage", "--stage"),
    tasks: str = _default(_c.EvalCommandConfig, "eval.tasks", "--tasks", help="Comma-separated: ppl, zeroshot (7 tasks, acc), mmlu (5-shot), "
                          "wiki-suite (offline), or any lm-eval task name."),
    ppl_data: str = _default(_c.EvalCommandConfig, "eval.ppl_data", "--ppl-data", help="wikitext2 | wiki-en | FILE (auto: wiki-en for built-in models, else wikitext2)."),
    seqlen: int = _default(_c.EvalCommandConfig, "eval.seqlen", "--seqlen", help="Perplexity window length."),
    limit: Optional[int] = _default(_c.EvalCommandConfig, "eval.limit", "--limit", help="First N perplexity windows / N examples per lm-eval task."),
    batch_size: str = _default(_c.EvalCommandConfig, "eval.batch_size", "--batch-size", help="auto or an integer (perplexity: windows per call)."),
    data_dir: Optional[str] = _default(_c.EvalCommandConfig, "eval.data_dir", "--data-dir"),
    num_fewshot: Optional[int] = _default(_c.EvalCommandConfig, "eval.num_fewshot", "--num-fewshot"),
    device: str = _default(_c.EvalCommandConfig, "model.device", "--device"),
    dtype: str = _default(_c.EvalCommandConfig, "model.dtype", "--dtype"),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
    force: bool = typer.Option(False, "--force", help="Measure again even if the result exists."),
):
    """Evaluate a stage of a run directory: perplexity and lm-eval tasks."""
    from sparse_recover.commands import evaluate as cmd
    from sparse_recover.config import EvalCommandConfig

    _batch_size(batch_size)
    cfg = build_config(EvalCommandConfig, ctx, EVAL_FIELDS, config=config, sets=set_,
                       convert={"tasks": _csv, "batch_size": _batch_size})
    cmd.run(cfg, _rd(run_dir), force=force)


REPORT_FIELDS = {"runs": "runs", "fmt": "format", "plot": "plot", "output": "output"}


@app.command()
def report(
    ctx: typer.Context,
    runs: List[str] = typer.Argument(..., metavar="RUN", help="Run directories."),
    fmt: str = _default(_c.ReportConfig, "format", "--format"),
    plot: Optional[str] = _default(_c.ReportConfig, "plot", "--plot", help="Also write a PNG: perplexity and average accuracy by "
                                   "stage, per-layer sparsity of the first run (needs matplotlib)."),
    output: Optional[str] = _default(_c.ReportConfig, "output", "--output"),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
):
    """Table of every run and stage (method, sparsity, perplexity, task accuracies, training cost), read from
    the manifests and eval files only."""
    from sparse_recover.commands import report as cmd
    from sparse_recover.config import ReportConfig

    cmd.run(build_config(ReportConfig, ctx, REPORT_FIELDS, config=config, sets=set_, convert={"runs": list}))


RUN_FIELDS = {"from_stage": "from_stage", "until": "until", "dry_run": "dry_run"}


@app.command("run")
def run_(
    ctx: typer.Context,
    config: str = typer.Argument(..., help="Pipeline YAML: model, calib, prune, dsnot, reconstruct, finetune, merge, audit, eval sections."),
    run_dir: Optional[str] = typer.Option(None, "--run-dir", help="Run directory (created if missing); optional with --dry-run."),
    set_: List[str] = typer.Option([], "--set", help="Override section.key=value (repeatable)."),
    from_stage: Optional[str] = _default(_c.RunConfig, "from_stage", "--from", help="First stage to run: prune | dsnot | reconstruct | finetune | merge | audit | eval."),
    until: Optional[str] = _default(_c.RunConfig, "until", "--until", help="Last stage to run."),
    dry_run: bool = _default(_c.RunConfig, "dry_run", "--dry-run", help="Print the stages, their checkpoints and memory estimates; run nothing."),
    force: bool = typer.Option(False, "--force", help="Recompute the selected stages even if complete."),
):
    """Run a whole pipeline from one YAML; completed stages with the same config are skipped."""
    from sparse_recover.commands import run as cmd
    from sparse_recover.config import RunConfig
    from sparse_recover.pipeline import load_pipeline

    pipeline = load_pipeline(config, set_)  # one line naming the file; a description follows --set model.model
    if run_dir is None and not dry_run:
        raise SparseRecoverError("--run-dir is required (except with --dry-run)")
    cfg = RunConfig(pipeline=pipeline, from_stage=from_stage, until=until, dry_run=dry_run, config_file=config)
    cmd.run(cfg, None if run_dir is None else _rd(run_dir), force=force)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors become one line on stderr and a documented exit code.

    Ctrl-C anywhere ends with exit 130 and one line; an unexpected error keeps its own traceback.
    typer 0.29's vendored click has neither `Abort` nor `Exit` in its exceptions module: typer exports both.
    """
    from sparse_recover.runtime import finish_output

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if "--help" in args:  # help is printed in full, --quiet or not (nothing runs)
        args = [a for a in args if a not in ("-q", "--quiet")]
    ok = False
    try:
        try:
            code = app(args=args, standalone_mode=False)
            ok = not code
        finally:
            finish_output(ok)  # --quiet: standard output back, the summary line if none was marked
    except SparseRecoverError as exc:
        print(f"sparse-recover: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except click_exceptions.ClickException as exc:
        print(f"sparse-recover: error: {exc.format_message()}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, typer.Abort):  # click turns Ctrl-C at a prompt into Abort
        _interrupted()
    # With standalone_mode=False, typer >= 0.29 catches KeyboardInterrupt itself and *returns* 130
    # (typer.core._main: `except KeyboardInterrupt: raise Exit(130)`, then `except Exit: return
    # e.exit_code`): without this check Ctrl-C exits 0 with no message.
    if code == 130:
        _interrupted()
    if isinstance(code, int) and code:
        sys.exit(code)


def _interrupted() -> None:
    print("sparse-recover: interrupted; completed stages are intact", file=sys.stderr)
    sys.exit(130)


if __name__ == "__main__":
    main()
