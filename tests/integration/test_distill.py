"""finetune --distill kl|squarehead on tiny models: alpha 0 is plain fine-tuning bit for bit (every adapter),
the losses restated by hand, LoRS + KL trains, merges and passes the audit, the guard and --resume know the
distillation settings, resume after SIGKILL and 2 processes under `accelerate launch` match, and bad input
(one line, the documented exit code, run directory untouched)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sparse_recover.adapters import ADAPTERS
from sparse_recover.config import FinetuneSection
from sparse_recover.engine.finetune import WORK_DIR
from sparse_recover.errors import ConfigError, ModelSourceError, RunDirError
from sparse_recover.sparsity.io import load_masks
from tests.helpers import (copy_run, accelerate_finetune, QUICK, assert_clean_error, build_model, make_config, make_tokenizer, run_audit,
                           run_cli, run_finetune, run_merge, snapshot)

pytestmark = pytest.mark.usefixtures("one_thread")

CLI_ARGS = ["--method", "lors", "--seqlen", "32", "--batch-size", "4", "--micro-batch-size", "2",
            "--val-size", "8", "--max-train-samples", "64", "--init-samples", "8", "--lr", "5e-3", "--device", "cpu"]


@pytest.fixture(scope="module")
def plain_adapters(pruned_runs, train_file, tmp_path_factory):
    """method -> (adapters, history) of plain fine-tuning (no distillation), computed once."""
    cache: dict[str, tuple] = {}

    def get(method: str):
        if method not in cache:
            run = copy_run(pruned_runs["llama"], tmp_path_factory.mktemp(f"plain-{method}") / "run")
            run_finetune(FinetuneSection(method=method, data=str(train_file), **QUICK), str(run), device="cpu")
            cache[method] = (adapters_of(run), history_of(run))
        return cache[method]

    return get


def adapters_of(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "finetune" / "adapter.safetensors"))


def history_of(run: Path) -> list[dict]:
    return json.loads((run / "finetune" / "trainer_log.json").read_text())["history"]


def assert_bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------ alpha = 0


@pytest.mark.parametrize("method,distill", [(m, "kl") for m in ADAPTERS] + [("lors", "squarehead")])
def test_alpha_zero_is_plain_finetuning_bit_for_bit(pruned_runs, plain_adapters, train_file, tmp_path, method,
                                                    distill):
    run = copy_run(pruned_runs["llama"], tmp_path / "run")
    section = FinetuneSection(method=method, data=str(train_file), distill=distill, distill_alpha=0.0, **QUICK)
    entry = run_finetune(section, str(run), device="cpu")
    assert entry["distill"]["kind"] == distill and entry["distill"]["teacher"] == "dense"
    adapters, history = plain_adapters(method)
    assert_bit_equal(adapters_of(run), adapters)
    ours = history_of(run)
    assert [h["loss"] for h in ours] == [h["loss"] for h in history]
    assert all(h["kl"] > 0 and h["ce"] == pytest.approx(h["loss"], abs=2e-6) for h in ours)  # the CE alone
    assert ("squarehead" in ours[0]) == (distill == "squarehead")


# ------------------------------------------------------------------------------------------ the losses by hand


def _hand_kl(student_logits, teacher_logits, labels, temperature):
    """T^2 * KL(teacher || student) summed per position whose next token carries a label, over their count."""
    total, count = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            if labels[b, t + 1] == -100:
                continue
            p = torch.softmax(teacher_logits[b, t].double() / temperature, -1)
            q = torch.softmax(student_logits[b, t].double() / temperature, -1)
            total += float((p * (p.log() - q.log())).sum())
            count += 1
    return temperature ** 2 * total / count


def test_losses_restated_by_hand(pruned_runs, tiny_models):
    from sparse_recover.models import load_model
    from sparse_recover.train import pad_batch
    from sparse_recover.train.distill import Distiller, DistillSettings, kl_loss

    student = load_model(str(pruned_runs["llama"] / "prune"), dtype=torch.float32)
    teacher = load_model(str(tiny_models["llama"]), dtype=torch.float32)
    for m in (student, teacher):  # the final norm out of the way: hidden_states[1:] are then the block outputs
        m.model.norm = torch.nn.Identity()
        with torch.no_grad():  # sharper softmaxes: a KL well above float32 rounding
            m.lm_head.weight.mul_(8)
    g = torch.Generator().manual_seed(3)
    rows = torch.randint(3, 500, (3, 13), generator=g).tolist()
    examples = [(rows[0], rows[0]), (rows[1][:9], [-100] * 4 + rows[1][4:9]), (rows[2], [-100] * 6 + rows[2][6:])]
    batch = pad_batch(examples, pad_id=2)
    labels = batch["labels"]
    alpha, temp = 0.3, 2.0
    with torch.no_grad():
        s_out = student(**batch, output_hidden_states=True)
        t_out = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    hand_kl = _hand_kl(s_out.logits, t_out.logits, labels, temp)
    assert float(kl_loss(s_out.logits, t_out.logits, labels, temp)) == pytest.approx(hand_kl, rel=1e-5)
    # SquareHead: per block MSE(h_s, h_t) / Var(h_t) over the label positions, averaged over the blocks
    pos = labels[:, 1:] != -100
    blocks = []
    for hs, ht in zip(s_out.hidden_states[1:], t_out.hidden_states[1:]):
        s, t = hs[:, :-1][pos].double(), ht[:, :-1][pos].double()
        blocks.append(float(((s - t) ** 2).mean() / ((t - t.mean()) ** 2).mean()))
    hand_sq = sum(blocks) / len(blocks)
    logits = s_out.logits[:, :-1].reshape(-1, s_out.logits.shape[-1]).double()
    hand_ce = float(torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100))
    for kind, hand_kd in (("kl", hand_kl), ("squarehead", hand_kl + hand_sq)):
        distiller = Distiller(teacher, student, DistillSettings(kind, alpha, temp))
        with torch.no_grad():
            loss, parts = distiller.loss(student, batch)
        distiller.close()
        assert float(parts["ce"]) == pytest.approx(hand_ce, rel=1e-5)
        assert float(parts["kl"]) == pytest.approx(hand_kl, rel=1e-5)
        if kind == "squarehead":
            assert float(parts["squarehead"]) == pytest.approx(hand_sq, rel=1e-5)
        assert float(loss) == pytest.approx((1 - alpha) * hand_ce + alpha * hand_kd, rel=1e-5)
    assert not any(p.requires_grad for p in teacher.parameters())


# ------------------------------------------------------------------------------------------ end to end


def _kl_to_teacher(checkpoint: Path, teacher: Path) -> float:
    """KL(teacher || model) on 8 held-out wiki-en windows of 32 tokens."""
    from sparse_recover.data import wiki_en_part
    from sparse_recover.models import load_model, load_tokenizer
    from sparse_recover.train import pad_batch
    from sparse_recover.train.distill import kl_loss

    tok = load_tokenizer(str(teacher))
    batch = pad_batch([(ids[:32], ids[:32]) for ids in tok(wiki_en_part("eval")[:8])["input_ids"]], pad_id=2)
    with torch.no_grad():
        logits = [load_model(str(p), dtype=torch.float32)(**batch).logits for p in (checkpoint, teacher)]
    return float(kl_loss(logits[0], logits[1], batch["labels"]))


def test_lors_kl_trains_merges_and_keeps_every_zero(pruned_runs, tiny_models, train_file, tmp_path):
    run = copy_run(pruned_runs["llama"], tmp_path / "run")
    section = FinetuneSection(method="lors", data=str(train_file), distill="kl", **{**QUICK, "lr": 1e-3})
    entry = run_finetune(section, str(run), device="cpu")
    assert entry["config"]["distill"] == "kl" and entry["config"]["distill_alpha"] == 1.0
    assert all(h["loss"] == h["kl"] for h in history_of(run))  # alpha 1: the KL alone
    merged = run_merge(run, device="cpu", ppl_seqlen=32, ppl_windows=4)
    # the student moved toward the teacher on held-out text (0.044 -> 0.038 with these seeds)
    assert _kl_to_teacher(run / "merge", tiny_models["llama"]) < 0.9 * _kl_to_teacher(run / "prune", tiny_models["llama"])
    assert merged["max_pruned_abs_delta"] == 0.0 and merged["ppl_check"]["agree"]
    weights = load_file(str(run / "merge" / "model.safetensors"))
    masks, _ = load_masks(run / "prune" / "masks.safetensors")
    assert sum(int((weights[k][~keep] != 0).sum()) for k, keep in masks.items()) == 0
    assert run_audit(run, stages=["merge"])["merge"]["ok"]
    # the distillation settings are part of the stage: the same again is a no-op, others are refused
    before = snapshot(run)
    run_finetune(section, str(run), device="cpu")
    for change, needle in (({"distill_alpha": 0.5}, "distill_alpha: 1.0 -> 0.5"), ({"distill": "none"}, "distill: 'kl' -> 'none'"),
                           ({"teacher": "prune"}, "teacher: 'dense' -> 'prune'")):
        with pytest.raises(RunDirError, match=needle):
            run_finetune(section.model_copy(update=change), str(run), device="cpu")
    assert snapshot(run) == before


def test_squarehead_on_gpt2_blocks(pruned_runs, train_file, tmp_path):
    run = copy_run(pruned_runs["gpt2"], tmp_path / "run")
    section = FinetuneSection(method="spp", data=str(train_file), targets=["c_attn", "c_proj", "c_fc"], rank=8,
                              distill="squarehead", distill_alpha=0.5, teacher_device="cpu", **QUICK)
    run_finetune(section, str(run), device="cpu")
    last = history_of(run)[-1]
    assert last["squarehead"] > 0 and last["loss"] == pytest.approx(
        0.5 * last["ce"] + 0.5 * (last["kl"] + last["squarehead"]), abs=1e-5)


def test_resume_after_sigkill_matches_uninterrupted_with_kl(pruned_runs, tmp_path, train_file):
    args = ["finetune", *CLI_ARGS, "--data", train_file, "--max-steps", "6", "--save-every", "2", "--eval-every", "6",
            "--distill", "kl", "--distill-alpha", "0.7", "--distill-temperature", "2"]
    cache = tmp_path / "cache"
    full = copy_run(pruned_runs["llama"], tmp_path / "full")
    killed = copy_run(pruned_runs["llama"], tmp_path / "killed")
    ok = run_cli([*args, "--run-dir", full], tmp_path, cache)
    assert ok.returncode == 0, ok.stderr[-2000:]
    res = run_cli([*args, "--run-dir", killed], tmp_path, cache, env={"SPARSE_RECOVER_KILL_AFTER_STEP": "3"})
    assert res.returncode == -9  # really killed
    assert (killed / WORK_DIR / "checkpoint-2").is_dir()
    stored = json.loads((killed / WORK_DIR / "config.json").read_text())["resolved"]
    plain = FinetuneSection(**{k: v for k, v in stored.items() if k in FinetuneSection.model_fields})
    with pytest.raises(ConfigError, match="distill: stored 'kl', given 'none'"):
        run_finetune(plain.model_copy(update={"distill": "none"}), str(killed), device="cpu", resume=True)
    resumed = run_cli(["finetune", "--run-dir", killed, "--resume", "--device", "cpu"], tmp_path, cache)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_bit_equal(adapters_of(killed), adapters_of(full))
    entry = json.loads((killed / "manifest.json").read_text())["stages"]["finetune"]
    assert entry["train"]["resumed_from"] == 2
    assert entry["config"]["distill_temperature"] == 2.0 and entry["distill"]["alpha"] == 0.7


def test_two_processes_equal_one_with_kl(pruned_runs, tmp_path, train_file):
    args = [*CLI_ARGS, "--data", train_file, "--max-steps", "2", "--micro-batch-size", "1", "--eval-every", "2",
            "--max-train-samples", "32", "--distill", "kl", "--distill-alpha", "0.5"]
    one = copy_run(pruned_runs["llama"], tmp_path / "one")
    two = copy_run(pruned_runs["llama"], tmp_path / "two")
    res = run_cli(["finetune", *args, "--run-dir", one], tmp_path, tmp_path / "cache")
    assert res.returncode == 0, res.stderr[-2000:]
    proc = accelerate_finetune(args, two, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((two / "manifest.json").read_text())["stages"]["finetune"]["world_size"] == 2
    a, b = adapters_of(one), adapters_of(two)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-4)
    for h1, h2 in zip(history_of(one), history_of(two)):
        assert h1["kl"] == pytest.approx(h2["kl"], rel=1e-4)


# ------------------------------------------------------------------------------------------ bad input


def _teacher_folder(path: Path, *, vocab: int | None = None, layers: int = 2, extra_token: bool = False) -> Path:
    from transformers import AutoModelForCausalLM

    tok = make_tokenizer()
    if extra_token:
        tok.add_tokens(["<another-vocabulary>"])
    if vocab is None:
        build_model("llama", layers=layers).save_pretrained(path)
    else:
        AutoModelForCausalLM.from_config(make_config("llama", vocab=vocab)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


BAD = {
    "teacher-missing": (["--teacher", "/nonexistent/teacher"], 3, ["teacher", "/nonexistent/teacher"]),
    "teacher-other-tokenizer": ("other-tokenizer", 2, ["tokenizer"]),
    "alpha-above-one": (["--distill-alpha", "1.5"], 2, ["--distill-alpha"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_distill_bad_input_cli(pruned_runs, tmp_path, train_file, case):
    extra, code, needles = BAD[case]
    if extra == "other-tokenizer":
        extra = ["--teacher", _teacher_folder(tmp_path / "teacher", extra_token=True)]
    run = copy_run(pruned_runs["llama"], tmp_path / "run")
    before = snapshot(run)
    res = run_cli(["finetune", "--run-dir", run, "--data", train_file, "--max-steps", "2", "--seqlen", "32",
                   "--device", "cpu", "--distill", "kl", *extra], tmp_path, tmp_path / "cache")
    assert_clean_error(res, code, needles)
    assert snapshot(run) == before


def test_distill_bad_input_library(pruned_runs, tmp_path, train_file):
    run = copy_run(pruned_runs["llama"], tmp_path / "run")
    before = snapshot(run)
    section = FinetuneSection(data=str(train_file), distill="kl", **QUICK)
    cases = [
        ({"teacher": str(_teacher_folder(tmp_path / "vocab", vocab=600))}, ConfigError, "vocabulary size \\(600\\)"),
        ({"teacher": str(_teacher_folder(tmp_path / "deep", layers=3)), "distill": "squarehead"}, ConfigError,
         "number of decoder blocks \\(3\\)"),
        ({"teacher": "merge"}, RunDirError, "no completed merge stage"),
        ({"teacher": "some-org/unreachable-teacher"}, ModelSourceError, "teacher some-org/unreachable-teacher"),
        ({"teacher_device": "tpu"}, ValueError, "teacher device"),
    ]
    for change, error, needle in cases:
        with pytest.raises(error, match=needle):
            run_finetune(FinetuneSection(**{**section.model_dump(), **change}), str(run), device="cpu")
    assert snapshot(run) == before
