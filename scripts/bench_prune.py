#!/usr/bin/env python
"""Pruning cost against one plain forward pass of the calibration set, measured in one run.

    python scripts/bench_prune.py                          # SmolLM2-135M, 16 windows x 512 tokens, CPU
    python scripts/bench_prune.py --nsamples 32 --seqlen 512 --methods wanda,sparsegpt
    python scripts/bench_prune.py --arch llama-7b --dtype bfloat16 --device cuda --offload --nsamples 128 --seqlen 2048
    python scripts/bench_prune.py --arch llama-7b --layers 2 --nsamples 4 --seqlen 128   # 7B-shaped, 2 blocks, CPU check

Every measurement runs in its own child process (so peak memory is per measurement) and the table
prints the ratio of each method's time to the forward pass of the same windows, measured in the same
invocation. `prune compute` is the pruning math alone (statistics -> masks/updates), the rest of the
method's time is the calibration forward passes. Targets: Wanda <= 2.5x, SparseGPT <= 4x the forward
pass; DSnoT (Wanda's initial mask + refinement, reference defaults) <= 1.3x Wanda.
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
        settings = PruneSettings(pattern=parse_pattern(args.pattern, args.sparsity if args.pattern == "unstructured" else None))
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
    p.add_argument("--json", default="", help="also write the results to this file")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)))
        return

    env = dict(os.environ, SPARSE_RECOVER_NO_PROGRESS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    results = {}
    for what in ["forward", *[m.strip() for m in args.methods.split(",") if m.strip()]]:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", what] + [
            a for a in sys.argv[1:] if a != "--json" and not a.endswith(".json")]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not line:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"measurement {what} failed")
        results[what] = json.loads(line[-1][len("RESULT "):])
        print(f"  measured {what}: {results[what]['seconds']:.2f}s", file=sys.stderr)

    fwd = results["forward"]["seconds"]
    print(f"\n{args.arch}, {args.nsamples} windows x {args.seqlen} tokens, batch {args.batch_size}, "
          f"{args.pattern}{' ' + str(args.sparsity) if args.pattern == 'unstructured' else ''}, "
          f"device {args.device}, dtype {args.dtype}{', offload' if args.offload else ''}")
    print(f"{'what':<12}{'seconds':>10}{'x forward':>11}{'prune compute s':>17}{'peak RSS MiB':>14}"
          + (f"{'peak CUDA MiB':>15}" if 'peak_cuda_mib' in results['forward'] else ""))
    for what, r in results.items():
        cuda = f"{r['peak_cuda_mib']:>15.0f}" if "peak_cuda_mib" in r else ""
        comp = f"{r['compute_seconds']:>17.2f}" if "compute_seconds" in r else f"{'-':>17}"
        print(f"{what:<12}{r['seconds']:>10.2f}{r['seconds'] / fwd:>11.2f}{comp}{r['peak_rss_mib']:>14.0f}{cuda}")
    if "dsnot" in results and "wanda" in results:
        d, w = results["dsnot"], results["wanda"]
        print(f"dsnot / wanda wall time: {d['seconds'] / w['seconds']:.2f}x; refinement math "
              f"{d['compute_seconds']:.2f}s = {d['compute_seconds'] / d['seconds']:.1%} of dsnot's time")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
