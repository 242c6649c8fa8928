"""The fused LoRA linear op: Y = X W^T (+ b) + scaling * dropout(X) A^T B^T, forward and backward.

The graph is split at the rank-r tensor S = dropout(X) A^T:

forward   S  = lora_down(X)                        one pass over X, dropout fused (Triton)
          Y  = X W^T + b                           cuBLAS
          Y += scaling * S B^T                     cuBLAS addmm, beta = 1 (no element-wise pass)
          (forward_impl="triton_gemm": both GEMMs in one Triton kernel, Y written once)
backward  dS, dB = lora_dy(dY)                     one pass over dY (Triton)
          dX  = dropout'(dS A), dA = dS^T dropout(X)   one pass over X, mask regenerated (Triton)
          dX += dY W                               cuBLAS addmm, beta = 1

Saved for backward: X (which the caller holds anyway), S [tokens, r] and a 31-bit dropout seed.
PEFT's LoRA layer saves dropout(X) as well, an extra tokens x in_features tensor per layer
whenever p > 0; here the keep-mask is regenerated from the seed instead of stored.

An NF4 base (`kernels.nf4.NF4Weight`, QLoRA) is dequantized into a workspace shared by all layers
(`nf4.dequantize_workspace`) right before each use of W, once in forward and again in backward for
dX += dY W; no full-precision copy of W lives between them or is allocated per call.

The backends share this autograd function and differ only in the three memory-bound ops:
"triton" (the kernels above), "torch" (kernels/reference.py, the CPU backend, with the keep-mask
regenerated from torch's generator) and "cuda" (the C++ extension in csrc/, kernels/cuda_backend.py).
"""

from __future__ import annotations

import torch

from . import custom_ops
from .cuda_backend import _CudaOps, require_cuda_backend
from .nf4 import NF4Weight, dequantize_workspace
from .utils import MAX_RANK, new_dropout_seed, require_triton, triton_usable

BACKENDS = ("auto", "triton", "torch", "cuda")
FORWARD_IMPLS = ("cublas", "triton_gemm")
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)





def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' is Triton where Triton runs (CUDA, or the interpreter when asked for) and torch elsewhere."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_usable(device) else "torch"
    if backend == "triton":
        require_triton(device)
    if backend == "cuda":  # the C++ extension (kernels/cuda_backend.py); never chosen by "auto" yet
        require_cuda_backend(device)
    return backend


def _base_weight(weight, backend: str) -> torch.Tensor:
    """W as a tensor: itself, or an NF4 weight dequantized into the shared workspace."""
    if not isinstance(weight, NF4Weight):
        return weight
    workspace = dequantize_workspace(weight.shape, weight.dtype, weight.device)
    if backend == "cuda":  # NF4Weight.dequantize knows the Triton and torch kernels only
        return _CudaOps.nf4_dequantize(weight, out=workspace)
    return weight.dequantize(out=workspace, backend=backend)


def compute_adapters(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor):
    """The adapters in x's dtype, the one the kernels compute in: adapters are usually kept in fp32
    on a 16-bit base (as PEFT does), so that small updates are not rounded away; they take part in
    the products as autocast would cast them (a copy of r x (in + out) elements per call), and their
    gradients, accumulated in fp32, come back in the adapters' own dtype."""
    return lora_A.to(x.dtype), lora_B.to(x.dtype)


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """x as [tokens, in_features] (itself when already 2-D: no view node in the graph)."""
    return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])


def lora_backward(ctx, saved, dy, lora_dy, lora_dx_da) -> tuple:
    """The backward of a fused LoRA linear op (single- or multi-adapter): (dX, dW, dbias, dA, dB).

    saved is ctx.saved_tensors, read once by the caller (non-reentrant activation checkpointing
    refuses a second read): (x, weight or None for an NF4 base, lora_A, lora_B, S, ...) with the
    adapters in x's dtype; ctx holds quantized_weight, backend, has_bias, adapter_dtype (the dtype of their gradients).
    lora_dy(dY, B, S) -> (dS, dB in fp32) is the pass over dY; lora_dx_da(dS, A, X, need_dx) ->
    (the LoRA part of dX or None, dA in fp32); cuBLAS adds dY W to dX.
    """
    x, weight, lora_A, lora_B, s = saved[:5]
    need_dx, need_dw, need_dbias, need_da, need_db = ctx.needs_input_grad[:5]
    x2d = x.reshape(-1, x.shape[-1])
    dy2d = dy.reshape(-1, dy.shape[-1])
    if dy2d.stride(-1) != 1:
        dy2d = dy2d.contiguous()
    grad_x = grad_w = grad_bias = grad_A = grad_B = None
    ds, db = lora_dy(dy2d, lora_B, s)
    if need_db:
        grad_B = db.to(ctx.adapter_dtype)
    if need_dx or need_da:
        dx, da = lora_dx_da(ds, lora_A, x2d, need_dx)
        if need_da:
            grad_A = da.to(ctx.adapter_dtype)
        if need_dx:
            base = weight if ctx.quantized_weight is None else _base_weight(ctx.quantized_weight, ctx.backend)
            dx.addmm_(dy2d, base)
            grad_x = dx.reshape(x.shape)
    if need_dw:  # only when the caller un-froze the base weight
        grad_w = dy2d.t() @ x2d
    if need_dbias and ctx.has_bias:
        grad_bias = dy2d.sum(0)
    return grad_x, grad_w, grad_bias, grad_A, grad_B


class LoRALinearFunction(torch.autograd.Function):
    """The memory-bound ops are torch custom ops (custom_ops.py), so torch.compile traces this
    Function whole; an NF4 base (a non-tensor) runs in eager mode only."""

    @staticmethod
    def forward(ctx, x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, backend, forward_impl):
        """x2d is [tokens, in_features]: the caller reshapes outside the Function, so that the
        output is no view created inside it and in-place use of it (`out += residual`) works as on
        nn.Linear."""
        ctx.adapter_dtype = lora_A.dtype
        lora_A, lora_B = compute_adapters(x2d, lora_A, lora_B)
        # No draw without dropout: the generator's stream is left as it was.
        seed = new_dropout_seed() if dropout_p > 0.0 else torch.zeros((), dtype=torch.int64)
        s = custom_ops.lora_down(x2d, lora_A, dropout_p, seed, backend)
        quantized_weight = weight if isinstance(weight, NF4Weight) else None
        weight = _base_weight(weight, backend)
        if forward_impl == "triton_gemm":
            y = custom_ops.linear_lora_gemm(x2d, weight, bias, s, lora_B, scaling, backend)
        else:
            y = torch.nn.functional.linear(x2d, weight, bias)
            y.addmm_(s, lora_B.t(), alpha=scaling)
        # An NF4 weight is kept as such (a non-tensor on ctx), never its dequantized workspace.
        ctx.save_for_backward(x2d, None if quantized_weight is not None else weight, lora_A, lora_B, s, seed)
        ctx.quantized_weight = quantized_weight
        ctx.scaling = scaling
        ctx.dropout_p = dropout_p
        ctx.backend = backend
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        saved = ctx.saved_tensors
        seed = saved[5]

        def lora_dx_da(ds, lora_A, x2d, need_dx):
            dx, da = custom_ops.lora_dx_da(ds, lora_A, x2d, ctx.dropout_p, seed, ctx.backend, need_dx)
            return (dx if need_dx else None), da

        grads = lora_backward(
            ctx,
            saved,
            dy,
            lambda dy2d, lora_B, s: custom_ops.lora_dy(dy2d, lora_B, s, ctx.scaling, ctx.backend),
            lora_dx_da,
        )
        return *grads, None, None, None, None


def check_dtypes_and_devices(x, weight, bias, lora_A, lora_B) -> None:
    """The base (weight, bias) computes in x's dtype; the adapters may be kept in any supported
    dtype (fp32 on a 16-bit base, as PEFT keeps them), both adapters in the same one."""
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x.dtype must be one of float32, float16, bfloat16, got {x.dtype}")
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None and tensor.dtype != x.dtype:
            raise TypeError(f"{name}.dtype ({tensor.dtype}) must match x.dtype ({x.dtype})")
    if lora_A.dtype not in SUPPORTED_DTYPES or lora_B.dtype != lora_A.dtype:
        raise TypeError(
            f"lora_A and lora_B must share one of float32, float16, bfloat16, got {lora_A.dtype} and {lora_B.dtype}"
        )
    for name, tensor in (("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B), ("bias", bias)):
        if tensor is not None and tensor.device != x.device:
            raise ValueError(f"{name} is on {tensor.device} but x is on {x.device}")


def _check_inputs(x, weight, bias, lora_A, lora_B, dropout_p):
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(
            f"x.shape[-1] must equal in_features={in_features}, got x of shape {tuple(x.shape)}"
        )
    if lora_A.dim() != 2 or lora_A.shape[1] != in_features:
        raise ValueError(f"lora_A must be [r, in_features={in_features}], got {tuple(lora_A.shape)}")
    rank = lora_A.shape[0]
    if not 1 <= rank <= MAX_RANK:
        raise ValueError(f"rank r must be in 1..{MAX_RANK}, got lora_A with r={rank}")
    if tuple(lora_B.shape) != (out_features, rank):
        raise ValueError(f"lora_B must be [out_features={out_features}, r={rank}], got {tuple(lora_B.shape)}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must be [out_features={out_features}], got {tuple(bias.shape)}")
    check_dtypes_and_devices(x, weight, bias, lora_A, lora_B)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {dropout_p}")


def fused_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor | NF4Weight,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    backend: str = "auto",
    forward_impl: str = "cublas",
) -> torch.Tensor:
    """Y = X W^T (+ bias) + scaling * dropout(X) A^T B^T, differentiable in x, A, B (and W, bias).

    x: [..., in_features]; weight: [out_features, in_features], a tensor or a frozen
    `kernels.nf4.NF4Weight` (its compute dtype must equal x.dtype); lora_A: [r, in_features];
    lora_B: [out_features, r], in x's dtype or another (fp32 adapters on a 16-bit base compute in
    x's dtype and get fp32 gradients); dropout applies to the LoRA path only, only in training.
    """
    _check_inputs(x, weight, bias, lora_A, lora_B, dropout_p)
    if forward_impl not in FORWARD_IMPLS:
        raise ValueError(f"forward_impl must be one of {FORWARD_IMPLS}, got {forward_impl!r}")
    resolved = resolve_backend(backend, x.device)
    if x.numel() == 0:
        return torch.nn.functional.linear(x, _base_weight(weight, resolved), bias)
    y = LoRALinearFunction.apply(
        as_rows(x), weight, bias, lora_A, lora_B, float(scaling), float(dropout_p), resolved, forward_impl
    )
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])
