"""Fine-tuning sharded with FSDP2 (`--shard fsdp`) on CPU processes over gloo, launched by accelerate.

The same loss curve and final adapters as one process and as two-process DDP (rtol 1e-4), for LoRS and
SPP on the tiny LLaMA; each process holds half of the decoder blocks' weights; a SIGKILL during a
two-process sharded run followed by `--resume` ends with the adapters of an uninterrupted run; the
merged checkpoint of a sharded run audits clean.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import accelerate_finetune, assert_clean_error, copy_run, run_cli

ROOT = Path(__file__).resolve().parents[2]

DDP_YAML = ROOT / "configs" / "accelerate" / "ddp.yaml"
FSDP2_YAML = ROOT / "configs" / "accelerate" / "fsdp2.yaml"

ARGS = ["--data", None, "--seqlen", "32", "--max-steps", "4", "--batch-size", "4", "--micro-batch-size", "1",
        "--eval-every", "2", "--save-every", "2", "--val-size", "7", "--max-train-samples", "32",
        "--init-samples", "8", "--rank", "4", "--device", "cpu"]
LR = {"lors": "5e-3", "spp": "4e-3"}
# SPP's default dropout (0.05) draws from each process's RNG: P processes draw other masks than one
# process, so the comparison runs without it (the sharding itself draws nothing)


def _args(method: str, train_file) -> list[str]:
    args = list(ARGS)
    args[1] = str(train_file)
    return ["--method", method, "--lr", LR[method], "--dropout", "0", *args]


def _adapters(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "finetune" / "adapter.safetensors"))


def _curve(run: Path) -> tuple[list[float], list[float]]:
    log = json.loads((run / "finetune" / "trainer_log.json").read_text())
    return [h["loss"] for h in log["history"]], [e["eval_loss"] for e in log["evals"]]


def _assert_same_training(a: Path, b: Path, atol: float) -> None:
    """Loss curves within rtol 1e-4; adapters within rtol 1e-4 plus `atol` (one process and two sum the
    micro-batch gradients in another order: a few 1e-5 on weights of order 0.5 after four steps)."""
    la, ea = _curve(a)
    lb, eb = _curve(b)
    assert len(la) == len(lb) == 4 and len(ea) == len(eb) == 2
    torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), rtol=1e-4, atol=0)
    torch.testing.assert_close(torch.tensor(ea), torch.tensor(eb), rtol=1e-4, atol=0)
    wa, wb = _adapters(a), _adapters(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("method", ["lors", "spp"])
def test_fsdp2_two_processes_equal_one_process_and_ddp(method, pruned_runs, tmp_path, train_file):
    args = _args(method, train_file)
    one, ddp, fsdp = (copy_run(pruned_runs["llama"], tmp_path / n) for n in ("one", "ddp", "fsdp"))
    cache = tmp_path / "cache"
    res = run_cli(["finetune", *args, "--run-dir", one], tmp_path, cache)
    assert res.returncode == 0, res.stderr[-2000:]
    res = accelerate_finetune(args, ddp, tmp_path, config_file=DDP_YAML)  # the shipped launch configs
    assert res.returncode == 0, res.stderr[-3000:]
    res = accelerate_finetune([*args, "--shard", "fsdp"], fsdp, tmp_path, config_file=FSDP2_YAML)
    assert res.returncode == 0, res.stderr[-3000:]

    entry = json.loads((fsdp / "manifest.json").read_text())["stages"]["finetune"]
    assert entry["world_size"] == 2 and entry["shard"]["kind"] == "fsdp2" and entry["shard"]["processes"] == 2
    # each process holds half of the decoder blocks' weights (every weight's rows split in two)
    total = entry["shard"]["decoder_bytes"]
    held = entry["shard"]["decoder_bytes_per_process"]
    assert len(held) == 2 and sum(held) == total and max(held) == total // 2
    assert "shard" not in json.loads((ddp / "manifest.json").read_text())["stages"]["finetune"]

    _assert_same_training(one, fsdp, atol=1e-4)
    _assert_same_training(ddp, fsdp, atol=1e-6)

    if method == "lors":  # the sharded run's adapters merge on one process without reviving a pruned weight
        merged = run_cli(["merge", "--run-dir", fsdp, "--device", "cpu", "--ppl-windows", "2"], tmp_path, cache)
        assert merged.returncode == 0, merged.stderr[-2000:]
        audit = run_cli(["audit", "--run-dir", fsdp, "--stage", "merge"], tmp_path, cache)
        assert audit.returncode == 0, audit.stderr[-2000:] + audit.stdout[-2000:]


def test_fsdp2_sigkill_then_resume_equals_uninterrupted(pruned_runs, tmp_path, train_file):
    args = [*_args("lors", train_file), "--shard", "fsdp"]
    full, killed = (copy_run(pruned_runs["llama"], tmp_path / n) for n in ("full", "killed"))
    res = accelerate_finetune(args, full, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    res = accelerate_finetune(args, killed, tmp_path, env={"SPARSE_RECOVER_KILL_AFTER_STEP": "3"})
    assert res.returncode != 0
    work = killed / ".finetune.partial"
    assert not (killed / "finetune").exists() and (work / "checkpoint-2").is_dir()
    # the checkpoint has the unsharded layout: whole adapter tensors
    saved = load_file(str(work / "checkpoint-2" / "adapter.safetensors"))
    assert all(v.shape == _adapters(full)[k].shape for k, v in saved.items())
    res = accelerate_finetune([*args, "--resume"], killed, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = _adapters(full), _adapters(killed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)
    entry = json.loads((killed / "manifest.json").read_text())["stages"]["finetune"]
    assert entry["train"]["resumed_from"] == 2 and entry["shard"]["processes"] == 2


def test_fsdp2_on_one_process_runs_the_sharded_path(pruned_runs, tmp_path, train_file):
    run = copy_run(pruned_runs["llama"], tmp_path / "run")
    res = run_cli(["finetune", *_args("spp", train_file), "--shard", "fsdp", "--run-dir", run], tmp_path,
                  tmp_path / "cache")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "holds the whole model" in res.stdout
    entry = json.loads((run / "manifest.json").read_text())["stages"]["finetune"]
    assert entry["shard"]["processes"] == 1
    assert entry["shard"]["decoder_bytes_per_process"] == [entry["shard"]["decoder_bytes"]]


def test_unknown_shard_is_one_line(pruned_runs, tmp_path, train_file):
    run = copy_run(pruned_runs["llama"], tmp_path / "run")
    before = sorted(p.name for p in run.iterdir())
    res = run_cli(["finetune", *_args("lors", train_file), "--shard", "zero3", "--run-dir", run], tmp_path,
                  tmp_path / "cache")
    assert_clean_error(res, 2, ["shard", "fsdp"])
    assert sorted(p.name for p in run.iterdir()) == before


# ------------------------------------------------------------------------------------------ trackers


def test_report_to_tensorboard_logs_loss_lr_and_held_out_loss(pruned_runs, tmp_path, train_file):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = copy_run(pruned_runs["llama"], tmp_path / "run")
    res = run_cli(["finetune", *_args("lors", train_file), "--report-to", "tensorboard", "--run-dir", run], tmp_path,
                  tmp_path / "cache")
    assert res.returncode == 0, res.stderr[-2000:]
    events = list((run / "logs" / "tensorboard").rglob("events.out.tfevents.*"))
    assert events, sorted(p.name for p in (run / "logs").rglob("*"))
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/tokens_per_s", "eval/loss"} <= tags
    losses = [e.value for e in acc.Scalars("train/loss")]
    _, evals = _curve(run)
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(_curve(run)[0]), rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.tensor([e.value for e in acc.Scalars("eval/loss")]), torch.tensor(evals),
                               rtol=1e-6, atol=0)


def test_report_to_without_the_package_is_one_line(pruned_runs, tmp_path, train_file):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    run = copy_run(pruned_runs["llama"], tmp_path / "run")
    before = sorted(p.name for p in run.iterdir())
    res = run_cli(["finetune", *_args("lors", train_file), "--report-to", "wandb", "--run-dir", run], tmp_path,
                  tmp_path / "cache")
    assert_clean_error(res, 2, ["pip install wandb"])
    assert sorted(p.name for p in run.iterdir()) == before


def test_fsdp2_with_squarehead_distillation_equals_ddp(pruned_runs, tmp_path, train_file):
    """The teacher stays whole (frozen, no_grad) next to the sharded student; SquareHead's hooks on the
    student's decoder blocks see the same outputs as under DDP."""
    args = [*_args("lors", train_file), "--distill", "squarehead", "--distill-alpha", "0.5"]
    ddp, fsdp = (copy_run(pruned_runs["llama"], tmp_path / n) for n in ("ddp", "fsdp"))
    res = accelerate_finetune(args, ddp, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    res = accelerate_finetune([*args, "--shard", "fsdp"], fsdp, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    _assert_same_training(ddp, fsdp, atol=1e-6)
    log = json.loads((fsdp / "finetune" / "trainer_log.json").read_text())
    assert all("squarehead" in h and "kl" in h for h in log["history"])


# ------------------------------------------------------------------------------------------ peft format


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lora_remask_adapters_load_in_peft(family, pruned_runs, tmp_path, train_file):
    """RUN/finetune/peft loads with PeftModel.from_pretrained onto the sparse stage; peft's merged weight times
    the stored mask is the merge stage's weight."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sparse_recover.sparsity.io import load_masks

    run = copy_run(pruned_runs[family], tmp_path / "run")
    args = ["--method", "lora-remask", "--lr", "5e-2", *ARGS[:1], str(train_file), *ARGS[2:]]
    if family == "gpt2":
        args += ["--targets", "c_attn,c_fc"]
    res = run_cli(["finetune", *args, "--run-dir", run], tmp_path, tmp_path / "cache")
    assert res.returncode == 0, res.stderr[-2000:]
    res = run_cli(["merge", "--run-dir", run, "--device", "cpu", "--ppl-windows", "2"], tmp_path, tmp_path / "cache")
    assert res.returncode == 0, res.stderr[-2000:]
    base = AutoModelForCausalLM.from_pretrained(str(run / "prune"), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(run / "finetune" / "peft"))
    merged_by_peft = peft_model.merge_and_unload().state_dict()
    ours = AutoModelForCausalLM.from_pretrained(str(run / "merge"), dtype=torch.float32).state_dict()
    masks, _ = load_masks(run / "prune" / "masks.safetensors")
    for name, keep in masks.items():
        w = merged_by_peft[name]
        keep = keep.t() if family == "gpt2" else keep  # GPT-2's Conv1D stores (in, out)
        torch.testing.assert_close(w * keep, ours[name], rtol=1e-5, atol=1e-6, msg=name)
    adapted = json.loads((run / "finetune" / "peft" / "adapter_config.json").read_text())["target_modules"]
    assert adapted and all(f"{t}.weight" in masks for t in adapted)
