"""The pipeline behind `sparse-recover run CONFIG.yaml` (and its `--dry-run` plan): a whole pipeline
from one YAML, through the stage commands' own `run` functions (prune, dsnot, finetune, merge, audit,
eval), in that order.

Before anything runs, the config is validated whole, the model is checked to be reachable, the eval
tasks, every data source (a hub dataset offline must be cached) and the calibration and perplexity window
lengths (at most the model's max_position_embeddings) are checked, and every completed stage in the run
directory is compared with what the config asks for. A completed stage with the same config is skipped
(so re-running a run that crashed continues where it stopped; a finetune stage with a checkpoint but not
complete is resumed); one with a different config, or computed from an earlier version of its input stage,
is refused unless `--force`, rather than silently mixed. A stage that is (re)computed makes every later
stage of the selection recompute too.

The manifest gains a `pipeline` section: the resolved config, and per stage the identity of the
input it was computed from (so a stale stage is recognised) and the wall time of the step.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from sparse_recover.config import PipelineConfig, PruneConfig
from sparse_recover.errors import ConfigError, ModelSourceError, RunDirError
from sparse_recover.rundir import RunDir, now
from sparse_recover.stages import PIPELINE_STAGES, differences

def select(cfg: PipelineConfig, from_stage: str | None, until_stage: str | None) -> list[str]:
    """The configured stages between --from and --until (inclusive)."""
    stages = cfg.stages()
    for flag, name in (("--from", from_stage), ("--until", until_stage)):
        if name is None:
            continue
        if name not in PIPELINE_STAGES:
            raise ConfigError(f"{flag} {name!r}: stages are {', '.join(PIPELINE_STAGES)}")
        if name not in stages:
            raise ConfigError(f"{flag} {name}: the config has no {name} stage (it runs {', '.join(stages)})")
    lo = stages.index(from_stage) if from_stage else 0
    hi = stages.index(until_stage) if until_stage else len(stages) - 1
    if lo > hi:
        raise ConfigError(f"--from {from_stage} comes after --until {until_stage}")
    return stages[lo:hi + 1]


def _source(cfg: PipelineConfig, stage: str) -> str:
    """The stage `stage` reads: its section's from_stage, or (auto) the first of its table inputs that the
    pipeline produces."""
    from sparse_recover.stages import STAGES

    section = getattr(cfg, stage)
    src = section.from_stage if section is not None else "auto"
    if src != "auto":
        return src
    return next((s for s in STAGES[stage].inputs if cfg.enabled(s)), "prune")


def finetune_source(cfg: PipelineConfig) -> str:
    return _source(cfg, "finetune")


def inputs_of(cfg: PipelineConfig, stage: str) -> list[str]:
    """Run-directory stages that `stage` reads."""
    if stage == "dsnot":
        return ["prune"]
    if stage in ("finetune", "reconstruct"):
        return [_source(cfg, stage)]
    if stage == "merge":
        return ["finetune"]
    if stage == "audit":
        return cfg.checkpoint_stages()
    if stage == "eval":
        return [s for s in cfg.eval_stages() if s != "dense"]
    return []


def prune_config(cfg: PipelineConfig) -> PruneConfig:
    return PruneConfig(model=cfg.model, calib=cfg.calib, prune=cfg.prune)


def requested_config(cfg: PipelineConfig, stage: str, model_kind: str, prune_method: str | None) -> dict[str, Any]:
    """What the manifest record of `stage` holds as its config when this pipeline produces it."""
    if stage == "prune":
        from sparse_recover.engine.stageio import resolve_calib_source

        data = prune_config(cfg).model_dump()
        data["calib"]["source"] = resolve_calib_source(cfg.calib.source, model_kind)
        return data
    if stage == "dsnot":
        from sparse_recover.engine.dsnot import SETTINGS_KEYS, resolve_init

        data = {k: getattr(cfg.dsnot, k) for k in SETTINGS_KEYS}
        data["init"] = resolve_init(data["init"], prune_method or cfg.prune.method)
        return data
    if stage == "reconstruct":
        r = cfg.reconstruct
        return {"from_stage": _source(cfg, "reconstruct"), "blocksize": r.blocksize, "percdamp": r.percdamp}
    if stage == "finetune":
        return {**cfg.finetune.resolved(), "from_stage": finetune_source(cfg)}
    if stage == "merge":
        from sparse_recover.engine.merge import requested_settings

        return requested_settings(cfg.merge)
    return {}


def identity(entry: dict[str, Any] | None) -> str | None:
    """What identifies one computation of a stage: when it finished and, for checkpoints, its masks."""
    if not entry:
        return None
    return f"{entry.get('finished')}|{entry.get('masks_sha256', '')}"


class Pipeline:
    """The checks and steps of one `run` invocation."""

    def __init__(self, cfg: PipelineConfig, rd: RunDir | str, *, force: bool = False,
                 echo: Callable[[str], None] = print, config_file: str | None = None):
        rd = rd if isinstance(rd, RunDir) else RunDir(rd)
        self.cfg, self.rd, self.force, self.echo = cfg, rd, force, echo
        self.config_file = config_file
        self.source = None
        self.redo: set[str] = set()  # stages recomputed in this invocation
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------
    # checks (nothing is written)

    def preflight(self, selected: list[str]) -> dict[str, str]:
        """Validate everything that can be validated before the first stage runs; returns the action
        per selected stage: run | resume | skip | redo."""
        from sparse_recover.models import source_for

        rd, cfg = self.rd, self.cfg
        rd.check_location()
        manifest = rd.read()
        self.source = source_for(cfg.model, convert=False)
        current = manifest.get("model") or {}
        if current.get("spec") and current["spec"] != self.source.spec:
            rd.check_model({"spec": self.source.spec})
        needs_model = any(s in selected for s in ("prune", "dsnot")) or (
            "eval" in selected and "dense" in cfg.eval_stages())
        if needs_model:
            self.source = check_reachable(cfg.model.model, revision=cfg.model.revision,
                                          trust_remote_code=cfg.model.trust_remote_code)
        if "eval" in selected:
            harness = [t for t in cfg.eval.tasks if t != "ppl"]
            if harness:
                from sparse_recover.evaluate.harness import check_tasks

                check_tasks(harness, data_dir=cfg.eval.data_dir, num_fewshot=cfg.eval.num_fewshot,
                            extra_names=("ppl",))
        self.check_data(selected, needs_model)
        # a stage outside the selection that a selected stage reads must be there already
        for stage in selected:
            for needed in inputs_of(cfg, stage):
                if needed not in selected and not rd.is_complete(needed):
                    raise RunDirError(
                        f"cannot start at {stage}: it reads {rd.path / needed}, which is not complete; "
                        f"run without --from (or --from {needed}) first")
        actions: dict[str, str] = {}
        changed = False  # an earlier selected stage will be recomputed
        for stage in cfg.stages():
            if stage in ("audit", "eval"):
                if stage in selected:
                    actions[stage] = "run"
                continue
            state = self.state(stage, manifest)
            if stage not in selected:
                if state not in ("same", "missing"):  # an input the selection builds on must match
                    if any(stage in inputs_of(cfg, s) for s in selected):
                        raise RunDirError(self._mismatch_line(stage, state, manifest))
                continue
            if self.force or changed:
                actions[stage] = "redo" if state != "missing" else "run"
            elif state == "same":
                actions[stage] = "skip"
            elif state == "missing":
                actions[stage] = "run"
            elif state == "partial":
                actions[stage] = "resume"
            else:
                raise RunDirError(self._mismatch_line(stage, state, manifest))
            changed = changed or actions[stage] != "skip"
        return actions

    def check_data(self, selected: list[str], model_loaded: bool) -> None:
        """Every data source the selected stages read (calibration, fine-tuning data, perplexity data), and the
        calibration and perplexity window lengths against the model's context, before the first stage runs."""
        from sparse_recover.engine.evaluate import resolve_ppl_source
        from sparse_recover.engine.stageio import (FINETUNE_DATA, check_calibration, check_data_source, check_seqlen,
                                                   resolve_calib_source)
        from sparse_recover.models import ModelSource, load_config
        from sparse_recover.pruning import get_method

        cfg, kind = self.cfg, self.source.kind
        calibrates = "prune" in selected and (cfg.prune.profile != "uniform"
                                              or get_method(cfg.prune.method).statistic is not None)
        if calibrates or any(s in selected for s in ("dsnot", "reconstruct")):
            check_calibration(self.rd, cfg.calib.model_copy(
                update={"source": resolve_calib_source(cfg.calib.source, kind)}))
        if "finetune" in selected:
            check_data_source(cfg.finetune.data, FINETUNE_DATA)
        ppl = "eval" in selected and "ppl" in cfg.eval.tasks
        if ppl:
            check_data_source(resolve_ppl_source(cfg.eval.ppl_data, kind), "perplexity data")
        if "merge" in selected:
            from sparse_recover.engine.merge import check_ppl_source

            check_ppl_source(cfg.merge.ppl_data, kind)
        source = self.source if model_loaded else None  # pruning keeps the architecture: the base model's context
        if source is None and self.rd.is_complete("prune"):
            prune_dir = str(self.rd.stage_dir("prune"))
            source = ModelSource(spec=prune_dir, kind="local", path=prune_dir)
        if source is not None and (calibrates or ppl):
            hf_config = load_config(source)
            if calibrates:
                check_seqlen(cfg.calib.seqlen, hf_config, "calibration seqlen", source.spec)
            if ppl:
                check_seqlen(cfg.eval.seqlen, hf_config, "perplexity seqlen", source.spec)

    def state(self, stage: str, manifest: dict[str, Any]) -> str:
        """missing | partial | same | a description of how the completed stage differs."""
        rd, entry = self.rd, manifest["stages"].get(stage)
        if not rd.is_complete(stage):
            if stage == "finetune" and finetune_resumable(rd):
                return "partial"
            return "missing"
        prune_method = (manifest["stages"].get("prune") or {}).get("method")
        wanted = requested_config(self.cfg, stage, self.source.kind, prune_method)
        recorded = entry.get("config") or {}
        if stage == "finetune":
            from sparse_recover.engine.finetune import recorded_config

            recorded = recorded_config(self.rd.record("finetune"))
        diffs = differences(stage, recorded, wanted)
        if diffs:
            return "config differs (" + "; ".join(diffs[:4]) + (" ..." if len(diffs) > 4 else "") + ")"
        recorded = ((manifest.get("pipeline") or {}).get("inputs") or {}).get(stage)
        for needed in inputs_of(self.cfg, stage):
            if recorded is not None and recorded.get(needed) != identity(manifest["stages"].get(needed)):
                return f"computed from an earlier {needed} stage"
        if stage == "finetune" and entry.get("from") and entry["from"] != finetune_source(self.cfg):
            return f"fine-tuned from {entry['from']}, the config asks for {finetune_source(self.cfg)}"
        return "same"

    def _mismatch_line(self, stage: str, state: str, manifest: dict[str, Any]) -> str:
        return (f"{stage} stage in {self.rd.path} is already complete but {state}: use --force to recompute it "
                f"(and every later stage), or another --run-dir")

    # ------------------------------------------------------------------------------------------
    # steps

    def execute(self, selected: list[str], actions: dict[str, str]) -> dict[str, Any]:
        from sparse_recover.runtime import VERBOSE, format_seconds, pipeline_stage, summary, verbosity

        rd = self.rd
        results: dict[str, Any] = {}
        t_all = time.perf_counter()
        for stage in selected:
            action = actions[stage]
            if action != "run" or verbosity() >= VERBOSE:  # a stage that runs says so in its own result line
                self.echo(f"== {stage}: {action}"
                          + (" (already complete with the same config)" if action == "skip" else ""))
            if action == "skip":
                continue
            t0 = time.perf_counter()
            with pipeline_stage():
                results[stage] = getattr(self, f"_{stage}")(force=action == "redo", resume=action == "resume")
            self.timings[stage] = round(time.perf_counter() - t0, 3)
            if stage not in ("audit", "eval"):
                self.redo.add(stage)
                self._record_inputs(stage)
        self._record_run(selected)
        total = time.perf_counter() - t_all
        parts = [f"{s} {format_seconds(t)}" for s, t in self.timings.items()]
        (summary if self.echo is print else self.echo)(
            f"run: {', '.join(parts) or 'nothing to do'}; total {format_seconds(total)} -> {rd.path}")
        return results

    def _prune(self, force: bool, resume: bool) -> Any:
        from sparse_recover.commands import prune

        return prune.run(prune_config(self.cfg), self.rd, force=force)

    def _dsnot(self, force: bool, resume: bool) -> Any:
        from sparse_recover.commands import dsnot
        from sparse_recover.config import DsnotConfig

        return dsnot.run(DsnotConfig(model=self._runtime(), dsnot=self.cfg.dsnot), self.rd, force=force)

    def _reconstruct(self, force: bool, resume: bool) -> Any:
        from sparse_recover.commands import reconstruct
        from sparse_recover.config import ReconstructConfig

        section = self.cfg.reconstruct.model_copy(update={"from_stage": _source(self.cfg, "reconstruct")})
        return reconstruct.run(ReconstructConfig(model=self._runtime(), reconstruct=section), self.rd, force=force)

    def _finetune(self, force: bool, resume: bool) -> Any:
        from sparse_recover.commands import finetune
        from sparse_recover.config import FinetuneConfig

        section = self.cfg.finetune
        if section.from_stage == "auto":
            section = section.model_copy(update={"from_stage": finetune_source(self.cfg)})
        return finetune.run(FinetuneConfig(model=self._runtime(), finetune=section, resume=resume), self.rd,
                            force=force)

    def _merge(self, force: bool, resume: bool) -> Any:
        from sparse_recover.commands import merge
        from sparse_recover.config import MergeConfig

        return merge.run(MergeConfig(model=self._runtime(), merge=self.cfg.merge), self.rd, force=force)

    def _runtime(self):
        from sparse_recover.config import RuntimeSection

        return RuntimeSection(device=self.cfg.model.device, dtype=self.cfg.model.dtype)

    def _audit(self, force: bool, resume: bool) -> Any:
        from sparse_recover.commands import audit
        from sparse_recover.config import AuditConfig, AuditSection

        report = audit.run(AuditConfig(audit=AuditSection(stages=self.cfg.checkpoint_stages())), self.rd)
        summary = {s: {"ok": r["ok"], "overall_sparsity": r.get("overall_sparsity"),
                       "pruned_nonzero": r.get("pruned_nonzero")} for s, r in report.items()}
        self._pipeline_update(audit={"checked": now(), "stages": summary})
        return report

    def _eval(self, force: bool, resume: bool) -> Any:
        from sparse_recover.commands import evaluate
        from sparse_recover.config import EvalCommandConfig

        ev, out = self.cfg.eval, {}
        manifest = self.rd.read()
        measured = (manifest.get("pipeline") or {}).get("evaluated") or {}
        for stage in self.cfg.eval_stages():
            ident = "dense" if stage == "dense" else identity(manifest["stages"].get(stage))
            # a checkpoint recomputed since its last evaluation is measured again
            again = self.force or stage in self.redo or (stage in measured and measured[stage] != ident)
            out[stage] = evaluate.run(EvalCommandConfig(model=self._runtime(), stage=stage, eval=ev), self.rd,
                                      force=again)
            measured[stage] = ident
            self._pipeline_update(evaluated=dict(measured))
        return out

    # ------------------------------------------------------------------------------------------
    # manifest bookkeeping

    def _pipeline_update(self, **values: Any) -> None:
        data = self.rd.read()
        section = dict(data.get("pipeline") or {})
        section.update(values)
        data["pipeline"] = section
        self.rd.write(data)

    def _record_inputs(self, stage: str) -> None:
        data = self.rd.read()
        inputs = dict((data.get("pipeline") or {}).get("inputs") or {})
        inputs[stage] = {s: identity(data["stages"].get(s)) for s in inputs_of(self.cfg, stage)}
        self._pipeline_update(inputs=inputs)

    def _record_run(self, selected: list[str]) -> None:
        if not self.rd.exists():
            return
        data = self.rd.read()
        steps = dict((data.get("pipeline") or {}).get("steps") or {})
        for stage, wall in self.timings.items():
            steps[stage] = {"finished": now(), "wall_time_s": wall}
        self._pipeline_update(config=self.cfg.model_dump(), config_file=self.config_file, selected=selected,
                              steps=steps)


def finetune_resumable(rd: RunDir) -> bool:
    """A finetune stage that started but did not complete and left a checkpoint to resume from."""
    from sparse_recover.engine.finetune import WORK_DIR
    from sparse_recover.train import latest_checkpoint

    return latest_checkpoint(rd.path / WORK_DIR) is not None


def check_reachable(spec: str, *, revision: str | None = None, trust_remote_code: bool = False):
    """Resolve the model (converting a built-in alias on first use) and load its config, so a hub id
    with no network (or a revision that is not cached) fails now, in one line, rather than after the
    first stages."""
    from sparse_recover.hub import unreachable
    from sparse_recover.models import load_config, resolve_model_source

    source = resolve_model_source(spec, revision=revision, trust_remote_code=trust_remote_code)
    try:
        load_config(source)
    except ModelSourceError:
        if source.kind != "hub":
            raise
        why = unreachable()
        what = f"model {source.spec}" + (f" at revision {source.revision}" if source.revision else "")
        raise ModelSourceError(
            f"{what} cannot be reached: it needs the Hugging Face hub "
            f"({why + ' and ' if why else ''}it is not in the local cache); "
            "download it once with network access, or point model.model at a local folder") from None
    return source


def run_pipeline(cfg: PipelineConfig, rd: RunDir, selected: list[str], *, force: bool = False,
                 config_file: str | None = None, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Check everything, then run the selected stages (see `select`)."""
    pipe = Pipeline(cfg, rd, force=force, echo=echo, config_file=config_file)
    actions = pipe.preflight(selected)
    for line in unevaluated_notes(cfg):
        echo(line)
    return pipe.execute(selected, actions)


def dry_run(cfg: PipelineConfig, rd: RunDir | None, selected: list[str],
            echo: Callable[[str], None] = print) -> dict[str, Any]:
    """The plan of `run --dry-run` (plan.py): stages, checkpoints, memory estimates; nothing runs."""
    from sparse_recover.plan import show

    plan = show(cfg, None if rd is None else str(rd.path), selected, echo=echo)
    notes = unevaluated_notes(cfg)
    for line in notes:
        echo(line)
    plan["notes"] = notes
    return plan


def unevaluated_notes(cfg: PipelineConfig) -> list[str]:
    """What the pipeline trains but never measures: adapters are evaluated only through merge (eval reads
    checkpoints), so a fine-tune without a merge, or a merge that eval.stages leaves out, is said so."""
    if not cfg.enabled("finetune"):
        return []
    if not cfg.enabled("merge"):
        return ["note: this pipeline fine-tunes but has no merge stage, so the fine-tuned model is not evaluated "
                "(eval reads checkpoints; adapters become one through merge): add a `merge: {}` section, or "
                "--set merge.enabled=true"]
    if cfg.eval is not None and cfg.eval.stages is not None and "merge" not in cfg.eval.stages:
        return ["note: eval.stages leaves out merge, so the fine-tuned model is not evaluated: add merge to "
                "eval.stages"]
    return []


def load_pipeline(path: str, overrides: list[str] = ()) -> PipelineConfig:
    """The PipelineConfig of a YAML file with `--set` overrides, validated whole.

    A problem is one ConfigError line naming the file (an unknown key with its did-you-mean). When
    `--set model.model=...` swaps the model, a `description` naming the old model names the new one, and
    one that does not mention it is dropped (it would describe another model).
    """
    from sparse_recover.config import apply_overrides, load_yaml, validate_pipeline

    data = load_yaml(path)
    before = data.get("model", {}).get("model") if isinstance(data.get("model"), dict) else None
    data = apply_overrides(data, list(overrides))
    after = data.get("model", {}).get("model") if isinstance(data.get("model"), dict) else None
    explicit_description = any(o.partition("=")[0].strip() == "description" for o in overrides)
    if before is not None and after != before and isinstance(data.get("description"), str) \
            and not explicit_description:
        text = data["description"]
        data["description"] = text.replace(str(before), str(after)) if str(before) in text else ""
    try:
        return validate_pipeline(data)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("invalid configuration:", f"invalid configuration in {path}:", 1)) \
            from None
