"""The stage splitter: stages chained give the full model's logits; balanced layer counts; errors."""

from __future__ import annotations

import pytest
import torch
import transformers

from lorafusion.engines.stages import balanced_stage_layers, split_model


@pytest.fixture(scope="module")
def tiny_model():
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=5, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("num_stages", [1, 2, 3, 5])
def test_chained_stages_equal_the_full_model(tiny_model, num_stages):
    ids = torch.randint(0, 100, (1, 11))
    positions = torch.arange(11)[None]
    mask = (positions[0][:, None] >= positions[0][None, :])[None, None]
    with torch.no_grad():
        expected = tiny_model(ids).logits
        stages = split_model(tiny_model, num_stages)
        hidden = ids
        for stage in stages:
            hidden = stage(hidden, positions, mask)
    assert torch.equal(hidden, expected)
    assert sum(len(stage.layers) for stage in stages) == 5
    assert stages[0].embed_tokens is not None and stages[-1].lm_head is not None


def test_balanced_layers_give_the_head_stage_fewer_layers():
    assert balanced_stage_layers(8, 1) == [8]
    assert balanced_stage_layers(7, 2) == [4, 3]  # costs 4.1 and 4.0
    counts = balanced_stage_layers(32, 4)
    assert sum(counts) == 32 and max(counts) - min(counts) <= 1


def test_bad_layouts(tiny_model):
    with pytest.raises(ValueError, match="pipeline_stages=6 is larger than the model's 5 decoder layers"):
        balanced_stage_layers(5, 6)
    with pytest.raises(ValueError, match=r"stage_layers=\[2, 2\] must give each of the 2 stages .* sum to the model's 5"):
        split_model(tiny_model, 2, stage_layers=[2, 2])
    with pytest.raises(TypeError, match="not a Hugging Face decoder-only causal LM"):
        split_model(torch.nn.Linear(2, 2), 2)
