"""Against PEFT itself: same targets, same logits and LoRA gradients, adapters readable both ways."""

import copy

import pytest
import torch

import peft

from lorafusion import LoRAConfig, apply_lora, find_target_modules, load_adapter, lora_modules, save_adapter  # noqa: E402

PEFT_PREFIX = "base_model.model."


def peft_lora_layers(peft_model):
    """PEFT's LoRA layers by the module name they have in the base model."""
    return {
        name[len(PEFT_PREFIX):]: module
        for name, module in peft_model.named_modules()
        if isinstance(module, peft.tuners.lora.LoraLayer)
    }


def make_peft_model(base, **lora_kwargs):
    config = peft.LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **lora_kwargs)
    peft_model = peft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for layer in peft_lora_layers(peft_model).values():
            layer.lora_B["default"].weight.normal_(std=0.1)  # PEFT starts B at zero, hiding the LoRA path
    return peft_model


def copy_peft_weights_into(model, peft_model):
    peft_layers = peft_lora_layers(peft_model)
    assert sorted(peft_layers) == sorted(lora_modules(model))
    with torch.no_grad():
        for name, layer in lora_modules(model).items():
            layer.lora_A.copy_(peft_layers[name].lora_A["default"].weight)
            layer.lora_B.copy_(peft_layers[name].lora_B["default"].weight)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_logits_and_lora_gradients_match_peft(tiny_llama, llama_projections, input_ids, use_rslora):
    peft_model = make_peft_model(tiny_llama, r=4, lora_alpha=8, target_modules=llama_projections, use_rslora=use_rslora)
    model = apply_lora(tiny_llama, LoRAConfig(r=4, lora_alpha=8, target_modules=llama_projections,
                                              use_rslora=use_rslora, backend="torch"))
    copy_peft_weights_into(model, peft_model)
    model.train()
    peft_model.train()

    logits = model(input_ids, labels=input_ids)
    peft_logits = peft_model(input_ids, labels=input_ids)
    torch.testing.assert_close(logits.logits, peft_logits.logits, atol=1e-5, rtol=1e-5)
    logits.loss.backward()
    peft_logits.loss.backward()

    peft_layers = peft_lora_layers(peft_model)
    for name, layer in lora_modules(model).items():
        for ours, theirs in ((layer.lora_A, peft_layers[name].lora_A["default"].weight),
                             (layer.lora_B, peft_layers[name].lora_B["default"].weight)):
            assert ours.grad is not None and ours.grad.abs().sum() > 0, name
            torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-6, rtol=1e-4, msg=name)
    ours_trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    theirs_trainable = sorted(n[len(PEFT_PREFIX):].replace(".default", "")
                              for n, p in peft_model.named_parameters() if p.requires_grad)
    assert ours_trainable == [n.replace(".weight", "") for n in theirs_trainable]


@pytest.mark.parametrize(
    "target_modules",
    ["all-linear", r".*\.layers\.1\..*_proj", r"model\.layers\.\d+\.mlp\.(up|down)_proj", ["k_proj", "layers.0.mlp.up_proj"]],
)
def test_target_selection_matches_peft(tiny_llama, target_modules):
    peft_model = make_peft_model(tiny_llama, r=2, target_modules=target_modules)
    assert find_target_modules(tiny_llama, target_modules) == list(peft_lora_layers(peft_model))


def test_adapter_saved_here_loads_in_peft(tiny_llama, llama_projections, input_ids, tmp_path):
    base = copy.deepcopy(tiny_llama)
    model = apply_lora(tiny_llama, LoRAConfig(r=4, lora_alpha=16, target_modules=llama_projections,
                                              task_type="CAUSAL_LM", backend="torch"))
    with torch.no_grad():
        for layer in lora_modules(model).values():
            layer.lora_B.normal_(std=0.1)
    save_adapter(model, tmp_path / "adapter")

    peft_model = peft.PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert isinstance(peft_model, peft.PeftModelForCausalLM)
    assert len(peft_lora_layers(peft_model)) == len(lora_modules(model))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids).logits, model(input_ids).logits, atol=1e-5, rtol=1e-5)


def test_adapter_saved_by_peft_loads_here(tiny_llama, input_ids, tmp_path):
    base = copy.deepcopy(tiny_llama)
    peft_model = make_peft_model(tiny_llama, r=3, lora_alpha=6, target_modules="all-linear", use_rslora=True)
    peft_model.save_pretrained(tmp_path / "peft_adapter")

    model = load_adapter(base, tmp_path / "peft_adapter", backend="torch")
    assert sorted(lora_modules(model)) == sorted(peft_lora_layers(peft_model))
    assert next(iter(lora_modules(model).values())).use_rslora
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, peft_model(input_ids).logits, atol=1e-5, rtol=1e-5)


def test_qwen2_with_biased_projections_matches_peft(input_ids, tmp_path):
    import transformers
    config = transformers.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    base = transformers.Qwen2ForCausalLM(config).eval()
    assert base.model.layers[0].self_attn.q_proj.bias is not None
    peft_model = make_peft_model(base, r=2, lora_alpha=4, target_modules="all-linear")
    peft_model.save_pretrained(tmp_path / "qwen2_adapter")
    model = load_adapter(copy.deepcopy(base), tmp_path / "qwen2_adapter", backend="torch")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, peft_model(input_ids).logits, atol=1e-5, rtol=1e-5)
