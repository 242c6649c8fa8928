"""Checks of the fused LoRA linear op against the float64 unfused reference, shared by the tests of
every backend (Triton, torch, CUDA): forward and every gradient, on fresh random inputs.

Low-precision results are held to "as accurate as torch itself in that dtype": the error of the
fused op against float64 must stay within a small multiple of the error of the unfused torch
computation in the same dtype.
"""

from __future__ import annotations

import torch

from lorafusion.kernels import fused_lora_linear, lora_linear_reference, torch_keep_mask
from lorafusion.kernels.keep_mask import triton_keep_mask
from lorafusion.kernels.utils import new_dropout_seed

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DROPOUT_SEED = 123


def make_inputs(lead, in_features, out_features, rank, dtype, bias=True, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)

    x = rand(*lead, in_features)
    weight = rand(out_features, in_features, scale=in_features**-0.5)
    b = rand(out_features) if bias else None
    lora_A = rand(rank, in_features, scale=in_features**-0.5)
    lora_B = rand(out_features, rank, scale=rank**-0.5)  # non-zero, unlike a fresh adapter
    grad_out = rand(*lead, out_features)
    return x, weight, b, lora_A, lora_B, grad_out


def run_fused(x, weight, b, lora_A, lora_B, grad_out, scaling, p, backend, forward_impl="cublas", dropout_seed=DROPOUT_SEED):
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


def keep_mask_for(backend, tokens, in_features, p, device="cpu", dropout_seed=DROPOUT_SEED):
    """The keep-mask `backend` draws in run_fused (None without dropout)."""
    if p == 0.0:
        return None
    device = torch.device(device)
    torch.manual_seed(dropout_seed)
    seed = int(new_dropout_seed())
    if backend == "triton":
        return triton_keep_mask(seed, tokens, in_features, p, device)
    if backend == "cuda":
        from lorafusion.kernels.cuda_backend import cuda_keep_mask

        return cuda_keep_mask(seed, tokens, in_features, p, device)
    return torch_keep_mask(seed, (tokens, in_features), p, device)


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


def check_against_reference(
    backend, lead, in_features, out_features, rank, dtype, bias, p, forward_impl="cublas", device="cpu", adapter_dtype=None
):
    """adapter_dtype: lora_A and lora_B kept in another dtype than the base (fp32 on a 16-bit base);
    they compute in the base's dtype, and their gradients come back in adapter_dtype."""
    x, weight, b, lora_A, lora_B, grad_out = make_inputs(lead, in_features, out_features, rank, dtype, bias, device=device)
    adapter_dtype = adapter_dtype or dtype
    lora_A, lora_B = lora_A.to(adapter_dtype), lora_B.to(adapter_dtype)
    scaling = 16.0 / rank
    keep = keep_mask_for(backend, x.numel() // in_features, in_features, p, device)
    y, grads = run_fused(x, weight, b, lora_A, lora_B, grad_out, scaling, p, backend, forward_impl)
    y64, grads64 = run_reference(x, weight, b, lora_A, lora_B, grad_out, scaling, keep, p, torch.float64)
    y_lp, grads_lp = run_reference(x, weight, b, lora_A, lora_B, grad_out, scaling, keep, p, dtype)
    assert y.dtype == dtype and y.shape == (*lead, out_features)
    assert_as_accurate_as_torch("y", y, y64, y_lp)
    for name, g, g64, g_lp in zip(("dx", "dA", "dB", "dbias"), grads, grads64, grads_lp):
        if g64 is None:
            assert g is None
            continue
        assert g is not None and g.dtype == (adapter_dtype if name in ("dA", "dB") else dtype), name
        assert_as_accurate_as_torch(name, g, g64, g_lp)
