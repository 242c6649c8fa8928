"""Fused LoRA linear op (both backends) against the float64 unfused reference: forward and every
gradient, on fresh random inputs, odd shapes, several ranks and dtypes, with and without dropout.

The Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py); the checks are in
tests/lora_checks.py, shared with the CUDA backend's tests.
"""

from __future__ import annotations

import pytest
import torch

from lora_checks import DTYPES, check_against_reference, keep_mask_for, make_inputs, run_fused
from lorafusion.kernels import fused_lora_linear, lora_linear_reference, torch_keep_mask
from lorafusion.kernels.keep_mask import triton_keep_mask
from lorafusion.kernels.utils import new_dropout_seed


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
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_fp32_adapters_on_a_16_bit_base(backend, dtype, p):
    # PEFT keeps adapters in fp32 on a 16-bit base, so that small updates are not rounded away:
    # they compute in the base's dtype (as under autocast) and their gradients come back in fp32.
    check_against_reference(backend, (3, 19), 40, 24, 8, DTYPES[dtype], True, p, adapter_dtype=torch.float32)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_output_can_be_modified_in_place(backend):
    # Falcon adds the attention output into the MLP's output in place: allowed on nn.Linear's
    # output, so on ours too (no view created inside the autograd Function).
    x, weight, b, lora_A, lora_B, _ = make_inputs((2, 5), 16, 12, 4, torch.float32)
    lora_A.requires_grad_()
    residual = torch.randn(2, 5, 12)
    y = fused_lora_linear(x, weight, b, lora_A, lora_B, 1.0, 0.0, backend=backend)
    y += residual
    y.sum().backward()
    expected = lora_linear_reference(x, weight, b, lora_A.detach().requires_grad_(), lora_B, 1.0)
    torch.testing.assert_close(y.detach(), expected.detach() + residual)
    assert lora_A.grad is not None


@pytest.mark.parametrize("rows, cols", [(50, 70), (3, 5), (17, 129)])
def test_triton_and_torch_backends_draw_the_same_mask(rows, cols):
    # One Philox layout (four words per call) in every backend: a run keeps its dropout when it
    # moves between the Triton kernels and the torch backend, and the CUDA backend is checked
    # against the same bits in test_cuda_extension.py.
    cpu = torch.device("cpu")
    for seed, p in ((7, 0.1), (2**31 - 2, 0.5)):
        assert torch.equal(triton_keep_mask(seed, rows, cols, p, cpu), torch_keep_mask(seed, (rows, cols), p, cpu))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_a_dropped_nan_stays_nan_as_in_peft(backend):
    # Dropout multiplies by the 0/1 mask, as torch's (and so PEFT's) dropout does: a NaN or inf in
    # X is never silently zeroed because its element happened to be dropped.
    x, weight, b, lora_A, lora_B, grad_out = make_inputs((8,), 32, 16, 4, torch.float32)
    torch.manual_seed(3)
    seed = int(new_dropout_seed())
    keep = torch_keep_mask(seed, tuple(x.shape), 0.5, x.device)
    row, col = (~keep).nonzero()[0].tolist()
    x[row, col] = float("nan")
    lora_A.requires_grad_()
    torch.manual_seed(3)
    y = fused_lora_linear(x, weight, b, lora_A, lora_B, 1.0, 0.5, backend=backend)
    y.sum().backward()
    other_cols = [c for c in range(x.shape[1]) if c != col]
    assert torch.isnan(lora_A.grad[:, col]).all()
    assert not torch.isnan(lora_A.grad[:, other_cols]).any()


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
    assert extra_bytes <= (64 * 4 + lora_A.numel() + lora_B.numel()) * 4 + 8  # S, A, B and the int64 seed only


def test_empty_input():
    x, weight, b, lora_A, lora_B, _ = make_inputs((0,), 8, 6, 2, torch.float32)
    assert fused_lora_linear(x, weight, b, lora_A, lora_B, 1.0, backend="triton").shape == (0, 6)
