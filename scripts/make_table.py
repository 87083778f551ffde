#!/usr/bin/env python
"""Paper tables: run each row's pipeline (optional), then print published | ours | delta.

    scripts/make_table.py dsnot-1                       # print from the run directories that exist
    scripts/make_table.py dsnot-1 --run                 # run every row in turn first (completed ones skip)
    scripts/make_table.py dsnot-1 --run --smoke         # the same grid on the tiny built-in model

TABLE is <paper>-<n> (spp-2, spp-3, spp-4, dsnot-1, dsnot-5, lors-1): the rows of table<n> in
configs/papers/<paper>/published.yaml, each naming its config and the published cells (stage,
metric, value, source). Row i runs `sparse-recover run <config> --run-dir RUNS/<paper>-<n>/<row id>`.

--smoke applies configs/papers/smoke.yaml to the sections a row has (a tiny random LLaMA, a few
calibration windows, two fine-tuning steps, perplexity on a few windows) through `--set`, so every
table target runs end to end in minutes. Rows that become identical on the tiny model share one run
directory (RUNS/<paper>-<n>-smoke/<config hash>). The numbers of a smoke run check the plumbing only.

Our numbers come only from the run manifests (the eval results `run` wrote), never recomputed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparse_recover.config import apply_overrides, load_yaml, validate_pipeline  # noqa: E402

PAPERS = ROOT / "configs" / "papers"


def table_rows(table: str) -> tuple[dict, list[dict], Path]:
    paper, _, number = table.partition("-")
    path = PAPERS / paper / "published.yaml"
    if not number or not path.is_file():
        raise SystemExit(f"make_table: unknown table {table!r}: use <paper>-<n>, e.g. spp-2, dsnot-1, lors-1")
    data = load_yaml(str(path))
    key = f"table{number}"
    if key not in data.get("tables", {}):
        raise SystemExit(f"make_table: {path} has no {key} (it has {', '.join(data.get('tables', {}))})")
    return data, data["tables"][key]["rows"], path.parent


def smoke_sets(config: Path) -> list[str]:
    """`--set` overrides of the smoke overlay, for the sections the row config has."""
    overlay = load_yaml(str(PAPERS / "smoke.yaml"))
    data = load_yaml(str(config))
    sets = []
    for section, values in overlay.items():
        if data.get(section) is None:
            continue
        for key, value in values.items():
            sets.append(f"{section}.{key}={json.dumps(value)}")
    return sets


def run_dir_of(table: str, row: dict, folder: Path, runs: Path, smoke: bool) -> tuple[Path, list[str]]:
    config = folder / row["config"]
    if not smoke:
        return runs / table / row["id"], []
    sets = smoke_sets(config)
    cfg = validate_pipeline(apply_overrides(load_yaml(str(config)), sets))
    blob = json.dumps(cfg.model_dump(exclude={"description"}), sort_keys=True, default=str).encode()
    return runs / f"{table}-smoke" / hashlib.sha256(blob).hexdigest()[:12], sets


def run_rows(table: str, rows: list[dict], folder: Path, runs: Path, smoke: bool, cli: list[str]) -> None:
    done: set[Path] = set()
    for i, row in enumerate(rows, 1):
        run_dir, sets = run_dir_of(table, row, folder, runs, smoke)
        if run_dir in done:
            print(f"[{i}/{len(rows)}] {row['id']}: same smoke config as an earlier row -> {run_dir}", flush=True)
            continue
        done.add(run_dir)
        cmd = [*cli, "run", str(folder / row["config"]), "--run-dir", str(run_dir)]
        for s in sets:
            cmd += ["--set", s]
        print(f"[{i}/{len(rows)}] {row['id']}: {' '.join(cmd[len(cli) - 1:])}", flush=True)
        rc = subprocess.run(cmd).returncode
        if rc:
            raise SystemExit(rc)  # the CLI has printed its one-line reason


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
    if metric == "zeroshot_avg":
        for k, res in results.items():
            group = (res.get("groups") or {}).get("zeroshot") if keys[k] and keys[k].kind == "lm-eval" else None
            if group and group.get("acc") is not None:
                return 100 * group["acc"]  # the papers print percentages
        return None
    raise SystemExit(f"make_table: unknown metric {metric!r} in published.yaml")


def fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3g}" if abs(x) >= 1e4 else f"{x:.2f}"


def print_table(table: str, data: dict, rows: list[dict], folder: Path, runs: Path, smoke: bool) -> list[dict]:
    key = f"table{table.partition('-')[2]}"
    info = data["tables"][key]
    print(f"\n{data['paper']}\n{info['title']}" + ("  [SMOKE: tiny random model, numbers check the plumbing only]"
                                                 if smoke else ""))
    print(f"\n| row | column | stage | published | ours | delta | status |\n|---|---|---|---|---|---|---|")
    out = []
    for row in rows:
        run_dir, _ = run_dir_of(table, row, folder, runs, smoke)
        for cell in row["cells"]:
            value = ours(run_dir, cell["stage"], cell["metric"])
            pub = cell.get("published")
            delta = None if value is None or pub is None else value - pub
            rel = "" if delta is None or not pub else f" ({delta / pub:+.1%})"
            print(f"| {row['label']} | {cell['column']} | {cell['stage']} | {fmt(pub)} | {fmt(value)} | "
                  f"{fmt(delta) if delta is not None else '-'}{rel} | {cell.get('status', '')} |")
            out.append({"row": row["id"], "column": cell["column"], "published": pub, "ours": value, "delta": delta})
    if info.get("note"):
        print(f"\n{info['note']}")
    print(f"run directories: {runs / (table + ('-smoke' if smoke else ''))}")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("table", help="spp-2 | spp-3 | spp-4 | dsnot-1 | dsnot-5 | lors-1")
    ap.add_argument("--runs", default="runs/tables", help="where the row run directories live")
    ap.add_argument("--run", action="store_true", help="run every row first (completed stages are skipped)")
    ap.add_argument("--smoke", action="store_true", help="tiny model and budgets (configs/papers/smoke.yaml)")
    ap.add_argument("--cli", default=None, help="the sparse-recover command (default: this Python's -m sparse_recover)")
    args = ap.parse_args(argv)
    data, rows, folder = table_rows(args.table)
    runs = Path(args.runs)
    if args.run:
        cli = args.cli.split() if args.cli else [sys.executable, "-m", "sparse_recover"]
        os.environ.setdefault("HF_HUB_OFFLINE", "1") if args.smoke else None
        run_rows(args.table, rows, folder, runs, args.smoke, cli)
    print_table(args.table, data, rows, folder, runs, args.smoke)


if __name__ == "__main__":
    main()
