"""The packing problem of one (group, global batch) - a *unit* - built from the jobs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .core import Job, SampleRef
from .packing import Packing, PackingProblem


@dataclass(frozen=True)
class UnitItems:
    """The samples of one unit; ``refs[i]`` is item ``i`` of its packing problem."""

    refs: tuple[SampleRef, ...]
    segments: tuple[int, ...]

    def problem(self, capacity: int, pad_multiple: int, optimise_leftover: bool = False) -> PackingProblem:
        tokens = tuple(r.tokens for r in self.refs)
        return PackingProblem(self.segments, tokens, capacity, pad_multiple, optimise_leftover=optimise_leftover)

    def bins(self, packing: Packing) -> list[list[SampleRef]]:
        return [[self.refs[i] for i in b] for b in packing.bins]


def unit_items(members: Sequence[Job], global_batch: int) -> UnitItems:
    """Samples of ``global_batch`` of every job in ``members`` that has that batch."""
    refs: list[SampleRef] = []
    segments: list[int] = []
    for segment, job in enumerate(members):
        if job.num_global_batches <= global_batch:
            continue
        for index in job.batch_indices(global_batch):
            refs.append(SampleRef(job.name, global_batch, index, job.lengths[index]))
            segments.append(segment)
    return UnitItems(tuple(refs), tuple(segments))
