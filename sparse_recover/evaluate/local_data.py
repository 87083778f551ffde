"""DATA_DIR: local copies of the standard lm-eval tasks, read through task YAMLs that include the stock ones.

DATA_DIR layout (rows in the tasks' Hugging Face schemas)
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
  Missing required files raise one DataError naming them (the first three, then a count). The generated
  task YAMLs `include:` the installed stock YAML and override only `dataset_path: json`, `dataset_name: null`,
  `dataset_kwargs.data_files` (absolute paths) and the split keys of absent files (set to null), so prompts,
  targets and metrics stay exactly the stock ones.

This module only reads and writes files: which stock YAMLs a request needs is decided in tasks.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from sparse_recover.errors import ConfigError, DataError

_SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")


@dataclass(frozen=True)
class StockGroup:
    """A stock group YAML, copied so that the group resolves from the local task folder alone."""

    config: dict[str, Any]


@dataclass(frozen=True)
class StockTask:
    """A stock task YAML to redirect to DATA_DIR files."""

    name: str
    yaml_path: Path
    config: dict[str, Any]  # the YAML with its includes resolved
    n_shot: int | None  # None: the task's own default


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


def _required_splits(task: StockTask) -> set[str]:
    cfg = task.config
    if cfg.get("custom_dataset") is not None or "class" in cfg or not cfg.get("dataset_path"):
        raise ConfigError(f"lm-eval task {task.name!r} does not read a Hugging Face dataset; it cannot use --data-dir")
    eval_split = cfg.get("test_split") or cfg.get("validation_split")
    if eval_split is None:
        raise ConfigError(f"lm-eval task {task.name!r} has no test or validation split")
    shots = task.n_shot if task.n_shot is not None else int(cfg.get("num_fewshot") or 0)
    fewshot_split = cfg.get("fewshot_split") or (cfg.get("fewshot_config") or {}).get("split")
    required = {eval_split}
    if shots > 0:
        if fewshot_split:
            required.add(fewshot_split)
        elif cfg.get("training_split"):
            required.add(cfg["training_split"])
    return required


def _missing(task: StockTask, split: str, data_dir: Path, is_mmlu: bool) -> _Missing:
    cfg = task.config
    folder = data_dir / task.name
    where = (f"{folder / (split + '.jsonl')} (or {data_dir / 'mmlu' / (split + '.jsonl')} with all "
             "subjects)" if is_mmlu else str(folder / (split + ".jsonl")))
    schema = cfg.get("dataset_path") + (f" ({cfg['dataset_name']})" if cfg.get("dataset_name") else "")
    return _Missing(f"{where}, the {split} split of task {task.name} (rows in the Hugging Face schema of {schema})")


def _override(task: StockTask, data_dir: Path, tmp: Path, mmlu_cache: dict) -> dict[str, Any]:
    cfg = task.config
    required = _required_splits(task)
    is_mmlu = cfg.get("dataset_path") == "cais/mmlu"
    data_files: dict[str, str] = {}
    out: dict[str, Any] = {"include": str(task.yaml_path), "task": task.name, "dataset_path": "json",
                           "dataset_name": None}
    for key in _SPLIT_KEYS:
        split = cfg.get(key)
        if not split:
            continue
        path = _find_file(data_dir / task.name, split)
        if path is None and is_mmlu:
            path = _mmlu_combined(data_dir, tmp, split, str(cfg.get("dataset_name")), mmlu_cache)
        if path is None:
            if split in required:
                raise _missing(task, split, data_dir, is_mmlu)
            out[key] = None
            continue
        if task.name == "boolq":
            path = _normalise_boolq(path, tmp, split)
        data_files[split] = str(path.resolve())
    out["dataset_kwargs"] = {"data_files": data_files}
    return out


def write_overrides(sources: Iterable[StockGroup | StockTask], data_dir: Path,
                    tmp: Path) -> dict[str, dict[str, str]]:
    """Write a task YAML into `tmp` for every source; returns leaf task -> data_files."""
    import yaml

    data_dir = Path(data_dir).expanduser().resolve()
    if not data_dir.is_dir():
        raise DataError(f"--data-dir {data_dir} is not a folder")
    files: dict[str, dict[str, str]] = {}
    missing: list[str] = []
    mmlu_cache: dict = {}
    for src in sources:
        if isinstance(src, StockGroup):
            name = src.config["group"]
            (tmp / f"_group_{name}.yaml").write_text(yaml.safe_dump(src.config, sort_keys=False), encoding="utf-8")
            continue
        if src.name in files:
            continue
        try:
            cfg = _override(src, data_dir, tmp, mmlu_cache)
        except _Missing as exc:
            missing.append(str(exc))
            continue
        (tmp / f"{src.name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
        files[src.name] = cfg["dataset_kwargs"]["data_files"]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise DataError(f"--data-dir is missing {'; '.join(missing[:3])}{more}")
    return files
