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


def test_gemma2_stages_keep_its_windows_and_softcaps():
    """Gemma2 caps its final logits in the causal LM's forward, which the last stage replaces; its
    sliding windows and attention softcap reach the packed attention through the stages' layers."""
    from lorafusion.runtime.attention import PACKED_ATTENTION

    config = transformers.Gemma2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, vocab_size=100, sliding_window=3, attn_logit_softcapping=0.5, final_logit_softcapping=2.0,
        initializer_range=0.3,
    )
    config._attn_implementation = PACKED_ATTENTION
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(config).eval()
    lengths = (6, 2, 7)
    ids = torch.randint(0, 100, (1, sum(lengths)))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        expected = model(input_ids=ids, position_ids=positions, sample_lengths=lengths).logits
        hidden = ids
        for stage in split_model(model, 2):
            hidden = stage(hidden, positions, lengths)
    assert expected.abs().max() < 2.0  # the cap binds
    torch.testing.assert_close(hidden, expected, rtol=1e-6, atol=1e-6)
