"""lm-eval on the in-memory model: load the planned tasks, run `lm_eval.simple_evaluate`, map failures to
our errors and normalise the results. Task names: tasks.py; DATA_DIR layout: local_data.py.

`run_lm_eval(model, tokenizer, tasks, *, limit=None, batch_size="auto", device=None, num_fewshot=None,
             data_dir=None, include_path=None, bootstrap_iters=1000, quiet=True) -> dict`
    Wraps the loaded model in `lm_eval.models.huggingface.HFLM(pretrained=model, tokenizer=tokenizer, ...)`
    (no re-export) and runs `lm_eval.simple_evaluate` with a `TaskManager(include_path=[...])`.
    Everything that can fail because of the user's input (task names, DATA_DIR files, unreachable hub
    datasets) is checked and the tasks' data loaded BEFORE the first forward pass.

Return value (plain JSON-able dict)
  {
    "lm_eval_version": "0.4.13",
    "requested": ["zeroshot", ...],
    "tasks": {                                  # every leaf task evaluated (all 57 MMLU subjects too)
      "<task>": {"acc": float|None, "acc_stderr": float|None,   # the protocol metric (None: task has no acc)
                 "metrics": {"acc": .., "acc_stderr": .., "acc_norm": .., ...},   # all lm-eval metrics;
                            # a metric under a filter other than "none" is keyed "<metric>,<filter>"
                 "version": <task version>, "n_shot": int, "n_samples": {"original": int, "effective": int},
                 "group": "zeroshot"|"mmlu"|"wiki-suite"|<lm-eval group>|None,
                 "source": "hub"|"data-dir"|"wiki-suite"|"include-path",
                 "data_files": {split: path}   # only for data-dir and wiki-suite tasks
      }, ...},
    "groups": {
      "zeroshot":   {"acc": mean, "acc_stderr": sqrt(sum se^2)/k | None, "tasks": [...], "complete": bool,
                     "n_shot": 0, "aggregation": "..."},
      "wiki-suite": {"acc": mean, "acc_stderr": .., "tasks": [...], "complete": bool, "n_shot": 0, "aggregation": ".."},
                    # present only when the group name itself was requested ("boolq,rte" gives no
                    # zeroshot entry); "complete" is False when a member has no acc
      "mmlu":       {"acc": .., "acc_stderr": .., "metrics": {...}, "tasks": [57 names], "n_shot": 5,
                     "version": .., "aggregation": "...", "subgroups": {"mmlu_stem": {"acc": ..}, ...}},
      "<other lm-eval group>": same shape as mmlu },
    "versions": {name: version}, "n_shot": {name: int},
    "limit": limit, "num_fewshot": num_fewshot, "batch_size": <requested>, "batch_size_used": <passed to HFLM>,
    "device": "cpu", "data_dir": abs path|None, "include_path": [...], "bootstrap_iters": int,
    "wall_time_s": float
  }
  Task-level "group" is the group the task was requested through (zeroshot / wiki-suite / mmlu / an
  lm-eval group name), None for a task requested by its own name.

Other arguments: `bootstrap_iters` (default 1000) only matters for perplexity-type metrics (acc stderrs are
closed-form; lm-eval's default of 100000 is slow); `quiet` (default True) sets the lm_eval loggers to ERROR
during the call and silences what lm-eval prints itself: its tqdm bars and the `datasets` bars (stderr), its
"bootstrapping for stddev" lines (stdout) and git's "fatal: not a git repository" (`simple_evaluate` runs
`git describe` for its results' git_hash; with quiet it runs with git's stderr discarded).
Side effects: lm_eval.simple_evaluate re-seeds python/numpy/torch RNGs (its fixed defaults).

Hub tasks without network: the failure is caught while the tasks are loaded (before any forward pass)
and raised as DataError naming the task and the dataset, suggesting --data-dir or wiki-suite. With
HF_DATASETS_OFFLINE=1 this fails at once; without it, `datasets` retries for 20-45 s first.

Notes
  * batch_size "auto" on a CPU model means BATCH_SIZE_CPU_AUTO (4): lm-eval's automatic detection works by
    catching CUDA out-of-memory errors, which a CPU never raises (it tries batch 64 x the longest request
    and can exhaust host memory). On CUDA "auto" is passed through to lm-eval.
  * HFLM calls `model.eval()` and `model.tie_weights()` on the model and may set the tokenizer's pad token.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from sparse_recover.errors import ConfigError, DataError
from sparse_recover.evaluate import wiki_suite
from sparse_recover.evaluate.tasks import (WIKI_SUITE, ZEROSHOT, Plan, lm_eval_logs, plan_tasks, stock_leaves,
                                           stock_task_config, stock_task_manager, task_manager, write_data_dir_tasks)

BATCH_SIZE_CPU_AUTO = 4

_AGG_ZEROSHOT = "unweighted mean of the task accuracies (acc, not acc_norm): the Wanda / SPP / LoRS protocol"
_AGG_WIKI = "unweighted mean of the task accuracies (acc)"

Files = dict[str, dict[str, str]]  # leaf task -> {split: path}


# --------------------------------------------------------------------------------------------------
# loading tasks (all data access happens here, before the model runs)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def _datasets_of(name: str) -> str:
    try:
        leaves, _ = stock_leaves(name)
        seen = []
        for leaf in leaves:
            stock = stock_task_config(leaf)
            cfg = stock[1] if stock else {}
            ds = cfg.get("dataset_path")
            if ds:
                label = ds + (f" ({cfg['dataset_name']})" if cfg.get("dataset_name") and len(leaves) == 1 else "")
                if label not in seen:
                    seen.append(label)
        return ", ".join(seen) or "its dataset"
    except Exception:
        return "its dataset"


def _build(tm, name: str) -> Any:
    """The Task, Group, or list of Tasks (a tag) that lm-eval builds for `name`; this loads its data."""
    loaded = tm.load([name])
    if name in loaded.get("groups", {}):
        return loaded["groups"][name]
    if name in loaded["tasks"]:
        return loaded["tasks"][name]
    return list(loaded["tasks"].values())


def _load_units(tm, plan: Plan, data_files: Files) -> dict[str, Any]:
    """name -> built Task / Group / list of Tasks (or the name itself on an lm-eval without TaskManager.load)."""
    built: dict[str, Any] = {}
    for unit in plan.units:
        if not hasattr(tm, "load"):  # lm-eval before 0.4.12: simple_evaluate loads the data itself
            built[unit.name] = unit.name
            continue
        try:
            built[unit.name] = _build(tm, unit.name)
        except (ConfigError, DataError):
            raise
        except Exception as exc:  # datasets raises many types (ConnectionError, DatasetNotFoundError, ...)
            if unit.kind == "hub":
                raise DataError(
                    f"task {unit.name} needs the Hugging Face dataset {_datasets_of(unit.name)}, which could not be "
                    f"loaded ({_first_line(exc)}): without network, pass --data-dir with local copies or use "
                    "--tasks wiki-suite (built in, offline)"
                ) from None
            if unit.kind == "data-dir":
                files = sorted(data_files.get(unit.name, {}).values())
                where = f" ({', '.join(files)})" if files else ""
                raise DataError(f"task {unit.name}: could not use its --data-dir files{where}: "
                                f"{type(exc).__name__}: {_first_line(exc)}; check that the rows follow the Hugging "
                                "Face schema the stock task expects") from None
            raise
    return built


def _prepare(plan: Plan, data_dir: str | None, tmp: Path) -> tuple[Any, Files, dict[str, str]]:
    """The TaskManager that finds every planned unit, the data-dir files and the wiki-suite files."""
    paths = list(plan.include_path)
    wiki_files: dict[str, str] = {}
    if any(u.kind == "wiki-suite" for u in plan.units):
        folder, _ = wiki_suite.wiki_suite_tasks()
        paths.append(folder)
        wiki_files = {n: str(Path(folder) / f"{n}-v{wiki_suite.SUITE_VERSION}.jsonl") for n in wiki_suite.ALL_TASKS}
    data_files: Files = {}
    if data_dir is not None and any(u.kind == "data-dir" for u in plan.units):
        data_files = write_data_dir_tasks(plan, data_dir, tmp)
        paths.append(str(tmp))
    # the data-dir YAMLs live in `tmp`, which is deleted after the run: that manager must not be cached
    tm = task_manager(plan.needs_defaults, tuple(paths), cache=not data_files) if paths else stock_task_manager()
    return tm, data_files, wiki_files


# --------------------------------------------------------------------------------------------------
# results


def _num(v: Any) -> Any:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if v in ("N/A", None):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def _metrics(raw: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in raw.items():
        if key in ("alias", "name", "sample_len", "samples") or "," not in key:
            continue
        metric, _, filt = key.partition(",")
        out[metric if filt == "none" else key] = _num(value)
    return out


def _aggregation_text(group_obj, name: str, n: int) -> str:
    from importlib.metadata import version

    aggs = getattr(group_obj, "aggregate_metric_list", None) or []
    for agg in aggs:
        metric = agg.get("metric") if isinstance(agg, dict) else getattr(agg, "metric", None)
        if metric != "acc":
            continue
        weighted = agg.get("weight_by_size") if isinstance(agg, dict) else getattr(agg, "weight_by_size", None)
        how = (f"size-weighted mean over the {n} tasks (each question counts once; weight_by_size=True)"
               if weighted else f"unweighted mean over the {n} tasks (macro average; weight_by_size=False)")
        return f"{how}, computed by lm-eval {version('lm_eval')} for group '{name}'"
    return f"computed by lm-eval {version('lm_eval')} for group '{name}'"


def _group_entry(group, res: dict[str, Any], results: dict[str, Any], n_shot: int | None) -> dict[str, Any]:
    leaves = [t.task_name for t in group.get_all_tasks()]
    subgroups = [g.name for g in group.get_all_groups()] if hasattr(group, "get_all_groups") else []
    m = _metrics(results.get(group.name, {}))
    shots = n_shot if n_shot is not None else res.get("n-shot", {}).get(leaves[0]) if leaves else None
    return {"acc": m.get("acc"), "acc_stderr": m.get("acc_stderr"), "metrics": m, "tasks": leaves, "n_shot": shots,
            "version": _num(res.get("versions", {}).get(group.name)),
            "aggregation": _aggregation_text(group, group.name, len(leaves)),
            "subgroups": {g: _metrics(results.get(g, {})) for g in subgroups if g != group.name}}


def _collect(res: dict[str, Any], built: dict[str, Any], plan: Plan, out: dict[str, Any],
             data_files: Files, wiki_files: dict[str, str]) -> None:
    from lm_eval.api.group import Group

    results = {**res.get("results", {}), **res.get("groups", {})}
    versions = res.get("versions", {})
    n_samples = res.get("n-samples", {})
    for unit in (u for u in plan.units if u.name in built):
        obj = built[unit.name]
        for o in obj if isinstance(obj, list) else [obj]:
            if isinstance(o, Group):
                entry = _group_entry(o, res, results, unit.n_shot)
                out["groups"][o.name] = entry
                out["versions"][o.name] = entry["version"]
                leaves, group_label = entry["tasks"], unit.group or o.name
            else:
                leaves, group_label = [o.task_name if hasattr(o, "task_name") else str(o)], unit.group
            for leaf in leaves:
                m = _metrics(results.get(leaf, {}))
                ns = n_samples.get(leaf, {})
                entry = {"acc": m.get("acc"), "acc_stderr": m.get("acc_stderr"), "metrics": m,
                         "version": _num(versions.get(leaf)), "n_shot": res.get("n-shot", {}).get(leaf),
                         "n_samples": {"original": ns.get("original"), "effective": ns.get("effective")},
                         "group": group_label, "source": unit.kind}
                if unit.kind == "data-dir" and leaf in data_files:
                    entry["data_files"] = data_files[leaf]
                if unit.kind == "wiki-suite" and leaf in wiki_files:
                    entry["data_files"] = {"test": wiki_files[leaf]}
                out["tasks"][leaf] = entry
                out["versions"][leaf] = entry["version"]
                out["n_shot"][leaf] = entry["n_shot"]


def _mean_group(out: dict[str, Any], label: str, members: tuple[str, ...], aggregation: str) -> None:
    present = [t for t in members if t in out["tasks"] and out["tasks"][t]["acc"] is not None
               and out["tasks"][t]["group"] == label]
    if not present:
        return
    accs = [out["tasks"][t]["acc"] for t in present]
    shots = {out["tasks"][t]["n_shot"] for t in present}
    errs = [out["tasks"][t].get("acc_stderr") for t in present]
    # the standard error of a mean of independent task accuracies: sqrt(sum se_i^2) / k
    stderr = math.sqrt(sum(e * e for e in errs)) / len(errs) if None not in errs else None
    out["groups"][label] = {"acc": sum(accs) / len(accs), "acc_stderr": stderr, "tasks": present,
                            "complete": len(present) == len(members),
                            "n_shot": next(iter(shots)) if len(shots) == 1 else None, "aggregation": aggregation}


# --------------------------------------------------------------------------------------------------
# entry point


def _resolve_batch_size(batch_size: int | str, device) -> int | str:
    if isinstance(batch_size, str):
        if batch_size.startswith("auto"):
            # lm-eval's "auto" probes by catching CUDA out-of-memory errors, which a CPU never raises
            return BATCH_SIZE_CPU_AUTO if device.type == "cpu" else batch_size
        if batch_size.isdigit():
            batch_size = int(batch_size)
        else:
            raise ConfigError(f"batch size must be 'auto' or a positive integer, got {batch_size!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch size must be 'auto' or a positive integer, got {batch_size!r}")
    return batch_size


def _place(model, device: Any):
    import torch

    if device is not None:
        target = torch.device(device)
        current = next(model.parameters()).device
        if target.type != current.type or (target.index is not None and target != current):
            model.to(target)
    return next(model.parameters()).device


def _evaluate(lm, tm, plan: Plan, built: dict[str, Any], out: dict[str, Any], files: tuple[Files, dict[str, str]],
              *, limit: int | float | None, bootstrap_iters: int) -> None:
    import lm_eval

    # simple_evaluate takes one num_fewshot per call: one call per distinct n-shot
    buckets: dict[int | None, list] = {}
    for unit in plan.units:
        buckets.setdefault(unit.n_shot, []).append(unit)
    for shots, units in buckets.items():
        objs: list[Any] = []
        for u in units:
            o = built[u.name]
            objs.extend(o if isinstance(o, list) else [o])
        res = lm_eval.simple_evaluate(model=lm, tasks=objs, num_fewshot=shots, limit=limit,
                                      task_manager=tm, bootstrap_iters=bootstrap_iters, log_samples=False)
        if res is None:
            raise RuntimeError("lm_eval.simple_evaluate returned no results")
        _collect(res, {u.name: built[u.name] for u in units}, plan, out, *files)


@contextlib.contextmanager
def _quiet_output(quiet: bool) -> Iterator[None]:
    """With `quiet`, what lm-eval (and the datasets it loads) print goes nowhere, and its git call is silent."""
    if not quiet:
        yield
        return
    import lm_eval.evaluator

    patched = lm_eval.evaluator.get_git_commit_hash
    lm_eval.evaluator.get_git_commit_hash = _git_hash_quietly
    try:
        with open(os.devnull, "w", encoding="utf-8") as sink, contextlib.redirect_stdout(sink), \
                contextlib.redirect_stderr(sink):
            yield
    finally:
        lm_eval.evaluator.get_git_commit_hash = patched


def _git_hash_quietly() -> str | None:
    """lm_eval.loggers.utils.get_git_commit_hash without git's complaint on stderr outside a repository."""
    import subprocess

    from lm_eval.loggers.utils import get_commit_from_path

    try:
        return subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL).strip().decode()
    except (subprocess.CalledProcessError, OSError):
        return get_commit_from_path(os.getcwd())


def run_lm_eval(model, tokenizer, tasks: list[str] | str, *, limit: int | float | None = None,
                batch_size: int | str = "auto", device: Any = None, num_fewshot: int | None = None,
                data_dir: str | None = None, include_path: list[str] | str | None = None,
                bootstrap_iters: int = 1000, quiet: bool = True) -> dict[str, Any]:
    """Run lm-eval tasks on the in-memory `model` (see the module docstring for the result).

    `device`: where to run; the model is moved there when it is elsewhere (None: where it is).
    `limit`: documents per task (an int), or a fraction (float < 1), as lm-eval's --limit.
    `bootstrap_iters`: for bootstrap stderrs (perplexity-type metrics only; acc stderrs are closed-form).
    """
    from importlib.metadata import version

    t0 = time.perf_counter()
    if isinstance(include_path, str):
        include_path = [include_path]
    if limit is not None and (isinstance(limit, bool) or limit <= 0):
        raise ConfigError(f"limit must be positive, got {limit}")
    dev = _place(model, device)
    bs = _resolve_batch_size(batch_size, dev)
    with lm_eval_logs(quiet), _quiet_output(quiet):
        plan = plan_tasks(tasks, data_dir=data_dir, include_path=list(include_path or []), num_fewshot=num_fewshot)
        tmp = Path(tempfile.mkdtemp(prefix="sparse-recover-tasks-"))
        try:
            tm, data_files, wiki_files = _prepare(plan, data_dir, tmp)
            built = _load_units(tm, plan, data_files)
            from lm_eval.models.huggingface import HFLM

            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=bs, device=str(dev))
            out: dict[str, Any] = {
                "lm_eval_version": version("lm_eval"), "requested": plan.requested, "tasks": {}, "groups": {},
                "versions": {}, "n_shot": {}, "limit": limit, "num_fewshot": num_fewshot, "batch_size": batch_size,
                "batch_size_used": bs, "device": str(dev),
                "data_dir": str(Path(data_dir).expanduser().resolve()) if data_dir is not None else None,
                "include_path": plan.include_path, "bootstrap_iters": bootstrap_iters,
            }
            _evaluate(lm, tm, plan, built, out, (data_files, wiki_files), limit=limit, bootstrap_iters=bootstrap_iters)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    _mean_group(out, "zeroshot", ZEROSHOT, _AGG_ZEROSHOT)
    _mean_group(out, WIKI_SUITE, wiki_suite.TASKS, _AGG_WIKI)
    out["wall_time_s"] = round(time.perf_counter() - t0, 3)
    return out
