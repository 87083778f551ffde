"""Learning-rate schedules: linear warmup from 0, then linear or cosine decay to min_lr, or constant.

`cosine` and `constant` are transformers' own (`get_cosine_with_min_lr_schedule_with_warmup`,
`get_constant_schedule_with_warmup`): their multipliers are bit-identical to this project's earlier formula
`floor + (1 - floor) * decay`, so loss curves repeat bit for bit.

`linear` stays our own, `linear_factor`, for two reasons: transformers has no linear decay to a non-zero
min_lr (`get_polynomial_decay_schedule_with_warmup(power=1, lr_end=min_lr)` rounds differently), and even
with min_lr = 0 `get_linear_schedule_with_warmup` computes (total - step) / (total - warmup), which differs
from 1 - (step - warmup) / (total - warmup) in the last bit at about a third of the steps.
"""

from __future__ import annotations

from functools import partial

from sparse_recover.errors import ConfigError

SCHEDULES = ("linear", "cosine", "constant")


def linear_factor(step: int, *, total: int, warmup: int, floor: float) -> float:
    """Linear warmup over `warmup` steps, then linear decay from 1 to `floor` (= min_lr / lr) at `total`."""
    if warmup and step < warmup:
        return step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    progress = min(max(progress, 0.0), 1.0)
    return floor + (1.0 - floor) * (1.0 - progress)


def build_scheduler(optimizer, kind: str, total: int, warmup: int, floor: float):
    """A `LambdaLR` over `optimizer` for `total` optimizer steps, `warmup` of them warming up linearly."""
    from torch.optim.lr_scheduler import LambdaLR
    from transformers import get_constant_schedule_with_warmup, get_cosine_with_min_lr_schedule_with_warmup

    if kind == "linear":
        return LambdaLR(optimizer, partial(linear_factor, total=total, warmup=warmup, floor=floor))
    if kind == "cosine":
        return get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup, total, min_lr_rate=floor)
    if kind == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup)
    raise ConfigError(f"unknown schedule {kind!r}: choose one of {', '.join(SCHEDULES)}")


def lr_factor(step: int, total: int, warmup: int, kind: str, floor: float) -> float:
    """Multiplier of the peak lr after `step` optimizer steps under `build_scheduler(kind, ...)`."""
    import torch

    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    return build_scheduler(probe, kind, total, warmup, floor).lr_lambdas[0](step)
