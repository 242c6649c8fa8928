"""Backward front end: the LoRA part of dX and dA, sharing one regeneration of the dropout mask.

For each [rows, cols] tile of X the kernel regenerates the keep-mask once and uses it twice:
    dX_lora = keep * (dS A) / (1 - p)          (written into dX; the base dY W is added by cuBLAS)
    dA     += dS^T (keep * X) / (1 - p)         (fp32 accumulator, no dropped copy of X)
A program owns one column block and a contiguous range of row blocks, so its dA share stays in
registers and is added with one atomic per program.
"""

from __future__ import annotations

import torch

from .utils import (
    autotune_configs, dot_precision, keep_factor, m_bucket, prune_by_footprint, rank_block, tile_dot, triton, tl,
    upcast_dots,
)


def _dx_da_configs():
    return autotune_configs(
        [
            triton.Config({"BLOCK_M": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_M": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_M": 64, "BLOCK_K": 128}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_M": 128, "BLOCK_K": 128}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_M": 32, "BLOCK_K": 64}, num_warps=4, num_stages=4),
            # Wide rank tiles (r > 64): the dA share [BLOCK_R, BLOCK_K] lives in registers.
            triton.Config({"BLOCK_M": 32, "BLOCK_K": 32}, num_warps=4, num_stages=2),
            triton.Config({"BLOCK_M": 32, "BLOCK_K": 32}, num_warps=8, num_stages=2),
        ]
    )


def _dx_da_footprint(config, element_bytes, BLOCK_R, HAS_DROPOUT, WRITE_DX, **_):
    block_m, block_k = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_K"]
    shared = (config.num_stages * (block_m * BLOCK_R + block_m * block_k) + BLOCK_R * block_k) * element_bytes
    if HAS_DROPOUT:
        shared += block_m * block_k * 4
    accumulators = BLOCK_R * block_k + (block_m * block_k if WRITE_DX else 0)
    return shared, accumulators


@triton.autotune(
    configs=_dx_da_configs(),
    key=["K", "BLOCK_R", "HAS_DROPOUT", "WRITE_DX", "M_BUCKET"],
    reset_to_zero=["da_ptr"],
    prune_configs_by={"early_config_prune": prune_by_footprint(_dx_da_footprint)},
)
@triton.jit
def _lora_dx_da_kernel(
    ds_ptr, a_ptr, x_ptr, dx_ptr, da_ptr,
    M, K, R,
    stride_dsm, stride_dsr, stride_ar, stride_ak, stride_xm, stride_xk, stride_dxm, stride_dxk,
    seed, dropout_p,
    M_BUCKET,
    HAS_DROPOUT: tl.constexpr,
    WRITE_DX: tl.constexpr,
    BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    col_start = tl.program_id(0) * BLOCK_K
    cols = col_start + tl.arange(0, BLOCK_K)
    ranks = tl.arange(0, BLOCK_R)
    col_ok = cols < K
    rank_ok = ranks < R
    a = tl.load(
        a_ptr + ranks[:, None] * stride_ar + cols[None, :] * stride_ak,
        mask=rank_ok[:, None] & col_ok[None, :],
        other=0.0,
    )
    blocks_per_program = tl.cdiv(tl.cdiv(M, BLOCK_M), tl.num_programs(1))
    row_start = tl.program_id(1).to(tl.int64) * blocks_per_program * BLOCK_M
    row_end = tl.minimum(row_start + blocks_per_program * BLOCK_M, M)
    da = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for m0 in range(row_start, row_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        tile_ok = (rows[:, None] < M) & col_ok[None, :]
        ds = tl.load(
            ds_ptr + rows[:, None] * stride_dsm + ranks[None, :] * stride_dsr,
            mask=(rows[:, None] < M) & rank_ok[None, :],
            other=0.0,
        )
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=tile_ok, other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
        if HAS_DROPOUT:
            # A 0/1 tile, not an i1 one: it is used in two layouts (a dot operand and the dX
            # accumulator) and shared memory cannot hold 1-bit elements (see utils.keep_factor).
            keep = keep_factor(seed, rows, col_start, K, dropout_p, BLOCK_K)
            x = x * keep.to(x.dtype)
        da = tile_dot(tl.trans(ds), x, da, UPCAST, PRECISION)
        if WRITE_DX:
            dx = tile_dot(ds, a, tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32), UPCAST, PRECISION)
            if HAS_DROPOUT:
                dx = dx * (keep * (1.0 / (1.0 - dropout_p)))
            tl.store(
                dx_ptr + rows[:, None] * stride_dxm + cols[None, :] * stride_dxk,
                dx.to(dx_ptr.dtype.element_ty),
                mask=tile_ok,
            )
    if HAS_DROPOUT:
        da = da * (1.0 / (1.0 - dropout_p))
    # Relaxed: a plain reduction into dA, with no GPU-wide fence around it (nothing reads dA
    # before the kernel ends).
    tl.atomic_add(
        da_ptr + ranks[:, None] * K + cols[None, :], da, mask=rank_ok[:, None] & col_ok[None, :], sem="relaxed"
    )


def _row_splits(M: int, K: int, device: torch.device) -> int:
    """Programs along M per column block: enough to fill the GPU, few enough to keep atomics rare."""
    if device.type != "cuda":
        return 1
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count
    column_blocks = triton.cdiv(K, 64)
    return max(1, min(triton.cdiv(M, 64), triton.cdiv(2 * sm_count, column_blocks)))


def lora_dx_da(
    ds: torch.Tensor,
    lora_A: torch.Tensor,
    x: torch.Tensor,
    dropout_p: float,
    seed: int,
    dx_out: torch.Tensor | None,
) -> torch.Tensor:
    """Writes the LoRA part of dX into dx_out (when given) and returns dA [r, K] in fp32."""
    M, K = x.shape
    R = lora_A.shape[0]
    da = torch.zeros((R, K), device=x.device, dtype=torch.float32)
    write_dx = dx_out is not None
    dx = dx_out if write_dx else x  # never written when WRITE_DX is False
    splits = _row_splits(M, K, x.device)
    grid = lambda meta: (triton.cdiv(K, meta["BLOCK_K"]), splits)  # noqa: E731
    _lora_dx_da_kernel[grid](
        ds, lora_A, x, dx, da,
        M, K, R,
        ds.stride(0), ds.stride(1), lora_A.stride(0), lora_A.stride(1), x.stride(0), x.stride(1),
        dx.stride(0), dx.stride(1),
        seed, dropout_p,
        m_bucket(M),
        HAS_DROPOUT=dropout_p > 0.0,
        WRITE_DX=write_dx,
        BLOCK_R=rank_block(R),
        UPCAST=upcast_dots(x.dtype),
        PRECISION=dot_precision(x.dtype),
    )
    return da
