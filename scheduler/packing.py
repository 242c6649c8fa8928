"""Bin-packing one (global batch, group) into token-capped microbatches.

Objective, lexicographic: (1) the fewest bins; (2) among those, the smallest possible load in the
least-loaded bin, so that this leftover bin is as small as possible and can be merged with another
group's microbatch by the ordering step.

Loads are *padded*: inside a bin, each job's segment is padded up to a multiple of
``pad_multiple`` (see :func:`lorafusion.scheduler.core.padded_tokens`).

Procedure (:func:`pack`):

1. greedy first-fit-decreasing (FFD) gives an upper bound ``UB`` on the bin count and a feasible
   packing; ``LB = ceil(sum of per-job padded totals / capacity)`` is a lower bound;
2. if FFD meets ``LB`` and its smallest bin is within ``leftover_gap`` of the lower bound on the
   smallest load, it is optimal and the MILP is skipped (``solver="greedy-optimal"``);
3. otherwise, for ``K = LB, ..., UB`` solve a MILP with scipy.optimize.milp (HiGHS) that packs the
   items into exactly ``K`` bins whose loads are non-increasing (symmetry breaking) and minimises the
   load of the last bin (within ``leftover_gap``). An infeasible ``K`` moves on to ``K + 1``;
   ``K = UB`` is solved only to improve the smallest bin, and its result is kept only if it beats
   FFD. Instances with more than ``full_milp_max_binaries`` assignment variables (the full MILP
   rarely finishes in time there) re-pack only the items of FFD's ``neighbourhood_bins`` lightest
   bins, where all the slack is, the same way;
4. all of step 3 shares one time limit; the best packing found is returned.

``Packing.solver`` says which path produced the result:

* ``"greedy-optimal"``: FFD meets both lower bounds (see step 2), no MILP run;
* ``"milp"`` / ``"milp-neighbourhood"``: the MILP (whole instance / lightest bins) improved on
  FFD and proved its result optimal (for that scope);
* ``"greedy-checked"``: the MILP finished and could not beat FFD, so FFD is kept;
* ``"milp-timeout"``: time ran out; the MILP's best packing beat FFD and is used;
* ``"greedy-timeout"``: time ran out with nothing better than FFD, which is used;
* ``"greedy"``: the MILP was disabled (``use_milp=False``).

HiGHS ships inside scipy, so it adds no dependency; OR-Tools was not measured against it (not
installed in this project). Measured on CPU (benchmarks/results/scheduler_cpu.md) the whole-instance
MILP for 128-256 samples rarely finished within 1 s, hence the neighbourhood variant, which
typically finishes in 0.05-0.3 s; with the shortcut in step 2 many packings never reach the solver.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_array

from .core import round_up

SOLVERS = ("greedy-optimal", "milp", "milp-neighbourhood", "greedy-checked", "milp-timeout", "greedy-timeout", "greedy")


@dataclass(frozen=True)
class Packing:
    """Bins as lists of item indices, sorted by non-increasing padded load (leftover bin last)."""

    bins: tuple[tuple[int, ...], ...]
    loads: tuple[int, ...]
    lower_bound: int
    greedy_bins: int
    solver: str
    solve_time_s: float

    @property
    def num_bins(self) -> int:
        return len(self.bins)


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


def greedy_pack(
    segments: Sequence[int], tokens: Sequence[int], capacity: int, pad_multiple: int = 1
) -> list[list[int]]:
    """First-fit decreasing on padded loads; ties keep input order so the result is deterministic."""
    order = sorted(range(len(tokens)), key=lambda i: (-tokens[i], i))
    bins: list[list[int]] = []
    # Per bin: per-segment raw totals, and the bin's padded load, updated incrementally.
    segment_totals: list[dict[int, int]] = []
    loads: list[int] = []
    for i in order:
        seg, n = segments[i], tokens[i]
        for b, totals in enumerate(segment_totals):
            old = totals.get(seg, 0)
            new_load = loads[b] - round_up(old, pad_multiple) + round_up(old + n, pad_multiple)
            if new_load <= capacity:
                bins[b].append(i)
                totals[seg] = old + n
                loads[b] = new_load
                break
        else:
            bins.append([i])
            segment_totals.append({seg: n})
            loads.append(round_up(n, pad_multiple))
    return bins


def _milp_fixed_bins(
    segments: Sequence[int],
    tokens: Sequence[int],
    capacity: int,
    pad_multiple: int,
    num_bins: int,
    time_limit_s: float,
    leftover_gap: float,
) -> tuple[str, list[list[int]] | None]:
    """Pack into exactly ``num_bins`` bins with non-increasing loads, minimising the last bin's load.

    Returns (status, bins): status is "optimal", "infeasible", "timeout" (bins = incumbent or None).
    Variables: x[i, b] (item i in bin b), and when pad_multiple > 1, p[s, b] = padded blocks of
    segment s in bin b (integer), so that bin b's load is pad_multiple * sum_s p[s, b].
    """
    n, k = len(tokens), num_bins
    segment_ids = sorted(set(segments))
    seg_pos = {s: j for j, s in enumerate(segment_ids)}
    padded = pad_multiple > 1
    num_x = n * k
    num_p = len(segment_ids) * k if padded else 0

    def x(i: int, b: int) -> int:
        return i * k + b

    def p(s: int, b: int) -> int:
        return num_x + seg_pos[s] * k + b

    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    lower: list[float] = []
    upper: list[float] = []

    def add_row(entries: list[tuple[int, float]], lo: float, hi: float) -> None:
        r = len(lower)
        for c, v in entries:
            rows.append(r)
            cols.append(c)
            vals.append(v)
        lower.append(lo)
        upper.append(hi)

    def load_terms(b: int, sign: float) -> list[tuple[int, float]]:
        if padded:
            return [(p(s, b), sign * pad_multiple) for s in segment_ids]
        return [(x(i, b), sign * tokens[i]) for i in range(n)]

    for i in range(n):  # every item in exactly one bin
        add_row([(x(i, b), 1.0) for b in range(k)], 1.0, 1.0)
    for b in range(k):  # capacity, and every bin non-empty
        add_row(load_terms(b, 1.0), 1.0, capacity)
    for b in range(k - 1):  # symmetry breaking: load[b] >= load[b + 1]
        add_row(load_terms(b, 1.0) + load_terms(b + 1, -1.0), 0.0, np.inf)
    if padded:  # pad_multiple * p[s, b] >= raw tokens of segment s in bin b
        for s in segment_ids:
            for b in range(k):
                entries = [(p(s, b), float(pad_multiple))]
                entries += [(x(i, b), -float(tokens[i])) for i in range(n) if segments[i] == s]
                add_row(entries, 0.0, np.inf)

    num_vars = num_x + num_p
    objective = np.zeros(num_vars)
    for c, v in load_terms(k - 1, 1.0):
        objective[c] += v
    upper_bounds = np.ones(num_vars)
    if padded:
        upper_bounds[num_x:] = capacity // pad_multiple
    matrix = coo_array((vals, (rows, cols)), shape=(len(lower), num_vars)).tocsr()
    result = milp(
        objective,
        constraints=LinearConstraint(matrix, lower, upper),
        integrality=np.ones(num_vars),
        bounds=Bounds(np.zeros(num_vars), upper_bounds),
        options={"time_limit": max(time_limit_s, 1e-3), "disp": False, "mip_rel_gap": leftover_gap},
    )
    if result.status == 2:
        return "infeasible", None
    bins = None
    if result.x is not None:
        assignment = np.asarray(result.x[:num_x]).reshape(n, k).argmax(axis=1)
        bins = [[i for i in range(n) if assignment[i] == b] for b in range(k)]
    return ("optimal" if result.status == 0 else "timeout"), bins


def _search_bin_counts(
    segments: Sequence[int],
    tokens: Sequence[int],
    capacity: int,
    pad_multiple: int,
    lower_bound: int,
    incumbent: list[list[int]],
    deadline: float,
    leftover_gap: float,
) -> tuple[str, list[list[int]]]:
    """Try K = lower_bound, ..., len(incumbent) bins with the MILP; keep the incumbent unless beaten.

    Returns (outcome, bins), outcome one of "improved", "improved-timeout", "not-improved",
    "timeout".
    """
    incumbent_smallest = min(bin_load(b, segments, tokens, pad_multiple) for b in incumbent)
    for num_bins in range(lower_bound, len(incumbent) + 1):
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            return "timeout", incumbent
        status, bins = _milp_fixed_bins(segments, tokens, capacity, pad_multiple, num_bins, remaining, leftover_gap)
        if status == "infeasible":
            continue
        if bins is not None and (
            num_bins < len(incumbent)
            or min(bin_load(b, segments, tokens, pad_multiple) for b in bins) < incumbent_smallest
        ):
            return ("improved" if status == "optimal" else "improved-timeout"), bins
        # Either fewer bins could not be ruled out in time, or the MILP could not beat the incumbent.
        return ("not-improved" if status == "optimal" else "timeout"), incumbent
    raise AssertionError("the incumbent's bin count is always feasible for the MILP")  # pragma: no cover


def pack(
    segments: Sequence[int],
    tokens: Sequence[int],
    capacity: int,
    pad_multiple: int = 1,
    time_limit_s: float = 1.0,
    use_milp: bool = True,
    leftover_gap: float = 0.05,
    full_milp_max_binaries: int = 400,
    neighbourhood_bins: int = 4,
) -> Packing:
    """Pack items (``segments[i]`` = owning job, ``tokens[i]`` = length) into the fewest bins.

    See the module docstring for the procedure and the meaning of ``Packing.solver``.
    ``leftover_gap`` is the relative optimality gap accepted on the smallest bin's load (the bin
    count itself is always exact when the MILP finishes). Instances with more than
    ``full_milp_max_binaries`` assignment variables are improved by a neighbourhood MILP over FFD's
    ``neighbourhood_bins`` lightest bins instead of the whole instance.
    """
    start = time.perf_counter()
    greedy = greedy_pack(segments, tokens, capacity, pad_multiple)
    lower_bound = bin_count_lower_bound(segments, tokens, capacity, pad_multiple)
    upper_bound = len(greedy)

    def finish(bins: list[list[int]], solver: str) -> Packing:
        loads = [bin_load(b, segments, tokens, pad_multiple) for b in bins]
        order = sorted(range(len(bins)), key=lambda b: (-loads[b], min(bins[b])))
        return Packing(
            bins=tuple(tuple(sorted(bins[b])) for b in order),
            loads=tuple(loads[b] for b in order),
            lower_bound=lower_bound,
            greedy_bins=upper_bound,
            solver=solver,
            solve_time_s=time.perf_counter() - start,
        )

    greedy_smallest = min(bin_load(b, segments, tokens, pad_multiple) for b in greedy)
    smallest_bound = smallest_load_lower_bound(segments, tokens, capacity, pad_multiple, upper_bound)
    if upper_bound == 1 or (
        upper_bound == lower_bound and greedy_smallest - smallest_bound <= leftover_gap * greedy_smallest
    ):
        return finish(greedy, "greedy-optimal")
    if not use_milp:
        return finish(greedy, "greedy")

    deadline = start + time_limit_s
    if len(tokens) * upper_bound <= full_milp_max_binaries:
        outcome, bins = _search_bin_counts(
            segments, tokens, capacity, pad_multiple, lower_bound, greedy, deadline, leftover_gap
        )
        labels = {"improved": "milp", "improved-timeout": "milp-timeout"}
        labels.update({"not-improved": "greedy-checked", "timeout": "greedy-timeout"})
        return finish(bins, labels[outcome])

    # Large instance: re-pack the items of FFD's lightest bins, where all the slack is.
    by_load = sorted(greedy, key=lambda b: bin_load(b, segments, tokens, pad_multiple))
    light, kept = by_load[:neighbourhood_bins], by_load[neighbourhood_bins:]
    items = [i for b in light for i in b]
    sub_segments = [segments[i] for i in items]
    sub_tokens = [tokens[i] for i in items]
    sub_lower = bin_count_lower_bound(sub_segments, sub_tokens, capacity, pad_multiple)
    local = [list(range(start_, start_ + len(b))) for start_, b in zip(_offsets(light), light)]
    outcome, sub_bins = _search_bin_counts(
        sub_segments, sub_tokens, capacity, pad_multiple, sub_lower, local, deadline, leftover_gap
    )
    bins = kept + [[items[i] for i in b] for b in sub_bins]
    labels = {"improved": "milp-neighbourhood", "improved-timeout": "milp-timeout"}
    labels.update({"not-improved": "greedy-checked", "timeout": "greedy-timeout"})
    return finish(bins, labels[outcome])


def _offsets(bins: Sequence[Sequence[int]]) -> list[int]:
    """Start offset of each bin when the bins' items are laid out one after another."""
    offsets, total = [], 0
    for b in bins:
        offsets.append(total)
        total += len(b)
    return offsets
