"""NF4 storage against bitsandbytes: quantization writes bitsandbytes' bytes, and dequantization
(Triton kernel under the interpreter, and the torch backend) equals bitsandbytes' bit for bit.

The oracle is `bitsandbytes.functional.dequantize_4bit` on the CPU. Its native AVX-512 CPU kernel
(bitsandbytes 0.50.2) is wrong when quantization blocks straddle rows (in_features not a multiple
of blocksize); bitsandbytes itself falls back to its pure-torch kernel, which is right, only for
blocksize >= 2048 or an odd row length. For the other straddling cases the oracle is that
pure-torch kernel, called directly.
"""

from __future__ import annotations

import bitsandbytes.functional as bnbf
import pytest
import torch
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

from lorafusion.kernels.nf4 import NF4_BLOCKSIZES, dynamic_code, nf4_code, quantize_nf4
from lorafusion.qlora import nf4_from_bnb, nf4_to_bnb

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def bnb_quantize(weight, blocksize, double_quant):
    return bnbf.quantize_4bit(weight, quant_type="nf4", blocksize=blocksize, compress_statistics=double_quant)


def bnb_dequantize(packed, quant_state):
    in_features = quant_state.shape[-1]
    native_kernel_is_wrong = in_features % 2 == 0 and in_features % quant_state.blocksize != 0 and quant_state.blocksize < 2048
    if not native_kernel_is_wrong:
        return bnbf.dequantize_4bit(packed, quant_state)
    absmax = quant_state.absmax
    if quant_state.nested:
        absmax = bnbf.dequantize_blockwise(quant_state.absmax, quant_state.state2) + quant_state.offset
    pure_torch = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)  # skip torch.compile
    return pure_torch(packed.reshape(-1), absmax, quant_state.code, quant_state.blocksize, quant_state.shape, quant_state.dtype)


def random_weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=g) * 0.05
    weight[0, 0] = 0.3  # an outlier, as real weights have
    return weight.to(dtype)


def test_tables_equal_bitsandbytes():
    assert torch.equal(nf4_code(), bnbf.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_code(), bnbf.create_dynamic_map())


# Odd sizes (odd element count, blocks spanning rows, a partial last block) and aligned ones.
SHAPES = [(3, 1024), (7, 33), (5, 96), (1, 1)]


@pytest.mark.parametrize("double_quant", [False, True], ids=["single", "double"])
@pytest.mark.parametrize("blocksize", NF4_BLOCKSIZES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_dequantize_equals_bitsandbytes(shape, blocksize, double_quant):
    for dtype_index, dtype in enumerate(DTYPES.values()):
        packed, quant_state = bnb_quantize(random_weight(shape, dtype, seed=dtype_index), blocksize, double_quant)
        expected = bnb_dequantize(packed, quant_state)
        weight = nf4_from_bnb(packed, quant_state)
        assert weight.double_quant == double_quant
        for backend in ("triton", "torch"):
            got = weight.dequantize(backend=backend)
            assert got.dtype == dtype and got.shape == shape
            assert torch.equal(got, expected), f"{backend} {dtype}: {(got != expected).sum()} elements differ"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_dequantize_rounds_to_nearest_even(dtype):
    # Blocks with a wide absmax spread: most fp32 products are not representable in 16 bits, so
    # a truncating cast (the interpreter's own fp32 -> bf16) would differ in about half of them.
    source = torch.randn(16, 256) * torch.logspace(-3, 2, 256)
    weight = quantize_nf4(source, blocksize=32, compute_dtype=torch.float32)
    exact = weight.dequantize(backend="triton")
    weight.to(dtype)
    assert torch.equal(weight.dequantize(backend="triton"), exact.to(dtype))


@pytest.mark.parametrize("blocksize", [32, 64, 4096])
@pytest.mark.parametrize("shape", [(6, 128), (7, 33), (1, 1)], ids=str)
def test_quantize_writes_bitsandbytes_bytes(shape, blocksize):
    for dtype in DTYPES.values():
        source = random_weight(shape, dtype, seed=blocksize)
        for double_quant in (False, True):
            packed, quant_state = bnb_quantize(source, blocksize, double_quant)
            ours = quantize_nf4(source, blocksize=blocksize, double_quant=double_quant)
            assert torch.equal(ours.packed, packed.reshape(-1))
            assert ours.dtype == dtype and ours.shape == shape
            if not double_quant:
                assert torch.equal(ours.absmax, quant_state.absmax)
                continue
            assert torch.equal(ours.offset, quant_state.offset)
            assert torch.equal(ours.nested_absmax, quant_state.state2.absmax)
            # bitsandbytes' native CPU 8-bit quantizer searches its map approximately and now and
            # then picks a neighbour of the nearest level; ours picks the nearest, as its pure-torch
            # quantizer does. Both are valid encodings of the same statistics.
            nested_absmax = quant_state.state2.absmax.repeat_interleave(256)[: ours.absmax.numel()]
            target = (_fp32_absmax(source, blocksize) - quant_state.offset) * (1.0 / nested_absmax.clamp(min=1e-38))
            ours_level = ours.nested_code[ours.absmax.long()]
            bnb_level = quant_state.state2.code[quant_state.absmax.long()]
            assert ((ours_level - target).abs() <= (bnb_level - target).abs()).all()
            if nested_absmax.max() > 0:  # all-equal statistics (one block) make every level exact
                assert (ours.absmax.int() - quant_state.absmax.int()).abs().max() <= 1


def _fp32_absmax(weight, blocksize):
    flat = weight.reshape(-1).float().abs()
    flat = torch.nn.functional.pad(flat, (0, -flat.numel() % blocksize))
    return flat.view(-1, blocksize).amax(dim=1)


def test_bitsandbytes_reads_our_weights():
    source = random_weight((12, 128), torch.bfloat16)
    for double_quant in (False, True):
        ours = quantize_nf4(source, blocksize=64, double_quant=double_quant)
        packed, quant_state = nf4_to_bnb(ours)
        assert torch.equal(bnbf.dequantize_4bit(packed, quant_state), ours.dequantize(backend="triton"))


def test_out_workspace_is_filled_in_place():
    weight = quantize_nf4(random_weight((4, 64), torch.float16))
    out = torch.full((4, 64), float("nan"), dtype=torch.float16)
    assert weight.dequantize(out=out, backend="triton") is out
    assert torch.equal(out, weight.dequantize(backend="torch"))
    with pytest.raises(ValueError, match="out must be a contiguous torch.float16 tensor of shape"):
        weight.dequantize(out=torch.empty(64, 4, dtype=torch.float16))


def test_to_changes_compute_dtype_and_keeps_statistics():
    weight = quantize_nf4(random_weight((4, 64), torch.float32))
    absmax = weight.absmax.clone()
    weight.to(torch.bfloat16)
    assert weight.dtype == torch.bfloat16 and weight.absmax.dtype == torch.uint8
    assert torch.equal(weight.absmax, absmax) and weight.offset.dtype == torch.float32
    assert weight.dequantize().dtype == torch.bfloat16


def test_bytes_per_parameter_with_double_quant():
    numel = 1024 * 1024
    blocks = numel // 64
    double = quantize_nf4(torch.randn(1024, 1024), blocksize=64, double_quant=True)
    tables = 16 * 4 + 256 * 4 + 4  # NF4 table, dynamic map, offset
    assert double.nbytes() == numel // 2 + blocks + 4 * (blocks // 256) + tables
    assert double.nbytes() / numel < 0.53
    single = quantize_nf4(torch.randn(1024, 1024), blocksize=64, double_quant=False)
    assert single.nbytes() == numel // 2 + 4 * blocks + 16 * 4


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"blocksize": 48}, ValueError, r"blocksize must be one of \(32, 64, 128, 256, 512, 1024, 2048, 4096\)"),
        ({"blocksize": 8192}, ValueError, "blocksize must be one of"),
        ({"weight": torch.randn(4, 4, 4)}, ValueError, r"weight must be a 2-D tensor \[out_features, in_features\]"),
        ({"weight": torch.ones(4, 64, dtype=torch.int32)}, TypeError, "weight.dtype must be float32, float16 or bfloat16"),
        ({"weight": torch.full((4, 64), float("inf"))}, ValueError, "inf or NaN"),
    ],
)
def test_bad_inputs_are_named(kwargs, error, message):
    arguments = {"weight": torch.randn(4, 64)} | kwargs
    with pytest.raises(error, match=message):
        quantize_nf4(**arguments)


def test_fp8_base_weights_are_refused():
    float8 = torch.randn(4, 64).to(torch.float8_e4m3fn)
    with pytest.raises(TypeError, match="weight.dtype must be float32, float16 or bfloat16.*float8_e4m3fn"):
        quantize_nf4(float8)


# ---------------------------------------------------------------------------------------------
# The fused LoRA op over an NF4 base: forward and gradients against the float64 reference on the
# dequantized weight; the dequantized weight is not kept between forward and backward.
# ---------------------------------------------------------------------------------------------


def lora_inputs(tokens, in_features, out_features, rank, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    x = rand(tokens, in_features)
    bias = rand(out_features)
    lora_A = rand(rank, in_features, scale=in_features**-0.5)
    lora_B = rand(out_features, rank, scale=rank**-0.5)
    grad_out = rand(tokens, out_features)
    weight = quantize_nf4(rand(out_features, in_features, scale=in_features**-0.5), blocksize=64)
    return x, weight, bias, lora_A, lora_B, grad_out


def forward_backward(function, x, weight, bias, lora_A, lora_B, grad_out, dtype):
    leaves = [t.to(dtype).clone().requires_grad_() for t in (x, bias, lora_A, lora_B)]
    y = function(leaves[0], weight, leaves[1], leaves[2], leaves[3])
    y.backward(grad_out.to(dtype))
    return [y.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_fused_lora_over_nf4_matches_reference(backend, dtype):
    from lorafusion.kernels import fused_lora_linear, lora_linear_reference

    x, weight, bias, lora_A, lora_B, grad_out = lora_inputs(40, 96, 72, 8, dtype)
    dequantized = weight.dequantize(backend="torch")
    scaling = 2.0

    def fused(x, w, b, a, b_):
        return fused_lora_linear(x, w, b, a, b_, scaling, backend=backend)

    def reference(x, w, b, a, b_):
        return lora_linear_reference(x, w.to(x.dtype), b, a, b_, scaling)

    got = forward_backward(fused, x, weight, bias, lora_A, lora_B, grad_out, dtype)
    exact = forward_backward(reference, x, dequantized, bias, lora_A, lora_B, grad_out, torch.float64)
    same_dtype = forward_backward(reference, x, dequantized, bias, lora_A, lora_B, grad_out, dtype)
    for name, value, truth, torch_value in zip(("y", "dx", "dbias", "dA", "dB"), got, exact, same_dtype):
        error = (value.double() - truth).abs().max().item()
        magnitude = truth.abs().max().item()
        if dtype == torch.float32:
            bound = 1e-5 * max(magnitude, 1.0)
        else:  # as accurate as torch in that dtype, plus one ulp for the interpreter's truncating casts
            ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
            bound = 4 * (torch_value.double() - truth).abs().max().item() + ulp * magnitude
        assert error <= bound, f"{name}: error {error:.3g} > bound {bound:.3g}"


def test_nf4_weight_is_dequantized_again_in_backward_not_saved():
    from lorafusion.kernels import fused_lora_linear

    x, weight, bias, lora_A, lora_B, grad_out = lora_inputs(16, 64, 48, 4, torch.float32)
    other = quantize_nf4(torch.randn(48, 64))  # a second layer of the same shape, sharing the workspace
    lora_A.requires_grad_()
    x.requires_grad_()
    y = fused_lora_linear(x, weight, bias, lora_A, lora_B, 1.0, backend="triton")
    saved = y.grad_fn.saved_tensors
    assert all(t is None or t.numel() != weight.numel() for t in saved), "a dequantized weight was saved"
    fused_lora_linear(x.detach(), other, None, lora_A.detach(), lora_B, 1.0, backend="triton")  # overwrites it
    y.backward(grad_out)
    dequantized = weight.dequantize()
    expected_dx = grad_out @ dequantized + (grad_out @ lora_B) @ lora_A.detach()
    torch.testing.assert_close(x.grad, expected_dx, rtol=1e-5, atol=1e-5)


def test_layers_of_one_shape_share_the_workspace():
    from lorafusion.kernels.nf4 import dequantize_workspace

    first = dequantize_workspace(torch.Size((48, 64)), torch.float16, torch.device("cpu"))
    second = dequantize_workspace(torch.Size((32, 64)), torch.float16, torch.device("cpu"))
    assert first.data_ptr() == second.data_ptr()


def test_fused_lora_refuses_nf4_with_another_compute_dtype():
    from lorafusion.kernels import fused_lora_linear

    x, weight, bias, lora_A, lora_B, _ = lora_inputs(4, 64, 48, 4, torch.float32)
    weight.to(torch.bfloat16)
    with pytest.raises(TypeError, match=r"weight.dtype \(torch.bfloat16\) must match x.dtype \(torch.float32\)"):
        fused_lora_linear(x, weight, None, lora_A, lora_B, 1.0, backend="torch")
