"""Data types shared by the scheduler: jobs, sample references, microbatches, schedules.

Also holds the two rules every other module must agree on, each defined exactly once:

* :func:`padded_tokens` - how many tokens a microbatch occupies once each job's segment is padded
  up to a multiple of ``pad_multiple`` (the fused multi-LoRA kernels tile each adapter's rows in
  blocks, so a segment is padded to the block size);
* :func:`earliest_next_batch_position` - the dependency rule between two consecutive global batches
  of the same job in a 1F1B pipeline (see its docstring for the derivation).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

SCHEDULE_FORMAT_VERSION = 1


class ScheduleError(ValueError):
    """Bad scheduler input, or a schedule that breaks one of the rules checked by verify_schedule."""


@dataclass(frozen=True)
class Job:
    """One LoRA fine-tuning job.

    ``lengths[i]`` is the token count of sample ``i`` in the job's dataset order. Global batch ``g``
    holds samples ``g * global_batch_size`` up to (excluding) ``(g + 1) * global_batch_size``; a
    final partial batch keeps the samples that remain, so that every sample is trained exactly once.
    """

    name: str
    global_batch_size: int
    lengths: tuple[int, ...]

    def __init__(self, name: str, global_batch_size: int, lengths: Iterable[int]):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "global_batch_size", global_batch_size)
        object.__setattr__(self, "lengths", tuple(int(n) for n in lengths))

    @property
    def num_global_batches(self) -> int:
        return math.ceil(len(self.lengths) / self.global_batch_size)

    def batch_indices(self, global_batch: int) -> range:
        """Dataset indices of the samples in ``global_batch``."""
        start = global_batch * self.global_batch_size
        return range(start, min(start + self.global_batch_size, len(self.lengths)))

    def global_batch_of(self, index: int) -> int:
        return index // self.global_batch_size


@dataclass(frozen=True)
class SampleRef:
    """A sample placed in a microbatch: ``index`` is its position in the job's dataset order."""

    job: str
    global_batch: int
    index: int
    tokens: int


@dataclass(frozen=True)
class Microbatch:
    """One pipeline microbatch. ``tokens`` is the padded total; a no-op has no samples."""

    samples: tuple[SampleRef, ...]
    tokens: int
    noop: bool = False

    @property
    def real_tokens(self) -> int:
        return sum(s.tokens for s in self.samples)

    @property
    def jobs(self) -> set[str]:
        return {s.job for s in self.samples}


NOOP = Microbatch(samples=(), tokens=0, noop=True)


@dataclass(frozen=True)
class PackingReport:
    """How one (global batch, group) was packed: which path produced it and how long it took."""

    global_batch: int
    group: int
    num_items: int
    num_bins: int
    lower_bound: int
    greedy_bins: int
    solver: str
    solve_time_s: float


@dataclass
class Schedule:
    """The microbatches the runtime executes, in execution order, plus how they were obtained."""

    stages: int
    capacity: int
    pad_multiple: int
    microbatches: list[Microbatch]
    groups: list[list[str]] = field(default_factory=list)
    packings: list[PackingReport] = field(default_factory=list)
    # Wall time spent packing each global batch (all its groups), and choosing the grouping (once).
    batch_times_s: list[float] = field(default_factory=list)
    grouping_time_s: float = 0.0

    @property
    def num_noops(self) -> int:
        return sum(mb.noop for mb in self.microbatches)

    @property
    def num_real_microbatches(self) -> int:
        return len(self.microbatches) - self.num_noops

    @property
    def fill_ratio(self) -> float:
        """Sample tokens over the capacity of the non-no-op microbatches (padding counts as waste)."""
        slots = self.num_real_microbatches * self.capacity
        return sum(mb.real_tokens for mb in self.microbatches) / slots if slots else 0.0

    def to_json_dict(self) -> dict[str, Any]:
        """The documented JSON contract (see README, "Planning multi-job schedules").

        ``{"stages", "capacity", "microbatches": [{"tokens", "noop", "samples": [{"job",
        "global_batch", "index", "tokens"}]}]}`` in execution order; ``version`` and
        ``pad_multiple`` are additional keys.
        """
        return {
            "version": SCHEDULE_FORMAT_VERSION,
            "stages": self.stages,
            "capacity": self.capacity,
            "pad_multiple": self.pad_multiple,
            "microbatches": [
                {
                    "tokens": mb.tokens,
                    "noop": mb.noop,
                    "samples": [
                        {"job": s.job, "global_batch": s.global_batch, "index": s.index, "tokens": s.tokens}
                        for s in mb.samples
                    ],
                }
                for mb in self.microbatches
            ],
        }

    def to_json(self, **dump_kwargs: Any) -> str:
        return json.dumps(self.to_json_dict(), **dump_kwargs)

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> Schedule:
        microbatches = [
            Microbatch(
                samples=tuple(
                    SampleRef(s["job"], int(s["global_batch"]), int(s["index"]), int(s["tokens"]))
                    for s in mb["samples"]
                ),
                tokens=int(mb["tokens"]),
                noop=bool(mb["noop"]),
            )
            for mb in data["microbatches"]
        ]
        return cls(
            stages=int(data["stages"]),
            capacity=int(data["capacity"]),
            pad_multiple=int(data.get("pad_multiple", 1)),
            microbatches=microbatches,
        )


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def padded_tokens(samples: Iterable[SampleRef], pad_multiple: int) -> int:
    """Tokens a microbatch occupies: each job's segment padded up to a multiple of ``pad_multiple``."""
    per_job: dict[str, int] = {}
    for s in samples:
        per_job[s.job] = per_job.get(s.job, 0) + s.tokens
    return sum(round_up(total, pad_multiple) for total in per_job.values())


def earliest_next_batch_position(last_position_of_batch: int, stages: int) -> int:
    """First microbatch position at which a job's global batch ``g + 1`` may be issued.

    The rule: ``first(g + 1) >= last(g) + stages``, positions counted in the schedule's execution
    order (no-ops included). Derivation for 1F1B over ``S`` stages: stage ``s`` runs ``S - s - 1``
    warm-up forwards, then alternates one forward and one backward, so the forward of microbatch
    ``k`` on stage ``s`` runs right after the backward of microbatch ``k - S + s``. The job's LoRA
    weights on stage ``s`` are updated (its optimizer step) after the backward of the batch's last
    microbatch ``last`` on that stage, and the next batch's first forward ``k`` on that stage must
    see the updated weights: ``k - S + s >= last`` for every stage, the tightest being stage 0,
    hence ``k >= last + S``. With S = 1 this only says batches run in order.
    """
    return last_position_of_batch + stages


def validate_problem(jobs: Sequence[Job], stages: int, capacity: int, pad_multiple: int) -> None:
    """Raise ScheduleError naming the job/parameter for any input the scheduler cannot serve."""
    if not isinstance(stages, int) or stages < 1:
        raise ScheduleError(f"stages must be an integer >= 1, got {stages!r}")
    if not isinstance(capacity, int) or capacity < 1:
        raise ScheduleError(f"capacity must be a positive integer (tokens per microbatch), got {capacity!r}")
    if not isinstance(pad_multiple, int) or pad_multiple < 1:
        raise ScheduleError(f"pad_multiple must be an integer >= 1, got {pad_multiple!r}")
    if not jobs:
        raise ScheduleError("no jobs given: need at least one job")
    seen: set[str] = set()
    for job in jobs:
        if not job.name:
            raise ScheduleError("every job needs a non-empty name")
        if job.name in seen:
            raise ScheduleError(f"job name {job.name!r} appears twice; names must be unique")
        seen.add(job.name)
        if not job.lengths:
            raise ScheduleError(f"job {job.name!r} has no samples (empty dataset)")
        if not isinstance(job.global_batch_size, int) or job.global_batch_size < 1:
            raise ScheduleError(
                f"job {job.name!r}: global_batch_size must be an integer >= 1, got {job.global_batch_size!r}"
            )
        if job.global_batch_size > len(job.lengths):
            raise ScheduleError(
                f"job {job.name!r}: global_batch_size={job.global_batch_size} is larger than its dataset "
                f"({len(job.lengths)} samples)"
            )
        for index, n in enumerate(job.lengths):
            if n < 1:
                raise ScheduleError(f"job {job.name!r} sample {index} has {n} tokens; every sample needs >= 1")
            if round_up(n, pad_multiple) > capacity:
                padded = "" if pad_multiple == 1 else f" (padded to {round_up(n, pad_multiple)})"
                raise ScheduleError(
                    f"job {job.name!r} sample {index} has {n} tokens{padded}, more than capacity={capacity}"
                )
