"""The runtime trains only checkpoints whose attention it computes exactly; any other gets one line
naming the model type or option (not a KeyError deep in transformers, not a silently dropped option)."""

from __future__ import annotations

import pytest
import torch
import transformers

from lorafusion.runtime.config import ModelSpec
from lorafusion.runtime.data import Sample
from lorafusion.runtime.model import build_base_model
from lorafusion.runtime.packing import pack_samples

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=64)


def saved(tmp_path, model):
    model.save_pretrained(tmp_path / "checkpoint")
    return str(tmp_path / "checkpoint")


SUPPORTED = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 8}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {}),
}


@pytest.mark.parametrize("model_type", sorted(SUPPORTED))
def test_each_supported_checkpoint_attends_within_packed_samples_only(tmp_path, model_type):
    config_class, model_class, extra = SUPPORTED[model_type]
    torch.manual_seed(0)
    path = saved(tmp_path, model_class(config_class(**TINY, **extra)))
    model = build_base_model(ModelSpec(path=path, architecture=None, config={}))
    assert model.config.model_type == model_type and not any(p.requires_grad for p in model.parameters())
    samples = [Sample(1, (5, 6, 7, 8, 9), (-100, 6, 7, 8, 9)), Sample(2, (10, 11, 12), (-100, 11, 12))]
    packed = pack_samples([("a", s) for s in samples])
    with torch.no_grad():
        logits = model(**packed.model_inputs()).logits
        start = 0
        for sample in samples:
            alone = model(input_ids=torch.tensor([sample.input_ids])).logits
            torch.testing.assert_close(logits[:, start : start + len(sample.input_ids)], alone, rtol=1e-5, atol=1e-5)
            start += len(sample.input_ids)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**TINY, head_dim=8)),
         "model_type 'gemma3_text'"),
        (lambda: transformers.FalconForCausalLM(transformers.FalconConfig(hidden_size=32, num_hidden_layers=1,
                                                                          num_attention_heads=4, vocab_size=64)),
         "model_type 'falcon'"),
        (lambda: transformers.T5ForConditionalGeneration(transformers.T5Config(d_model=32, d_ff=64, num_layers=1,
                                                                               num_heads=4, d_kv=8, vocab_size=64)),
         "model_type 't5'"),
    ],
)
def test_other_checkpoints_get_one_line(tmp_path, make, message):
    torch.manual_seed(0)
    path = saved(tmp_path, make())
    with pytest.raises(ValueError, match=rf"model.path {path}: {message} is not supported .*fuse_peft") as error:
        build_base_model(ModelSpec(path=path, architecture=None, config={}))
    assert "\n" not in str(error.value)


def test_bidirectional_attention_gets_one_line(tmp_path):
    torch.manual_seed(0)
    model = transformers.GemmaForCausalLM(transformers.GemmaConfig(**TINY, head_dim=8, use_bidirectional_attention=True))
    path = saved(tmp_path, model)
    with pytest.raises(ValueError, match=rf"model.path {path}: use_bidirectional_attention=True is not supported") as error:
        build_base_model(ModelSpec(path=path, architecture=None, config={}))
    assert "\n" not in str(error.value)


def test_attention_dropout_gets_one_line(tmp_path):
    torch.manual_seed(0)
    path = saved(tmp_path, transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, attention_dropout=0.1)))
    with pytest.raises(ValueError, match=rf"model.path {path}: attention_dropout=0.1 is not supported .*set it to 0.0") as error:
        build_base_model(ModelSpec(path=path, architecture=None, config={}))
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=r"^model.config: attention_dropout=0.2 is not supported"):
        build_base_model(ModelSpec(path=None, architecture="mistral", config=dict(TINY, attention_dropout=0.2)))


def test_a_loram_pruned_checkpoint_is_checked_too(tmp_path):
    from lorafusion.loram import prune, save_pruned_model

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**dict(TINY, num_hidden_layers=3), attention_dropout=0.1))
    pruned, prune_map = prune(model, 0.5, keep_layers=[0])
    save_pruned_model(pruned, prune_map, tmp_path / "pruned")
    with pytest.raises(ValueError, match=r"pruned: attention_dropout=0.1 is not supported"):
        build_base_model(ModelSpec(path=str(tmp_path / "pruned"), architecture=None, config={}))
