"""Distillation from a frozen teacher during fine-tuning: the losses and the teacher's forward.

loss = (1 - alpha) * CE + alpha * D, where
  kl:          D = T^2 * KL(teacher || student) of the temperature-T softmaxes of the logits;
  squarehead:  D = T^2 * KL + SquareHead, the mean over decoder blocks of MSE(h_s, h_t) / Var(h_t).

Every term is averaged per token over the positions whose next token carries a label (labels != -100
after the usual one-token shift), the positions the CE counts. CE is the model's own loss (the value
plain fine-tuning uses), so with alpha = 0 the loss and its gradient are plain fine-tuning's, bit for bit.

The teacher runs in eval mode under no_grad on the same micro-batch, first, so only its logits at the
label positions (and, for SquareHead, its block outputs there) live while the student runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

DISTILL_KINDS = ("none", "kl", "squarehead")
VAR_EPS = 1e-6  # a block whose teacher output is constant: divide by this instead of 0


@dataclass(frozen=True)
class DistillSettings:
    kind: str = "kl"  # kl | squarehead
    alpha: float = 1.0
    temperature: float = 1.0


def label_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, S) labels -> (B, S-1) bool: position t predicts token t+1, which carries a label."""
    return labels[:, 1:] != -100


def at_positions(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rows of a (B, S, ...) tensor at the (B, S-1) label positions, as (N, ...) on the mask's device."""
    return x[:, :-1][positions.to(x.device)].to(positions.device)


def teacher_log_probs(teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(z / T) in float32 of (N, V) teacher logits."""
    return F.log_softmax(teacher_logits.float() / temperature, dim=-1)


def kl_rows(student_logits: torch.Tensor, teacher_logp: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * mean over the N rows of KL(teacher || student); (N, V) student logits, (N, V) teacher log-probs."""
    student_logp = F.log_softmax(student_logits.float() / temperature, dim=-1)
    kl = F.kl_div(student_logp, teacher_logp, log_target=True, reduction="sum")
    return kl * (temperature ** 2) / max(student_logits.shape[0], 1)


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(teacher || student) on (B, S, V) logits, averaged over the label positions."""
    pos = label_positions(labels.to(student_logits.device))
    t = teacher_log_probs(at_positions(teacher_logits, pos), temperature)
    return kl_rows(at_positions(student_logits, pos), t, temperature)


def squarehead_loss(student_hidden: list[torch.Tensor], teacher_hidden: list[torch.Tensor],
                    labels: torch.Tensor) -> torch.Tensor:
    """SquareHead on (B, S, H) block outputs: per block MSE(h_s, h_t) / Var(h_t) over the label
    positions and hidden units, averaged over blocks. Teacher states may be given already reduced
    to the label positions ((N, H), as `Distiller` keeps them).

    Followed: Kurtic et al., "Sparse Fine-tuning for Inference Acceleration of Large Language
    Models" (arXiv:2310.06927, the Sparse-Llama recovery loss): L_feat^l = MSE(f_l^t, f_l^s) /
    Var(f_l^t), the teacher's variance making every block contribute on one scale. llm-compressor's
    `square_head` comparison (src/llmcompressor/modifiers/distillation/utils/pytorch/kd_factory.py)
    divides sum((t - s)^2) by sum(t^2) over the whole padded batch instead (the same when the
    teacher's features have mean 0) and OutputDistillationModifier averages it over the targeted
    layers; we use the paper's variance and count only the label positions, like the CE and the KL.
    """
    if len(student_hidden) != len(teacher_hidden) or not student_hidden:
        raise ValueError(f"SquareHead needs one teacher state per student block ({len(student_hidden)} student, "
                         f"{len(teacher_hidden)} teacher)")
    pos = label_positions(labels.to(student_hidden[0].device))
    terms = []
    for hs, ht in zip(student_hidden, teacher_hidden):
        s = at_positions(hs, pos).float()
        t = (ht if ht.dim() == 2 else at_positions(ht, pos)).to(s.device).float()
        if s.shape[0] == 0:
            terms.append(hs.sum() * 0.0)
            continue
        terms.append(F.mse_loss(s, t) / t.var(unbiased=False).clamp_min(VAR_EPS))
    return torch.stack(terms).mean()


class BlockOutputs:
    """Forward hooks that keep each decoder block's output of one forward (`with rec.recording():`).
    Outside that block nothing is kept, so gradient checkpointing's recomputation in backward adds
    nothing."""

    def __init__(self, model):
        from sparse_recover.models import decoder_blocks

        _, blocks = decoder_blocks(model)
        self.n_blocks = len(blocks)
        self.outputs: list[torch.Tensor] = []
        self._on = False
        self._handles = [b.register_forward_hook(self._hook) for b in blocks]

    def _hook(self, module, args, output) -> None:
        if self._on:
            self.outputs.append(output[0] if isinstance(output, (tuple, list)) else output)

    def recording(self):
        return _Recording(self)

    def take(self) -> list[torch.Tensor]:
        out, self.outputs = self.outputs, []
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class _Recording:
    def __init__(self, rec: BlockOutputs):
        self.rec = rec

    def __enter__(self):
        self.rec.outputs = []
        self.rec._on = True
        return self.rec

    def __exit__(self, *exc) -> None:
        self.rec._on = False


class Distiller:
    """The teacher (frozen, eval mode, on its own device) and the distillation loss of one micro-batch."""

    def __init__(self, teacher, student, settings: DistillSettings):
        if settings.kind not in DISTILL_KINDS[1:]:
            raise ValueError(f"unknown distillation {settings.kind!r}")
        self.teacher, self.s = teacher, settings
        teacher.eval()
        teacher.config.use_cache = False
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.device = next(teacher.parameters()).device
        self.student_blocks = self.teacher_blocks = None
        if settings.kind == "squarehead":
            self.student_blocks, self.teacher_blocks = BlockOutputs(student), BlockOutputs(teacher)
            if self.student_blocks.n_blocks != self.teacher_blocks.n_blocks:
                raise ValueError(f"SquareHead pairs decoder blocks one to one: the student has "
                                 f"{self.student_blocks.n_blocks}, the teacher {self.teacher_blocks.n_blocks}")

    def teacher_targets(self, batch: dict[str, torch.Tensor], device) -> dict[str, Any]:
        """The teacher's log-probabilities (and block outputs) at the label positions, on `device`."""
        pos = label_positions(batch["labels"]).to(self.device)
        ids, mask = batch["input_ids"].to(self.device), batch.get("attention_mask")
        mask = None if mask is None else mask.to(self.device)
        with torch.no_grad():
            if self.teacher_blocks is None:
                logits = self.teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits
                hidden = []
            else:
                with self.teacher_blocks.recording():
                    logits = self.teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits
                hidden = [at_positions(h, pos).to(device) for h in self.teacher_blocks.take()]
            logp = teacher_log_probs(at_positions(logits, pos), self.s.temperature).to(device)
        return {"logp": logp, "hidden": hidden}

    def loss(self, wrapped, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss to back-propagate, its detached parts) of one micro-batch; `wrapped` is the student
        (possibly DDP-wrapped), called exactly as plain fine-tuning calls it."""
        labels = batch["labels"]
        target = self.teacher_targets(batch, labels.device)
        if self.student_blocks is None:
            out = wrapped(**batch, use_cache=False)
        else:
            with self.student_blocks.recording():
                out = wrapped(**batch, use_cache=False)
        ce = out.loss
        pos = label_positions(labels)
        kl = kl_rows(at_positions(out.logits, pos), target["logp"], self.s.temperature)
        parts = {"ce": ce.detach(), "kl": kl.detach()}
        distill = kl
        if self.student_blocks is not None:
            sq = squarehead_loss(self.student_blocks.take(), target["hidden"], labels)
            parts["squarehead"] = sq.detach()
            distill = kl + sq
        return (1.0 - self.s.alpha) * ce + self.s.alpha * distill, parts

    def close(self) -> None:
        for rec in (self.student_blocks, self.teacher_blocks):
            if rec is not None:
                rec.remove()
