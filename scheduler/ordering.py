"""Ordering packed units into the microbatch sequence the pipeline executes.

A *unit* is the packing of one (group, global batch): a list of bins, largest first, the leftover
(lightest) bin last. Units are emitted by a greedy list scheduler, one microbatch position at a time:

* a unit is *ready* at position ``p`` when, for each of its jobs, ``p`` is at or after
  :func:`~lorafusion.scheduler.core.earliest_next_batch_position` of that job's previous batch
  (the single dependency rule, shared with :func:`~lorafusion.scheduler.verify.verify_schedule`);
* the unit being emitted is continued until it is done (emitting a unit contiguously is what lets
  the other groups fill the gap before its next batch); then the next unit is the ready one that
  has already started (see merging), else the one whose group has the longest remaining critical
  chain (its remaining bins plus ``S - 1`` positions per remaining batch boundary), else the lowest
  group index;
* merging leftovers across groups: after taking a bin, the free room in the microbatch is filled
  with samples taken from the lightest bin of other groups' ready units (largest sample first).
  Those samples belong to a different job, so the dependency rule is unaffected, and the donor's
  leftover shrinks or disappears. A donor unit counts as started;
* when no unit is ready, a no-op microbatch is emitted; that only happens when every remaining
  unit waits for a previous batch of its own jobs, i.e. the no-op is unavoidable for this order.

The scheduler asks for each unit's packing only when it reaches that unit, so packings can be
produced ahead of time by a background worker (see :class:`~lorafusion.scheduler.planner.BackgroundPlanner`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from .core import NOOP, Job, Microbatch, SampleRef, earliest_next_batch_position, padded_tokens, round_up

# (group, global batch) -> bins of that unit, largest first.
UnitSource = Callable[[int, int], list[list[SampleRef]]]


@dataclass
class _Unit:
    group: int
    global_batch: int
    jobs: tuple[str, ...]
    bins: list[list[SampleRef]]
    started: bool = False


@dataclass
class _GroupCursor:
    jobs: list[Job]
    num_batches: int
    next_batch: int = 0
    unit: _Unit | None = None
    estimated_bins: list[int] = field(default_factory=list)


def order_microbatches(
    jobs: Sequence[Job],
    groups: Sequence[Sequence[str]],
    unit_source: UnitSource,
    stages: int,
    capacity: int,
    pad_multiple: int,
) -> Iterator[Microbatch]:
    """Yield microbatches in execution order (no-ops included); see the module docstring."""
    by_name = {job.name: job for job in jobs}
    cursors: list[_GroupCursor] = []
    for names in groups:
        members = [by_name[n] for n in names]
        num_batches = max(j.num_global_batches for j in members)
        estimated = [
            math.ceil(sum(j.lengths[i] for j in members for i in j.batch_indices(g)) / capacity)
            for g in range(num_batches)
        ]
        # estimated_bins[g] becomes the estimate for batches g, g + 1, ... so that chain() is O(1).
        for g in range(num_batches - 2, -1, -1):
            estimated[g] += estimated[g + 1]
        cursors.append(_GroupCursor(jobs=members, num_batches=num_batches, estimated_bins=estimated))

    last_position: dict[str, int] = {}

    def load_next_unit(k: int) -> None:
        cursor = cursors[k]
        if cursor.next_batch >= cursor.num_batches:
            cursor.unit = None
            return
        g = cursor.next_batch
        cursor.next_batch += 1
        unit_jobs = tuple(j.name for j in cursor.jobs if j.num_global_batches > g)
        cursor.unit = _Unit(group=k, global_batch=g, jobs=unit_jobs, bins=unit_source(k, g))

    def ready(unit: _Unit, position: int) -> bool:
        return unit.started or all(
            job not in last_position or position >= earliest_next_batch_position(last_position[job], stages)
            for job in unit.jobs
        )

    def chain(k: int) -> int:
        cursor = cursors[k]
        future_batches = cursor.num_batches - cursor.next_batch
        future_bins = cursor.estimated_bins[cursor.next_batch] if future_batches else 0
        return len(cursor.unit.bins) + future_bins + (stages - 1) * future_batches

    def priority(k: int) -> tuple[bool, int, int]:
        return (cursors[k].unit.started, chain(k), -k)

    def complete_if_done(k: int, position: int) -> bool:
        unit = cursors[k].unit
        if unit.bins:
            return False
        for job in unit.jobs:
            last_position[job] = position
        load_next_unit(k)
        return True

    for k in range(len(cursors)):
        load_next_unit(k)

    position = 0
    active: int | None = None
    while any(c.unit is not None for c in cursors):
        if active is None:
            candidates = [k for k, c in enumerate(cursors) if c.unit is not None and ready(c.unit, position)]
            if not candidates:
                yield NOOP
                position += 1
                continue
            active = max(candidates, key=priority)
        unit = cursors[active].unit
        unit.started = True
        samples = unit.bins.pop(0)
        load = padded_tokens(samples, pad_multiple)
        per_job: dict[str, int] = {}
        for sample in samples:
            per_job[sample.job] = per_job.get(sample.job, 0) + sample.tokens

        donors = [
            k
            for k, c in enumerate(cursors)
            if k != active and c.unit is not None and c.unit.bins and ready(c.unit, position)
        ]
        for k in sorted(donors, key=priority, reverse=True):
            donor_unit = cursors[k].unit
            donor_bin = donor_unit.bins[-1]
            for sample in sorted(donor_bin, key=lambda s: (-s.tokens, s.job, s.index)):
                old = per_job.get(sample.job, 0)
                grown = load - round_up(old, pad_multiple) + round_up(old + sample.tokens, pad_multiple)
                if grown <= capacity:
                    samples.append(sample)
                    per_job[sample.job] = old + sample.tokens
                    donor_bin.remove(sample)
                    load = grown
                    donor_unit.started = True
            if not donor_bin:
                donor_unit.bins.pop()
                complete_if_done(k, position)

        yield Microbatch(samples=tuple(samples), tokens=load)
        if complete_if_done(active, position):
            active = None
        position += 1
