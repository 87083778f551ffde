#!/usr/bin/env python
"""Overhead of `run` over calling the stage commands one by one (target: under 5%).

Same process, same tiny model (the built-in `tiny-llama-random` unless --model), same pipeline:
prune, dsnot, finetune, merge, audit, eval of every stage. One side calls each stage engine in
turn, as a user typing the commands would (minus the interpreter start-up); the other calls
`pipeline.run_pipeline` on the whole config, which adds validation, the reachability and task checks, the
config comparison with the manifest and its bookkeeping. Each side runs --repeats times in fresh run
directories, in ABBA order (so neither side always runs first), after one warm-up of each; the medians
and the median of the per-pair ratios are compared. It also prints run's own work directly: its wall
time minus the wall time of its stages (the manifest's pipeline.steps), which machine noise cannot hide.

    .venv/bin/python scripts/bench_run_overhead.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("SPARSE_RECOVER_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def config(model: str) -> dict:
    return {
        "model": {"model": model, "device": "cpu", "dtype": "float32"},
        "calib": {"source": "wiki-en", "nsamples": 8, "seqlen": 128},
        "prune": {"method": "wanda", "pattern": "2:4"},
        "dsnot": {},
        "finetune": {"method": "lors", "data": "wiki-en", "seqlen": 128, "max_steps": 4, "batch_size": 4,
                     "micro_batch_size": 2, "val_size": 8, "max_train_samples": 64, "init_samples": 8,
                     "mixed_precision": "no", "save_every": 4, "eval_every": 4},
        "merge": {},
        "eval": {"tasks": ["ppl"], "ppl_data": "wiki-en", "seqlen": 128, "limit": 8},
    }


def by_hand(cfg, run_dir: str) -> None:
    from sparse_recover.config import (AuditSection, DsnotConfig, EvalCommandConfig, FinetuneConfig,
                                       MergeConfig, RuntimeSection)
    from sparse_recover.engine import audit, dsnot, evaluate, finetune, merge, prune
    from sparse_recover.pipeline import prune_config
    from sparse_recover.rundir import RunDir

    rd = RunDir(run_dir)
    rt = RuntimeSection(device=cfg.model.device, dtype=cfg.model.dtype)
    prune.prune_stage(prune.prepare(prune_config(cfg), rd), rd)
    dsnot.dsnot_stage(dsnot.prepare(DsnotConfig(model=rt, dsnot=cfg.dsnot), rd), rd)
    finetune.finetune_stage(finetune.prepare(FinetuneConfig(model=rt, finetune=cfg.finetune), rd), rd)
    merge.merge_stage(merge.prepare(MergeConfig(model=rt, merge=cfg.merge), rd), rd)
    for stage in audit.stages_to_audit(rd, AuditSection().stages):
        audit.audit_stage(rd, stage)
    for stage in cfg.eval_stages():
        evaluate.eval_stage(evaluate.prepare(EvalCommandConfig(model=rt, stage=stage, eval=cfg.eval), rd), rd,
                            force=False)


OWN: list[float] = []  # per `run` call: wall seconds spent outside the stage functions


def through_run(cfg, run_dir: str) -> None:
    from sparse_recover.pipeline import run_pipeline, select
    from sparse_recover.rundir import RunDir

    t0 = time.perf_counter()
    run_pipeline(cfg, RunDir(run_dir), select(cfg, None, None), echo=lambda line: None)
    wall = time.perf_counter() - t0
    steps = json.loads((Path(run_dir) / "manifest.json").read_text())["pipeline"]["steps"]  # per-stage wall
    OWN.append(wall - sum(v["wall_time_s"] for v in steps.values()))


def timed(fn, cfg, root: Path, name: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): CPU time is the steadier figure on a shared machine."""
    run_dir = root / name
    t0, c0 = time.perf_counter(), time.process_time()
    with redirect_stdout(StringIO()):
        fn(cfg, str(run_dir))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    shutil.rmtree(run_dir)
    return wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-llama-random")
    ap.add_argument("--repeats", type=int, default=4)
    args = ap.parse_args()
    import torch

    from sparse_recover.config import validate_pipeline

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = validate_pipeline(config(args.model))
    hand, piped = [], []
    with tempfile.TemporaryDirectory(prefix="bench-run-") as tmp:
        root = Path(tmp)
        timed(by_hand, cfg, root, "warm-hand")
        timed(through_run, cfg, root, "warm-run")
        OWN.clear()
        for i in range(args.repeats):  # ABBA: neither side always runs first
            order = ((by_hand, hand), (through_run, piped))
            for fn, out in (order if i % 2 == 0 else order[::-1]):
                out.append(timed(fn, cfg, root, f"{fn.__name__}{i}"))
    print(f"model {args.model}, stages {', '.join(cfg.stages())}, {args.repeats} repeats in ABBA order (median)")
    for i, kind in enumerate(("wall", "CPU")):
        hs, ps = [x[i] for x in hand], [x[i] for x in piped]
        h, p = statistics.median(hs), statistics.median(ps)
        pair = statistics.median(b / a for a, b in zip(hs, ps))
        print(f"{kind:4s} stage commands one by one: {h:.2f}s  ({', '.join(f'{x:.2f}' for x in hs)})")
        print(f"{kind:4s} sparse-recover run:        {p:.2f}s  ({', '.join(f'{x:.2f}' for x in ps)})")
        print(f"{kind:4s} run / one-by-one = {p / h:.3f} (medians), {pair:.3f} (median of pairs)  "
              f"(overhead {100 * (pair - 1):+.1f}%; target < +5%)")
    own, h = statistics.median(OWN), statistics.median(x[0] for x in hand)
    print(f"run's own work (validation, checks, manifest bookkeeping: run wall minus its stages' wall): "
          f"{own:.3f}s median = {100 * own / h:.2f}% of the pipeline")

if __name__ == "__main__":
    main()
