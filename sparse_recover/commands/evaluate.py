"""`sparse-recover eval`: evaluate one stage of a run directory.

`ppl` is the reference WikiText-2-protocol perplexity (evaluate/ppl.py); every other name goes to
lm-eval on the in-memory model (evaluate/harness.py): `zeroshot`, `mmlu`, the offline `wiki-suite`,
or any lm-eval task. Results go to RUN/eval/<stage>.json and the manifest; a result that exists is
not measured again unless --force.
"""

from __future__ import annotations

from typing import Any

from sparse_recover.errors import ConfigError, RunDirError
from sparse_recover.rundir import CHECKPOINT_STAGES, RunDir, now

TASKS = ("ppl",)  # handled here; everything else is an lm-eval name checked by evaluate.harness


def resolve_ppl_source(source: str, model_kind: str) -> str:
    if source.strip().lower() == "auto":
        return "wiki-en" if model_kind == "builtin" else "wikitext2"
    return source


def run(run_dir: str, stage: str, tasks: list[str], *, ppl_data: str = "auto", seqlen: int = 2048,
        limit: int | None = None, batch_size: int | str = "auto", device: str = "auto", dtype: str = "auto",
        force: bool = False, data_dir: str | None = None, num_fewshot: int | None = None) -> dict[str, Any]:
    from sparse_recover.models import (ModelSource, load_model, load_tokenizer, resolve_device, resolve_dtype,
                                       resolve_model_source)
    from sparse_recover.runtime import format_seconds, metered, quiet_libraries, versions

    quiet_libraries()
    from sparse_recover.evaluate.harness import check_tasks

    if not tasks:
        raise ConfigError("--tasks is empty: use ppl, zeroshot, mmlu, wiki-suite or lm-eval task names")
    harness_tasks = [t for t in tasks if t not in TASKS]
    if harness_tasks:
        check_tasks(harness_tasks, data_dir=data_dir, num_fewshot=num_fewshot, extra_names=TASKS)
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
    keys: dict[str, str] = {}
    if "ppl" in tasks:
        ppl_source = resolve_ppl_source(ppl_data, model_info.get("kind", "hub"))
        keys["ppl"] = f"ppl/{ppl_source}/{seqlen}" + (f"/limit{limit}" if limit else "")
    if harness_tasks:
        keys["lm-eval"] = ("lm-eval/" + ",".join(sorted(dict.fromkeys(harness_tasks)))
                           + (f"/limit{limit}" if limit else "") + (f"/shots{num_fewshot}" if num_fewshot is not None else "")
                           + ("/data-dir" if data_dir else ""))
    existing = rd.read()["evals"].get(stage, {})
    todo = {k: v for k, v in keys.items() if force or v not in existing}
    for kind, key in keys.items():
        if kind not in todo:
            print(f"eval {stage}: {key} already measured; use --force to measure again")
    if not todo:
        return {key: existing[key] for key in keys.values()}

    dev = resolve_device(device)
    tokenizer = load_tokenizer(source.path)
    model = load_model(source, dtype=resolve_dtype(dtype, dev), device=dev)
    results: dict[str, Any] = {}
    if "ppl" in todo:
        results[todo["ppl"]] = _perplexity(model, tokenizer, stage, ppl_source, seqlen, limit, batch_size, dev)
    if "lm-eval" in todo:
        from sparse_recover.evaluate.harness import run_lm_eval

        with metered() as meter:
            res = run_lm_eval(model, tokenizer, harness_tasks, limit=limit, batch_size=batch_size, device=dev,
                              num_fewshot=num_fewshot, data_dir=data_dir,
                              quiet=True)
            timing = meter.stop()
        res.update({"task": "lm-eval", "measured": now(), "versions": versions(), **timing})
        results[todo["lm-eval"]] = res
        parts = [f"{g} {v['acc']:.4f}" for g, v in res.get("groups", {}).items() if v.get("acc") is not None]
        parts += [f"{t} {v['acc']:.4f}" for t, v in res.get("tasks", {}).items()
                  if v.get("acc") is not None and not v.get("group")]
        print(f"eval {stage}: {', '.join(parts) or 'done'} (acc) in {format_seconds(timing['wall_time_s'])}")
    _save(rd, stage, results)
    return results


def _perplexity(model, tokenizer, stage, ppl_source, seqlen, limit, batch_size, dev) -> dict[str, Any]:
    from sparse_recover.data import evaluation_text
    from sparse_recover.evaluate.ppl import perplexity, tokenize_text
    from sparse_recover.runtime import format_seconds, metered, progress, versions

    name, text = evaluation_text(ppl_source)
    ids = tokenize_text(tokenizer, text)
    n_windows = ids.numel() // seqlen if limit is None else min(limit, ids.numel() // seqlen)
    with metered() as meter:
        bar = progress(n_windows, f"ppl {stage} {ppl_source}")
        bar.unit = "window"
        try:
            result = perplexity(model, ids, seqlen, dev, batch_size=1 if batch_size == "auto" else int(batch_size),
                                max_windows=limit, progress=bar.update)
        finally:
            bar.close()
        timing = meter.stop()
    result.update({"data": name, "task": "ppl", "measured": now(), "device": str(dev), "versions": versions(),
                   **timing})
    print(f"eval {stage}: perplexity {result['ppl']:.4f} on {ppl_source} ({result['windows']} windows x {seqlen} tokens) "
          f"in {format_seconds(timing['wall_time_s'])}")
    return result


def _save(rd: RunDir, stage: str, results: dict[str, Any]) -> None:
    import json

    eval_file = f"eval/{stage}.json"
    current = {}
    if (rd.path / eval_file).is_file():
        try:
            current = json.loads((rd.path / eval_file).read_text())
        except json.JSONDecodeError:
            current = {}
    current.update(results)
    rd.write_json(eval_file, current)
    evals = rd.read()["evals"]
    evals.setdefault(stage, {}).update(results)
    rd.update(evals=evals)
