"""data.sample_windows: the calibration windows' shape, determinism, provenance, and clear errors."""

from __future__ import annotations

import pytest
import torch

from sparse_recover.data import Corpus, sample_windows, wiki_en_part
from sparse_recover.errors import DataError

SEQLEN = 48


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def documents() -> list[str]:
    """Documents of very different lengths: some far shorter than a window, which are never drawn from."""
    texts = wiki_en_part("train")[:40]
    return texts + ["Short.", "Also short, far below one window.", ""]


def corpora(documents) -> dict[str, Corpus]:
    return {"documents": Corpus("docs", documents), "stream": Corpus("stream", ["\n\n".join(documents)], stream=True)}


def token_ids(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt").input_ids[0]


def is_slice_of(window: torch.Tensor, ids: torch.Tensor) -> bool:
    """Whether `window` equals ids[j : j + len(window)] for some j."""
    n = window.numel()
    if ids.numel() < n:
        return False
    return bool((ids.to(torch.int64).unfold(0, n, 1) == window).all(1).any())


@pytest.mark.parametrize("kind", ["documents", "stream"])
@pytest.mark.parametrize("nsamples", [1, 7])
def test_shape_and_dtype(tokenizer, documents, kind, nsamples):
    windows = sample_windows(corpora(documents)[kind], tokenizer, nsamples, SEQLEN, seed=0)
    assert windows.shape == (nsamples, SEQLEN) and windows.dtype == torch.int64
    assert int(windows.min()) >= 0 and int(windows.max()) < len(tokenizer)


@pytest.mark.parametrize("kind", ["documents", "stream"])
def test_same_seed_same_windows_other_seed_other_windows(tokenizer, documents, kind):
    corpus = corpora(documents)[kind]
    a = sample_windows(corpus, tokenizer, 8, SEQLEN, seed=0)
    assert torch.equal(a, sample_windows(corpus, tokenizer, 8, SEQLEN, seed=0))
    b = sample_windows(corpus, tokenizer, 8, SEQLEN, seed=1)
    assert not torch.equal(a, b)
    # the first windows of a longer draw with the same seed are the same windows (one random stream)
    assert torch.equal(sample_windows(corpus, tokenizer, 12, SEQLEN, seed=0)[:8], a)


def test_document_windows_are_contiguous_slices_of_one_document(tokenizer, documents):
    windows = sample_windows(Corpus("docs", documents), tokenizer, 16, SEQLEN, seed=3)
    tokenized = [token_ids(tokenizer, d) for d in documents]
    sources = set()
    for w in windows:
        found = [i for i, ids in enumerate(tokenized) if is_slice_of(w, ids)]
        assert found, "a window is not a contiguous slice of any tokenized document"
        # drawn only from documents longer than the window (the reference protocol's rule)
        assert all(tokenized[i].numel() > SEQLEN for i in found)
        sources.add(found[0])
    assert len(sources) > 1  # drawn from several documents, not one


def test_stream_windows_are_contiguous_slices_of_the_tokenized_stream(tokenizer, documents):
    corpus = Corpus("stream", ["\n\n".join(documents)], stream=True)
    ids = token_ids(tokenizer, corpus.documents[0])
    windows = sample_windows(corpus, tokenizer, 16, SEQLEN, seed=5)
    assert all(is_slice_of(w, ids) for w in windows)
    starts = {int((ids.unfold(0, SEQLEN, 1) == w).all(1).nonzero()[0]) for w in windows}
    assert len(starts) > 1 and max(starts) <= ids.numel() - SEQLEN - 1


def test_stream_too_short_is_a_clear_data_error(tokenizer):
    corpus = Corpus("tiny.txt", ["only a handful of words here"], stream=True)
    n = token_ids(tokenizer, corpus.documents[0]).numel()
    with pytest.raises(DataError, match=rf"tiny\.txt has {n} tokens, not more than seqlen={SEQLEN}.*smaller --seqlen"):
        sample_windows(corpus, tokenizer, 2, SEQLEN, seed=0)
    # exactly seqlen tokens is still too short: a window needs seqlen + 1 tokens to start anywhere
    with pytest.raises(DataError, match=f"has {n} tokens"):
        sample_windows(corpus, tokenizer, 2, n, seed=0)


def test_documents_all_too_short_is_a_clear_data_error_not_a_hang(tokenizer):
    short = Corpus("short.jsonl", ["A short document, number %d." % i for i in range(30)])
    with pytest.raises(DataError, match=rf"short\.jsonl has no document longer than seqlen={SEQLEN}"):
        sample_windows(short, tokenizer, 2, SEQLEN, seed=0)
    # long enough in bytes to be tokenised, but fewer tokens than seqlen: every candidate fails, then the error
    repeated = Corpus("repeated.jsonl", [" ".join(["the"] * 40)] * 5)
    assert len(repeated.documents[0].encode()) + 8 > 150 > token_ids(tokenizer, repeated.documents[0]).numel()
    with pytest.raises(DataError, match="no document longer than seqlen=150"):
        sample_windows(repeated, tokenizer, 2, 150, seed=0)


@pytest.mark.parametrize("nsamples, seqlen, corpus, message", [
    (0, SEQLEN, Corpus("c", ["text"]), "nsamples must be at least 1, got 0"),
    (2, 1, Corpus("c", ["text"]), "seqlen must be at least 2, got 1"),
    (2, SEQLEN, Corpus("empty-source", []), "calibration source empty-source is empty"),
])
def test_bad_arguments(tokenizer, nsamples, seqlen, corpus, message):
    with pytest.raises(DataError, match=message):
        sample_windows(corpus, tokenizer, nsamples, seqlen, seed=0)
