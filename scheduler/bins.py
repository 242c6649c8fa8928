"""Padded bin loads, the lower bounds that decide whether the MILP is needed, and the heuristics.

A bin's load is *padded*: each segment (job) in it is rounded up to a multiple of ``pad_multiple``
(see :func:`lorafusion.scheduler.core.padded_tokens`). Items are given as parallel sequences,
``segments[i]`` (owning job) and ``tokens[i]`` (length).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .core import round_up


def bin_load(items: Sequence[int], segments: Sequence[int], tokens: Sequence[int], pad_multiple: int) -> int:
    """Padded load of a bin holding ``items`` (indices into ``segments``/``tokens``)."""
    per_segment: dict[int, int] = {}
    for i in items:
        per_segment[segments[i]] = per_segment.get(segments[i], 0) + tokens[i]
    return sum(round_up(total, pad_multiple) for total in per_segment.values())


def bin_count_lower_bound(segments: Sequence[int], tokens: Sequence[int], capacity: int, pad_multiple: int) -> int:
    """ceil(sum of per-segment padded totals / capacity): each segment is padded at least once."""
    return math.ceil(bin_load(range(len(tokens)), segments, tokens, pad_multiple) / capacity)


def smallest_load_lower_bound(
    segments: Sequence[int], tokens: Sequence[int], capacity: int, pad_multiple: int, num_bins: int
) -> int:
    """No bin can be lighter than what is left when the other bins are full, nor than one item."""
    total = bin_load(range(len(tokens)), segments, tokens, pad_multiple)
    lightest_item = min(round_up(n, pad_multiple) for n in tokens)
    return max(lightest_item, total - (num_bins - 1) * capacity)


class _Bins:
    """Bins with per-segment raw totals and padded loads, so that a move is costed in O(1)."""

    def __init__(self, segments: Sequence[int], tokens: Sequence[int], capacity: int, pad_multiple: int):
        self.segments, self.tokens = segments, tokens
        self.capacity, self.pad = capacity, pad_multiple
        self.items: list[list[int]] = []
        self.totals: list[dict[int, int]] = []
        self.loads: list[int] = []

    def load_with(self, b: int, i: int, sign: int = 1) -> int:
        """Load of bin ``b`` once item ``i`` is added (``sign=1``) or removed (``sign=-1``)."""
        seg = self.segments[i]
        old = self.totals[b].get(seg, 0)
        new = old + sign * self.tokens[i]
        return self.loads[b] - round_up(old, self.pad) + round_up(new, self.pad)

    def add(self, b: int, i: int) -> None:
        self.loads[b] = self.load_with(b, i)
        seg = self.segments[i]
        self.totals[b][seg] = self.totals[b].get(seg, 0) + self.tokens[i]
        self.items[b].append(i)

    def remove(self, b: int, i: int) -> None:
        self.loads[b] = self.load_with(b, i, -1)
        seg = self.segments[i]
        self.totals[b][seg] -= self.tokens[i]
        self.items[b].remove(i)

    def open(self, i: int) -> None:
        self.items.append([])
        self.totals.append({})
        self.loads.append(0)
        self.add(len(self.items) - 1, i)


def greedy_pack(
    segments: Sequence[int], tokens: Sequence[int], capacity: int, pad_multiple: int = 1
) -> list[list[int]]:
    """First-fit decreasing on padded loads; ties keep input order so the result is deterministic."""
    bins: list[list[int]] = []
    totals: list[dict[int, int]] = []  # per bin: raw tokens per segment
    loads: list[int] = []
    pad = pad_multiple
    # Inlined (no _Bins method calls): this loop is most of the planner's time on large groups.
    for i in sorted(range(len(tokens)), key=lambda i: (-tokens[i], i)):
        seg, n = segments[i], tokens[i]
        for b, load in enumerate(loads):
            if pad == 1:
                new = load + n
            else:
                old = totals[b].get(seg, 0)
                new = load - -(-old // pad) * pad + -(-(old + n) // pad) * pad
            if new <= capacity:
                bins[b].append(i)
                totals[b][seg] = totals[b].get(seg, 0) + n
                loads[b] = new
                break
        else:
            bins.append([i])
            totals.append({seg: n})
            loads.append(round_up(n, pad))
    return bins


def shrink_lightest_bin(
    packing: Sequence[Sequence[int]], segments: Sequence[int], tokens: Sequence[int], capacity: int, pad_multiple: int
) -> list[list[int]]:
    """Local search on a packing: empty the lightest bin into the others' free room.

    FFD leaves its free room spread over all bins and a leftover bin of whatever remains; the
    ordering step can merge a leftover into another group's microbatch only when it is small. Two
    moves, each strictly lowering the lightest bin's load (so the search ends): move one of its
    items into the bin where it fits tightest; or swap one of its items with a shorter item of
    another bin that has room for the difference. An emptied bin disappears, so the bin count can
    only go down. Deterministic.
    """
    bins = _Bins(segments, tokens, capacity, pad_multiple)
    for content in packing:
        bins.open(content[0])
        for i in content[1:]:
            bins.add(len(bins.items) - 1, i)
    while len(bins.items) > 1:
        light = min(range(len(bins.items)), key=lambda b: (bins.loads[b], b))
        if not _move_one(bins, light) and not _swap_one(bins, light):
            break
        if not bins.items[light]:
            del bins.items[light], bins.totals[light], bins.loads[light]
    return bins.items


def _move_one(bins: _Bins, light: int) -> bool:
    best: tuple[int, int, int] | None = None  # (-load after the move, item, bin): tightest fit first
    for i in bins.items[light]:
        for b in range(len(bins.items)):
            if b != light:
                load = bins.load_with(b, i)
                if load <= bins.capacity and (best is None or (-load, i, b) < best):
                    best = (-load, i, b)
    if best is None:
        return False
    _, i, b = best
    bins.remove(light, i)
    bins.add(b, i)
    return True


def _swap_one(bins: _Bins, light: int) -> bool:
    best: tuple[int, int, int, int] | None = None  # (load of light after, its item, other item, other bin)
    for i in bins.items[light]:
        for b in range(len(bins.items)):
            if b == light:
                continue
            for j in bins.items[b]:
                if bins.tokens[j] >= bins.tokens[i] or _exchanged(bins, b, j, i) > bins.capacity:
                    continue
                after = _exchanged(bins, light, i, j)
                if after < bins.loads[light] and (best is None or (after, i, j, b) < best):
                    best = (after, i, j, b)
    if best is None:
        return False
    _, i, j, b = best
    bins.remove(light, i)
    bins.remove(b, j)
    bins.add(b, i)
    bins.add(light, j)
    return True


def _exchanged(bins: _Bins, b: int, out: int, into: int) -> int:
    """Exact padded load of bin ``b`` once item ``out`` leaves it and item ``into`` joins it."""
    change = {bins.segments[out]: -bins.tokens[out]}
    change[bins.segments[into]] = change.get(bins.segments[into], 0) + bins.tokens[into]
    load = bins.loads[b]
    for segment, delta in change.items():
        old = bins.totals[b].get(segment, 0)
        load += round_up(old + delta, bins.pad) - round_up(old, bins.pad)
    return load
