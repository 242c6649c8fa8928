"""Choosing the grouping by the simulated time of the schedule it produces.

Each candidate of :func:`~lorafusion.scheduler.grouping.candidate_groupings` plans the jobs' first
``probe_batches`` global batches with the heuristic packing only (milliseconds, no MILP), and the
pipeline simulator times the result; the fastest candidate wins, ties going to the earlier one (the
rule's choice comes first). The probe covers the same samples for every candidate, so makespans
compare directly. This is done for every stage count: with one stage no staggering is needed, but
how many padded job segments share a microbatch still depends on the grouping.
"""

from __future__ import annotations

from collections.abc import Sequence

from .core import Job
from .cost_model import CostModel
from .grouping import candidate_groupings
from .ordering import order_microbatches
from .packing import finish, heuristic_pack
from .simulator import simulate
from .units import unit_items


def probe_jobs(jobs: Sequence[Job], probe_batches: int) -> list[Job]:
    """The jobs cut to their first ``probe_batches`` global batches."""
    return [Job(j.name, j.global_batch_size, j.lengths[: j.global_batch_size * probe_batches]) for j in jobs]


def heuristic_makespan(
    jobs: Sequence[Job], groups: Sequence[Sequence[str]], stages: int, capacity: int, pad_multiple: int, cost: CostModel
) -> float:
    by_name = {j.name: j for j in jobs}
    members = [[by_name[n] for n in g] for g in groups]

    def unit_source(group: int, global_batch: int):
        items = unit_items(members[group], global_batch)
        heuristic = heuristic_pack(items.problem(capacity, pad_multiple))
        return items.bins(finish(heuristic, heuristic.bins, "greedy", 0.0))

    order = list(order_microbatches(jobs, groups, unit_source, stages, capacity, pad_multiple))
    return simulate(order, stages, cost).makespan_s


def choose_grouping(
    jobs: Sequence[Job],
    stages: int,
    capacity: int,
    pad_multiple: int,
    cost: CostModel,
    probe_batches: int = 3,
) -> list[list[str]]:
    """The candidate grouping with the shortest simulated makespan on the probe (see module doc)."""
    candidates = candidate_groupings(jobs, stages, capacity)
    if len(candidates) == 1:
        return candidates[0]
    probe = probe_jobs(jobs, probe_batches)
    times = [heuristic_makespan(probe, g, stages, capacity, pad_multiple, cost) for g in candidates]
    return candidates[min(range(len(candidates)), key=lambda k: (times[k], k))]
