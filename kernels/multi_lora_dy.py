"""Multi-adapter backward over dY: per segment dS = scaling_a * dY B_a and dB_a += scaling_a * dY^T S,
from one pass over dY. dS rows stay in registers for the whole N loop; dB goes to an fp32
[N, sum of ranks] buffer with atomics, at the adapter's rank offset."""

from __future__ import annotations

import torch

from .lora_dy import dy_footprint, dy_row_block
from .segments import SegmentMeta, segment_block
from .utils import autotune_configs, dot_precision, prune_by_footprint, rank_block, triton, tl, upcast_dots


def _configs():
    return autotune_configs(
        [
            triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_N": 128}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_N": 128}, num_warps=8, num_stages=4),
            triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=2),  # wide rank tiles
            triton.Config({"BLOCK_N": 32}, num_warps=8, num_stages=2),
        ]
    )


@triton.autotune(
    configs=_configs(),
    key=["N", "BLOCK_R"],
    reset_to_zero=["db_ptr"],
    prune_configs_by={"early_config_prune": prune_by_footprint(dy_footprint)},
)
@triton.jit
def _multi_lora_dy_kernel(
    dy_ptr, b_ptr, s_ptr, ds_ptr, db_ptr,
    block_adapter_ptr, block_start_ptr, block_end_ptr, rank_ptr, rank_offset_ptr, scaling_ptr,
    N, S_COLS, TOTAL_RANK,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_sm, stride_sr, stride_dsm, stride_dsr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    block = tl.program_id(0)
    adapter, rows, row_ok, ranks, rank_ok, adapter_cols = segment_block(
        block, block_adapter_ptr, block_start_ptr, block_end_ptr, rank_ptr, rank_offset_ptr, BLOCK_M, BLOCK_R
    )
    scaling = tl.load(scaling_ptr + adapter)
    ds = dy_row_block(
        dy_ptr, b_ptr, s_ptr, db_ptr, rows, row_ok, ranks, adapter_cols, rank_ok, N, TOTAL_RANK,
        stride_dym, stride_dyn, stride_bn, stride_br, stride_sm, stride_sr, scaling,
        UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_R,
    )
    tl.store(
        ds_ptr + rows[:, None] * stride_dsm + ranks[None, :] * stride_dsr,
        (ds * scaling).to(ds_ptr.dtype.element_ty),
        mask=row_ok[:, None] & (ranks[None, :] < S_COLS),
    )


def multi_lora_dy(dy: torch.Tensor, lora_B_cat: torch.Tensor, s: torch.Tensor, meta: SegmentMeta):
    """(dS [tokens, max rank] in dY's dtype, dB_cat [N, sum of ranks] in fp32)."""
    M, N = dy.shape
    ds = torch.empty((M, meta.max_rank), device=dy.device, dtype=dy.dtype)
    db = torch.zeros((N, meta.total_rank), device=dy.device, dtype=torch.float32)
    num_blocks = meta.block_adapter.numel()
    if num_blocks == 0:
        return ds, db
    _multi_lora_dy_kernel[(num_blocks,)](
        dy, lora_B_cat, s, ds, db,
        meta.block_adapter, meta.block_start, meta.block_end,
        meta.adapter_rank, meta.adapter_rank_offset, meta.adapter_scaling,
        N, meta.max_rank, meta.total_rank,
        dy.stride(0), dy.stride(1), lora_B_cat.stride(0), lora_B_cat.stride(1), s.stride(0), s.stride(1),
        ds.stride(0), ds.stride(1),
        BLOCK_M=meta.block_m,
        BLOCK_R=rank_block(meta.max_rank),
        UPCAST=upcast_dots(dy.dtype),
        PRECISION=dot_precision(dy.dtype),
    )
    return ds, db
