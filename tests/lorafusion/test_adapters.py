"""save_adapter / load_adapter: PEFT file format, round trip, atomic writes and every way a load fails."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorafusion.adapters
from lorafusion import LoRAConfig, apply_lora, get_lora_config, load_adapter, lora_modules, save_adapter

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture
def trained(tiny_llama):
    """(an untouched copy of the base model, the model with a random-B adapter on TARGETS)."""
    base = copy.deepcopy(tiny_llama)
    model = apply_lora(tiny_llama, LoRAConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM",
                                              base_model_name_or_path="tiny-llama", backend="torch"))
    with torch.no_grad():
        for layer in lora_modules(model).values():
            layer.lora_B.normal_(std=0.1)
    return base, model


@pytest.fixture
def saved(trained, tmp_path):
    base, model = trained
    return base, model, save_adapter(model, tmp_path / "adapter")


def test_files_and_key_names(saved):
    _, model, path = saved
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    tensors = load_file(path / "adapter_model.safetensors")
    assert len(tensors) == 2 * 3 * 2
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert torch.equal(tensors[key], model.model.layers[0].self_attn.q_proj.lora_A)
    assert tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (64, 4)
    config = json.loads((path / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "r", "lora_alpha", "target_modules", "task_type",
                                   "base_model_name_or_path", "fan_in_fan_out", "bias")} == {
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": TARGETS, "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "tiny-llama", "fan_in_fan_out": False, "bias": "none"}


def test_round_trip_into_a_plain_model(saved, input_ids):
    base, model, path = saved
    loaded = load_adapter(base, path, backend="torch")
    assert loaded is base and get_lora_config(loaded).target_modules == TARGETS
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, model(input_ids).logits, rtol=0, atol=0)


def test_load_into_a_converted_model(saved, input_ids):
    base, model, path = saved
    apply_lora(base, LoRAConfig(r=4, lora_alpha=8, target_modules=TARGETS, backend="torch"))
    load_adapter(base, path)
    with torch.no_grad():
        torch.testing.assert_close(base(input_ids).logits, model(input_ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize(
    "config, message",
    [
        (LoRAConfig(r=8, lora_alpha=8, target_modules=TARGETS), "r=4 but the model's adapter has r=8"),
        (LoRAConfig(r=4, lora_alpha=16, target_modules=TARGETS), "lora_alpha=8 but the model's adapter has lora_alpha=16"),
        (LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj"]),
         r"select other layers than the model's adapter \(not converted: \['model.layers.0.mlp.down_proj'"),
    ],
)
def test_converted_model_with_another_adapter_shape(saved, config, message):
    base, _, path = saved
    apply_lora(base, config)
    with pytest.raises(ValueError, match=message):
        load_adapter(base, path)


def test_merged_model_refuses_to_load(saved):
    base, _, path = saved
    apply_lora(base, LoRAConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    base.model.layers[0].self_attn.q_proj.merge()
    with pytest.raises(RuntimeError, match=r"merged layers \(\['model.layers.0.self_attn.q_proj'\]\); unmerge first"):
        load_adapter(base, path)


def test_save_replaces_an_adapter_and_leaves_no_temporary_files(saved, input_ids):
    base, model, path = saved
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.lora_B.add_(1.0)
    save_adapter(model, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["adapter"]
    load_adapter(base, path)
    with torch.no_grad():
        torch.testing.assert_close(base(input_ids).logits, model(input_ids).logits, rtol=0, atol=0)


def test_failed_save_keeps_the_previous_adapter(saved, monkeypatch):
    _, model, path = saved
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(lorafusion.adapters, "save_file", fail)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.lora_B.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["adapter"]


def test_save_refuses_to_replace_a_directory_with_other_files(trained, tmp_path):
    _, model = trained
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"holds files other than an adapter \(notes.txt\)"):
        save_adapter(model, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_save_needs_a_converted_model(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="has no LoRA adapter to save: convert it with apply_lora"):
        save_adapter(tiny_llama, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def rewrite_weights(path, change):
    tensors = load_file(path / "adapter_model.safetensors")
    change(tensors)
    save_file(tensors, path / "adapter_model.safetensors")


def assert_load_fails(base, path, error, message):
    with pytest.raises(error, match=message):
        load_adapter(base, path)
    assert not lora_modules(base) and get_lora_config(base) is None  # a failed load changes nothing


def test_missing_directory_and_files(saved, tmp_path):
    base, _, path = saved
    assert_load_fails(base, tmp_path / "nowhere", FileNotFoundError, "adapter directory .*nowhere does not exist")
    (path / "adapter_model.safetensors").unlink()
    assert_load_fails(base, path, FileNotFoundError, r"adapter_model.safetensors not found")
    (path / "adapter_config.json").unlink()
    assert_load_fails(base, path, FileNotFoundError, r"adapter_config.json not found")


def test_corrupt_json(saved):
    base, _, path = saved
    (path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4,')
    assert_load_fails(base, path, ValueError, r"adapter_config.json is not valid JSON")


def test_truncated_safetensors(saved):
    base, _, path = saved
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert_load_fails(base, path, ValueError, r"adapter_model.safetensors is not a readable safetensors file")


def test_missing_key(saved):
    base, _, path = saved
    rewrite_weights(path, lambda t: t.pop("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"))
    assert_load_fails(base, path, ValueError, r"adapter_model.safetensors lacks 1 LoRA weights: "
                                              r"\['base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight'\]")


def test_unexpected_key(saved):
    base, _, path = saved
    rewrite_weights(path, lambda t: t.update({"base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight":
                                              torch.zeros(4, 64)}))
    assert_load_fails(base, path, ValueError, r"1 keys that match no targeted layer: "
                                              r"\['base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight'\]")


def test_wrong_shape(saved):
    base, _, path = saved
    key = "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"
    rewrite_weights(path, lambda t: t.update({key: torch.zeros(4, 64)}))
    assert_load_fails(base, path, ValueError, rf"{key} has shape \(4, 64\) .* expected .* shape \(4, 128\)")


def test_unsupported_peft_feature(saved):
    base, _, path = saved
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    assert_load_fails(base, path, ValueError, r"adapter_config.json: use_dora=True is not supported")


def test_pickled_weights_get_a_hint(saved):
    base, _, path = saved
    (path / "adapter_model.safetensors").rename(path / "adapter_model.bin")
    assert_load_fails(base, path, FileNotFoundError, r"adapter_model.bin is a pickle")


def test_adapter_targets_absent_from_the_model(saved):
    base, _, path = saved
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["wq", "wv"]}))
    assert_load_fails(base, path, ValueError, r"adapter_config.json: target_modules entries \['wq', 'wv'\] match no nn.Linear")


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_adapters_that_changed_the_base_weights_are_refused_with_the_way_out(tiny_llama, tmp_path, init):
    # PiSSA and OLoRA move part of W into the adapter: loaded onto the unmodified base, the model
    # would be silently different (logits off by ~1 relative).
    import peft

    peft_model = peft.get_peft_model(
        copy.deepcopy(tiny_llama), peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=init)
    )
    peft_model.save_pretrained(tmp_path / init)
    with pytest.raises(ValueError, match=rf"adapter_config.json: init_lora_weights='{init}' changes the base.*path_initial_model_for_weight_conversion"):
        load_adapter(tiny_llama, tmp_path / init)
    assert not lora_modules(tiny_llama)


def test_saved_adapter_names_the_base_model_it_was_loaded_from(tiny_llama, tmp_path):
    import transformers

    tiny_llama.save_pretrained(tmp_path / "base")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    apply_lora(model, LoRAConfig(r=2, target_modules=["q_proj"]))
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "base")


def test_peft_adapter_on_lm_head_with_its_saved_base_weight_loads(tiny_llama, tmp_path, input_ids):
    # PEFT saves lm_head.base_layer.weight beside an adapter that targets the output layer.
    import peft

    peft_model = peft.get_peft_model(
        copy.deepcopy(tiny_llama), peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    )
    peft_model.save_pretrained(tmp_path / "head")
    model = load_adapter(copy.deepcopy(tiny_llama), tmp_path / "head", backend="torch")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, peft_model(input_ids).logits, atol=1e-5, rtol=1e-5)
    other_base = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        other_base.lm_head.weight.add_(1.0)
    with pytest.raises(ValueError, match=r"lm_head.base_layer.weight differs from this model's lm_head.weight"):
        load_adapter(other_base, tmp_path / "head")
