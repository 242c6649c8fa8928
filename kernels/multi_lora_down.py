"""Multi-adapter forward front end: S = dropout_a(X) A_a^T per segment, one pass over X.

Each program takes one row block of one segment (see segments.py) and its adapter's rows of A_cat.
S is [tokens, max rank]; columns past a token's adapter rank are written as zeros.
"""

from __future__ import annotations

import torch

from .lora_down import down_footprint
from .segments import SegmentMeta, segment_block
from .utils import autotune_configs, dot_precision, keyed_keep_factor, prune_by_footprint, rank_block, tile_dot, triton, tl, upcast_dots


def _configs():
    return autotune_configs(
        [
            triton.Config({"BLOCK_K": 64}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_K": 128}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_K": 128}, num_warps=8, num_stages=4),
            triton.Config({"BLOCK_K": 32}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK_K": 32}, num_warps=4, num_stages=2),  # wide rank tiles
        ]
    )


@triton.autotune(
    configs=_configs(),
    key=["K", "BLOCK_R", "HAS_DROPOUT"],
    prune_configs_by={"early_config_prune": prune_by_footprint(down_footprint)},
)
@triton.jit
def _multi_lora_down_kernel(
    x_ptr, a_ptr, s_ptr,
    block_adapter_ptr, block_start_ptr, block_end_ptr, rank_ptr, rank_offset_ptr, dropout_p_ptr,
    dropout_position_ptr, dropout_key_ptr,
    K, S_COLS,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_sm, stride_sr,
    seed,
    HAS_DROPOUT: tl.constexpr,
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
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if HAS_DROPOUT:
        dropout_p = tl.load(dropout_p_ptr + adapter)
        positions = tl.load(dropout_position_ptr + rows, mask=row_ok, other=0)
        keys = tl.load(dropout_key_ptr + rows, mask=row_ok, other=0)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        x = tl.load(
            x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            x = x.to(tl.float32)
        if HAS_DROPOUT:
            x = x * keyed_keep_factor(seed, positions, keys, k0, K, dropout_p, BLOCK_K).to(x.dtype)
        a_t = tl.load(
            a_ptr + adapter_rows[None, :] * stride_ar + cols[:, None] * stride_ak,
            mask=rank_ok[None, :] & col_ok[:, None],
            other=0.0,
        )
        acc = tile_dot(x, a_t, acc, UPCAST, PRECISION)
    if HAS_DROPOUT:
        acc = acc * (1.0 / (1.0 - dropout_p))
    tl.store(
        s_ptr + rows[:, None] * stride_sm + ranks[None, :] * stride_sr,
        acc.to(s_ptr.dtype.element_ty),
        mask=row_ok[:, None] & (ranks[None, :] < S_COLS),
    )


def multi_lora_down(x: torch.Tensor, lora_A_cat: torch.Tensor, meta: SegmentMeta, seed: int) -> torch.Tensor:
    """S [tokens, max rank] for X [tokens, K] and A_cat [sum of ranks, K]."""
    M, K = x.shape
    s = torch.empty((M, meta.max_rank), device=x.device, dtype=x.dtype)
    num_blocks = meta.block_adapter.numel()
    if num_blocks == 0:
        return s
    _multi_lora_down_kernel[(num_blocks,)](
        x, lora_A_cat, s,
        meta.block_adapter, meta.block_start, meta.block_end,
        meta.adapter_rank, meta.adapter_rank_offset, meta.adapter_dropout_p,
        meta.dropout_position, meta.dropout_key,
        K, meta.max_rank,
        x.stride(0), x.stride(1), lora_A_cat.stride(0), lora_A_cat.stride(1), s.stride(0), s.stride(1),
        seed,
        HAS_DROPOUT=meta.has_dropout,
        BLOCK_M=meta.block_m,
        BLOCK_R=rank_block(meta.max_rank),
        UPCAST=upcast_dots(x.dtype),
        PRECISION=dot_precision(x.dtype),
    )
    return s
