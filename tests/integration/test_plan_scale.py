"""The dry-run plan at scale: per-process peaks on 1, 2 and 8 GPUs (DDP and FSDP2 for finetune) and the disk
of each stage, for the shipped paper configs with no hub access (their shapes from sparse_recover/shapes.py),
and the FSDP2 estimate against what a real two-process sharded run holds.

Every expected figure is computed here from the model's shape or measured; none is typed in.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.helpers import accelerate_finetune, copy_run

ROOT = Path(__file__).resolve().parents[2]
PAPERS = ROOT / "configs" / "papers"
LLAMA2_70B = PAPERS / "spp" / "table7-llama2-70b-wanda-2of4.yaml"  # prune, SPP finetune, merge, eval
LLAMA_7B = PAPERS / "spp" / "table2-llama7b-wanda-2of4.yaml"
GIB = 2**30

pytestmark = pytest.mark.usefixtures("one_thread")


def _dry_run(path: Path) -> tuple[dict, list[str]]:
    """`run PATH --dry-run` in this process (conftest keeps the hub offline): the plan and its lines."""
    from sparse_recover.pipeline import dry_run, load_pipeline, select

    cfg = load_pipeline(str(path))
    lines: list[str] = []
    plan = dry_run(cfg, None, select(cfg, None, None), echo=lines.append)
    return plan, lines


def _rows(lines: list[str]) -> dict[tuple[str, str, str], list[str]]:
    """The at-scale table's rows: (stage, processes, finetune mode) -> the row's cells."""
    out = {}
    for line in lines:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 6 and cells[0] != "stage":
            out[(cells[0], cells[1], cells[2])] = cells
    return out


def _gib(cell: str) -> float:
    value, unit = re.match(r"([\d.]+) (GiB|MiB)", cell).groups()
    return float(value) * (1 if unit == "GiB" else 1 / 1024)


@pytest.fixture(scope="module")
def plan_70b():
    return _dry_run(LLAMA2_70B)


def test_llama2_70b_paper_config_plans_offline_per_process(plan_70b):
    from sparse_recover.plan import BUILTIN_SHAPE_NOTE
    from sparse_recover.shapes import SHAPES

    plan, lines = plan_70b
    # the hub is off: one line says where the shape came from, and why the hub could not give it
    notes = [line for line in lines if line.startswith(BUILTIN_SHAPE_NOTE)]
    assert len(notes) == 1 and "meta-llama/Llama-2-70b-hf cannot be reached" in notes[0], lines[:3]
    assert plan["builtin_shape"]
    shape, model = SHAPES["meta-llama/Llama-2-70b-hf"], plan["model"]
    assert (model["n_blocks"], model["hidden"], model["intermediate"], model["vocab"]) == \
        (shape.num_hidden_layers, shape.hidden_size, shape.intermediate_size, shape.vocab_size)
    base = model["params"] * 2  # bfloat16
    assert 125 * GIB < base < 140 * GIB

    rows = _rows(lines)
    # single-process stages: one row each, for any P
    for stage in ("prune", "merge", "audit", "eval"):
        assert [k for k in rows if k[0] == stage] == [(stage, "any P", "-")], stage
    # finetune: 1, 2, 8 processes x DDP, FSDP2
    assert sorted(k[1:] for k in rows if k[0] == "finetune") == sorted(
        (str(p), m) for p in (1, 2, 8) for m in ("DDP", "FSDP2"))
    scale = {(r["stage"], r["processes"], r["mode"]): r for r in plan["scale"]}
    for p in (1, 2, 8):
        ddp, fsdp = scale["finetune", p, "DDP"], scale["finetune", p, "FSDP2"]
        assert ddp["device"] > 80 * GIB and ddp["parts"]["weights"] == base  # every process holds the model
        assert _gib(rows["finetune", str(p), "DDP"][3]) == pytest.approx(ddp["device"] / GIB, abs=0.01)
        # FSDP2's weights per process: 1/P of the base, plus the gathered blocks and root
        held = fsdp["parts"]["decoder shard"] + fsdp["parts"]["root shard + gathered"] + \
            fsdp["parts"]["gathered blocks"]
        assert held == pytest.approx(base / p + 2 * base / model["n_blocks"] + model["outside_blocks"] * 2,
                                     rel=0.02)
        assert fsdp["parts"]["activations"] == ddp["parts"]["activations"]  # one micro-batch per process
    eight = scale["finetune", 8, "FSDP2"]
    weights_8 = sum(v for k, v in eight["parts"].items() if k in ("decoder shard", "root shard + gathered",
                                                                  "gathered blocks"))
    assert weights_8 < base / 4 and weights_8 < 25 * GIB
    assert eight["train"] < scale["finetune", 2, "FSDP2"]["train"] < scale["finetune", 1, "FSDP2"]["train"]
    assert eight["device"] < scale["finetune", 8, "DDP"]["device"]
    # host per process: each process loads the whole checkpoint (DDP and FSDP2 alike)
    assert eight["host"] == scale["finetune", 8, "DDP"]["host"] > base
    # disk: the checkpoint stages hold the bf16 weights and bit-packed masks; finetune only the adapters
    assert base < scale["prune", None, ""]["disk"] < base * 1.1
    assert scale["merge", None, ""]["disk"] < scale["prune", None, ""]["disk"]
    assert scale["finetune", 1, "DDP"]["disk"] < 3 * GIB
    snap = [line for line in lines if line.startswith("prune: snapshot every")]
    assert len(snap) == 1 and "in .prune.partial" in snap[0]
    assert any(line.startswith("finetune: training checkpoints up to") for line in lines)


def test_fsdp2_on_eight_gpus_fits_70b_with_gradient_checkpointing(plan_70b):
    """Sharded, the checkpoint is read on the host and fully_shard moves one block at a time to the GPU: with
    gradient checkpointing and micro-batches of one, 70B trains on 8 x 80 GB, and DDP does not."""
    from sparse_recover.pipeline import load_pipeline
    from sparse_recover.plan import model_facts, scale_estimates
    from sparse_recover.shapes import builtin_config

    cfg = load_pipeline(str(LLAMA2_70B), ["finetune.gradient_checkpointing=true", "finetune.micro_batch_size=1"])
    facts = model_facts(builtin_config(cfg.model.model), cfg.model.model)
    rows = {(r.processes, r.mode): r for r in scale_estimates(cfg, facts, ["finetune"])}
    eight = rows[8, "FSDP2"]
    assert eight.load < 2 * GIB and eight.device == eight.train < 40 * GIB
    assert rows[8, "DDP"].device > 80 * GIB > eight.device
    assert rows[1, "FSDP2"].device > rows[2, "FSDP2"].device > eight.device


def test_llama_7b_paper_config_plans_offline(plan_70b):
    plan, lines = _dry_run(LLAMA_7B)
    assert plan["builtin_shape"] and plan["model"]["n_blocks"] == 32
    rows = _rows(lines)
    base = plan["model"]["params"] * 2
    assert 12 * GIB < base < 13 * GIB
    assert len([k for k in rows if k[0] == "finetune"]) == 6 and ("prune", "any P", "-") in rows
    scale = {(r["stage"], r["processes"], r["mode"]): r for r in plan["scale"]}
    assert scale["finetune", 8, "FSDP2"]["device"] < scale["finetune", 8, "DDP"]["device"] < 80 * GIB
    # smaller than the 70B in every row
    big = {(r["stage"], r["processes"], r["mode"]): r for r in plan_70b[0]["scale"]}
    for key, row in scale.items():
        if key in big and row["device"]:
            assert row["device"] < big[key]["device"], key


def test_a_small_model_keeps_one_row_per_single_process_stage(tiny_models, calib_file):
    from sparse_recover.config import validate_pipeline
    from sparse_recover.plan import show

    cfg = validate_pipeline({"model": {"model": str(tiny_models["llama"]), "device": "cpu"},
                             "calib": {"source": str(calib_file), "nsamples": 2, "seqlen": 32},
                             "prune": {"method": "wanda", "pattern": "2:4"}, "eval": {"tasks": ["ppl"]}})
    lines: list[str] = []
    plan = show(cfg, None, ["prune", "eval"], echo=lines.append)
    rows = _rows(lines)
    assert sorted(rows) == [("eval", "any P", "-"), ("prune", "any P", "-")]
    assert "CPU processes" in "\n".join(lines) and not plan["builtin_shape"]


def test_fsdp2_estimate_against_a_two_process_run(pruned_runs, train_file, tmp_path):
    """The plan's decoder-block weights per process for FSDP2 on two processes, within 2.5x of what each
    process of a real `--shard fsdp` run holds (the manifest's shard.decoder_bytes_per_process)."""
    from transformers import AutoConfig

    from sparse_recover.config import validate_pipeline
    from sparse_recover.plan import model_facts, scale_estimates

    run = copy_run(pruned_runs["llama"], tmp_path / "run")
    args = ["--method", "spp", "--dropout", "0", "--data", train_file, "--seqlen", "32", "--max-steps", "1",
            "--batch-size", "2", "--micro-batch-size", "1", "--val-size", "2", "--max-train-samples", "8",
            "--rank", "4", "--device", "cpu", "--shard", "fsdp"]
    res = accelerate_finetune(args, run, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    shard = json.loads((run / "manifest.json").read_text())["stages"]["finetune"]["shard"]
    measured = max(shard["decoder_bytes_per_process"])

    cfg = validate_pipeline({"model": {"model": str(run / "prune"), "device": "cpu"},
                             "prune": {"method": "wanda", "pattern": "2:4"},
                             "finetune": {"method": "spp", "rank": 4, "seqlen": 32, "batch_size": 2,
                                          "micro_batch_size": 1, "shard": "fsdp"}})
    facts = model_facts(AutoConfig.from_pretrained(run / "prune"), "tiny")
    row = next(r for r in scale_estimates(cfg, facts, ["finetune"], processes=(2,)) if r.mode == "FSDP2")
    estimate = row.parts["decoder shard"]
    assert measured / 2.5 <= estimate <= 2.5 * measured, (estimate, measured)


def test_every_paper_hub_model_has_a_shape_of_its_size():
    """Each hub id a paper config names is in shapes.py, and the table's shape has about the parameter count
    its name gives (7b, 13b, 70B, 8B; LLaMA "30B" is 32.5B: within 10%)."""
    import yaml

    from sparse_recover.plan import model_facts
    from sparse_recover.shapes import builtin_config

    named = set()
    for path in PAPERS.rglob("*.yaml"):
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        model = (data or {}).get("model") if isinstance(data, dict) else None
        if isinstance(model, dict) and "/" in str(model.get("model", "")):
            named.add(model["model"])
    assert named
    for spec in sorted(named):
        config = builtin_config(spec)
        assert config is not None, f"{spec} is named in configs/papers but not in sparse_recover/shapes.py"
        size = float(re.search(r"(\d+)[bB](?![a-z])", spec.split("/")[1]).group(1)) * 1e9
        params = model_facts(config, spec).params
        assert abs(params - size) < 0.1 * size, (spec, params)
