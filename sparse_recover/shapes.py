"""Architecture fields of the hub models the paper configs name (configs/papers/**.yaml), for the dry run.

`run --dry-run` estimates memory from a model's config alone. A hub id needs its config.json from the hub
or the local cache; with no network (HF_HUB_OFFLINE=1, a cluster's login node) the plan of a paper config
could not be printed at all. This table holds the shape-defining fields of each of those models, as their
published config.json files give them, so the plan is printed anyway, with one line saying where the shape
came from. It is read by the dry run only, and only when the hub cannot be reached: a real run loads the real
model (and fails in one line when it cannot).

Fields: hidden_size, intermediate_size (OPT: ffn_dim), num_hidden_layers, num_attention_heads,
num_key_value_heads (grouped-query attention: LLaMA-2-70B and LLaMA-3-8B have 8), vocab_size,
max_position_embeddings, tie_word_embeddings, model_type, torch_dtype (the dtype the weights are published in).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Shape:
    model_type: str  # "llama" | "opt"
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    torch_dtype: str


def _llama(hidden: int, inter: int, layers: int, heads: int, kv: int, ctx: int, vocab: int = 32000,
           dtype: str = "float16") -> Shape:
    return Shape("llama", hidden, inter, layers, heads, kv, vocab, ctx, False, dtype)


# LLaMA-1 (huggyllama conversions): context 2048; LLaMA-2: 4096 (70B: grouped-query attention, 8 KV heads);
# Vicuna-13B v1.5 is a LLaMA-2-13B fine-tune; LLaMA-3-8B: vocabulary 128256, context 8192, 8 KV heads, bf16.
SHAPES: dict[str, Shape] = {
    "huggyllama/llama-7b": _llama(4096, 11008, 32, 32, 32, 2048),
    "huggyllama/llama-13b": _llama(5120, 13824, 40, 40, 40, 2048),
    "huggyllama/llama-30b": _llama(6656, 17920, 60, 52, 52, 2048),
    "huggyllama/llama-65b": _llama(8192, 22016, 80, 64, 64, 2048),
    "meta-llama/Llama-2-7b-hf": _llama(4096, 11008, 32, 32, 32, 4096),
    "meta-llama/Llama-2-13b-hf": _llama(5120, 13824, 40, 40, 40, 4096),
    "meta-llama/Llama-2-70b-hf": _llama(8192, 28672, 80, 64, 8, 4096),
    "lmsys/vicuna-13b-v1.5": _llama(5120, 13824, 40, 40, 40, 4096),
    "meta-llama/Meta-Llama-3-8B": _llama(4096, 14336, 32, 32, 8, 8192, vocab=128256, dtype="bfloat16"),
    # OPT ties its output head to the input embeddings; word_embed_proj_dim equals hidden_size at 13B
    "facebook/opt-13b": Shape("opt", 5120, 20480, 40, 40, 40, 50272, 2048, True, "float16"),
}

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "opt": "OPTForCausalLM"}


def known_shape(spec: str) -> Shape | None:
    """The table's entry for a hub id (exact, then case-insensitive), or None."""
    if spec in SHAPES:
        return SHAPES[spec]
    lowered = {k.lower(): v for k, v in SHAPES.items()}
    return lowered.get(spec.strip().lower())


def builtin_config(spec: str) -> Any | None:
    """A transformers config with the table's shape for `spec` (None when the table lacks it)."""
    from transformers import AutoConfig

    s = known_shape(spec)
    if s is None:
        return None
    common: dict[str, Any] = dict(hidden_size=s.hidden_size, num_hidden_layers=s.num_hidden_layers,
                                  num_attention_heads=s.num_attention_heads, vocab_size=s.vocab_size,
                                  max_position_embeddings=s.max_position_embeddings,
                                  tie_word_embeddings=s.tie_word_embeddings,
                                  architectures=[_ARCHITECTURES[s.model_type]])
    if s.model_type == "opt":
        config = AutoConfig.for_model("opt", ffn_dim=s.intermediate_size, word_embed_proj_dim=s.hidden_size,
                                      **common)
    else:
        config = AutoConfig.for_model("llama", intermediate_size=s.intermediate_size,
                                      num_key_value_heads=s.num_key_value_heads, **common)
    return config
