"""Packing all groups of one global batch under one time budget.

Every group's heuristic packing comes first (milliseconds); the MILP then runs only for the groups
whose packing a lower bound shows may be beaten, all sharing one deadline, ``time_limit_s`` after
the global batch's planning started, so a global batch never takes much longer than its budget
whatever its number of groups. Those MILPs run on threads (HiGHS releases the GIL), up to
``workers`` at once; the problems with the largest gap to their bound start first.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .packing import Packing, PackingProblem, finish, heuristic_pack, improve_with_milp


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class BatchPacking:
    """The packings of one global batch's problems (same order) and the wall time it took."""

    packings: tuple[Packing, ...]
    time_s: float


def pack_global_batch(
    problems: Sequence[PackingProblem], time_limit_s: float, use_milp: bool = True, workers: int = 1
) -> BatchPacking:
    """Pack ``problems`` (one per group) with a shared MILP budget, up to ``workers`` MILPs at once.

    A packing's ``solve_time_s`` is its own heuristic plus MILP time; ``BatchPacking.time_s`` is the
    wall time of the whole global batch.
    """
    start = time.perf_counter()
    deadline = start + time_limit_s
    heuristics = [heuristic_pack(p) for p in problems]
    results: list[tuple[Sequence[Sequence[int]], str, float]] = [
        (h.bins, "greedy" if h.may_improve else "greedy-optimal", 0.0) for h in heuristics
    ]
    needy = sorted(
        (k for k, h in enumerate(heuristics) if h.may_improve and use_milp),
        key=lambda k: (heuristics[k].lower_bound - len(heuristics[k].bins), k),
    )
    if workers > 1 and len(needy) > 1:
        with ThreadPoolExecutor(min(workers, len(needy)), thread_name_prefix="lorafusion-milp") as pool:
            futures = {k: pool.submit(_timed_milp, heuristics[k], deadline) for k in needy}
            for k, future in futures.items():
                results[k] = future.result()
    else:
        for k in needy:
            results[k] = _timed_milp(heuristics[k], deadline)
    packings = tuple(
        finish(h, bins, solver, h.time_s + milp_s) for h, (bins, solver, milp_s) in zip(heuristics, results)
    )
    return BatchPacking(packings, time.perf_counter() - start)


def _timed_milp(heuristic, deadline: float) -> tuple[Sequence[Sequence[int]], str, float]:
    start = time.perf_counter()
    bins, solver = improve_with_milp(heuristic, deadline)
    return bins, solver, time.perf_counter() - start
