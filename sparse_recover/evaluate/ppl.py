"""Perplexity by the reference protocol (Wanda / SparseGPT / DSnoT / LoRS code):

Join the evaluation documents with "\\n\\n", tokenise the whole text once, cut it into
non-overlapping windows of `seqlen` tokens (the tail is dropped), evaluate each window on its own,
loss_k = mean cross-entropy over its seqlen-1 next-token predictions, PPL = exp(mean_k loss_k)
(the reference writes it as exp(sum_k loss_k * seqlen / (n * seqlen)), the same number).
Windows may be batched: each window's loss is computed separately, so batching changes nothing
but float rounding.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from sparse_recover.errors import DataError


AUTO_LOGITS_BYTES = 1 << 30  # `batch_size auto`: windows per forward whose float32 logits (+ CE) fit 1 GiB
AUTO_MAX_WINDOWS = 8


def auto_batch_size(seqlen: int, vocab_size: int) -> int:
    """Windows per forward for `batch_size auto`: as many as keep the float32 logits and the cross-entropy's
    log-softmax of one batch within AUTO_LOGITS_BYTES, at most AUTO_MAX_WINDOWS (SmolLM2 at 512 tokens: 5;
    a 32k vocabulary at 2048 tokens: 2). Batching changes nothing but float rounding (each window's loss
    is its own), and on a 2-core CPU 4-8 windows per forward run about twice as fast as one at a time
    (scripts/bench_eval.py)."""
    per_window = 2 * seqlen * max(1, vocab_size) * 4
    return max(1, min(AUTO_MAX_WINDOWS, AUTO_LOGITS_BYTES // per_window))


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt").input_ids[0]


@torch.no_grad()
def window_losses(model, windows: torch.Tensor, device, batch_size: int = 1,
                  progress: Callable[[int], Any] | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of every window (float64 on the CPU), shape (n,)."""
    losses = []
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        # Score every position against the next token (the last one against an ignored label) instead of
        # slicing logits[:, :-1]: the slice of a (batch, seqlen, vocab) tensor is not contiguous and
        # reshaping it copies the whole logits tensor (~100 MB per 512-token window of a 49k vocab).
        labels = torch.nn.functional.pad(batch[:, 1:], (0, 1), value=-100)
        ce = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                               reduction="none").view(labels.shape)
        losses.append(ce[:, :-1].mean(dim=1).double().cpu())
        if progress is not None:
            progress(batch.shape[0])
    return torch.cat(losses)


def perplexity(model, token_ids: torch.Tensor, seqlen: int, device, *, batch_size: int = 1,
               max_windows: int | None = None, progress: Callable[[int], Any] | None = None) -> dict[str, Any]:
    ids = token_ids.reshape(-1)
    n = ids.numel() // seqlen
    if n == 0:
        raise DataError(f"evaluation text has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}")
    if max_windows is not None:
        n = min(n, max_windows)
    windows = ids[: n * seqlen].view(n, seqlen)
    losses = window_losses(model, windows, device, batch_size=batch_size, progress=progress)
    mean_loss = float(losses.mean())
    return {"ppl": math.exp(mean_loss), "mean_loss": mean_loss, "windows": n, "seqlen": seqlen,
            "tokens_evaluated": n * seqlen, "tokens_available": int(ids.numel())}
