#!/usr/bin/env python
"""Step time and peak memory of sparsity-preserving fine-tuning, every variant in one run.

    python scripts/bench_finetune.py                       # SmolLM2-135M (2:4 magnitude mask), CPU, fp32
    python scripts/bench_finetune.py --seqlen 512 --batch 4 --rank 16 --steps 6
    python scripts/bench_finetune.py --arch llama-7b --layers 4 --device cuda --dtype bfloat16 --seqlen 2048 --batch 1

Variants (same model, mask, sequence length, batch, rank, targets q/k/v/o/gate/up/down):
  lora        plain LoRA from peft on the dense-stored weights (no mask anywhere): the yardstick
  sqft        naive masked LoRA through autograd, W + s (BA) * M materialised (SQFT-style)
  spp-naive   SPP with the (out, in) product repeat(alpha) * beta * W materialised through autograd
  spp         our SPP (custom autograd function, W' rebuilt in backward)
  lors        our LoRS (custom autograd function, rearranged adapter gradients)
  floor       no adapter at all: the frozen model's forward and its backward to the activations (the
              two matmuls per linear that LoRS cannot avoid, plus everything the variants share). No
              adapter can step faster; floor / sqft bounds the "x sqft" any implementation can reach.
  lors-kl     our LoRS distilled from the dense model (train/distill.py: the teacher's forward under
              no_grad on the same batch, then T^2 KL on the logits), teacher on --teacher-device
  lors-squarehead   the same plus SquareHead's per-block hidden-state MSE
The distillation variants are also printed as ratios to plain lors (issue 13 targets at 7B shape with the
teacher on the same device: <= 1.6x time, <= 1.3x memory).
Each runs in its own child process: peak memory is that process's peak (host RSS on CPU, with glibc
told to map large blocks directly so freed transients leave RSS; CUDA max_memory_allocated on GPU); step time is the median of the timed steps (forward + backward +
AdamW step) after warm-up. Targets: LoRS time <= 1.15x lora and <= 0.7x sqft; LoRS memory <= 1.05x
lora; SPP memory <= 1.1x lora.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

VARIANTS = ("lora", "sqft", "spp-naive", "spp", "lors", "floor", "lors-kl", "lors-squarehead")
DISTILLED = {"lors-kl": "kl", "lors-squarehead": "squarehead"}  # variant -> distillation on top of lors
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model(args):
    import torch

    from sparse_recover.models import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    torch.manual_seed(0)
    if args.arch == "smollm2-135m":
        from sparse_recover.models import load_model, resolve_model_source

        model = load_model(resolve_model_source("smollm2-135m"), dtype=dtype)
    else:
        from transformers import AutoModelForCausalLM, LlamaConfig

        from bench_prune import ARCHS

        shape = dict(ARCHS[args.arch])
        if args.layers:
            shape["num_hidden_layers"] = args.layers
        model = AutoModelForCausalLM.from_config(LlamaConfig(**shape), dtype=dtype)
    return model, device


def _magnitude_24(model):
    """A 2:4 mask on every decoder linear by magnitude (the mask pattern does not change the cost)."""
    import torch

    from sparse_recover.models import decoder_blocks, prunable_linears
    from sparse_recover.sparsity.masks import keep_nm
    from sparse_recover.sparsity.patterns import NM

    masks = {}
    name, blocks = decoder_blocks(model)
    for i, block in enumerate(blocks):
        for lname, mod in prunable_linears(block).items():
            with torch.no_grad():
                keep = keep_nm(mod.weight.detach().abs().float(), NM(2, 4))
                mod.weight.mul_(keep.to(mod.weight.dtype))
            masks[f"{name}.{i}.{lname}.weight"] = keep
    return masks


class SppNaive:
    """SPP as the reference writes it without its memory tricks: A = repeat(alpha); W' = A * beta * W."""

    @staticmethod
    def attach(model, masks, rank, scaling):
        import torch
        import torch.nn as nn
        import torch.nn.functional as F

        from sparse_recover.adapters import AdapterSettings, SparseAdapter, attach_adapters

        class _Naive(SparseAdapter):
            method = "spp-naive"

            def __init__(self, base, keep, settings, name=""):
                super().__init__(base, keep, settings, name)
                self.alpha = nn.Parameter(torch.empty(settings.rank, self.in_features, device=self.weight.device)
                                          .uniform_(-self.in_features ** -0.5, self.in_features ** -0.5))
                self.beta = nn.Parameter(torch.zeros(self.out_features, 1, device=self.weight.device))

            check_shape = staticmethod(lambda o, i, r: None if o % r == 0 else "rank must divide out")

            def adapted_forward(self, x):
                w = self.weight
                a_full = torch.repeat_interleave(self.alpha, self.out_features // self.rank, dim=0).to(w.dtype)
                w_prime = a_full * self.beta.to(w.dtype) * w
                return self.base(x) + self.scaling * F.linear(x.to(w.dtype), w_prime)

        return attach_adapters(model, _Naive, masks, AdapterSettings(rank=rank, scaling=scaling), TARGETS)


def child(args) -> dict:
    import torch

    from sparse_recover.runtime import peak_rss_mb

    model, device = _model(args)
    variant = args.child
    teacher = _model(args)[0] if variant in DISTILLED else None  # the dense weights (_model is seeded)
    masks = _magnitude_24(model)
    torch.manual_seed(1)
    if variant == "floor":
        for p in model.parameters():
            p.requires_grad_(False)
        model.enable_input_require_grads()  # backward runs through every frozen linear to the inputs
        params = []
    elif variant == "lora":
        import peft

        cfg = peft.LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=TARGETS, lora_dropout=0.0)
        model = peft.get_peft_model(model, cfg)
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        from sparse_recover.adapters import ADAPTERS, AdapterSettings, attach_adapters
        from sparse_recover.adapters.model import trainable_parameters

        if variant == "spp-naive":
            adapters = SppNaive.attach(model, masks, args.rank, 1.0)
        else:
            cls = ADAPTERS["lors" if variant in DISTILLED else variant]
            adapters = attach_adapters(model, cls, masks, AdapterSettings(rank=args.rank, scaling=1.0), TARGETS)
        params = trainable_parameters(adapters)
        for p in params:  # non-zero factors, as during training
            with torch.no_grad():
                p.add_(torch.randn_like(p) * 1e-3)
    del masks
    model.to(device)
    model.train()
    model.config.use_cache = False
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    distiller = None
    if teacher is not None:
        from sparse_recover.train.distill import Distiller, DistillSettings

        tdev = device if args.teacher_device == "same" else torch.device(args.teacher_device)
        distiller = Distiller(teacher.to(tdev), model, DistillSettings(DISTILLED[variant]))
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seqlen), generator=g).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_rss = peak_rss_mb()
    times = []
    for step in range(args.warmup + args.steps):
        t = time.perf_counter()
        if distiller is None:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        else:  # the same student call inside, after the teacher's forward
            loss = distiller.loss(model, {"input_ids": ids, "labels": ids})[0]
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t)
    out = {"variant": variant, "step_s": statistics.median(times), "trainable": sum(p.numel() for p in params),
           "peak_host_mib": peak_rss_mb(), "host_before_mib": base_rss}
    if device.type == "cuda":
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="smollm2-135m", help="smollm2-135m | llama-7b (random init)")
    ap.add_argument("--layers", type=int, default=0, help="decoder blocks for --arch llama-7b (0 = all)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--teacher-device", default="same", help="distillation variants: same | cpu | cuda[:N]")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)))
        return
    rows = {}
    passed, skip = [], False  # the command line for the children, without --variants (either spelling)
    for a in sys.argv[1:]:
        if skip or a.startswith("--variants="):
            skip = False
            continue
        if a == "--variants":
            skip = True
            continue
        passed.append(a)
    for variant in args.variants.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", variant] + passed
        # large blocks straight from mmap and back on free: peak RSS then tracks live tensors, not the
        # allocator's caching of freed transients
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
        if res.returncode or not line:
            print(f"{variant}: failed\n{res.stderr[-2000:]}", file=sys.stderr)
            continue
        rows[variant] = json.loads(line[0][7:])
        print(f"  measured {variant}: {rows[variant]['step_s']:.3f} s/step", file=sys.stderr)
    mem_key = "peak_cuda_mib" if any("peak_cuda_mib" in r for r in rows.values()) else "peak_host_mib"
    ref = rows.get("lora")
    print(f"\n{args.arch} {args.device} {args.dtype}, batch {args.batch} x seqlen {args.seqlen}, rank {args.rank}, "
          f"median of {args.steps} steps; memory = {mem_key}")
    print("| variant | trainable | s/step | x lora | x sqft | x floor | peak MiB | mem x lora |")
    print("|---|---|---|---|---|---|---|---|")

    def ratio(r, other):
        return f"{r['step_s'] / rows[other]['step_s']:.2f}" if other in rows else "-"

    for v, r in rows.items():
        ml = f"{r[mem_key] / ref[mem_key]:.3f}" if ref else "-"
        print(f"| {v} | {r['trainable']:,} | {r['step_s']:.3f} | {ratio(r, 'lora')} | {ratio(r, 'sqft')} | "
              f"{ratio(r, 'floor')} | {r[mem_key]:.0f} | {ml} |")
    distilled = [v for v in DISTILLED if v in rows]
    if "lors" in rows and distilled:
        lors = rows["lors"]
        print(f"\nLoRS with and without distillation (teacher on {args.teacher_device}):")
        print("| variant | s/step | time x lors | peak MiB | mem x lors |")
        print("|---|---|---|---|---|")
        for v in ["lors", *distilled]:
            r = rows[v]
            print(f"| {v} | {r['step_s']:.3f} | {r['step_s'] / lors['step_s']:.2f} | {r[mem_key]:.0f} | "
                  f"{r[mem_key] / lors[mem_key]:.3f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
