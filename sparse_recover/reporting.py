"""The report behind `sparse-recover report`: one table (and optionally a plot) that tells, per run, the
story dense -> pruned -> refined (dsnot / reconstruct) -> recovered (merge).

Numbers come only from RUN/manifest.json and RUN/eval/<stage>.json: nothing is recomputed, no model is
loaded. Rows: per model (manifest `model.fingerprint`, else its spec) ONE dense row when any of its runs
evaluated dense (results of several runs merged, the newest per key), then per run its stages in pipeline
order (prune, dsnot, reconstruct, merge) that are complete in the manifest or have evaluation results.

Columns: run (the model's name on a dense row), stage, method, pattern, sparsity (manifest
`stages.<stage>.sparsity.overall`, dense 0); per perplexity setting (data, seqlen, limit, text hash) that any
row has, `ppl <label>` and its change against the model's dense row and the run's prune row
(`vs dense`, `vs pruned`: ppl / ppl_ref - 1) and `recovered`, the share of the pruning loss won back on a log
scale, (log ppl_pruned - log ppl) / (log ppl_pruned - log ppl_dense); a row without that setting shows none,
so a column never mixes settings. Then one column per lm-eval task accuracy (`acc`) with its lm-eval
standard error (`<task>_stderr`; `±` in markdown), `avg_acc` (the mean of the row's task columns; its stderr
sqrt(sum se^2)/k) and its `vs dense` / `vs pruned` difference (accuracy points) and `recovered` share
(acc - acc_pruned) / (acc_dense - acc_pruned), compared only between rows of the same tasks and lm-eval
settings; and the training cost behind a merge row (manifest `stages.finetune.train`). A `recovered` share is
left empty when pruning lost nothing (the denominator is not positive). Columns empty in every row are left
out. Which tasks: leaf tasks requested by name or through `zeroshot` / `wiki-suite` get a column each; an
lm-eval group (e.g. `mmlu`) gets one column with the aggregate lm-eval computed, not one per subject.

Perplexity results are read under their canonical key (EvalKey.canonical): a file that an earlier version
keyed by a relative path is the same setting as the absolute path of today.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from pathlib import Path
from typing import Any

from sparse_recover.errors import ConfigError, RunDirError
from sparse_recover.records import EvalKey
from sparse_recover.rundir import MANIFEST, RunDir
from sparse_recover.stages import EVAL_STAGES

STAGES = EVAL_STAGES
FORMATS = ("md", "csv", "json")
OUR_GROUPS = ("zeroshot", "wiki-suite")  # groups whose member tasks get their own columns
TRAIN_COLUMNS = ("train_steps", "train_tokens", "train_time_s", "trainable_params")
BASE_COLUMNS = ("run", "stage", "method", "pattern", "sparsity")
CHANGES = ("vs dense", "vs pruned", "recovered")


# --------------------------------------------------------------------------------------------------
# reading


def _newest(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return b if str(b.get("measured", "")) >= str(a.get("measured", "")) else a


def _canonical(results: dict[str, Any]) -> dict[str, Any]:
    """Results re-keyed canonically; two keys that mean the same measurement: the newest."""
    out: dict[str, Any] = {}
    for key, result in results.items():
        canon = EvalKey.canonical(key, result)
        out[canon] = _newest(out[canon], result) if canon in out and isinstance(result, dict) else result
    return out


def _load_run(path: str) -> tuple[RunDir, dict[str, Any], dict[str, dict[str, Any]]]:
    """(run dir, manifest, stage -> {eval key: result}); eval files win over the manifest's copy."""
    rd = RunDir(path)
    if not rd.path.exists():
        raise RunDirError(f"{rd.path} does not exist: not a run directory")
    if not rd.exists():
        raise RunDirError(f"{rd.path} is not a run directory (no {MANIFEST})")
    manifest = rd.read()
    evals: dict[str, dict[str, Any]] = {s: dict(v) for s, v in manifest["evals"].items()}
    folder = rd.path / "eval"
    for file in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RunDirError(f"corrupted evaluation file {file}: {exc}") from None
        if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
            raise RunDirError(f"corrupted evaluation file {file}: not an object of results")
        evals.setdefault(file.stem, {}).update(data)
    return rd, manifest, {stage: _canonical(results) for stage, results in evals.items()}


def _pattern_name(spec: str | None) -> str | None:
    """`unstructured:0.5` -> `unstructured` (the sparsity has its own column); N:M as it is."""
    return spec.partition(":")[0] if spec and spec.startswith("unstructured") else spec


def _complete(manifest: dict[str, Any], stage: str) -> bool:
    entry = manifest["stages"].get(stage)
    return bool(entry and entry.get("status") == "complete")


def _stages(manifest: dict[str, Any], evals: dict[str, dict[str, Any]]) -> list[str]:
    return [s for s in STAGES if evals.get(s) or (s != "dense" and _complete(manifest, s))]


def _lm_eval_results(stage_evals: dict[str, Any], rank: dict[str, tuple]) -> list[dict[str, Any]]:
    """The stage's lm-eval results, preferred first (the setting most stages share, then the newest)."""
    keys = [k for k in stage_evals if k.startswith("lm-eval/") and isinstance(stage_evals[k], dict)]
    return [stage_evals[k] for k in sorted(keys, key=lambda k: rank[k], reverse=True)]


def _task_accs(result: dict[str, Any]) -> dict[str, tuple[float, float | None]]:
    """task (or lm-eval group) -> (acc, its lm-eval standard error or None)."""
    out: dict[str, tuple[float, float | None]] = {}
    for name, entry in (result.get("tasks") or {}).items():
        if isinstance(entry, dict) and entry.get("acc") is not None and entry.get("group") in (None, *OUR_GROUPS):
            out[name] = (entry["acc"], _stderr(entry))
    for name, entry in (result.get("groups") or {}).items():
        if name not in OUR_GROUPS and isinstance(entry, dict) and entry.get("acc") is not None:
            out[name] = (entry["acc"], _stderr(entry))
    return out


def _stderr(entry: dict[str, Any]) -> float | None:
    se = entry.get("acc_stderr")
    if se is None:
        se = (entry.get("metrics") or {}).get("acc_stderr")
    return float(se) if isinstance(se, (int, float)) and math.isfinite(se) else None


def _describe_lm_eval(result: dict[str, Any]) -> str:
    text = f"lm-eval {result.get('lm_eval_version', '?')} acc"
    if result.get("limit") is not None:
        text += f", first {result['limit']} examples per task"
    if result.get("num_fewshot") is not None:
        text += f", {result['num_fewshot']}-shot"
    return text


def _chain(manifest: dict[str, Any], stage: str) -> str:
    """prune method, + dsnot, + the fine-tuning method: how the stage's weights were made."""
    stages = manifest["stages"]
    prune = stages.get("prune") or {}
    base = prune.get("method") or ((prune.get("config") or {}).get("prune") or {}).get("method") or "?"
    if stage == "prune":
        return base
    if stage == "dsnot":
        return f"{base} + dsnot"
    if stage == "reconstruct":
        source = (stages.get("reconstruct") or {}).get("source_stage", "prune")
        return _chain(manifest, source if source in ("prune", "dsnot") else "prune") + " + sparsegpt-reconstruct"
    ft = stages.get("finetune") or {}
    merge = stages.get("merge") or {}
    train = ft.get("train") if isinstance(ft.get("train"), dict) else {}
    source = merge.get("source_stage") or ft.get("from")
    if source not in ("prune", "dsnot", "reconstruct"):
        source = "dsnot" if _complete(manifest, "dsnot") else "prune"
    ft_method = train.get("method") or merge.get("finetune_method") or ft.get("method")
    return _chain(manifest, source) + (f" + {ft_method}" if ft_method else " + finetune")


def _train_cost(manifest: dict[str, Any]) -> dict[str, Any]:
    ft = manifest["stages"].get("finetune") or {}
    train = ft.get("train") if isinstance(ft.get("train"), dict) else {}
    return {"train_steps": train.get("steps"), "train_tokens": train.get("tokens"),
            "train_time_s": train.get("wall_time_s", ft.get("wall_time_s") if ft else None),
            "trainable_params": train.get("trainable_params")}


def _run_names(paths: list[Path]) -> list[str]:
    names = [p.name or str(p) for p in paths]
    return [n if names.count(n) == 1 else str(p) for n, p in zip(names, paths)]


def _model_of(manifest: dict[str, Any], fallback: str) -> tuple[str, str]:
    """(identity, label) of the run's dense model: its fingerprint (else its spec), and a short name."""
    model = manifest.get("model") or {}
    spec = str(model.get("spec") or fallback)
    ident = str(model.get("fingerprint") or spec)
    label = os.path.basename(spec.rstrip("/")) if (os.path.isabs(spec) or spec.startswith(".")
                                                    or os.path.exists(spec)) else spec
    return ident, label or spec


# --------------------------------------------------------------------------------------------------
# the table


class _PplSetting:
    """One perplexity setting: canonical data, seqlen, limit and the hash of the text measured."""

    def __init__(self, data: str, seqlen: int, limit: int | None, sha: str | None):
        self.data, self.seqlen, self.limit, self.sha = data, seqlen, limit, sha
        self.windows: set[int] = set()
        self.rows = 0
        self.column = ""

    @property
    def base(self) -> tuple[str, int, int | None]:
        return self.data, self.seqlen, self.limit

    def describe(self) -> str:
        text = f"`{self.column}` = {self.data}, {self.seqlen}-token windows"
        if len(self.windows) == 1:
            text += f", {next(iter(self.windows))} windows"
        elif self.windows:
            text += f", {min(self.windows)}-{max(self.windows)} windows"
        if self.sha:
            text += f", text sha256 {self.sha[:12]}"
        return text


def _ppl_results(evals: dict[str, Any]) -> list[tuple[tuple[str, int, int | None], str | None, dict[str, Any]]]:
    out = []
    for key, result in evals.items():
        parsed = EvalKey.parse(key)
        if parsed is None or parsed.kind != "ppl" or not isinstance(result, dict) or result.get("ppl") is None:
            continue
        out.append(((parsed.data, parsed.seqlen, parsed.limit), result.get("data_sha256"), result))
    return out


def _ppl_settings(raw: list[tuple[dict[str, Any], dict[str, Any]]]) -> list[_PplSetting]:
    """Every perplexity setting any row has, most shared first, each with its column name."""
    hashes: dict[tuple, set[str]] = {}
    for _, evals in raw:
        for base, sha, _ in _ppl_results(evals):
            hashes.setdefault(base, set())
            if sha:
                hashes[base].add(sha)
    settings: dict[tuple, _PplSetting] = {}
    for row, evals in raw:
        cells: dict[tuple, float] = {}
        for base, sha, result in _ppl_results(evals):
            if sha is None and len(hashes[base]) == 1:  # written before hashes were stored: the one text known
                sha = next(iter(hashes[base]))
            ident = (*base, sha)
            setting = settings.setdefault(ident, _PplSetting(*ident))
            if ident not in cells:
                setting.rows += 1
            if result.get("windows") is not None:
                setting.windows.add(int(result["windows"]))
            cells[ident] = result["ppl"]
        row["_ppl"] = cells
    ordered = sorted(settings.values(), key=lambda s: (-s.rows, s.limit is not None, -s.seqlen, s.data, s.sha or ""))
    shorts: dict[str, set[str]] = {}
    for s in ordered:
        shorts.setdefault(os.path.basename(s.data) if os.path.isabs(s.data) else s.data, set()).add(s.data)
    for s in ordered:
        short = os.path.basename(s.data) if os.path.isabs(s.data) else s.data
        name = short if len(shorts[short]) == 1 else s.data
        name += f"/{s.seqlen}" + (f"/limit{s.limit}" if s.limit else "")
        if len(hashes.get(s.base, ())) > 1:
            name += f"@{(s.sha or 'unhashed')[:8]}"
        s.column = f"ppl {name}"
    return ordered


def _changes(value: float | None, dense: float | None, pruned: float | None, stage: str, *,
             log: bool) -> dict[str, float | None]:
    """vs dense, vs pruned and the recovered share of one number (log: perplexity, ratios and log scale)."""
    out: dict[str, float | None] = dict.fromkeys(CHANGES)
    if stage == "dense" or value is None:
        return out

    def ok(x):
        return x is not None and math.isfinite(x) and (x > 0 or not log)

    if not ok(value):
        return out
    if ok(dense):
        out["vs dense"] = value / dense - 1 if log else value - dense
    if stage != "prune" and ok(pruned):
        out["vs pruned"] = value / pruned - 1 if log else value - pruned
        if ok(dense):
            f = math.log if log else (lambda x: -x)  # loss measure: log ppl, or minus accuracy
            lost = f(pruned) - f(dense)
            if lost > 0:
                out["recovered"] = (f(pruned) - f(value)) / lost
    return out


def collect(runs: list[str]) -> tuple[list[dict[str, Any]], list[str], list[str], list[dict[str, Any]]]:
    """(rows, task columns, notes, per-run info) for the given run directories, all read before any output."""
    loaded, seen = [], set()
    for path in runs:
        rd, manifest, evals = _load_run(path)
        real = os.path.realpath(rd.path)
        if real not in seen:
            seen.add(real)
            loaded.append((rd, manifest, evals))
    names = _run_names([rd.path for rd, _, _ in loaded])
    models: dict[str, dict[str, Any]] = {}
    for name, (rd, manifest, evals) in zip(names, loaded):
        ident, label = _model_of(manifest, name)
        model = models.setdefault(ident, {"label": label, "dense": {}, "runs": []})
        model["runs"].append((name, rd, manifest, evals))
        for key, result in evals.get("dense", {}).items():
            dense = model["dense"]
            dense[key] = _newest(dense[key], result) if key in dense and isinstance(result, dict) else result
    labels = [m["label"] for m in models.values()]
    for ident, model in models.items():
        if labels.count(model["label"]) > 1:
            model["label"] += f" ({ident[:8]})"

    # rows without numbers yet, with the evaluation results each reads
    raw: list[tuple[dict[str, Any], dict[str, Any]]] = []
    info: list[dict[str, Any]] = []
    for model in models.values():
        dense_row = None
        if model["dense"]:
            dense_row = {"run": model["label"], "stage": "dense", "method": "dense", "pattern": "dense",
                         "sparsity": 0.0}
            raw.append((dense_row, model["dense"]))
        for name, rd, manifest, evals in model["runs"]:
            stages = _stages(manifest, evals)
            mine = []
            for stage in (s for s in stages if s != "dense"):
                entry = manifest["stages"].get(stage) or {}
                row = {"run": name, "stage": stage, "method": _chain(manifest, stage),
                       "pattern": _pattern_name(entry.get("pattern") or (manifest["stages"].get("prune") or {})
                                                .get("pattern")),
                       "sparsity": (entry.get("sparsity") or {}).get("overall")}
                if stage == "merge" and manifest["stages"].get("finetune"):
                    row["_train"] = _train_cost(manifest)
                raw.append((row, evals.get(stage, {})))
                mine.append(row)
            info.append({"name": name, "path": str(rd.path), "manifest": manifest, "stages": stages,
                         "model": model["label"], "dense": dense_row, "rows": mine})

    settings = _ppl_settings(raw)
    lm_keys = [k for _, ev in raw for k in ev if k.startswith("lm-eval/") and isinstance(ev[k], dict)]
    rank = {k: (lm_keys.count(k), max(str(ev[k].get("measured", "")) for _, ev in raw
                                      if isinstance(ev.get(k), dict)))
            for k in set(lm_keys)}
    tasks: list[str] = []
    used_settings: set[str] = set()
    for row, evals in raw:
        accs: dict[str, tuple[float, float | None]] = {}
        described: set[str] = set()
        for result in _lm_eval_results(evals, rank):
            fresh = {t: a for t, a in _task_accs(result).items() if t not in accs}
            accs.update(fresh)
            if fresh:
                described.add(_describe_lm_eval(result))
        used_settings |= described
        tasks += [t for t in accs if t not in tasks]
        row["_accs"], row["_acc_setting"] = accs, frozenset(described)
    tasks = _order_tasks(tasks)

    by_run = {(r["run"], r["stage"]): r for r, _ in raw if r["stage"] != "dense"}
    dense_of = {i["name"]: i["dense"] for i in info}
    for row, _ in raw:
        accs = row["_accs"]
        present = [t for t in tasks if t in accs]
        row["_avg"] = sum(accs[t][0] for t in present) / len(present) if present else None
        errs = [accs[t][1] for t in present]
        row["_avg_se"] = math.sqrt(sum(e * e for e in errs)) / len(errs) if present and None not in errs else None
        row["_acc_sig"] = (tuple(present), row["_acc_setting"])
    has_train = any("_train" in r for r, _ in raw)
    rows: list[dict[str, Any]] = []
    for row, _ in raw:
        dense = dense_of.get(row["run"]) if row["stage"] != "dense" else None
        pruned = by_run.get((row["run"], "prune")) if row["stage"] != "dense" else None
        out = {k: row[k] for k in BASE_COLUMNS}
        for s in settings:
            value = row["_ppl"].get((s.data, s.seqlen, s.limit, s.sha))
            out[s.column] = value
            ref = [(r["_ppl"].get((s.data, s.seqlen, s.limit, s.sha)) if r is not None else None)
                   for r in (dense, pruned)]
            for change, v in _changes(value, *ref, row["stage"], log=True).items():
                out[f"{s.column} {change}"] = v
        for task in tasks:
            acc, se = row["_accs"].get(task, (None, None))
            out[task], out[f"{task}_stderr"] = acc, se
        out["avg_acc"], out["avg_acc_stderr"] = row["_avg"], row["_avg_se"]
        ref = [r["_avg"] if r is not None and r["_acc_sig"] == row["_acc_sig"] else None for r in (dense, pruned)]
        for change, v in _changes(row["_avg"], *ref, row["stage"], log=False).items():
            out[f"avg_acc {change}"] = v
        if has_train:
            out.update(row.get("_train") or dict.fromkeys(TRAIN_COLUMNS))
        rows.append(out)
    finished = {id(r): out for (r, _), out in zip(raw, rows)}
    for i in info:  # the finished rows of each run (the plot reads them)
        i["dense"] = finished[id(i["dense"])] if i["dense"] is not None else None
        i["rows"] = [finished[id(r)] for r in i["rows"]]

    notes: list[str] = []
    if settings:
        notes.append("perplexity: " + "; ".join(s.describe() for s in settings))
    if tasks:
        notes.append(f"accuracy: {'; '.join(sorted(used_settings))}; avg_acc = mean of a row's task columns; "
                     "± = lm-eval standard error")
    if any(r.get(f"{c} {ch}") is not None for r in rows for c in [s.column for s in settings] + ["avg_acc"]
           for ch in CHANGES):
        notes.append("vs dense / vs pruned: perplexity ratio - 1 (%), accuracy difference (points) against the "
                     "model's dense row and the run's prune row; recovered: share of the pruning loss won back, "
                     "(log ppl_pruned - log ppl) / (log ppl_pruned - log ppl_dense), for avg_acc "
                     "(acc - acc_pruned) / (acc_dense - acc_pruned)")
    shared = [f"{m['label']} ({', '.join(n for n, *_ in m['runs'])})" for m in models.values()
              if m["dense"] and len(m["runs"]) > 1]
    if shared:
        notes.append("dense: one row per model, shared by its runs: " + "; ".join(shared))
    return rows, tasks, notes, info


def _order_tasks(tasks: list[str]) -> list[str]:
    from sparse_recover.evaluate.harness import ZEROSHOT
    from sparse_recover.evaluate.wiki_suite import TASKS as WIKI

    known = [t for t in (*ZEROSHOT, *WIKI) if t in tasks]
    return known + [t for t in tasks if t not in known]


# --------------------------------------------------------------------------------------------------
# formatting


def _optional(col: str) -> bool:
    """Columns left out when every row is empty: changes and standard errors."""
    return col.endswith("_stderr") or any(col.endswith(" " + c) for c in CHANGES)


def columns(rows: list[dict[str, Any]], tasks: list[str], *, markdown: bool = False) -> list[str]:
    """The columns of the table (markdown: a standard error is printed with its value, not in a column)."""
    if not rows:
        return list(BASE_COLUMNS)
    cols = [c for c in rows[0] if not _optional(c) or any(r.get(c) is not None for r in rows)]
    return [c for c in cols if not (markdown and c.endswith("_stderr"))]


def _fmt_ppl(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    return f"{value:.2f}" if value < 1e6 else f"{value:.4g}"


def _signed(value: float, decimals: int) -> str:
    text = f"{value:+.{decimals}f}"
    return "+" + text[1:] if text.startswith("-") and float(text) == 0 else text  # no "-0.0"


def _md_cell(col: str, row: dict[str, Any]) -> str:
    value = row.get(col)
    if value is None:
        return "—"
    if col == "sparsity":
        return f"{100 * value:.1f}%"
    if col.endswith(" recovered"):
        return f"{100 * value:.1f}%"
    if col.startswith("ppl "):
        if col.endswith((" vs dense", " vs pruned")):
            return _signed(100 * value, 1) + "%"
        return _fmt_ppl(value)
    if col.endswith((" vs dense", " vs pruned")):  # accuracy points
        return _signed(100 * value, 2)
    if col == "train_time_s":
        from sparse_recover.runtime import format_seconds

        return format_seconds(value)
    if col in ("train_tokens", "trainable_params", "train_steps"):
        return f"{value:,}" if isinstance(value, int) else str(value)
    if isinstance(value, float):  # task accuracies, in percent as the papers print them, ± their stderr
        se = row.get(f"{col}_stderr")
        return f"{100 * value:.2f}" + (f" ± {100 * se:.2f}" if se is not None else "")
    return str(value).replace("|", "\\|")


def to_markdown(rows: list[dict[str, Any]], tasks: list[str], notes: list[str]) -> str:
    cols = columns(rows, tasks, markdown=True)
    lines = []
    for note in notes:  # paragraphs of their own in rendered markdown
        lines += [note + ("; accuracies in %" if note.startswith("accuracy") else ""), ""]
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "|".join("---" if c in ("run", "stage", "method", "pattern") else "---:" for c in cols) + "|")
    for row in rows:
        lines.append("| " + " | ".join(_md_cell(c, row) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict[str, Any]], tasks: list[str]) -> str:
    cols = columns(rows, tasks)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: ("" if row.get(c) is None else repr(row[c]) if isinstance(row[c], float) else row[c])
                         for c in cols})
    return buf.getvalue()


def to_json(rows: list[dict[str, Any]], tasks: list[str]) -> str:
    cols = columns(rows, tasks)
    return json.dumps([{c: row.get(c) for c in cols} for row in rows], indent=2) + "\n"


# --------------------------------------------------------------------------------------------------
# plot


def _newest_checkpoint(manifest: dict[str, Any]) -> str | None:
    for stage in reversed(STAGES[1:]):
        layers = ((manifest["stages"].get(stage) or {}).get("sparsity") or {}).get("layers")
        if _complete(manifest, stage) and isinstance(layers, dict) and layers:
            return stage
    return None


def _layer_series(layers: dict[str, Any]) -> tuple[dict[str, list[tuple[int, float]]], str]:
    """Per linear kind (q_proj, ..., down_proj): [(decoder block, sparsity %)], and the x-axis label."""
    series: dict[str, list[tuple[int, float]]] = {}
    blocks = True
    for i, (name, entry) in enumerate(layers.items()):
        if not isinstance(entry, dict) or entry.get("sparsity") is None:
            continue
        m = re.search(r"\.(\d+)\.(.+?)(?:\.weight)?$", name)
        kind = m.group(2).rsplit(".", 1)[-1] if m else name
        blocks = blocks and m is not None
        series.setdefault(kind, []).append((int(m.group(1)) if m else i, 100 * entry["sparsity"]))
    return series, "decoder block" if blocks else "linear"


def label_decimals(values: list[float], minimum: int = 1, maximum: int = 6) -> int:
    """The fewest decimals (at least `minimum`) that print every distinct value differently."""
    distinct = sorted(set(v for v in values if v is not None and math.isfinite(v)))
    for d in range(minimum, maximum + 1):
        if len({f"{v:.{d}f}" for v in distinct}) == len(distinct):
            return d
    return maximum


def wants_log(values: list[float]) -> bool:
    """A log axis only when the values span a factor of 3 or more."""
    pos = [v for v in values if v is not None and math.isfinite(v) and v > 0]
    return bool(pos) and max(pos) / min(pos) >= 3


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def plot(rows: list[dict[str, Any]], info: list[dict[str, Any]], path: Path):
    """Perplexity (the most shared setting) and average accuracy by stage for every run (each run from its
    model's dense row), and the per-layer sparsity of the first run's newest checkpoint. Runs that coincide
    stay visible: own marker, a small sideways offset, and `(same as ...)` in the legend. Returns the Figure."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    fig = Figure(figsize=(15, 4.8), layout="constrained")
    ax_ppl, ax_acc, ax_layers = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1, 1.4]})
    present = [s for s in STAGES if any(r["stage"] == s for r in rows)]
    x_of = {s: i for i, s in enumerate(present)}
    ppl_col = next((c for c in (rows[0] if rows else {}) if c.startswith("ppl ") and not _optional(c)), None)
    series = []
    for run in info:
        mine = ([run["dense"]] if run["dense"] is not None else []) + run["rows"]
        ppl = [(x_of[r["stage"]], r[ppl_col]) for r in mine if ppl_col and r.get(ppl_col) is not None]
        acc = [(x_of[r["stage"]], 100 * r["avg_acc"]) for r in mine if r.get("avg_acc") is not None]
        series.append((run["name"], ppl, acc))
    n = len(series)
    step = min(0.08, 0.5 / max(n, 1))
    decimals = {ax: label_decimals([y for s in series for x, y in s[k]]) for ax, k in ((ax_ppl, 1), (ax_acc, 2))}
    printed: set[tuple] = set()
    for i, (name, ppl, acc) in enumerate(series):
        same = next((other for other, p, a in series[:i] if (p, a) == (ppl, acc) and (p or a)), None)
        label = name if same is None else f"{name} (same as {same})"
        dx = (i - (n - 1) / 2) * step
        for ax, pts in ((ax_ppl, ppl), (ax_acc, acc)):
            if not pts:
                continue
            xs, ys = zip(*pts)
            line, = ax.plot([x + dx for x in xs], ys, marker=MARKERS[i % len(MARKERS)],
                            markerfacecolor="none" if same else None, linestyle="--" if same else "-", label=label)
            if same is None:  # a coinciding run's numbers are the ones already printed
                for x, y in pts:
                    if (ax, x, y) in printed:  # the dense row the runs of one model share: once
                        continue
                    printed.add((ax, x, y))
                    ax.annotate(f"{y:.{decimals[ax]}f}", (x + dx, y), textcoords="offset points",
                                xytext=(-5, 5) if i % 2 == 0 else (5, -11), ha="right" if i % 2 == 0 else "left",
                                fontsize="x-small", color=line.get_color())
    titles = ((ax_ppl, f"perplexity ({ppl_col[4:]})" if ppl_col else "perplexity"), (ax_acc, "average accuracy (%)"))
    for ax, title in titles:
        ax.set_xticks(range(len(present)), present)
        ax.set_xlim(-0.5, max(len(present) - 0.5, 0.5))
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "not evaluated", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
    ppl_values = [y for _, p, _ in series for _, y in p]
    if ppl_values and wants_log(ppl_values):
        ax_ppl.set_yscale("log")
        ax_ppl.set_title(ax_ppl.get_title() + ", log scale")
        plain = FuncFormatter(lambda v, _: f"{v:g}")
        ax_ppl.yaxis.set_major_formatter(plain)
        ax_ppl.yaxis.set_minor_formatter(plain)
        ax_ppl.tick_params(axis="y", which="minor", labelsize="x-small")
    first = info[0]
    stage = _newest_checkpoint(first["manifest"])
    if stage is None:
        ax_layers.text(0.5, 0.5, f"{first['name']}: no checkpoint stage with per-layer sparsity", ha="center",
                       va="center", transform=ax_layers.transAxes)
    else:
        layer_series, xlabel = _layer_series(first["manifest"]["stages"][stage]["sparsity"]["layers"])
        for kind, pts in layer_series.items():
            ax_layers.plot(*zip(*pts), marker=".", linewidth=1, label=kind)
        ax_layers.legend(fontsize="x-small", ncol=min(len(layer_series), 4), loc="lower right")
        ax_layers.set_ylim(0, 100)
        ax_layers.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax_layers.set_xlabel(xlabel)
        ax_layers.set_title(f"per-layer sparsity (%): {first['name']} / {stage}")
        ax_layers.grid(True, alpha=0.3)
    fig.savefig(path, dpi=110, format="png")
    return fig


# --------------------------------------------------------------------------------------------------
# entry point


def report(runs: list[str], *, fmt: str = "md", plot_path: str | None = None, output: str | None = None) -> str:
    """Print (or write to `output`) the table for `runs`; with `plot_path`, also write the PNG."""
    if not runs:
        raise ConfigError("report needs at least one run directory")
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if plot_path is not None:
        if Path(plot_path).suffix.lower() != ".png":
            raise ConfigError(f"--plot writes a PNG: give a file name ending in .png, got {plot_path!r}")
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise ConfigError("--plot needs matplotlib: pip install 'sparse-recover[plot]' (or pip install matplotlib)")
    for target in (plot_path, output):
        if target is not None and Path(target).expanduser().is_dir():
            raise ConfigError(f"{target} is a folder: give a file name")
    rows, tasks, notes, info = collect(runs)
    text = {"md": lambda: to_markdown(rows, tasks, notes), "csv": lambda: to_csv(rows, tasks),
            "json": lambda: to_json(rows, tasks)}[fmt]()
    if plot_path is not None:
        target = Path(plot_path).expanduser()
        target.parent.mkdir(parents=True, exist_ok=True)
        plot(rows, info, target)
    if output is not None:
        target = Path(output).expanduser()
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    else:
        print(text, end="")
    return text
