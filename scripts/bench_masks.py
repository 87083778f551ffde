#!/usr/bin/env python
"""Mask selection against the sort it replaces, and the hub loaders' offline failure against the
built-in corpus, each pair measured side by side in one run.

    python scripts/bench_masks.py                        # 4096 x 4096 scores (a LLaMA-7B attention matrix), CPU
    python scripts/bench_masks.py --rows 4096 --cols 11008 --repeats 3   # a LLaMA-7B MLP matrix (minutes)
    python scripts/bench_masks.py --rows 1024 --cols 4096 --repeats 9 --threads 1

Mask selection (sparsity/masks.py) is linear time: the k-th value as threshold, ties broken by column.
Each case times it and the stable-sort selection that gives the same mask, alternating the two
(A B A B ...) so drift hits both alike, and prints the median of each and their ratio; a ratio
below 1 means ours is faster. The N:M case compares keep_nm with the reference code's torch.topk,
on scores without ties inside a row (topk's tie order is unspecified). Every pair is also checked
to select the same entries.

The hub calibration sources (c4, wikitext2) must fail closed offline with one DataError and no
retry loop: their time to fail is printed next to loading the built-in wiki-en corpus.
No threshold is asserted: the figures depend on the machine; the ratios are what to compare.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def side_by_side(ours, theirs, repeats: int) -> tuple[float, float]:
    """Medians (seconds) of `ours` and `theirs`, run alternately after one warm-up each."""
    ours()
    theirs()
    a, b = [], []
    for _ in range(repeats):
        a.append(_timed(ours))
        b.append(_timed(theirs))
    return statistics.median(a), statistics.median(b)


def mask_cases(rows: int, cols: int):
    """(name, ours, theirs) triples; each callable returns a keep mask (True = keep)."""
    import torch

    from sparse_recover.sparsity.masks import keep_nm, keep_per_matrix, keep_per_row
    from sparse_recover.sparsity.patterns import NM

    g = torch.Generator().manual_seed(0)
    smooth = torch.rand(rows, cols, generator=g)
    distinct = torch.rand(rows, cols, generator=g).argsort(dim=1).float()  # a permutation per row: no ties
    ties = torch.randint(0, 16, (rows, cols), generator=g).float()  # heavy ties, like 4-bit weights
    k_row, k_matrix = cols // 2, rows * cols // 2

    def sort_per_row(score, k):
        keep = torch.ones_like(score, dtype=torch.bool)
        keep.scatter_(1, torch.sort(score, dim=1, stable=True).indices[:, :k], False)
        return keep

    def sort_per_matrix(score, k):
        keep = torch.ones(score.numel(), dtype=torch.bool)
        keep[torch.sort(score.flatten(), stable=True).indices[:k]] = False
        return keep.view_as(score)

    def topk_nm(score, n, m):  # the reference code: prune the n_prune smallest of each group with topk
        grouped = score.reshape(rows, cols // m, m)
        keep = torch.ones_like(grouped, dtype=torch.bool)
        keep.scatter_(2, torch.topk(grouped, m - n, dim=2, largest=False).indices, False)
        return keep.reshape(rows, cols)

    return [
        ("per row 50%", lambda: keep_per_row(smooth, k_row), lambda: sort_per_row(smooth, k_row)),
        ("per row 50%, ties", lambda: keep_per_row(ties, k_row), lambda: sort_per_row(ties, k_row)),
        ("per matrix 50%", lambda: keep_per_matrix(smooth, k_matrix), lambda: sort_per_matrix(smooth, k_matrix)),
        ("per matrix 50%, ties", lambda: keep_per_matrix(ties, k_matrix), lambda: sort_per_matrix(ties, k_matrix)),
        ("2:4 (vs topk)", lambda: keep_nm(distinct, NM(2, 4)), lambda: topk_nm(distinct, 2, 4)),
    ]


def hub_fail_closed() -> list[tuple[str, float, str]]:
    """(what, seconds, outcome): built-in wiki-en first (the yardstick), then the two hub sources offline."""
    from sparse_recover.data import calibration_corpus, evaluation_text
    from sparse_recover.errors import DataError

    out = []
    for what, fn in (("wiki-en (built-in)", lambda: calibration_corpus("wiki-en")),
                     ("c4 offline", lambda: calibration_corpus("c4")),
                     ("wikitext2 offline", lambda: evaluation_text("wikitext2"))):
        t = time.perf_counter()
        try:
            fn()
            outcome = "loaded"
        except DataError as exc:
            outcome = "DataError: " + str(exc)[:70] + "..."
        out.append((what, time.perf_counter() - t, outcome))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args()
    if args.cols % 4:
        ap.error("--cols must be divisible by 4 (the 2:4 case)")
    # the hub loaders are measured offline whatever the environment says (what the loaders must survive)
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"mask selection on {args.rows} x {args.cols} float32 scores, {torch.get_num_threads()} thread(s), "
          f"median of {args.repeats}, alternating")
    print(f"{'case':<22}{'ours ms':>10}{'sort ms':>10}{'ours/sort':>11}  same mask")
    for name, ours, theirs in mask_cases(args.rows, args.cols):
        same = torch.equal(ours(), theirs())
        a, b = side_by_side(ours, theirs, args.repeats)
        print(f"{name:<22}{a * 1e3:>10.1f}{b * 1e3:>10.1f}{a / b:>11.2f}  {'yes' if same else 'NO'}")

    print("\ncalibration sources with the hub off (HF_HUB_OFFLINE=1): time to fail closed vs the built-in corpus")
    rows = hub_fail_closed()
    base = rows[0][1]
    print(f"{'source':<22}{'seconds':>10}{'x wiki-en':>11}  outcome")
    for what, seconds, outcome in rows:
        print(f"{what:<22}{seconds:>10.2f}{seconds / base:>11.2f}  {outcome}")


if __name__ == "__main__":
    main()
