"""Task planning for lm-eval: which names a request expands to, where each one's data comes from, and the
checks that run before a model is loaded.

`check_tasks(tasks, *, data_dir=None, include_path=None, num_fewshot=None, extra_names=()) -> list[str]`
    Validates a request without a model (the CLI calls it before loading the model): raises ConfigError for
    an unknown name (with close matches) and DataError for a file missing from DATA_DIR. `extra_names`,
    e.g. ("ppl",), are names the caller handles itself: accepted, left out of the result, and offered as
    close matches. Returns the lm-eval task/group names the request expands to (groups expanded by us:
    zeroshot -> its 7 tasks, wiki-suite -> its 2 tasks; lm-eval groups such as mmlu stay one name).

Task names (`tasks`, a list or comma-separated string; duplicates are dropped)
  * `zeroshot`   boolq, rte, hellaswag, winogrande, arc_easy, arc_challenge, openbookqa; 0-shot, metric
                 `acc` (not acc_norm), group value = the unweighted mean of the 7 accs (Wanda/SPP/LoRS).
  * `mmlu`       lm-eval group `mmlu` (57 subjects), 5-shot; group value = the aggregate lm-eval computes;
                 in lm-eval 0.4.x's `mmlu` group config that is `weight_by_size: True`, i.e. the mean over
                 all questions (size-weighted over subjects, NOT the subject macro-average). The actual
                 setting is read from the loaded group and reported in `groups.mmlu.aggregation`.
  * `wiki-suite` wiki_lambada + wiki_continuation, built in, offline (see wiki_suite.py); 0-shot; group
                 value = the unweighted mean of the two accs. `wiki_ppl` (optional) by name.
  * any lm-eval task, group or tag name (its own default n-shot, 0 when it has none), and any task
    defined by YAMLs in `include_path` folders.
  `num_fewshot` (an int) overrides the n-shot of every task, protocols included; None keeps the above.

The first use of a stock lm-eval name outside the zero-shot protocol builds lm-eval's whole task index
(~15 s, cached per process); the zero-shot tasks are looked up in their own folders instead.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from sparse_recover.errors import ConfigError
from sparse_recover.evaluate import wiki_suite
from sparse_recover.evaluate.local_data import StockGroup, StockTask, write_overrides

ZEROSHOT = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
MMLU = "mmlu"
MMLU_FEWSHOT = 5
WIKI_SUITE = "wiki-suite"
GROUP_NAMES = ("zeroshot", MMLU, WIKI_SUITE)

# Stock YAMLs of the zero-shot tasks, relative to lm_eval/tasks: indexing only their folder avoids building
# the whole lm-eval task index; the full index is the fallback when a file moved in another lm-eval release.
_STOCK_YAML = {
    "boolq": "super_glue/boolq/default.yaml",
    "rte": "glue/rte/default.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "winogrande": "winogrande/default.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
}


# --------------------------------------------------------------------------------------------------
# lm-eval task index (cached)

_TM_CACHE: dict[tuple, Any] = {}


@contextlib.contextmanager
def lm_eval_logs(quiet: bool) -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval")]
    old = [lg.level for lg in loggers]
    if quiet:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, old):
            lg.setLevel(level)


def task_manager(include_defaults: bool = True, include_path: tuple[str, ...] = (), *, cache: bool = True):
    key = (include_defaults, tuple(include_path))
    if key in _TM_CACHE:
        return _TM_CACHE[key]
    from lm_eval.tasks import TaskManager

    with lm_eval_logs(True):
        tm = TaskManager(include_path=list(include_path) or None, include_defaults=include_defaults)
    if cache:
        _TM_CACHE[key] = tm
    return tm


def stock_task_manager():
    return task_manager(True, ())


@dataclass(frozen=True)
class _IndexEntry:
    kind: str  # "task" | "python" | "group" | "tag" | "unknown"
    yaml_path: Path | None
    config: dict[str, Any]  # the YAML, includes resolved, !function tags left unresolved; {} for a tag
    tag_members: tuple[str, ...]


def _index_entry(tm, name: str) -> _IndexEntry | None:
    """What lm-eval's task index knows about `name`, without building the task (building loads its dataset).

    The one place that reads lm-eval internals: lm-eval has no public call that returns a task's or group's
    YAML or a tag's members without loading data. `TaskManager.task_index` is a public property, but its
    values are `lm_eval.tasks._index.Entry` objects (kind, yaml_path, cfg, tags), which are not documented.
    Checked against lm-eval 0.4.13 (the TaskManager rewrite of EleutherAI PR #3549); earlier 0.4 releases
    stored plain dicts there.
    """
    entry = tm.task_index.get(name)
    if entry is None:
        return None
    kind = {"TASK": "task", "PY_TASK": "python", "GROUP": "group", "TAG": "tag"}.get(entry.kind.name, "unknown")
    return _IndexEntry(kind=kind, yaml_path=Path(entry.yaml_path) if entry.yaml_path is not None else None,
                       config=entry.cfg or {}, tag_members=tuple(sorted(entry.tags)) if kind == "tag" else ())


def _lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def stock_task_config(name: str) -> tuple[Path, dict[str, Any]] | None:
    """The stock YAML defining task `name` and its config (None for python tasks, groups, tags, unknown names)."""
    rel = _STOCK_YAML.get(name)
    if rel is not None:
        path = _lm_eval_tasks_dir() / rel
        try:
            entry = _index_entry(task_manager(False, (str(path.parent),)), name) if path.is_file() else None
            if entry is not None and entry.kind == "task" and entry.yaml_path == path:
                return path, entry.config
        except Exception:
            pass
    entry = _index_entry(stock_task_manager(), name)
    if entry is None or entry.kind != "task" or entry.yaml_path is None:
        return None
    return entry.yaml_path, entry.config


def stock_leaves(name: str) -> tuple[list[str], list[dict[str, Any]]]:
    """Leaf task names of a stock task/group/tag and the configs of the groups on the way."""
    if name in _STOCK_YAML:
        return [name], []
    tm = stock_task_manager()
    leaves: list[str] = []
    groups: list[dict[str, Any]] = []

    def walk(n: str) -> None:
        entry = _index_entry(tm, n)
        if entry is None:
            raise ConfigError(f"lm-eval task {n!r} (part of {name}) is not in the lm-eval task index")
        if entry.kind == "group":
            groups.append(entry.config)
            for child in entry.config.get("task", []):
                if not isinstance(child, str):
                    raise ConfigError(f"lm-eval group {n!r} defines an inline task; it cannot read --data-dir files")
                walk(child)
        elif entry.kind == "tag":
            for child in entry.tag_members:
                walk(child)
        elif entry.kind == "task":
            if n not in leaves:
                leaves.append(n)
        else:
            raise ConfigError(f"lm-eval task {n!r} is defined in Python and cannot read --data-dir files")

    walk(name)
    return leaves, groups


# --------------------------------------------------------------------------------------------------
# request planning


@dataclass
class Unit:
    name: str  # what lm-eval loads (task, group or tag name)
    kind: str  # "wiki-suite" | "hub" | "data-dir" | "include-path"
    n_shot: int | None  # None: the task's own default
    group: str | None  # our group label (zeroshot, mmlu, wiki-suite) or None


@dataclass
class Plan:
    requested: list[str]
    num_fewshot: int | None = None
    units: list[Unit] = field(default_factory=list)
    include_path: list[str] = field(default_factory=list)
    needs_defaults: bool = False

    def add(self, name: str, kind: str, n_shot: int | None, group: str | None) -> None:
        if self.num_fewshot is not None:
            n_shot = int(self.num_fewshot)
        for unit in self.units:
            if unit.name == name:  # e.g. "boolq,zeroshot": boolq counts in the zeroshot mean
                if group is not None:
                    unit.group, unit.n_shot = group, n_shot
                return
        self.units.append(Unit(name, kind, n_shot, group))


def split_names(tasks: list[str] | str) -> list[str]:
    if isinstance(tasks, str):
        tasks = [tasks]
    out: list[str] = []
    for item in tasks:
        for name in str(item).split(","):
            name = name.strip()
            if name and name not in out:
                out.append(name)
    return out


def _user_names(include_path: list[str]) -> set[str]:
    if not include_path:
        return set()
    for p in include_path:
        if not Path(p).is_dir():
            raise ConfigError(f"include path {p} is not a folder")
    return set(task_manager(False, tuple(str(Path(p).resolve()) for p in include_path)).all_tasks)


def _check_known(names: list[str], own: set[str], user: set[str], extra_names: tuple[str, ...]) -> None:
    unknown = [n for n in names if n not in own and n not in user and n not in extra_names]
    if not unknown:
        return
    known = set(stock_task_manager().all_tasks)
    bad = [n for n in unknown if n not in known]
    if not bad:
        return
    pool = sorted(known | own | user | set(extra_names))
    parts = []
    for n in bad:
        close = difflib.get_close_matches(n, pool, n=5, cutoff=0.6)
        parts.append(f"{n!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    first = "".join(f"{e}, " for e in extra_names)
    raise ConfigError(f"unknown task {'; '.join(parts)}: use {first}zeroshot, mmlu, wiki-suite or an lm-eval task name")


def _expand(plan: Plan, name: str, user: set[str], stock_kind: str) -> None:
    if name == WIKI_SUITE:
        for t in wiki_suite.TASKS:
            plan.add(t, "wiki-suite", 0, WIKI_SUITE)
    elif name in wiki_suite.ALL_TASKS:
        plan.add(name, "wiki-suite", 0, None)
    elif name in user:
        plan.add(name, "include-path", None, None)
    elif name == "zeroshot":
        for t in ZEROSHOT:
            plan.add(t, stock_kind, 0, "zeroshot")
    elif name == MMLU:
        plan.add(MMLU, stock_kind, MMLU_FEWSHOT, MMLU)
    elif name in ZEROSHOT:
        plan.add(name, stock_kind, 0, None)
    else:
        plan.add(name, stock_kind, None, None)


def plan_tasks(tasks: list[str] | str, *, data_dir: str | None, include_path: list[str] | None,
               num_fewshot: int | None, extra_names: tuple[str, ...] = ()) -> Plan:
    names = split_names(tasks)
    if not names:
        raise ConfigError("no task given: use zeroshot, mmlu, wiki-suite or lm-eval task names")
    if num_fewshot is not None and (isinstance(num_fewshot, bool) or int(num_fewshot) < 0):
        raise ConfigError(f"num_fewshot must be a non-negative integer, got {num_fewshot}")
    include_path = [str(Path(p).expanduser().resolve()) for p in (include_path or [])]
    user = _user_names(include_path)
    own = set(GROUP_NAMES) | set(ZEROSHOT) | set(wiki_suite.ALL_TASKS)
    _check_known(names, own, user, extra_names)
    names = [n for n in names if n not in extra_names or n in own or n in user]
    plan = Plan(requested=names, num_fewshot=num_fewshot, include_path=list(include_path))
    for n in names:
        _expand(plan, n, user, "data-dir" if data_dir is not None else "hub")
    plan.needs_defaults = any(u.kind == "hub" for u in plan.units) or bool(include_path)
    return plan


# --------------------------------------------------------------------------------------------------
# data-dir units: the stock YAMLs they redirect to local files


def _data_dir_sources(plan: Plan) -> Iterator[StockGroup | StockTask]:
    # A generator, so that a bad name is reported in request order among the files found missing.
    for unit in plan.units:
        if unit.kind != "data-dir":
            continue
        leaves, groups = stock_leaves(unit.name)
        for config in groups:
            yield StockGroup(config)
        for leaf in leaves:
            stock = stock_task_config(leaf)
            if stock is None:
                raise ConfigError(f"lm-eval task {leaf!r} is not defined by a YAML file; it cannot use --data-dir")
            yield StockTask(leaf, stock[0], stock[1], unit.n_shot)


def write_data_dir_tasks(plan: Plan, data_dir: str | Path, tmp: Path) -> dict[str, dict[str, str]]:
    """Task YAMLs in `tmp` that read the data-dir units from DATA_DIR; returns leaf task -> data_files."""
    return write_overrides(_data_dir_sources(plan), Path(data_dir), tmp)


def check_tasks(tasks: list[str] | str, *, data_dir: str | None = None, include_path: list[str] | None = None,
                num_fewshot: int | None = None, extra_names: tuple[str, ...] = ()) -> list[str]:
    """Validate a request without a model (see the module docstring). Returns the lm-eval names to load."""
    plan = plan_tasks(tasks, data_dir=data_dir, include_path=include_path, num_fewshot=num_fewshot,
                      extra_names=extra_names)
    if data_dir is not None:
        with tempfile.TemporaryDirectory(prefix="sparse-recover-tasks-") as tmp:
            write_data_dir_tasks(plan, data_dir, Path(tmp))
    return [u.name for u in plan.units]
