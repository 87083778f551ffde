"""Typed configuration (pydantic v2, extra="forbid"). Every field has the reference default.

CLI options build these objects; a YAML file and `--set section.key=value` overrides layer on top
(`load_yaml`, `apply_overrides`). Validation reports every problem at once, with dotted paths.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sparse_recover.errors import ConfigError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    model: str = Field(description="Hugging Face id, local folder, or built-in alias (smollm2-135m, gemma3-270m, "
                       "tiny-llama-random)")
    dtype: str = Field("auto", description="auto (float32 on CPU, bfloat16 on GPU), float32, float16, bfloat16")
    device: str = Field("auto", description="auto (a GPU when present), cpu, cuda, cuda:N")
    revision: str | None = Field(None, description="hub model: branch, tag or commit to load (every later stage "
                                 "that reads the dense model uses the same)")
    trust_remote_code: bool = Field(False, description="hub model: run the modelling code shipped with the "
                                    "checkpoint (off by default: it is arbitrary Python)")


class CalibSection(Section):
    source: str = Field("auto", description="c4, wikitext2, wiki-en, or a local .txt/.json/.jsonl; "
                        "auto = wiki-en for built-in models, c4 otherwise")
    nsamples: int = Field(128, ge=1)
    seqlen: int = Field(2048, ge=2)
    seed: int = 0
    batch_size: int = Field(1, ge=1, description="windows per forward call; statistics are unchanged")


CHECKPOINT_EVERY_HELP = ("snapshot the layer-wise pass every K decoder blocks so a re-run resumes it (null = auto: off "
                         "under 1B parameters, else about every 10 minutes of GPU work, ~10 blocks for a 70B LLaMA)")


class PruneSection(Section):
    method: str = "wanda"
    pattern: str = "unstructured"
    sparsity: float | None = None
    use_variant: bool = False
    blocksize: int = Field(128, ge=1)
    percdamp: float = Field(0.01, gt=0)
    ria_alpha: float = Field(0.5, ge=0, allow_inf_nan=False,
                             description="RIA: exponent a of the input norm, score = RI * ||X_j|| ** a")
    threshold_rule: Literal["exact", "reference"] = "exact"
    propagate: Literal["pruned", "dense"] = "pruned"
    offload: bool = False
    checkpoint_every: int | None = Field(None, ge=1, description=CHECKPOINT_EVERY_HELP)
    profile: Literal["uniform", "owl"] = Field("uniform", description="uniform (every block at the target) | "
                                              "owl (outlier-weighted layer-wise sparsity)")
    owl_m: float = Field(5.0, gt=0, description="OWL outlier threshold: scores above M x their block mean "
                         "(the OWL README's LLaMA setting; its code's default is 3)")
    owl_lambda: float = Field(0.08, ge=0, description="OWL spread: block keep ratios span [1-S-lambda, 1-S+lambda]")

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        from sparse_recover.pruning import METHODS

        key = v.strip().lower()
        if key not in METHODS:
            raise ValueError(f"unknown prune method {v!r}: choose one of {', '.join(METHODS)}")
        return key

    @model_validator(mode="after")
    def _pattern(self) -> "PruneSection":
        from sparse_recover.sparsity.patterns import NM, parse_pattern

        try:
            pat = parse_pattern(self.pattern, self.sparsity)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        if self.use_variant and (isinstance(pat, NM) or self.method != "wanda"):
            raise ValueError("use_variant applies to wanda with an unstructured pattern only")
        if isinstance(pat, NM) and self.method == "sparsegpt" and self.blocksize % pat.m:
            raise ValueError(f"SparseGPT blocksize {self.blocksize} must be divisible by M={pat.m}")
        if self.profile == "owl":
            if isinstance(pat, NM):
                raise ValueError("profile owl needs an unstructured target (mixed N:M per block is not built)")
            if self.use_variant:
                raise ValueError("profile owl with use_variant is not supported")
            limit = min(pat.sparsity, 1 - pat.sparsity)
            if self.owl_lambda > limit + 1e-12:
                raise ValueError(f"owl_lambda {self.owl_lambda} must lie in [0, min(S, 1-S)] = [0, {limit:g}] so every "
                                 "block's sparsity stays within [0, 1]")
        return self

    def parsed_pattern(self):
        from sparse_recover.sparsity.patterns import parse_pattern

        return parse_pattern(self.pattern, self.sparsity)


class PruneConfig(Section):
    model: ModelSection
    calib: CalibSection = CalibSection()
    prune: PruneSection


FINETUNE_METHODS = ("spp", "lors", "lora-remask", "sqft")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class FinetuneSection(Section):
    """Sparsity-preserving fine-tuning. `None` means the method's reference default (see README)."""

    method: str = "lors"
    from_stage: Literal["auto", "prune", "dsnot", "reconstruct"] = Field(
        "auto", description="auto: reconstruct if present, else dsnot, else prune")
    targets: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS),
                               description="module-name suffixes to adapt (peft's target_modules)")
    rank: int = Field(16, ge=1)
    lora_alpha: float | None = Field(None, gt=0, description="default: rank")
    scaling: float | None = Field(None, description="explicit branch scale; default per method: spp 2, "
                                  "lors alpha/sqrt(r), lora-remask and sqft alpha/r")
    dropout: float | None = Field(None, ge=0, lt=1, description="default: spp 0.05, others 0")
    exact_grad: bool = Field(False, description="LoRS: exact masked gradient instead of the reference's "
                             "straight-through rule")
    ga_init: bool = Field(True, description="LoRS: gradient-based init of the adapters")
    init_samples: int = Field(128, ge=1, description="LoRS: training examples for the gradient init")
    data: str = Field("wiki-en", description="wiki-en, alpaca, alpaca-gpt4, slimpajama, or a local "
                      ".json/.jsonl (instructions) or .txt (text) file")
    data_format: Literal["auto", "instruct", "text"] = "auto"
    seqlen: int = Field(512, ge=8, description="cutoff length (instructions) or block size (text)")
    train_on_inputs: bool = True
    val_size: int | None = Field(None, ge=0, description="held-out examples/blocks; default min(2000 | 1024, 10%)")
    max_train_samples: int | None = Field(None, ge=1)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs")
    batch_size: int = Field(16, ge=1, description="global batch (sequences per optimizer step)")
    micro_batch_size: int = Field(4, ge=1, description="sequences per forward on one process")
    lr: float | None = Field(None, gt=0, description="default: spp 4e-3, lors 2e-5, lora-remask/sqft 2e-4")
    min_lr: float = Field(0.0, ge=0)
    weight_decay: float = Field(0.001, ge=0)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    max_grad_norm: float | None = Field(1.0, gt=0)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = False
    report_to: Literal["none", "tensorboard", "wandb"] = Field(
        "none", description="experiment tracking through accelerate's trackers: loss, learning rate, tokens/s and "
        "the held-out loss per step (tensorboard: RUN/logs/tensorboard; wandb: needs `pip install wandb`)")
    shard: Literal["none", "fsdp"] = Field(
        "none", description="fsdp: shard the frozen base and the adapters over the launched processes with "
        "PyTorch FSDP2 (one unit per decoder block); none: every process holds the whole model (DDP)")
    seed: int = 42
    eval_every: int = Field(200, ge=1, description="evaluation loss every N optimizer steps")
    eval_batches: int | None = Field(None, ge=1, description="cap on validation micro-batches per evaluation")
    save_every: int = Field(200, ge=1, description="resumable checkpoint every N optimizer steps")
    log_every: int = Field(10, ge=1)
    distill: Literal["none", "kl", "squarehead"] = Field(
        "none", description="distil from a teacher: none | kl (KL on the logits) | squarehead (KL + per-block "
        "normalised hidden-state MSE)")
    distill_alpha: float = Field(1.0, ge=0, le=1, allow_inf_nan=False,
                                 description="loss = (1 - alpha) CE + alpha KD (1.0: distillation only)")
    distill_temperature: float = Field(1.0, gt=0, allow_inf_nan=False,
                                       description="softmax temperature T of the KL term (scaled by T^2)")
    teacher: str = Field("dense", min_length=1, description="dense (the base model in the manifest) | a checkpoint "
                         "stage of the run (prune, dsnot, reconstruct, merge) | a model folder, hub id or "
                         "built-in alias")
    teacher_device: str = Field("same", description="same (the training device) | cpu | cuda | cuda:N")

    @field_validator("teacher_device")
    @classmethod
    def _teacher_device(cls, v: str) -> str:
        key = v.strip().lower()
        if key not in ("same", "cpu", "cuda") and not (key.startswith("cuda:") and key[5:].isdigit()):
            raise ValueError(f"unknown teacher device {v!r}: same, cpu, cuda or cuda:N")
        return key

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        key = v.strip().lower()
        if key not in FINETUNE_METHODS:
            raise ValueError(f"unknown finetune method {v!r}: choose one of {', '.join(FINETUNE_METHODS)}")
        return key

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: list[str]) -> list[str]:
        if not v or any(not t.strip() for t in v):
            raise ValueError("targets must be a non-empty list of module-name suffixes")
        return [t.strip() for t in v]

    @model_validator(mode="after")
    def _batches(self) -> "FinetuneSection":
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of micro_batch_size "
                             f"{self.micro_batch_size}")
        return self

    def resolved(self) -> dict[str, Any]:
        """Method defaults filled in: the values training actually uses."""
        import math

        alpha = self.lora_alpha if self.lora_alpha is not None else float(self.rank)
        if self.scaling is not None:
            scaling = self.scaling
        elif self.method == "spp":
            scaling = 2.0
        elif self.method == "lors":
            scaling = alpha / math.sqrt(self.rank)
        else:
            scaling = alpha / self.rank
        lr = self.lr if self.lr is not None else {"spp": 4e-3, "lors": 2e-5}.get(self.method, 2e-4)
        dropout = self.dropout if self.dropout is not None else (0.05 if self.method == "spp" else 0.0)
        return {**self.model_dump(), "lora_alpha": alpha, "scaling": scaling, "lr": lr, "dropout": dropout}


def _section_class(annotation: Any) -> type[BaseModel] | None:
    """The config class behind a field's annotation (`DsnotSection | None` -> DsnotSection)."""
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _section_class(arg)
        if found is not None:
            return found
    return None


def did_you_mean(cls: type[BaseModel] | None, loc: tuple[Any, ...]) -> str:
    """` (did you mean prune.method?)` for an unknown key at `loc` of config class `cls`: the closest key of
    the same section (difflib, as the CLI suggests options), else the same key in another section."""
    import difflib

    if cls is None or not loc or not all(isinstance(p, str) for p in loc):
        return ""
    *sections, key = loc
    parent: type[BaseModel] | None = cls
    for name in sections:
        field = parent.model_fields.get(name) if parent is not None else None
        parent = _section_class(field.annotation) if field is not None else None
    if parent is None:
        return ""
    prefix = "".join(f"{name}." for name in sections)
    close = difflib.get_close_matches(key, list(parent.model_fields), n=1, cutoff=0.6)
    if close:
        return f" (did you mean {prefix}{close[0]}?)"
    elsewhere = [f"{name}.{key}" for name, field in cls.model_fields.items()
                 if (section := _section_class(field.annotation)) is not None and key in section.model_fields]
    return f" (did you mean {' or '.join(elsewhere[:2])}?)" if elsewhere else ""


def _format_errors(exc: ValidationError, cls: type[BaseModel] | None = None) -> str:
    parts = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "config"
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if err["type"] == "extra_forbidden":
            msg = "unknown key" + did_you_mean(cls, tuple(err["loc"]))
        parts.append(f"{path}: {msg}")
    return "; ".join(parts)


def validate(cls: type[BaseModel], data: dict[str, Any]) -> Any:
    """Build `cls` from `data`; on failure raise ConfigError listing every problem with its path."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration: {_format_errors(exc, cls)}") from None


def _yaml_loader():
    """SafeLoader without YAML 1.1 sexagesimal integers, so `pattern: 2:4` stays the string "2:4"
    (PyYAML would otherwise read it as 2*60+4 = 124)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    int_tag = "tag:yaml.org,2002:int"
    Loader.yaml_implicit_resolvers = {
        key: [(tag, rx) for tag, rx in resolvers if tag != int_tag]
        for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    Loader.add_implicit_resolver(
        int_tag, re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
        list("-+0123456789"))
    return Loader


def yaml_load(text_or_stream):
    import yaml

    return yaml.load(text_or_stream, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass


def load_yaml(path: str) -> dict[str, Any]:
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml_load(fh) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides; values are parsed as YAML scalars."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a section")
        node[parts[-1]] = yaml_load(raw) if raw.strip() else None
    return data


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


# ------------------------------------------------------------------------------------------------
# Pipeline (`sparse-recover run`) sections live below this line.

from sparse_recover.stages import CHECKPOINT_STAGES, EVAL_STAGES, PIPELINE_STAGES  # noqa: E402


class DsnotSection(Section):
    """DSnoT settings; `init: null` is its default (recompute after magnitude/Wanda, stored after
    SparseGPT)."""

    enabled: bool = True
    init: Literal["recompute", "stored"] | None = Field(
        None, description="recompute (default after magnitude/Wanda: the reference) | stored (default after SparseGPT)")
    targets: Literal["attn", "mlp", "all"] = Field("attn", description="attn (reference default) | mlp | all")
    sign_check: bool = Field(False, description="same-sign test in the unstructured path (the paper; the "
                             "reference code skips it)")
    max_cycles: int = Field(50, ge=0, description="swap cycles per layer")
    threshold: float = Field(0.1, ge=0, description="stop a row when |error| <= threshold (absolute units)")
    pow_var_regrow: float = Field(1.0, description="variance exponent of the growing criterion")
    offload: bool = Field(False, description="keep the model on the CPU; only the current block on the device")
    checkpoint_every: int | None = Field(None, ge=1, description=CHECKPOINT_EVERY_HELP)
    batch_size: int = Field(1, ge=1, description="calibration windows per forward call")


class ReconstructSection(Section):
    """SparseGPT re-solve of the kept weights of a stored mask (the mask stays fixed)."""

    enabled: bool = True
    from_stage: Literal["auto", "prune", "dsnot"] = Field("auto", description="the stage whose masks are kept: "
                                                          "auto = dsnot if present, else prune")
    blocksize: int = Field(128, ge=1, description="SparseGPT column block size")
    percdamp: float = Field(0.01, gt=0, description="SparseGPT damping, fraction of mean(diag H)")
    offload: bool = Field(False, description="keep the model on the CPU; only the current block on the device")
    batch_size: int = Field(1, ge=1, description="calibration windows per forward call")


class MergeSection(Section):
    enabled: bool = True
    ppl_windows: int = Field(8, ge=1, description="held-out windows for the before/after check")
    ppl_seqlen: int = Field(512, ge=2, description="tokens per window of the before/after check")
    ppl_data: str = Field("wiki-en", min_length=1, description="data of the before/after check: wiki-en (built in, "
                          "held-out part) | wikitext2 | FILE (.txt/.json/.jsonl) | auto (as eval: wiki-en for "
                          "built-in models, else wikitext2)")


class AuditSection(Section):
    enabled: bool = True
    stages: list[str] | None = Field(None, description="stages to audit (default: every checkpoint stage)")
    json_out: bool = Field(False, description="print the full report as JSON")
    verbose: bool = Field(False, description="one line per linear")

    @field_validator("stages")
    @classmethod
    def _stages(cls, v: list[str] | None) -> list[str] | None:
        return list(dict.fromkeys(v)) if v else None


class EvalSection(Section):
    """`commands.evaluate.run` for each stage in `stages` (default: dense and every checkpoint stage
    the pipeline produces)."""

    stages: list[str] | None = None
    tasks: list[str] = Field(default_factory=lambda: ["ppl"])
    ppl_data: str = "auto"
    seqlen: int = Field(2048, ge=2)
    limit: int | None = Field(None, ge=1)
    batch_size: int | Literal["auto"] = "auto"
    data_dir: str | None = Field(None, description="local copies of the standard tasks (DATA_DIR/<task>/<split>.jsonl)")
    num_fewshot: int | None = Field(None, ge=0, description="override the n-shot of every lm-eval task")

    @field_validator("stages")
    @classmethod
    def _stages(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        bad = [s for s in v if s not in EVAL_STAGES]
        if bad:
            raise ValueError(f"cannot evaluate {', '.join(map(repr, bad))}: stages are {', '.join(EVAL_STAGES)} "
                             "(finetune adapters are evaluated through merge)")
        return list(dict.fromkeys(v))

    @field_validator("tasks", mode="before")
    @classmethod
    def _tasks_csv(cls, v: Any) -> Any:
        """`tasks: ppl,wiki-suite` in YAML, as on the command line, or a list."""
        return [t for t in v.split(",")] if isinstance(v, str) else v

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: list[str]) -> list[str]:
        v = [t.strip() for t in v if t.strip()]
        if not v:
            raise ValueError("tasks is empty: use ppl, zeroshot, mmlu, wiki-suite or lm-eval task names")
        return v


class PipelineConfig(Section):
    """One YAML for `sparse-recover run`: a section per stage. `dsnot`, `finetune`, `merge` and `eval`
    are skipped when absent (or null, or `enabled: false`); `audit` runs unless disabled."""

    description: str = ""
    model: ModelSection
    calib: CalibSection = CalibSection()
    prune: PruneSection
    dsnot: DsnotSection | None = None
    reconstruct: ReconstructSection | None = None
    finetune: FinetuneSection | None = None
    merge: MergeSection | None = None
    audit: AuditSection = AuditSection()
    eval: EvalSection | None = None

    def enabled(self, stage: str) -> bool:
        if stage == "prune":
            return True
        if stage == "finetune":
            return self.finetune is not None
        if stage == "eval":
            return self.eval is not None and bool(self.eval_stages())
        section = getattr(self, stage)
        return section is not None and section.enabled

    def stages(self) -> list[str]:
        return [s for s in PIPELINE_STAGES if self.enabled(s)]

    def checkpoint_stages(self) -> list[str]:
        return [s for s in CHECKPOINT_STAGES if self.enabled(s)]

    def eval_stages(self) -> list[str]:
        if self.eval is None:
            return []
        if self.eval.stages is None:
            return ["dense", *self.checkpoint_stages()]
        return list(self.eval.stages)


def _section_on(data: dict[str, Any], name: str, default: bool = False) -> bool:
    """Whether a raw (unvalidated) pipeline section is enabled; tolerant of wrong types."""
    if name not in data:
        return default
    value = data[name]
    if value is None:
        return False
    if isinstance(value, dict):
        return value.get("enabled", True) is not False
    return True


def _contradictions(data: dict[str, Any]) -> list[str]:
    """Settings that are each valid but cannot go together, checked on the raw mapping so they are
    reported with the type errors in one message."""
    out = []
    dsnot_on, finetune_on = _section_on(data, "dsnot"), _section_on(data, "finetune")
    merge_on = _section_on(data, "merge")
    prune = data.get("prune") if isinstance(data.get("prune"), dict) else {}
    dsnot = data.get("dsnot") if isinstance(data.get("dsnot"), dict) else {}
    finetune = data.get("finetune") if isinstance(data.get("finetune"), dict) else {}
    method = str(prune.get("method", "wanda")).strip().lower()
    if merge_on and not finetune_on:
        out.append("merge: merge needs a finetune section (nothing to merge); remove merge or add finetune")
    if dsnot_on and dsnot.get("init") == "recompute" and method not in ("wanda", "magnitude"):
        out.append(f"dsnot.init: recompute cannot rebuild a {method} mask (SparseGPT's comes with OBS-updated "
                   "weights); use init: stored or leave it unset")
    reconstruct_on = _section_on(data, "reconstruct")
    reconstruct = data.get("reconstruct") if isinstance(data.get("reconstruct"), dict) else {}
    for name, section, on in (("finetune", finetune, finetune_on), ("reconstruct", reconstruct, reconstruct_on)):
        for needed, present in (("dsnot", dsnot_on), ("reconstruct", reconstruct_on)):
            if on and section.get("from_stage") == needed and not present:
                out.append(f"{name}.from_stage: {needed}, but the pipeline has no {needed} stage")
    ev = data.get("eval") if isinstance(data.get("eval"), dict) else {}
    if isinstance(ev.get("stages"), list):
        produced = {"dense", "prune"} | {s for s, on in (("dsnot", dsnot_on), ("reconstruct", reconstruct_on),
                                                         ("merge", merge_on)) if on}
        for i, stage in enumerate(ev["stages"]):
            if stage in EVAL_STAGES and stage not in produced:
                out.append(f"eval.stages.{i}: the pipeline never produces a {stage} stage "
                           f"(enable the {stage} section or drop it from eval.stages)")
    return out


def validate_pipeline(data: dict[str, Any]) -> PipelineConfig:
    """Build a PipelineConfig; on failure raise one ConfigError listing every problem (type errors,
    unknown keys and contradictory settings) with its dotted path."""
    problems = _contradictions(data) if isinstance(data, dict) else []
    try:
        cfg = PipelineConfig.model_validate(data)
    except ValidationError as exc:
        problems = [_format_errors(exc, PipelineConfig), *problems]
        cfg = None
    if problems:
        raise ConfigError(f"invalid configuration: {'; '.join(problems)}")
    return cfg


# ------------------------------------------------------------------------------------------------
# One config per command: `commands.<name>.run(cfg, rd, *, force)`.


class RuntimeSection(Section):
    """Where a stage after prune runs; the model itself is the run directory's."""

    device: str = Field("auto", description="auto (a GPU when present), cpu, cuda, cuda:N")
    dtype: str = Field("auto", description="auto (float32 on CPU, bfloat16 on GPU), float32, float16, bfloat16")


class DsnotConfig(Section):
    model: RuntimeSection = RuntimeSection()
    dsnot: DsnotSection = DsnotSection()


class ReconstructConfig(Section):
    model: RuntimeSection = RuntimeSection()
    reconstruct: ReconstructSection = ReconstructSection()


class FinetuneConfig(Section):
    model: RuntimeSection = RuntimeSection()
    finetune: FinetuneSection = FinetuneSection()
    resume: bool = Field(False, description="continue an interrupted run from its newest checkpoint, with its "
                         "stored settings")


class MergeConfig(Section):
    model: RuntimeSection = RuntimeSection()
    merge: MergeSection = MergeSection()


class AuditConfig(Section):
    audit: AuditSection = AuditSection()


class EvalCommandConfig(Section):
    model: RuntimeSection = RuntimeSection()
    stage: str = Field("prune", description="dense | prune | dsnot | reconstruct | merge (fine-tuned adapters: through merge)")
    eval: EvalSection = EvalSection()


class ReportConfig(Section):
    runs: list[str] = Field(description="run directories")
    format: str = Field("md", description="md | csv | json")
    plot: str | None = Field(None, description="also write a PNG (needs matplotlib)")
    output: str | None = Field(None, description="write the table to FILE instead of stdout")


class RunConfig(Section):
    pipeline: PipelineConfig
    from_stage: str | None = Field(None, description="first stage to run")
    until: str | None = Field(None, description="last stage to run")
    dry_run: bool = Field(False, description="print the stages, their checkpoints and memory estimates")
    config_file: str | None = None
