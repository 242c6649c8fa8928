"""Forward variant with the whole output in one Triton GEMM (the LoRAFusion paper's layout):
Y = X W^T + bias + scaling * S B^T, with S B^T computed into the accumulator before the K loop,
so Y is written exactly once. The default forward instead runs the base GEMM on cuBLAS and adds
S B^T with cuBLAS addmm (beta = 1); benchmarks/bench_lora_linear.py times both.
"""

from __future__ import annotations

import torch

from .utils import (
    autotune_configs, dot_precision, m_bucket, prune_by_footprint, rank_block, tile_dot, triton, tl, upcast_dots,
)


def _gemm_configs():
    return autotune_configs(
        [
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
            # Wide rank tiles (r > 64) and fp32: S [BLOCK_M, BLOCK_R] and B [BLOCK_R, BLOCK_N] are
            # staged in shared memory beside the pipelined X and W tiles.
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=2),
        ]
    )


def _gemm_footprint(config, element_bytes, BLOCK_R, **_):
    block_m, block_n, block_k = (config.kwargs[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    shared = (config.num_stages * (block_m + block_n) * block_k + (block_m + block_n) * BLOCK_R) * element_bytes
    return shared, block_m * block_n


# Keyed on a power-of-two bucket of M, not M: every new microbatch length would re-benchmark.
@triton.autotune(
    configs=_gemm_configs(),
    key=["M_BUCKET", "N", "K", "BLOCK_R"],
    prune_configs_by={"early_config_prune": prune_by_footprint(_gemm_footprint)},
)
@triton.jit
def _linear_lora_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, s_ptr, b_ptr, y_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sm, stride_sr, stride_bn, stride_br,
    stride_ym, stride_yn,
    scaling,
    M_BUCKET,
    HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped launch order: consecutive programs share rows of X, for L2 reuse.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % group_rows
    pid_n = (pid % group_size) // group_rows

    # int64 offsets: tokens x width passes 2^31 on large layers.
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = tl.arange(0, BLOCK_R)
    row_ok = rows < M
    col_ok = cols < N

    s = tl.load(
        s_ptr + rows[:, None] * stride_sm + ranks[None, :] * stride_sr,
        mask=row_ok[:, None] & (ranks[None, :] < R),
        other=0.0,
    )
    b_t = tl.load(
        b_ptr + cols[None, :] * stride_bn + ranks[:, None] * stride_br,
        mask=col_ok[None, :] & (ranks[:, None] < R),
        other=0.0,
    )
    acc = tile_dot(s, b_t, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), UPCAST, PRECISION) * scaling
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
            mask=row_ok[:, None] & (ks[None, :] < K),
            other=0.0,
        )
        w_t = tl.load(
            w_ptr + cols[None, :] * stride_wn + ks[:, None] * stride_wk,
            mask=col_ok[None, :] & (ks[:, None] < K),
            other=0.0,
        )
        acc = tile_dot(x, w_t, acc, UPCAST, PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn,
        acc.to(y_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


def linear_lora_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    s: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """Y [M, N] = X W^T + bias + scaling * S B^T in one kernel."""
    M, K = x.shape
    N = weight.shape[0]
    R = lora_B.shape[1]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _linear_lora_gemm_kernel[grid](
        x, weight, bias if bias is not None else y, s, lora_B, y,
        M, N, K, R,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), s.stride(0), s.stride(1),
        lora_B.stride(0), lora_B.stride(1), y.stride(0), y.stride(1),
        scaling,
        m_bucket(M),
        HAS_BIAS=bias is not None,
        BLOCK_R=rank_block(R),
        UPCAST=upcast_dots(x.dtype),
        PRECISION=dot_precision(x.dtype),
    )
    return y
