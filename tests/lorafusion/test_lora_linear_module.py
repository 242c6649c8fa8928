"""FusedLoRALinear against the unfused float64 reference, and its construction, merge and errors."""

import math

import pytest
import torch
from torch import nn

from lorafusion.kernels import lora_linear_reference
from lorafusion.modules import FusedLoRALinear


def make_layer(in_features, out_features, r, bias=False, backend="torch", **kwargs):
    layer = FusedLoRALinear(in_features, out_features, r=r, lora_alpha=2 * r, bias=bias, backend=backend, **kwargs)
    with torch.no_grad():
        layer.lora_B.normal_()  # B starts at zero; a zero B would hide every error in the LoRA path
    return layer


def reference_output(layer, x, bias_trainable=False):
    """The reference on float64 copies of the layer's tensors; returns (y, leaf tensors)."""
    leaves = {
        "x": x.detach().double().requires_grad_(),
        "lora_A": layer.lora_A.detach().double().requires_grad_(),
        "lora_B": layer.lora_B.detach().double().requires_grad_(),
    }
    bias = None
    if layer.bias is not None:
        bias = leaves["bias"] = layer.bias.detach().double().requires_grad_(bias_trainable)
    y = lora_linear_reference(
        leaves["x"], layer.weight.detach().double(), bias, leaves["lora_A"], leaves["lora_B"], layer.scaling
    )
    return y, leaves


def assert_matches_reference(layer, x, bias_trainable=False, atol=1e-5, rtol=1e-5):
    x = x.detach().requires_grad_()
    y = layer(x)
    expected, leaves = reference_output(layer, x, bias_trainable)
    assert y.shape == expected.shape
    torch.testing.assert_close(y.double(), expected, atol=atol, rtol=rtol)

    grad_out = torch.randn_like(expected)
    y.backward(grad_out.to(y.dtype))
    expected.backward(grad_out)
    actual_grads = {"x": x.grad, "lora_A": layer.lora_A.grad, "lora_B": layer.lora_B.grad}
    if bias_trainable:
        actual_grads["bias"] = layer.bias.grad
    for name, grad in actual_grads.items():
        assert grad is not None, f"no gradient for {name}"
        torch.testing.assert_close(grad.double(), leaves[name].grad, atol=atol, rtol=rtol, msg=name)
    assert layer.weight.grad is None
    if layer.bias is not None and not bias_trainable:
        assert layer.bias.grad is None


@pytest.mark.parametrize("r", [1, 3, 8, 17])
@pytest.mark.parametrize("bias", [False, True])
def test_odd_shapes_match_reference(r, bias):
    layer = make_layer(37, 23, r, bias=bias)
    assert_matches_reference(layer, torch.randn(11, 37))


def test_3d_input_matches_reference():
    layer = make_layer(16, 24, 4, bias=True)
    assert_matches_reference(layer, torch.randn(2, 5, 16))


def test_non_contiguous_input_matches_reference():
    layer = make_layer(16, 12, 4)
    x = torch.randn(16, 9)[:, :].t()  # [9, 16] with strides (1, 9)
    assert not x.is_contiguous()
    assert_matches_reference(layer, x)


def test_trainable_bias_gets_its_gradient():
    layer = make_layer(16, 12, 4, bias=True)
    layer.bias.requires_grad_(True)
    assert_matches_reference(layer, torch.randn(7, 16), bias_trainable=True)


@pytest.mark.parametrize("use_rslora, expected", [(False, 32 / 16), (True, 32 / math.sqrt(16))])
def test_scaling(use_rslora, expected):
    layer = FusedLoRALinear(8, 8, r=16, lora_alpha=32, use_rslora=use_rslora, backend="torch")
    assert layer.scaling == pytest.approx(expected)
    with torch.no_grad():
        layer.lora_B.normal_()
    assert_matches_reference(layer, torch.randn(3, 8))


@pytest.mark.parametrize("shape, r, bias", [((6, 32), 4, True), ((2, 3, 48), 17, False)])
def test_triton_backend_matches_reference(shape, r, bias):
    layer = make_layer(shape[-1], 40, r, bias=bias, backend="triton")
    assert_matches_reference(layer, torch.randn(*shape), atol=1e-4, rtol=1e-4)


def test_half_precision_forward_close_to_reference():
    layer = make_layer(32, 16, 4, bias=True).to(torch.bfloat16)
    x = torch.randn(5, 32, dtype=torch.bfloat16)
    expected, _ = reference_output(layer, x)
    torch.testing.assert_close(layer(x).double(), expected, atol=5e-2, rtol=2e-2)


def test_fresh_layer_is_the_base_linear_and_initialised_like_peft():
    layer = FusedLoRALinear(64, 32, r=8, bias=True, backend="torch")
    assert layer.lora_A.shape == (8, 64) and layer.lora_B.shape == (32, 8)
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) on fan_in=64
    assert 0.5 * bound < layer.lora_A.abs().max() <= bound
    x = torch.randn(4, 64)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
    names = {name: p.requires_grad for name, p in layer.named_parameters()}
    assert names == {"weight": False, "bias": False, "lora_A": True, "lora_B": True}


def test_adapters_are_fp32_on_16_bit_bases_as_in_peft():
    layer = FusedLoRALinear(8, 4, r=2, dtype=torch.bfloat16, device="cpu")
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    linear = nn.Linear(8, 4, dtype=torch.float16)
    assert FusedLoRALinear.from_linear(linear, r=2).lora_A.dtype == torch.float32
    assert FusedLoRALinear.from_linear(linear, r=2, adapter_dtype=torch.float16).lora_B.dtype == torch.float16
    assert FusedLoRALinear(8, 4, r=2).lora_A.dtype == torch.float32
    with pytest.raises(ValueError, match="adapter_dtype must be"):
        FusedLoRALinear(8, 4, r=2, adapter_dtype=torch.int8)


def test_small_updates_are_not_rounded_away_on_a_bf16_base():
    # With bf16 adapters most AdamW updates at lr 1e-4 are below half an ulp and vanish (72-76% of
    # lora_A unchanged after 10 steps); fp32 adapters, as PEFT keeps them, take every update.
    torch.manual_seed(0)
    layer = FusedLoRALinear(64, 32, r=8, lora_alpha=16, dtype=torch.bfloat16, backend="torch")
    nn.init.normal_(layer.lora_B, std=0.02)
    start = layer.lora_A.detach().clone()
    optimizer = torch.optim.AdamW([layer.lora_A, layer.lora_B], lr=1e-4)
    for _ in range(10):
        x = torch.randn(16, 64, dtype=torch.bfloat16)
        layer(x).float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    unchanged = (layer.lora_A.detach() == start).double().mean().item()
    assert unchanged < 0.01, f"{unchanged:.0%} of lora_A unchanged"


def test_from_linear_shares_storage_and_freezes_base():
    linear = nn.Linear(20, 10, bias=True)
    layer = FusedLoRALinear.from_linear(linear, r=4, lora_alpha=8, backend="torch")
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert layer.weight.data_ptr() == linear.weight.data_ptr()
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert (layer.in_features, layer.out_features, layer.scaling) == (20, 10, 2.0)

    x = torch.randn(3, 20)
    layer(x).sum().backward()
    assert linear.weight.grad is None and linear.bias.grad is None
    assert layer.lora_B.grad is not None


def test_merge_unmerge_round_trip():
    layer = make_layer(24, 16, 4, bias=True)
    original_weight = layer.weight.detach().clone()
    x = torch.randn(5, 24)
    unmerged_output = layer(x)

    layer.merge()
    assert layer.merged
    assert not torch.allclose(layer.weight, original_weight)
    torch.testing.assert_close(layer(x), unmerged_output, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()

    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.weight, original_weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), unmerged_output)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


def test_dropout_only_in_training_and_only_on_lora_path():
    layer = make_layer(32, 16, 4, lora_dropout=0.5)
    x = torch.randn(8, 32)
    layer.eval()
    eval_output = layer(x)
    expected, _ = reference_output(layer, x)
    torch.testing.assert_close(eval_output.double(), expected, atol=1e-5, rtol=1e-5)

    layer.train()
    train_output = layer(x)
    assert not torch.allclose(train_output, eval_output, atol=1e-3)

    with torch.no_grad():
        layer.lora_B.zero_()  # without the LoRA path, dropout must leave the base output untouched
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight))


def test_extra_repr():
    text = repr(FusedLoRALinear(8, 4, r=2, lora_alpha=4, lora_dropout=0.1, use_rslora=True))
    for fragment in ("in_features=8", "out_features=4", "r=2", "lora_alpha=4", "lora_dropout=0.1",
                     "use_rslora=True", "merged=False"):
        assert fragment in text


@pytest.mark.parametrize("r", [0, -1, 257, 2.0, True])
def test_bad_rank(r):
    with pytest.raises(ValueError, match=r"r \(the LoRA rank\) must be an integer in 1\.\.256"):
        FusedLoRALinear(8, 8, r=r)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_bad_dropout(p):
    with pytest.raises(ValueError, match=r"lora_dropout must be a probability in \[0, 1\)"):
        FusedLoRALinear(8, 8, r=2, lora_dropout=p)
    with pytest.raises(ValueError, match="lora_dropout"):
        FusedLoRALinear.from_linear(nn.Linear(8, 8), r=2, lora_dropout=p)


def test_bad_alpha_backend_and_sizes():
    with pytest.raises(ValueError, match="lora_alpha must be a positive number"):
        FusedLoRALinear(8, 8, r=2, lora_alpha=0)
    with pytest.raises(ValueError, match="backend must be one of"):
        FusedLoRALinear(8, 8, r=2, backend="bogus")
    with pytest.raises(ValueError, match="in_features must be a positive integer"):
        FusedLoRALinear(0, 8)
    with pytest.raises(TypeError, match="needs an nn.Linear"):
        FusedLoRALinear.from_linear(nn.Conv1d(4, 4, 1))


def test_wrong_in_features():
    layer = FusedLoRALinear(8, 4, r=2)
    with pytest.raises(ValueError, match=r"expects input of shape \[\.\.\., in_features=8\], got x of shape \(3, 7\)"):
        layer(torch.randn(3, 7))
    layer.merge()
    with pytest.raises(ValueError, match="in_features=8"):
        layer(torch.randn(3, 7))


def test_dtype_mismatch():
    layer = FusedLoRALinear(8, 4, r=2)
    with pytest.raises(TypeError, match=r"x.dtype must equal the layer's dtype torch.float32, got x.dtype=torch.bfloat16"):
        layer(torch.randn(3, 8, dtype=torch.bfloat16))


def test_autocast_casts_like_f_linear():
    layer = make_layer(32, 16, 4, bias=True)
    x = torch.randn(5, 32)
    expected, _ = reference_output(layer, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), expected, atol=5e-2, rtol=2e-2)
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == layer.lora_B.grad.dtype == torch.float32
    assert layer.lora_B.grad.abs().sum() > 0
