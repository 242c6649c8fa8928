"""The memory-bound LoRA ops as torch custom ops (`torch.library`), so that `torch.compile` traces a
fused LoRA layer into its graph (no graph break per layer): each op is opaque to the compiler,
with a fake implementation giving its output shapes, and dispatches to the backend's kernels.
In eager mode the implementation is called directly: no dispatcher round trip per op.

The dropout seed travels as a 0-d int64 CPU tensor drawn in the graph (utils.new_dropout_seed),
so a compiled model draws a fresh mask every call; it is read on the host inside the op, which
never waits for the GPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .cuda_backend import _CudaOps
from .lora_ops import TorchOps, TritonOps

_OPS = {"torch": TorchOps, "triton": TritonOps, "cuda": _CudaOps}


def _compiled_as(name: str, fake):
    """Registers the decorated implementation as the custom op lorafusion::`name` with `fake` as
    its shape function; the returned callable is the op under torch.compile and the plain
    implementation otherwise (the op is its `.op`)."""

    def register(implementation):
        op = torch.library.custom_op(f"lorafusion::{name}", implementation, mutates_args=())
        op.register_fake(fake)

        def call(*args):
            return op(*args) if torch.compiler.is_compiling() else implementation(*args)

        call.op = op
        call.__doc__ = implementation.__doc__
        return call

    return register


def _seed(seed: Tensor, dropout_p: float) -> int:
    """The seed's value, read (on the host) only when there is dropout to draw."""
    return int(seed) if dropout_p > 0.0 else 0


def _lora_down_fake(x, lora_A, dropout_p, seed, backend):
    return x.new_empty((x.shape[0], lora_A.shape[0]))


@_compiled_as("lora_down", _lora_down_fake)
def lora_down(x: Tensor, lora_A: Tensor, dropout_p: float, seed: Tensor, backend: str) -> Tensor:
    """S [M, r] = dropout(X) A^T in X's dtype."""
    return _OPS[backend].lora_down(x, lora_A, dropout_p, _seed(seed, dropout_p))


def _lora_dy_fake(dy, lora_B, s, scaling, backend):
    return dy.new_empty((dy.shape[0], lora_B.shape[1])), dy.new_empty(tuple(lora_B.shape), dtype=torch.float32)


@_compiled_as("lora_dy", _lora_dy_fake)
def lora_dy(dy: Tensor, lora_B: Tensor, s: Tensor, scaling: float, backend: str) -> tuple[Tensor, Tensor]:
    """(dS [M, r] in dY's dtype, dB [N, r] in fp32)."""
    ds, db = _OPS[backend].lora_dy(dy, lora_B, s, scaling)
    return ds, db.float()


def _lora_dx_da_fake(ds, lora_A, x, dropout_p, seed, backend, write_dx):
    dx = x.new_empty(tuple(x.shape)) if write_dx else x.new_empty(0)
    return dx, x.new_empty(tuple(lora_A.shape), dtype=torch.float32)


@_compiled_as("lora_dx_da", _lora_dx_da_fake)
def lora_dx_da(
    ds: Tensor, lora_A: Tensor, x: Tensor, dropout_p: float, seed: Tensor, backend: str, write_dx: bool
) -> tuple[Tensor, Tensor]:
    """(the LoRA part of dX [M, K] in X's dtype, or an empty tensor without write_dx; dA [r, K] in fp32)."""
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if write_dx else x.new_empty(0)
    da = _OPS[backend].lora_dx_da(ds, lora_A, x, dropout_p, _seed(seed, dropout_p), dx if write_dx else None)
    return dx, da.float()


def _linear_lora_gemm_fake(x, weight, bias, s, lora_B, scaling, backend):
    return x.new_empty((x.shape[0], weight.shape[0]))


@_compiled_as("linear_lora_gemm", _linear_lora_gemm_fake)
def linear_lora_gemm(
    x: Tensor, weight: Tensor, bias: Tensor | None, s: Tensor, lora_B: Tensor, scaling: float, backend: str
) -> Tensor:
    """Y = X W^T + bias + scaling S B^T in one kernel (forward_impl='triton_gemm')."""
    return _OPS[backend].linear_lora_gemm(x, weight, bias, s, lora_B, scaling)
