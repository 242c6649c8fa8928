"""Materialises the Triton kernels' dropout keep-mask, for tests and for debugging a run: the fused
kernels never store it, they regenerate it from (seed, element name)."""

from __future__ import annotations

import torch

from .utils import keyed_keep_mask, triton, tl


@triton.jit
def _keep_mask_kernel(
    out_ptr, position_ptr, key_ptr, M, K, seed, dropout_p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    col_start = tl.program_id(1) * BLOCK_K
    cols = col_start + tl.arange(0, BLOCK_K)
    positions = tl.load(position_ptr + rows, mask=rows < M, other=0)
    keys = tl.load(key_ptr + rows, mask=rows < M, other=0)
    keep = keyed_keep_mask(seed, positions, keys, col_start, K, dropout_p, BLOCK_K)
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], keep, mask=(rows[:, None] < M) & (cols[None, :] < K))


def triton_keep_mask(
    seed: int,
    rows: int,
    cols: int,
    dropout_p: float,
    device: torch.device,
    block: tuple[int, int] = (32, 32),
    row_positions: torch.Tensor | None = None,
    row_keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """The [rows, cols] bool keep-mask that the fused kernels use for this seed and p, rows named by
    (row_positions, row_keys) as in reference.torch_keep_mask (by default the row index and 0).
    `block`: the tile shape that generates it, which must not matter; its column count a multiple of 4."""
    out = torch.empty((rows, cols), dtype=torch.bool, device=device)
    if row_positions is None:
        row_positions = torch.arange(rows, dtype=torch.int64, device=device)
    if row_keys is None:
        row_keys = torch.zeros(rows, dtype=torch.int64, device=device)
    grid = (triton.cdiv(rows, block[0]), triton.cdiv(cols, block[1]))
    _keep_mask_kernel[grid](out, row_positions, row_keys, rows, cols, seed, dropout_p, BLOCK_M=block[0], BLOCK_K=block[1])
    return out
