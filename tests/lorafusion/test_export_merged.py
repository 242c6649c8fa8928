"""export_merged writes a checkpoint that transformers loads as it is: a Hugging Face model with
(NF4) LoRA layers, exported into a directory, comes back with from_pretrained as a plain model
computing the same logits."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lorafusion.apply import apply_lora
from lorafusion.config import LoRAConfig
from lorafusion.qlora import export_merged


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=100, max_position_embeddings=32,
    )
    return LlamaForCausalLM(config).eval()


def test_exported_directory_loads_with_from_pretrained(tmp_path):
    torch.manual_seed(0)
    model = tiny_llama()
    apply_lora(model, LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], backend="torch"), quantize="nf4")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)  # a trained adapter: B is no longer zero
    export_merged(model, tmp_path / "merged", dtype=torch.float32)

    saved = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in saved and saved["dtype"] == "float32"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", local_files_only=True).eval()
    assert type(loaded) is LlamaForCausalLM
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


def test_a_safetensors_file_gets_the_tensors_only(tmp_path):
    model = tiny_llama()
    apply_lora(model, LoRAConfig(r=2, target_modules=["q_proj"], backend="torch"))
    written = export_merged(model, tmp_path / "weights.safetensors", dtype=torch.float32)
    assert written == tmp_path / "weights.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.safetensors"]
