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
from lorafusion.kernels.reference import nf4_dequantize_reference, torch_keep_mask
from lorafusion.kernels.segments import build_segment_meta, sample_dropout_rows

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


def _check_multi(tokens_per_segment, adapters, ranks, dropout_ps, in_features, out_features, dtype, seed=77, keyed=False):
    """fused_multi_lora_linear on CUDA against each segment through the float64 single-adapter
    reference (and the same in `dtype`, for the error torch itself makes). keyed: each segment is a
    sample whose dropout masks are named by its own key and token positions (as the runtime packs)."""
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
    rows = None
    if keyed:
        keys = [(-1) ** i * (2**62 + 977 * i) for i in range(len(tokens_per_segment))]
        rows = sample_dropout_rows(keys, list(tokens_per_segment), CUDA)
    meta = build_segment_meta(adapters, tokens_per_segment, ranks, scalings, dropout_ps, CUDA, dropout_rows=rows)
    names = {} if rows is None else {"row_positions": rows[0], "row_keys": rows[1]}
    keep_by_p = {p: triton_keep_mask(seed, tokens, in_features, p, CUDA, **names) for p in set(dropout_ps) if p > 0}
    for p, keep in keep_by_p.items():  # Philox on the hardware: the CPU reference's bits
        on_cpu = {name: t.cpu() for name, t in names.items()}
        assert torch.equal(keep.cpu(), torch_keep_mask(seed, (tokens, in_features), p, torch.device("cpu"), **on_cpu)), p

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


@pytest.mark.parametrize("keyed", [False, True], ids=["masks-by-row", "masks-by-sample"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_multi_lora_linear_matches_float64(dtype, keyed):
    # Segments straddle the 64-row blocks; adapter 1 owns two segments, one of length 1.
    _check_multi([65, 1, 130, 0, 37], [1, 1, 0, 2, 2], [16, 8, 33], [0.1, 0.0, 0.25], 192, 160, DTYPES[dtype], keyed=keyed)


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


# ---- packed attention: varlen kernels vs per-sample SDPA ----------------------------------------


def _varlen_kernels():
    from lorafusion.runtime import attention

    kernels = []
    if torch.cuda.is_available() and attention._flash_attn_varlen() is not None:
        kernels.append("flash_attn")
    if torch.cuda.is_available() and attention._torch_varlen(0) is not None:
        kernels.append("torch_varlen")
    return kernels


def test_torch_varlen_attention_is_available_on_this_gpu():
    """torch 2.10+ on sm80+ has varlen_attn with scale and window_size: the packed attention then
    makes one call per layer instead of one per sample."""
    from lorafusion.runtime import attention

    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("flash attention needs sm80+")
    assert attention._torch_varlen(torch.cuda.current_device()) is not None, torch.__version__
    query = torch.zeros(1, 8, 16, 64, device=CUDA, dtype=torch.bfloat16)
    assert attention.select_kernel(query, query, attention.AttentionOptions()) != "per_sample"


PACKED_LENGTHS = (700, 1, 129, 2048, 37, 1130)


@pytest.mark.parametrize("kernel", _varlen_kernels())
@pytest.mark.parametrize(
    "options",
    [{}, {"scaling": 0.07}, {"sliding_window": 256}, {"softcap": 30.0, "sliding_window": 100}],
    ids=str,
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_packed_varlen_attention_as_accurate_as_per_sample_sdpa(kernel, options, dtype):
    """Forward and every gradient of one varlen call over the packed microbatch, against the float64
    per-sample reference, within a few times the per-sample SDPA's own error in the same dtype."""
    from lorafusion.runtime.attention import AttentionOptions, attend_packed

    options = AttentionOptions(**options)
    if kernel == "torch_varlen" and options.softcap is not None:
        pytest.skip("torch's varlen_attn has no softcap (select_kernel does not pick it)")
    generator = torch.Generator(device=CUDA).manual_seed(5)
    tokens = sum(PACKED_LENGTHS)
    leaves64 = [torch.randn(1, heads, tokens, 128, device=CUDA, generator=generator, dtype=torch.float64)
                for heads in (16, 4, 4)]
    grad_out = torch.randn(1, tokens, 16, 128, device=CUDA, generator=generator, dtype=torch.float64)

    def run(kernel_name, leaf_dtype):
        leaves = [t.detach().to(leaf_dtype).requires_grad_() for t in leaves64]
        output = attend_packed(*leaves, PACKED_LENGTHS, options, kernel=kernel_name)
        output.backward(grad_out.to(leaf_dtype))
        return [output.detach()] + [t.grad for t in leaves]

    exact = run("per_sample", torch.float64)
    same_dtype = run("per_sample", dtype)
    varlen = run(kernel, dtype)
    for name, v, e, s in zip(("out", "dq", "dk", "dv"), varlen, exact, same_dtype):
        assert_as_accurate_as_torch(f"{kernel} {name}", v, e, s)


@pytest.mark.parametrize("kernel", _varlen_kernels())
def test_packed_varlen_attention_reads_nothing_back_to_the_host(kernel):
    from host_sync import HostSyncCounter
    from lorafusion.runtime.attention import AttentionOptions, attend_packed

    leaves = [torch.randn(1, h, sum(PACKED_LENGTHS), 64, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
              for h in (8, 2, 2)]
    with HostSyncCounter(CUDA) as counter:
        for _layer in range(2):
            attend_packed(*leaves, PACKED_LENGTHS, AttentionOptions(sliding_window=512), kernel=kernel).sum().backward()
    assert counter.events == []


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_packed_model_on_gpu_matches_its_per_sample_attention(model_type, monkeypatch):
    """A bf16 model's packed logits with the kernel select_kernel picks on this GPU, against the
    float32 model's per-sample attention: within a few times the bf16 per-sample SDPA's own error."""
    import transformers

    from lorafusion.runtime import attention

    shapes = dict(hidden_size=1024, intermediate_size=2048, num_hidden_layers=2, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=128, vocab_size=1000)
    if model_type == "llama":
        config = transformers.LlamaConfig(**shapes)
    else:
        config = transformers.Gemma2Config(**shapes, sliding_window=256, attn_logit_softcapping=50.0)
    config._attn_implementation = attention.PACKED_ATTENTION
    torch.manual_seed(0)
    model_class = transformers.LlamaForCausalLM if model_type == "llama" else transformers.Gemma2ForCausalLM
    model = model_class(config).to(CUDA, torch.bfloat16).eval()
    ids = torch.randint(0, 1000, (1, sum(PACKED_LENGTHS)), device=CUDA)
    positions = torch.cat([torch.arange(n, device=CUDA) for n in PACKED_LENGTHS])[None]

    def logits():
        with torch.no_grad():
            return model(input_ids=ids, position_ids=positions, sample_lengths=PACKED_LENGTHS).logits

    chosen = logits()
    monkeypatch.setattr(attention, "select_kernel", lambda *args: "per_sample")
    per_sample = logits()
    model.float()
    exact = logits().double()
    assert_as_accurate_as_torch(f"{model_type} logits", chosen, exact, per_sample)
