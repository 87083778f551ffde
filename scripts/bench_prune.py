#!/usr/bin/env python
"""Pruning cost against the restated reference loops and one plain forward pass, measured in one run.

    python scripts/bench_prune.py --nsamples 8 --seqlen 128 --pattern 2:4        # SmolLM2-135M, CPU, 2 threads
    python scripts/bench_prune.py --nsamples 8 --seqlen 128 --repeat 2           # unstructured 50%, twice
    python scripts/bench_prune.py --nsamples 32 --seqlen 512 --methods wanda,sparsegpt
    python scripts/bench_prune.py --arch llama-7b --layers 2 --nsamples 8 --seqlen 128   # 7B-shaped, 2 blocks, CPU
    python scripts/bench_prune.py --arch llama-7b --dtype bfloat16 --device cuda --offload --nsamples 128 --seqlen 2048 --no-ref

Every measurement runs in its own child process (so peak memory is per measurement), on the same model
and windows. For magnitude, wanda and sparsegpt the reference's layer-wise loop as restated in
tests/unit/test_reference_equivalence.py (`ref_layerwise`: catcher, per-linear hooks, one window at a
time, RefSparseGPT.fasterprune per linear; `ref_magnitude`) is timed next to ours (`prune_model`), and
the table prints ours / reference. The reference is CPU/float32-faithful only: `--no-ref` skips it.
`prune compute` is our pruning math alone (statistics -> masks/updates), the rest of a method's time is
the calibration forward passes. With --repeat N every measurement is taken N times, interleaved (ours,
reference, ours, ...), and the ratios of each round are printed; the table shows the fastest of each.
Targets: ours <= 1.0x the reference for SparseGPT, <= 0.8x for Wanda and magnitude; the SparseGPT stage
<= 3x the forward pass, Wanda <= 2.5x; DSnoT (Wanda's initial mask + refinement, reference defaults)
<= 1.3x Wanda.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ARCHS = {
    # LLaMA-7B shapes (random init): hidden 4096, MLP 11008, 32 heads, 32 layers, vocab 32000
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                     num_hidden_layers=32, vocab_size=32000, max_position_embeddings=4096),
}


REF_METHODS = ("magnitude", "wanda", "sparsegpt")  # restated in tests/unit/test_reference_equivalence.py
REF_TARGETS = {"magnitude": 0.8, "wanda": 0.8, "sparsegpt": 1.0}  # ours / reference, at most
FWD_TARGETS = {"wanda": 2.5, "sparsegpt": 3.0}  # the stage / one forward pass of the windows, at most


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _load(args):
    import torch

    from sparse_recover.models import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    torch.manual_seed(0)
    if args.arch == "smollm2-135m":
        from sparse_recover.data import calibration_corpus, sample_windows
        from sparse_recover.models import load_model, load_tokenizer, resolve_model_source

        source = resolve_model_source("smollm2-135m")
        model = load_model(source, dtype=dtype)
        tok = load_tokenizer(source.path)
        windows = sample_windows(calibration_corpus("wiki-en"), tok, args.nsamples, args.seqlen, 0)
    else:
        from transformers import AutoModelForCausalLM, LlamaConfig

        shape = dict(ARCHS[args.arch])
        if args.layers:
            shape["num_hidden_layers"] = args.layers
        config = LlamaConfig(**shape)
        with torch.device("meta" if False else "cpu"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.eval()
        g = torch.Generator().manual_seed(0)
        windows = torch.randint(0, config.vocab_size, (args.nsamples, args.seqlen), generator=g)
    return model, windows, device


def child(args) -> dict:
    import torch

    from sparse_recover.runtime import peak_rss_mb

    if args.threads:
        torch.set_num_threads(args.threads)
    model, windows, device = _load(args)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    out: dict = {"what": args.child}
    if args.child == "forward":
        if not args.offload:
            model.to(device)
        model.config.use_cache = False
        with torch.no_grad():
            _sync(device)
            t0 = time.perf_counter()
            for s in range(0, windows.shape[0], args.batch_size):
                model(input_ids=windows[s : s + args.batch_size].to(device), use_cache=False)
            _sync(device)
            out["seconds"] = time.perf_counter() - t0
    elif args.child.startswith("ref-"):
        # the reference's loop, restated in the equivalence tests (not copied here): same model, same windows
        from sparse_recover.sparsity.patterns import parse_pattern
        from tests.unit.test_reference_equivalence import ref_args, ref_layerwise, ref_magnitude

        method = args.child[len("ref-"):]
        pattern = parse_pattern(args.pattern, args.sparsity if args.pattern == "unstructured" else None)
        model.to(device)
        _sync(device)
        t0 = time.perf_counter()
        if method == "magnitude":
            ref_magnitude(model, **ref_args(pattern))
        else:
            ref_layerwise(model, windows.to(device), method, **ref_args(pattern))
        _sync(device)
        out["seconds"] = time.perf_counter() - t0
    elif args.child == "dsnot":
        # Wanda's initial mask recomputed inside the pass, then DSnoT refinement (reference defaults)
        from sparse_recover import refine
        from sparse_recover.engine.dsnot import dsnot_model
        from sparse_recover.sparsity.patterns import parse_pattern

        pattern = parse_pattern(args.pattern, args.sparsity if args.pattern == "unstructured" else None)
        compute = {"t": 0.0}
        orig = refine.dsnot_refine

        def timed(*a, **k):
            _sync(device)
            t = time.perf_counter()
            res = orig(*a, **k)
            _sync(device)
            compute["t"] += time.perf_counter() - t
            return res

        refine.dsnot_refine = timed
        try:
            _sync(device)
            t0 = time.perf_counter()
            dsnot_model(model, windows, pattern, refine.DSnoTSettings(), init="recompute", targets=args.dsnot_targets,
                        prune_method="wanda", stored_masks=None, device=device, offload=args.offload,
                        batch_size=args.batch_size, show_progress=False)
            _sync(device)
            out["seconds"] = time.perf_counter() - t0
        finally:
            refine.dsnot_refine = orig
        out["compute_seconds"] = compute["t"]
    else:
        from sparse_recover.engine.prune import prune_model
        from sparse_recover.pruning import PruneSettings, get_method
        from sparse_recover.sparsity.patterns import parse_pattern

        method = get_method(args.child)
        settings = PruneSettings(pattern=parse_pattern(args.pattern, args.sparsity if args.pattern == "unstructured" else None),
                                 rule=args.rule)
        compute = {"t": 0.0}
        orig = method.fn

        def timed(weights, stat, s):
            _sync(device)
            t = time.perf_counter()
            res = orig(weights, stat, s)
            _sync(device)
            compute["t"] += time.perf_counter() - t
            return res

        object.__setattr__(method, "fn", timed)
        try:
            _sync(device)
            t0 = time.perf_counter()
            prune_model(model, method, settings, windows, device=device, offload=args.offload,
                        batch_size=args.batch_size, show_progress=False)
            _sync(device)
            out["seconds"] = time.perf_counter() - t0
        finally:
            object.__setattr__(method, "fn", orig)
        out["compute_seconds"] = compute["t"]
    out["peak_rss_mib"] = peak_rss_mb()
    if device.type == "cuda":
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="smollm2-135m", choices=["smollm2-135m", *ARCHS])
    p.add_argument("--layers", type=int, default=0, help="override the layer count of a random-init --arch")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--methods", default="magnitude,wanda,sparsegpt,dsnot",
                   help="any of magnitude, wanda, sparsegpt, dsnot (Wanda init + DSnoT refinement)")
    p.add_argument("--dsnot-targets", default="attn", choices=["attn", "mlp", "all"])
    p.add_argument("--pattern", default="unstructured")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--offload", action="store_true")
    p.add_argument("--rule", default="exact", choices=["exact", "reference"], help="our threshold rule")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads in every child (0: torch's default)")
    p.add_argument("--repeat", type=int, default=1, help="take every measurement this many times, interleaved")
    p.add_argument("--no-ref", action="store_true", help="do not time the restated reference loops")
    p.add_argument("--json", default="", help="also write the results to this file")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)))
        return

    env = dict(os.environ, SPARSE_RECOVER_NO_PROGRESS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    order = ["forward"]
    for m in methods:
        order.append(m)
        if m in REF_METHODS and not args.no_ref:
            order.append("ref-" + m)
    passthrough = []
    skip = False
    for a in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if a in ("--json", "--repeat"):
            skip = True
            continue
        if a.startswith(("--json=", "--repeat=")):
            continue
        passthrough.append(a)
    rounds: list[dict] = []
    for r in range(max(1, args.repeat)):
        results = {}
        for what in order:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", what] + passthrough
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
            line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode or not line:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"measurement {what} failed")
            results[what] = json.loads(line[-1][len("RESULT "):])
            print(f"  round {r + 1}: measured {what}: {results[what]['seconds']:.2f}s", file=sys.stderr)
        rounds.append(results)
        if args.repeat > 1:
            print(f"round {r + 1}: " + ", ".join(
                f"{m} {results[m]['seconds'] / results['ref-' + m]['seconds']:.2f}x ref"
                for m in methods if "ref-" + m in results)
                + (f", sparsegpt {results['sparsegpt']['seconds'] / results['forward']['seconds']:.2f}x forward"
                   if "sparsegpt" in results else ""))
    # the fastest of the rounds per measurement (the least disturbed by other load)
    best = {what: min((rd[what] for rd in rounds), key=lambda x: x["seconds"]) for what in order}

    fwd = best["forward"]["seconds"]
    print(f"\n{args.arch}{f' ({args.layers} blocks)' if args.layers else ''}, {args.nsamples} windows x {args.seqlen} "
          f"tokens, batch {args.batch_size}, {args.pattern}{' ' + str(args.sparsity) if args.pattern == 'unstructured' else ''}, "
          f"rule {args.rule}, device {args.device}, dtype {args.dtype}, threads {args.threads or 'default'}"
          f"{', offload' if args.offload else ''}; fastest of {len(rounds)} round(s)")
    print(f"{'what':<16}{'seconds':>10}{'x forward':>11}{'x ref':>8}{'target':>9}{'prune compute s':>17}{'peak RSS MiB':>14}"
          + (f"{'peak CUDA MiB':>15}" if 'peak_cuda_mib' in best['forward'] else ""))
    verdicts = []
    for what, r in best.items():
        cuda = f"{r['peak_cuda_mib']:>15.0f}" if "peak_cuda_mib" in r else ""
        comp = f"{r['compute_seconds']:>17.2f}" if "compute_seconds" in r else f"{'-':>17}"
        ref = best.get("ref-" + what)
        vs_ref = f"{r['seconds'] / ref['seconds']:>8.2f}" if ref else f"{'-':>8}"
        target = f"{'<=' + format(REF_TARGETS[what], '.1f'):>9}" if ref else f"{'-':>9}"
        if ref:
            verdicts.append(f"{what} {r['seconds'] / ref['seconds']:.2f}x the reference (target <= {REF_TARGETS[what]:.1f}x): "
                            + ("met" if r["seconds"] / ref["seconds"] <= REF_TARGETS[what] else "NOT met"))
        print(f"{what:<16}{r['seconds']:>10.2f}{r['seconds'] / fwd:>11.2f}{vs_ref}{target}{comp}{r['peak_rss_mib']:>14.0f}{cuda}")
    for what, limit in FWD_TARGETS.items():
        if what in best:
            x = best[what]["seconds"] / fwd
            verdicts.append(f"{what} stage {x:.2f}x the forward pass (target <= {limit:.1f}x): " + ("met" if x <= limit else "NOT met"))
    if "dsnot" in best and "wanda" in best:
        d, w = best["dsnot"], best["wanda"]
        print(f"dsnot / wanda wall time: {d['seconds'] / w['seconds']:.2f}x; refinement math "
              f"{d['compute_seconds']:.2f}s = {d['compute_seconds'] / d['seconds']:.1%} of dsnot's time")
    for v in verdicts:
        print(v)
    results = best
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "results": results, "rounds": rounds}, fh, indent=2)


if __name__ == "__main__":
    main()
