"""Checking a schedule against the jobs it claims to train."""

from __future__ import annotations

from collections.abc import Sequence

from .core import Job, Schedule, ScheduleError, earliest_next_batch_position, padded_tokens


def verify_schedule(schedule: Schedule, jobs: Sequence[Job]) -> None:
    """Raise ScheduleError describing the first violated rule; return None when all hold.

    Rules:

    1. every sample of every job appears exactly once, with the job's token count and global batch
       (``index // global_batch_size``), and no unknown job or index appears;
    2. a microbatch's ``tokens`` equals its padded total (each job's segment rounded up to a multiple
       of ``schedule.pad_multiple``) and is at most ``schedule.capacity``; a no-op has no samples and
       0 tokens, and a microbatch with no samples must be marked as a no-op;
    3. dependencies, with positions counted in execution order including no-ops: for every job and
       global batch ``g``, the first microbatch holding a sample of batch ``g + 1`` sits at position
       ``>= last(g) + S``, where ``last(g)`` is the position of the last microbatch holding a sample
       of batch ``g`` and ``S = schedule.stages``
       (:func:`~lorafusion.scheduler.core.earliest_next_batch_position`, which derives the rule from
       1F1B). In particular a job's batches are trained in order and never share a microbatch.
    """
    by_name = {job.name: job for job in jobs}
    if schedule.stages < 1:
        raise ScheduleError(f"schedule.stages must be >= 1, got {schedule.stages}")
    seen: dict[tuple[str, int], int] = {}
    first: dict[tuple[str, int], int] = {}
    last: dict[tuple[str, int], int] = {}
    for position, mb in enumerate(schedule.microbatches):
        if mb.noop:
            if mb.samples or mb.tokens != 0:
                raise ScheduleError(f"microbatch {position} is a no-op but holds samples or tokens")
            continue
        if not mb.samples:
            raise ScheduleError(f"microbatch {position} has no samples but is not marked as a no-op")
        for s in mb.samples:
            job = by_name.get(s.job)
            if job is None:
                raise ScheduleError(f"microbatch {position} holds a sample of unknown job {s.job!r}")
            if not 0 <= s.index < len(job.lengths):
                raise ScheduleError(
                    f"microbatch {position}: job {s.job!r} has no sample {s.index} (it has {len(job.lengths)})"
                )
            if s.tokens != job.lengths[s.index]:
                raise ScheduleError(
                    f"microbatch {position}: job {s.job!r} sample {s.index} has {job.lengths[s.index]} tokens, "
                    f"the schedule says {s.tokens}"
                )
            if s.global_batch != job.global_batch_of(s.index):
                raise ScheduleError(
                    f"microbatch {position}: job {s.job!r} sample {s.index} belongs to global batch "
                    f"{job.global_batch_of(s.index)}, the schedule says {s.global_batch}"
                )
            key = (s.job, s.index)
            if key in seen:
                raise ScheduleError(
                    f"job {s.job!r} sample {s.index} appears twice (microbatches {seen[key]} and {position})"
                )
            seen[key] = position
            batch = (s.job, s.global_batch)
            first.setdefault(batch, position)
            last[batch] = position
        expected = padded_tokens(mb.samples, schedule.pad_multiple)
        if mb.tokens != expected:
            raise ScheduleError(
                f"microbatch {position} says {mb.tokens} tokens; its padded total "
                f"(pad_multiple={schedule.pad_multiple}) is {expected}"
            )
        if mb.tokens > schedule.capacity:
            raise ScheduleError(f"microbatch {position} has {mb.tokens} tokens, more than capacity={schedule.capacity}")

    for job in jobs:
        missing = [i for i in range(len(job.lengths)) if (job.name, i) not in seen]
        if missing:
            raise ScheduleError(f"job {job.name!r}: {len(missing)} samples never scheduled, first is sample {missing[0]}")
        for g in range(job.num_global_batches - 1):
            earliest = earliest_next_batch_position(last[(job.name, g)], schedule.stages)
            if first[(job.name, g + 1)] < earliest:
                raise ScheduleError(
                    f"job {job.name!r}: global batch {g + 1} starts at microbatch {first[(job.name, g + 1)]}, "
                    f"but batch {g} ends at {last[(job.name, g)]}; with stages={schedule.stages} it may start "
                    f"at {earliest} at the earliest"
                )
