"""Forward front end: S = dropout(X) A^T, with dropout fused into the down-projection.

X is read once and the dropped copy never exists: the keep-mask is a function of (seed, element
position) and is regenerated wherever it is needed again (see utils.keep_mask).
"""

from __future__ import annotations

import torch

from .utils import (
    autotune_configs, dot_precision, keep_factor, m_bucket, prune_by_footprint, rank_block, tile_dot, triton, tl,
    upcast_dots,
)


def _down_configs():
    return autotune_configs(
        [
            triton.Config({"BLOCK_M": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_M": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_M": 64, "BLOCK_K": 128}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_M": 32, "BLOCK_K": 128}, num_warps=4, num_stages=4),
            # Few rows per program: enough programs to fill the GPU at a few thousand tokens.
            triton.Config({"BLOCK_M": 16, "BLOCK_K": 128}, num_warps=4, num_stages=4),
            # Wide rank tiles (r > 64).
            triton.Config({"BLOCK_M": 32, "BLOCK_K": 32}, num_warps=4, num_stages=2),
        ]
    )


def down_footprint(config, element_bytes, BLOCK_R, HAS_DROPOUT, BLOCK_M=None, **_):
    """(shared bytes, fp32 accumulator elements) of a down-projection launch, for config pruning
    (BLOCK_M is the config's, or the launch's for the multi-adapter kernel)."""
    block_m, block_k = config.kwargs.get("BLOCK_M", BLOCK_M), config.kwargs["BLOCK_K"]
    shared = config.num_stages * (block_m * block_k + block_k * BLOCK_R) * element_bytes
    if HAS_DROPOUT:
        shared += block_m * block_k * 4
    return shared, block_m * BLOCK_R


@triton.autotune(
    configs=_down_configs(),
    key=["K", "BLOCK_R", "HAS_DROPOUT", "M_BUCKET"],
    prune_configs_by={"early_config_prune": prune_by_footprint(down_footprint)},
)
@triton.jit
def _lora_down_kernel(
    x_ptr, a_ptr, s_ptr,
    M, K, R,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_sm, stride_sr,
    seed, dropout_p,
    M_BUCKET,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # int64 row offsets: tokens x width passes 2^31 on large layers.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
            mask=(rows[:, None] < M) & (cols[None, :] < K),
            other=0.0,
        )
        if UPCAST:
            x = x.to(tl.float32)
        if HAS_DROPOUT:
            x = x * keep_factor(seed, rows, k0, K, dropout_p, BLOCK_K).to(x.dtype)
        a_t = tl.load(
            a_ptr + ranks[None, :] * stride_ar + cols[:, None] * stride_ak,
            mask=(ranks[None, :] < R) & (cols[:, None] < K),
            other=0.0,
        )
        acc = tile_dot(x, a_t, acc, UPCAST, PRECISION)
    if HAS_DROPOUT:
        # Dropout's 1/(1-p) is linear: applied once to the fp32 accumulator, not per element of X.
        acc = acc * (1.0 / (1.0 - dropout_p))
    tl.store(
        s_ptr + rows[:, None] * stride_sm + ranks[None, :] * stride_sr,
        acc.to(s_ptr.dtype.element_ty),
        mask=(rows[:, None] < M) & (ranks[None, :] < R),
    )


def lora_down(x: torch.Tensor, lora_A: torch.Tensor, dropout_p: float, seed: int) -> torch.Tensor:
    """S [M, r] = dropout(X) A^T for X [M, K] (any strides) and A [r, K]; S has X's dtype."""
    M, K = x.shape
    R = lora_A.shape[0]
    s = torch.empty((M, R), device=x.device, dtype=x.dtype)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)  # noqa: E731
    _lora_down_kernel[grid](
        x, lora_A, s,
        M, K, R,
        x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), s.stride(0), s.stride(1),
        seed, dropout_p,
        m_bucket(M),
        HAS_DROPOUT=dropout_p > 0.0,
        BLOCK_R=rank_block(R),
        UPCAST=upcast_dots(x.dtype),
        PRECISION=dot_precision(x.dtype),
    )
    return s
