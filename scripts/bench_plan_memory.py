#!/usr/bin/env python
"""The dry-run plan's host-memory estimate next to the memory each stage really uses, in one run.

    python scripts/bench_plan_memory.py                  # ~50M-parameter LLaMA shape, SparseGPT 2:4, CPU
    python scripts/bench_plan_memory.py --hidden 2048 --intermediate 5632 --layers 2 --method wanda

A random LLaMA big enough that its tensors dominate the process (default ~50M parameters, 200 MB in
float32) is saved with a small BPE tokenizer; `plan.estimates` gives each stage's host peak from the
config alone, and each stage then runs through the real CLI (`prune`, then `eval --stage dense`) in a
child process of its own, which reports its peak RSS above its RSS after the imports (the plan's
figures exclude the runtime allowance the same way). The table prints estimated and measured MiB
and their ratio; nothing is asserted (tests/integration/test_run.py bounds the formula itself).

The children run with glibc's allocator made predictable (one arena, no trimming, mmap above 64 KiB):
peak RSS should measure live tensors, not the caching of freed blocks across thread arenas, which
made the same run's peak swing between ~1x and ~3x of its live memory on a loaded machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUIET_MALLOC = {"OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": "65536",
                "MALLOC_TRIM_THRESHOLD_": "0", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "SPARSE_RECOVER_NO_PROGRESS": "1", "TOKENIZERS_PARALLELISM": "false"}


def pipeline(args, model_dir: Path) -> dict:
    """The YAML-shaped config the estimate reads; the CLI arguments of the children follow from it."""
    return {"model": {"model": str(model_dir), "device": "cpu"},
            "calib": {"source": "wiki-en", "nsamples": args.nsamples, "seqlen": args.seqlen},
            "prune": {"method": args.method, "pattern": args.pattern},
            "eval": {"stages": ["dense"], "tasks": ["ppl"], "ppl_data": "wiki-en", "seqlen": args.seqlen,
                     "limit": args.eval_limit}}


def cli_args(data: dict, stage: str, run_dir: Path) -> list[str]:
    m, c, p, e = data["model"], data["calib"], data["prune"], data["eval"]
    if stage == "prune":
        return ["prune", "--run-dir", str(run_dir), "--model", m["model"], "--device", m["device"],
                "--method", p["method"], "--pattern", p["pattern"], "--calib", c["source"],
                "--nsamples", str(c["nsamples"]), "--seqlen", str(c["seqlen"])]
    return ["eval", "--run-dir", str(run_dir), "--stage", "dense", "--tasks", ",".join(e["tasks"]),
            "--ppl-data", e["ppl_data"], "--seqlen", str(e["seqlen"]), "--limit", str(e["limit"]),
            "--device", m["device"]]


def child(argv: list[str]) -> None:
    """Run one CLI command in this process; print its peak RSS above the RSS after the imports."""
    import torch
    import transformers  # noqa: F401  (imports done before the baseline, like the plan's runtime allowance)

    from sparse_recover import calibration, cli, data, models  # noqa: F401
    from sparse_recover.evaluate import ppl  # noqa: F401

    torch.set_num_threads(1)
    with open("/proc/self/statm") as fh:
        base = int(fh.read().split()[1]) * resource.getpagesize()
    try:
        cli.main(argv)
    except SystemExit as exc:
        if exc.code:
            raise
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"delta": peak - base}))


def save_model(args, folder: Path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.helpers import VOCAB, make_tokenizer  # the tests' 512-token BPE: a small vocabulary keeps
    #                                                  the parameters in the blocks, like a real LLM's

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, max_position_embeddings=max(512, args.seqlen),
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    LlamaForCausalLM(config).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return config


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--method", default="sparsegpt", help="magnitude | wanda | sparsegpt")
    ap.add_argument("--pattern", default="2:4")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--eval-limit", type=int, default=4)
    args = ap.parse_args()

    os.environ.setdefault("SPARSE_RECOVER_NO_PROGRESS", "1")
    from sparse_recover import plan
    from sparse_recover.config import validate_pipeline
    from sparse_recover.runtime import quiet_libraries

    quiet_libraries()

    with tempfile.TemporaryDirectory(prefix="bench-plan-memory-") as tmp:
        tmp = Path(tmp)
        config = save_model(args, tmp / "model")
        data = pipeline(args, tmp / "model")
        facts = plan.model_facts(config, str(tmp / "model"))
        est = {e.stage: e.host - plan.RUNTIME_HOST
               for e in plan.estimates(validate_pipeline(data), facts, ["prune", "eval"], on_gpu=False,
                                       source_label="m")}
        print(f"LLaMA shape: hidden {args.hidden}, MLP {args.intermediate}, {args.layers} blocks, "
              f"{facts.params / 1e6:.1f}M parameters ({facts.params * 4 / 2**20:.0f} MiB float32); "
              f"{args.method} {args.pattern}, {args.nsamples} x {args.seqlen} calibration tokens, CPU")
        print(f"{'stage':<8}{'estimated MiB':>15}{'measured MiB':>14}{'measured/estimated':>20}")
        for stage in ("prune", "eval"):
            out = subprocess.run([sys.executable, __file__, "--child", *cli_args(data, stage, tmp / "run")],
                                 capture_output=True, text=True, cwd=ROOT, env={**os.environ, **QUIET_MALLOC})
            if out.returncode != 0:
                sys.exit(f"{stage} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
            measured = json.loads(out.stdout.strip().splitlines()[-1])["delta"]
            print(f"{stage:<8}{est[stage] / 2**20:>15.0f}{measured / 2**20:>14.0f}{measured / est[stage]:>20.2f}")


if __name__ == "__main__":
    main()
