"""apply_lora and PEFT's target-module matching rules, on a tiny Llama and a plain module tree."""

import pytest
import torch
from torch import nn

from lorafusion import FusedLoRALinear, LoRAConfig, apply_lora, find_target_modules, get_lora_config, lora_modules


class TwoTower(nn.Module):
    def __init__(self):
        super().__init__()
        self.left = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
        self.right = nn.ModuleDict({"proj": nn.Linear(8, 4), "norm": nn.LayerNorm(4)})
        self.lm_head = nn.Linear(4, 3)

    def forward(self, x):
        return self.lm_head(self.right["norm"](self.right["proj"](self.left(x))))


def test_list_targets_on_llama(tiny_llama, llama_projections):
    base_weight = tiny_llama.model.layers[1].mlp.down_proj.weight
    config = LoRAConfig(r=4, lora_alpha=8, target_modules=llama_projections)
    model = apply_lora(tiny_llama, config)
    assert model is tiny_llama and get_lora_config(model) is config
    converted = lora_modules(model)
    assert len(converted) == 2 * len(llama_projections)
    assert "model.layers.0.self_attn.q_proj" in converted
    assert model.model.layers[1].mlp.down_proj.weight is base_weight
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{name}.{p}" for name in converted for p in ("lora_A", "lora_B")}
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, FusedLoRALinear)


def test_converted_model_is_unchanged_until_trained(tiny_llama, input_ids):
    expected = tiny_llama(input_ids).logits
    model = apply_lora(tiny_llama, LoRAConfig(r=4, target_modules=["q_proj", "down_proj"], backend="torch"))
    torch.testing.assert_close(model(input_ids).logits, expected)
    model(input_ids).logits.sum().backward()
    assert all(m.lora_B.grad is not None and m.lora_B.grad.abs().sum() > 0 for m in lora_modules(model).values())


def test_suffix_matching_needs_a_dot_boundary():
    model = nn.ModuleDict({"xproj": nn.Linear(2, 2), "block": nn.ModuleDict({"proj": nn.Linear(2, 2)})})
    assert find_target_modules(model, ["proj"]) == ["block.proj"]
    assert find_target_modules(model, ["block.proj", "xproj"]) == ["xproj", "block.proj"]


def test_regex_must_match_the_whole_name(tiny_llama):
    names = find_target_modules(tiny_llama, r"model\.layers\.1\.self_attn\.(q|v)_proj")
    assert names == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    # A regex, not a suffix: "q_proj" matches nothing in full, and the error says how PEFT reads it.
    with pytest.raises(ValueError, match=r"target_modules='q_proj' is a string, which PEFT reads as a regular "
                       r"expression that must match a whole module name .* give a list: \['q_proj'\]$"):
        find_target_modules(tiny_llama, "q_proj")
    assert find_target_modules(tiny_llama, r".*\.q_proj") == find_target_modules(tiny_llama, ["q_proj"])


def test_all_linear_leaves_out_the_output_layer(tiny_llama):
    names = find_target_modules(tiny_llama, "all-linear")
    assert len(names) == 14 and "lm_head" not in names
    tree_names = find_target_modules(TwoTower(), "all-linear")
    assert tree_names == ["left.0", "left.2", "right.proj"]


def test_plain_module_tree():
    model = TwoTower()
    x = torch.randn(5, 8)
    expected = model(x)
    apply_lora(model, LoRAConfig(r=2, target_modules=["0", "proj"], backend="torch"))
    assert sorted(lora_modules(model)) == ["left.0", "right.proj"]
    assert not model.right["norm"].weight.requires_grad and not model.lm_head.weight.requires_grad
    torch.testing.assert_close(model(x), expected)


def test_unknown_targets_are_listed_with_available_names(tiny_llama):
    with pytest.raises(ValueError, match=r"\['qproj', 'w1'\] match no nn.Linear layer in LlamaForCausalLM; "
                                         r"linear layer names there: down_proj, gate_proj, k_proj, lm_head"):
        apply_lora(tiny_llama, LoRAConfig(target_modules=["q_proj", "qproj", "w1"]))
    assert not lora_modules(tiny_llama) and get_lora_config(tiny_llama) is None


def test_targets_that_are_not_linear(tiny_llama):
    with pytest.raises(ValueError, match=r"matches modules that are not nn.Linear.*model.layers.0.mlp \(LlamaMLP\)"):
        apply_lora(tiny_llama, LoRAConfig(target_modules=["mlp"]))


def test_applying_twice_is_refused(tiny_llama):
    apply_lora(tiny_llama, LoRAConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(tiny_llama, LoRAConfig(target_modules=["v_proj"]))


def test_hyperparameters_reach_the_layers(tiny_llama):
    apply_lora(tiny_llama, LoRAConfig(r=3, lora_alpha=12, lora_dropout=0.2, use_rslora=True,
                                      target_modules=["o_proj"], backend="torch"))
    layer = tiny_llama.model.layers[0].self_attn.o_proj
    assert (layer.r, layer.lora_dropout, layer.backend, layer.training) == (3, 0.2, "torch", False)
    assert layer.scaling == pytest.approx(12 / 3**0.5)


def test_gpt2_conv1d_projections_are_named_in_the_refusal():
    import transformers

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64))
    with pytest.raises(ValueError, match="Conv1D layers .*fan_in_fan_out"):
        apply_lora(gpt2, LoRAConfig(r=2, target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="found no nn.Linear layer in GPT2LMHeadModel; .*Conv1D"):
        apply_lora(gpt2, LoRAConfig(r=2, target_modules="all-linear"))


def test_all_linear_is_refused_where_peft_would_adapt_other_modules():
    import transformers

    mixtral = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, num_local_experts=4,
    ))
    with pytest.raises(ValueError, match=r"mixture-of-experts weights \(model.layers.0.mlp.experts.*target_modules=\["):
        apply_lora(mixtral, LoRAConfig(r=2, target_modules="all-linear"))
    apply_lora(mixtral, LoRAConfig(r=2, target_modules=["q_proj", "v_proj"]))  # named modules: fine
    classifier = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, num_labels=3, pad_token_id=0,
    ))
    with pytest.raises(ValueError, match="LlamaForSequenceClassification: PEFT leaves the classification head out"):
        apply_lora(classifier, LoRAConfig(r=2, target_modules="all-linear"))
