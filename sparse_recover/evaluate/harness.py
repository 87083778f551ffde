"""lm-eval on the in-memory model: the zero-shot and MMLU protocols, any lm-eval task, local task data,
and the built-in offline `wiki-suite`.

API (used by `sparse-recover eval`)
-----------------------------------
`run_lm_eval(model, tokenizer, tasks, *, limit=None, batch_size="auto", device=None, num_fewshot=None,
             data_dir=None, include_path=None, bootstrap_iters=1000, quiet=True) -> dict`
    Wraps the loaded model in `lm_eval.models.huggingface.HFLM(pretrained=model, tokenizer=tokenizer, ...)`
    (no re-export) and runs `lm_eval.simple_evaluate` with a `TaskManager(include_path=[...])`.
    Everything that can fail because of the user's input (task names, DATA_DIR files, unreachable hub
    datasets) is checked and the tasks' data loaded BEFORE the first forward pass.

`check_tasks(tasks, *, data_dir=None, include_path=None, extra_names=()) -> list[str]`
    The same checks without a model (the CLI calls it before loading the model): raises ConfigError for
    an unknown name (with close matches) and DataError for a file missing from DATA_DIR. `extra_names`,
    e.g. ("ppl",), are names the caller handles itself: accepted, left out of the result, and offered as
    close matches. Returns the lm-eval task/group names the request expands to (groups expanded by us:
    zeroshot -> its 7 tasks, wiki-suite -> its 2 tasks; lm-eval groups such as mmlu stay one name).

Task names (`tasks`, a list; duplicates are dropped)
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
      "zeroshot":   {"acc": mean, "tasks": [...], "complete": bool, "n_shot": 0, "aggregation": "..."},
      "wiki-suite": {"acc": mean, "tasks": [...], "complete": bool, "n_shot": 0, "aggregation": "..."},
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
during the call (lm-eval's own tqdm bars and the `datasets` progress bars still print to stderr).
Side effects: lm_eval.simple_evaluate re-seeds python/numpy/torch RNGs (its fixed defaults).

DATA_DIR layout (`data_dir`: local copies of the standard tasks, rows in their Hugging Face schemas)
  DATA_DIR/<lm-eval task name>/<split>.jsonl   (`.json`, a JSON list or JSON lines, is accepted too)
  The split names are the stock task's own (its Hugging Face split names). Needed:
    boolq/validation.jsonl          aps/super_glue boolq: passage, question, label (0 = no, 1 = yes);
                                    google/boolq rows (passage, question, answer: bool) are accepted
                                    and converted (label = int(answer))
    rte/validation.jsonl            nyu-mll/glue rte: sentence1, sentence2, label (0 = entailment)
    hellaswag/validation.jsonl      Rowan/hellaswag: activity_label, ctx_a, ctx_b, endings, label
    winogrande/validation.jsonl     allenai/winogrande winogrande_xl: sentence, option1, option2, answer ("1"/"2")
    arc_easy/test.jsonl             allenai/ai2_arc ARC-Easy: id, question, choices {text, label}, answerKey
    arc_challenge/test.jsonl        allenai/ai2_arc ARC-Challenge: same schema
    openbookqa/test.jsonl           allenai/openbookqa main: id, question_stem, choices {text, label}, answerKey
    mmlu: either mmlu/test.jsonl + mmlu/dev.jsonl holding all subjects (cais/mmlu "all": question, subject,
          choices [4], answer 0-3; rows are split by `subject`), or per subject
          mmlu_<subject>/test.jsonl + mmlu_<subject>/dev.jsonl (cais/mmlu <subject>). dev = the 5 shots.
  Any other YAML-defined lm-eval task works the same way (DATA_DIR/<task>/<split>.jsonl). The evaluated
  split is the stock task's test split, else its validation split; with n-shot > 0 the few-shot split
  (its `fewshot_split`, else its training split) is required too; other split files are used when present.
  Missing required files raise one DataError naming them (the first three, then a count). The generated task YAMLs `include:` the installed
  stock YAML and override only `dataset_path: json`, `dataset_name: null`, `dataset_kwargs.data_files`
  (absolute paths) and the split keys of absent files (set to null), so prompts, targets and metrics
  stay exactly the stock ones.

Hub tasks without network: the failure is caught while the tasks are loaded (before any forward pass)
and raised as DataError naming the task and the dataset, suggesting --data-dir or wiki-suite. With
HF_DATASETS_OFFLINE=1 this fails at once; without it, `datasets` retries for 20-45 s first.

Notes
  * batch_size "auto" on a CPU model means BATCH_SIZE_CPU_AUTO (4): lm-eval's automatic detection works by
    catching CUDA out-of-memory errors, which a CPU never raises (it tries batch 64 x the longest request
    and can exhaust host memory). On CUDA "auto" is passed through to lm-eval.
  * HFLM calls `model.eval()` and `model.tie_weights()` on the model and may set the tokenizer's pad token.
  * The first use of a stock lm-eval task name builds lm-eval's task index (~15 s, cached per process).
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from sparse_recover.errors import ConfigError, DataError

ZEROSHOT = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
MMLU = "mmlu"
MMLU_FEWSHOT = 5
WIKI_SUITE = "wiki-suite"
GROUP_NAMES = ("zeroshot", MMLU, WIKI_SUITE)
BATCH_SIZE_CPU_AUTO = 4

# Stock YAMLs of the zero-shot tasks, relative to lm_eval/tasks (a fast path that avoids building the whole
# lm-eval task index; checked against the file's `task:` key, the index is the fallback).
_STOCK_YAML = {
    "boolq": "super_glue/boolq/default.yaml",
    "rte": "glue/rte/default.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "winogrande": "winogrande/default.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
}
_SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")

_AGG_ZEROSHOT = "unweighted mean of the task accuracies (acc, not acc_norm): the Wanda / SPP / LoRS protocol"
_AGG_WIKI = "unweighted mean of the task accuracies (acc)"


# --------------------------------------------------------------------------------------------------
# lm-eval task index (cached)

_TM_CACHE: dict[tuple, Any] = {}


@contextlib.contextmanager
def _lm_eval_logs(quiet: bool) -> Iterator[None]:
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


def _task_manager(include_defaults: bool = True, include_path: tuple[str, ...] = (), *, cache: bool = True):
    key = (include_defaults, tuple(include_path))
    if key in _TM_CACHE:
        return _TM_CACHE[key]
    from lm_eval.tasks import TaskManager

    with _lm_eval_logs(True):
        tm = TaskManager(include_path=list(include_path) or None, include_defaults=include_defaults)
    if cache:
        _TM_CACHE[key] = tm
    return tm


def _stock_tm():
    return _task_manager(True, ())


def _lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def _load_yaml(path: Path) -> dict[str, Any]:
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(path, resolve_func=False, recursive=True)


def _stock_yaml(name: str) -> Path | None:
    """Path of the stock YAML defining task `name` (None for python tasks, groups, tags, unknown names)."""
    rel = _STOCK_YAML.get(name)
    if rel is not None:
        path = _lm_eval_tasks_dir() / rel
        try:
            if path.is_file() and _load_yaml(path).get("task") == name:
                return path
        except Exception:
            pass
    from lm_eval.tasks._index import Kind

    entry = _stock_tm().task_index.get(name)
    if entry is None or entry.kind != Kind.TASK or entry.yaml_path is None:
        return None
    return Path(entry.yaml_path)


def _leaves(name: str) -> tuple[list[str], list[Path]]:
    """Leaf task names of a stock task/group/tag and the YAMLs of the groups on the way."""
    from lm_eval.tasks._index import Kind

    if name in _STOCK_YAML:
        return [name], []
    index = _stock_tm().task_index
    leaves: list[str] = []
    groups: list[Path] = []

    def walk(n: str) -> None:
        entry = index.get(n)
        if entry is None:
            raise ConfigError(f"lm-eval task {n!r} (part of {name}) is not in the lm-eval task index")
        if entry.kind == Kind.GROUP:
            groups.append(Path(entry.yaml_path))
            for child in _load_yaml(Path(entry.yaml_path)).get("task", []):
                if not isinstance(child, str):
                    raise ConfigError(f"lm-eval group {n!r} defines an inline task; it cannot read --data-dir files")
                walk(child)
        elif entry.kind == Kind.TAG:
            for child in sorted(entry.tags):
                walk(child)
        elif entry.kind == Kind.TASK:
            if n not in leaves:
                leaves.append(n)
        else:
            raise ConfigError(f"lm-eval task {n!r} is defined in Python and cannot read --data-dir files")

    walk(name)
    return leaves, groups


# --------------------------------------------------------------------------------------------------
# request planning


@dataclass
class _Unit:
    name: str  # what lm-eval loads (task, group or tag name)
    kind: str  # "wiki-suite" | "hub" | "data-dir" | "include-path"
    n_shot: int | None  # None: the task's own default
    group: str | None  # our group label (zeroshot, mmlu, wiki-suite) or None


@dataclass
class _Plan:
    requested: list[str]
    units: list[_Unit] = field(default_factory=list)
    include_path: list[str] = field(default_factory=list)
    needs_defaults: bool = False


def _split_names(tasks: list[str] | str) -> list[str]:
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
    return set(_task_manager(False, tuple(str(Path(p).resolve()) for p in include_path)).all_tasks)


def _plan(tasks: list[str] | str, *, data_dir: str | None, include_path: list[str] | None,
          num_fewshot: int | None, extra_names: tuple[str, ...] = ()) -> _Plan:
    from sparse_recover.evaluate import wiki_suite

    names = _split_names(tasks)
    if not names:
        raise ConfigError("no task given: use zeroshot, mmlu, wiki-suite or lm-eval task names")
    if num_fewshot is not None and (isinstance(num_fewshot, bool) or int(num_fewshot) < 0):
        raise ConfigError(f"num_fewshot must be a non-negative integer, got {num_fewshot}")
    include_path = [str(Path(p).expanduser().resolve()) for p in (include_path or [])]
    user = _user_names(include_path)
    own = set(GROUP_NAMES) | set(ZEROSHOT) | set(wiki_suite.ALL_TASKS)

    unknown = [n for n in names if n not in own and n not in user and n not in extra_names]
    if unknown:
        known = set(_stock_tm().all_tasks)
        bad = [n for n in unknown if n not in known]
        if bad:
            pool = sorted(known | own | user | set(extra_names))
            parts = []
            for n in bad:
                close = difflib.get_close_matches(n, pool, n=5, cutoff=0.6)
                parts.append(f"{n!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
            first = "".join(f"{e}, " for e in extra_names)
            raise ConfigError(
                f"unknown task {'; '.join(parts)}: use {first}zeroshot, mmlu, wiki-suite or an lm-eval task name"
            )
    names = [n for n in names if n not in extra_names or n in own or n in user]
    plan = _Plan(requested=names, include_path=list(include_path))
    seen: set[str] = set()

    def add(name: str, kind: str, n_shot: int | None, group: str | None) -> None:
        if name in seen:  # e.g. "boolq,zeroshot": boolq counts in the zeroshot mean
            for u in plan.units:
                if u.name == name and group is not None:
                    u.group, u.n_shot = group, (n_shot if num_fewshot is None else int(num_fewshot))
            return
        seen.add(name)
        if num_fewshot is not None:
            n_shot = int(num_fewshot)
        plan.units.append(_Unit(name, kind, n_shot, group))

    for n in names:
        if n == WIKI_SUITE:
            for t in wiki_suite.TASKS:
                add(t, "wiki-suite", 0, WIKI_SUITE)
        elif n in wiki_suite.ALL_TASKS:
            add(n, "wiki-suite", 0, None)
        elif n in user:
            add(n, "include-path", None, None)
        else:
            kind = "data-dir" if data_dir is not None else "hub"
            if n == "zeroshot":
                for t in ZEROSHOT:
                    add(t, kind, 0, "zeroshot")
            elif n == MMLU:
                add(MMLU, kind, MMLU_FEWSHOT, MMLU)
            elif n in ZEROSHOT:
                add(n, kind, 0, None)
            else:
                add(n, kind, None, None)
    plan.needs_defaults = any(u.kind == "hub" for u in plan.units) or bool(include_path)
    return plan


def check_tasks(tasks: list[str] | str, *, data_dir: str | None = None, include_path: list[str] | None = None,
                num_fewshot: int | None = None, extra_names: tuple[str, ...] = ()) -> list[str]:
    """Validate a request without a model (see the module docstring). Returns the lm-eval names to load."""
    plan = _plan(tasks, data_dir=data_dir, include_path=include_path, num_fewshot=num_fewshot,
                 extra_names=extra_names)
    if data_dir is not None:
        with tempfile.TemporaryDirectory(prefix="sparse-recover-tasks-") as tmp:
            _write_overrides(plan, Path(data_dir), Path(tmp))
    return [u.name for u in plan.units]


# --------------------------------------------------------------------------------------------------
# DATA_DIR: task YAMLs that include the stock YAML and read local files


class _Missing(Exception):
    """A required DATA_DIR file is absent (collected, then raised as one DataError)."""


def _find_file(folder: Path, split: str) -> Path | None:
    for ext in (".jsonl", ".json"):
        p = folder / f"{split}{ext}"
        if p.is_file():
            return p
    return None


def _read_rows(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json" and text.lstrip().startswith("["):
            return json.loads(text)
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise DataError(f"could not parse {path}: {exc}") from None


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _normalise_boolq(path: Path, tmp: Path, split: str) -> Path:
    rows = _read_rows(path)
    if rows and "label" not in rows[0] and "answer" in rows[0]:
        rows = [{**r, "label": int(bool(r["answer"]))} for r in rows]
        out = tmp / "normalised" / "boolq" / f"{split}.jsonl"
        _write_rows(out, rows)
        return out
    return path


def _mmlu_combined(data_dir: Path, tmp: Path, split: str, subject: str, cache: dict) -> Path | None:
    src = _find_file(data_dir / "mmlu", split)
    if src is None:
        return None
    if split not in cache:
        by_subject: dict[str, list] = {}
        for row in _read_rows(src):
            if "subject" not in row:
                raise DataError(f"{src}: rows need a 'subject' field (the cais/mmlu 'all' schema)")
            by_subject.setdefault(str(row["subject"]), []).append(row)
        cache[split] = (src, by_subject)
    src, by_subject = cache[split]
    rows = by_subject.get(subject)
    if not rows:
        raise DataError(f"{src} has no rows with subject {subject!r}")
    out = tmp / "mmlu-split" / subject / f"{split}.jsonl"
    if not out.is_file():
        _write_rows(out, rows)
    return out


def _eval_split(cfg: dict[str, Any]) -> str | None:
    return cfg.get("test_split") or cfg.get("validation_split")


def _override(task: str, stock_yaml: Path, n_shot: int | None, data_dir: Path, tmp: Path,
              mmlu_cache: dict) -> dict[str, Any]:
    cfg = _load_yaml(stock_yaml)
    if cfg.get("custom_dataset") is not None or "class" in cfg or not cfg.get("dataset_path"):
        raise ConfigError(f"lm-eval task {task!r} does not read a Hugging Face dataset; it cannot use --data-dir")
    eval_split = _eval_split(cfg)
    if eval_split is None:
        raise ConfigError(f"lm-eval task {task!r} has no test or validation split")
    shots = n_shot if n_shot is not None else int(cfg.get("num_fewshot") or 0)
    fewshot_split = cfg.get("fewshot_split") or (cfg.get("fewshot_config") or {}).get("split")
    required = {eval_split}
    if shots > 0:
        if fewshot_split:
            required.add(fewshot_split)
        elif cfg.get("training_split"):
            required.add(cfg["training_split"])
    is_mmlu = cfg.get("dataset_path") == "cais/mmlu"
    folder = data_dir / task
    data_files: dict[str, str] = {}
    out: dict[str, Any] = {"include": str(stock_yaml), "task": task, "dataset_path": "json", "dataset_name": None}
    for key in _SPLIT_KEYS:
        split = cfg.get(key)
        if not split:
            continue
        path = _find_file(folder, split)
        if path is None and is_mmlu:
            path = _mmlu_combined(data_dir, tmp, split, str(cfg.get("dataset_name")), mmlu_cache)
        if path is None:
            if split in required:
                where = (f"{folder / (split + '.jsonl')} (or {data_dir / 'mmlu' / (split + '.jsonl')} with all "
                         "subjects)" if is_mmlu else str(folder / (split + ".jsonl")))
                schema = cfg.get("dataset_path") + (f" ({cfg['dataset_name']})" if cfg.get("dataset_name") else "")
                raise _Missing(f"{where}, the {split} split of task {task} (rows in the Hugging Face schema "
                               f"of {schema})")
            out[key] = None
            continue
        if task == "boolq":
            path = _normalise_boolq(path, tmp, split)
        data_files[split] = str(path.resolve())
    out["dataset_kwargs"] = {"data_files": data_files}
    return out


def _write_overrides(plan: _Plan, data_dir: Path, tmp: Path) -> dict[str, dict[str, str]]:
    """Write override YAMLs for every data-dir unit into `tmp`; returns leaf task -> data_files."""
    import yaml

    data_dir = Path(data_dir).expanduser().resolve()
    if not data_dir.is_dir():
        raise DataError(f"--data-dir {data_dir} is not a folder")
    files: dict[str, dict[str, str]] = {}
    missing: list[str] = []
    mmlu_cache: dict = {}
    for unit in plan.units:
        if unit.kind != "data-dir":
            continue
        leaves, groups = _leaves(unit.name)
        for group_yaml in groups:
            gcfg = _load_yaml(group_yaml)
            name = gcfg["group"]
            (tmp / f"_group_{name}.yaml").write_text(yaml.safe_dump(gcfg, sort_keys=False), encoding="utf-8")
        for leaf in leaves:
            if leaf in files:
                continue
            stock = _stock_yaml(leaf)
            if stock is None:
                raise ConfigError(f"lm-eval task {leaf!r} is not defined by a YAML file; it cannot use --data-dir")
            try:
                cfg = _override(leaf, stock, unit.n_shot, data_dir, tmp, mmlu_cache)
            except _Missing as exc:
                missing.append(str(exc))
                continue
            (tmp / f"{leaf}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
            files[leaf] = cfg["dataset_kwargs"]["data_files"]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise DataError(f"--data-dir is missing {'; '.join(missing[:3])}{more}")
    return files


# --------------------------------------------------------------------------------------------------
# loading tasks (all data access happens here, before the model runs)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def _datasets_of(name: str) -> str:
    try:
        leaves, _ = _leaves(name)
        seen = []
        for leaf in leaves:
            path = _stock_yaml(leaf)
            cfg = _load_yaml(path) if path else {}
            ds = cfg.get("dataset_path")
            if ds:
                label = ds + (f" ({cfg['dataset_name']})" if cfg.get("dataset_name") and len(leaves) == 1 else "")
                if label not in seen:
                    seen.append(label)
        return ", ".join(seen) or "its dataset"
    except Exception:
        return "its dataset"


def _load_units(tm, plan: _Plan, data_files: dict[str, dict[str, str]] | None = None) -> dict[str, Any]:
    """name -> built Task / Group / list of Tasks (or the name itself on an lm-eval without _load_spec)."""
    built: dict[str, Any] = {}
    for unit in plan.units:
        if not hasattr(tm, "_load_spec"):
            built[unit.name] = unit.name
            continue
        try:
            built[unit.name] = tm._load_spec(unit.name)
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
                files = sorted((data_files or {}).get(unit.name, {}).values())
                where = f" ({', '.join(files)})" if files else ""
                raise DataError(f"task {unit.name}: could not use its --data-dir files{where}: "
                                f"{type(exc).__name__}: {_first_line(exc)}; check that the rows follow the Hugging "
                                "Face schema the stock task expects") from None
            raise
    return built


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


def _collect(res: dict[str, Any], built: dict[str, Any], plan: _Plan, out: dict[str, Any],
             data_files: dict[str, dict[str, str]], wiki_files: dict[str, str]) -> None:
    from lm_eval.api.group import Group

    results = {**res.get("results", {}), **res.get("groups", {})}
    versions = res.get("versions", {})
    n_shot = res.get("n-shot", {})
    n_samples = res.get("n-samples", {})
    for unit in (u for u in plan.units if u.name in built):
        obj = built[unit.name]
        objs = obj if isinstance(obj, list) else [obj]
        for o in objs:
            if isinstance(o, Group):
                leaves = [t.task_name for t in o.get_all_tasks()]
                subgroups = [g.name for g in o.get_all_groups()] if hasattr(o, "get_all_groups") else []
                raw = results.get(o.name, {})
                m = _metrics(raw)
                entry = {"acc": m.get("acc"), "acc_stderr": m.get("acc_stderr"), "metrics": m, "tasks": leaves,
                         "n_shot": unit.n_shot if unit.n_shot is not None else n_shot.get(leaves[0]) if leaves else None,
                         "version": _num(versions.get(o.name)),
                         "aggregation": _aggregation_text(o, o.name, len(leaves)),
                         "subgroups": {g: _metrics(results.get(g, {})) for g in subgroups if g != o.name}}
                out["groups"][o.name] = entry
                out["versions"][o.name] = _num(versions.get(o.name))
                group_label = unit.group or o.name
            else:
                leaves = [o.task_name if hasattr(o, "task_name") else str(o)]
                group_label = unit.group
            for leaf in leaves:
                raw = results.get(leaf, {})
                m = _metrics(raw)
                ns = n_samples.get(leaf, {})
                entry = {"acc": m.get("acc"), "acc_stderr": m.get("acc_stderr"), "metrics": m,
                         "version": _num(versions.get(leaf)), "n_shot": n_shot.get(leaf),
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
    out["groups"][label] = {"acc": sum(accs) / len(accs), "tasks": present, "complete": len(present) == len(members),
                            "n_shot": sorted({out["tasks"][t]["n_shot"] for t in present})[0]
                            if len({out["tasks"][t]["n_shot"] for t in present}) == 1 else None,
                            "aggregation": aggregation}


# --------------------------------------------------------------------------------------------------
# entry point


def _resolve_batch_size(batch_size: int | str, device) -> int | str:
    if isinstance(batch_size, str):
        if batch_size.startswith("auto"):
            return BATCH_SIZE_CPU_AUTO if device.type == "cpu" else batch_size
        if batch_size.isdigit():
            batch_size = int(batch_size)
        else:
            raise ConfigError(f"batch size must be 'auto' or a positive integer, got {batch_size!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch size must be 'auto' or a positive integer, got {batch_size!r}")
    return batch_size


def run_lm_eval(model, tokenizer, tasks: list[str] | str, *, limit: int | float | None = None,
                batch_size: int | str = "auto", device: Any = None, num_fewshot: int | None = None,
                data_dir: str | None = None, include_path: list[str] | str | None = None,
                bootstrap_iters: int = 1000, quiet: bool = True) -> dict[str, Any]:
    """Run lm-eval tasks on the in-memory `model` (see the module docstring for names, result and DATA_DIR).

    `device`: where to run; the model is moved there when it is elsewhere (None: where it is).
    `limit`: documents per task (an int), or a fraction (float < 1), as lm-eval's --limit.
    `bootstrap_iters`: for bootstrap stderrs (perplexity-type metrics only; acc stderrs are closed-form).
    """
    import torch

    t0 = time.perf_counter()
    if isinstance(include_path, str):
        include_path = [include_path]
    if limit is not None and (isinstance(limit, bool) or limit <= 0):
        raise ConfigError(f"limit must be positive, got {limit}")
    if device is not None:
        target = torch.device(device)
        current = next(model.parameters()).device
        if target.type != current.type or (target.index is not None and target != current):
            model.to(target)
    dev = next(model.parameters()).device
    bs = _resolve_batch_size(batch_size, dev)

    with _lm_eval_logs(quiet):
        plan = _plan(tasks, data_dir=data_dir, include_path=list(include_path or []), num_fewshot=num_fewshot)
        tmp = Path(tempfile.mkdtemp(prefix="sparse-recover-tasks-"))
        try:
            paths = list(plan.include_path)
            wiki_files: dict[str, str] = {}
            if any(u.kind == "wiki-suite" for u in plan.units):
                from sparse_recover.evaluate import wiki_suite

                folder, _ = wiki_suite.wiki_suite_tasks()
                paths.append(folder)
                wiki_files = {n: str(Path(folder) / f"{n}-v{wiki_suite.SUITE_VERSION}.jsonl")
                              for n in wiki_suite.ALL_TASKS}
            data_files: dict[str, dict[str, str]] = {}
            if data_dir is not None and any(u.kind == "data-dir" for u in plan.units):
                data_files = _write_overrides(plan, Path(data_dir), tmp)
                paths.append(str(tmp))
            tm = (_task_manager(plan.needs_defaults, tuple(paths), cache=not data_files) if paths
                  else _stock_tm())
            built = _load_units(tm, plan, data_files)

            from importlib.metadata import version

            import lm_eval
            from lm_eval.models.huggingface import HFLM

            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=bs, device=str(dev))
            out: dict[str, Any] = {
                "lm_eval_version": version("lm_eval"), "requested": plan.requested, "tasks": {}, "groups": {},
                "versions": {}, "n_shot": {}, "limit": limit, "num_fewshot": num_fewshot, "batch_size": batch_size,
                "batch_size_used": bs, "device": str(dev),
                "data_dir": str(Path(data_dir).expanduser().resolve()) if data_dir is not None else None,
                "include_path": plan.include_path, "bootstrap_iters": bootstrap_iters,
            }
            buckets: dict[int | None, list[_Unit]] = {}
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
                _collect(res, {u.name: built[u.name] for u in units}, plan, out, data_files, wiki_files)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    _mean_group(out, "zeroshot", ZEROSHOT, _AGG_ZEROSHOT)
    from sparse_recover.evaluate.wiki_suite import TASKS as WIKI_TASKS

    _mean_group(out, WIKI_SUITE, WIKI_TASKS, _AGG_WIKI)
    out["wall_time_s"] = round(time.perf_counter() - t0, 3)
    return out
