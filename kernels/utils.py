"""Helpers shared by the Triton kernels and their launchers."""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a Linux dependency
    triton = None
    tl = None

MAX_RANK = 256


def is_interpreting() -> bool:
    """True under TRITON_INTERPRET=1, where kernels run on the CPU through numpy."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_usable(device: torch.device) -> bool:
    """Triton kernels run on CUDA devices, or anywhere under the interpreter."""
    if triton is None:
        return False
    return device.type == "cuda" or is_interpreting()


def require_triton(device: torch.device) -> None:
    if triton is None:
        raise RuntimeError("backend='triton' needs the triton package, which is not installed")
    if not triton_usable(device):
        raise RuntimeError(
            f"backend='triton' needs a CUDA device (or TRITON_INTERPRET=1 for the interpreter); "
            f"the input is on {device}. Use backend='torch' or backend='auto'."
        )


def rank_block(rank: int) -> int:
    """Padded rank tile: tl.dot needs each dimension >= 16 and a power of two."""
    return max(16, triton.next_power_of_2(rank))


def autotune_configs(configs: list) -> list:
    # The interpreter fails with more than one config ('0 active drivers'): it gets the first.
    return configs[:1] if is_interpreting() else configs


def upcast_dots(dtype: torch.dtype) -> bool:
    """The interpreter multiplies bf16 bit patterns in tl.dot and gets bf16 arithmetic wrong: there,
    bf16 tiles are converted to fp32 before any math. On a GPU bf16 stays on the tensor cores."""
    return is_interpreting() and dtype == torch.bfloat16


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use TF32 only where torch's own matmuls do, so both backends agree."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not is_interpreting():
        return "tf32"
    return "ieee"


def new_dropout_seed(device: torch.device) -> int:
    """A Philox seed drawn from torch's generator, so torch.manual_seed makes dropout repeatable."""
    generator_device = device if device.type == "cuda" else torch.device("cpu")
    return int(torch.randint(0, 2**31 - 1, (1,), device=generator_device).item())


if triton is not None:

    @triton.jit
    def keep_mask(seed, rows, cols, num_cols, dropout_p):
        """Dropout keep-mask of a [rows, cols] tile of a row-major [*, num_cols] matrix.

        The Philox stream is indexed by the element's logical position (row * num_cols + col, in
        int64), so every kernel that touches the same element, with any tiling, regenerates the
        same bit: forward and backward agree without storing a mask.
        """
        offsets = rows[:, None].to(tl.int64) * num_cols + cols[None, :]
        return tl.rand(seed, offsets) >= dropout_p

    @triton.jit
    def tile_dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b, acc, input_precision=PRECISION)
