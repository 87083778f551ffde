"""One training loop on accelerate for every adapter: `loop` (the loop, the batch plan, the LoRS gradient
pass), `schedule` (learning-rate schedules), `state` (resumable checkpoints), `distill` (the teacher and the
KL / SquareHead distillation losses)."""

from sparse_recover.train.loop import (
    KILL_ENV,
    BatchPlan,
    Trainer,
    TrainResult,
    TrainSettings,
    pad_batch,
    train,
    weight_gradients,
)
from sparse_recover.train.schedule import build_scheduler, lr_factor
from sparse_recover.train.state import CHECKPOINT_PREFIX, latest_checkpoint

__all__ = ["CHECKPOINT_PREFIX", "KILL_ENV", "BatchPlan", "TrainResult", "TrainSettings", "Trainer", "build_scheduler",
           "latest_checkpoint", "lr_factor", "pad_batch", "train", "weight_gradients"]
