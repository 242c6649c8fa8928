"""LoRAConfig validation and its PEFT adapter_config.json form."""

import pytest

from lorafusion import LoRAConfig


def test_defaults_and_scaling():
    config = LoRAConfig(r=16, lora_alpha=32, target_modules=("q_proj", "v_proj", "q_proj"))
    assert config.target_modules == ["q_proj", "v_proj"]
    assert config.scaling == 2.0
    assert LoRAConfig(r=16, lora_alpha=32, use_rslora=True).scaling == 8.0
    assert LoRAConfig().targets_all_linear and LoRAConfig(target_modules="ALL-LINEAR").targets_all_linear


def test_set_of_targets_is_sorted():
    assert LoRAConfig(target_modules={"v_proj", "k_proj"}).target_modules == ["k_proj", "v_proj"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, r"r \(the LoRA rank\) must be an integer in 1\.\.256, got 0"),
        ({"r": 300}, r"must be an integer in 1\.\.256, got 300"),
        ({"lora_alpha": -1}, "lora_alpha must be a positive number, got -1"),
        ({"lora_dropout": 1.0}, r"lora_dropout must be a probability in \[0, 1\), got 1.0"),
        ({"target_modules": []}, "target_modules must be a non-empty list"),
        ({"target_modules": ["q_proj", 3]}, "target_modules must be a non-empty list"),
        ({"target_modules": 5}, "target_modules must be a list of module names"),
        ({"target_modules": "q_proj("}, "is not a valid regex"),
        ({"bias": "all"}, "bias must be 'none'"),
        ({"use_rslora": 1}, "use_rslora must be a bool"),
        ({"task_type": "CAUSAL"}, "task_type must be None or one of"),
        ({"backend": "bogus"}, "backend must be one of"),
    ],
)
def test_invalid_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoRAConfig(**kwargs)


def test_peft_dict_round_trip():
    config = LoRAConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj"], use_rslora=True,
                        task_type="CAUSAL_LM", base_model_name_or_path="tiny")
    data = config.to_peft_dict()
    assert data["peft_type"] == "LORA" and data["fan_in_fan_out"] is False
    assert LoRAConfig.from_peft_dict(data) == config


@pytest.mark.parametrize(
    "change, message",
    [
        ({"peft_type": "IA3"}, "peft_type must be 'LORA', got 'IA3'"),
        ({"use_dora": True}, "use_dora=True is not supported"),
        ({"rank_pattern": {"q_proj": 2}}, "rank_pattern=.* is not supported"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save=.* is not supported"),
        ({"r": -2}, r"adapter_config.json: r \(the LoRA rank\) must be"),
    ],
)
def test_from_peft_dict_refuses_what_it_cannot_honour(change, message):
    data = {**LoRAConfig(target_modules=["q_proj"]).to_peft_dict(), **change}
    with pytest.raises(ValueError, match=message):
        LoRAConfig.from_peft_dict(data, source="adapter_config.json")


def test_from_peft_dict_missing_field():
    data = LoRAConfig(target_modules=["q_proj"]).to_peft_dict()
    del data["target_modules"]
    with pytest.raises(ValueError, match="cfg.json: missing field 'target_modules'"):
        LoRAConfig.from_peft_dict(data, source="cfg.json")
