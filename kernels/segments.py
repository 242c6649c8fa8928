"""Segment metadata for multi-adapter LoRA batches.

A packed microbatch is a sequence of consecutive token segments, each trained by one adapter (an
adapter may own several segments). The kernels walk it in row blocks that never straddle two
segments (as vLLM's LoRA kernels do), so each program multiplies by exactly one adapter's weights.
The adapters' weights are concatenated along the rank dimension (A_cat [sum r, K], B_cat
[N, sum r]); an adapter is addressed by its rank offset, so adapters of different ranks waste no
padding and no table of raw pointers is needed.

Built once per microbatch and shared by every layer of the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .utils import MAX_RANK, triton, tl

SEGMENT_BLOCK_M = 64


@dataclass(frozen=True)
class SegmentMeta:
    """Where each adapter's tokens and weights are, in the forms the kernels and torch backend use."""

    num_tokens: int
    # Per segment (python, for the torch backend): adapter index, first row, row count.
    segments: tuple[tuple[int, int, int], ...]
    # Per adapter (python and device copies): rank, offset into the concatenated rank dimension,
    # scaling, dropout probability.
    ranks: tuple[int, ...]
    rank_offsets: tuple[int, ...]
    scalings: tuple[float, ...]
    dropout_ps: tuple[float, ...]
    # Device tensors for the kernels.
    block_adapter: torch.Tensor  # int32 [num_blocks]
    block_start: torch.Tensor  # int32 [num_blocks]
    block_end: torch.Tensor  # int32 [num_blocks]
    adapter_rank: torch.Tensor  # int32 [num_adapters]
    adapter_rank_offset: torch.Tensor  # int32 [num_adapters]
    adapter_scaling: torch.Tensor  # fp32 [num_adapters]
    adapter_dropout_p: torch.Tensor  # fp32 [num_adapters]
    block_m: int
    # Per token, what names its dropout mask (utils.keyed_keep_mask): its position and key, int64
    # [num_tokens] (empty without dropout). By default the row index and 0.
    dropout_position: torch.Tensor
    dropout_key: torch.Tensor

    @property
    def num_adapters(self) -> int:
        return len(self.ranks)

    @property
    def max_rank(self) -> int:
        return max(self.ranks)

    @property
    def total_rank(self) -> int:
        return sum(self.ranks)

    @property
    def has_dropout(self) -> bool:
        return any(p > 0.0 for p in self.dropout_ps)

    def row_dropout_p(self, device: torch.device) -> torch.Tensor:
        """[num_tokens] fp32: each token's adapter's dropout probability."""
        p = torch.empty(self.num_tokens, dtype=torch.float32, device=device)
        for adapter, start, length in self.segments:
            p[start : start + length] = self.dropout_ps[adapter]
        return p


def _to_device(tables: list[list], dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """The tables as tensors on `device`, in one host-to-device copy (see _copy_without_waiting)."""
    flat = torch.tensor([value for table in tables for value in table], dtype=dtype)
    return list(_copy_without_waiting(flat, device).split([len(table) for table in tables]))


def _copy_without_waiting(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`host` on `device` in one copy that does not wait for the GPU (from pinned memory,
    non-blocking): the batch's metadata is built while the previous microbatch still runs."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def build_segment_meta(
    segment_adapters: list[int],
    segment_lengths: list[int],
    ranks: tuple[int, ...] | list[int],
    scalings: tuple[float, ...] | list[float],
    dropout_ps: tuple[float, ...] | list[float],
    device: torch.device | str,
    block_m: int = SEGMENT_BLOCK_M,
    dropout_rows: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> SegmentMeta:
    """Segment i has segment_lengths[i] consecutive tokens trained by adapter segment_adapters[i];
    adapter a has rank ranks[a], scaling scalings[a] and dropout probability dropout_ps[a].

    An adapter of rank 0 adds nothing: its tokens get the base layer's output alone (a job whose
    adapter does not target this layer). dropout_rows: (positions, keys), int64 [tokens] on
    `device`, naming each token's dropout mask (see utils.keyed_keep_mask): a packed sample whose
    tokens are named by its own key and their positions in it draws the same masks wherever it
    is packed. By default a token is named by its row."""
    if block_m < 1:
        raise ValueError(f"block_m must be >= 1, got {block_m}")
    num_adapters = len(ranks)
    if not (len(scalings) == len(dropout_ps) == num_adapters) or num_adapters == 0:
        raise ValueError(
            f"ranks, scalings and dropout_ps need one entry per adapter, got {len(ranks)}, {len(scalings)}, {len(dropout_ps)}"
        )
    if len(segment_adapters) != len(segment_lengths):
        raise ValueError(
            f"segment_adapters and segment_lengths must have the same length, got {len(segment_adapters)} and {len(segment_lengths)}"
        )
    for a, r in enumerate(ranks):
        if not 0 <= r <= MAX_RANK:
            raise ValueError(f"adapter {a}: rank must be in 0..{MAX_RANK}, got {r}")
    for a, p in enumerate(dropout_ps):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"adapter {a}: dropout probability must be in [0, 1), got {p}")
    rank_offsets, offset = [], 0
    for r in ranks:
        rank_offsets.append(offset)
        offset += r

    segments, blocks = [], []
    start = 0
    for adapter, length in zip(segment_adapters, segment_lengths):
        if not 0 <= adapter < num_adapters:
            raise ValueError(f"segment adapter index {adapter} is outside 0..{num_adapters - 1}")
        if length < 0:
            raise ValueError(f"segment lengths must be >= 0, got {length}")
        segments.append((adapter, start, length))
        for block_start in range(start, start + length, block_m):
            blocks.append((adapter, block_start, min(block_start + block_m, start + length)))
        start += length

    device = torch.device(device)
    dropout_position, dropout_key = _dropout_rows(dropout_rows, start, any(p > 0.0 for p in dropout_ps), device)
    int_tables = [[b[0] for b in blocks], [b[1] for b in blocks], [b[2] for b in blocks], list(ranks), rank_offsets]
    block_adapter, block_start, block_end, adapter_rank, adapter_rank_offset = _to_device(int_tables, torch.int32, device)
    adapter_scaling, adapter_dropout_p = _to_device([list(scalings), list(dropout_ps)], torch.float32, device)
    return SegmentMeta(
        num_tokens=start,
        segments=tuple(segments),
        ranks=tuple(int(r) for r in ranks),
        rank_offsets=tuple(rank_offsets),
        scalings=tuple(float(s) for s in scalings),
        dropout_ps=tuple(float(p) for p in dropout_ps),
        block_adapter=block_adapter,
        block_start=block_start,
        block_end=block_end,
        adapter_rank=adapter_rank,
        adapter_rank_offset=adapter_rank_offset,
        adapter_scaling=adapter_scaling,
        adapter_dropout_p=adapter_dropout_p,
        block_m=block_m,
        dropout_position=dropout_position,
        dropout_key=dropout_key,
    )


def sample_dropout_rows(
    sample_keys: list[int], sample_lengths: list[int], device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """build_segment_meta's dropout_rows for consecutive samples: each token named by its sample's
    key and its position in the sample."""
    if len(sample_keys) != len(sample_lengths):
        raise ValueError(f"sample_keys and sample_lengths must have the same length, got {len(sample_keys)} and {len(sample_lengths)}")
    lengths = torch.tensor(sample_lengths, dtype=torch.int64)
    starts = torch.cumsum(lengths, 0) - lengths
    total = int(lengths.sum())
    positions = torch.arange(total, dtype=torch.int64) - torch.repeat_interleave(starts, lengths)
    keys = torch.repeat_interleave(torch.tensor(sample_keys, dtype=torch.int64), lengths)
    both = _copy_without_waiting(torch.cat([positions, keys]), torch.device(device))
    return both[:total], both[total:]


def _same_device(placed: torch.device, wanted: torch.device) -> bool:
    """"cuda" names the current CUDA device: a table on it is on "cuda:<current>"."""
    if placed.type != wanted.type:
        return False
    if wanted.index is None and placed.type == "cuda":
        return placed.index == torch.cuda.current_device()
    return wanted.index is None or placed.index == wanted.index


def _dropout_rows(
    dropout_rows: tuple[torch.Tensor, torch.Tensor] | None, num_tokens: int, has_dropout: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    if dropout_rows is None:
        if not has_dropout:
            empty = torch.empty(0, dtype=torch.int64, device=device)
            return empty, empty
        return torch.arange(num_tokens, dtype=torch.int64, device=device), torch.zeros(num_tokens, dtype=torch.int64, device=device)
    positions, keys = dropout_rows
    for name, table in (("positions", positions), ("keys", keys)):
        if table.dtype != torch.int64 or tuple(table.shape) != (num_tokens,) or not _same_device(table.device, device):
            raise ValueError(
                f"dropout_rows {name} must be int64 [{num_tokens}] on {device}, got {table.dtype} "
                f"{list(table.shape)} on {table.device}"
            )
    return positions, keys


if triton is not None:

    @triton.jit
    def segment_block(
        block, block_adapter_ptr, block_start_ptr, block_end_ptr, rank_ptr, rank_offset_ptr,
        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        """Row block `block` of the metadata: (adapter, rows, row_ok, ranks, rank_ok, the adapter's
        indices in the concatenated rank dimension)."""
        adapter = tl.load(block_adapter_ptr + block)
        # int64 row offsets: tokens x width passes 2^31 on large layers.
        rows = tl.load(block_start_ptr + block).to(tl.int64) + tl.arange(0, BLOCK_M)
        row_ok = rows < tl.load(block_end_ptr + block)
        ranks = tl.arange(0, BLOCK_R)
        rank_ok = ranks < tl.load(rank_ptr + adapter)
        return adapter, rows, row_ok, ranks, rank_ok, tl.load(rank_offset_ptr + adapter) + ranks
