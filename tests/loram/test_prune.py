"""LoRAM pruning on tiny Llamas: the pruned model runs and its config fits its modules; ratio 0 is
the original; pruning equals zeroing the removed heads' o_proj columns and channels' down_proj
columns in the original (which checks the GQA head bookkeeping); importance methods drop what is
unimportant; files round-trip (also through the runtime's model loader); bad input is named."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorafusion import LoRAConfig, apply_lora
from lorafusion.loram import PruneMap, apply_prune_map, load_pruned_model, make_prune_map, prune, save_pruned_model
from lorafusion.runtime.config import ModelSpec
from lorafusion.runtime.model import build_base_model


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


@pytest.mark.parametrize("method", ["random", "magnitude", "activation"])
def test_pruned_model_runs_and_its_config_fits_its_modules(tiny_llama, input_ids, method):
    calibration = [input_ids] if method == "activation" else None
    pruned, prune_map = prune(tiny_llama, ratio=0.5, method=method, calibration=calibration)
    config = pruned.config
    assert prune_map.keep_layers == (0, 3)
    assert (config.intermediate_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (24, 2, 1, 8)
    for i, layer in enumerate(pruned.model.layers):
        sizes = config.loram_layer_sizes[i]
        original = i in (0, 3)
        assert sizes == ({"intermediate_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2} if original
                         else {"intermediate_size": 24, "num_attention_heads": 2, "num_key_value_heads": 1})
        attention, mlp = layer.self_attn, layer.mlp
        assert attention.q_proj.weight.shape == (sizes["num_attention_heads"] * 8, 32)
        assert attention.k_proj.weight.shape == attention.v_proj.weight.shape == (sizes["num_key_value_heads"] * 8, 32)
        assert attention.o_proj.weight.shape == (32, sizes["num_attention_heads"] * 8)
        assert mlp.gate_proj.weight.shape == mlp.up_proj.weight.shape == (sizes["intermediate_size"], 32)
        assert mlp.down_proj.weight.shape == (32, sizes["intermediate_size"])
        assert attention.num_key_value_groups == 2
    out = logits(pruned, input_ids)
    assert out.shape == (2, 11, 64) and torch.isfinite(out).all()
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in tiny_llama.parameters())
    assert not torch.equal(out, logits(tiny_llama, input_ids))


@pytest.mark.parametrize("method", ["random", "magnitude"])
def test_ratio_zero_gives_the_original_model(tiny_llama, input_ids, method):
    pruned, prune_map = prune(tiny_llama, ratio=0.0, method=method, keep_layers=())
    assert not any(prune_map.is_pruned(i) for i in range(4))
    assert torch.equal(logits(pruned, input_ids), logits(tiny_llama, input_ids))


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gqa4_llama"])
def test_pruning_equals_zeroing_the_removed_heads_and_channels(fixture, input_ids, request):
    """A removed head contributes to the output only through its o_proj columns, a removed MLP
    channel through its down_proj column: zeroing them in the original must give the pruned model,
    which holds only if every query head was kept with its own KV head."""
    original = request.getfixturevalue(fixture)
    pruned, prune_map = prune(original, ratio=0.5, method="random", keep_layers=[0], seed=4)
    shape = prune_map.original
    group = shape.num_attention_heads // shape.num_key_value_heads
    for i in range(1, 4):
        kv_heads = prune_map.layers[i].kv_heads
        assert len(kv_heads) == 1
        assert prune_map.query_heads(i) == [kv_heads[0] * group + j for j in range(group)]
    with torch.no_grad():
        for i, layer in enumerate(original.model.layers):
            _, o_columns = prune_map.module_indices(f"model.layers.{i}.self_attn.o_proj")
            _, down_columns = prune_map.module_indices(f"model.layers.{i}.mlp.down_proj")
            for linear, kept in ((layer.self_attn.o_proj, o_columns), (layer.mlp.down_proj, down_columns)):
                mask = torch.zeros(linear.in_features, dtype=torch.bool)
                mask[kept] = True
                linear.weight[:, ~mask] = 0.0
    torch.testing.assert_close(logits(pruned, input_ids), logits(original, input_ids), rtol=1e-5, atol=1e-5)


def test_importance_methods_drop_the_channels_and_heads_that_do_nothing(tiny_llama, input_ids):
    dead_channels, dead_kv_head = [1, 5, 9, 20, 33, 40], 1
    with torch.no_grad():
        for layer in tiny_llama.model.layers:
            layer.mlp.down_proj.weight[:, dead_channels] = 0.0
            layer.mlp.gate_proj.weight[dead_channels] = 0.0
            layer.mlp.up_proj.weight[dead_channels] = 0.0
            layer.self_attn.o_proj.weight[:, 16:32] *= 1e-4  # the query heads of KV head 1 (head_dim 8, 2 per KV head)
    for method, calibration in (("magnitude", None), ("activation", [input_ids, input_ids[:, :5]])):
        prune_map = make_prune_map(tiny_llama, ratio=0.125, method=method, calibration=calibration)
        for i in (1, 2):
            kept = prune_map.layers[i].mlp_channels
            assert len(kept) == 42 and not set(dead_channels) & set(kept), method
        ratio_half = make_prune_map(tiny_llama, ratio=0.5, method=method, calibration=calibration)
        assert ratio_half.layers[1].kv_heads == (1 - dead_kv_head,), method


def test_random_pruning_is_seeded(tiny_llama):
    first, second = (make_prune_map(tiny_llama, 0.5, seed=7) for _ in range(2))
    assert first == second
    assert make_prune_map(tiny_llama, 0.5, seed=8).layers != first.layers


def test_files_round_trip_and_the_runtime_loads_a_pruned_model(tiny_llama, input_ids, tmp_path):
    pruned, prune_map = prune(tiny_llama, ratio=0.4, method="magnitude")
    save_pruned_model(pruned, prune_map, tmp_path / "pruned")
    assert {"config.json", "prune_map.json", "model.safetensors"} <= {p.name for p in (tmp_path / "pruned").iterdir()}
    assert PruneMap.load(tmp_path / "pruned") == prune_map
    assert PruneMap.load(prune_map.save(tmp_path / "map.json")) == prune_map
    loaded = load_pruned_model(tmp_path / "pruned")
    assert torch.equal(logits(loaded, input_ids), logits(pruned, input_ids))
    spec = ModelSpec(path=str(tmp_path / "pruned"), architecture=None, config={}, dtype="bfloat16")
    runtime_model = build_base_model(spec)
    assert runtime_model.model.layers[1].mlp.down_proj.weight.dtype == torch.bfloat16
    torch.testing.assert_close(logits(runtime_model, input_ids).float(), logits(pruned, input_ids), rtol=0.05, atol=0.05)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(ratio=1.0), r"ratio .* must be in \[0, 1\), got 1.0"),
        (dict(ratio=-0.1), r"ratio .* must be in \[0, 1\), got -0.1"),
        (dict(ratio=True), r"ratio .* must be in \[0, 1\), got True"),
        (dict(ratio=0.5, method="l1"), r"method must be one of \('random', 'magnitude', 'activation'\), got 'l1'"),
        (dict(ratio=0.5, keep_layers=[4]), r"keep_layers must hold layer indices in \[-4, 4\), got 4"),
        (dict(ratio=0.5, method="activation"), r"method='activation' needs calibration"),
        (dict(ratio=0.5, calibration=[torch.zeros(1, 3, dtype=torch.long)]), r"calibration is used only by method='activation'"),
        (dict(ratio=0.5, method="activation", calibration=[torch.zeros(3)]), r"calibration\[0\] must be a LongTensor"),
    ],
)
def test_bad_arguments_are_named(tiny_llama, kwargs, message):
    with pytest.raises(ValueError, match=message):
        prune(tiny_llama, **kwargs)


def test_a_prune_map_from_another_model_is_refused(tiny_llama, tiny_gqa4_llama):
    prune_map = make_prune_map(tiny_gqa4_llama, 0.5)
    with pytest.raises(ValueError, match="the prune map was made for another model.*num_attention_heads: map 8, the model 4"):
        apply_prune_map(tiny_llama, prune_map)


def test_models_with_adapters_or_other_architectures_are_refused(tiny_llama):
    with pytest.raises(ValueError, match=r"LoRAM pruning supports \('llama', 'qwen2', 'mistral'\).*'Sequential'"):
        prune(nn.Sequential(nn.Linear(2, 2)), 0.5)
    apply_lora(tiny_llama, LoRAConfig(r=2, target_modules=["q_proj"], backend="torch"))
    with pytest.raises(TypeError, match="model.layers.0.self_attn.q_proj is a FusedLoRALinear; prune the plain model"):
        prune(tiny_llama, 0.5)


def test_a_corrupt_prune_map_file_is_named(tmp_path):
    (tmp_path / "prune_map.json").write_text('{"format_version": 1, "layers": []}')
    with pytest.raises(ValueError, match=r"prune_map.json is not a valid LoRAM prune map"):
        PruneMap.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="no LoRAM prune map at"):
        PruneMap.load(tmp_path / "missing.json")
