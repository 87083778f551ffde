"""`sparse-recover eval`: evaluate one stage of a run directory (perplexity in this version)."""

from __future__ import annotations

from typing import Any

from sparse_recover.errors import ConfigError, RunDirError
from sparse_recover.rundir import CHECKPOINT_STAGES, RunDir, now

TASKS = ("ppl",)


def resolve_ppl_source(source: str, model_kind: str) -> str:
    if source.strip().lower() == "auto":
        return "wiki-en" if model_kind == "builtin" else "wikitext2"
    return source


def run(run_dir: str, stage: str, tasks: list[str], *, ppl_data: str = "auto", seqlen: int = 2048,
        limit: int | None = None, batch_size: int = 1, device: str = "auto", dtype: str = "auto",
        force: bool = False) -> dict[str, Any]:
    from sparse_recover.data import evaluation_text
    from sparse_recover.evaluate.ppl import perplexity, tokenize_text
    from sparse_recover.models import (ModelSource, load_model, load_tokenizer, resolve_device, resolve_dtype,
                                       resolve_model_source)
    from sparse_recover.runtime import format_seconds, metered, progress, quiet_libraries, versions

    quiet_libraries()
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ConfigError(f"unknown task(s) {', '.join(unknown) or '(none)'}: available tasks are {', '.join(TASKS)}")
    if seqlen < 2:
        raise ConfigError(f"--seqlen must be at least 2, got {seqlen}")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {limit}")
    rd = RunDir(run_dir)
    if not rd.exists():
        raise RunDirError(f"{rd.path} is not a run directory (no manifest.json): run `sparse-recover prune` first")
    manifest = rd.read()
    model_info = manifest.get("model") or {}
    if stage == "dense":
        if not model_info.get("spec"):
            raise RunDirError(f"the manifest of {rd.path} names no base model")
        try:
            source = resolve_model_source(model_info["spec"])
        except Exception as exc:
            raise RunDirError(f"the dense base model {model_info['spec']} is no longer available: {exc}") from None
    elif stage in CHECKPOINT_STAGES:
        path = rd.require(stage)
        source = ModelSource(spec=f"{rd.path}/{stage}", kind="local", path=str(path))
    else:
        raise RunDirError(f"unknown stage {stage!r}: use dense, {', '.join(CHECKPOINT_STAGES)}")
    ppl_source = resolve_ppl_source(ppl_data, model_info.get("kind", "hub"))
    key = f"ppl/{ppl_source}/{seqlen}" + (f"/limit{limit}" if limit else "")
    existing = rd.read()["evals"].get(stage, {})
    if key in existing and not force:
        print(f"eval {stage}: {key} already measured (ppl {existing[key]['ppl']:.4f}); use --force to measure again")
        return existing[key]

    dev = resolve_device(device)
    tokenizer = load_tokenizer(source.path)
    name, text = evaluation_text(ppl_source)
    ids = tokenize_text(tokenizer, text)
    model = load_model(source, dtype=resolve_dtype(dtype, dev), device=dev)
    n_windows = ids.numel() // seqlen if limit is None else min(limit, ids.numel() // seqlen)
    with metered() as meter:
        bar = progress(n_windows, f"ppl {stage} {ppl_source}")
        bar.unit = "window"
        try:
            result = perplexity(model, ids, seqlen, dev, batch_size=batch_size, max_windows=limit,
                                progress=bar.update)
        finally:
            bar.close()
        timing = meter.stop()
    result.update({"data": name, "task": "ppl", "measured": now(), "device": str(dev), "versions": versions(),
                   **timing})
    evals = rd.read()["evals"]
    evals.setdefault(stage, {})[key] = result
    eval_file = f"eval/{stage}.json"
    current = {}
    import json

    if (rd.path / eval_file).is_file():
        try:
            current = json.loads((rd.path / eval_file).read_text())
        except json.JSONDecodeError:
            current = {}
    current[key] = result
    rd.write_json(eval_file, current)
    rd.update(evals=evals)
    print(f"eval {stage}: perplexity {result['ppl']:.4f} on {ppl_source} ({result['windows']} windows x {seqlen} tokens) "
          f"in {format_seconds(timing['wall_time_s'])}")
    return result
