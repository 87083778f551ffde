"""Shared fixtures: seeded tiny models of several families, saved with save_pretrained so the real
loading code runs, with a small BPE tokenizer trained in-process on the built-in wiki-en text."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("SPARSE_RECOVER_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FAMILIES = ("llama", "mistral", "qwen2", "opt", "gpt2")
VOCAB = 512


def _corpus_lines(n: int = 400) -> list[str]:
    from sparse_recover.data import wiki_en_part

    return wiki_en_part("train")[:n]


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus_lines(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


def make_config(family: str, vocab: int = VOCAB, layers: int = 2):
    import transformers as tf

    common = dict(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if family in ("llama", "mistral", "qwen2"):
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[family]
        return cls(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, **common)
    if family == "opt":
        return tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=layers, num_attention_heads=4,
                            max_position_embeddings=512, word_embed_proj_dim=64, **common)
    if family == "gpt2":
        return tf.GPT2Config(n_embd=64, n_layer=layers, n_head=4, n_positions=512, vocab_size=vocab,
                             bos_token_id=1, eos_token_id=2)
    raise ValueError(family)


def build_model(family: str, seed: int = 0, layers: int = 2):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(family, layers=layers), dtype=torch.float32)
    # Random init gives near-uniform weights; scale some rows so scores are well separated.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(1 + torch.rand(p.shape[0], 1) * 3)
    return model.eval()


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
    path.write_text("\n\n".join(_corpus_lines(600)), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def eval_file(tmp_path_factory) -> Path:
    from sparse_recover.data import wiki_en_part

    path = tmp_path_factory.mktemp("evaldata") / "eval.txt"
    path.write_text("\n\n".join(wiki_en_part("eval")[:150]), encoding="utf-8")
    return path
