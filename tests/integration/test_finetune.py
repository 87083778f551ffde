"""finetune / merge on tiny models: every adapter end to end (train, merge, audit), exact zeros, the
merge check, Alpaca data, resume after a real SIGKILL, 2 processes under `accelerate launch`, and
bad input (one line, non-zero exit, run directory untouched)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sparse_recover.adapters import ADAPTERS
from sparse_recover.config import FinetuneSection
from sparse_recover.engine.finetune import WORK_DIR
from sparse_recover.errors import RunDirError
from sparse_recover.sparsity.io import load_masks
from tests.helpers import copy_run, accelerate_finetune, QUICK, assert_clean_error, run_cli, snapshot, run_audit, run_finetune, run_merge

pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method", list(ADAPTERS))
def test_finetune_merge_audit(pruned_runs, tmp_path, train_file, method, family):
    run = copy_run(pruned_runs[family], tmp_path / "run")
    targets = ["c_attn", "c_proj", "c_fc"] if family == "gpt2" else FinetuneSection().targets
    section = FinetuneSection(method=method, data=str(train_file), targets=targets, rank=8, **QUICK)
    prune_before = snapshot(run / "prune")
    entry = run_finetune(section, str(run), device="cpu")
    assert entry["train"]["steps"] == 4 and entry["train"]["tokens"] > 0
    assert snapshot(run / "prune") == prune_before  # the sparse base is frozen and untouched
    files = sorted(p.name for p in (run / "finetune").iterdir())
    peft = ["peft"] if method == "lora-remask" else []  # plain LoRA: also in peft's format
    assert files == ["adapter.safetensors", "adapter_config.json", *peft, "trainer_log.json", "training_state"]
    assert not (run / WORK_DIR).exists()
    # trainable parameters = the per-method formula summed over the adapted linears
    state = load_file(str(run / "finetune" / "adapter.safetensors"))
    assert entry["trainable_params"] == sum(t.numel() for t in state.values())
    masks, _ = load_masks(run / "prune" / "masks.safetensors")
    cls = ADAPTERS[method]
    expected = sum(cls.trainable_formula(m.shape[0], m.shape[1], 8) for k, m in masks.items()
                   if any(k[: -len(".weight")].endswith(t) for t in targets))
    assert entry["trainable_params"] == expected
    merged = run_merge(run, device="cpu", ppl_seqlen=32, ppl_windows=4)
    assert merged["max_pruned_abs_delta"] == 0.0
    if method != "lora-remask":
        assert merged["ppl_check"]["agree"], merged["ppl_check"]
    # merged zeros == stored mask exactly, and the audit agrees
    weights = load_file(str(run / "merge" / "model.safetensors"))
    mmasks, meta = load_masks(run / "merge" / "masks.safetensors")
    transposed = set(json.loads(meta["transposed"]))
    for key, keep in masks.items():
        assert torch.equal(mmasks[key], keep)
        w = weights[key].t() if key in transposed else weights[key]
        assert int((w[~keep] != 0).sum()) == 0
    report = run_audit(run, stages=["merge"])
    assert report["merge"]["ok"]
    # the merge checkpoint is a plain transformers checkpoint
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run / "merge")
    assert sum(p.numel() for p in model.parameters()) > 0
    # training changed something, and merging again is a no-op that says so
    base = load_file(str(run / "prune" / "model.safetensors"))
    assert any(not torch.equal(base[k], weights[k]) for k in masks)
    before = snapshot(run)
    run_merge(run, device="cpu", ppl_seqlen=32, ppl_windows=4)  # the same merge again: a no-op
    with pytest.raises(RunDirError, match="other settings .*ppl_seqlen: 32 -> 512"):
        run_merge(run, device="cpu")  # another merge check is refused, not reported as done
    assert snapshot(run) == before


def test_alpaca_json_instructions(pruned_runs, tmp_path):
    rows = [{"instruction": f"Add {i} and {i + 1}.", "input": "" if i % 2 else f"numbers {i}",
             "output": f"The sum is {2 * i + 1}."} for i in range(40)]
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(rows))
    from sparse_recover.data import alpaca_prompt, training_data
    from sparse_recover.models import load_tokenizer

    tok = load_tokenizer(str(pruned_runs["llama"] / "prune"))
    td = training_data(str(data), tok, seqlen=256, train_on_inputs=False, val_size=4)
    assert td.kind == "instruct" and len(td.train) == 36 and len(td.val) == 4
    ids, labels = td.train[0]
    assert ids[-1] == tok.eos_token_id and -100 in labels and labels[-1] == ids[-1]
    assert "### Response:" in alpaca_prompt("x") and "### Input:" in alpaca_prompt("x", "y")
    run = copy_run(pruned_runs["llama"], tmp_path / "run")
    section = FinetuneSection(method="spp", data=str(data), **{**QUICK, "max_train_samples": None, "val_size": 4, "seqlen": 256})
    entry = run_finetune(section, str(run), device="cpu")
    assert entry["data"]["kind"] == "instruct" and entry["resolved"]["scaling"] == 2.0


def test_resume_after_sigkill_matches_uninterrupted(pruned_runs, tmp_path, train_file):
    args = ["finetune", "--method", "lors", "--data", train_file, "--seqlen", "32", "--max-steps", "6",
            "--batch-size", "4", "--micro-batch-size", "2", "--save-every", "2", "--eval-every", "6",
            "--val-size", "8", "--max-train-samples", "64", "--init-samples", "8", "--lr", "5e-3", "--device", "cpu"]
    cache = tmp_path / "cache"
    full = copy_run(pruned_runs["llama"], tmp_path / "full")
    killed = copy_run(pruned_runs["llama"], tmp_path / "killed")
    ok = run_cli([*args, "--run-dir", full], tmp_path, cache)
    assert ok.returncode == 0, ok.stderr[-2000:]
    res = run_cli([*args, "--run-dir", killed], tmp_path, cache, env={"SPARSE_RECOVER_KILL_AFTER_STEP": "3"})
    assert res.returncode == -9  # really killed
    assert not (killed / "finetune").exists() and (killed / WORK_DIR / "checkpoint-2").is_dir()
    again = run_cli([*args, "--run-dir", killed], tmp_path, cache)  # without --resume: refuses, nothing lost
    assert_clean_error(again, 5, ["--resume"])
    assert (killed / WORK_DIR / "checkpoint-2").is_dir()
    other = run_cli([*args, "--run-dir", killed, "--resume", "--max-steps", "7"], tmp_path, cache)
    assert "max_steps: stored 6, given 7" in assert_clean_error(other, 2, ["--resume"])
    # --resume alone continues with the interrupted run's stored settings (the README's command)
    resumed = run_cli(["finetune", "--run-dir", killed, "--resume", "--device", "cpu"], tmp_path, cache)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_file(str(full / "finetune" / "adapter.safetensors"))
    b = load_file(str(killed / "finetune" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    manifest = json.loads((killed / "manifest.json").read_text())
    assert manifest["stages"]["finetune"]["train"]["resumed_from"] == 2


def test_two_processes_equal_one(pruned_runs, tmp_path, train_file):
    args = ["--method", "lors", "--data", train_file, "--seqlen", "32", "--max-steps", "3", "--batch-size", "4",
            "--micro-batch-size", "1", "--eval-every", "3", "--val-size", "8", "--max-train-samples", "32",
            "--init-samples", "8", "--lr", "5e-3", "--device", "cpu"]
    one = copy_run(pruned_runs["llama"], tmp_path / "one")
    two = copy_run(pruned_runs["llama"], tmp_path / "two")
    cache = tmp_path / "cache"
    res = run_cli(["finetune", *args, "--run-dir", one], tmp_path, cache)
    assert res.returncode == 0, res.stderr[-2000:]
    proc = accelerate_finetune(args, two, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    entry = json.loads((two / "manifest.json").read_text())["stages"]["finetune"]
    assert entry["world_size"] == 2
    a = load_file(str(one / "finetune" / "adapter.safetensors"))
    b = load_file(str(two / "finetune" / "adapter.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-4)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(pruned_runs, tmp_path, train_file):
    from sparse_recover.errors import NumericalError

    run = copy_run(pruned_runs["llama"], tmp_path / "run")
    section = FinetuneSection(method="lora-remask", data=str(train_file),
                              **{**QUICK, "lr": 1e30, "save_every": 1, "max_steps": 6, "max_grad_norm": None})
    with pytest.raises(NumericalError, match="checkpoint"):
        run_finetune(section, str(run), device="cpu")
    assert not (run / "finetune").exists()
    assert any(p.name.startswith("checkpoint-") for p in (run / WORK_DIR).iterdir())


# ------------------------------------------------------------------------------------------ bad input


def _rows_missing_output(tmp: Path) -> str:
    path = tmp / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "input": "d"}\n')
    return str(path)


def _empty_after_filter(tmp: Path) -> str:
    path = tmp / "tiny.txt"
    path.write_text("hi")
    return str(path)


BAD = {
    "unknown-method": (["--method", "dora"], 2, ["unknown finetune method", "lors"]),
    "target-matches-nothing": (["--targets", "q_proj,nonsense_proj"], 2, ["nonsense_proj", "available"]),
    "rank-too-large": (["--rank", "4096"], 2, ["rank 4096", "width"]),
    "rows-missing-field": ("rows", 4, ["row 2", "output"]),
    "empty-dataset": ("empty", 4, ["usable example"]),
    "resume-without-checkpoint": (["--resume"], 5, ["no interrupted"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_finetune_bad_input(pruned_runs, tmp_path, train_file, case):
    extra, code, needles = BAD[case]
    run = copy_run(pruned_runs["llama"], tmp_path / "run")
    if extra == "rows":
        extra = ["--data", _rows_missing_output(tmp_path)]
    elif extra == "empty":
        extra = ["--data", _empty_after_filter(tmp_path)]
    args = ["finetune", "--run-dir", run, "--data", train_file, "--max-steps", "2", "--seqlen", "32",
            "--device", "cpu", *extra]
    before = snapshot(run)
    res = run_cli(args, tmp_path, tmp_path / "cache")
    assert_clean_error(res, code, needles)
    assert snapshot(run) == before


def test_finetune_and_merge_need_their_inputs(tmp_path, pruned_runs):
    empty = tmp_path / "nothing"
    res = run_cli(["finetune", "--run-dir", empty], tmp_path, tmp_path / "cache")
    assert_clean_error(res, 5, ["sparse-recover prune"])
    assert not empty.exists()
    run = copy_run(pruned_runs["llama"], tmp_path / "run")
    before = snapshot(run)
    res = run_cli(["merge", "--run-dir", run], tmp_path, tmp_path / "cache")
    assert_clean_error(res, 5, ["finetune"])
    assert snapshot(run) == before
