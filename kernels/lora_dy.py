"""Backward over dY: dS = scaling * dY B and dB = scaling * dY^T S from a single pass over dY.

Each program owns a block of rows: it keeps its dS rows in registers across the whole N loop
(written once, deterministic) and adds its share of dB with fp32 atomics.
"""

from __future__ import annotations

import torch

from .utils import (
    autotune_configs, dot_precision, m_bucket, prune_by_footprint, rank_block, tile_dot, triton, tl, upcast_dots,
)


def _dy_configs():
    return autotune_configs(
        [
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_M": 32, "BLOCK_N": 128}, num_warps=4, num_stages=4),
            # Few rows per program: enough programs to fill the GPU at a few thousand tokens.
            triton.Config({"BLOCK_M": 16, "BLOCK_N": 128}, num_warps=4, num_stages=4),
            # Wide rank tiles (r > 64): dS [BLOCK_M, BLOCK_R] and the dB tile [BLOCK_N, BLOCK_R]
            # both live in registers.
            triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=2),
            triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=8, num_stages=2),
        ]
    )


def dy_footprint(config, element_bytes, BLOCK_R, BLOCK_M=None, **_):
    """(shared bytes, fp32 accumulator elements) of a dy_row_block launch, for config pruning
    (BLOCK_M is the config's, or the launch's for the multi-adapter kernel)."""
    block_m, block_n = config.kwargs.get("BLOCK_M", BLOCK_M), config.kwargs["BLOCK_N"]
    shared = (config.num_stages * (block_m * block_n + block_n * BLOCK_R) + block_m * BLOCK_R) * element_bytes
    return shared, block_m * BLOCK_R + block_n * BLOCK_R


@triton.jit
def dy_row_block(
    dy_ptr, b_ptr, s_ptr, db_ptr, rows, row_ok, ranks, b_ranks, rank_ok, N, db_row_stride,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_sm, stride_sr, scaling,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """One block of rows over all of dY: returns dY B (fp32, unscaled) for these rows and adds
    scaling * dY^T S into dB with atomics. `ranks` index S's columns, `b_ranks` the same ranks in
    B's and dB's columns (an adapter's offset in the concatenated rank dimension)."""
    s = tl.load(
        s_ptr + rows[:, None] * stride_sm + ranks[None, :] * stride_sr,
        mask=row_ok[:, None] & rank_ok[None, :],
        other=0.0,
    )
    ds = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        dy = tl.load(
            dy_ptr + rows[:, None] * stride_dym + cols[None, :] * stride_dyn,
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        b = tl.load(
            b_ptr + cols[:, None] * stride_bn + b_ranks[None, :] * stride_br,
            mask=col_ok[:, None] & rank_ok[None, :],
            other=0.0,
        )
        ds = tile_dot(dy, b, ds, UPCAST, PRECISION)
        db = tile_dot(tl.trans(dy), s, tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32), UPCAST, PRECISION)
        # Relaxed: a plain reduction into dB, with no GPU-wide fence (nothing reads dB before
        # the kernel ends).
        tl.atomic_add(
            db_ptr + cols[:, None] * db_row_stride + b_ranks[None, :],
            db * scaling,
            mask=col_ok[:, None] & rank_ok[None, :],
            sem="relaxed",
        )
    return ds


@triton.autotune(
    configs=_dy_configs(),
    key=["N", "BLOCK_R", "M_BUCKET"],
    reset_to_zero=["db_ptr"],
    prune_configs_by={"early_config_prune": prune_by_footprint(dy_footprint)},
)
@triton.jit
def _lora_dy_kernel(
    dy_ptr, b_ptr, s_ptr, ds_ptr, db_ptr,
    M, N, R,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_sm, stride_sr, stride_dsm, stride_dsr,
    scaling,
    M_BUCKET,
    BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # int64 row offsets: tokens x width passes 2^31 on large layers (e.g. a 128k-vocabulary head).
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, BLOCK_R)
    row_ok = rows < M
    rank_ok = ranks < R
    ds = dy_row_block(
        dy_ptr, b_ptr, s_ptr, db_ptr, rows, row_ok, ranks, ranks, rank_ok, N, R,
        stride_dym, stride_dyn, stride_bn, stride_br, stride_sm, stride_sr, scaling,
        UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_R,
    )
    tl.store(
        ds_ptr + rows[:, None] * stride_dsm + ranks[None, :] * stride_dsr,
        (ds * scaling).to(ds_ptr.dtype.element_ty),
        mask=row_ok[:, None] & rank_ok[None, :],
    )


def lora_dy(dy: torch.Tensor, lora_B: torch.Tensor, s: torch.Tensor, scaling: float):
    """(dS [M, r] in dY's dtype, dB [N, r] in fp32) for dY [M, N], B [N, r], S [M, r]."""
    M, N = dy.shape
    R = lora_B.shape[1]
    ds = torch.empty((M, R), device=dy.device, dtype=dy.dtype)
    db = torch.zeros((N, R), device=dy.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)  # noqa: E731
    _lora_dy_kernel[grid](
        dy, lora_B, s, ds, db,
        M, N, R,
        dy.stride(0), dy.stride(1), lora_B.stride(0), lora_B.stride(1), s.stride(0), s.stride(1),
        ds.stride(0), ds.stride(1),
        scaling,
        m_bucket(M),
        BLOCK_R=rank_block(R),
        UPCAST=upcast_dots(dy.dtype),
        PRECISION=dot_precision(dy.dtype),
    )
    return ds, db
