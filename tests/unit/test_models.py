"""models.decoder_blocks and models.prunable_linears on the tiny models of every family."""

from __future__ import annotations

import pytest
import torch

from sparse_recover.errors import ModelSourceError
from sparse_recover.models import decoder_blocks, in_features, is_conv1d, prunable_linears, weight_2d
from tests.helpers import FAMILIES, build_model

LLAMA_LINEARS = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj"}
EXPECTED = {  # family -> (blocks' dotted name, prunable linears of one block)
    "llama": ("model.layers", LLAMA_LINEARS),
    "mistral": ("model.layers", LLAMA_LINEARS),
    "qwen2": ("model.layers", LLAMA_LINEARS),
    "opt": ("model.decoder.layers", {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                     "self_attn.out_proj", "fc1", "fc2"}),
    "gpt2": ("transformer.h", {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layers", [1, 3])
def test_decoder_blocks_are_the_models_own_blocks(family, layers):
    model = build_model(family, layers=layers)
    name, blocks = decoder_blocks(model)
    assert name == EXPECTED[family][0]
    assert len(blocks) == layers == model.config.num_hidden_layers
    # the very ModuleList of the model (not a copy): pruning a block in place prunes the model
    assert blocks is model.get_submodule(name)
    assert len({type(b) for b in blocks}) == 1 and len({id(b) for b in blocks}) == layers
    with torch.no_grad():
        first = next(iter(prunable_linears(blocks[0]).values()))
        first.weight.zero_()
    assert any(p is first.weight and not p.any() for p in model.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_prunable_linears_per_family(family):
    model = build_model(family)
    _, blocks = decoder_blocks(model)
    for block in blocks:
        found = prunable_linears(block)
        assert set(found) == EXPECTED[family][1]
        for lname, module in found.items():
            assert module is block.get_submodule(lname)
            assert is_conv1d(module) == (family == "gpt2")
            w = weight_2d(module)  # (out, in) whatever the storage layout
            assert w.dim() == 2 and w.shape[1] == in_features(module)
            x = torch.randn(3, in_features(module))
            torch.testing.assert_close(module(x) - (module.bias if module.bias is not None else 0), x @ w.t())
    # nothing outside the blocks (embeddings, lm_head) is a prunable linear of a block
    all_block_linears = {id(m) for b in blocks for m in prunable_linears(b).values()}
    assert id(model.get_output_embeddings()) not in all_block_linears


def test_decoder_blocks_missing_is_a_clear_error():
    class NoBlocks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("Config", (), {"num_hidden_layers": 2})()
            self.wrong = torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.ReLU()])  # mixed classes
            self.short = torch.nn.ModuleList([torch.nn.Linear(2, 2)])  # not the layer count

    with pytest.raises(ModelSourceError, match="could not find the decoder blocks of NoBlocks"):
        decoder_blocks(NoBlocks())
