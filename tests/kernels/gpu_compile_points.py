"""The launch points that gpu_compile.py compiles the Triton kernels for.

Each point calls the public ops as the layers do, on fake CUDA tensors (no memory, no GPU):
fused_lora_linear and fused_multi_lora_linear, forward and backward (they launch the down, dY and
dX/dA kernels, the GEMM or up kernel of the forward, and the NF4 dequantization of an NF4 base),
and the NF4 and keep-mask launchers. Whatever arguments they pass is what gets compiled.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass
from typing import Callable
from unittest import mock

import torch
from gpu_compile_capture import FAKE_SEED

DTYPES = {
    "fp16": (torch.float16, False),
    "bf16": (torch.bfloat16, False),
    "fp32-tf32": (torch.float32, True),
    "fp32-ieee": (torch.float32, False),
}
RANKS = (1, 16, 17, 64, 256)
# Several adapters of different ranks in one batch; the largest rank sets the rank tile.
ADAPTER_SETS = ((16, 1), (16, 17, 64), (8, 64, 256))
# What each dtype is compiled at (single-adapter ranks, multi-adapter rank sets), within CI's CPU
# budget: bf16, the training dtype, everywhere; fp16 and TF32 at their narrowest and widest rank
# tiles; plain fp32 (no TF32) at a 16-wide rank tile only, since its dots take the longest to
# compile (minutes of CPU per variant at a 256-wide tile).
COVERAGE = {
    "bf16": (RANKS, ADAPTER_SETS),
    "fp16": ((16, 256), ((8, 64, 256),)),
    "fp32-tf32": ((17, 256), ((16, 17, 64),)),
    "fp32-ieee": ((16,), ((16, 1),)),
}
# A Llama-7B-sized MLP projection at 4096 tokens (2 x 2048).
BATCH, SEQUENCE, HIDDEN, INTERMEDIATE = 2, 2048, 4096, 11008
DROPOUT_P = 0.1
NF4_DTYPE_BLOCKSIZE = 64  # fp16/fp32 NF4 at bitsandbytes' default block size; bf16 at every size


@dataclass(frozen=True)
class LaunchPoint:
    label: str
    run: Callable[[], None]


class _Ctx:
    """Stands in for autograd's ctx (see _forward_then_backward)."""

    def __init__(self, needs_input_grad: tuple[bool, ...]):
        self.needs_input_grad = needs_input_grad
        self.saved_tensors = ()

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


@contextlib.contextmanager
def _forward_then_backward(function, need_dx: bool):
    """function.apply runs its forward and then its backward at once, with a stand-in ctx:
    autograd cannot record fake CUDA tensors on a CPU-only torch. The op's inputs start
    (x, weight, bias, A, B, ...): gradients are wanted for x when need_dx, and for A and B."""

    def apply(*inputs):
        ctx = _Ctx((need_dx, False, False, True, True) + (False,) * (len(inputs) - 5))
        y = function.forward(ctx, *inputs)
        function.backward(ctx, torch.empty_like(y))
        return y

    with mock.patch.object(function, "apply", apply):
        yield


def _empty(*shape, dtype):
    return torch.empty(shape, dtype=dtype, device="cuda")


def _nf4_weight(shape, dtype, blocksize: int, double_quant: bool):
    from lorafusion.kernels.nf4 import NESTED_BLOCKSIZE, NF4Weight

    numel = shape[0] * shape[1]
    blocks = -(-numel // blocksize)
    if not double_quant:
        packed, absmax = _empty((numel + 1) // 2, dtype=torch.uint8), _empty(blocks, dtype=torch.float32)
        return NF4Weight(packed, absmax, shape, dtype, blocksize)
    return NF4Weight(
        _empty((numel + 1) // 2, dtype=torch.uint8),
        _empty(blocks, dtype=torch.uint8),
        shape,
        dtype,
        blocksize,
        nested_absmax=_empty(-(-blocks // NESTED_BLOCKSIZE), dtype=torch.float32),
        nested_code=_empty(256, dtype=torch.float32),
        offset=_empty(dtype=torch.float32),
    )


def _with_tf32(allow_tf32: bool, body: Callable[[], None]) -> Callable[[], None]:
    def run():
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        try:
            body()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous

    return run


def single_adapter(dtype_name, rank, dropout, need_dx, bias, forward_impl, nf4=None) -> LaunchPoint:
    """nf4: None, or (blocksize, double_quant) for an NF4 base weight."""
    dtype, allow_tf32 = DTYPES[dtype_name]

    def body():
        from lorafusion.kernels.lora_linear import LoRALinearFunction, fused_lora_linear

        weight = (
            _empty(INTERMEDIATE, HIDDEN, dtype=dtype)
            if nf4 is None
            else _nf4_weight((INTERMEDIATE, HIDDEN), dtype, *nf4)
        )
        with _forward_then_backward(LoRALinearFunction, need_dx):
            fused_lora_linear(
                _empty(BATCH, SEQUENCE, HIDDEN, dtype=dtype),
                weight,
                _empty(INTERMEDIATE, dtype=dtype) if bias else None,
                _empty(rank, HIDDEN, dtype=dtype),
                _empty(INTERMEDIATE, rank, dtype=dtype),
                2.0,
                DROPOUT_P if dropout else 0.0,
                backend="triton",
                forward_impl=forward_impl,
            )

    label = (
        f"single {dtype_name} r={rank} p={DROPOUT_P if dropout else 0} {'dX' if need_dx else 'no-dX'} "
        f"{'bias' if bias else 'no-bias'} fwd={forward_impl}"
    )
    if nf4 is not None:
        label += f" nf4(block={nf4[0]}, double_quant={nf4[1]})"
    return LaunchPoint(label, _with_tf32(allow_tf32, body))


def multi_adapter(dtype_name, ranks, dropout, need_dx, bias) -> LaunchPoint:
    """One adapter per 1024-token segment (cycling), the adapters' dropout alternating 0 and p."""
    dtype, allow_tf32 = DTYPES[dtype_name]

    def body():
        from lorafusion.kernels.multi_lora_linear import MultiLoRALinearFunction, fused_multi_lora_linear
        from lorafusion.kernels.segments import build_segment_meta

        tokens = BATCH * SEQUENCE
        segments = tokens // 1024
        meta = build_segment_meta(
            [i % len(ranks) for i in range(segments)],
            [1024] * segments,
            ranks,
            [2.0] * len(ranks),
            [DROPOUT_P if dropout and a % 2 == 0 else 0.0 for a in range(len(ranks))],
            "cuda",
        )
        total = sum(ranks)
        with _forward_then_backward(MultiLoRALinearFunction, need_dx):
            fused_multi_lora_linear(
                _empty(BATCH, SEQUENCE, HIDDEN, dtype=dtype),
                _empty(INTERMEDIATE, HIDDEN, dtype=dtype),
                _empty(INTERMEDIATE, dtype=dtype) if bias else None,
                _empty(total, HIDDEN, dtype=dtype),
                _empty(INTERMEDIATE, total, dtype=dtype),
                meta,
                backend="triton",
                dropout_seed=FAKE_SEED,
            )

    label = (
        f"multi {dtype_name} ranks={'/'.join(map(str, ranks))} p={DROPOUT_P if dropout else 0} "
        f"{'dX' if need_dx else 'no-dX'} {'bias' if bias else 'no-bias'}"
    )
    return LaunchPoint(label, _with_tf32(allow_tf32, body))


def nf4_dequantize(dtype_name, blocksize, double_quant) -> LaunchPoint:
    dtype, _ = DTYPES[dtype_name]

    def run():
        from lorafusion.kernels.nf4 import nf4_dequantize as launch

        launch(_nf4_weight((INTERMEDIATE, HIDDEN), dtype, blocksize, double_quant))

    return LaunchPoint(f"nf4_dequantize {dtype_name} block={blocksize} double_quant={double_quant}", run)


def keep_mask() -> LaunchPoint:
    def run():
        from lorafusion.kernels.keep_mask import triton_keep_mask

        triton_keep_mask(FAKE_SEED, BATCH * SEQUENCE, HIDDEN, DROPOUT_P, torch.device("cuda"))

    return LaunchPoint("keep_mask 4096x4096", run)


def full_grid() -> list[LaunchPoint]:
    from lorafusion.kernels.nf4 import NF4_BLOCKSIZES

    points = []
    flags = ((False, True), (True, False), (False, True))  # dropout, dX needed, bias
    for dtype_name, (ranks, adapter_sets) in COVERAGE.items():
        for rank, dropout, need_dx, bias, forward_impl in itertools.product(ranks, *flags, ("cublas", "triton_gemm")):
            points.append(single_adapter(dtype_name, rank, dropout, need_dx, bias, forward_impl))
        for ranks_, dropout, need_dx, bias in itertools.product(adapter_sets, *flags):
            points.append(multi_adapter(dtype_name, ranks_, dropout, need_dx, bias))
    for dtype_name in ("fp16", "bf16", "fp32-tf32"):
        blocksizes = NF4_BLOCKSIZES if dtype_name == "bf16" else (NF4_DTYPE_BLOCKSIZE,)
        for blocksize, double_quant in itertools.product(blocksizes, (False, True)):
            points.append(nf4_dequantize(dtype_name, blocksize, double_quant))
    # The NF4 base inside the op (dequantized before each base GEMM), as in QLoRA training.
    points.append(single_adapter("bf16", 16, True, True, False, "cublas", nf4=(64, True)))
    points.append(keep_mask())
    return points


def reduced_grid() -> list[LaunchPoint]:
    """For the GPU machines' Triton: bf16, the main ranks, every flag."""
    points = []
    for rank, dropout, need_dx, bias, forward_impl in itertools.product(
        (16, 64), (False, True), (True, False), (False, True), ("cublas", "triton_gemm")
    ):
        points.append(single_adapter("bf16", rank, dropout, need_dx, bias, forward_impl))
    for dropout, need_dx, bias in itertools.product((False, True), (True, False), (False, True)):
        points.append(multi_adapter("bf16", (16, 17, 64), dropout, need_dx, bias))
    for blocksize, double_quant in itertools.product((64,), (False, True)):
        points.append(nf4_dequantize("bf16", blocksize, double_quant))
    points.append(keep_mask())
    return points


GRIDS = {"full": full_grid, "reduced": reduced_grid}
