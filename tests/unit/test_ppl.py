"""Perplexity equals the reference code's computation (Wanda lib/eval.py `eval_ppl_wikitext`, algorithms.md 9.1)
on the same model and tokens, whatever the batch size, and `max_windows` takes the first windows."""

from __future__ import annotations

import math

import pytest
import torch

from sparse_recover.errors import DataError
from sparse_recover.evaluate.ppl import perplexity, tokenize_text
from tests.helpers import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


@torch.no_grad()
def reference_ppl(model, ids: torch.Tensor, seqlen: int) -> float:
    """The reference loop, verbatim in spirit: batch 1, nll = loss * seqlen, exp(sum / (n * seqlen))."""
    ids = ids.reshape(1, -1)
    nsamples = ids.numel() // seqlen
    nlls = []
    for i in range(nsamples):
        inputs = ids[:, i * seqlen:(i + 1) * seqlen]
        lm_logits = model(inputs).logits
        shift_logits = lm_logits[:, :-1, :].contiguous()
        shift_labels = inputs[:, 1:]
        loss = torch.nn.CrossEntropyLoss()(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1))
        nlls.append(loss.float() * seqlen)
    return torch.exp(torch.stack(nlls).sum() / (nsamples * seqlen)).item()


@pytest.fixture(scope="module")
def setup(tokenizer_dir, eval_file):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tokenize_text(tok, eval_file.read_text(encoding="utf-8"))[: 64 * 7 + 13]  # a tail to drop
    return build_model("llama"), ids


@pytest.mark.parametrize("batch_size", [1, 3])
def test_perplexity_equals_reference_loop(setup, batch_size):
    model, ids = setup
    ref = reference_ppl(model, ids, 64)
    out = perplexity(model, ids, 64, torch.device("cpu"), batch_size=batch_size)
    assert out["windows"] == 7 and out["tokens_evaluated"] == 7 * 64 and out["tokens_available"] == ids.numel()
    assert out["ppl"] == pytest.approx(ref, rel=1e-5)
    assert out["ppl"] == pytest.approx(math.exp(out["mean_loss"]), rel=1e-12)


def test_max_windows_is_the_first_windows(setup):
    model, ids = setup
    out = perplexity(model, ids, 64, torch.device("cpu"), max_windows=2)
    assert out["windows"] == 2
    assert out["ppl"] == pytest.approx(reference_ppl(model, ids[: 2 * 64], 64), rel=1e-5)


def test_text_shorter_than_one_window(setup):
    model, ids = setup
    with pytest.raises(DataError, match="fewer than one window"):
        perplexity(model, ids[:10], 64, torch.device("cpu"))
