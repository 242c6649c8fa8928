"""Models converted by apply_lora under the Hugging Face Trainer: save_model writes what
from_pretrained, PEFT and load_adapter read back as the trained model, resume works, and a
bitsandbytes 4-bit model trains."""

from __future__ import annotations

import json

import peft
import pytest
import torch
import transformers

from lorafusion import LoRAConfig, apply_lora, load_adapter
from lorafusion.adapters import adapter_state_dict

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=96, max_position_embeddings=64)


@pytest.fixture
def base_dir(tmp_path):
    torch.manual_seed(0)
    directory = tmp_path / "base"
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).save_pretrained(directory)
    return directory


def dataset():
    input_ids = torch.randint(0, 96, (8, 12), generator=torch.Generator().manual_seed(3))
    return [{"input_ids": row, "labels": row} for row in input_ids]


def training_args(output_dir, **overrides):
    return transformers.TrainingArguments(**{
        "output_dir": str(output_dir), "per_device_train_batch_size": 4, "max_steps": 2, "learning_rate": 1e-2,
        "report_to": [], "save_strategy": "no", "logging_strategy": "no", "seed": 0, "use_cpu": True, **overrides})


def logits(model, input_ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids).logits


def test_save_model_writes_what_from_pretrained_loads_as_the_trained_model(base_dir, tmp_path):
    model = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    apply_lora(model, LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], backend="torch"))
    output = tmp_path / "out"
    trainer = transformers.Trainer(model=model, args=training_args(output, save_strategy="steps", save_steps=1),
                                   train_dataset=dataset())
    trainer.train()
    trainer.save_model()
    input_ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(4))
    trained = logits(model, input_ids)
    base = logits(transformers.LlamaForCausalLM.from_pretrained(base_dir), input_ids)
    assert not torch.allclose(trained, base, atol=1e-3)  # the adapter moved: a dropped adapter shows

    # The output directory also holds the checkpoints: the adapter goes beside them.
    assert {"adapter_config.json", "adapter_model.safetensors", "model.safetensors", "checkpoint-2"} <= {
        entry.name for entry in output.iterdir()}
    assert json.loads((output / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(output)
    torch.testing.assert_close(logits(reloaded, input_ids), trained, atol=1e-5, rtol=1e-5)
    in_peft = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(base_dir), output)
    torch.testing.assert_close(logits(in_peft, input_ids), trained, atol=1e-5, rtol=1e-5)
    ours = load_adapter(transformers.LlamaForCausalLM.from_pretrained(base_dir), output, backend="torch")
    torch.testing.assert_close(logits(ours, input_ids), trained, atol=1e-5, rtol=1e-5)
    # Each checkpoint carries its own step's adapter too.
    step_1 = load_adapter(transformers.LlamaForCausalLM.from_pretrained(base_dir), output / "checkpoint-1", backend="torch")
    torch.testing.assert_close(logits(transformers.AutoModelForCausalLM.from_pretrained(output / "checkpoint-1"), input_ids),
                               logits(step_1, input_ids), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(step_1, input_ids), trained, atol=1e-4)

    # Resuming from checkpoint-1 reaches the same adapter as the uninterrupted run.
    resumed = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    apply_lora(resumed, LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], backend="torch"))
    transformers.Trainer(model=resumed, args=training_args(tmp_path / "resumed"), train_dataset=dataset()).train(
        resume_from_checkpoint=str(output / "checkpoint-1"))
    torch.testing.assert_close(logits(resumed, input_ids), trained, atol=1e-5, rtol=1e-5)


def test_trainer_trains_a_bitsandbytes_4bit_model_with_our_layers(base_dir, tmp_path):
    import bitsandbytes  # noqa: F401 - the 4-bit model below needs it
    quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_compute_dtype=torch.float32)
    model = transformers.LlamaForCausalLM.from_pretrained(base_dir, quantization_config=quantization, device_map="cpu")
    assert model.is_quantized
    apply_lora(model, LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], backend="torch"))
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    assert before and all("lora_" in name for name in before)
    trainer = transformers.Trainer(model=model, args=training_args(tmp_path / "out", save_strategy="steps", save_steps=1),
                                   train_dataset=dataset())
    trainer.train()
    after = dict(model.named_parameters())
    trained_b = [name for name in before if name.endswith("lora_B")]
    assert trained_b and all(not torch.equal(after[name], before[name]) for name in trained_b)
    trainer.save_model()
    # No base weights: the 4-bit base is the checkpoint the model was loaded from.
    assert {entry.name for entry in (tmp_path / "out").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    assert not (tmp_path / "out" / "model.safetensors").exists()
    input_ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(4))
    reloaded = load_adapter(transformers.LlamaForCausalLM.from_pretrained(
        base_dir, quantization_config=quantization, device_map="cpu"), tmp_path / "out", backend="torch")
    torch.testing.assert_close(logits(reloaded, input_ids), logits(model, input_ids), atol=1e-5, rtol=1e-5)
    in_peft = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(
        base_dir, quantization_config=quantization, device_map="cpu"), tmp_path / "out")
    # PEFT reads the same adapter. (Its logits are not compared: bitsandbytes 0.50's CPU Linear4bit
    # matmul differs from its own dequantize_4bit by ~2e-3 at these widths, which our NF4 path matches.)
    read_by_peft = peft.get_peft_model_state_dict(in_peft)
    ours = adapter_state_dict(model)
    assert read_by_peft.keys() == ours.keys()
    for key in ours:
        torch.testing.assert_close(read_by_peft[key], ours[key], atol=0, rtol=0, msg=key)

    # Resuming from checkpoint-1 reaches the same adapter as the uninterrupted run.
    resumed = transformers.LlamaForCausalLM.from_pretrained(base_dir, quantization_config=quantization, device_map="cpu")
    apply_lora(resumed, LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], backend="torch"))
    transformers.Trainer(model=resumed, args=training_args(tmp_path / "resumed"), train_dataset=dataset()).train(
        resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-1"))
    torch.testing.assert_close(logits(resumed, input_ids), logits(model, input_ids), atol=1e-5, rtol=1e-5)


def test_converted_model_still_pickles_and_deep_copies(base_dir, tmp_path):
    import copy
    import io

    model = apply_lora(transformers.LlamaForCausalLM.from_pretrained(base_dir),
                       LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj"], backend="torch"))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for twin in (torch.load(buffer, weights_only=False), copy.deepcopy(model)):
        with torch.no_grad():
            next(p for name, p in twin.named_parameters() if name.endswith("lora_B")).fill_(0.5)
        twin.save_pretrained(tmp_path / "twin")  # the twin's own adapter, not the original's
        saved = adapter_state_dict(load_adapter(transformers.LlamaForCausalLM.from_pretrained(base_dir),
                                                tmp_path / "twin", backend="torch"))
        assert saved.keys() == adapter_state_dict(twin).keys()
        assert all(torch.equal(saved[key], tensor) for key, tensor in adapter_state_dict(twin).items())
        assert not all(torch.equal(saved[key], tensor) for key, tensor in adapter_state_dict(model).items())
