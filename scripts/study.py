#!/usr/bin/env python
"""The study and the paper claims on the built-in model: run each row's pipelines, print one markdown table.

    scripts/study.py study                  # issue 13: uniform vs OWL, RIA vs Wanda, DSnoT/reconstruct chain, LoRS+-KD
    scripts/study.py claims                 # issue 14: one row per headline claim of SPP, LoRS and DSnoT
    scripts/study.py study --seeds 3        # calibration seeds 0, 1, 2: mean +- std (population) per cell
    scripts/study.py claims --smoke         # every row on tiny-llama-random with tiny budgets (seconds per run)
    scripts/study.py study --print-only     # the table from the run directories that exist; runs nothing

Every row is made by `sparse-recover run <config> --run-dir RUNS/<run>/seed-S --set calib.seed=S` with the checked-in
configs/study/*.yaml and configs/claims/*.yaml (each header says what it measures). Runs are shared by name between
the rows and the two row sets (the default RUNS is runs/study for both, so `make study` then `make claims` computes
the shared Wanda prefixes and the LoRS fine-tune once). A run with a parent ("branch") starts as a copy of the
parent's run directory once the parent is complete (the parent is a prune-only run, so the copy holds the prune
stage, its masks and its evaluations): two fine-tunes or two DSnoT settings then start from the very same mask, and
the prune is not recomputed. Completed stages skip, so re-running continues where it stopped.

Numbers come only from each run's manifest.json (eval results keyed by sparse_recover.records.EvalKey, stage wall
times) and, for the LoRS speed / memory claim, from scripts/bench_finetune.py --json at LLaMA-7B-shaped layers. The
paper's figures come from configs/papers/<paper>/published.yaml (table, row id, cell) or, for the numbers no table
row holds (LoRS's efficiency text, DSnoT Table 3's timings), from the transcription ../shared/docs/published.md
(section and the quoted text, checked to be there when the file is present). Nothing here is a result of ours.

--smoke applies configs/study/smoke.yaml through `--set` to the sections each config has (RUNS defaults to
runs/study-smoke); its numbers check the plumbing only. --budget-minutes M stops starting new runs after M minutes
(what is left is listed; re-run to continue).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparse_recover.config import apply_overrides, load_yaml, validate_pipeline  # noqa: E402
from sparse_recover.records import EvalKey  # noqa: E402
from sparse_recover.rundir import RunDir  # noqa: E402

STUDY, CLAIMS, PAPERS = ROOT / "configs" / "study", ROOT / "configs" / "claims", ROOT / "configs" / "papers"
SMOKE = STUDY / "smoke.yaml"
PUBLISHED_MD = ROOT.parent / "shared" / "docs" / "published.md"
WIKI = "wiki-suite"
BENCH = "bench-lors-7b"  # the run name of the LoRS efficiency measurement (not a pipeline)
# scripts/bench_finetune.py at LLaMA-7B-shaped layers (the paper's claim is about Llama-3-8B); --smoke: SmolLM2 shapes
BENCH_ARGS = ["--arch", "llama-7b", "--layers", "2", "--seqlen", "128", "--batch", "1", "--rank", "16", "--steps", "2",
              "--warmup", "1", "--variants", "lors,spp,sqft"]
BENCH_SMOKE_ARGS = ["--arch", "smollm2-135m", "--seqlen", "16", "--batch", "1", "--rank", "4", "--steps", "1",
                    "--warmup", "0", "--variants", "lors,spp,sqft"]


# --------------------------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class Run:
    name: str
    config: Path | None  # None: the bench measurement
    parent: str | None = None  # a prune-only run whose directory this one starts as a copy of

    def sets(self, seed: int, smoke: bool) -> list[str]:
        return (smoke_sets(self.config) if smoke else []) + [f"calib.seed={seed}"]


def _runs() -> dict[str, Run]:
    paths = [p for folder in (STUDY, CLAIMS) for p in sorted(folder.glob("*.yaml")) if p != SMOKE]
    prefixes = {p.stem: _prefix(p) for p in paths if _prune_only(p)}
    runs = [Run(p.stem, p, None if p.stem in prefixes else _parent(p, prefixes)) for p in paths]
    runs.append(Run(BENCH, None))
    return {r.name: r for r in runs}


def _validated(path: Path):
    return validate_pipeline(load_yaml(str(path)))


def _prune_only(path: Path) -> bool:
    return all(s in ("prune", "audit", "eval") for s in _validated(path).stages())


def _prefix(path: Path) -> str:
    """What a branch must share with its parent: model, calibration and prune settings."""
    cfg = _validated(path)
    return json.dumps([cfg.model.model_dump(), cfg.calib.model_dump(), cfg.prune.model_dump()], sort_keys=True)


def _parent(path: Path, prefixes: dict[str, str]) -> str | None:
    """The prune-only run a config extends (`wanda-2of4-lors` -> `wanda-2of4`): same model, calibration and prune
    settings, its name a prefix of this one's (the longest such)."""
    mine = _prefix(path)
    names = [n for n, pre in prefixes.items() if pre == mine and path.stem.startswith(n + "-")]
    return max(names, key=len) if names else None


def smoke_sets(config: Path) -> list[str]:
    """`--set` overrides of configs/study/smoke.yaml for the sections `config` has."""
    overlay, data = load_yaml(str(SMOKE)), load_yaml(str(config))
    return [f"{sec}.{key}={json.dumps(value)}" for sec, values in overlay.items() if data.get(sec) is not None
            for key, value in values.items()]


def run_dir(runs: Path, name: str, seed: int) -> Path:
    return runs / name / f"seed-{seed}"


def command(run: Run, runs: Path, seed: int | str, smoke: bool) -> str:
    """The command line that makes `run` (seed as given; the printed tables show `S`)."""
    if run.config is None:
        out = run_dir(runs, run.name, 0) / "bench.json"
        return f"python scripts/bench_finetune.py {' '.join(BENCH_SMOKE_ARGS if smoke else BENCH_ARGS)} --json {out}"
    rel = run.config.relative_to(ROOT)
    sets = f"--set <each key of {SMOKE.relative_to(ROOT)}>" if smoke else ""
    head = (f"cp -r {runs / run.parent / f'seed-{seed}'} {runs / run.name / f'seed-{seed}'}; " if run.parent
            else "")
    return (f"{head}sparse-recover run {rel} --run-dir {runs / run.name / f'seed-{seed}'} "
            f"--set calib.seed={seed}{' ' + sets if sets else ''}")


def _copy_run(src: Path, dst: Path) -> None:
    """A branch's start: the parent's run directory, copied (checkpoint shards hard-linked: stages replace files,
    never write into them; everything else, logs included, copied), then renamed into place."""
    tmp = dst.with_name(dst.name + ".copying")
    shutil.rmtree(tmp, ignore_errors=True)

    def link_or_copy(s: str, d: str) -> str:
        if s.endswith(".safetensors"):
            try:
                os.link(s, d)
                return d
            except OSError:
                pass
        return shutil.copy2(s, d)

    shutil.copytree(src, tmp, copy_function=link_or_copy,
                    ignore=shutil.ignore_patterns(".*.partial", "*.copying", ".staging*"))
    tmp.rename(dst)


def complete(path: Path, config: Path, sets: list[str]) -> bool:
    """Whether every stage the config runs is complete in `path` and every stage it evaluates has each measurement
    (perplexity, wiki-suite) the config asks for: then the run is not started again."""
    rd = RunDir(path)
    if not rd.exists():
        return False
    cfg = validate_pipeline(apply_overrides(load_yaml(str(config)), list(sets)))
    if any(not rd.is_complete(s) for s in cfg.checkpoint_stages() + (["finetune"] if cfg.finetune else [])):
        return False
    res = Results(path, config, sets)
    for stage in cfg.eval_stages():
        if "ppl" in cfg.eval.tasks and res.ppl(stage) is None:
            return False
        if WIKI in cfg.eval.tasks and res.wiki(stage) is None:
            return False
    return True


def order(names: list[str], runs: dict[str, Run]) -> list[str]:
    """The runs `names` need, parents first."""
    out: list[str] = []

    def add(name: str) -> None:
        parent = runs[name].parent
        if parent:
            add(parent)
        if name not in out:
            out.append(name)

    for n in names:
        add(n)
    return out


def execute(names: list[str], runs: dict[str, Run], root: Path, seeds: list[int], smoke: bool, cli: list[str],
            budget_s: float | None) -> int:
    """Run every (run, seed) in turn, parents before branches; a failure skips what depends on it. Returns the
    number of runs that failed or were left (budget)."""
    todo = [(n, s) for s in seeds for n in order(names, runs) if runs[n].config is not None or s == seeds[0]]
    failed: set[tuple[str, int]] = set()
    left: list[str] = []
    t_all = time.perf_counter()
    for i, (name, seed) in enumerate(todo, 1):
        run = runs[name]
        tag = f"[{i}/{len(todo)}] {name} seed {seed}"
        if run.parent and (run.parent, seed) in failed:
            print(f"{tag}: skipped ({run.parent} failed)", flush=True)
            failed.add((name, seed))
            continue
        path = run_dir(root, name, seed)
        if run.config is None:
            if (path / "bench.json").is_file():
                print(f"{tag}: complete", flush=True)
                continue
        elif complete(path, run.config, run.sets(seed, smoke)):
            print(f"{tag}: complete", flush=True)
            continue
        if budget_s is not None and time.perf_counter() - t_all > budget_s:
            left.append(f"{name} seed {seed}")
            continue
        print(f"{tag}: {command(run, root, seed, smoke)}", flush=True)
        if smoke and run.config is not None:
            print(f"{tag}: smoke overrides: {' '.join(smoke_sets(run.config))}", flush=True)
        t0 = time.perf_counter()
        if run.config is None:
            path.mkdir(parents=True, exist_ok=True)
            script = [sys.executable, str(ROOT / "scripts" / "bench_finetune.py")]
            rc = subprocess.run([*script, *(BENCH_SMOKE_ARGS if smoke else BENCH_ARGS), "--json",
                                 str(path / "bench.json")]).returncode
        else:
            if run.parent and not path.exists():
                _copy_run(run_dir(root, run.parent, seed), path)
            cmd = [*cli, "run", str(run.config), "--run-dir", str(path)]
            for s in run.sets(seed, smoke):
                cmd += ["--set", s]
            rc = subprocess.run(cmd).returncode
        print(f"{tag}: {'done' if rc == 0 else f'FAILED (exit {rc})'} in {_fmt_s(time.perf_counter() - t0)} "
              f"(elapsed {_fmt_s(time.perf_counter() - t_all)})", flush=True)
        if rc:
            failed.add((name, seed))
    if left:
        print(f"study: budget spent; {len(left)} run(s) not started: {', '.join(left)} (re-run to continue)",
              flush=True)
    print(f"study: {len(todo)} run(s), total {_fmt_s(time.perf_counter() - t_all)}", flush=True)
    return len(failed) + len(left)


def _fmt_s(s: float) -> str:
    return f"{int(s // 60)}m{int(s % 60):02d}s" if s >= 60 else f"{s:.1f}s"


# --------------------------------------------------------------------------------------------- reading


class Results:
    """Numbers of one (run, seed), read from its manifest; None where missing."""

    def __init__(self, path: Path, config: Path | None, sets: list[str]):
        self.path = path
        self.manifest: dict[str, Any] | None = None
        self.eval = None
        rd = RunDir(path)
        if config is not None and rd.exists():
            self.manifest = rd.read()
            self.eval = validate_pipeline(apply_overrides(load_yaml(str(config)), list(sets))).eval

    def _evals(self, stage: str) -> dict[str, Any]:
        return (self.manifest or {}).get("evals", {}).get(stage) or {}

    def ppl(self, stage: str) -> float | None:
        """Perplexity at the config's eval setting (data, seqlen, limit)."""
        for key, result in self._evals(stage).items():
            k = EvalKey.parse(key)
            if (k is not None and k.kind == "ppl" and self.eval is not None and k.seqlen == self.eval.seqlen
                    and k.limit == self.eval.limit and isinstance(result, dict) and result.get("ppl") is not None):
                return float(result["ppl"])
        return None

    def wiki(self, stage: str) -> float | None:
        """The wiki-suite group accuracy (mean of its tasks) at the config's limit."""
        for key, result in self._evals(stage).items():
            k = EvalKey.parse(key)
            if k is None or k.kind != "lm-eval" or self.eval is None or k.limit != self.eval.limit:
                continue
            group = ((result or {}).get("groups") or {}).get(WIKI) if isinstance(result, dict) else None
            if group and group.get("acc") is not None:
                return float(group["acc"])
        return None

    def stage(self, stage: str) -> dict[str, Any]:
        return ((self.manifest or {}).get("stages") or {}).get(stage) or {}

    def wall(self, stage: str) -> float | None:
        value = self.stage(stage).get("wall_time_s")
        return float(value) if isinstance(value, (int, float)) else None

    def train(self) -> dict[str, Any]:
        return self.stage("finetune").get("train") or {}

    def sparsity(self, stage: str) -> float | None:
        return (self.stage(stage).get("sparsity") or {}).get("overall")


class Store:
    """Results per (run, seed) for one invocation."""

    def __init__(self, runs: dict[str, Run], root: Path, seeds: list[int], smoke: bool):
        self.runs, self.root, self.seeds, self.smoke = runs, root, seeds, smoke
        self._cache: dict[tuple[str, int], Results] = {}

    def get(self, name: str, seed: int) -> Results:
        if (name, seed) not in self._cache:
            run = self.runs[name]
            self._cache[(name, seed)] = Results(run_dir(self.root, name, seed), run.config,
                                                run.sets(seed, self.smoke) if run.config else [])
        return self._cache[(name, seed)]

    def values(self, fn: Callable[[Callable[[str], Results]], float | None]) -> list[float]:
        """fn(get) evaluated per seed (get: run name -> that seed's Results); the seeds that have a value."""
        out = []
        for seed in self.seeds:
            v = fn(lambda name, s=seed: self.get(name, s))
            if v is not None and math.isfinite(v):
                out.append(v)
        return out

    def compute_seconds(self, names: list[str], seed: int) -> tuple[float, int, int]:
        """Sum of the recorded wall times of every stage and evaluation of these runs for one seed, each
        measurement once (a branch's copy of its parent's stages, a dense result reused from the cache: same
        record, same finish time), plus the benchmark's recorded time. Returns (seconds, stages, evaluations)."""
        seen: set[tuple[str, str, str]] = set()
        total, stages, evals = 0.0, 0, 0
        for name in names:
            manifest = self.get(name, seed).manifest or {}
            for stage, rec in (manifest.get("stages") or {}).items():
                wall = rec.get("wall_time_s") if isinstance(rec, dict) else None
                if isinstance(wall, (int, float)) and ("stage", stage, str(rec.get("finished"))) not in seen:
                    seen.add(("stage", stage, str(rec.get("finished"))))
                    total, stages = total + wall, stages + 1
            for stage, results in (manifest.get("evals") or {}).items():
                for key, rec in (results or {}).items():
                    wall = rec.get("wall_time_s") if isinstance(rec, dict) else None
                    if isinstance(wall, (int, float)) and (key, stage, str(rec.get("measured"))) not in seen:
                        seen.add((key, stage, str(rec.get("measured"))))
                        total, evals = total + wall, evals + 1
        return total, stages, evals

    def bench(self) -> dict[str, Any] | None:
        path = run_dir(self.root, BENCH, self.seeds[0]) / "bench.json"
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None


@dataclass
class Stat:
    values: list[float]
    seeds: int

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.pstdev(self.values) if len(self.values) > 1 else None

    def fmt(self, digits: int = 2, pct: bool = False) -> str:
        if not self.values:
            return "-"
        scale = 100.0 if pct else 1.0
        text = _num(self.mean * scale, digits)
        if self.seeds > 1:
            text += f" ± {_num(self.std * scale, digits)}" if self.std is not None else ""
            if len(self.values) < self.seeds:
                text += f" ({len(self.values)}/{self.seeds} seeds)"
        return text


def _num(x: float, digits: int) -> str:
    return f"{x:.3g}" if abs(x) >= 1e4 else f"{x:.{digits}f}"


# --------------------------------------------------------------------------------------------- paper figures


def published(paper: str, row_id: str, stage: str, metric: str) -> tuple[float, str]:
    """(value, 'Table N, <row> | <column>') of one cell of configs/papers/<paper>/published.yaml."""
    data = load_yaml(str(PAPERS / paper / "published.yaml"))
    for key, table in data["tables"].items():
        for row in table.get("rows") or []:
            if row.get("id") != row_id:
                continue
            for cell in row["cells"]:
                if cell["stage"] == stage and cell["metric"] == metric and cell.get("published") is not None:
                    src = cell["source"]
                    row_text = src["row"].replace(" | ", " / ")  # the paper's row, without markdown cell bars
                    return float(cell["published"]), f"{data['paper_key']} Table {src['table']}, {row_text}"
    raise SystemExit(f"study: {paper}/published.yaml has no {row_id} {stage} {metric} cell")


def paper_text(section: str, quote: str) -> str:
    """A figure no table row holds, cited from ../shared/docs/published.md: `quote` must appear under the heading
    `section` when the file is present."""
    if PUBLISHED_MD.is_file():
        text = PUBLISHED_MD.read_text(encoding="utf-8")
        start = text.find(section)
        end = text.find("\n## ", start + 1) if start >= 0 else -1
        body = text[start:end if end > 0 else None] if start >= 0 else ""
        if quote not in " ".join(body.replace("**", "").split()):
            raise SystemExit(f"study: {PUBLISHED_MD} has no {quote!r} under {section!r}")
    return f"{section.lstrip('# ')} (published.md): \"{quote}\""


# --------------------------------------------------------------------------------------------- row sets


@dataclass
class Row:
    """One line of the table: a label, the runs that make it, and what it reads."""

    group: str
    label: str
    runs: list[str]
    cells: Callable[[Store], dict[str, str]]
    verdict: Callable[[Store], str] | None = None
    paper: Callable[[], str] | None = None


def _stat(store: Store, fn) -> Stat:
    return Stat(store.values(fn), len(store.seeds))


def _ppl(run: str, stage: str):
    return lambda get: get(run).ppl(stage)


def _wiki(run: str, stage: str):
    return lambda get: get(run).wiki(stage)


def _cells(run: str, stage: str) -> Callable[[Store], dict[str, str]]:
    def cells(store: Store) -> dict[str, str]:
        train = store.get(run, store.seeds[0]).train() if stage == "merge" else {}
        extra = (f"{train.get('steps')} steps, {train.get('tokens')} tokens, {train.get('trainable_params')} "
                 "trainable" if train.get("steps") else "")
        wall = _stat(store, lambda get: None if get(run).wall(stage) is None else get(run).wall(stage) + (
            (get(run).wall("finetune") or 0.0) if stage == "merge" else 0.0))  # a merge row: fine-tune + merge
        return {"ppl": _stat(store, _ppl(run, stage)).fmt(),
                "wiki-suite": _stat(store, _wiki(run, stage)).fmt(pct=True),
                "sparsity": _stat(store, lambda get: get(run).sparsity(stage)).fmt(pct=True) if stage != "dense"
                else "0",
                "stage time s": wall.fmt(0) + (f"; {extra}" if extra else "")}
    return cells


def _better(store: Store, a: tuple[str, str], b: tuple[str, str]) -> str:
    """Whether (run, stage) `b` beats `a`: lower perplexity, higher wiki-suite; '(within 1 std)' where the gap is
    smaller than the seeds' spread."""
    parts = []
    for name, fn, lower in (("ppl", _ppl, True), ("wiki-suite", _wiki, False)):
        sa, sb = _stat(store, fn(*a)), _stat(store, fn(*b))
        if sa.mean is None or sb.mean is None:
            parts.append(f"{name} -")
            continue
        wins = sb.mean < sa.mean if lower else sb.mean > sa.mean
        if sb.mean == sa.mean:
            word = "tie"
        else:
            word = "yes" if wins else "no"
        spread = max(sa.std or 0.0, sb.std or 0.0)
        if spread and abs(sb.mean - sa.mean) < spread:
            word += " (within 1 std)"
        parts.append(f"{name} {word}")
    return ", ".join(parts)


def study_rows() -> list[Row]:
    rows: list[Row] = []

    def row(group, label, run, stage, vs=None):
        rows.append(Row(group, label, [run], _cells(run, stage),
                        (lambda s, a=vs, b=(run, stage): _better(s, a, b)) if vs else None))

    row("dense", "SmolLM2-135M dense", "wanda-2of4", "dense")
    for method, name in (("wanda", "Wanda"), ("sparsegpt", "SparseGPT")):
        for s in (60, 70):
            row("uniform vs OWL", f"{name} {s}% uniform", f"{method}-{s}", "prune")
            row("uniform vs OWL", f"{name} {s}% OWL (better than uniform?)", f"{method}-{s}-owl", "prune",
                (f"{method}-{s}", "prune"))
    row("RIA vs Wanda", "Wanda 50%", "wanda-50", "prune")
    row("RIA vs Wanda", "RIA 50% (better than Wanda?)", "ria-50", "prune", ("wanda-50", "prune"))
    row("RIA vs Wanda", "Wanda 2:4", "wanda-2of4", "prune")
    row("RIA vs Wanda", "RIA 2:4 (better than Wanda?)", "ria-2of4", "prune", ("wanda-2of4", "prune"))
    chain = ("wanda-2of4-dsnot-reconstruct", "reconstruct")
    row("Wanda 2:4 chain", "Wanda 2:4 alone", "wanda-2of4", "prune")
    row("Wanda 2:4 chain", "+ DSnoT alone (better than Wanda?)", "wanda-2of4-dsnot-reconstruct", "dsnot",
        ("wanda-2of4", "prune"))
    row("Wanda 2:4 chain", "+ reconstruct alone (better than Wanda?)", "wanda-2of4-reconstruct", "reconstruct",
        ("wanda-2of4", "prune"))
    row("Wanda 2:4 chain", "+ DSnoT + reconstruct (better than DSnoT alone?)", *chain,
        ("wanda-2of4-dsnot-reconstruct", "dsnot"))
    rows.append(Row("Wanda 2:4 chain", "+ DSnoT + reconstruct (better than reconstruct alone?)", [chain[0]],
                    _cells(*chain), lambda s: _better(s, ("wanda-2of4-reconstruct", "reconstruct"), chain)))
    row("LoRS vs LoRS + KD", "Wanda 2:4 + LoRS (better than Wanda 2:4?)", "wanda-2of4-lors", "merge",
        ("wanda-2of4", "prune"))
    row("LoRS vs LoRS + KD", "Wanda 2:4 + LoRS + KL distillation (better than LoRS?)", "wanda-2of4-lors-kl",
        "merge", ("wanda-2of4-lors", "merge"))
    return rows


def _pair(store: Store, fn_a, fn_b, fmt_pct: bool = False) -> str:
    a, b = _stat(store, fn_a), _stat(store, fn_b)
    return f"{a.fmt(pct=fmt_pct)} -> {b.fmt(pct=fmt_pct)}"


def _holds(checks: list[bool | None]) -> str:
    if any(c is None for c in checks):
        return "- (not run yet)"
    return "holds" if all(checks) else ("does not hold" if not any(checks) else "mixed")


def _mean(store: Store, fn) -> float | None:
    return _stat(store, fn).mean


def _lt(a, b):
    return None if a is None or b is None else a < b


def claims_rows() -> list[Row]:
    rows: list[Row] = []

    def recovers(label, prune_run, tuned_run, row_id):
        def paper():
            p0, where = published("spp", row_id, "prune", "zeroshot_avg")
            p1, _ = published("spp", row_id, "merge", "zeroshot_avg")
            text = f"{where}: 7-task avg {p0:.2f} -> {p1:.2f}"
            try:
                q0, _ = published("spp", row_id, "prune", "ppl")
                q1, _ = published("spp", row_id, "merge", "ppl")
                text += f"; WikiText ppl {q0:.2f} -> {q1:.2f}"
            except SystemExit:
                pass
            return text

        def ours(s):
            return (f"ppl {_pair(s, _ppl(prune_run, 'prune'), _ppl(tuned_run, 'merge'))}; wiki-suite "
                    f"{_pair(s, _wiki(prune_run, 'prune'), _wiki(tuned_run, 'merge'), True)}")

        def verdict(s):
            return _holds([_lt(_mean(s, _ppl(tuned_run, "merge")), _mean(s, _ppl(prune_run, "prune"))),
                           _lt(_mean(s, _wiki(prune_run, "prune")), _mean(s, _wiki(tuned_run, "merge")))])

        rows.append(Row("SPP", label, [prune_run, tuned_run], lambda s: {"ours": ours(s)}, verdict, paper))

    recovers("SPP recovers a Wanda 2:4 model (ppl and wiki-suite, pruned -> +SPP)", "wanda-2of4", "wanda-2of4-spp",
             "table2-llama7b-wanda-2of4")
    recovers("SPP recovers a Wanda 75% model (ppl and wiki-suite, pruned -> +SPP)", "wanda-75", "wanda-75-spp",
             "table3-llama7b-wanda-75")

    def beats(group, label, winner, loser, paper, params=False):
        def ours(s):
            text = (f"ppl {_stat(s, _ppl(winner, 'merge')).fmt()} vs {_stat(s, _ppl(loser, 'merge')).fmt()}; "
                    f"wiki-suite {_stat(s, _wiki(winner, 'merge')).fmt(pct=True)} vs "
                    f"{_stat(s, _wiki(loser, 'merge')).fmt(pct=True)}")
            tw, tl = s.get(winner, s.seeds[0]).train(), s.get(loser, s.seeds[0]).train()
            if tw.get("steps") and tl.get("steps"):
                text += f"; steps {tw['steps']} vs {tl['steps']}"
                if params:
                    text += f", trainable {tw.get('trainable_params'):,} vs {tl.get('trainable_params'):,}"
            return text

        def verdict(s):
            return _holds([_lt(_mean(s, _ppl(winner, "merge")), _mean(s, _ppl(loser, "merge"))),
                           _lt(_mean(s, _wiki(loser, "merge")), _mean(s, _wiki(winner, "merge")))])

        rows.append(Row(group, label, [winner, loser], lambda s: {"ours": ours(s)}, verdict, paper))

    def spp_lora_paper():
        a, where = published("spp", "table5-llama7b-wanda-75-spp", "merge", "zeroshot_avg")
        b, where_b = published("spp", "table5-llama7b-wanda-75-lora", "merge", "zeroshot_avg")
        return f"{where} vs {where_b.split(', ', 1)[1]}: 7-task avg {a:.2f} vs {b:.2f}"

    beats("SPP", "SPP beats LoRA-then-remask (LoRA*) at equal trainable parameters and steps, Wanda 75% (SPP vs LoRA*)",
          "wanda-75-spp", "wanda-75-lora-remask", spp_lora_paper, params=True)

    def lors_paper(other):
        def paper():
            a, where = published("lors", "table1-llama2-7b-wanda-2of4-lors", "merge", "zeroshot_avg")
            b, where_b = published("lors", f"table1-llama2-7b-wanda-2of4-{other}", "merge", "zeroshot_avg")
            return f"{where} vs {where_b.split(', ', 1)[1]}: 7-task avg {a:.2f} vs {b:.2f}"
        return paper

    beats("LoRS", "LoRS >= SPP at equal steps, Wanda 2:4 (LoRS vs SPP)", "wanda-2of4-lors", "wanda-2of4-spp",
          lors_paper("spp"))
    beats("LoRS", "LoRS >= SQFT at equal steps, Wanda 2:4 (LoRS vs SQFT)", "wanda-2of4-lors", "wanda-2of4-sqft",
          lors_paper("sqft"))

    def bench_ours(other: str, key: str):
        def ours(s):
            data = s.bench()
            rows_ = (data or {}).get("rows") or {}
            if "lors" not in rows_ or other not in rows_:
                return "-"
            mem = "peak_cuda_mib" if "peak_cuda_mib" in rows_["lors"] else "peak_host_mib"
            lo, ot = rows_["lors"], rows_[other]
            a = data.get("args") or {}
            layers = f" x {a.get('layers')} layers" if a.get("layers") else ""
            return (f"s/step {lo['step_s']:.3f} vs {ot['step_s']:.3f} (LoRS {ot['step_s'] / lo['step_s']:.2f}x as "
                    f"fast); {mem} {lo[mem]:.0f} vs {ot[mem]:.0f} (x{lo[mem] / ot[mem]:.2f}); {a.get('arch')}{layers}, "
                    f"batch {a.get('batch')} x {a.get('seqlen')} tokens, rank {a.get('rank')}, {a.get('device')}")

        def verdict(s):
            rows_ = ((s.bench() or {}).get("rows")) or {}
            if "lors" not in rows_ or other not in rows_:
                return "- (not run yet)"
            lo, ot = rows_["lors"], rows_[other]
            mem = "peak_cuda_mib" if "peak_cuda_mib" in lo else "peak_host_mib"
            speed, mem_ratio = ot["step_s"] / lo["step_s"], lo[mem] / ot[mem]
            if key == "speed":  # ~40% faster (>= 1.3x as fast) at about the same memory (within 10%)
                return _holds([speed >= 1.3, mem_ratio <= 1.1])
            return _holds([mem_ratio <= 0.7, speed >= 1 / 1.1])  # ~40% less memory (>= 30%) at about the same speed
        return ours, verdict

    ours_s, verdict_s = bench_ours("spp", "speed")
    rows.append(Row("LoRS", "LoRS about 40% faster per step than SPP at equal memory (7B-shaped layers)", [BENCH],
                    lambda s: {"ours": ours_s(s)}, verdict_s,
                    lambda: paper_text("## LoRS efficiency", "vs SPP, LoRS trains ~40 % faster at the same memory")))
    ours_m, verdict_m = bench_ours("sqft", "memory")
    rows.append(Row("LoRS", "LoRS about 40% less memory than SQFT at equal speed (7B-shaped layers)", [BENCH],
                    lambda s: {"ours": ours_m(s)}, verdict_m,
                    lambda: paper_text("## LoRS efficiency", "vs SQFT, LoRS uses ~40 % less memory at the same speed")))

    sparsities = (50, 60, 70, 80)
    prefix = {50: "wanda-50", 60: "wanda-60", 70: "wanda-70", 80: "wanda-80"}

    def dsnot_paper():
        gains = []
        for sp in sparsities:
            w, where = published("dsnot", f"table2-llama-7b-wanda-{sp}", "prune", "ppl")
            d, _ = published("dsnot", f"table2-llama-7b-wanda-{sp}", "dsnot", "ppl")
            gains.append(f"{sp}%: {_num(w - d, 2)}")
        return f"DSnoT Table 2, LLaMA-V1-7B, Wanda ppl - w. DSnoT ppl: " + ", ".join(gains)

    for suffix, label in (("dsnot", "reference settings (attn, no sign check)"),
                          ("dsnot-paper", "the paper's variant (--targets all --sign-check)")):
        def gain(sp, suffix=suffix):
            return lambda get: (None if get(prefix[sp]).ppl("prune") is None
                                or get(f"{prefix[sp]}-{suffix}").ppl("dsnot") is None
                                else get(prefix[sp]).ppl("prune") - get(f"{prefix[sp]}-{suffix}").ppl("dsnot"))

        def ours(s, gain=gain):
            return "gain " + ", ".join(f"{sp}%: {_stat(s, gain(sp)).fmt()}" for sp in sparsities)

        def verdict(s, gain=gain):
            means = [_mean(s, gain(sp)) for sp in sparsities]
            if any(m is None for m in means):
                return "- (not run yet)"
            return "holds" if all(a < b for a, b in zip(means, means[1:])) else "does not hold"

        runs_ = [prefix[sp] for sp in sparsities] + [f"{prefix[sp]}-{suffix}" for sp in sparsities]
        rows.append(Row("DSnoT", f"DSnoT's perplexity gain over Wanda grows with sparsity 50/60/70/80%, {label}",
                        runs_, lambda s, o=ours: {"ours": o(s)}, verdict, dsnot_paper))

    def cost(get):
        w, d, g = get("wanda-60").wall("prune"), get("wanda-60-dsnot").wall("dsnot"), get("sparsegpt-60").wall("prune")
        return None if None in (w, d, g) or not g else (w + d) / g

    def cost_ours(s):
        w = _stat(s, lambda get: get("wanda-60").wall("prune")).fmt(1)
        d = _stat(s, lambda get: get("wanda-60-dsnot").wall("dsnot")).fmt(1)
        g = _stat(s, lambda get: get("sparsegpt-60").wall("prune")).fmt(1)
        return (f"60%: Wanda {w} s + DSnoT {d} s vs SparseGPT {g} s (stage wall times, calibration passes included): "
                f"ratio {_stat(s, cost).fmt(3)}")

    def cost_paper():
        # DSnoT Table 3 (not a configs/papers row): the 7B column of its SparseGPT and Wanda+DSnoT rows, each checked
        # against the transcription's table line
        cells = {"SparseGPT": "209", "Wanda+DSnoT": "4.3"}
        for method, seconds in cells.items():
            paper_text("## DSnoT Table 3", f"| {method} | {seconds} |")
        ratio = float(cells["Wanda+DSnoT"]) / float(cells["SparseGPT"])
        return (f"DSnoT Table 3 (published.md), LLaMA-V1-7B: SparseGPT {cells['SparseGPT']} s, Wanda+DSnoT "
                f"{cells['Wanda+DSnoT']} s, ratio {ratio:.3f} (pruning time only, shared forward passes excluded)")

    rows.append(Row("DSnoT", "DSnoT's cost is a small fraction of SparseGPT's (Wanda + DSnoT time <= 0.25 x SparseGPT)",
                    ["wanda-60", "wanda-60-dsnot", "sparsegpt-60"], lambda s: {"ours": cost_ours(s)},
                    lambda s: _holds([None if _mean(s, cost) is None else _mean(s, cost) <= 0.25]), cost_paper))
    return rows


ROWSETS = {"study": study_rows, "claims": claims_rows}


# --------------------------------------------------------------------------------------------- printing


def _cmds(row: Row, runs: dict[str, Run], root: Path, store: Store) -> str:
    seed = "S" if len(store.seeds) > 1 else store.seeds[0]
    return "<br>".join(f"`{command(runs[n], root, seed, store.smoke)}`" for n in row.runs)


def _md(text: str) -> str:
    """A markdown table cell: a bar inside it is escaped."""
    return text.replace("|", "\\|")


def print_study(rows: list[Row], runs: dict[str, Run], store: Store, root: Path) -> None:
    cols = ["group", "row", "ppl", "wiki-suite", "sparsity", "stage time s", "better?", "command"]
    print("| " + " | ".join(cols) + " |\n" + "|---" * len(cols) + "|")
    for row in rows:
        cells = row.cells(store)
        better = row.verdict(store) if row.verdict else ""
        print(f"| {row.group} | {row.label} | {cells['ppl']} | {cells['wiki-suite']} | {cells['sparsity']} | "
              f"{cells['stage time s']} | {better} | {_cmds(row, runs, root, store)} |")


def print_claims(rows: list[Row], runs: dict[str, Run], store: Store, root: Path) -> None:
    cols = ["paper", "claim", "the paper's figure", "ours on SmolLM2", "holds or not", "command"]
    print("| " + " | ".join(cols) + " |\n" + "|---" * len(cols) + "|")
    for row in rows:
        paper, ours = _md(row.paper() if row.paper else ""), _md(row.cells(store)["ours"])
        print(f"| {row.group} | {row.label} | {paper} | {ours} | {row.verdict(store) if row.verdict else ''} | "
              f"{_cmds(row, runs, root, store)} |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rowset", choices=sorted(ROWSETS))
    ap.add_argument("--seeds", type=int, default=1, help="calibration seeds 0..N-1 (calib.seed); N > 1: mean ± std")
    ap.add_argument("--runs", default=None, help="where the run directories live (default runs/study, "
                    "runs/study-smoke with --smoke)")
    ap.add_argument("--smoke", action="store_true", help="tiny-llama-random, tiny budgets (configs/study/smoke.yaml)")
    ap.add_argument("--budget-minutes", type=float, default=None, help="start no new run after M minutes")
    ap.add_argument("--rows", default=None, help="comma-separated row numbers (1-based) to run and print")
    ap.add_argument("--print-only", action="store_true", help="print the table from what exists; run nothing")
    ap.add_argument("--cli", default=None, help="the sparse-recover command (default: this Python -m sparse_recover)")
    args = ap.parse_args(argv)
    if args.seeds < 1:
        ap.error("--seeds must be >= 1")
    root = Path(args.runs or ("runs/study-smoke" if args.smoke else "runs/study"))
    runs = _runs()
    rows = ROWSETS[args.rowset]()
    if args.rows:
        try:
            picked = [int(x) for x in args.rows.split(",") if x.strip()]
        except ValueError:
            ap.error("--rows takes row numbers, e.g. 1,3")
        if any(not 1 <= i <= len(rows) for i in picked):
            ap.error(f"--rows: {args.rowset} has rows 1..{len(rows)}")
        rows = [rows[i - 1] for i in picked]
    seeds = list(range(args.seeds))
    problems = 0
    if not args.print_only:
        if args.smoke:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        cli = args.cli.split() if args.cli else [sys.executable, "-m", "sparse_recover"]
        names = list(dict.fromkeys(n for r in rows for n in r.runs))
        budget = args.budget_minutes * 60 if args.budget_minutes is not None else None
        problems = execute(names, runs, root, seeds, args.smoke, cli, budget)
    store = Store(runs, root, seeds, args.smoke)
    title = {"study": "Study on SmolLM2-135M with the built-in wiki-en text",
             "claims": "Paper claims on SmolLM2-135M with the built-in wiki-en text"}[args.rowset]
    print(f"\n{title}" + ("  [SMOKE: tiny random model, numbers check the plumbing only]" if args.smoke else "")
          + (f"; mean ± std over calibration seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else ""))
    print("ppl: held-out wiki-en perplexity at the configs' eval setting (lower is better); wiki-suite: mean accuracy "
          "(%) of its two tasks (higher is better)\n")
    (print_study if args.rowset == "study" else print_claims)(rows, runs, store, root)
    names = [n for n in dict.fromkeys(n for r in rows for n in r.runs) if runs[n].config is not None]
    for seed in seeds:
        secs, n_stages, n_evals = store.compute_seconds(names, seed)
        print(f"\nrecorded compute, seed {seed}: {_fmt_s(secs)} = {n_stages} stages + {n_evals} evaluations over "
              f"{len(names)} runs (the wall times in the manifests, each measurement once; whatever else was running "
              "on the machine at the time is in them)")
    print(f"\nrun directories: {root}")
    raise SystemExit(1 if problems else 0)


if __name__ == "__main__":
    main()
