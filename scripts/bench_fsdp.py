"""Per-process memory of fine-tuning sharded with FSDP2 against DDP and one process, side by side.

A 7B-shaped random LLaMA (hidden 4096, MLP 11008, 32 heads, vocabulary 32000) cut to `--blocks` decoder
blocks, pruned 2:4 by magnitude, LoRS adapters (rank 16, no gradient init) on every linear, float32 on
the CPU. Each configuration runs the project's training loop (sparse_recover.train.Trainer) for
`--steps` steps, launched by torch.distributed.run as `finetune` is under accelerate:

    1 process         the whole model
    2 processes DDP   every process holds the whole model (accelerate's DDP over gloo)
    2 processes FSDP2 `--shard fsdp`: every weight split in two between the processes

Printed per configuration and process: the frozen base's bytes the process holds (parameters that do
not train, the local shard under FSDP2), the resident memory after the model is built, after sharding
and the largest seen after each step, and the seconds per step; then the ratios FSDP2 / DDP. The model
is built whole in every process before it is sharded (as `finetune` loads it), so the peak while
loading is not part of the steady-state figure: the last column says so.

    python scripts/bench_fsdp.py                     # 7B-shaped, 4 blocks (about 4.3 GB per whole model)
    python scripts/bench_fsdp.py --hidden 512 --intermediate 1376 --vocab 4000   # quick look
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
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def worker(args) -> None:
    import gc

    import torch
    from accelerate import Accelerator
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT))
    from sparse_recover.adapters import AdapterSettings, attach_adapters, get_adapter
    from sparse_recover.models import decoder_blocks, prunable_linears
    from sparse_recover.train import Trainer, TrainSettings

    torch.set_num_threads(1)
    acc = Accelerator(cpu=True)
    world, rank = acc.num_processes, acc.process_index
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.blocks, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float()
    masks = {}
    with torch.no_grad():  # magnitude 2:4 along the input dimension
        _, blocks = decoder_blocks(model)
        for i, block in enumerate(blocks):
            for name, lin in prunable_linears(block).items():
                w = lin.weight
                groups = w.abs().reshape(w.shape[0], -1, 4)
                keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, groups.topk(2, dim=2).indices, True)
                keep = keep.reshape(w.shape)
                w.mul_(keep)
                masks[f"model.layers.{i}.{name}.weight"] = keep
    targets = sorted({n.rsplit(".", 2)[-2] for n in masks})
    adapters = attach_adapters(model, get_adapter("lors"), masks, AdapterSettings(rank=16, scaling=4.0), targets)
    del masks
    gc.collect()
    built = _rss()
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, args.vocab, (args.seqlen,), generator=gen).tolist() for _ in range(16)]
    data = SimpleNamespace(train=[(s, s) for s in seqs[:12]], val=[(s, s) for s in seqs[12:]])
    settings = TrainSettings(lr=1e-4, batch_size=2 * world, micro_batch_size=1, max_steps=args.steps,
                             eval_every=10**6, save_every=10**6, shard="fsdp" if args.mode == "fsdp" else "none",
                             warmup_ratio=0.0)
    # the last step writes a checkpoint into a folder every process sees
    trainer = Trainer(model, adapters, data, settings, acc, pad_id=0,
                      work_dir=Path(args.out).parent / f"work-{args.mode}")
    gc.collect()
    after_shard = _rss()
    frozen = sum((p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size()
                 for p in model.parameters() if not p.requires_grad)
    peaks, times = [], []
    for step in range(args.steps):
        t0 = time.perf_counter()
        trainer.train_step(step, None, _Meter())
        times.append(time.perf_counter() - t0)
        peaks.append(_rss())
    trainer.close()
    row = {"rank": rank, "frozen_bytes": frozen, "rss_built": built, "rss_sharded": after_shard,
           "rss_steps": max(peaks), "s_per_step": min(times)}
    Path(args.out).with_suffix(f".{rank}.json").write_text(json.dumps(row))


class _Meter:
    def rate(self, tokens):
        return ""


def launch(mode: str, procs: int, args, out: Path) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-port",
           str(29500 + {"one": 1, "ddp": 2, "fsdp": 3}[mode]), __file__, "--worker", "--mode", mode, "--out",
           str(out), "--blocks", str(args.blocks), "--hidden", str(args.hidden), "--intermediate",
           str(args.intermediate), "--heads", str(args.heads), "--vocab", str(args.vocab), "--seqlen",
           str(args.seqlen), "--steps", str(args.steps)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPARSE_RECOVER_NO_PROGRESS": "1"}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return [json.loads(out.with_suffix(f".{r}.json").read_text()) for r in range(procs)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="one", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seqlen", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    gib = 1 << 30
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode, procs in (("one", 1), ("ddp", 2), ("fsdp", 2)):
            results[mode] = launch(mode, procs, args, Path(tmp) / mode)
    print(f"7B-shaped LLaMA cut to {args.blocks} blocks (hidden {args.hidden}, MLP {args.intermediate}, vocabulary "
          f"{args.vocab}), float32, LoRS rank 16, seqlen {args.seqlen}, {args.steps} steps; per process:")
    print(f"{'config':<16} {'rank':>4} {'frozen base GiB':>16} {'RSS built':>10} {'RSS sharded':>12} "
          f"{'RSS steps':>10} {'s/step':>7}")
    for mode, rows in results.items():
        label = {"one": "1 process", "ddp": "2 procs DDP", "fsdp": "2 procs FSDP2"}[mode]
        for r in rows:
            print(f"{label:<16} {r['rank']:>4} {r['frozen_bytes'] / gib:>16.3f} {r['rss_built'] / gib:>10.2f} "
                  f"{r['rss_sharded'] / gib:>12.2f} {r['rss_steps'] / gib:>10.2f} {r['s_per_step']:>7.2f}")
    ddp, fsdp = results["ddp"], results["fsdp"]
    frozen = max(r["frozen_bytes"] for r in fsdp) / max(r["frozen_bytes"] for r in ddp)
    steady = max(r["rss_steps"] for r in fsdp) / max(r["rss_steps"] for r in ddp)
    speed = max(r["s_per_step"] for r in fsdp) / max(r["s_per_step"] for r in ddp)
    print(f"FSDP2 / DDP per process: frozen-base bytes {frozen:.3f}x (target <= 0.55x), resident memory while "
          f"training {steady:.3f}x, time per step {speed:.2f}x")
    print("(each process builds the whole model before sharding, as `finetune` loads it: the loading peak is "
          "the 'RSS built' column in every configuration)")


if __name__ == "__main__":
    main()
