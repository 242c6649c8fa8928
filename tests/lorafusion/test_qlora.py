"""QLoRA at the module level: FusedLoRALinear on an NF4 base (from nn.Linear or from
bitsandbytes.nn.Linear4bit), apply_lora(..., quantize="nf4"), parity with PEFT LoRA on
bitsandbytes' Linear4bit, merge refused, export_merged, memory report, bad inputs."""

from __future__ import annotations

import copy

import bitsandbytes as bnb
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lorafusion.apply import apply_lora, quantize_linears
from lorafusion.config import LoRAConfig
from lorafusion.kernels.nf4 import NF4Weight
from lorafusion.modules import FusedLoRALinear
from lorafusion.qlora import NF4Linear, export_merged, memory_report, nf4_to_linear4bit


class TinyMLP(nn.Module):
    def __init__(self, hidden=64, inner=128):
        super().__init__()
        self.up = nn.Linear(hidden, inner, bias=True)
        self.down = nn.Linear(inner, hidden, bias=False)
        self.lm_head = nn.Linear(hidden, 32, bias=False)

    def forward(self, x):
        return self.lm_head(x + self.down(torch.relu(self.up(x))))


def to_linear4bit(linear: nn.Linear, double_quant=True) -> bnb.nn.Linear4bit:
    module = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=linear.weight.dtype,
        compress_statistics=double_quant,
        quant_type="nf4",
    )
    module.load_state_dict(linear.state_dict())
    return module.to("cpu")  # bitsandbytes quantizes on the move to a device


def randomize_lora(layer: FusedLoRALinear, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.1)
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_from_linear_nf4_computes_on_the_dequantized_weight(backend):
    linear = nn.Linear(64, 48, bias=True)
    layer = FusedLoRALinear.from_linear(linear, r=4, quantize="nf4", double_quant=True, blocksize=64, backend=backend)
    assert layer.quantized and isinstance(layer.weight, NF4Weight) and layer.weight.double_quant
    randomize_lora(layer)
    plain = FusedLoRALinear.from_linear(nn.Linear(64, 48), r=4, backend=backend)
    with torch.no_grad():
        plain.weight.copy_(layer.weight.dequantize())
        plain.bias.copy_(linear.bias)
        plain.lora_A.copy_(layer.lora_A)
        plain.lora_B.copy_(layer.lora_B)
    x = torch.randn(2, 5, 64, requires_grad=True)
    y = layer(x)
    y.square().sum().backward()
    grads = x.grad, layer.lora_A.grad, layer.lora_B.grad
    x.grad = None
    expected = plain(x)
    expected.square().sum().backward()
    assert torch.equal(y, expected)
    for got, want in zip(grads, (x.grad, plain.lora_A.grad, plain.lora_B.grad)):
        assert torch.equal(got, want)
    assert [name for name, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]


def test_from_linear4bit_shares_bitsandbytes_storage_and_output():
    linear = nn.Linear(64, 48, bias=True)
    quantized = to_linear4bit(linear)
    layer = FusedLoRALinear.from_linear(quantized, r=4, backend="torch")
    assert layer.weight.packed.data_ptr() == quantized.weight.data_ptr()
    x = torch.randn(6, 64)
    assert torch.equal(layer(x), quantized(x))  # B = 0: the base layer exactly
    assert torch.equal(nf4_to_linear4bit(layer.weight, layer.bias)(x), quantized(x))


def test_state_dict_round_trip_and_device_move():
    layer = FusedLoRALinear.from_linear(nn.Linear(64, 32), r=2, quantize="nf4", backend="torch")
    randomize_lora(layer)
    clone = FusedLoRALinear.from_linear(nn.Linear(64, 32), r=2, quantize="nf4", backend="torch")
    clone.load_state_dict(layer.state_dict())
    x = torch.randn(3, 64)
    assert torch.equal(clone(x), layer(x))
    assert "weight.packed" in layer.state_dict() and "weight.nested_absmax" in layer.state_dict()


def test_merge_is_refused_on_an_nf4_base():
    layer = FusedLoRALinear.from_linear(nn.Linear(64, 32), r=2, quantize="nf4")
    with pytest.raises(RuntimeError, match="4-bit NF4.*export_merged"):
        layer.merge()


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"quantize": "fp8"}, ValueError, r"quantize must be one of \('nf4',\) or None, got 'fp8'"),
        ({"quantize": "fp4"}, ValueError, "got 'fp4'"),
        ({"quantize": "nf4", "blocksize": 100}, ValueError, r"blocksize must be one of \(32, 64"),
    ],
)
def test_bad_quantization_requests_are_named(kwargs, error, message):
    with pytest.raises(error, match=message):
        FusedLoRALinear.from_linear(nn.Linear(64, 32), r=2, **kwargs)


def test_apply_lora_quantizes_targets_and_optionally_the_other_linears():
    torch.manual_seed(0)
    model = TinyMLP()
    config = LoRAConfig(r=4, lora_alpha=8, target_modules=["up"], backend="torch")
    apply_lora(model, config, quantize="nf4", quantize_other_linears=True)
    assert isinstance(model.up, FusedLoRALinear) and model.up.quantized
    assert isinstance(model.down, NF4Linear)
    assert type(model.lm_head) is nn.Linear  # the output layer stays in full precision
    x = torch.randn(4, 64, requires_grad=True)
    model(x).sum().backward()
    assert model.up.lora_A.grad is not None and x.grad is not None
    with pytest.raises(ValueError, match="quantize must be one of"):
        apply_lora(TinyMLP(), config, quantize="int8")


def test_adapters_go_on_a_model_quantized_beforehand():
    """quantize_linears first (as lorafusion serve does), adapters after: the same layers as
    apply_lora(..., quantize="nf4", quantize_other_linears=True), on the NF4 weights as they are."""
    torch.manual_seed(0)
    source = TinyMLP()
    config = LoRAConfig(r=4, lora_alpha=8, target_modules="all-linear", backend="torch")
    together = apply_lora(copy.deepcopy(source), config, quantize="nf4", quantize_other_linears=True)
    model = quantize_linears(copy.deepcopy(source), backend="torch")
    assert isinstance(model.up, NF4Linear) and isinstance(model.down, NF4Linear) and type(model.lm_head) is nn.Linear
    up_weight = model.up.weight
    apply_lora(model, config)
    assert model.up.weight is up_weight and model.up.quantized and model.down.quantized
    assert type(model.lm_head) is nn.Linear  # all-linear leaves the output layer out
    for name in ("up", "down"):
        randomize_lora(getattr(model, name), seed=len(name))
        randomize_lora(getattr(together, name), seed=len(name))
        assert torch.equal(getattr(model, name).weight.packed, getattr(together, name).weight.packed)
    x = torch.randn(3, 64)
    torch.testing.assert_close(model(x), together(x), rtol=0, atol=0)


def test_nf4_linear_gradient_uses_the_dequantized_weight():
    layer = NF4Linear.from_linear(nn.Linear(64, 32, bias=True))
    x = torch.randn(5, 64, requires_grad=True)
    layer(x).square().sum().backward()
    weight = layer.weight.dequantize()
    reference = x.detach().clone().requires_grad_()
    nn.functional.linear(reference, weight, layer.bias).square().sum().backward()
    torch.testing.assert_close(x.grad, reference.grad)


def test_memory_report_counts_nf4_bytes_per_parameter():
    model = nn.Sequential(nn.Linear(1024, 1024, bias=False))
    apply_lora(model, LoRAConfig(r=8, lora_alpha=8, target_modules=["0"], backend="torch"), quantize="nf4")
    report = memory_report(model)
    assert report["base_parameters"] == 1024 * 1024
    assert report["bytes_per_base_parameter"] <= 0.53
    assert report["bf16_base_bytes"] == 2 * 1024 * 1024
    assert report["model_bytes"] < 0.3 * report["bf16_model_bytes"]


def test_export_merged_writes_a_plain_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = TinyMLP()
    reference = TinyMLP()
    apply_lora(model, LoRAConfig(r=4, lora_alpha=8, target_modules=["up", "down"], backend="torch"), quantize="nf4")
    randomize_lora(model.up)
    randomize_lora(model.down, seed=2)
    path = export_merged(model, tmp_path / "merged", dtype=torch.float32)
    tensors = load_file(path)
    assert set(tensors) == set(reference.state_dict())
    reference.load_state_dict(tensors)
    x = torch.randn(3, 64)
    torch.testing.assert_close(reference(x), model(x), rtol=1e-5, atol=1e-5)


def test_parity_with_peft_lora_on_bitsandbytes_linear4bit():
    import peft
    torch.manual_seed(0)
    source = TinyMLP()
    peft_base = TinyMLP()
    peft_base.load_state_dict(source.state_dict())
    peft_base.up = to_linear4bit(source.up)
    peft_base.down = to_linear4bit(source.down)
    peft_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], lora_dropout=0.0)
    peft_base.is_loaded_in_4bit = True  # what transformers sets; PEFT then picks its bnb LoRA layer
    peft_model = peft.get_peft_model(peft_base, peft_config)

    ours = TinyMLP()
    ours.load_state_dict(source.state_dict())
    ours.up, ours.down = peft_base.up.base_layer, peft_base.down.base_layer  # get_peft_model wrapped them in place
    apply_lora(ours, LoRAConfig(r=4, lora_alpha=8, target_modules=["up", "down"], backend="torch"))
    for name in ("up", "down"):
        peft_layer = getattr(peft_model.base_model.model, name)
        assert type(peft_layer).__module__ == "peft.tuners.lora.bnb"  # PEFT's LoRA on Linear4bit
        randomize_lora(getattr(ours, name), seed=len(name))
        with torch.no_grad():
            peft_layer.lora_A["default"].weight.copy_(getattr(ours, name).lora_A)
            peft_layer.lora_B["default"].weight.copy_(getattr(ours, name).lora_B)

    x = torch.randn(2, 3, 64)
    y_ours, y_peft = ours(x), peft_model(x)
    torch.testing.assert_close(y_ours, y_peft, rtol=1e-5, atol=1e-5)
    y_ours.square().sum().backward()
    y_peft.square().sum().backward()
    for name in ("up", "down"):
        peft_layer = getattr(peft_model.base_model.model, name)
        torch.testing.assert_close(getattr(ours, name).lora_A.grad, peft_layer.lora_A["default"].weight.grad)
        torch.testing.assert_close(getattr(ours, name).lora_B.grad, peft_layer.lora_B["default"].weight.grad)


def test_load_adapter_onto_a_model_of_bitsandbytes_linear4bit_layers(tmp_path):
    """The expected LoRA shapes come from in/out_features: a Linear4bit's weight is stored packed."""
    from lorafusion.adapter_loading import load_adapter
    from lorafusion.adapters import save_adapter

    torch.manual_seed(0)
    trained = apply_lora(TinyMLP(), LoRAConfig(r=4, lora_alpha=8, target_modules=["up", "down"], backend="torch"))
    for name in ("up", "down"):
        randomize_lora(getattr(trained, name), seed=len(name))
    save_adapter(trained, tmp_path / "adapter")
    quantized = TinyMLP()
    quantized.up, quantized.down = to_linear4bit(quantized.up), to_linear4bit(quantized.down)
    load_adapter(quantized, tmp_path / "adapter", backend="torch")
    for name in ("up", "down"):
        assert getattr(quantized, name).quantized
        torch.testing.assert_close(getattr(quantized, name).lora_B, getattr(trained, name).lora_B)
