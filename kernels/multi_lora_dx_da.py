"""Multi-adapter backward front end: per segment, with one regeneration of that adapter's dropout
mask per tile, the LoRA part of dX = dropout_a'(dS A_a) (written into dX; cuBLAS adds dY W) and
dA_a += dS^T dropout_a(X) (fp32 [sum of ranks, K] buffer, atomics at the adapter's rank offset)."""

from __future__ import annotations

import torch

from .segments import SegmentMeta, segment_block
from .utils import autotune_configs, dot_precision, keyed_keep_factor, prune_by_footprint, rank_block, tile_dot, triton, tl, upcast_dots


def _configs():
    return autotune_configs(
        [
            triton.Config({"BLOCK_K": 64}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_K": 128}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_K": 128}, num_warps=8, num_stages=4),
            triton.Config({"BLOCK_K": 32}, num_warps=4, num_stages=2),  # wide rank tiles
        ]
    )


def _footprint(config, element_bytes, BLOCK_R, BLOCK_M, HAS_DROPOUT, WRITE_DX, **_):
    block_k = config.kwargs["BLOCK_K"]
    shared = (BLOCK_M * BLOCK_R + BLOCK_M * block_k + BLOCK_R * block_k) * element_bytes
    if HAS_DROPOUT:
        shared += BLOCK_M * block_k * 4
    return shared, BLOCK_R * block_k + (BLOCK_M * block_k if WRITE_DX else 0)


@triton.autotune(
    configs=_configs(),
    key=["K", "BLOCK_R", "HAS_DROPOUT", "WRITE_DX"],
    reset_to_zero=["da_ptr"],
    prune_configs_by={"early_config_prune": prune_by_footprint(_footprint)},
)
@triton.jit
def _multi_lora_dx_da_kernel(
    ds_ptr, a_ptr, x_ptr, dx_ptr, da_ptr,
    block_adapter_ptr, block_start_ptr, block_end_ptr, rank_ptr, rank_offset_ptr, dropout_p_ptr,
    dropout_position_ptr, dropout_key_ptr,
    K,
    stride_dsm, stride_dsr, stride_ar, stride_ak, stride_xm, stride_xk, stride_dxm, stride_dxk,
    seed,
    HAS_DROPOUT: tl.constexpr,
    WRITE_DX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    block = tl.program_id(0)
    adapter, rows, row_ok, ranks, rank_ok, adapter_rows = segment_block(
        block, block_adapter_ptr, block_start_ptr, block_end_ptr, rank_ptr, rank_offset_ptr, BLOCK_M, BLOCK_R
    )
    col_start = tl.program_id(1) * BLOCK_K
    cols = col_start + tl.arange(0, BLOCK_K)
    col_ok = cols < K
    tile_ok = row_ok[:, None] & col_ok[None, :]

    ds = tl.load(
        ds_ptr + rows[:, None] * stride_dsm + ranks[None, :] * stride_dsr,
        mask=row_ok[:, None] & rank_ok[None, :],
        other=0.0,
    )
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=tile_ok, other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    if HAS_DROPOUT:
        dropout_p = tl.load(dropout_p_ptr + adapter)
        # A 0/1 tile, not an i1 one: it is used in two layouts (a dot operand and the dX
        # accumulator) and shared memory cannot hold 1-bit elements (see utils.keep_factor).
        positions = tl.load(dropout_position_ptr + rows, mask=row_ok, other=0)
        keys = tl.load(dropout_key_ptr + rows, mask=row_ok, other=0)
        keep = keyed_keep_factor(seed, positions, keys, col_start, K, dropout_p, BLOCK_K)
        x = x * keep.to(x.dtype)
    da = tile_dot(tl.trans(ds), x, tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32), UPCAST, PRECISION)
    if HAS_DROPOUT:
        da = da * (1.0 / (1.0 - dropout_p))
    # Relaxed: a plain reduction into dA, with no GPU-wide fence (nothing reads dA before the kernel ends).
    tl.atomic_add(
        da_ptr + adapter_rows[:, None] * K + cols[None, :], da, mask=rank_ok[:, None] & col_ok[None, :], sem="relaxed"
    )
    if WRITE_DX:
        a = tl.load(
            a_ptr + adapter_rows[:, None] * stride_ar + cols[None, :] * stride_ak,
            mask=rank_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        dx = tile_dot(ds, a, tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32), UPCAST, PRECISION)
        if HAS_DROPOUT:
            dx = dx * (keep * (1.0 / (1.0 - dropout_p)))
        tl.store(
            dx_ptr + rows[:, None] * stride_dxm + cols[None, :] * stride_dxk,
            dx.to(dx_ptr.dtype.element_ty),
            mask=tile_ok,
        )


def multi_lora_dx_da(
    ds: torch.Tensor,
    lora_A_cat: torch.Tensor,
    x: torch.Tensor,
    meta: SegmentMeta,
    seed: int,
    dx_out: torch.Tensor | None,
) -> torch.Tensor:
    """Writes the LoRA part of dX into dx_out (when given); returns dA_cat [sum of ranks, K] in fp32."""
    M, K = x.shape
    da = torch.zeros((meta.total_rank, K), device=x.device, dtype=torch.float32)
    num_blocks = meta.block_adapter.numel()
    if num_blocks == 0:
        if dx_out is not None:
            dx_out.zero_()
        return da
    dx = dx_out if dx_out is not None else x  # never written when WRITE_DX is False
    grid = lambda cfg: (num_blocks, triton.cdiv(K, cfg["BLOCK_K"]))  # noqa: E731
    _multi_lora_dx_da_kernel[grid](
        ds, lora_A_cat, x, dx, da,
        meta.block_adapter, meta.block_start, meta.block_end,
        meta.adapter_rank, meta.adapter_rank_offset, meta.adapter_dropout_p,
        meta.dropout_position, meta.dropout_key,
        K,
        ds.stride(0), ds.stride(1), lora_A_cat.stride(0), lora_A_cat.stride(1), x.stride(0), x.stride(1),
        dx.stride(0), dx.stride(1),
        seed,
        HAS_DROPOUT=meta.has_dropout,
        WRITE_DX=dx_out is not None,
        BLOCK_M=meta.block_m,
        BLOCK_R=rank_block(meta.max_rank),
        UPCAST=upcast_dots(x.dtype),
        PRECISION=dot_precision(x.dtype),
    )
    return da
