#!/usr/bin/env python
"""Evaluation speed on SmolLM2, measured side by side in one run.

    python scripts/bench_eval.py                                  # 16 windows x 512 tokens, batch 1, 32 items/task
    python scripts/bench_eval.py --seqlen 2048 --windows 8 --batch-size 2 --limit 100 --device cuda

1. Perplexity throughput (tokens/s) of our code path (`evaluate.ppl.perplexity`, what `sparse-recover
   eval --tasks ppl` runs) against a bare forward loop `model(input_ids=batch, use_cache=False)` over the
   same windows at the same batch size, and their ratio (target >= 0.9). Both run `--repeats` times,
   interleaved after one warm-up each; the best time of each counts.
2. lm-eval wall time per wiki-suite task (wiki_lambada, wiki_continuation) on the in-memory model,
   through `evaluate.harness.run_lm_eval`, with items/s. The one-off cost of building the task files and
   lm-eval's task index is timed separately and is not part of the per-task times.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="built-in alias, local folder or hub id")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=16, help="perplexity windows (wiki-en held-out text)")
    ap.add_argument("--batch-size", type=int, default=1, help="windows per forward call; lm-eval batch size")
    ap.add_argument("--limit", type=int, default=32, help="lm-eval items per wiki-suite task")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()

    import torch

    from sparse_recover.data import evaluation_text
    from sparse_recover.evaluate.harness import check_tasks, run_lm_eval
    from sparse_recover.evaluate.ppl import perplexity, tokenize_text
    from sparse_recover.evaluate.wiki_suite import TASKS, wiki_suite_tasks
    from sparse_recover.models import load_model, load_tokenizer, resolve_device, resolve_dtype, resolve_model_source
    from sparse_recover.runtime import quiet_libraries

    quiet_libraries()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    source = resolve_model_source(args.model)
    tok = load_tokenizer(source.path)
    model = load_model(source, dtype=dtype, device=device)
    ids = tokenize_text(tok, evaluation_text("wiki-en")[1])
    n = min(args.windows, ids.numel() // args.seqlen)
    windows = ids[: n * args.seqlen].view(n, args.seqlen)
    tokens = n * args.seqlen
    bs = args.batch_size

    def ours():
        perplexity(model, ids, args.seqlen, device, batch_size=bs, max_windows=n)

    @torch.no_grad()
    def bare():
        for start in range(0, n, bs):
            model(input_ids=windows[start : start + bs].to(device), use_cache=False)

    print(f"model {source.spec} on {device} ({str(dtype).replace('torch.', '')}), {torch.get_num_threads()} "
          f"threads; {n} windows x {args.seqlen} tokens, batch {bs}")
    ours(), bare()  # warm-up
    t_ours, t_bare = [], []
    for _ in range(args.repeats):
        t_ours.append(_timed(ours, device))
        t_bare.append(_timed(bare, device))
    best_ours, best_bare = min(t_ours), min(t_bare)
    print("\nperplexity throughput (best of %d)" % args.repeats)
    print(f"  {'path':<34} {'time':>9} {'tokens/s':>10}")
    print(f"  {'bare model(input_ids) loop':<34} {best_bare:>8.3f}s {tokens / best_bare:>10.0f}")
    print(f"  {'evaluate.ppl.perplexity':<34} {best_ours:>8.3f}s {tokens / best_ours:>10.0f}")
    print(f"  ratio ours / bare (tokens/s): {best_bare / best_ours:.3f}  (target >= 0.9)")

    t0 = time.perf_counter()
    check_tasks(["wiki-suite"])
    wiki_suite_tasks()
    setup = time.perf_counter() - t0
    print(f"\nlm-eval wiki-suite, {args.limit} items per task, batch {bs} (one-off task setup {setup:.1f}s)")
    print(f"  {'task':<20} {'time':>9} {'items/s':>9} {'acc':>7}")
    for task in TASKS:
        out = {}

        def one():
            out.update(run_lm_eval(model, tok, [task], limit=args.limit, batch_size=bs, device=device))

        t = _timed(one, device)
        items = out["tasks"][task]["n_samples"]["effective"]
        print(f"  {task:<20} {t:>8.2f}s {items / t:>9.2f} {out['tasks'][task]['acc']:>7.3f}")


if __name__ == "__main__":
    main()
