"""The Triton kernels compiled and run on a real GPU (skipped without one).

The other kernel tests run under the Triton interpreter on CPU tensors, which enforces none of the
hardware's rules (shared memory, layouts, bf16 tensor-core dots). Here every op runs on CUDA with
TRITON_INTERPRET=0 (benchmarks/gpu_check.py runs this file): fp32, fp16 and bf16 against the
float64 references, forward and every gradient, with and without dropout, plus one large,
training-sized shape per op.
"""

from __future__ import annotations

import os

import pytest
import torch

from lora_checks import DTYPES, assert_as_accurate_as_torch, check_against_reference
from lorafusion.kernels import fused_lora_linear, lora_linear_reference
from lorafusion.kernels.keep_mask import triton_keep_mask
from lorafusion.kernels.multi_lora_linear import fused_multi_lora_linear
from lorafusion.kernels.nf4 import quantize_nf4
from lorafusion.kernels.reference import nf4_dequantize_reference
from lorafusion.kernels.segments import build_segment_meta

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs a CUDA device with TRITON_INTERPRET=0 (compiled kernels on the hardware)",
)
CUDA = torch.device("cuda")
LARGE_TOKENS, LARGE_HIDDEN = 8192, 4096


# ---- single-adapter op -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("rank", [16, 17, 64])
def test_lora_linear_matches_float64(dtype, p, rank):
    check_against_reference("triton", (3, 171), 320, 200, rank, DTYPES[dtype], bias=True, p=p, device=CUDA)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_single_triton_gemm_forward_matches_float64(dtype, p):
    check_against_reference(
        "triton", (257,), 192, 320, 16, DTYPES[dtype], bias=True, p=p, forward_impl="triton_gemm", device=CUDA
    )


@pytest.mark.parametrize("forward_impl", ["cublas", "triton_gemm"])
def test_lora_linear_large_shape(forward_impl):
    check_against_reference(
        "triton", (LARGE_TOKENS,), LARGE_HIDDEN, LARGE_HIDDEN, 64, torch.bfloat16, bias=False, p=0.1,
        forward_impl=forward_impl, device=CUDA,
    )


# ---- multi-adapter op --------------------------------------------------------------------------


def _check_multi(tokens_per_segment, adapters, ranks, dropout_ps, in_features, out_features, dtype, seed=77):
    """fused_multi_lora_linear on CUDA against each segment through the float64 single-adapter
    reference (and the same in `dtype`, for the error torch itself makes)."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(CUDA)

    tokens = sum(tokens_per_segment)
    scalings = [2.0 / r for r in ranks]
    x = rand(tokens, in_features)
    weight = rand(out_features, in_features, scale=in_features**-0.5)
    bias = rand(out_features)
    As = [rand(r, in_features, scale=in_features**-0.5) for r in ranks]
    Bs = [rand(out_features, r, scale=r**-0.5) for r in ranks]
    grad_out = rand(tokens, out_features)
    meta = build_segment_meta(adapters, tokens_per_segment, ranks, scalings, dropout_ps, CUDA)
    keep_by_p = {p: triton_keep_mask(seed, tokens, in_features, p, CUDA) for p in set(dropout_ps) if p > 0}

    leaves = [t.clone().requires_grad_() for t in (x, torch.cat(As), torch.cat(Bs, dim=1), bias)]
    y = fused_multi_lora_linear(leaves[0], weight, leaves[3], leaves[1], leaves[2], meta, backend="triton", dropout_seed=seed)
    y.backward(grad_out)
    fused = [y.detach()] + [t.grad for t in leaves]

    def reference(ref_dtype):
        x_r, b_r = (t.to(ref_dtype).clone().requires_grad_() for t in (x, bias))
        w_r = weight.to(ref_dtype)
        As_r = [a.to(ref_dtype).clone().requires_grad_() for a in As]
        Bs_r = [b.to(ref_dtype).clone().requires_grad_() for b in Bs]
        outputs, start = [], 0
        for adapter, length in zip(adapters, tokens_per_segment):
            rows = slice(start, start + length)
            p = dropout_ps[adapter]
            keep = keep_by_p[p][rows] if p > 0 else None
            outputs.append(lora_linear_reference(x_r[rows], w_r, b_r, As_r[adapter], Bs_r[adapter], scalings[adapter], keep, p))
            start += length
        y_r = torch.cat(outputs)
        y_r.backward(grad_out.to(ref_dtype))
        zeros = lambda t: t.grad if t.grad is not None else torch.zeros_like(t)  # noqa: E731
        return [y_r.detach(), x_r.grad, torch.cat([zeros(a) for a in As_r]), torch.cat([zeros(b) for b in Bs_r], dim=1), b_r.grad]

    exact, same_dtype = reference(torch.float64), reference(dtype)
    for name, f, e, s in zip(("y", "dx", "dA_cat", "dB_cat", "dbias"), fused, exact, same_dtype):
        assert f is not None and f.dtype == dtype, name
        assert_as_accurate_as_torch(name, f, e, s)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_multi_lora_linear_matches_float64(dtype):
    # Segments straddle the 64-row blocks; adapter 1 owns two segments, one of length 1.
    _check_multi([65, 1, 130, 0, 37], [1, 1, 0, 2, 2], [16, 8, 33], [0.1, 0.0, 0.25], 192, 160, DTYPES[dtype])


def test_multi_lora_linear_large_shape():
    share = LARGE_TOKENS // 4
    _check_multi([share] * 4, [0, 1, 2, 3], [16, 32, 64, 16], [0.1] * 4, LARGE_HIDDEN, LARGE_HIDDEN, torch.bfloat16)


# ---- NF4 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("blocksize", [64, 128, 256])
@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_dequantization_is_bit_exact(dtype, blocksize, double_quant):
    weight = quantize_nf4(torch.randn(300, 517, device=CUDA), blocksize, double_quant, compute_dtype=DTYPES[dtype])
    assert torch.equal(weight.dequantize(backend="triton"), nf4_dequantize_reference(weight))


def test_nf4_dequantization_large_shape():
    weight = quantize_nf4(torch.randn(LARGE_HIDDEN * 2, LARGE_HIDDEN * 2, device=CUDA), compute_dtype=torch.bfloat16)
    assert torch.equal(weight.dequantize(backend="triton"), nf4_dequantize_reference(weight))


@pytest.mark.parametrize("tokens,hidden", [(257, 320), (LARGE_TOKENS, LARGE_HIDDEN)])
def test_lora_on_an_nf4_base_equals_lora_on_its_dequantized_weight(tokens, hidden):
    weight = quantize_nf4(torch.randn(hidden, hidden, device=CUDA) * hidden**-0.5, compute_dtype=torch.bfloat16)
    dense = weight.dequantize(backend="triton")
    g = torch.Generator(device=CUDA).manual_seed(3)
    x = torch.randn(tokens, hidden, device=CUDA, generator=g).bfloat16()
    A = (torch.randn(16, hidden, device=CUDA, generator=g) * hidden**-0.5).bfloat16()
    B = (torch.randn(hidden, 16, device=CUDA, generator=g) * 0.25).bfloat16()
    dy = torch.randn(tokens, hidden, device=CUDA, generator=g).bfloat16()
    results = []
    for base in (weight, dense):
        leaves = [t.clone().requires_grad_() for t in (x, A, B)]
        torch.manual_seed(11)  # the same dropout seed for both
        y = fused_lora_linear(leaves[0], base, None, leaves[1], leaves[2], 2.0, 0.1, backend="triton")
        y.backward(dy)
        results.append([y.detach()] + [t.grad for t in leaves])
    for name, quantized, plain in zip(("y", "dx", "dA", "dB"), *results):
        assert torch.equal(quantized, plain), name
