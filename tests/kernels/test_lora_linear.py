"""Fused LoRA linear op (both backends) against the float64 unfused reference: forward and every
gradient, on fresh random inputs, odd shapes, several ranks and dtypes, with and without dropout.

The Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py). Low-precision results are
held to "as accurate as torch itself in that dtype": the error of the fused op against float64
must stay within a small multiple of the error of the unfused torch computation in the same dtype.
"""

from __future__ import annotations

import pytest
import torch

from lorafusion.kernels import fused_lora_linear, lora_linear_reference, torch_keep_mask
from lorafusion.kernels.keep_mask import triton_keep_mask
from lorafusion.kernels.utils import new_dropout_seed

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def make_inputs(lead, in_features, out_features, rank, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    x = rand(*lead, in_features)
    weight = rand(out_features, in_features, scale=in_features**-0.5)
    b = rand(out_features) if bias else None
    lora_A = rand(rank, in_features, scale=in_features**-0.5)
    lora_B = rand(out_features, rank, scale=rank**-0.5)  # non-zero, unlike a fresh adapter
    grad_out = rand(*lead, out_features)
    return x, weight, b, lora_A, lora_B, grad_out


def run_fused(x, weight, b, lora_A, lora_B, grad_out, scaling, p, backend, forward_impl="cublas", dropout_seed=123):
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, lora_A, lora_B, b)]
    torch.manual_seed(dropout_seed)
    y = fused_lora_linear(
        leaves[0], weight, leaves[3], leaves[1], leaves[2], scaling, p, backend=backend, forward_impl=forward_impl
    )
    y.backward(grad_out)
    return y.detach(), [t.grad if t is not None else None for t in leaves]


def run_reference(x, weight, b, lora_A, lora_B, grad_out, scaling, keep, p, dtype):
    leaves = [t.to(dtype).clone().requires_grad_() if t is not None else None for t in (x, lora_A, lora_B, b)]
    y = lora_linear_reference(leaves[0], weight.to(dtype), leaves[3], leaves[1], leaves[2], scaling, keep, p)
    y.backward(grad_out.to(dtype))
    return y.detach(), [t.grad if t is not None else None for t in leaves]


def keep_mask_for(backend, tokens, in_features, p, dropout_seed=123):
    if p == 0.0:
        return None
    torch.manual_seed(dropout_seed)
    seed = new_dropout_seed(torch.device("cpu"))
    if backend == "triton":
        return triton_keep_mask(seed, tokens, in_features, p, torch.device("cpu"))
    return torch_keep_mask(seed, (tokens, in_features), p, torch.device("cpu"))


def assert_as_accurate_as_torch(name, fused, exact, same_dtype_torch):
    fused_err = (fused.double() - exact).abs().max().item()
    torch_err = (same_dtype_torch.double() - exact).abs().max().item()
    magnitude = exact.abs().max().item()
    if same_dtype_torch.dtype == torch.float32:
        bound = 1e-5 * max(magnitude, 1.0)
    else:
        # Summation order and where rounding happens differ from torch's; a few times torch's own
        # error, plus one ulp of the result's magnitude for the interpreter's truncating casts.
        ulp = 2.0**-7 if same_dtype_torch.dtype == torch.bfloat16 else 2.0**-10
        bound = 4 * torch_err + ulp * magnitude
    assert fused_err <= bound, f"{name}: error {fused_err:.3g} > bound {bound:.3g} (torch's own: {torch_err:.3g})"


def check_against_reference(backend, lead, in_features, out_features, rank, dtype, bias, p, forward_impl="cublas"):
    x, weight, b, lora_A, lora_B, grad_out = make_inputs(lead, in_features, out_features, rank, dtype, bias)
    scaling = 16.0 / rank
    tokens = x.numel() // in_features
    keep = keep_mask_for(backend, tokens, in_features, p)
    y, grads = run_fused(x, weight, b, lora_A, lora_B, grad_out, scaling, p, backend, forward_impl)
    y64, grads64 = run_reference(x, weight, b, lora_A, lora_B, grad_out, scaling, keep, p, torch.float64)
    y_lp, grads_lp = run_reference(x, weight, b, lora_A, lora_B, grad_out, scaling, keep, p, dtype)
    assert y.dtype == dtype and y.shape == (*lead, out_features)
    assert_as_accurate_as_torch("y", y, y64, y_lp)
    for name, g, g64, g_lp in zip(("dx", "dA", "dB", "dbias"), grads, grads64, grads_lp):
        if g64 is None:
            assert g is None
            continue
        assert g is not None and g.dtype == dtype, name
        assert_as_accurate_as_torch(name, g, g64, g_lp)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize(
    "lead,in_features,out_features,rank",
    [
        ((37,), 45, 29, 1),
        ((5, 7), 33, 50, 3),
        ((2, 3, 11), 64, 48, 16),
        ((70,), 19, 130, 17),
        ((40,), 72, 24, 64),
    ],
)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_fp32_matches_float64_reference(backend, lead, in_features, out_features, rank, p):
    check_against_reference(backend, lead, in_features, out_features, rank, torch.float32, bias=True, p=p)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_low_precision_as_accurate_as_torch(backend, dtype, p):
    check_against_reference(backend, (3, 29), 80, 56, 12, DTYPES[dtype], bias=False, p=p)


@pytest.mark.parametrize("rank", [100, 256])
def test_large_ranks(rank):
    check_against_reference("triton", (24,), 40, 36, rank, torch.float32, bias=False, p=0.5)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_single_triton_gemm_forward(bias, p):
    check_against_reference("triton", (2, 33), 47, 70, 9, torch.float32, bias=bias, p=p, forward_impl="triton_gemm")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_non_contiguous_input(backend):
    x, weight, b, lora_A, lora_B, grad_out = make_inputs((43,), 31, 26, 5, torch.float32)
    x_t = x.t().contiguous().t()  # same values, column-major strides
    assert not x_t.is_contiguous()
    y, grads = run_fused(x_t, weight, b, lora_A, lora_B, grad_out, 2.0, 0.2, backend)
    y_ref, grads_ref = run_fused(x, weight, b, lora_A, lora_B, grad_out, 2.0, 0.2, backend)
    torch.testing.assert_close(y, y_ref)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_lora_gradients_when_input_and_base_are_frozen(backend):
    x, weight, b, lora_A, lora_B, grad_out = make_inputs((9,), 16, 12, 4, torch.float32)
    lora_A.requires_grad_()
    lora_B.requires_grad_()
    y = fused_lora_linear(x, weight, b, lora_A, lora_B, 1.0, 0.1, backend=backend)
    y.backward(grad_out)
    assert lora_A.grad is not None and lora_A.grad.abs().sum() > 0
    assert lora_B.grad is not None and lora_B.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keeps_about_one_minus_p(backend, p):
    mask = keep_mask_for(backend, 200, 150, p, dropout_seed=7)
    kept = mask.double().mean().item()
    # 30,000 Bernoulli draws: 5 standard deviations.
    assert abs(kept - (1 - p)) < 5 * (p * (1 - p) / mask.numel()) ** 0.5


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_dropout_is_deterministic_for_a_seed(backend):
    x, weight, b, lora_A, lora_B, grad_out = make_inputs((21,), 30, 20, 6, torch.float32)
    first = run_fused(x, weight, b, lora_A, lora_B, grad_out, 1.0, 0.4, backend, dropout_seed=5)
    again = run_fused(x, weight, b, lora_A, lora_B, grad_out, 1.0, 0.4, backend, dropout_seed=5)
    other = run_fused(x, weight, b, lora_A, lora_B, grad_out, 1.0, 0.4, backend, dropout_seed=6)
    assert torch.equal(first[0], again[0])
    assert all(torch.equal(g1, g2) for g1, g2 in zip(first[1], again[1]))
    assert not torch.equal(first[0], other[0])


def test_triton_mask_is_independent_of_tiling():
    # The mask is a function of (seed, element), so kernels tiled differently regenerate the same bits.
    cpu = torch.device("cpu")
    reference = triton_keep_mask(99, 50, 70, 0.5, cpu, block=(32, 32))
    for block in ((16, 64), (64, 16), (16, 16)):
        assert torch.equal(triton_keep_mask(99, 50, 70, 0.5, cpu, block=block), reference), block
    assert 0.4 < reference.double().mean() < 0.6
    assert not torch.equal(triton_keep_mask(100, 50, 70, 0.5, cpu), reference)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_no_input_sized_tensor_saved_besides_x(backend):
    x, weight, b, lora_A, lora_B, _ = make_inputs((64,), 48, 40, 4, torch.float32)
    x.requires_grad_()
    lora_A.requires_grad_()
    lora_B.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fused_lora_linear(x, weight, b, lora_A, lora_B, 1.0, 0.5, backend=backend)
    x_sized = [t for t in saved if t.numel() >= x.numel()]
    assert all(t.data_ptr() in (x.data_ptr(), weight.data_ptr()) for t in x_sized), [t.shape for t in x_sized]
    extra_bytes = sum(t.numel() * t.element_size() for t in saved if t.data_ptr() not in (x.data_ptr(), weight.data_ptr()))
    assert extra_bytes <= (64 * 4 + lora_A.numel() + lora_B.numel()) * 4  # S, A, B only


def test_empty_input():
    x, weight, b, lora_A, lora_B, _ = make_inputs((0,), 8, 6, 2, torch.float32)
    assert fused_lora_linear(x, weight, b, lora_A, lora_B, 1.0, backend="triton").shape == (0, 6)
