"""End-to-end planning: validate, group, pack every (global batch, group), order.

:func:`plan_schedule` does it synchronously. :class:`BackgroundPlanner` produces the same schedule
microbatch by microbatch while a worker pool packs the upcoming global batches ahead of time, so
that the training loop never waits on the solver unless it overtakes the planner.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass

from .core import Job, Microbatch, PackingReport, SampleRef, Schedule, ScheduleError, validate_problem
from .grouping import group_jobs
from .ordering import order_microbatches
from .packing import Packing, pack


@dataclass(frozen=True)
class PlanOptions:
    """Knobs shared by the synchronous and background planners."""

    stages: int
    capacity: int
    pad_multiple: int = 1
    time_limit_s: float = 1.0
    use_milp: bool = True


@dataclass(frozen=True)
class _UnitItems:
    """The bin-packing input of one (group, global batch): parallel lists, one entry per sample."""

    refs: tuple[SampleRef, ...]
    segments: tuple[int, ...]
    tokens: tuple[int, ...]


def _unit_items(group_jobs_: Sequence[Job], global_batch: int) -> _UnitItems:
    refs: list[SampleRef] = []
    segments: list[int] = []
    for segment, job in enumerate(group_jobs_):
        if job.num_global_batches <= global_batch:
            continue
        for index in job.batch_indices(global_batch):
            refs.append(SampleRef(job.name, global_batch, index, job.lengths[index]))
            segments.append(segment)
    return _UnitItems(tuple(refs), tuple(segments), tuple(r.tokens for r in refs))


def _resolve_groups(jobs: Sequence[Job], options: PlanOptions, groups: Sequence[Sequence[str]] | None) -> list[list[str]]:
    if groups is None:
        return group_jobs(jobs, options.stages, options.capacity)
    names = [n for g in groups for n in g]
    expected = {j.name for j in jobs}
    if sorted(names) != sorted(expected) or any(not g for g in groups):
        raise ScheduleError(f"groups must partition the job names {sorted(expected)} into non-empty lists, got {groups}")
    return [list(g) for g in groups]


class _Planner:
    """State shared by both planners: the problem, and the packing reports gathered so far."""

    def __init__(self, jobs: Sequence[Job], options: PlanOptions, groups: Sequence[Sequence[str]] | None):
        validate_problem(jobs, options.stages, options.capacity, options.pad_multiple)
        self.jobs = list(jobs)
        self.options = options
        self.groups = _resolve_groups(self.jobs, options, groups)
        by_name = {j.name: j for j in self.jobs}
        self.group_members = [[by_name[n] for n in g] for g in self.groups]
        self.reports: list[PackingReport] = []

    def num_batches(self, group: int) -> int:
        return max(j.num_global_batches for j in self.group_members[group])

    def items(self, group: int, global_batch: int) -> _UnitItems:
        return _unit_items(self.group_members[group], global_batch)

    def pack_arguments(self, items: _UnitItems) -> tuple:
        o = self.options
        return (items.segments, items.tokens, o.capacity, o.pad_multiple, o.time_limit_s, o.use_milp)

    def bins_from(self, group: int, global_batch: int, items: _UnitItems, packing: Packing) -> list[list[SampleRef]]:
        self.reports.append(
            PackingReport(
                global_batch=global_batch,
                group=group,
                num_items=len(items.refs),
                num_bins=packing.num_bins,
                lower_bound=packing.lower_bound,
                greedy_bins=packing.greedy_bins,
                solver=packing.solver,
                solve_time_s=packing.solve_time_s,
            )
        )
        return [[items.refs[i] for i in b] for b in packing.bins]

    def schedule(self, microbatches: list[Microbatch]) -> Schedule:
        o = self.options
        return Schedule(
            stages=o.stages,
            capacity=o.capacity,
            pad_multiple=o.pad_multiple,
            microbatches=microbatches,
            groups=self.groups,
            packings=list(self.reports),
        )


def plan_schedule(
    jobs: Sequence[Job],
    stages: int,
    capacity: int,
    pad_multiple: int = 1,
    time_limit_s: float = 1.0,
    use_milp: bool = True,
    groups: Sequence[Sequence[str]] | None = None,
) -> Schedule:
    """Plan all global batches of ``jobs`` synchronously.

    ``groups`` overrides :func:`~lorafusion.scheduler.grouping.group_jobs`. Raises ScheduleError on
    bad input (the message names the job or parameter).
    """
    planner = _Planner(jobs, PlanOptions(stages, capacity, pad_multiple, time_limit_s, use_milp), groups)

    def unit_source(group: int, global_batch: int) -> list[list[SampleRef]]:
        items = planner.items(group, global_batch)
        return planner.bins_from(group, global_batch, items, pack(*planner.pack_arguments(items)))

    microbatches = list(
        order_microbatches(planner.jobs, planner.groups, unit_source, stages, capacity, pad_multiple)
    )
    return planner.schedule(microbatches)


class BackgroundPlanner:
    """Yield the schedule's microbatches while a worker pool packs the next global batches.

    Packing of (group, global batch) ``g + 1, ..., g + lookahead`` is submitted as soon as the
    ordering reaches global batch ``g`` of that group, so the solver runs while the runtime trains
    on batch ``g``. The result is identical to :func:`plan_schedule` with the same arguments as
    long as no packing hits its time limit (packing and ordering are deterministic; what a MILP has
    found when its time runs out depends on the machine's load). ``executor`` is ``"process"`` (default: a solver
    holding the GIL cannot slow the training loop's Python thread), ``"thread"``, or an existing
    :class:`concurrent.futures.Executor` (not shut down by this object).

    Use as a context manager or call :meth:`close`::

        with BackgroundPlanner(jobs, stages=4, capacity=8192) as planner:
            for microbatch in planner:
                run(microbatch)
            schedule = planner.schedule()
    """

    def __init__(
        self,
        jobs: Sequence[Job],
        stages: int,
        capacity: int,
        pad_multiple: int = 1,
        time_limit_s: float = 1.0,
        use_milp: bool = True,
        groups: Sequence[Sequence[str]] | None = None,
        lookahead: int = 2,
        executor: str | Executor = "process",
        max_workers: int = 1,
    ):
        if lookahead < 1:
            raise ScheduleError(f"lookahead must be >= 1, got {lookahead}")
        self._planner = _Planner(jobs, PlanOptions(stages, capacity, pad_multiple, time_limit_s, use_milp), groups)
        self._lookahead = lookahead
        self._owns_executor = not isinstance(executor, Executor)
        if executor == "process":
            self._executor: Executor = ProcessPoolExecutor(
                max_workers=max_workers, mp_context=multiprocessing.get_context("spawn")
            )
        elif executor == "thread":
            self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="lorafusion-plan")
        elif isinstance(executor, Executor):
            self._executor = executor
        else:
            raise ScheduleError(f"executor must be 'process', 'thread' or an Executor, got {executor!r}")
        self._futures: dict[tuple[int, int], tuple[_UnitItems, Future]] = {}
        self._emitted: list[Microbatch] = []
        self._stream = self._generate()
        # Start packing the first batches of every group right away.
        for group in range(len(self._planner.groups)):
            self._submit_through(group, lookahead - 1)

    def _submit_through(self, group: int, last_batch: int) -> None:
        for g in range(min(last_batch, self._planner.num_batches(group) - 1) + 1):
            if (group, g) not in self._futures:
                items = self._planner.items(group, g)
                future = self._executor.submit(pack, *self._planner.pack_arguments(items))
                self._futures[(group, g)] = (items, future)

    def _unit_source(self, group: int, global_batch: int) -> list[list[SampleRef]]:
        self._submit_through(group, global_batch + self._lookahead)
        items, future = self._futures.pop((group, global_batch))
        return self._planner.bins_from(group, global_batch, items, future.result())

    def _generate(self) -> Iterator[Microbatch]:
        p = self._planner
        o = p.options
        for microbatch in order_microbatches(p.jobs, p.groups, self._unit_source, o.stages, o.capacity, o.pad_multiple):
            self._emitted.append(microbatch)
            yield microbatch

    def __iter__(self) -> Iterator[Microbatch]:
        """The one stream of microbatches: iterating again continues where the last loop stopped."""
        return self._stream

    def schedule(self) -> Schedule:
        """The full schedule; plans the microbatches not yet iterated first."""
        for _ in self._stream:
            pass
        return self._planner.schedule(self._emitted)

    def close(self) -> None:
        for _, future in self._futures.values():
            future.cancel()
        if self._owns_executor:
            self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> BackgroundPlanner:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
