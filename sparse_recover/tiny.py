"""The built-in `tiny-llama-random` model: a seeded random-init LLaMA with the SmolLM2 tokenizer.

Small enough that every stage of a pipeline takes seconds on a CPU, so `make table-* SMOKE=1` can run
each paper-table grid end to end; its numbers mean nothing. Built deterministically (LlamaConfig,
torch.manual_seed(0)); models.builtin_checkpoint saves it once into the model cache like the other aliases.
"""

from __future__ import annotations

TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True)


def _smollm2_tokenizer():
    from transformers import AutoTokenizer

    from sparse_recover.models import BUILTIN_MODELS, _package_folder, cache_dir

    converted = cache_dir() / "models" / "smollm2-135m"
    if (converted / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(converted))
    info = BUILTIN_MODELS["smollm2-135m"]
    return AutoTokenizer.from_pretrained(str(_package_folder(info.package, info.install)), gguf_file=info.gguf_file)


def build_tiny_llama():
    """(model, tokenizer, provenance) for models.builtin_checkpoint to save."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _smollm2_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **TINY_LLAMA)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(torch.float32).eval()
    return model, tokenizer, {"built": "random init, torch.manual_seed(0)", "config": TINY_LLAMA,
                              "tokenizer": "SmolLM2-135M"}
