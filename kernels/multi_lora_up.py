"""Multi-adapter up-projection: Y0 = scaling_a * S B_a^T (+ bias) per segment, written once.

The caller then adds the base GEMM over all tokens with cuBLAS addmm (beta = 1): the LoRA output
reaches Y without a separate element-wise pass.
"""

from __future__ import annotations

import torch

from .segments import SegmentMeta, segment_block
from .utils import autotune_configs, dot_precision, prune_by_footprint, rank_block, tile_dot, triton, tl, upcast_dots


def _configs():
    return autotune_configs(
        [
            triton.Config({"BLOCK_N": 128}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_N": 256}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=2),  # wide rank tiles
        ]
    )


def _footprint(config, element_bytes, BLOCK_R, BLOCK_M, **_):
    block_n = config.kwargs["BLOCK_N"]
    return (BLOCK_M + block_n) * BLOCK_R * element_bytes, BLOCK_M * block_n


@triton.autotune(
    configs=_configs(),
    key=["N", "BLOCK_R"],
    prune_configs_by={"early_config_prune": prune_by_footprint(_footprint)},
)
@triton.jit
def _multi_lora_up_kernel(
    s_ptr, b_ptr, bias_ptr, y_ptr,
    block_adapter_ptr, block_start_ptr, block_end_ptr, rank_ptr, rank_offset_ptr, scaling_ptr,
    N,
    stride_sm, stride_sr, stride_bn, stride_br, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr,
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
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    s = tl.load(
        s_ptr + rows[:, None] * stride_sm + ranks[None, :] * stride_sr,
        mask=row_ok[:, None] & rank_ok[None, :],
        other=0.0,
    )
    b_t = tl.load(
        b_ptr + cols[None, :] * stride_bn + adapter_cols[:, None] * stride_br,
        mask=col_ok[None, :] & rank_ok[:, None],
        other=0.0,
    )
    y = tile_dot(s, b_t, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), UPCAST, PRECISION)
    y = y * tl.load(scaling_ptr + adapter)
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn,
        y.to(y_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


def multi_lora_up(
    s: torch.Tensor, lora_B_cat: torch.Tensor, bias: torch.Tensor | None, meta: SegmentMeta
) -> torch.Tensor:
    """Y0 [tokens, N] = scaling_a * S B_a^T (+ bias), for B_cat [N, sum of ranks]."""
    M = s.shape[0]
    N = lora_B_cat.shape[0]
    y = torch.empty((M, N), device=s.device, dtype=s.dtype)
    num_blocks = meta.block_adapter.numel()
    if num_blocks == 0:
        return y
    grid = lambda cfg: (num_blocks, triton.cdiv(N, cfg["BLOCK_N"]))  # noqa: E731
    _multi_lora_up_kernel[grid](
        s, lora_B_cat, bias if bias is not None else y, y,
        meta.block_adapter, meta.block_start, meta.block_end,
        meta.adapter_rank, meta.adapter_rank_offset, meta.adapter_scaling,
        N,
        s.stride(0), s.stride(1), lora_B_cat.stride(0), lora_B_cat.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None,
        BLOCK_M=meta.block_m,
        BLOCK_R=rank_block(meta.max_rank),
        UPCAST=upcast_dots(s.dtype),
        PRECISION=dot_precision(s.dtype),
    )
    return y
