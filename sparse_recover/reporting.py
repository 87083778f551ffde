"""The report behind `sparse-recover report`: one table (and optionally a plot) across the stages of one or more runs.

Numbers come only from RUN/manifest.json and RUN/eval/<stage>.json: nothing is recomputed, no model is
loaded. One row per run and stage, in pipeline order (dense, prune, dsnot, merge), for the stages that
are complete in the manifest or have evaluation results (dense only when it was evaluated).

Columns: run, stage, method, pattern, sparsity (manifest `stages.<stage>.sparsity.overall`, dense 0),
ppl, one column per lm-eval task accuracy (`acc`), avg_acc (the mean of the row's task columns), and
the training cost of the fine-tuning behind a merge row (manifest `stages.finetune.train`).

Which perplexity: a stage can hold several (`ppl/<data>/<seqlen>[/limit<N>]`); per run, the key shared
by the most stages is used for every stage of that run (ties: no limit, then the longer seqlen), so
a row never mixes settings; stages without it show no perplexity. Which tasks: leaf tasks requested
by name or through `zeroshot` / `wiki-suite` get a column each; an lm-eval group (e.g. `mmlu`) gets one
column with the aggregate lm-eval computed, not one per subject.
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
BASE_COLUMNS = ("run", "stage", "method", "pattern", "sparsity", "ppl")


# --------------------------------------------------------------------------------------------------
# reading


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
    return rd, manifest, evals


def _pattern_name(spec: str | None) -> str | None:
    """`unstructured:0.5` -> `unstructured` (the sparsity has its own column); N:M as it is."""
    return spec.partition(":")[0] if spec and spec.startswith("unstructured") else spec


def _complete(manifest: dict[str, Any], stage: str) -> bool:
    entry = manifest["stages"].get(stage)
    return bool(entry and entry.get("status") == "complete")


def _stages(manifest: dict[str, Any], evals: dict[str, dict[str, Any]]) -> list[str]:
    return [s for s in STAGES if evals.get(s) or (s != "dense" and _complete(manifest, s))]


def _ppl_key(evals: dict[str, dict[str, Any]], stages: list[str]) -> str | None:
    counts: dict[str, int] = {}
    for stage in stages:
        for key in evals.get(stage, {}):
            if key.startswith("ppl/"):
                counts[key] = counts.get(key, 0) + 1
    if not counts:
        return None

    def rank(key: str):
        _, seqlen, limit = _parse_ppl_key(key)
        return (counts[key], limit is None, seqlen, key)

    return max(counts, key=rank)


def _parse_ppl_key(key: str) -> tuple[str, int, int | None]:
    """'ppl/<data>/<seqlen>[/limit<N>]' (data may be a path with slashes) -> (data, seqlen, limit)."""
    parsed = EvalKey.parse(key)
    return parsed.data, parsed.seqlen, parsed.limit


def _describe_ppl(key: str, evals: dict[str, dict[str, Any]]) -> str:
    data, seqlen, _ = _parse_ppl_key(key)
    text = f"{data}, {seqlen}-token windows" if seqlen else key
    windows = {r.get("windows") for st in evals.values() for k, r in st.items() if k == key and isinstance(r, dict)}
    windows.discard(None)
    if len(windows) == 1:
        text += f", {windows.pop()} windows"
    return text


def _lm_eval_results(stage_evals: dict[str, Any], rank: dict[str, tuple]) -> list[dict[str, Any]]:
    """The stage's lm-eval results, preferred first (the setting most stages share, then the newest)."""
    keys = [k for k in stage_evals if k.startswith("lm-eval/") and isinstance(stage_evals[k], dict)]
    return [stage_evals[k] for k in sorted(keys, key=lambda k: rank[k], reverse=True)]


def _task_accs(result: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, entry in (result.get("tasks") or {}).items():
        if isinstance(entry, dict) and entry.get("acc") is not None and entry.get("group") in (None, *OUR_GROUPS):
            out[name] = entry["acc"]
    for name, entry in (result.get("groups") or {}).items():
        if name not in OUR_GROUPS and isinstance(entry, dict) and entry.get("acc") is not None:
            out[name] = entry["acc"]
    return out


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
    rows: list[dict[str, Any]] = []
    tasks: list[str] = []
    notes: list[str] = []
    info: list[dict[str, Any]] = []
    ppl_notes: dict[str, list[str]] = {}
    settings: set[str] = set()
    for name, (rd, manifest, evals) in zip(names, loaded):
        stages = _stages(manifest, evals)
        pkey = _ppl_key(evals, stages)
        if pkey:
            ppl_notes.setdefault(_describe_ppl(pkey, evals), []).append(name)
        lm_keys = [k for s in stages for k in evals.get(s, {}) if k.startswith("lm-eval/")]
        rank = {k: (lm_keys.count(k), max(str(evals[s][k].get("measured", "")) for s in stages
                                          if isinstance(evals.get(s, {}).get(k), dict)))
                for k in set(lm_keys)}
        run_rows = []
        for stage in stages:
            entry = manifest["stages"].get(stage) or {}
            se = evals.get(stage, {})
            accs: dict[str, float] = {}
            for result in _lm_eval_results(se, rank):
                fresh = {t: a for t, a in _task_accs(result).items() if t not in accs}
                accs.update(fresh)
                if fresh:
                    settings.add(_describe_lm_eval(result))
            for task in accs:
                if task not in tasks:
                    tasks.append(task)
            sparsity = 0.0 if stage == "dense" else (entry.get("sparsity") or {}).get("overall")
            pattern = "dense" if stage == "dense" else _pattern_name(entry.get("pattern") or (
                manifest["stages"].get("prune") or {}).get("pattern"))
            ppl = se.get(pkey, {}).get("ppl") if pkey and isinstance(se.get(pkey), dict) else None
            row = {"run": name, "stage": stage, "method": "dense" if stage == "dense" else _chain(manifest, stage),
                   "pattern": pattern, "sparsity": sparsity, "ppl": ppl, "ppl_eval": pkey if ppl is not None else None,
                   "_accs": accs}
            if stage == "merge" and manifest["stages"].get("finetune"):
                row.update(_train_cost(manifest))
            run_rows.append(row)
        rows.extend(run_rows)
        info.append({"name": name, "path": str(rd.path), "manifest": manifest, "stages": stages})
    for text, who in ppl_notes.items():
        scope = "" if len(ppl_notes) == 1 else f" ({', '.join(who)})"
        notes.append(f"perplexity{scope}: {text}")
    tasks = _order_tasks(tasks)
    has_train = any(k in r for r in rows for k in TRAIN_COLUMNS)
    for row in rows:
        accs = row.pop("_accs")
        for task in tasks:
            row[task] = accs.get(task)
        present = [accs[t] for t in tasks if t in accs]
        row["avg_acc"] = sum(present) / len(present) if present else None
        if has_train:
            for k in TRAIN_COLUMNS:
                row.setdefault(k, None)
    if tasks:
        notes.append(f"accuracy: {'; '.join(sorted(settings))}; avg_acc = mean of a row's task columns")
    return rows, tasks, notes, info


def _order_tasks(tasks: list[str]) -> list[str]:
    from sparse_recover.evaluate.harness import ZEROSHOT
    from sparse_recover.evaluate.wiki_suite import TASKS as WIKI

    known = [t for t in (*ZEROSHOT, *WIKI) if t in tasks]
    return known + [t for t in tasks if t not in known]


# --------------------------------------------------------------------------------------------------
# formatting


def columns(rows: list[dict[str, Any]], tasks: list[str], *, with_ppl_eval: bool) -> list[str]:
    cols = list(BASE_COLUMNS) + (["ppl_eval"] if with_ppl_eval else []) + tasks + (["avg_acc"] if tasks else [])
    if any("train_steps" in r for r in rows):
        cols += TRAIN_COLUMNS
    return cols


def _md_cell(col: str, value: Any) -> str:
    if value is None:
        return "—"
    if col == "sparsity":
        return f"{100 * value:.1f}%"
    if col == "ppl":
        return f"{value:.2f}" if math.isfinite(value) else str(value)
    if col == "train_time_s":
        from sparse_recover.runtime import format_seconds

        return format_seconds(value)
    if col in ("train_tokens", "trainable_params", "train_steps"):
        return f"{value:,}" if isinstance(value, int) else str(value)
    if isinstance(value, float):  # task accuracies, in percent as the papers print them
        return f"{100 * value:.2f}"
    return str(value).replace("|", "\\|")


def to_markdown(rows: list[dict[str, Any]], tasks: list[str], notes: list[str]) -> str:
    cols = columns(rows, tasks, with_ppl_eval=False)
    lines = []
    for note in notes:  # paragraphs of their own in rendered markdown
        lines += [note + ("; accuracies in %" if note.startswith("accuracy") else ""), ""]
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "|".join("---" if c in ("run", "stage", "method", "pattern") else "---:" for c in cols) + "|")
    for row in rows:
        lines.append("| " + " | ".join(_md_cell(c, row.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict[str, Any]], tasks: list[str]) -> str:
    cols = columns(rows, tasks, with_ppl_eval=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: ("" if row.get(c) is None else repr(row[c]) if isinstance(row[c], float) else row[c])
                         for c in cols})
    return buf.getvalue()


def to_json(rows: list[dict[str, Any]], tasks: list[str]) -> str:
    cols = columns(rows, tasks, with_ppl_eval=True)
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


def plot(rows: list[dict[str, Any]], info: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=(15, 4.6), layout="constrained")
    ax_ppl, ax_acc, ax_layers = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1, 1.4]})
    present = [s for s in STAGES if any(r["stage"] == s for r in rows)]
    x_of = {s: i for i, s in enumerate(present)}
    for run in info:
        mine = [r for r in rows if r["run"] == run["name"]]
        for ax, key, fmt in ((ax_ppl, "ppl", "{:.1f}"), (ax_acc, "avg_acc", "{:.1f}")):
            pts = [(x_of[r["stage"]], r[key] * (100 if key == "avg_acc" else 1)) for r in mine
                   if r.get(key) is not None]
            if pts:
                line, = ax.plot(*zip(*pts), marker="o", label=run["name"])
                for x, y in pts:
                    ax.annotate(fmt.format(y), (x, y), textcoords="offset points", xytext=(6, 4), fontsize="x-small",
                                color=line.get_color())
    for ax, title in ((ax_ppl, "perplexity (log scale)"), (ax_acc, "average accuracy (%)")):
        ax.set_xticks(range(len(present)), present)
        ax.set_xlim(-0.4, max(len(present) - 0.6, 0.4))
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "not evaluated", ha="center", va="center", transform=ax.transAxes)
    if ax_ppl.lines:
        ax_ppl.set_yscale("log")
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
        series, xlabel = _layer_series(first["manifest"]["stages"][stage]["sparsity"]["layers"])
        for kind, pts in series.items():
            ax_layers.plot(*zip(*pts), marker=".", linewidth=1, label=kind)
        ax_layers.legend(fontsize="x-small", ncol=min(len(series), 4), loc="lower right")
        ax_layers.set_ylim(0, 100)
        ax_layers.set_xlabel(xlabel)
        ax_layers.set_title(f"per-layer sparsity (%): {first['name']} / {stage}")
        ax_layers.grid(True, alpha=0.3)
    fig.savefig(path, dpi=110, format="png")


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
