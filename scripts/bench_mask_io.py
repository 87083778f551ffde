#!/usr/bin/env python
"""Bit-packed masks.safetensors (packed-bits-v1) against the first release's bool file, side by side in one run.

    python scripts/bench_mask_io.py                  # SmolLM2-135M shapes, then the 7B-shaped memory check
    python scripts/bench_mask_io.py --repeats 9 --threads 2
    python scripts/bench_mask_io.py --skip-7b        # seconds: the SmolLM2 part only

On random 50% masks shaped like SmolLM2-135M's prunable linears (30 blocks x q/k/v/o/gate/up/down, read
from the built-in model's config when it is there offline, else the same shapes hard-coded):

- file size of each format;
- write: `save_masks` (packs, hashes the logical masks) against the first release's writer (bool
  tensors, the same hash);
- read + iterate: `load_masks` then `for key, keep in masks.items()` (one mask unpacked at a time),
  against the first release's reader (every mask read and checked into a dict, then iterated), and
  against the bool file read through today's `load_masks` (the format alone);
- audit-style: read, then unpack each mask and count its kept entries (`int(keep.sum())`, as the audit).

Each pair alternates (A B A B ...) after a warm-up, and the medians and their ratio are printed: a ratio
below 1 means packed is smaller or faster. Then the peak host memory (VmHWM over the RSS just before
reading, in a fresh process each) of reading + iterating + counting (count_nonzero) every mask of a 7B-shaped model cut
to 4 blocks (hidden 4096, intermediate 11008): packed, the bool file through today's lazy reader, and the
bool file through the first release's reader. No threshold is asserted: the figures depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

SMOLLM2 = {"layers": 30, "hidden": 576, "intermediate": 1536, "heads": 9, "kv_heads": 3, "head_dim": 64}
LLAMA_7B_4 = {"layers": 4, "hidden": 4096, "intermediate": 11008, "heads": 32, "kv_heads": 32, "head_dim": 128}


def smollm2_shape() -> tuple[dict[str, int], str]:
    try:
        from sparse_recover.plan import hf_config_offline

        cfg, _ = hf_config_offline("smollm2-135m")
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return {"layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "intermediate": cfg.intermediate_size,
                "heads": heads, "kv_heads": cfg.num_key_value_heads, "head_dim": head_dim}, "built-in config"
    except Exception as exc:  # noqa: BLE001 - offline without the built-in model: the same shapes, hard-coded
        return SMOLLM2, f"hard-coded ({type(exc).__name__})"


def linear_shapes(s: dict[str, int]) -> dict[str, tuple[int, int]]:
    """{weight name: (out, in)} of every prunable linear of a LLaMA-shaped model."""
    h, i, q, kv = s["hidden"], s["intermediate"], s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"]
    block = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
             "self_attn.o_proj": (h, q), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}
    return {f"model.layers.{n}.{name}.weight": shape for n in range(s["layers"]) for name, shape in block.items()}


def random_masks(shapes: dict[str, tuple[int, int]], seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return {name: torch.rand(shape, generator=g) < 0.5 for name, shape in shapes.items()}


# the first release's bool format, restated: the baseline


def bool_save(path, masks) -> str:
    from safetensors.torch import save_file

    from sparse_recover.sparsity.io import masks_sha256

    meta = {"format": "sparse-recover-masks/1", "convention": "True=keep, (out, in)", "pattern": "unstructured",
            "transposed": "[]"}
    save_file({k: v.contiguous() for k, v in sorted(masks.items())}, str(path), metadata=meta)
    return masks_sha256(masks)


def bool_load(path):
    import torch

    from sparse_recover.safeio import load_safetensors

    out = load_safetensors(path, what="masks")
    for key, mask in out.items():
        if mask.dtype != torch.bool or (mask.numel() and int(mask.view(torch.uint8).max()) > 1):
            raise ValueError(key)
    return out


def new_save(path, masks) -> str:
    from sparse_recover.sparsity.io import save_masks

    return save_masks(path, masks, transposed=[], pattern="unstructured")


def new_load(path):
    from sparse_recover.sparsity.io import load_masks

    return load_masks(path)[0]


def read_iterate(load, path) -> int:
    n = 0
    for _, keep in load(path).items():
        n += keep.shape[0]
    return n


def read_count(load, path) -> int:
    """As the audit counts: `keep.sum()` (which makes an int64 copy of the mask while it runs)."""
    return sum(int(keep.sum()) for _, keep in load(path).items())


def read_count_nonzero(load, path) -> int:
    return sum(int(keep.count_nonzero()) for _, keep in load(path).items())


def child(mode: str, path: str) -> dict:
    """Peak host memory of reading + iterating + counting (count_nonzero: no int64 copy) every mask of
    `path`, in this fresh process."""
    def status_mib(field: str) -> float:  # VmHWM, unlike ru_maxrss, does not inherit the parent's peak
        with open("/proc/self/status") as fh:
            return next(int(ln.split()[1]) for ln in fh if ln.startswith(field + ":")) / 1024

    import importlib

    for module in ("safetensors.torch", "sparse_recover.sparsity.io"):  # imported before the baseline is taken
        importlib.import_module(module)

    load = {"packed": new_load, "bool-lazy": new_load, "bool-first-release": bool_load}[mode]
    before = status_mib("VmRSS")
    t = time.perf_counter()
    kept = read_count_nonzero(load, path)
    return {"peak_mib": status_mib("VmHWM") - before, "seconds": time.perf_counter() - t, "kept": kept}


def memory(shapes, folder: Path) -> None:
    masks = random_masks(shapes, seed=1)
    packed, plain = folder / "7b_packed.safetensors", folder / "7b_bool.safetensors"
    new_save(packed, masks)
    bool_save(plain, masks)
    logical = sum(m.numel() for m in masks.values()) / 2**20
    del masks
    rows = {}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    for mode, path in (("packed", packed), ("bool-lazy", plain), ("bool-first-release", plain)):
        res = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", mode, str(path)],
                             capture_output=True, text=True, env=env)
        line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
        if res.returncode or not line:
            print(f"{mode}: failed\n{res.stderr[-2000:]}", file=sys.stderr)
            continue
        rows[mode] = json.loads(line[0][7:])
    print(f"\nPeak host memory, read + iterate + count every mask: 7B-shaped, {len(shapes)} linears in 4 blocks, "
          f"{logical:.0f} MiB of logical bool masks (largest one {max(a * b for a, b in shapes.values()) / 2**20:.0f} MiB)")
    print(f"files: packed {packed.stat().st_size / 2**20:.1f} MiB, bool {plain.stat().st_size / 2**20:.1f} MiB")
    print("| reader | peak MiB over the RSS before | s | x first release |")
    print("|---|---|---|---|")
    ref = rows.get("bool-first-release")
    for mode, r in rows.items():
        ratio = f"{r['peak_mib'] / ref['peak_mib']:.3f}" if ref else "-"
        print(f"| {mode} | {r['peak_mib']:.0f} | {r['seconds']:.2f} | {ratio} |")
    if len({r["kept"] for r in rows.values()}) > 1:
        print("kept counts differ between readers!", {m: r["kept"] for m, r in rows.items()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    ap.add_argument("--skip-7b", action="store_true", help="leave out the 7B-shaped memory measurement")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.child:
        print("RESULT " + json.dumps(child(*args.child)))
        return
    from bench_masks import side_by_side

    from sparse_recover.sparsity.io import load_masks, masks_sha256

    dims, where = smollm2_shape()
    shapes = linear_shapes(dims)
    masks = random_masks(shapes)
    with tempfile.TemporaryDirectory(prefix="bench_mask_io_") as tmp:
        folder = Path(tmp)
        packed, plain = folder / "packed.safetensors", folder / "bool.safetensors"
        assert new_save(packed, masks) == bool_save(plain, masks) == masks_sha256(load_masks(packed)[0])
        sizes = packed.stat().st_size, plain.stat().st_size
        cases = [
            ("write", lambda: new_save(packed, masks), lambda: bool_save(plain, masks)),
            ("read + iterate", lambda: read_iterate(new_load, packed), lambda: read_iterate(bool_load, plain)),
            ("read + iterate, both through today's reader", lambda: read_iterate(new_load, packed),
             lambda: read_iterate(new_load, plain)),
            ("audit-style: read, unpack each, count", lambda: read_count(new_load, packed),
             lambda: read_count(bool_load, plain)),
        ]
        print(f"SmolLM2-135M shapes ({where}): {len(shapes)} linears, {sum(a * b for a, b in shapes.values()):,} "
              f"mask entries, random 50%; {args.threads} thread(s), median of {args.repeats}")
        print(f"file size: packed {sizes[0] / 1e6:.2f} MB, bool {sizes[1] / 1e6:.2f} MB, "
              f"ratio {sizes[0] / sizes[1]:.4f}")
        print("| case | packed s | bool s | ratio |")
        print("|---|---|---|---|")
        for name, ours, theirs in cases:
            a, b = side_by_side(ours, theirs, args.repeats)
            print(f"| {name} | {a:.4f} | {b:.4f} | {a / b:.3f} |")
        masks.clear()  # the 7B-shaped part measures in fresh processes; free these first
        if not args.skip_7b:
            memory(linear_shapes(LLAMA_7B_4), folder)


if __name__ == "__main__":
    main()
