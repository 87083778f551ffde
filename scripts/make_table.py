#!/usr/bin/env python
"""Paper tables: run each row's pipeline (optional), then print published | ours | delta.

    scripts/make_table.py dsnot-1                       # print from the run directories that exist
    scripts/make_table.py dsnot-1 --run                 # run every row in turn first (completed ones skip)
    scripts/make_table.py dsnot-1 --run --smoke         # the same grid on the tiny built-in model
    scripts/make_table.py dsnot-8 --run --rows ID[,ID]  # only these rows
    scripts/make_table.py --check                       # lint configs/papers (published values, config headers)

TABLE is <paper>-<n> (spp-2..7, dsnot-1, -2, -5, -8, -9, -10, lors-1..4): the rows of table<n> in
configs/papers/<paper>/published.yaml, each naming its config and the published cells (stage, metric, value and
where the paper prints it). Row i runs `sparse-recover run <config> --run-dir RUNS/<paper>-<n>/<row id>`, or, with
`same_run_as: <paper>-<m>/<row id>` (the same config in another table), in that row's directory, so one run serves
both tables. A row with
`seeds: [..]` runs once per calibration seed (`--set calib.seed=S`, RUNS/<paper>-<n>/<row id>/seed-S) and its cells
print the mean and standard deviation over the seeds next to the paper's mean (+- std) (DSnoT Table 10). Metrics:
ppl, zeroshot_avg (the 7-task mean, %), mmlu (lm-eval's 5-shot mmlu group, %).
configs/papers/extra/ holds configs no paper has a row for: this script never compares them with a paper.

Before running, each distinct model of the table is checked with `run --dry-run`; a model that cannot be reached
(no hub access and not in the local cache) is reported in one line, its rows are left alone, the other rows run,
and the script exits non-zero after printing the table.

--smoke applies configs/papers/smoke.yaml to the sections a row has (a tiny random LLaMA, a few calibration
windows, two fine-tuning steps, perplexity on a few windows) through `--set`, so every table target runs end to
end in minutes; a table's `smoke_keep` names the settings its columns vary (DSnoT Table 9: calib.nsamples), which
keep the row's value. Rows that become identical on the tiny model share one run directory
(RUNS/<paper>-<n>-smoke/<config hash>). The numbers of a smoke run check the plumbing only.

Our numbers come only from the run manifests (the eval results `run` wrote), never recomputed. Where the paper
prints the per-task accuracies of an average, the table also shows their mean ("tasks avg"); a paper whose printed
average disagrees with its own tasks is flagged, and the delta is given against both.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparse_recover.config import apply_overrides, load_yaml, validate_pipeline  # noqa: E402

PAPERS = ROOT / "configs" / "papers"
EXTRA = "extra"
NOT_ROW_CONFIGS = {"published.yaml", "smoke.yaml"}
STAGES = ("dense", "prune", "dsnot", "merge")
METRICS = {"ppl": "ppl", "zeroshot_avg": "zeroshot", "mmlu": "mmlu"}  # metric -> the eval task that produces it
TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
AVG_TOLERANCE = 0.01  # a printed average further than this from its tasks' mean is the paper contradicting itself
EXTRA_MARK = "EXTRA, NOT A PAPER ROW"
SETTING = re.compile(r"^#   (\S.*)$")
CONTINUATION = re.compile(r"^#     \S")
KEY = re.compile(r"^([a-z_]+)\.([a-z_]+|\*)(?:\s.*)?$")
TITLE_END = re.compile(r"^# Where each setting comes from")  # the header's title block ends here
PAPER_LOCATOR = re.compile(r"\b(Sec\.|Table \d|Appendix|Eq\.|p\. \d|caption|Listing \d)")


# --------------------------------------------------------------------------------------------- checks


def _rel(path: Path) -> Path:
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def norm_line(s: str) -> str:
    """A paper-text line as published.yaml quotes it: tags dropped, whitespace collapsed."""
    return " ".join(re.sub(r"</?b>", "", s).split())


def header_of(path: Path) -> list[str]:
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return lines


def header_settings(lines: list[str]) -> dict[str, str]:
    """'#   key[, key...]: citation' lines (continued by '#     ' lines) -> {key: citation}."""
    entries: list[list[str]] = []
    for line in lines:
        if CONTINUATION.match(line) and entries:
            entries[-1][1] += " " + line[1:].strip()
        elif m := SETTING.match(line):
            keys, sep, cite = m.group(1).partition(": ")
            entries.append([keys, cite if sep else ""])
    out = {}
    for keys, cite in entries:
        for part in keys.split(", "):
            if km := KEY.match(part.strip()):
                out[f"{km.group(1)}.{km.group(2)}"] = cite
    return out


def config_leaves(data: dict) -> list[str]:
    return [f"{sec}.{key}" for sec, values in data.items() if isinstance(values, dict) for key in values]


def config_problems(path: Path, paper_key: str | None = None, tables: set[int] | None = None) -> list[str]:
    """A paper row config (paper_key, tables) or an extra config (paper_key None): its header names where it
    belongs and cites a source for every setting it makes."""
    rel = _rel(path)
    lines = header_of(path)
    if not lines:
        return [f"{rel}: no header comment (paper, table and the source of every setting)"]
    title = []
    for line in lines:  # the title block: up to "Where each setting comes from" or the first setting
        if TITLE_END.match(line) or SETTING.match(line):
            break
        title.append(line)
    first = " ".join(line[1:].strip() for line in (title or lines[:3]))
    problems = []
    if paper_key is None:
        if not first.startswith(EXTRA_MARK):
            problems.append(f"{rel}: an extra config's header must start with '{EXTRA_MARK}'")
    else:
        if not first.startswith(f"{paper_key} ("):
            problems.append(f"{rel}: header does not start with the paper ('{paper_key} (...)')")
        for n in sorted(tables or ()):
            if f"Table {n}:" not in first:
                problems.append(f"{rel}: header does not name {paper_key} Table {n} (its published.yaml row)")
    cites = header_settings(lines)
    try:
        data = load_yaml(str(path))
    except Exception as exc:  # noqa: BLE001 - reported with the file
        return problems + [f"{rel}: {exc}"]
    for leaf in config_leaves(data):
        cite = cites.get(leaf) or cites.get(leaf.split(".")[0] + ".*")
        if not cite:
            problems.append(f"{rel}: setting {leaf} has no source in the header ('#   {leaf}: <paper section / "
                            "table, or not stated in the paper; from the reference code at <file>>')")
    for key, cite in cites.items():
        if not PAPER_LOCATOR.search(cite) and not ("not stated in the paper" in cite and (
                "from the reference code at " in cite or "ours" in cite)):
            problems.append(f"{rel}: the source of {key} names no paper section/table and does not say "
                            "'not stated in the paper; from the reference code at <file>' (or 'ours')")
    return problems


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def cell_problems(where: str, cell: dict, paper_key: str, table_no: int, cfg: dict | None,
                  text_lines: list[str] | None) -> list[str]:
    p = []
    for field in ("column", "stage", "metric", "status"):
        if not cell.get(field) or not isinstance(cell.get(field), str):
            p.append(f"{where}: no {field}")
    stage, metric = cell.get("stage"), cell.get("metric")
    if stage not in STAGES:
        p.append(f"{where}: stage {stage!r} is not one of {', '.join(STAGES)}")
    if metric not in METRICS:
        p.append(f"{where}: metric {metric!r} is not one of {', '.join(METRICS)}")
    if cfg is not None and stage in STAGES and metric in METRICS:
        ev = cfg.get("eval") or {}
        if stage not in (ev.get("stages") or []):
            p.append(f"{where}: its config never evaluates the {stage} stage (eval.stages)")
        if METRICS[metric] not in (ev.get("tasks") or []):
            p.append(f"{where}: its config never measures {METRICS[metric]} (eval.tasks)")
    if "published" not in cell:
        p.append(f"{where}: no published field (a number, or null with a reason)")
        return p
    pub = cell["published"]
    if pub is None:
        if cell.get("status") == "verified":
            p.append(f"{where}: null but status verified")
        if not isinstance(cell.get("reason"), str) or not cell["reason"].strip():
            p.append(f"{where}: null without a reason (why no paper reports it)")
        if cell.get("source"):
            p.append(f"{where}: null but has a source")
        return p
    if not _is_number(pub):
        return p + [f"{where}: published {pub!r} is not a number"]
    if cell.get("status") != "verified":
        p.append(f"{where}: status {cell.get('status')!r}: a published number must be 'verified' (read in the paper)")
    src = cell.get("source")
    if not isinstance(src, dict):
        return p + [f"{where}: no source (paper, table, row, column, printed, line)"]
    for field in ("paper", "row", "column", "printed", "line"):
        if not isinstance(src.get(field), str) or not src[field].strip():
            p.append(f"{where}: source has no {field}")
    if src.get("paper") != paper_key:
        p.append(f"{where}: source paper {src.get('paper')!r} is not this file's paper {paper_key!r}")
    if src.get("table") != table_no:
        p.append(f"{where}: source table {src.get('table')!r} is not the table it is filed under ({table_no})")
    printed, line = src.get("printed"), src.get("line")
    if isinstance(printed, str) and isinstance(line, str):
        try:
            if not math.isclose(float(printed), pub, rel_tol=0, abs_tol=1e-9 * max(1.0, abs(pub))):
                p.append(f"{where}: published {pub} is not the printed {printed!r}")
        except ValueError:
            p.append(f"{where}: printed {printed!r} is not a number")
        token = src.get("printed_as", printed)  # the conversion glued a cell to its neighbour: the glued token
        if not isinstance(token, str) or not token.startswith(printed):
            p.append(f"{where}: printed_as {token!r} does not start with the printed {printed!r}")
        elif not on_line(token, line):
            p.append(f"{where}: printed {token!r} is not on its source line")
        if text_lines is not None and not any(line in t for t in text_lines):
            p.append(f"{where}: source line not found in the paper text: {line!r}")
    if "published_std" in cell:  # a mean over seeds printed with its standard deviation
        std, printed_std = cell["published_std"], src.get("printed_std")
        if not _is_number(std) or not isinstance(printed_std, str):
            p.append(f"{where}: published_std needs a number and source.printed_std (the std as printed)")
        else:
            try:
                if not math.isclose(float(printed_std), std, rel_tol=0, abs_tol=1e-12):
                    p.append(f"{where}: published_std {std} is not the printed {printed_std!r}")
            except ValueError:
                p.append(f"{where}: printed_std {printed_std!r} is not a number")
            if isinstance(line, str) and not re.search(
                    rf"(?<![\d.]){re.escape(printed)}\s*\(\s*(?:<math>)?\s*(?:\$\s*)?\\pm\s*{re.escape(printed_std)}"
                    rf"(?![\d])", line):
                p.append(f"{where}: '{printed} (\u00b1{printed_std})' is not on its source line")
    tasks = cell.get("tasks")
    if tasks is not None:
        if metric != "zeroshot_avg" or not isinstance(tasks, dict) or set(tasks) != set(TASKS):
            p.append(f"{where}: tasks must map the seven zero-shot tasks ({', '.join(TASKS)}) of an average")
        elif isinstance(line, str):
            for name, v in tasks.items():
                if not _is_number(v) or f"{v:.2f}" not in line.split():
                    p.append(f"{where}: task {name} = {v!r} is not on its source line")
    if "note" in cell and (not isinstance(cell["note"], str) or not cell["note"].strip()):
        p.append(f"{where}: empty note")
    return p


def on_line(token: str, line: str) -> bool:
    """`token` is one cell of the line: a whitespace-separated word, or a number followed by '(' (Table 10's
    '10.42(' +- std)."""
    return token in line.split() or re.search(rf"(?<![\w.]){re.escape(token)}(?=\s*\()", line) is not None


def same_run_problems(where: str, row: dict, tables: dict, paper: str) -> list[str]:
    """`same_run_as: <paper>-<n>/<row id>`: a row of another table of this file with the same config, whose run
    directory this row reads (and runs, if missing) instead of its own."""
    ref = row["same_run_as"]
    tab, _, rid = str(ref).partition("/")
    key = f"table{tab.removeprefix(paper + '-')}" if tab.startswith(paper + "-") else None
    other = next((r for r in ((tables.get(key) or {}).get("rows") or []) if r.get("id") == rid), None) if key else None
    if other is None or other is row:
        return [f"{where}: same_run_as {ref!r} names no other row of this file (<paper>-<n>/<row id>)"]
    problems = []
    if other.get("config") != row.get("config"):
        problems.append(f"{where}: same_run_as {ref!r} runs {other.get('config')}, not this row's {row.get('config')}")
    if other.get("same_run_as") or other.get("seeds") or row.get("seeds"):
        problems.append(f"{where}: same_run_as must name a plain row (no same_run_as, no seeds on either)")
    return problems


def published_problems(path: Path, texts: Path | None = None) -> list[str]:
    """Everything wrong with one configs/papers/<paper>/published.yaml, each problem naming the file."""
    rel = _rel(path)
    try:
        data = load_yaml(str(path))
    except Exception as exc:  # noqa: BLE001
        return [f"{rel}: {exc}"]
    problems = []
    paper_key = data.get("paper_key")
    if not data.get("paper") or not paper_key:
        problems.append(f"{rel}: needs paper (full citation) and paper_key (the short name sources use)")
    text_lines = None
    if texts is not None and data.get("paper_text"):
        text_path = texts / data["paper_text"]
        if text_path.is_file():
            text_lines = [norm_line(t) for t in text_path.read_text(encoding="utf-8").splitlines()]
    tables = data.get("tables")
    if not isinstance(tables, dict) or not tables:
        return problems + [f"{rel}: no tables"]
    ids = set()
    for key, table in tables.items():
        m = re.fullmatch(r"table(\d+)", str(key))
        if not m:
            problems.append(f"{rel}: table key {key!r} is not table<N>")
            continue
        table_no = int(m.group(1))
        if not isinstance(table, dict) or not table.get("title") or not table.get("rows"):
            problems.append(f"{rel}: {key} needs a title and rows")
            continue
        keep = table.get("smoke_keep", [])
        overlay = load_yaml(str(PAPERS / "smoke.yaml"))
        if not isinstance(keep, list) or any(not isinstance(k, str) or k.partition(".")[2] not in (
                overlay.get(k.partition(".")[0]) or {}) for k in keep):
            problems.append(f"{rel}: {key} smoke_keep must list section.key settings of configs/papers/smoke.yaml")
        for row in table["rows"]:
            rid = row.get("id")
            where = f"{rel}: {key} row {rid}"
            if not rid or rid in ids:
                problems.append(f"{where}: missing or duplicate id")
            ids.add(rid)
            config = row.get("config")
            cfg = None
            if not config or "/" in config or ".." in config:
                problems.append(f"{where}: config must name a file beside published.yaml")
            elif not (path.parent / config).is_file():
                problems.append(f"{where}: names config {config}, which does not exist (a table row needs a config)")
            else:
                try:
                    cfg = load_yaml(str(path.parent / config))
                except Exception as exc:  # noqa: BLE001
                    problems.append(f"{where}: {exc}")
            if not row.get("label") or not row.get("cells"):
                problems.append(f"{where}: needs a label and cells")
                continue
            if row.get("same_run_as") is not None:
                problems += same_run_problems(where, row, tables, path.parent.name)
            seeds = row.get("seeds")
            if seeds is not None and (not isinstance(seeds, list) or len(seeds) < 2 or len(set(seeds)) != len(seeds)
                                      or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds)):
                problems.append(f"{where}: seeds must be two or more distinct integers (calib.seed of each run)")
            if seeds is None and any("published_std" in c for c in row["cells"]):
                problems.append(f"{where}: a cell has published_std but the row has no seeds to aggregate")
            for cell in row["cells"]:
                problems += cell_problems(f"{where} cell {cell.get('column')!r}", cell, paper_key, table_no, cfg,
                                          text_lines)
    return problems


def tree_problems(papers: Path = PAPERS, texts: Path | None = None) -> list[str]:
    """Lint all of configs/papers: published values, row configs and their headers, extra configs."""
    problems = []
    for folder in sorted(p for p in papers.iterdir() if p.is_dir()):
        configs = sorted(p for p in folder.glob("*.yaml") if p.name not in NOT_ROW_CONFIGS)
        if folder.name == EXTRA:
            if (folder / "published.yaml").exists():
                problems.append(f"{_rel(folder)}/published.yaml: extra configs are never compared with "
                                "a paper")
            for cfg in configs:
                problems += config_problems(cfg)
            continue
        pub = folder / "published.yaml"
        if not pub.is_file():
            problems.append(f"{_rel(folder)}: no published.yaml (paper configs need one; others go in "
                            f"{EXTRA}/)")
            continue
        problems += published_problems(pub, texts)
        try:
            data = load_yaml(str(pub))
        except Exception:  # noqa: BLE001 - already reported
            continue
        used: dict[str, set[int]] = {}
        for key, table in (data.get("tables") or {}).items():
            m = re.fullmatch(r"table(\d+)", str(key))
            for row in (table or {}).get("rows") or []:
                if m and row.get("config"):
                    used.setdefault(row["config"], set()).add(int(m.group(1)))
        for cfg in configs:
            if cfg.name not in used:
                problems.append(f"{_rel(cfg)}: no row of {_rel(pub)} names it (a paper "
                                f"config reproduces a table row; move others to configs/papers/{EXTRA}/)")
                continue
            problems += config_problems(cfg, data.get("paper_key") or "?", used[cfg.name])
    return problems


# --------------------------------------------------------------------------------------------- tables


def available_tables() -> list[str]:
    out = []
    for pub in sorted(PAPERS.glob("*/published.yaml")):
        for key in load_yaml(str(pub)).get("tables", {}):
            out.append(f"{pub.parent.name}-{key.removeprefix('table')}")
    return out


def table_rows(table: str) -> tuple[dict, list[dict], Path]:
    paper, _, number = table.partition("-")
    if paper == EXTRA:
        raise SystemExit(f"make_table: configs/papers/{EXTRA}/ holds configs no paper has a row for; they are never "
                         "compared with a paper (run one with sparse-recover run)")
    path = PAPERS / paper / "published.yaml"
    if not number or not path.is_file():
        raise SystemExit(f"make_table: unknown table {table!r}: use one of {', '.join(available_tables())}")
    problems = published_problems(path)
    if problems:
        raise SystemExit("make_table: " + "\nmake_table: ".join(problems))
    data = load_yaml(str(path))
    key = f"table{number}"
    if key not in data.get("tables", {}):
        raise SystemExit(f"make_table: {path} has no {key} (it has {', '.join(data.get('tables', {}))})")
    return data, data["tables"][key]["rows"], path.parent


def smoke_sets(config: Path, keep: tuple[str, ...] = ()) -> list[str]:
    """`--set` overrides of the smoke overlay, for the sections the row config has; `keep` names the settings
    (section.key) a table varies across its columns, which keep the row's value (a table's `smoke_keep`)."""
    overlay = load_yaml(str(PAPERS / "smoke.yaml"))
    data = load_yaml(str(config))
    sets = []
    for section, values in overlay.items():
        if data.get(section) is None:
            continue
        for key, value in values.items():
            if f"{section}.{key}" not in keep:
                sets.append(f"{section}.{key}={json.dumps(value)}")
    return sets


def seeds_of(row: dict) -> list[int | None]:
    """A row with `seeds` runs once per calibration seed (calib.seed), its cells aggregated over them."""
    return list(row.get("seeds") or [None])


def run_dir_of(table: str, row: dict, folder: Path, runs: Path, smoke: bool, seed: int | None = None,
               keep: tuple[str, ...] = ()) -> tuple[Path, list[str]]:
    config = folder / row["config"]
    seed_sets = [] if seed is None else [f"calib.seed={seed}"]
    if not smoke:
        if row.get("same_run_as"):  # the same config as a row of another table: one run serves both
            return runs / row["same_run_as"], []
        return (runs / table / row["id"] / ("" if seed is None else f"seed-{seed}")), seed_sets
    sets = smoke_sets(config, keep) + seed_sets
    cfg = validate_pipeline(apply_overrides(load_yaml(str(config)), sets))
    blob = json.dumps(cfg.model_dump(exclude={"description"}), sort_keys=True, default=str).encode()
    return runs / f"{table}-smoke" / hashlib.sha256(blob).hexdigest()[:12], sets


def row_runs(table: str, row: dict, folder: Path, runs: Path, smoke: bool,
             keep: tuple[str, ...] = ()) -> list[tuple[Path, list[str]]]:
    """(run directory, --set overrides) of each run a row needs: one, or one per seed."""
    return [run_dir_of(table, row, folder, runs, smoke, seed, keep) for seed in seeds_of(row)]


def model_of(folder: Path, row: dict, sets: list[str]) -> str:
    cfg = validate_pipeline(apply_overrides(load_yaml(str(folder / row["config"])), sets))
    return cfg.model.model


MODEL_UNREACHABLE = 3  # sparse_recover.errors.ModelSourceError.exit_code


def unreachable_models(table: str, rows: list[dict], folder: Path, runs: Path, smoke: bool,
                       cli: list[str], keep: tuple[str, ...] = ()) -> dict[str, str]:
    """`run --dry-run` once per distinct model (writes nothing): {model: the CLI's one-line reason} for the models
    that cannot be reached. Any other failure stops here with the CLI's message and exit code."""
    checked: set[str] = set()
    bad: dict[str, str] = {}
    for row in rows:
        run_dir, sets = row_runs(table, row, folder, runs, smoke, keep)[0]
        model = model_of(folder, row, sets)
        if model in checked:
            continue
        checked.add(model)
        cmd = [*cli, "run", str(folder / row["config"]), "--run-dir", str(run_dir), "--dry-run"]
        for s in sets:
            cmd += ["--set", s]
        res = subprocess.run(cmd, capture_output=True, text=True)
        from sparse_recover.plan import BUILTIN_SHAPE_NOTE

        first = res.stdout.partition("\n")[0]
        if res.returncode == 0 and first.startswith(BUILTIN_SHAPE_NOTE):  # planned from shapes.py: not reachable
            bad[model] = first.removeprefix(BUILTIN_SHAPE_NOTE).strip()
        elif res.returncode == MODEL_UNREACHABLE:
            msg = [line for line in res.stderr.splitlines() if line.strip()]
            bad[model] = (msg[-1] if msg else f"model {model} cannot be reached").removeprefix(
                "sparse-recover: error: ")
        elif res.returncode:
            sys.stdout.write(res.stdout)
            sys.stderr.write(res.stderr)
            raise SystemExit(res.returncode)
    return bad


def run_streaming(cmd: list[str]) -> tuple[int, str]:
    """Run the CLI, passing its stderr through; returns its exit code and its last stderr line (the reason)."""
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, errors="replace")
    last = ""
    for line in proc.stderr:
        sys.stderr.write(line)
        sys.stderr.flush()
        if line.strip():
            last = line.strip()
    return proc.wait(), last


def run_rows(table: str, rows: list[dict], folder: Path, runs: Path, smoke: bool, cli: list[str],
             keep: tuple[str, ...] = ()) -> int:
    """Run every row (completed stages skip). Returns the exit code: 0, or 3 when some model could not be reached
    (its rows are left alone: one line per model says so)."""
    bad = unreachable_models(table, rows, folder, runs, smoke, cli, keep)
    skipped: dict[str, list[str]] = {}
    done: set[Path] = set()
    for i, row in enumerate(rows, 1):
        for run_dir, sets in row_runs(table, row, folder, runs, smoke, keep):
            model = model_of(folder, row, sets)
            if model in bad:
                if row["id"] not in skipped.get(model, []):
                    skipped.setdefault(model, []).append(row["id"])
                continue
            if run_dir in done:
                print(f"[{i}/{len(rows)}] {row['id']}: same smoke config as an earlier row -> {run_dir}", flush=True)
                continue
            done.add(run_dir)
            cmd = [*cli, "run", str(folder / row["config"]), "--run-dir", str(run_dir)]
            for s in sets:
                cmd += ["--set", s]
            print(f"[{i}/{len(rows)}] {row['id']}: {' '.join(cmd[len(cli) - 1:])}", flush=True)
            rc, last = run_streaming(cmd)
            if rc == MODEL_UNREACHABLE:  # the dry run could plan it (known shapes) but the weights are not here
                bad[model] = (last or f"model {model} cannot be reached").removeprefix("sparse-recover: error: ")
                skipped.setdefault(model, []).append(row["id"])
                continue
            if rc:
                raise SystemExit(rc)  # the CLI has printed its one-line reason
    for model, ids in skipped.items():
        print(f"make_table: {len(ids)} row(s) not run ({', '.join(ids)}): {bad[model]}", file=sys.stderr, flush=True)
    return MODEL_UNREACHABLE if skipped else 0


def ours(run_dir: Path, stage: str, metric: str) -> float | None:
    from sparse_recover.records import EvalKey
    from sparse_recover.rundir import RunDir

    rd = RunDir(run_dir)
    if not rd.exists():
        return None
    manifest = rd.manifest()
    results = manifest.evals.get(stage) or {}
    ev = ((manifest.pipeline or {}).get("config") or {}).get("eval") or {}
    keys = {k: EvalKey.parse(k) for k in results}
    if metric == "ppl":
        ppl = [k for k, key in keys.items() if key is not None and key.kind == "ppl"]
        wanted = [k for k in ppl if keys[k].seqlen == ev.get("seqlen")]
        key = (wanted or ppl or [None])[-1]
        return results[key]["ppl"] if key else None
    if metric in ("zeroshot_avg", "mmlu"):
        name = METRICS[metric]  # our group: the 7-task zero-shot mean, or lm-eval's 5-shot mmlu aggregate
        for k, res in results.items():
            group = (res.get("groups") or {}).get(name) if keys[k] and keys[k].kind == "lm-eval" else None
            if group and group.get("acc") is not None:
                return 100 * group["acc"]  # the papers print percentages
        return None
    raise SystemExit(f"make_table: unknown metric {metric!r} in published.yaml")


def over_seeds(values: list[float | None]) -> tuple[float | None, float | None, int]:
    """Mean and standard deviation (population, ddof 0: DSnoT Table 10 does not say which) of the seeds that have a
    result, and how many have one."""
    got = [v for v in values if v is not None]
    if not got:
        return None, None, 0
    return statistics.fmean(got), statistics.pstdev(got), len(got)


def fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3g}" if abs(x) >= 1e4 else f"{x:.2f}"


def fmt_delta(value: float | None, ref: float | None) -> str:
    if value is None or ref is None:
        return "-"
    d = value - ref
    return fmt(d) + (f" ({d / ref:+.1%})" if ref else "")


def tasks_avg(cell: dict) -> float | None:
    tasks = cell.get("tasks")
    return sum(tasks.values()) / len(tasks) if tasks else None


def smoke_keep(data: dict, table: str) -> tuple[str, ...]:
    return tuple(data["tables"][f"table{table.partition('-')[2]}"].get("smoke_keep") or ())


def print_table(table: str, data: dict, rows: list[dict], folder: Path, runs: Path, smoke: bool) -> list[dict]:
    key = f"table{table.partition('-')[2]}"
    info = data["tables"][key]
    keep = smoke_keep(data, table)
    print(f"\n{data['paper']}\n{info['title']}" + ("  [SMOKE: tiny random model, numbers check the plumbing only]"
                                                 if smoke else ""))
    print("\n| row | column | stage | published | tasks avg | ours | delta | status |\n" + "|---" * 8 + "|")
    out, notes = [], []
    for row in rows:
        run_dirs = [run_dir for run_dir, _ in row_runs(table, row, folder, runs, smoke, keep)]
        for cell in row["cells"]:
            values = [ours(run_dir, cell["stage"], cell["metric"]) for run_dir in run_dirs]
            value, std, n = over_seeds(values) if row.get("seeds") else (values[0], None, 0)
            ours_text = fmt(value) if not row.get("seeds") else (
                f"{fmt(value)} (\u00b1{fmt(std)}, {n}/{len(values)} seeds)" if n else f"- (0/{len(values)} seeds)")
            pub = cell.get("published")
            avg = tasks_avg(cell)
            inconsistent = pub is not None and avg is not None and abs(avg - pub) >= AVG_TOLERANCE
            delta = fmt_delta(value, pub)
            if inconsistent and value is not None:
                delta += f"; vs tasks avg {fmt_delta(value, avg)}"
            status = cell.get("status", "")
            if cell.get("note") or inconsistent:
                note = cell.get("note") or f"the printed average {fmt(pub)} is not the mean of its tasks {fmt(avg)}"
                if note not in notes:
                    notes.append(note)
                status += f" [{notes.index(note) + 1}]"
            printed = (cell.get("source") or {}).get("printed") or fmt(pub)  # as the paper prints it (5.6e2)
            if (cell.get("source") or {}).get("printed_std"):
                printed += f" (\u00b1{cell['source']['printed_std']})"
            print(f"| {row['label']} | {cell['column']} | {cell['stage']} | {printed} | "
                  f"{fmt(avg)}{' (!= printed)' if inconsistent else ''} | {ours_text} | {delta} | {status} |")
            out.append({"row": row["id"], "column": cell["column"], "published": pub, "tasks_avg": avg, "ours": value,
                        "delta": None if value is None or pub is None else value - pub})
            if row.get("seeds"):
                out[-1].update(ours_std=std, seeds_done=n, published_std=cell.get("published_std"))
    if notes:
        print("\n" + "\n".join(f"[{i}] {note}" for i, note in enumerate(notes, 1)))
    if info.get("note"):
        print(f"\n{info['note']}")
    print(f"run directories: {runs / (table + ('-smoke' if smoke else ''))}")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("table", nargs="?", help="<paper>-<n>: " + ", ".join(available_tables()))
    ap.add_argument("--runs", default="runs/tables", help="where the row run directories live")
    ap.add_argument("--run", action="store_true", help="run every row first (completed stages are skipped)")
    ap.add_argument("--smoke", action="store_true", help="tiny model and budgets (configs/papers/smoke.yaml)")
    ap.add_argument("--rows", default=None, help="comma-separated row ids: run and print only these rows")
    ap.add_argument("--cli", default=None, help="the sparse-recover command (default: this Python's -m sparse_recover)")
    ap.add_argument("--check", action="store_true", help="lint configs/papers (published values, config headers) "
                    "and exit; the paper texts are checked too when ../shared/papers exists")
    args = ap.parse_args(argv)
    if args.check:
        texts = ROOT.parent / "shared" / "papers"
        problems = tree_problems(PAPERS, texts if texts.is_dir() else None)
        for p in problems:
            print(p)
        print(f"make_table --check: {len(problems)} problem(s)", file=sys.stderr)
        raise SystemExit(1 if problems else 0)
    if not args.table:
        ap.error("name a table (or --check)")
    data, rows, folder = table_rows(args.table)
    if args.rows:
        wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
        unknown = sorted(set(wanted) - {r["id"] for r in rows})
        if unknown:
            ap.error(f"{args.table} has no row {', '.join(unknown)}")
        rows = [r for r in rows if r["id"] in wanted]
    runs = Path(args.runs)
    rc = 0
    if args.run:
        cli = args.cli.split() if args.cli else [sys.executable, "-m", "sparse_recover"]
        os.environ.setdefault("HF_HUB_OFFLINE", "1") if args.smoke else None
        rc = run_rows(args.table, rows, folder, runs, args.smoke, cli, smoke_keep(data, args.table))
    print_table(args.table, data, rows, folder, runs, args.smoke)
    raise SystemExit(rc)


if __name__ == "__main__":
    main()
