"""recover: an adapter trained on the pruned model, expanded to the original shapes, gives on the
original model the pruned adapter's delta on kept positions and zero elsewhere; the LoRA outputs
of both agree on kept channels; PEFT loads it; export_merged merges it; QLoRAM (nf4 training on
the pruned model through the runtime) then recovery works end to end; the memory report matches
the bytes lorafusion.qlora counts; bad adapters are named."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.nn import functional as F

from lorafusion import LoRAConfig, apply_lora, load_adapter, lora_modules, save_adapter
from lorafusion.loram import loram_memory_report, prune, recover, save_pruned_model
from lorafusion.loram.memory import nf4_bytes
from lorafusion.qlora import export_merged, memory_report, quantize_nf4
from lorafusion.runtime.config import parse_config
from lorafusion.runtime.trainer import MultiJobTrainer

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def trained_looking_adapter(model, r=4, targets=PROJECTIONS + ["lm_head"]):
    """apply_lora with random non-zero A and B (as after training)."""
    apply_lora(model, LoRAConfig(r=r, lora_alpha=8, target_modules=targets, backend="torch"))
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for layer in lora_modules(model).values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=generator))
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator))
    return model


@pytest.fixture
def pruned_and_recovered(tiny_gqa4_llama, tmp_path):
    original_state = {k: v.clone() for k, v in tiny_gqa4_llama.state_dict().items()}
    pruned, prune_map = prune(tiny_gqa4_llama, ratio=0.5, method="magnitude")
    trained_looking_adapter(pruned)
    save_adapter(pruned, tmp_path / "pruned_adapter")
    recover(tmp_path / "pruned_adapter", prune_map, tmp_path / "recovered")
    tiny_gqa4_llama.load_state_dict(original_state)
    load_adapter(tiny_gqa4_llama, tmp_path / "recovered", backend="torch")
    return tiny_gqa4_llama, pruned, prune_map


def test_recovered_delta_equals_the_pruned_delta_on_kept_positions_and_is_zero_elsewhere(pruned_and_recovered):
    original, pruned, prune_map = pruned_and_recovered
    original_layers, pruned_layers = lora_modules(original), lora_modules(pruned)
    assert original_layers.keys() == pruned_layers.keys() and len(original_layers) == 4 * 7 + 1
    for name, layer in original_layers.items():
        delta, pruned_delta = layer.delta_weight(), pruned_layers[name].delta_weight()
        assert delta.shape == prune_map.original_shape(name)
        rows, columns = prune_map.module_indices(name)
        rows = torch.arange(delta.shape[0]) if rows is None else torch.tensor(rows)
        columns = torch.arange(delta.shape[1]) if columns is None else torch.tensor(columns)
        torch.testing.assert_close(delta[rows][:, columns], pruned_delta, rtol=1e-6, atol=1e-6, msg=name)
        outside = torch.ones_like(delta, dtype=torch.bool)
        outside[rows[:, None], columns[None, :]] = False
        assert torch.count_nonzero(delta[outside]) == 0, name
        if ".layers." in name:  # every projection of a pruned layer loses rows or columns
            assert bool(outside.any()) == prune_map.is_pruned(int(name.split(".")[2])), name


def test_lora_outputs_agree_on_kept_channels(pruned_and_recovered):
    original, pruned, prune_map = pruned_and_recovered
    x_generator = torch.Generator().manual_seed(5)
    for name, layer in lora_modules(original).items():
        pruned_layer = lora_modules(pruned)[name]
        rows, columns = prune_map.module_indices(name)
        x = torch.randn(6, layer.in_features, generator=x_generator)
        x_pruned = x if columns is None else x[:, columns]
        with torch.no_grad():
            lora_out = layer(x) - F.linear(x, layer.weight, layer.bias)
            pruned_out = pruned_layer(x_pruned) - F.linear(x_pruned, pruned_layer.weight, pruned_layer.bias)
        kept = lora_out if rows is None else lora_out[:, rows]
        torch.testing.assert_close(kept, pruned_out, rtol=1e-5, atol=1e-5, msg=name)


def test_peft_loads_the_recovered_adapter_and_export_merged_merges_it(tiny_gqa4_llama, tmp_path, input_ids):
    original_state = {k: v.clone() for k, v in tiny_gqa4_llama.state_dict().items()}
    pruned, prune_map = prune(tiny_gqa4_llama, ratio=0.5, method="random")
    trained_looking_adapter(pruned, targets=["q_proj", "down_proj"])
    save_adapter(pruned, tmp_path / "pruned_adapter")
    recover(tmp_path / "pruned_adapter", prune_map, tmp_path / "recovered", base_model_name_or_path="tiny-original")
    assert json.loads((tmp_path / "recovered" / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-original"

    ours = load_adapter(tiny_gqa4_llama, tmp_path / "recovered", backend="torch")
    fresh = type(tiny_gqa4_llama)(tiny_gqa4_llama.config).eval()
    fresh.load_state_dict(original_state)
    peft_model = peft.PeftModel.from_pretrained(fresh, tmp_path / "recovered").eval()
    with torch.no_grad():
        expected = ours(input_ids=input_ids).logits
        torch.testing.assert_close(peft_model(input_ids=input_ids).logits, expected, rtol=1e-5, atol=1e-5)
    merged = load_file(export_merged(ours, tmp_path / "merged", dtype=torch.float32))
    plain = type(tiny_gqa4_llama)(tiny_gqa4_llama.config).eval()
    plain.load_state_dict(merged)
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=input_ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_qloram_training_through_the_runtime_then_recovery(tiny_llama, tmp_path):
    """QLoRAM: the runtime trains an adapter with model.quantize nf4 on the pruned checkpoint;
    the recovered adapter loads onto the original model."""
    import transformers

    original = transformers.LlamaForCausalLM(tiny_llama.config.__class__(**(tiny_llama.config.to_dict() | {"vocab_size": 260}))).eval()
    pruned, prune_map = prune(original, ratio=0.5)
    save_pruned_model(pruned, prune_map, tmp_path / "pruned")
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"text": "abab" * (i % 5 + 1)}) + "\n" for i in range(12)))
    config = parse_config({
        "model": {"path": str(tmp_path / "pruned"), "quantize": "nf4"},
        "jobs": [{"name": "ab", "data": "data.jsonl", "format": "text", "r": 4, "lora_alpha": 8, "lr": 2e-2,
                  "global_batch_size": 4, "max_steps": 3, "max_seq_len": 24,
                  "target_modules": ["q_proj", "o_proj", "up_proj", "down_proj"]}],
        "scheduler": {"capacity": 96, "solver": "greedy"}, "output_dir": "run", "backend": "torch",
    }, base_dir=tmp_path)
    trainer = MultiJobTrainer(config, progress=False)
    assert trainer.model.model.layers[1].mlp.down_proj.quantized
    assert trainer.train().jobs["ab"].status == "finished"
    recover(tmp_path / "run" / "ab", tmp_path / "pruned", tmp_path / "recovered")
    load_adapter(original, tmp_path / "recovered", backend="torch")
    trained = load_file(tmp_path / "run" / "ab" / "adapter_model.safetensors")
    down = "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"
    recovered = load_file(tmp_path / "recovered" / "adapter_model.safetensors")
    _, kept = prune_map.module_indices("model.layers.1.mlp.down_proj")
    assert torch.equal(recovered[down][:, kept], trained[down]) and recovered[down].shape[1] == 48


def test_memory_report_matches_the_bytes_qlora_counts(tiny_llama):
    pruned, prune_map = prune(tiny_llama, ratio=0.5)
    report = loram_memory_report(tiny_llama.config, prune_map)
    assert report == loram_memory_report(pruned.config, prune_map)
    assert report["original_parameters"] == sum(p.numel() for p in tiny_llama.parameters())
    assert report["pruned_parameters"] == sum(p.numel() for p in pruned.parameters())
    assert report["original_bytes"] == 2 * report["original_parameters"]
    # QLoRAM as the runtime builds it: every decoder linear in NF4, embeddings / lm_head 16-bit.
    apply_lora(pruned.to(torch.bfloat16), LoRAConfig(r=2, target_modules=["q_proj"], backend="torch"), quantize="nf4", quantize_other_linears=True)
    assert report["pruned_nf4_bytes"] == memory_report(pruned)["base_bytes"]
    assert report["storage_reduction"] == report["original_bytes"] / report["pruned_nf4_bytes"] > report["parameter_reduction"] > 1
    assert nf4_bytes(4000, 64, True) == quantize_nf4(torch.randn(40, 100)).nbytes()


def test_bad_adapters_are_named(tiny_llama, tmp_path):
    pruned, prune_map = prune(tiny_llama, ratio=0.5)
    trained_looking_adapter(pruned, targets=["q_proj"])
    save_adapter(pruned, tmp_path / "adapter")
    trained_looking_adapter(tiny_llama, targets=["q_proj"])  # an adapter of the unpruned model
    save_adapter(tiny_llama, tmp_path / "other_adapter")
    with pytest.raises(ValueError, match=r"layers.1.self_attn.q_proj.lora_B.weight has shape \(32, 4\) but the pruned model's model.layers.1.self_attn.q_proj is \[16, 32\].*not trained on the model this prune map describes"):
        recover(tmp_path / "other_adapter", prune_map, tmp_path / "out")

    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    weights["base_model.model.model.layers.1.lora_A.weight"] = torch.zeros(4, 64)
    save_file(weights, tmp_path / "adapter" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"the adapter targets 'model.layers.1', the prune map does not know module"):
        recover(tmp_path / "adapter", prune_map, tmp_path / "out")
    del weights["base_model.model.model.layers.1.lora_A.weight"]
    weights["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(4, 64)
    save_file(weights, tmp_path / "adapter" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"key 'base_model.model.model.embed_tokens.lora_embedding_A' is not a LoRA matrix"):
        recover(tmp_path / "adapter", prune_map, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="is not an adapter directory: adapter_config.json is missing"):
        recover(tmp_path, prune_map, tmp_path / "out")
    assert not (tmp_path / "out").exists()
