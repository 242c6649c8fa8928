"""Grouping jobs so that their global batches can be staggered in the pipeline.

A *group* is a set of jobs whose global batch ``g`` is packed together (one bin-packing problem per
(global batch, group), called a *unit*). Units of different groups are then interleaved so that the
rule of :func:`lorafusion.scheduler.core.earliest_next_batch_position` holds: a job's batch ``g + 1``
starts at least ``S`` microbatch positions after the last microbatch of its batch ``g``, i.e. at
least ``S - 1`` other microbatches lie in between.

The rule used here: emitting groups round-robin, the microbatches of the *other* groups are what
fills the gap after each unit. So a partition into groups is acceptable when, for every group ``k``,

    sum over the other groups k' of floor(T_k' / capacity)  >=  S - 1,

where ``T_k`` is the group's expected tokens per global batch (sum over its jobs of global batch size
times mean sample length). ``floor`` counts only the microbatches a group fills completely, so the
estimate stays on the safe side when leftovers are merged. Among acceptable partitions the one with
the *fewest* groups is chosen, because a larger packing problem fills microbatches better and
leaves fewer partial leftovers; for a given number of groups jobs are assigned
longest-processing-time first (largest ``T`` to the lightest group), which balances the groups.
With ``S = 1`` every job goes into one group. When no partition is acceptable (e.g. one job, or a
pipeline much deeper than the work per batch), every job gets its own group, which staggers as much
as possible; the ordering step then inserts the no-ops that remain unavoidable.

This rule is a good first guess, not the last word: with padding multiples, one large group puts
many padded job segments into each microbatch. :func:`candidate_groupings` lists the rule's choice
and a few others, and :mod:`lorafusion.scheduler.group_selection` keeps the one whose simulated
schedule is fastest.
"""

from __future__ import annotations

from collections.abc import Sequence

from .core import Job


def expected_tokens_per_batch(job: Job) -> float:
    return job.global_batch_size * sum(job.lengths) / len(job.lengths)


def _partition(jobs: Sequence[Job], num_groups: int) -> list[list[Job]]:
    """Longest-processing-time-first assignment; ties break by input order (deterministic)."""
    order = sorted(range(len(jobs)), key=lambda i: (-expected_tokens_per_batch(jobs[i]), i))
    loads = [0.0] * num_groups
    members: list[list[int]] = [[] for _ in range(num_groups)]
    for i in order:
        lightest = min(range(num_groups), key=lambda k: (loads[k], k))
        loads[lightest] += expected_tokens_per_batch(jobs[i])
        members[lightest].append(i)
    groups = [sorted(m) for m in members if m]
    groups.sort(key=lambda m: m[0])
    return [[jobs[i] for i in m] for m in groups]


def staggers(groups: Sequence[Sequence[Job]], stages: int, capacity: int) -> bool:
    """Whether round-robin over ``groups`` is expected to keep each job's batches ``stages`` apart."""
    full_bins = [int(sum(expected_tokens_per_batch(j) for j in g) // capacity) for g in groups]
    total = sum(full_bins)
    return all(total - own >= stages - 1 for own in full_bins)


def group_jobs(jobs: Sequence[Job], stages: int, capacity: int) -> list[list[str]]:
    """Split jobs into groups (lists of job names) by the rule in the module docstring."""
    for num_groups in range(1, len(jobs) + 1):
        groups = _partition(jobs, num_groups)
        if staggers(groups, stages, capacity):
            return [[j.name for j in g] for g in groups]
    return [[j.name] for j in jobs]


def candidate_groupings(jobs: Sequence[Job], stages: int, capacity: int) -> list[list[list[str]]]:
    """The rule's grouping first, then partitions into 1, 2, 4, ceil(J / 2) (pairs), J and one more
    than the rule's number of groups; duplicates dropped, order kept."""
    chosen = group_jobs(jobs, stages, capacity)
    candidates = [chosen]
    for count in (1, 2, 4, -(-len(jobs) // 2), len(jobs), len(chosen) + 1):
        if 1 <= count <= len(jobs):
            grouping = [[j.name for j in g] for g in _partition(jobs, count)]
            if grouping not in candidates:
                candidates.append(grouping)
    return candidates
