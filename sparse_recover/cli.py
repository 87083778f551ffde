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
    help="Prune causal LMs (magnitude, Wanda, SparseGPT; unstructured or N:M = keep N of M), "
    "refine the masks, recover accuracy, and audit every zero.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _explicit_options(ctx: typer.Context) -> set[str]:
    """The options typed on the command line (not defaults): they win over a --config file."""
    return {name for name in ctx.params
            if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")}


@app.command()
def prune(
    ctx: typer.Context,
    run_dir: str = typer.Option(..., "--run-dir", help="Run directory (created if missing)."),
    model: Optional[str] = typer.Option(None, "--model", help="HF id, local folder, or built-in alias (smollm2-135m, gemma3-270m)."),
    method: str = typer.Option("wanda", "--method", help="magnitude | wanda | sparsegpt"),
    pattern: str = typer.Option("unstructured", "--pattern", help="'unstructured' or N:M = keep N of every M (2:4, 4:8, 2:8)."),
    sparsity: Optional[float] = typer.Option(None, "--sparsity", help="Fraction pruned (unstructured); optional for N:M."),
    calib: str = typer.Option("auto", "--calib", help="c4 | wikitext2 | wiki-en | FILE.txt/.json/.jsonl (auto: wiki-en for built-in models, else c4)."),
    nsamples: int = typer.Option(128, "--nsamples", help="Calibration windows."),
    seqlen: int = typer.Option(2048, "--seqlen", help="Tokens per calibration window."),
    seed: int = typer.Option(0, "--seed", help="Seed of the window draw."),
    calib_batch_size: int = typer.Option(1, "--calib-batch-size", help="Windows per forward call."),
    use_variant: bool = typer.Option(False, "--use-variant", help="Wanda appendix variant (unstructured)."),
    blocksize: int = typer.Option(128, "--blocksize", help="SparseGPT column block size."),
    percdamp: float = typer.Option(0.01, "--percdamp", help="SparseGPT damping, fraction of mean(diag H)."),
    threshold_rule: str = typer.Option("exact", "--threshold-rule", help="exact | reference (the reference's '<= sorted[k]' threshold)."),
    propagate: str = typer.Option("pruned", "--propagate", help="pruned (reference) | dense: what feeds the next block."),
    offload: bool = typer.Option(False, "--offload", help="Keep the model on the CPU; only the current block on the device."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
    dtype: str = typer.Option("auto", "--dtype", help="auto | float32 | float16 | bfloat16"),
    config: Optional[str] = typer.Option(None, "--config", help="YAML with model/calib/prune sections; options given here win."),
    set_: List[str] = typer.Option([], "--set", help="Override section.key=value (repeatable)."),
    force: bool = typer.Option(False, "--force", help="Redo a completed stage."),
):
    """Prune a model layer by layer and write RUN/prune (checkpoint, tokenizer, masks)."""
    from sparse_recover.commands import prune as cmd
    from sparse_recover.config import PruneConfig, apply_overrides, deep_merge, load_yaml, validate

    if not config and not set_:  # plain CLI use: report option mistakes in the options' own words
        from sparse_recover.pruning import get_method
        from sparse_recover.sparsity.patterns import parse_pattern

        get_method(method)
        parse_pattern(pattern, sparsity)
        for flag, value, low in (("--nsamples", nsamples, 1), ("--seqlen", seqlen, 2),
                                 ("--calib-batch-size", calib_batch_size, 1), ("--blocksize", blocksize, 1)):
            if value < low:
                raise SparseRecoverError(f"{flag} must be at least {low}, got {value}")
    data = load_yaml(config) if config else {}
    given = {
        "model": {"model": model, "dtype": dtype, "device": device},
        "calib": {"source": calib, "nsamples": nsamples, "seqlen": seqlen, "seed": seed, "batch_size": calib_batch_size},
        "prune": {"method": method, "pattern": pattern, "sparsity": sparsity, "use_variant": use_variant,
                  "blocksize": blocksize, "percdamp": percdamp, "threshold_rule": threshold_rule,
                  "propagate": propagate, "offload": offload},
    }
    if config:  # the file wins over defaults; explicitly typed options win over the file
        explicit = _explicit_options(ctx)
        option_of = {"model": "model", "dtype": "dtype", "device": "device", "source": "calib", "nsamples": "nsamples",
                     "seqlen": "seqlen", "seed": "seed", "batch_size": "calib_batch_size"}
        given = {sec: {k: v for k, v in vals.items() if option_of.get(k, k) in explicit} for sec, vals in given.items()}
        data = deep_merge(data, given)
    else:
        data = given
    data = apply_overrides(data, set_)
    if not (data.get("model") or {}).get("model"):
        raise SparseRecoverError("--model is required (a HF id, a local folder, or a built-in alias such as smollm2-135m)")
    cfg = validate(PruneConfig, data)
    cmd.run(cfg, run_dir, force=force)


@app.command()
def dsnot(
    run_dir: str = typer.Option(..., "--run-dir", help="Run directory with a completed prune stage."),
    init: Optional[str] = typer.Option(None, "--init", help="recompute (default after magnitude/Wanda: the reference) | stored (default after SparseGPT)."),
    targets: str = typer.Option("attn", "--targets", help="attn (reference default) | mlp | all"),
    sign_check: bool = typer.Option(False, "--sign-check/--no-sign-check", help="Same-sign test in the unstructured path (the paper; the reference code skips it)."),
    max_cycles: int = typer.Option(50, "--max-cycles", help="Swap cycles per layer."),
    threshold: float = typer.Option(0.1, "--threshold", help="Stop a row when |error| <= threshold (absolute units)."),
    pow_var_regrow: float = typer.Option(1.0, "--pow-var-regrow", help="Variance exponent of the growing criterion."),
    calib_batch_size: int = typer.Option(1, "--calib-batch-size", help="Windows per forward call."),
    offload: bool = typer.Option(False, "--offload", help="Keep the model on the CPU; only the current block on the device."),
    device: str = typer.Option("auto", "--device"),
    dtype: str = typer.Option("auto", "--dtype"),
    force: bool = typer.Option(False, "--force", help="Redo a completed stage."),
):
    """Refine the prune stage's masks with DSnoT (training-free prune-and-regrow) into RUN/dsnot."""
    from sparse_recover.commands import dsnot as cmd

    cmd.run(run_dir, init=init, targets=targets, sign_check=sign_check, max_cycles=max_cycles, threshold=threshold,
            pow_var_regrow=pow_var_regrow, device=device, dtype=dtype, offload=offload, batch_size=calib_batch_size,
            force=force)


@app.command()
def finetune(
    ctx: typer.Context,
    run_dir: str = typer.Option(..., "--run-dir", help="Run directory with a completed prune (or dsnot) stage."),
    method: str = typer.Option("lors", "--method", help="lors | spp | lora-remask | sqft"),
    from_stage: str = typer.Option("auto", "--from", help="auto (dsnot if present, else prune) | prune | dsnot"),
    targets: str = typer.Option(",".join(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
                                "--targets", help="Comma-separated module-name suffixes to adapt."),
    rank: int = typer.Option(16, "--rank", help="Adapter rank (SPP: expansion rank; must divide each output width)."),
    lora_alpha: Optional[float] = typer.Option(None, "--lora-alpha", help="Default: rank."),
    scaling: Optional[float] = typer.Option(None, "--scaling", help="Branch scale (default: spp 2, lors alpha/sqrt(r), lora alpha/r)."),
    dropout: Optional[float] = typer.Option(None, "--dropout", help="Branch input dropout (default: spp 0.05, others 0)."),
    exact_grad: bool = typer.Option(False, "--exact-grad", help="LoRS: exact masked gradient instead of straight-through."),
    ga_init: bool = typer.Option(True, "--ga-init/--no-ga-init", help="LoRS: gradient-based adapter init."),
    init_samples: int = typer.Option(128, "--init-samples", help="LoRS: training examples for the gradient init."),
    data: str = typer.Option("wiki-en", "--data", help="wiki-en | alpaca | alpaca-gpt4 | slimpajama | FILE.json/.jsonl/.txt"),
    data_format: str = typer.Option("auto", "--data-format", help="auto | instruct | text"),
    seqlen: int = typer.Option(512, "--seqlen", help="Cutoff length (instructions) or block size (text)."),
    train_on_inputs: bool = typer.Option(True, "--train-on-inputs/--no-train-on-inputs", help="Loss on prompt and response (reference) or response only."),
    val_size: Optional[int] = typer.Option(None, "--val-size", help="Held-out examples (default min(2000|1024, 10%))."),
    max_train_samples: Optional[int] = typer.Option(None, "--max-train-samples"),
    epochs: float = typer.Option(1.0, "--epochs"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Optimizer steps (overrides --epochs)."),
    batch_size: int = typer.Option(16, "--batch-size", help="Global batch: sequences per optimizer step."),
    micro_batch_size: int = typer.Option(4, "--micro-batch-size", help="Sequences per forward on one process."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (default: spp 4e-3, lors 2e-5, lora 2e-4)."),
    min_lr: float = typer.Option(0.0, "--min-lr"),
    weight_decay: float = typer.Option(0.001, "--weight-decay"),
    warmup_ratio: float = typer.Option(0.03, "--warmup-ratio"),
    scheduler: str = typer.Option("linear", "--scheduler", help="linear | cosine | constant"),
    max_grad_norm: Optional[float] = typer.Option(1.0, "--max-grad-norm"),
    mixed_precision: str = typer.Option("auto", "--mixed-precision", help="auto (bf16 on GPU, no on CPU) | no | bf16 | fp16"),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing"),
    seed: int = typer.Option(42, "--seed"),
    eval_every: int = typer.Option(200, "--eval-every", help="Held-out loss every N steps (and at the end)."),
    eval_batches: Optional[int] = typer.Option(None, "--eval-batches", help="Cap on held-out micro-batches per evaluation."),
    save_every: int = typer.Option(200, "--save-every", help="Resumable checkpoint every N steps."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its newest checkpoint."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    dtype: str = typer.Option("auto", "--dtype", help="Base weights: auto (float32 CPU, bfloat16 GPU) | float32 | bfloat16 | float16"),
    config: Optional[str] = typer.Option(None, "--config", help="YAML with a finetune section; options typed here win."),
    set_: List[str] = typer.Option([], "--set", help="Override finetune.key=value (repeatable)."),
    force: bool = typer.Option(False, "--force", help="Redo a completed (or discard an interrupted) stage."),
):
    """Sparsity-preserving fine-tuning (SPP, LoRS, LoRA-then-remask, SQFT) of the newest sparse checkpoint."""
    from sparse_recover.commands import finetune as cmd
    from sparse_recover.config import FinetuneSection, apply_overrides, deep_merge, load_yaml, validate

    given = {k: v for k, v in ctx.params.items()
             if k not in ("run_dir", "resume", "device", "dtype", "config", "set_", "force")}
    given["targets"] = [t.strip() for t in targets.split(",") if t.strip()]
    given["from_stage"] = given.pop("from_stage")
    if config:
        explicit = _explicit_options(ctx)
        section = load_yaml(config).get("finetune") or {}
        data = {"finetune": deep_merge(section, {k: v for k, v in given.items() if k in explicit})}
    else:
        data = {"finetune": given}
    data = apply_overrides(data, set_)
    cfg = validate(FinetuneSection, data["finetune"])
    cmd.run(cfg, run_dir, device=device, dtype=dtype, resume=resume, force=force)


@app.command()
def merge(
    run_dir: str = typer.Option(..., "--run-dir", help="Run directory with a completed finetune stage."),
    ppl_windows: int = typer.Option(8, "--ppl-windows", help="Held-out wiki-en windows for the before/after check."),
    ppl_seqlen: int = typer.Option(512, "--ppl-seqlen"),
    device: str = typer.Option("auto", "--device"),
    dtype: str = typer.Option("auto", "--dtype"),
    force: bool = typer.Option(False, "--force", help="Merge again."),
):
    """Fold the adapters into the sparse checkpoint (no pruned weight revived) and write RUN/merge."""
    from sparse_recover.commands import merge as cmd
    from sparse_recover.errors import ConfigError

    if ppl_windows < 1 or ppl_seqlen < 2:
        raise ConfigError("--ppl-windows must be at least 1 and --ppl-seqlen at least 2")
    cmd.run(run_dir, device=device, dtype=dtype, force=force, ppl_windows=ppl_windows, ppl_seqlen=ppl_seqlen)


@app.command()
def audit(
    run_dir: str = typer.Option(..., "--run-dir", help="Run directory."),
    stage: List[str] = typer.Option([], "--stage", help="Stage(s) to audit (default: every checkpoint stage)."),
    json_out: bool = typer.Option(False, "--json", help="Print the full report as JSON."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="One line per linear."),
):
    """Check each stage's zeros against its stored masks, N:M groups and per-group budgets."""
    from sparse_recover.commands import audit as cmd

    cmd.run(run_dir, stages=stage or None, as_json=json_out, verbose=verbose)


@app.command("eval")
def eval_(
    run_dir: str = typer.Option(..., "--run-dir", help="Run directory."),
    stage: str = typer.Option("prune", "--stage", help="dense | prune | dsnot"),
    tasks: str = typer.Option("ppl", "--tasks", help="Comma-separated: ppl, zeroshot (7 tasks, acc), mmlu (5-shot), "
                              "wiki-suite (offline), or any lm-eval task name."),
    ppl_data: str = typer.Option("auto", "--ppl-data", help="wikitext2 | wiki-en | FILE (auto: wiki-en for built-in models, else wikitext2)."),
    seqlen: int = typer.Option(2048, "--seqlen", help="Perplexity window length."),
    limit: Optional[int] = typer.Option(None, "--limit", help="First N perplexity windows / N examples per lm-eval task."),
    batch_size: str = typer.Option("auto", "--batch-size", help="auto or an integer (perplexity: windows per call)."),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="Local copies of the standard tasks (DATA_DIR/<task>/<split>.jsonl)."),
    num_fewshot: Optional[int] = typer.Option(None, "--num-fewshot", help="Override the n-shot of every lm-eval task."),
    device: str = typer.Option("auto", "--device"),
    dtype: str = typer.Option("auto", "--dtype"),
    force: bool = typer.Option(False, "--force", help="Measure again even if the result exists."),
):
    """Evaluate a stage of a run directory: perplexity and lm-eval tasks."""
    from sparse_recover.commands import evaluate as cmd
    from sparse_recover.errors import ConfigError

    if batch_size != "auto":
        if not batch_size.isdigit() or int(batch_size) < 1:
            raise ConfigError(f"--batch-size must be auto or a positive integer, got {batch_size!r}")
    cmd.run(run_dir, stage, [t.strip() for t in tasks.split(",") if t.strip()], ppl_data=ppl_data, seqlen=seqlen,
            limit=limit, batch_size=batch_size if batch_size == "auto" else int(batch_size), device=device,
            dtype=dtype, force=force, data_dir=data_dir, num_fewshot=num_fewshot)


@app.command()
def report(
    runs: List[str] = typer.Argument(..., metavar="RUN", help="Run directories."),
    fmt: str = typer.Option("md", "--format", help="md | csv | json"),
    plot: Optional[str] = typer.Option(None, "--plot", help="Also write a PNG: perplexity and average accuracy by "
                                       "stage, per-layer sparsity of the first run (needs matplotlib)."),
    output: Optional[str] = typer.Option(None, "--output", help="Write the table to FILE instead of stdout."),
):
    """Table of every run and stage (method, sparsity, perplexity, task accuracies, training cost), read from
    the manifests and eval files only."""
    from sparse_recover.commands import report as cmd

    cmd.run(runs, fmt=fmt, plot_path=plot, output=output)


@app.command("run")
def run_(
    config: str = typer.Argument(..., help="Pipeline YAML: model, calib, prune, dsnot, finetune, merge, audit, eval sections."),
    run_dir: Optional[str] = typer.Option(None, "--run-dir", help="Run directory (created if missing); optional with --dry-run."),
    set_: List[str] = typer.Option([], "--set", help="Override section.key=value (repeatable)."),
    from_stage: Optional[str] = typer.Option(None, "--from", help="First stage to run: prune | dsnot | finetune | merge | audit | eval."),
    until: Optional[str] = typer.Option(None, "--until", help="Last stage to run."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the stages, their checkpoints and memory estimates; run nothing."),
    force: bool = typer.Option(False, "--force", help="Recompute the selected stages even if complete."),
):
    """Run a whole pipeline from one YAML; completed stages with the same config are skipped."""
    from sparse_recover.commands import run as cmd
    from sparse_recover.config import apply_overrides, load_yaml, validate_pipeline

    cfg = validate_pipeline(apply_overrides(load_yaml(config), set_))
    if run_dir is None and not dry_run:
        raise SparseRecoverError("--run-dir is required (except with --dry-run)")
    cmd.run(cfg, run_dir, from_stage=from_stage, until_stage=until, force=force, dry_run=dry_run,
            config_file=config)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors become one line on stderr and a documented exit code."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app(args=argv, standalone_mode=False)
    except SparseRecoverError as exc:
        print(f"sparse-recover: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except click_exceptions.ClickException as exc:
        print(f"sparse-recover: error: {exc.format_message()}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except click_exceptions.Abort:
        print("sparse-recover: aborted", file=sys.stderr)
        sys.exit(130)
    except click_exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("sparse-recover: interrupted; completed stages are intact", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
