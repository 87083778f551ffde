"""`sparse-recover run --dry-run`: the stages a pipeline would run, the checkpoints each reads and
writes, and an estimate of each stage's peak accelerator and host memory.

The estimate comes from the model's config alone: the model is built on the meta device (no weights
are read or downloaded; a built-in alias needs only its package, a hub id only its cached config),
and its parameter shapes give one block's weights, the widest linear (SparseGPT's float32 Hessian,
DSnoT's per-row sort buffers), the whole model, and the activation sizes. It is an estimate of tensor
memory, meant to be right within a small factor; the host figures add a fixed allowance for the Python
runtime (torch, transformers). Whether `--offload` is needed is judged against the free memory of
the GPU at hand, or the available host RAM on a CPU-only machine.

Prune and dsnot also show their progress snapshots (engine/snapshot.py): the cadence K (the configured
`checkpoint_every`, else the automatic one) and the largest disk footprint of RUN/.<stage>.partial: the
finished blocks' weights and packed masks, and two generations of activations, each nsamples x seqlen x
hidden in the calibration dtype.

Below the plan for the device at hand, the same estimates per process at scale (`show_scale`): on 1, 2 and 8
GPUs in the run's dtype (bfloat16 for `dtype: auto`; float32 CPU processes for a config pinned to the CPU).
Prune, dsnot, reconstruct, merge, audit and eval run on one process: one row each, "any P". Fine-tuning has a
row per process count for DDP (every process holds the whole model) and FSDP2 (`finetune.shard: fsdp`: 1/P of
every weight, the gathered blocks and root, 1/P of the adapters' optimizer state); both hold a micro-batch's
activations. Fine-tuning loads the whole checkpoint onto each process's device before sharding it, so under
FSDP2 the load is the peak where it exceeds the sharded training, and the row says both. Each row gives the
disk of its stage folder; the snapshot lines and fine-tuning's checkpoints follow.

A hub model that cannot be reached (no network, not in the cache) but that the built-in table of paper models
knows (shapes.py) is planned from the table, and the plan's first line says so (BUILTIN_SHAPE_NOTE and the
reason); any other model that cannot be reached is the usual one-line error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

from sparse_recover.config import PipelineConfig

GIB = 2**30
RUNTIME_HOST = 600 * 2**20  # Python + torch + transformers + tokenizers, resident after import
_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass
class ModelFacts:
    """Shapes of a model, read from its config on the meta device."""

    name: str
    architecture: str
    params: int
    block_params: int
    n_blocks: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    outside_blocks: int  # embeddings, final norm, lm_head (untied)
    linears: list[tuple[str, int, int]] = field(default_factory=list)  # one block: (name, out, in)
    input_groups: list[int] = field(default_factory=list)  # in-width of each distinct linear input

    @property
    def linear_elems(self) -> int:
        return self.n_blocks * sum(o * i for _, o, i in self.linears)

    @property
    def widest(self) -> tuple[str, int, int]:
        return max(self.linears, key=lambda t: t[1] * t[2])

    @property
    def widest_in(self) -> int:
        return max(i for _, _, i in self.linears)


def hf_config_offline(spec: str, revision: str | None = None, trust_remote_code: bool = False):
    """The HF config of a model without reading (or downloading) its weights (hub: at `revision`)."""
    from transformers import AutoConfig

    from sparse_recover.models import BUILTIN_MODELS, _package_folder, builtin_checkpoint, load_config, \
        resolve_model_source

    source = resolve_model_source(spec, convert=False)
    if source.kind == "builtin":
        if os.path.isfile(os.path.join(source.path, "config.json")):
            return AutoConfig.from_pretrained(source.path), source
        info = BUILTIN_MODELS[source.spec]
        if info.gguf_file is not None:  # the config from the GGUF header; nothing is dequantised
            folder = _package_folder(info.package, info.install)
            return AutoConfig.from_pretrained(str(folder), gguf_file=info.gguf_file), source
        builtin_checkpoint(source.spec)  # assembled by its package (or built: cheap)
        return AutoConfig.from_pretrained(source.path), source
    from sparse_recover.pipeline import check_reachable

    if source.kind == "hub":
        # one line naming the model (and revision) when the hub is needed
        source = check_reachable(spec, revision=revision, trust_remote_code=trust_remote_code)
    return load_config(source), source


def model_facts(hf_config, name: str) -> ModelFacts:
    import torch
    from transformers import AutoModelForCausalLM

    from sparse_recover.models import decoder_blocks, in_features, prunable_linears, weight_2d

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    _, blocks = decoder_blocks(model)
    block = blocks[0]
    linears = []
    for lname, mod in prunable_linears(block).items():
        out, inp = weight_2d(mod).shape
        linears.append((lname, int(out), int(inp)))
    params = sum(p.numel() for p in model.parameters())
    block_params = sum(p.numel() for p in block.parameters())
    # q/k/v and gate/up share an input: one statistic (one Hessian) per distinct input
    groups: dict[str, int] = {}
    for lname, _, inp in linears:
        leaf = lname.rsplit(".", 1)[-1]
        parent = lname.rsplit(".", 1)[0] if "." in lname else ""
        key = parent + (":qkv" if leaf in ("q_proj", "k_proj", "v_proj", "c_attn", "query_key_value")
                        else ":gateup" if leaf in ("gate_proj", "up_proj", "w1", "w3") else ":" + leaf)
        groups[key] = inp
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    hidden = int(getattr(text, "hidden_size", 0) or getattr(text, "n_embd", 0))
    inter = int(getattr(text, "intermediate_size", 0) or getattr(text, "ffn_dim", 0) or getattr(text, "n_inner", 0)
                or 4 * hidden)
    return ModelFacts(
        name=name, architecture=(getattr(hf_config, "architectures", None) or [type(model).__name__])[0],
        params=params, block_params=block_params, n_blocks=len(blocks), hidden=hidden, intermediate=inter,
        vocab=int(getattr(text, "vocab_size", 0)), heads=int(getattr(text, "num_attention_heads", 0)
                                                            or getattr(text, "n_head", 0)),
        outside_blocks=params - block_params * len(blocks), linears=linears, input_groups=list(groups.values()))


# --------------------------------------------------------------------------------------------------
# per-stage estimates (bytes)


@dataclass
class Estimate:
    stage: str
    reads: str
    writes: str
    device: int  # peak accelerator bytes (on a CPU-only machine: the same tensors, in host memory)
    host: int  # peak host bytes, runtime allowance included
    parts: dict[str, int] = field(default_factory=dict)  # the largest terms, for the curious
    note: str = ""
    offloaded: int | None = None  # prune/dsnot: the device peak with --offload
    snapshot: dict[str, Any] | None = None  # prune/dsnot: {"every": K or None, "bytes": disk, "parts": {...}}


def _forward_work(f: ModelFacts, batch: int, seqlen: int, nbytes: int) -> int:
    """Transient memory of one block's forward on `batch` windows: MLP and attention intermediates,
    attention scores (math/eager attention materialises them)."""
    return batch * seqlen * (3 * f.intermediate + 6 * f.hidden) * nbytes + batch * f.heads * seqlen * seqlen * nbytes


def layerwise_estimate(f: ModelFacts, *, nsamples: int, seqlen: int, batch: int, nbytes: int, offload: bool,
                       on_gpu: bool, method: str) -> dict[str, int]:
    """Terms of the calibration engine's peak (prune and dsnot)."""
    out_, in_ = f.widest[1], f.widest[2]
    parts = {
        "weights": (f.block_params + f.outside_blocks) * nbytes if (offload and on_gpu) else f.params * nbytes,
        # block inputs and the outputs that replace them, kept for all windows
        "activations": 2 * nsamples * seqlen * f.hidden * nbytes,
        "forward": _forward_work(f, batch, seqlen, nbytes),
    }
    if method == "sparsegpt":
        # one float32 Hessian per distinct input of the block, plus the widest one's inverse factor and
        # the float32 weight copy, errors and losses of its sweep
        parts["hessians"] = sum(c * c * 4 for c in f.input_groups) + f.widest_in ** 2 * 4 + 3 * out_ * in_ * 4
    elif method == "dsnot":
        # per row: contributions, growing metric, two sort orders (int64), masks of the widest linear
        parts["refine"] = out_ * in_ * (4 + 4 + 8 + 8 + 4 + 2)
    else:  # wanda / magnitude: score and a stable sort (values + int64 indices) of the widest linear
        parts["scores"] = out_ * in_ * (4 + 4 + 8 + 1)
    return parts


def estimates(cfg: PipelineConfig, f: ModelFacts, stages: list[str], *, on_gpu: bool, source_label: str) -> list[Estimate]:
    from sparse_recover.pipeline import finetune_source

    dtype = cfg.model.dtype if cfg.model.dtype != "auto" else ("bfloat16" if on_gpu else "float32")
    nb = _BYTES.get({"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}.get(dtype, dtype), 4)
    weights = f.params * nb
    masks = f.linear_elems  # bool, one byte each
    c = cfg.calib
    out: list[Estimate] = []

    def add(stage, reads, writes, parts, host_extra, note="", offloaded=None, snapshot=None):
        dev = sum(parts.values())
        host = RUNTIME_HOST + host_extra + (0 if on_gpu else dev)
        out.append(Estimate(stage, reads, writes, dev, host, parts, note, offloaded, snapshot))

    def layerwise(method, batch, offload):
        kw = dict(nsamples=c.nsamples, seqlen=c.seqlen, batch=batch, nbytes=nb, on_gpu=on_gpu, method=method)
        return layerwise_estimate(f, offload=offload, **kw), sum(layerwise_estimate(f, offload=True, **kw).values())

    windows = c.nsamples * c.seqlen * 8
    # from_pretrained holds the loaded state dict (and the mapped file's touched pages) next to the
    # model's own tensors for a moment: about two more copies of the weights on the host, in every
    # stage that loads a checkpoint
    load = 2 * f.params * nb
    if "prune" in stages:
        parts, offloaded = layerwise(cfg.prune.method, c.batch_size, cfg.prune.offload)
        host = (weights if on_gpu else 0) + windows + masks + load
        add("prune", f"model {source_label}; calib {c.source} {c.nsamples}x{c.seqlen}", "prune/ calib/", parts, host,
            offloaded=offloaded, snapshot=snapshot_estimate(f, cfg.prune.checkpoint_every, c.nsamples, c.seqlen, nb,
                                                            calibrated=_calibrates(cfg)))
    if "dsnot" in stages:
        d = cfg.dsnot
        parts, offloaded = layerwise("dsnot", d.batch_size, d.offload)
        host = (weights if on_gpu else 0) + windows + 2 * masks + load  # dense model + stored and new masks
        add("dsnot", f"prune/ (masks) calib/, dense model {source_label}", "dsnot/", parts, host, offloaded=offloaded,
            snapshot=snapshot_estimate(f, d.checkpoint_every, c.nsamples, c.seqlen, nb, calibrated=True))
    if "reconstruct" in stages:  # SparseGPT's sweep with the stored masks fixed: SparseGPT's terms
        rc = cfg.reconstruct
        parts, offloaded = layerwise("sparsegpt", rc.batch_size, rc.offload)
        host = (weights if on_gpu else 0) + windows + masks + load
        src = "dsnot" if (rc.from_stage == "dsnot" or (rc.from_stage == "auto" and "dsnot" in stages)) else "prune"
        add("reconstruct", f"{src}/ (masks) calib/, dense model {source_label}", "reconstruct/", parts, host,
            offloaded=offloaded)
    if "finetune" in stages:
        t = finetune_terms(cfg, f, nb)
        parts = {
            "weights": weights,
            "adapters+grads+adamw": t["adapter"] * 16,  # fp32 parameter, gradient, two moments
            "activations": t["activations"],
            "logits": t["logits"],
            "merged-weight transient": t["transient"],
        }
        host = (weights if on_gpu else 0) + load + t["ga_host"]
        add("finetune", f"{finetune_source(cfg)}/ (checkpoint, masks); data {t['data']}",
            "finetune/ (adapters, training state)", parts, host)
    if "merge" in stages:
        parts = {"weights": weights, "masks": masks, "fp32 merge of the widest linear": 2 * f.widest[1] * f.widest[2] * 4}
        add("merge", "finetune/ + its base checkpoint", "merge/", parts, (weights if on_gpu else 0) + load)
    if "audit" in stages:
        parts = {"one checkpoint": weights, "masks": masks}
        add("audit", ", ".join(s + "/" for s in cfg.checkpoint_stages()), "manifest (audit)", {}, sum(parts.values()),
            note="host only")
    if "eval" in stages:
        ev = cfg.eval
        bs = ev.batch_size if isinstance(ev.batch_size, int) else 1
        parts = {"weights": weights, "forward": _forward_work(f, bs, ev.seqlen, nb),
                 "logits": 2 * bs * ev.seqlen * f.vocab * 4}
        add("eval", ", ".join(s if s == "dense" else s + "/" for s in cfg.eval_stages()),
            "eval/<stage>.json", parts, (weights if on_gpu else 0) + load, note=", ".join(ev.tasks))
    return out


def finetune_terms(cfg: PipelineConfig, f: ModelFacts, nb: int) -> dict[str, Any]:
    """The fine-tuning stage's sizes, per process and micro-batch: trainable adapter parameters (float32),
    training activations, logits, the transient merged weight, and the host-side LoRS gradient init."""
    ft = cfg.finetune.resolved()
    r, mb, L = ft["rank"], ft["micro_batch_size"], ft["seqlen"]
    targets = [(n, o, i) for n, o, i in f.linears if any(n.endswith(t) for t in ft["targets"])]
    if ft["method"] == "spp":
        adapter = f.n_blocks * sum(r * i + o for _, o, i in targets)
    else:
        adapter = f.n_blocks * sum(r * (i + o) for _, o, i in targets)
    per_layer_tokens = (8 * f.hidden + 5 * f.intermediate) * nb
    if ft["gradient_checkpointing"]:
        acts = mb * L * (f.n_blocks * f.hidden * nb + per_layer_tokens)
    else:
        acts = mb * L * f.n_blocks * per_layer_tokens + mb * f.heads * L * L * nb
    widest = max((o * i for _, o, i in targets), default=0)
    ga = ft["method"] == "lors" and ft["ga_init"]
    return {
        "adapter": adapter,
        "activations": acts,
        "logits": 3 * mb * L * f.vocab * 4,  # logits, their float32 upcast and gradient
        "transient": widest * nb * (0 if ft["method"] == "spp" else 2),
        # LoRS's gradient init: dense-shaped float32 gradients offloaded to the host, computed on the model
        # before it is wrapped (unsharded), one target's dense gradient on the device at a time
        "ga_host": f.n_blocks * sum(o * i for _, o, i in targets) * 4 if ga else 0,
        "ga_device": widest * 4 if ga else 0,
        "data": ft["data"],
        "shard": ft["shard"],
    }


# --------------------------------------------------------------------------------------------------
# at scale: per process on 1, 2 and 8 accelerators, and the disk of each stage

SCALE_PROCESSES = (1, 2, 8)
SINGLE_PROCESS = ("prune", "dsnot", "reconstruct", "merge", "audit", "eval")  # one process whatever P is


@dataclass
class ScaleRow:
    stage: str
    processes: int | None  # None: a single-process stage (the same row for any P)
    mode: str  # finetune: "DDP" | "FSDP2"; "" otherwise
    device: int | None  # peak accelerator bytes per process (None: CPU processes, every figure is host)
    host: int  # peak host bytes per process, runtime allowance included
    disk: int  # the stage folder (prune: with calib/)
    parts: dict[str, int] = field(default_factory=dict)
    offloaded: int | None = None  # layer-wise stages: the accelerator peak with offload
    train: int | None = None  # FSDP2: the sharded training peak alone (`device` also counts the load)
    load: int | None = None  # FSDP2: the load peak (the whole checkpoint on the device before sharding)


def scale_dtype(cfg: PipelineConfig) -> tuple[str, int, bool]:
    """(dtype, bytes per weight, on accelerators) of the at-scale figures: the configured dtype on GPUs
    (auto: bfloat16); a config pinned to the CPU runs float32 CPU processes (auto)."""
    on_gpu = cfg.model.device != "cpu"
    dtype = cfg.model.dtype if cfg.model.dtype != "auto" else ("bfloat16" if on_gpu else "float32")
    dtype = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}.get(dtype, dtype)
    return dtype, _BYTES.get(dtype, 4), on_gpu


def stage_disk(cfg: PipelineConfig, f: ModelFacts, stage: str, nb: int) -> dict[str, int]:
    """Bytes a stage leaves on disk, by file: a checkpoint stage's weights (in the run's dtype) and its
    bit-packed masks (plus prune's calibration windows, int64); finetune's adapters and training state
    (float32: the adapters, then AdamW's two moments), and the largest .finetune.partial (the newest two
    checkpoints and one being written)."""
    masks = f.n_blocks * sum(o * -(-i // 8) for _, o, i in f.linears)
    if stage in ("prune", "dsnot", "reconstruct", "merge"):
        out = {"weights": f.params * nb, "masks": masks}
        if stage == "prune":
            out["calib/"] = cfg.calib.nsamples * cfg.calib.seqlen * 8
        return out
    if stage == "finetune":
        a = finetune_terms(cfg, f, nb)["adapter"]
        from sparse_recover.train.state import KEEP_CHECKPOINTS

        return {"adapters": 4 * a, "training_state": 12 * a, "partial": (KEEP_CHECKPOINTS + 1) * 12 * a}
    return {}  # audit: the manifest; eval: a JSON file per stage


def scale_estimates(cfg: PipelineConfig, f: ModelFacts, stages: list[str], *,
                    processes: tuple[int, ...] = SCALE_PROCESSES) -> list[ScaleRow]:
    """Per-process peaks on 1, 2 and 8 accelerators. The layer-wise stages, merge, audit and eval run on one
    process: one row each. Fine-tuning has a row per process count for DDP (every process holds the whole
    model, its adapters and their optimizer state) and for FSDP2 (`finetune.shard: fsdp`, train/shard.py:
    every parameter split over the P processes, one unit per decoder block plus the root; a block is
    all-gathered for its forward and again for its backward, the next one prefetched, and the root (embeddings,
    final norm, head) stays gathered through the step). Activations and logits are a micro-batch's on every
    process. The host holds, per process, what loading the checkpoint costs (each process loads it whole)."""
    _, nb, on_gpu = scale_dtype(cfg)
    base = {e.stage: e for e in estimates(cfg, f, [s for s in stages if s != "finetune"], on_gpu=on_gpu,
                                          source_label=f.name)}
    rows: list[ScaleRow] = []
    for stage in stages:
        disk = sum(v for k, v in stage_disk(cfg, f, stage, nb).items() if k != "partial")
        if stage != "finetune":
            e = base[stage]
            rows.append(ScaleRow(stage, None, "", e.device if on_gpu else None, e.host, disk, e.parts,
                                 offloaded=e.offloaded))
            continue
        t = finetune_terms(cfg, f, nb)
        weights = f.params * nb
        host = RUNTIME_HOST + (weights if on_gpu else 0) + 2 * weights + t["ga_host"]
        micro = {"activations": t["activations"], "logits": t["logits"], "merged-weight transient": t["transient"]}
        # LoRS's gradient init runs on the loaded model before it is wrapped or sharded: a micro-batch's
        # forward and backward with one target's dense float32 gradient
        ga_pass = t["activations"] + t["logits"] + t["ga_device"] if t["ga_device"] else 0
        for p in processes:
            ddp = {"weights": weights, "adapters+grads+adamw": 16 * t["adapter"],
                   # DDP's gradient buckets: a second float32 copy of the adapters' gradients
                   "ddp buckets": 4 * t["adapter"] if p > 1 else 0, **micro}
            dev = max(sum(ddp.values()), weights + ga_pass)
            rows.append(ScaleRow(stage, p, "DDP", dev if on_gpu else None, host + (0 if on_gpu else dev), disk, ddp))
            decoder = f.n_blocks * f.block_params * nb
            root = f.outside_blocks * nb
            fsdp = {"decoder shard": -(-decoder // p), "root shard + gathered": -(-root // p) + root,
                    "gathered blocks": 2 * f.block_params * nb,  # the one in use and the prefetched one
                    "adapters+grads+adamw shard": -(-16 * t["adapter"] // p), **micro}
            train = sum(fsdp.values())
            # sharded, finetune reads the checkpoint into host memory (and runs LoRS's gradient init there);
            # fully_shard then moves one decoder block at a time to the device and keeps its shard
            # (engine/finetune.py: load_dev, train/shard.py): the device never holds more than one whole block
            load = f.block_params * nb
            dev = max(train, load)
            fsdp_host = host + (ga_pass if on_gpu else 0)
            rows.append(ScaleRow(stage, p, "FSDP2", dev if on_gpu else None, fsdp_host + (0 if on_gpu else dev),
                                 disk, fsdp, train=train, load=load))
    return rows


def _calibrates(cfg: PipelineConfig) -> bool:
    from sparse_recover.pruning import get_method

    return cfg.prune.profile != "uniform" or get_method(cfg.prune.method).statistic is not None


def snapshot_estimate(f: ModelFacts, every: int | None, nsamples: int, seqlen: int, nbytes: int, *,
                      calibrated: bool) -> dict[str, Any]:
    """The snapshot cadence of a layer-wise stage and the largest disk footprint of its snapshots."""
    from sparse_recover.engine.snapshot import auto_checkpoint_every, snapshot_bytes

    tokens = nsamples * seqlen if calibrated else 0
    auto = every is None
    if auto:
        every = auto_checkpoint_every(f.params, f.block_params, tokens)
    parts = snapshot_bytes(n_blocks=f.n_blocks, block_params=f.block_params,
                           linear_elems_per_block=sum(o * i for _, o, i in f.linears),
                           nsamples=nsamples if calibrated else 0, seqlen=seqlen, hidden=f.hidden, nbytes=nbytes,
                           every=every)
    return {"every": every, "auto": auto, "bytes": sum(parts.values()), "parts": parts}


def _snapshot_line(stage: str, snap: dict[str, Any], n_blocks: int) -> str:
    every = snap["every"]
    if not every:
        return (f"no progress snapshots (model under 1B parameters or data-free; set {stage}.checkpoint_every "
                "to take them)")
    if not snap["bytes"]:
        return f"no progress snapshots (checkpoint every {every} blocks, the model has {n_blocks})"
    detail = ", ".join(f"{k} {_fmt(v)}" for k, v in snap["parts"].items() if v)
    return (f"snapshot every {every} blocks{' (auto)' if snap['auto'] else ''}: up to {_fmt(snap['bytes'])} on disk "
            f"in .{stage}.partial ({detail})")


def device_at_hand() -> tuple[str, int, bool]:
    """(description, free bytes, is a GPU): the free memory of GPU 0, or the available host RAM."""
    import torch

    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(0)
        return f"{torch.cuda.get_device_name(0)} ({total / GIB:.1f} GiB)", int(free), True
    return "CPU (host RAM)", host_available(), False


def host_available() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _fmt(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 4 else f"{n / 2**20:.0f} MiB"


def show(cfg: PipelineConfig, run_dir: str | None, selected: list[str], *,
         echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Print the plan; returns it as a dict (stages with their estimates and verdicts)."""
    hf_config, source, shape_note = plan_config(cfg)
    f = model_facts(hf_config, source.spec)
    if shape_note:
        echo(shape_note)
    where, free, on_gpu = device_at_hand()
    if cfg.model.device == "cpu":
        where, free, on_gpu = "CPU (host RAM)", host_available(), False
    rows = estimates(cfg, f, selected, on_gpu=on_gpu, source_label=source.spec)
    status = _statuses(cfg, run_dir, selected)
    echo(f"plan: {f.name} ({f.architecture}, {f.params / 1e6:.1f}M parameters, {f.n_blocks} blocks, hidden "
         f"{f.hidden}) -> {run_dir or '(no --run-dir)'}")
    echo(f"device at hand: {where}, {_fmt(free)} free" + ("" if on_gpu else "; no GPU, so every figure is host memory"))
    header = f"{'stage':9s} {'status':9s} {'device peak':>12s} {'host peak':>11s}  reads -> writes"
    echo(header)
    result = {"model": f.__dict__ | {"linears": f.linears}, "device": where, "free": free, "on_gpu": on_gpu, "stages": []}
    for e in rows:
        verdict = _verdict(cfg, e, free, on_gpu, f)
        dev = _fmt(e.device) if on_gpu or e.device else "-"
        echo(f"{e.stage:9s} {status.get(e.stage, ''):9s} {dev:>12s} {_fmt(e.host):>11s}  {e.reads} -> {e.writes}")
        big = sorted(e.parts.items(), key=lambda kv: -kv[1])[:3]
        detail = ", ".join(f"{k} {_fmt(v)}" for k, v in big if v)
        if detail or verdict:
            echo(f"{'':9s} {'':9s} {detail}{'; ' if detail and verdict else ''}{verdict}")
        result["stages"].append({**e.__dict__, "status": status.get(e.stage), "verdict": verdict})
    echo("(estimates of tensor memory from the model config; host figures include ~0.6 GiB for the runtime)")
    result["scale"] = show_scale(cfg, f, selected, echo=echo)
    result["builtin_shape"] = bool(shape_note)
    return result


# the first line of a plan drawn from shapes.py, followed by the reason the hub could not be reached (what a
# real run would print): a caller that needs the model itself (scripts/make_table.py) can tell from it
BUILTIN_SHAPE_NOTE = "shape from the built-in table (sparse_recover/shapes.py; a real run needs the model): "


def plan_config(cfg: PipelineConfig):
    """(HF config, source, note) of the plan's model. A hub model that cannot be reached (no network, not
    in the cache) but that the built-in table of paper models knows (shapes.py) is planned from the table;
    the note says so in one line. Any other failure is the usual one line."""
    from sparse_recover.errors import ModelSourceError
    from sparse_recover.models import resolve_model_source
    from sparse_recover.shapes import builtin_config

    try:
        config, source = hf_config_offline(cfg.model.model, getattr(cfg.model, "revision", None),
                                           bool(getattr(cfg.model, "trust_remote_code", False)))
        return config, source, ""
    except ModelSourceError as exc:
        source = resolve_model_source(cfg.model.model, convert=False)
        config = builtin_config(source.spec) if source.kind == "hub" else None
        if config is None:
            raise
        return config, source, BUILTIN_SHAPE_NOTE + str(exc)


def _cell(n: int | None) -> str:
    return _fmt(n) if n else "-"


def show_scale(cfg: PipelineConfig, f: ModelFacts, selected: list[str], *,
               echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """The per-process table on 1, 2 and 8 processes (DDP and FSDP2 for finetune), the disk of each stage
    folder, and the progress snapshots' and training checkpoints' disk."""
    dtype, nb, on_gpu = scale_dtype(cfg)
    rows = scale_estimates(cfg, f, selected)
    ps = " / ".join(map(str, SCALE_PROCESSES))
    where = f"{dtype} on {ps} GPUs" if on_gpu else f"{dtype} CPU processes ({ps}); every figure is host memory"
    shard = cfg.finetune.shard if "finetune" in selected else None
    echo("")
    echo(f"per process at scale ({where}"
         + (f"; this config: finetune.shard {shard}" if shard else "") + "):")
    echo("| stage | processes | finetune | accelerator peak | host peak | disk |")
    echo("|---|---|---|---|---|---|")
    for r in rows:
        dev = _cell(r.device)
        if r.device is not None and r.offloaded is not None and r.offloaded < r.device:
            offload = getattr(cfg, r.stage).offload
            dev += " (offload)" if offload else f" (`--offload` {_fmt(r.offloaded)})"
        if r.mode == "FSDP2" and r.device is not None and r.load is not None and r.load > r.train:
            dev = f"{_fmt(r.device)} at load; training {_fmt(r.train)}"
        procs = "any P" if r.processes is None else str(r.processes)
        echo(f"| {r.stage} | {procs} | {r.mode or '-'} | {dev} | {_fmt(r.host)} | {_cell(r.disk)} |")
    snap = {e.stage: e for e in estimates(cfg, f, [s for s in selected if s in ("prune", "dsnot")], on_gpu=on_gpu,
                                          source_label=f.name)}
    for stage, e in snap.items():
        echo(f"{stage}: {_snapshot_line(stage, e.snapshot, f.n_blocks)}")
    if "finetune" in selected:
        partial = stage_disk(cfg, f, "finetune", nb)["partial"]
        echo(f"finetune: training checkpoints up to {_fmt(partial)} in .finetune.partial (the newest two and "
             "one being written; adapters and AdamW state in float32)")
        if on_gpu and any(r.mode == "FSDP2" and r.load > r.train for r in rows):
            echo("FSDP2: finetune loads the whole checkpoint onto each process's GPU before sharding it, so the "
                 "load is the peak where it exceeds the sharded training")
    single = [s for s in selected if s in SINGLE_PROCESS]
    if single:
        echo(f"({', '.join(single)} run on one process: the same row for any P; host figures are per process, "
             "a node holds P times them; prune's disk includes calib/)")
    return [r.__dict__ for r in rows]


def _verdict(cfg: PipelineConfig, e: Estimate, free: int, on_gpu: bool, f: ModelFacts) -> str:
    if not on_gpu:
        return "" if e.host <= free else f"needs {_fmt(e.host)} of host RAM, {_fmt(free)} available"
    if e.stage in ("prune", "dsnot", "reconstruct"):
        offload = getattr(cfg, e.stage).offload
        if e.device <= free:
            return "fits" + (" (with --offload)" if offload else "")
        if not offload and e.offloaded is not None and e.offloaded <= free:
            return f"needs --offload ({e.stage}.offload: true): {_fmt(e.offloaded)} with it"
        return f"does not fit in {_fmt(free)} even with offload: lower calib.nsamples or calib.seqlen"
    if e.stage in ("audit",):
        return ""
    return "fits" if e.device <= free else f"does not fit in {_fmt(free)} of GPU memory"


def _statuses(cfg: PipelineConfig, run_dir: str | None, selected: list[str]) -> dict[str, str]:
    """What `run` would do with each stage given the run directory's state (best effort)."""
    if not run_dir:
        return {s: "run" for s in selected}
    from sparse_recover.pipeline import Pipeline

    pipe = Pipeline(cfg, run_dir)
    try:
        from sparse_recover.models import resolve_model_source

        pipe.source = resolve_model_source(cfg.model.model, convert=False)
        manifest = pipe.rd.read() if pipe.rd.exists() else {"stages": {}}
    except Exception:  # noqa: BLE001 - the plan must print even for a run directory it cannot read
        return {s: "?" for s in selected}
    out = {}
    for s in selected:
        if s in ("audit", "eval"):
            out[s] = "run"
            continue
        state = pipe.state(s, manifest)
        if state == "missing" and any((pipe.rd.path / f".{s}.partial").glob("state-*.json")):
            state = "partial"  # an interrupted layer-wise pass with a progress snapshot
        out[s] = {"same": "skip", "missing": "run", "partial": "resume"}.get(state, "differs")
    return out
