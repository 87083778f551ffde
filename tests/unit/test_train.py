"""The training loop's pure parts: schedules, the deterministic batch plan, padding; and adapters on
a whole tiny model (fresh adapters leave the model's outputs unchanged; only adapters get gradients)."""

from __future__ import annotations

import math

import pytest
import torch

from sparse_recover.adapters import ADAPTERS, AdapterSettings, attach_adapters
from sparse_recover.adapters.model import trainable_parameters, unload_adapters
from sparse_recover.errors import ConfigError, RunDirError
from sparse_recover.train import BatchPlan, TrainSettings, build_scheduler, lr_factor, pad_batch
from tests.helpers import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_schedules_match_the_hf_formulas():
    total, warmup = 100, 3  # ceil(0.03 * 100)
    assert lr_factor(0, total, warmup, "linear", 0.0) == 0.0
    assert lr_factor(2, total, warmup, "linear", 0.0) == pytest.approx(2 / 3)
    assert lr_factor(3, total, warmup, "linear", 0.0) == 1.0
    assert lr_factor(50, total, warmup, "linear", 0.0) == pytest.approx((100 - 50) / 97)
    assert lr_factor(100, total, warmup, "linear", 0.0) == 0.0
    assert lr_factor(50, total, warmup, "cosine", 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 47 / 97)))
    assert lr_factor(100, total, warmup, "cosine", 0.05) == pytest.approx(0.05)  # decays to min_lr / lr
    assert lr_factor(80, total, warmup, "constant", 0.0) == 1.0


def test_batch_plan_same_global_batches_on_any_process_count():
    s = TrainSettings(lr=1e-3, batch_size=8, micro_batch_size=2, epochs=2, seed=7)
    one = BatchPlan(40, s, world=1, rank=0)
    assert one.steps_per_epoch == 5 and one.total_steps == 10
    for step in range(one.total_steps):
        whole = sorted(i for mb in one.micro_batches(step) for i in mb)
        split = sorted(i for r in range(2) for mb in BatchPlan(40, s, world=2, rank=r).micro_batches(step) for i in mb)
        assert whole == split and len(whole) == 8
    epoch0 = [i for st in range(5) for mb in one.micro_batches(st) for i in mb]
    assert sorted(epoch0) == list(range(40))  # an epoch sees every example once
    assert BatchPlan(40, s, 1, 0).micro_batches(3) == one.micro_batches(3)  # a pure function of seed and step
    with pytest.raises(ConfigError):
        BatchPlan(40, TrainSettings(lr=1e-3, batch_size=6, micro_batch_size=2), world=2, rank=0)
    with pytest.raises(ConfigError):
        BatchPlan(4, s, world=1, rank=0)


def test_pad_batch_right_pads_to_multiple_of_8():
    b = pad_batch([([5, 6, 7], [5, 6, 7]), ([1] * 10, [-100] * 4 + [1] * 6)], pad_id=0)
    assert b["input_ids"].shape == (2, 16)
    assert b["attention_mask"][0].tolist() == [1, 1, 1] + [0] * 13
    assert b["labels"][0, 3:].eq(-100).all() and b["labels"][1, :4].eq(-100).all()


@pytest.mark.parametrize("method", list(ADAPTERS))
def test_fresh_adapters_on_a_model_change_nothing(method):
    model = build_model("llama")
    from sparse_recover.models import decoder_blocks, prunable_linears

    masks = {}
    name, blocks = decoder_blocks(model)
    g = torch.Generator().manual_seed(0)
    for i, block in enumerate(blocks):
        for lname, mod in prunable_linears(block).items():
            keep = torch.rand(mod.weight.shape, generator=g) > 0.5
            with torch.no_grad():
                mod.weight.mul_(keep)
            masks[f"{name}.{i}.{lname}.weight"] = keep
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=g)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    adapters = attach_adapters(model, ADAPTERS[method], masks, AdapterSettings(rank=4, scaling=2.0),
                               ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert len(adapters) == 14
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
    model.train()
    for p in trainable_parameters(adapters):
        with torch.no_grad():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    model(input_ids=ids, labels=ids).loss.backward()
    trainable = {id(p) for p in trainable_parameters(adapters)}
    for pname, p in model.named_parameters():
        assert (p.grad is not None) == (id(p) in trainable), pname
    unload_adapters(model, adapters)
    assert not any(isinstance(m, type(next(iter(adapters.values())))) for m in model.modules())


def test_lors_gradient_init_uses_the_mean_weight_gradient():
    """weight_gradients (hooks that move each gradient off the device as it arrives) equals the plain
    autograd gradient averaged over micro-batches."""
    from accelerate import Accelerator

    from sparse_recover.adapters.model import find_targets
    from sparse_recover.train import weight_gradients

    model = build_model("llama")
    g = torch.Generator().manual_seed(1)
    examples = [(ids, ids) for ids in torch.randint(0, model.config.vocab_size, (6, 12), generator=g).tolist()]
    targets = find_targets(model, ["q_proj", "down_proj"])
    got = weight_gradients(model, targets, examples, 2, 0, Accelerator(cpu=True))
    assert all(not p.requires_grad for p in model.parameters())
    model.zero_grad()
    for p in model.parameters():
        p.requires_grad_(False)
    for mod in targets.values():
        mod.weight.requires_grad_(True)
    for start in range(0, 6, 2):
        batch = pad_batch(examples[start : start + 2], 0)
        (model(**batch).loss / 3).backward()
    for name, mod in targets.items():
        torch.testing.assert_close(got[name], mod.weight.grad, rtol=1e-5, atol=1e-7)


def _old_lr_factor(step, total, warmup, kind, floor):
    """The schedule formula of the single-module train.py, restated: build_scheduler must match it bit for bit."""
    if warmup and step < warmup:
        return step / warmup
    if kind == "constant":
        return 1.0
    progress = min(max((step - warmup) / max(1, total - warmup), 0.0), 1.0)
    decay = 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return floor + (1.0 - floor) * decay


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
@pytest.mark.parametrize("warmup", [0, 2])
@pytest.mark.parametrize("min_lr", [0.0, 3e-5])
def test_schedules_give_the_earlier_lr_values_bit_for_bit(kind, warmup, min_lr):
    lr, total = 3e-4, 37
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = build_scheduler(opt, kind, total, warmup, min_lr / lr)
    got = [sched.get_last_lr()[0]]
    for _ in range(total):
        opt.step()
        sched.step()
        got.append(sched.get_last_lr()[0])
    assert got == [lr * _old_lr_factor(s, total, warmup, kind, min_lr / lr) for s in range(total + 1)]


@pytest.mark.parametrize("name", ["state.json", "adapter.safetensors", "optimizer.pt", "scheduler.pt", "rng-0.pt"])
def test_a_truncated_training_state_file_is_one_line_naming_it(tmp_path, name):
    from accelerate import Accelerator

    from sparse_recover.train.state import Progress, latest_checkpoint, load_checkpoint, save_checkpoint

    model = build_model("llama")
    adapters = attach_adapters(model, ADAPTERS["spp"], {}, AdapterSettings(rank=4, scaling=2.0), ["q_proj"])
    opt = torch.optim.AdamW(trainable_parameters(adapters), lr=1e-3)
    sched = build_scheduler(opt, "linear", 10, 1, 0.0)
    save_checkpoint(Accelerator(cpu=True), tmp_path, Progress(step=3, tokens=96), total=10, adapters=adapters,
                    optimizer=opt, scheduler=sched)
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt == tmp_path / "checkpoint-3"
    assert load_checkpoint(ckpt, 0, adapters=adapters, optimizer=opt, scheduler=sched).tokens == 96
    damaged = ckpt / name
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    with pytest.raises(RunDirError) as err:
        load_checkpoint(ckpt, 0, adapters=adapters, optimizer=opt, scheduler=sched)
    message = str(err.value)
    assert str(damaged) in message and "\n" not in message


def test_squarehead_with_gradient_checkpointing_gives_the_same_loss_and_gradients():
    """SquareHead's block hooks under gradient checkpointing: nothing is recorded outside the loss's forward
    (transformers 5 checkpoints `forward`, inside the hooks; older versions re-ran them in backward), and
    the loss and the adapters' gradients equal those without checkpointing."""
    from sparse_recover.train.distill import Distiller, DistillSettings

    teacher = build_model("llama", seed=1)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 512, (2, 16), generator=g)
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    grads, losses = [], []
    for checkpointing in (False, True):
        model = build_model("llama")
        adapters = attach_adapters(model, ADAPTERS["lors"], {}, AdapterSettings(rank=4, scaling=2.0),
                                   ["q_proj", "down_proj"])
        for p in trainable_parameters(adapters):
            with torch.no_grad():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)) * 0.01)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        distiller = Distiller(teacher, model, DistillSettings("squarehead", 0.5, 2.0))
        loss, parts = distiller.loss(model, batch)
        loss.backward()
        assert distiller.student_blocks.outputs == []  # taken by the loss; backward recorded nothing
        distiller.close()
        losses.append(float(loss.detach()))
        grads.append([p.grad.clone() for p in trainable_parameters(adapters)])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
