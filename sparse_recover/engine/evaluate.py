"""The evaluation engine: perplexity and lm-eval tasks on one stage of a run directory.

`ppl` is the reference WikiText-2-protocol perplexity (evaluate/ppl.py); every other name goes to
lm-eval on the in-memory model (evaluate/harness.py): `zeroshot`, `mmlu`, the offline `wiki-suite`,
or any lm-eval task. Results go to RUN/eval/<stage>.json and the manifest, each keyed by an `EvalKey`
and stamped with the identity of the checkpoint it measured; a result that exists for the same
checkpoint is not measured again unless --force.

Perplexity data is described canonically: a local file by its resolved absolute path, a source by its
lower-case name, and the result stores `data_sha256` (sha256 of the text measured). So `--ppl-data
m/corpus.jsonl` and `--ppl-data /abs/m/corpus.jsonl` are one measurement, stored once; a file whose
content changed since is measured again (and replaces the old result). Results that earlier versions
keyed by the path as typed are found through the canonical name they stored in `data`
(`EvalKey.canonical`) and are replaced, not duplicated, when measured again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from sparse_recover.config import EvalCommandConfig
from sparse_recover.errors import RunDirError
from sparse_recover.evaluate import dense_cache
from sparse_recover.records import EvalKey
from sparse_recover.rundir import RunDir, now
from sparse_recover.stages import EVAL_STAGES

TASKS = ("ppl",)  # handled here; everything else is an lm-eval name checked by evaluate.harness


def resolve_ppl_source(source: str, model_kind: str) -> str:
    if source.strip().lower() == "auto":
        return "wiki-en" if model_kind == "builtin" else "wikitext2"
    return source


@dataclass
class EvalRequest:
    cfg: EvalCommandConfig
    stage: str
    source: Any  # ModelSource of the checkpoint (or the dense base)
    keys: dict[str, EvalKey]  # "ppl" | "lm-eval" -> key
    checkpoint: str  # identity of what is measured
    harness_tasks: list[str]
    ppl_sha256: str | None = None  # sha256 of the perplexity text (None: a hub source, known once loaded)


def describe_ppl_data(source: str) -> tuple[str, str | None]:
    """(canonical name, sha256 of the text or None) of a perplexity data source, without a hub download:
    a local file -> (resolved absolute path, hash); the built-in wiki-en -> ("wiki-en", hash); a hub
    source -> (its lower-case name, None)."""
    from sparse_recover.data import BUILTIN_SOURCES, evaluation_text, is_local_path

    key = source.strip().lower()
    if key in BUILTIN_SOURCES or (key not in ("wikitext2", "c4") and is_local_path(source)):
        name, text = evaluation_text(source)
        return name, text_sha256(text)
    return key, None


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def prepare(cfg: EvalCommandConfig, rd: RunDir) -> EvalRequest:
    from sparse_recover.engine.stageio import check_data_source, check_seqlen, dense_source
    from sparse_recover.evaluate.harness import check_tasks
    from sparse_recover.models import ModelSource, load_config

    ev, stage = cfg.eval, cfg.stage
    harness_tasks = [t for t in ev.tasks if t not in TASKS]
    if harness_tasks:
        check_tasks(harness_tasks, data_dir=ev.data_dir, num_fewshot=ev.num_fewshot, extra_names=TASKS)
    manifest = rd.require_run()
    if stage == "finetune":  # adapters, not a checkpoint: they are measured through merge
        raise RunDirError(f"the finetune stage holds adapters, not a checkpoint: run `sparse-recover merge --run-dir "
                          f"{rd.path}` (no pruned weight is revived) and evaluate it with `--stage merge`")
    if stage not in EVAL_STAGES:
        raise RunDirError(f"unknown stage {stage!r}: use {', '.join(EVAL_STAGES)}")
    if stage == "dense":
        source = dense_source(rd, "evaluate it from a folder or the hub")
        checkpoint = f"dense|{manifest.model.fingerprint or manifest.model.spec}"
    else:
        path = rd.require(stage)
        source = ModelSource(spec=f"{rd.path}/{stage}", kind="local", path=str(path))
        checkpoint = manifest.stages[stage].identity()
    keys: dict[str, EvalKey] = {}
    ppl_sha256 = None
    if "ppl" in ev.tasks:
        ppl_source = resolve_ppl_source(ev.ppl_data, manifest.model.kind if manifest.model else "hub")
        check_data_source(ppl_source, what="perplexity data")
        check_seqlen(ev.seqlen, load_config(source), "perplexity seqlen",
                     source.spec if stage == "dense" else f"{source.spec}/config.json")
        ppl_name, ppl_sha256 = describe_ppl_data(ppl_source)
        keys["ppl"] = EvalKey.ppl(ppl_name, ev.seqlen, ev.limit)
    if harness_tasks:
        keys["lm-eval"] = EvalKey.lm_eval(harness_tasks, ev.limit, ev.num_fewshot, bool(ev.data_dir))
    return EvalRequest(cfg, stage, source, keys, checkpoint, harness_tasks, ppl_sha256)


def measured(rd: RunDir, req: EvalRequest) -> dict[str, Any]:
    """Results already stored for the same checkpoint, by key: under the key itself or under a key of an
    earlier version that means the same (EvalKey.canonical); a perplexity of other text (its stored
    `data_sha256` differs) does not count."""
    existing = rd.manifest().evals.get(req.stage, {})
    wanted = {str(k) for k in req.keys.values()}
    found: dict[str, Any] = {}
    for key in sorted(existing, key=lambda k: k not in wanted):  # the exact key first
        result = existing[key]
        canon = EvalKey.canonical(key, result)
        if canon not in wanted or canon in found or result.get("checkpoint", req.checkpoint) != req.checkpoint:
            continue
        if canon.startswith("ppl/") and None not in (req.ppl_sha256, result.get("data_sha256")) \
                and result["data_sha256"] != req.ppl_sha256:
            continue
        found[canon] = result
    return found


def eval_stage(req: EvalRequest, rd: RunDir, *, force: bool) -> dict[str, Any]:
    from sparse_recover.models import load_model, load_tokenizer, resolve_device, resolve_dtype
    from sparse_recover.runtime import VERBOSE, format_seconds, metered, summary, verbosity, versions

    ev, stage = req.cfg.eval, req.stage
    done = {} if force else measured(rd, req)
    todo = {kind: str(key) for kind, key in req.keys.items() if str(key) not in done}
    for key in done:
        print(f"eval {stage}: {key} already measured; use --force to measure again")
    if not todo:
        return done
    dev = resolve_device(req.cfg.model.device)
    dtype = resolve_dtype(req.cfg.model.dtype, dev)
    results: dict[str, Any] = {}
    cached = _dense_cache_names(req, todo, dtype, dev) if stage == "dense" and not force else {}
    for kind, name in cached.items():
        hit = dense_cache.lookup(name)
        if hit is not None:
            results[todo.pop(kind)] = {**hit, "cached_from": str(dense_cache.folder() / f"{name}.json")}
            print(f"eval dense: {req.keys[kind]} of this model was measured before; reusing it "
                  f"({dense_cache.folder()})")
    if not todo:
        return _finish(req, rd, done, results)
    tokenizer = load_tokenizer(req.source)
    model = load_model(req.source, dtype=dtype, device=dev)
    if "ppl" in todo:
        key = req.keys["ppl"]
        results[todo["ppl"]] = _perplexity(model, tokenizer, stage, key.data, ev.seqlen, ev.limit, ev.batch_size, dev)
    if "lm-eval" in todo:
        from sparse_recover.evaluate.harness import run_lm_eval

        with metered() as meter:
            res = run_lm_eval(model, tokenizer, req.harness_tasks, limit=ev.limit, batch_size=ev.batch_size, device=dev,
                              num_fewshot=ev.num_fewshot, data_dir=ev.data_dir, quiet=verbosity() < VERBOSE)
            timing = meter.stop()
        res.update({"task": "lm-eval", "measured": now(), "versions": versions(), **timing})
        results[todo["lm-eval"]] = res
        parts = [f"{g} {v['acc']:.4f}" for g, v in res.get("groups", {}).items() if v.get("acc") is not None]
        parts += [f"{t} {v['acc']:.4f}" for t, v in res.get("tasks", {}).items()
                  if v.get("acc") is not None and not v.get("group")]
        summary(f"eval {stage}: {', '.join(parts) or 'done'} (acc) in {format_seconds(timing['wall_time_s'])}")
    for kind, name in cached.items():  # what was measured now goes to the cache for the next run
        if kind in todo and todo[kind] in results:
            dense_cache.store(name, {k: v for k, v in results[todo[kind]].items() if k != "checkpoint"})
    return _finish(req, rd, done, results)


def _finish(req: EvalRequest, rd: RunDir, done: dict[str, Any], results: dict[str, Any]) -> dict[str, Any]:
    for result in results.values():
        result["checkpoint"] = req.checkpoint
    save_results(rd, req.stage, results)
    log_results(rd, req.stage, results)
    return {**done, **results}


def _dense_cache_names(req: EvalRequest, todo: dict[str, str], dtype, dev) -> dict[str, str]:
    """kind -> cache entry name of each dense measurement that can be shared between runs (evaluate/
    dense_cache.py): a local or built-in model folder whose weights hash, and perplexity text whose hash is
    known."""
    if not dense_cache.enabled() or req.source.kind == "hub":
        return {}
    weights = dense_cache.weights_sha256(req.source.path)
    if weights is None:
        return {}
    names = {}
    for kind, key in todo.items():
        if kind == "ppl" and req.ppl_sha256 is None:
            continue
        names[kind] = dense_cache.entry_key(weights, key, data_sha256=req.ppl_sha256 if kind == "ppl" else None,
                                            dtype=str(dtype), device=dev.type)
    return names


def _perplexity(model, tokenizer, stage, ppl_source, seqlen, limit, batch_size, dev) -> dict[str, Any]:
    from sparse_recover.data import evaluation_text
    from sparse_recover.evaluate.ppl import auto_batch_size, perplexity, tokenize_text
    from sparse_recover.runtime import format_seconds, metered, progress, summary, versions

    name, text = evaluation_text(ppl_source)
    ids = tokenize_text(tokenizer, text)
    n_windows = ids.numel() // seqlen if limit is None else min(limit, ids.numel() // seqlen)
    with metered() as meter:
        bar = progress(n_windows, f"ppl {stage} {ppl_source}", unit="window")
        try:
            batch = (auto_batch_size(seqlen, model.config.vocab_size) if batch_size == "auto"
                     else int(batch_size))
            result = perplexity(model, ids, seqlen, dev, batch_size=batch, max_windows=limit, progress=bar.update)
        finally:
            bar.close()
        timing = meter.stop()
    result.update({"data": name, "data_sha256": text_sha256(text), "task": "ppl", "measured": now(),
                   "device": str(dev), "versions": versions(),
                   **timing})
    summary(f"eval {stage}: perplexity {result['ppl']:.4f} on {ppl_source} ({result['windows']} windows x {seqlen} "
            f"tokens) in {format_seconds(timing['wall_time_s'])}")
    return result


def log_results(rd: RunDir, stage: str, results: dict[str, Any]) -> None:
    """RUN/logs/eval.log: one block per measurement (stage and key, result, checkpoint, time)."""
    from sparse_recover.engine.stageio import write_log
    from sparse_recover.runtime import format_seconds

    for key, res in results.items():
        if res.get("task") == "ppl":
            lines = [f"  perplexity {res['ppl']:.6f} (mean loss {res['mean_loss']:.6f}) on {res['data']}: "
                     f"{res['windows']} windows x {res['seqlen']} tokens"]
        else:
            lines = [f"  {name}: acc {v['acc']:.6f}" + (f" +- {v['acc_stderr']:.6f}" if v.get("acc_stderr") is not None
                                                        else "") for name, v in res.get("groups", {}).items()
                     if v.get("acc") is not None]
            lines += [f"  {name}: {json.dumps(v.get('metrics', {}), default=str)} n={v.get('n_samples')}"
                      for name, v in res.get("tasks", {}).items()]
        lines += [f"  checkpoint {res.get('checkpoint')}",
                  f"  wall time {format_seconds(res.get('wall_time_s', 0))}, peak memory {res.get('peak_memory')}"]
        write_log(rd, "eval", f"eval {stage} {key}", lines, res.get("measured"))


def save_results(rd: RunDir, stage: str, results: dict[str, Any]) -> None:
    from sparse_recover.safeio import read_json

    eval_file = rd.path / "eval" / f"{stage}.json"
    current = read_json(eval_file, error=RunDirError, what="evaluation results") if eval_file.is_file() else {}
    _drop_superseded(current, results)
    current.update(results)
    rd.write_json(f"eval/{stage}.json", current)
    manifest = rd.manifest()
    stored = manifest.evals.setdefault(stage, {})
    _drop_superseded(stored, results)
    stored.update(results)
    rd.write(manifest)


def _drop_superseded(stored: dict[str, Any], results: dict[str, Any]) -> None:
    """Remove the results an earlier version stored under another key for what `results` now holds (one
    measurement is stored once)."""
    for key in [k for k in stored if k not in results and EvalKey.canonical(k, stored[k]) in results]:
        del stored[key]

