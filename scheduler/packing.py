"""Bin-packing one (global batch, group) into token-capped microbatches.

Objective, lexicographic: (1) the fewest bins; (2) among those, the smallest possible load in the
least-loaded bin, so that this leftover bin is as small as possible and can be merged with another
group's microbatch by the ordering step. Loads are padded (see :mod:`lorafusion.scheduler.bins`).

Procedure, split in two phases so that a caller can run the cheap phase for every group of a global
batch first and spend one time budget on the exact phase where it can pay off
(:mod:`lorafusion.scheduler.batch_packing`):

1. :func:`heuristic_pack`: first-fit decreasing (FFD), then a local search that empties the lightest
   bin into the others' free room (:func:`~lorafusion.scheduler.bins.shrink_lightest_bin`). Two lower
   bounds, ``LB = ceil(sum of per-job padded totals / capacity)`` on the bin count and
   ``total - (K - 1) * capacity`` on the lightest of ``K`` bins, decide whether it is already
   optimal (within ``leftover_gap`` on the lightest bin);
2. :func:`improve_with_milp`, only where a bound shows the heuristic may be beaten: for
   ``K = LB, ..., K_heuristic`` solve a MILP (:mod:`lorafusion.scheduler.milp`) that packs the items
   into exactly ``K`` bins with non-increasing loads and minimises the last bin's load. An
   infeasible ``K`` moves on to ``K + 1``; ``K = K_heuristic`` only tries to shrink the lightest bin,
   and its result is kept only if it beats the heuristic. Instances with more than
   ``full_milp_max_binaries`` assignment variables re-pack only the items of the heuristic's
   ``neighbourhood_bins`` lightest bins, where the slack is. Everything stops at a deadline and
   keeps the best packing found.

``Packing.solver`` says which path produced the result:

* ``"greedy-optimal"``: the heuristic meets both lower bounds (with ``optimise_leftover=False``:
  the bin-count bound), no MILP run;
* ``"milp"`` / ``"milp-neighbourhood"``: the MILP (whole instance / lightest bins) improved on
  the heuristic and proved its result optimal (for that scope);
* ``"greedy-checked"``: the MILP finished and could not beat the heuristic, which is kept;
* ``"milp-timeout"``: time ran out; the MILP's best packing beat the heuristic and is used;
* ``"greedy-timeout"``: time ran out with nothing better than the heuristic, which is used;
* ``"greedy"``: the MILP was disabled (``use_milp=False``).

Measured on CPU (benchmarks/results/scheduler_cpu.md): the whole-instance MILP for 128-256 samples
rarely finishes within 1 s, the neighbourhood variant typically in 0.05-0.3 s, and after the local
search most packings never reach the solver.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from .bins import (
    bin_count_lower_bound,
    bin_load,
    greedy_pack,
    shrink_lightest_bin,
    smallest_load_lower_bound,
)
from .milp import search_bin_counts

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


@dataclass(frozen=True)
class PackingProblem:
    """Items of one (global batch, group): ``segments[i]`` = owning job, ``tokens[i]`` = length."""

    segments: tuple[int, ...]
    tokens: tuple[int, ...]
    capacity: int
    pad_multiple: int = 1
    leftover_gap: float = 0.05
    # False: the MILP runs only when the bin count may be beaten, the lightest bin is left to the
    # local search (the planner's setting: on the benchmark workloads a MILP-shrunk leftover merged
    # into no fewer microbatches than the local search's).
    optimise_leftover: bool = True

    def load(self, items: Sequence[int]) -> int:
        return bin_load(items, self.segments, self.tokens, self.pad_multiple)


@dataclass(frozen=True)
class HeuristicResult:
    """Phase 1's packing, its bounds, and whether a MILP could still improve it."""

    problem: PackingProblem
    bins: tuple[tuple[int, ...], ...]
    lower_bound: int
    greedy_bins: int
    may_improve: bool
    time_s: float


def heuristic_pack(problem: PackingProblem) -> HeuristicResult:
    """Phase 1: FFD plus local search, and whether the bounds prove it optimal."""
    start = time.perf_counter()
    p = problem
    greedy = greedy_pack(p.segments, p.tokens, p.capacity, p.pad_multiple)
    bins = shrink_lightest_bin(greedy, p.segments, p.tokens, p.capacity, p.pad_multiple)
    lower_bound = bin_count_lower_bound(p.segments, p.tokens, p.capacity, p.pad_multiple)
    smallest = min(p.load(b) for b in bins)
    smallest_bound = smallest_load_lower_bound(p.segments, p.tokens, p.capacity, p.pad_multiple, len(bins))
    fewest = len(bins) == lower_bound
    proven = len(bins) == 1 or (fewest and smallest - smallest_bound <= p.leftover_gap * smallest)
    return HeuristicResult(
        problem=p,
        bins=tuple(tuple(b) for b in bins),
        lower_bound=lower_bound,
        greedy_bins=len(greedy),
        may_improve=not proven and (p.optimise_leftover or not fewest),
        time_s=time.perf_counter() - start,
    )


def finish(heuristic: HeuristicResult, bins: Sequence[Sequence[int]], solver: str, solve_time_s: float) -> Packing:
    """The Packing of ``bins``: sorted by load, heaviest first (ties: lowest item first)."""
    loads = [heuristic.problem.load(b) for b in bins]
    order = sorted(range(len(bins)), key=lambda b: (-loads[b], min(bins[b])))
    return Packing(
        bins=tuple(tuple(sorted(bins[b])) for b in order),
        loads=tuple(loads[b] for b in order),
        lower_bound=heuristic.lower_bound,
        greedy_bins=heuristic.greedy_bins,
        solver=solver,
        solve_time_s=solve_time_s,
    )


def improve_with_milp(
    heuristic: HeuristicResult, deadline: float, full_milp_max_binaries: int = 400, neighbourhood_bins: int = 4
) -> tuple[list[list[int]], str]:
    """Phase 2: the MILP search until ``deadline`` (a time.perf_counter() value); (bins, solver label)."""
    p = heuristic.problem
    incumbent = [list(b) for b in heuristic.bins]
    if time.perf_counter() >= deadline:
        return incumbent, "greedy-timeout"
    if len(p.tokens) * len(incumbent) <= full_milp_max_binaries:
        outcome, bins = search_bin_counts(
            p.segments, p.tokens, p.capacity, p.pad_multiple, heuristic.lower_bound, incumbent, deadline, p.leftover_gap
        )
        labels = {"improved": "milp", "improved-timeout": "milp-timeout"}
        labels.update({"not-improved": "greedy-checked", "timeout": "greedy-timeout"})
        return bins, labels[outcome]

    by_load = sorted(incumbent, key=p.load)
    light, kept = by_load[:neighbourhood_bins], by_load[neighbourhood_bins:]
    items = [i for b in light for i in b]
    sub_segments = [p.segments[i] for i in items]
    sub_tokens = [p.tokens[i] for i in items]
    sub_lower = bin_count_lower_bound(sub_segments, sub_tokens, p.capacity, p.pad_multiple)
    local, offset = [], 0
    for b in light:
        local.append(list(range(offset, offset + len(b))))
        offset += len(b)
    outcome, sub_bins = search_bin_counts(
        sub_segments, sub_tokens, p.capacity, p.pad_multiple, sub_lower, local, deadline, p.leftover_gap
    )
    labels = {"improved": "milp-neighbourhood", "improved-timeout": "milp-timeout"}
    labels.update({"not-improved": "greedy-checked", "timeout": "greedy-timeout"})
    return kept + [[items[i] for i in b] for b in sub_bins], labels[outcome]


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
    """Pack one problem with both phases; the MILP gets ``time_limit_s`` from the start of the call.

    ``leftover_gap`` is the relative optimality gap accepted on the smallest bin's load (the bin
    count itself is exact when the MILP finishes).
    """
    start = time.perf_counter()
    problem = PackingProblem(tuple(segments), tuple(tokens), capacity, pad_multiple, leftover_gap)
    heuristic = heuristic_pack(problem)
    if not heuristic.may_improve:
        bins, solver = heuristic.bins, "greedy-optimal"
    elif not use_milp:
        bins, solver = heuristic.bins, "greedy"
    else:
        bins, solver = improve_with_milp(heuristic, start + time_limit_s, full_milp_max_binaries, neighbourhood_bins)
    return finish(heuristic, bins, solver, time.perf_counter() - start)
