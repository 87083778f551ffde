"""Shared fixtures: seeded tiny models of several families, saved with save_pretrained so the real
loading code runs, with a small BPE tokenizer trained in-process on the built-in wiki-en text; small
text and task files. Plain helpers (model builders, the CLI runner) live in tests/helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("SPARSE_RECOVER_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest.register_assert_rewrite("tests.helpers")
from tests.helpers import FAMILIES, build_model, corpus_lines, make_tokenizer, write_jsonl  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is faster and does not thrash a shared 2-core machine.
    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    """family -> folder with a saved tiny seeded model and the tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    out = {}
    for family in FAMILIES:
        path = tmp_path_factory.mktemp(f"tiny-{family}")
        build_model(family).save_pretrained(path)
        tok.save_pretrained(path)
        out[family] = path
    return out


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory) -> Path:
    """A local .txt calibration corpus (one stream) of wiki-en text."""
    path = tmp_path_factory.mktemp("data") / "calib.txt"
    path.write_text("\n\n".join(corpus_lines(600)), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def eval_file(tmp_path_factory) -> Path:
    from sparse_recover.data import wiki_en_part

    path = tmp_path_factory.mktemp("evaldata") / "eval.txt"
    path.write_text("\n\n".join(wiki_en_part("eval")[:150]), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    """A local .txt fine-tuning corpus of wiki-en text (not the calibration text)."""
    from sparse_recover.data import wiki_en_part

    path = tmp_path_factory.mktemp("ftdata") / "train.txt"
    path.write_text("\n\n".join(wiki_en_part("train")[600:900]), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Tiny BoolQ (aps/super_glue boolq schema) and ARC (allenai/ai2_arc schema) files, from wiki-en text."""
    from sparse_recover.data import wiki_en_part

    texts = wiki_en_part("eval")[:16]
    root = tmp_path_factory.mktemp("data-dir")
    boolq = [{"question": f"is this text about {t.split()[0].lower()}", "passage": " ".join(t.split()[:40]),
              "idx": i, "label": i % 2} for i, t in enumerate(texts)]
    write_jsonl(root / "boolq" / "validation.jsonl", boolq)
    arc = []
    for i in range(12):
        words = texts[i].split()
        arc.append({"id": f"Mercury_{i}", "question": " ".join(words[:12]) + "?",
                    "choices": {"text": [words[12 + k] for k in range(4)], "label": ["A", "B", "C", "D"]},
                    "answerKey": "ABCD"[i % 4]})
    write_jsonl(root / "arc_easy" / "test.jsonl", arc)
    return root


@pytest.fixture(scope="session")
def pruned_runs(tiny_models, tmp_path_factory, calib_file) -> dict[str, Path]:
    """Wanda 2:4 run directories of the tiny LLaMA and GPT-2 (copy them with helpers.copy_run before use)."""
    from tests.helpers import prune

    out = {}
    for family in ("llama", "gpt2"):
        run = tmp_path_factory.mktemp(f"pruned-{family}") / "run"
        prune(tiny_models[family], run, calib_file, "wanda", "2:4")
        out[family] = run
    return out
