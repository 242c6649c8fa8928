"""End-to-end planning: validate, group, pack every global batch (all its groups at once), order.

:func:`plan_schedule` does it synchronously. :class:`BackgroundPlanner` produces the same schedule
microbatch by microbatch while a worker pool packs the upcoming global batches ahead of time, so
that the training loop never waits on the solver unless it overtakes the planner.

``time_limit_s`` is the MILP budget of one global batch, all its groups together
(:mod:`lorafusion.scheduler.batch_packing`); ``workers`` MILPs run at once (default: one per
available core, at most one per group).
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass

from .batch_packing import BatchPacking, available_cores, pack_global_batch
from .core import Job, Microbatch, PackingReport, SampleRef, Schedule, ScheduleError, validate_problem
from .cost_model import CostModel
from .group_selection import choose_grouping
from .ordering import order_microbatches
from .units import UnitItems, unit_items


@dataclass(frozen=True)
class PlanOptions:
    """Knobs shared by the synchronous and background planners."""

    stages: int
    capacity: int
    pad_multiple: int = 1
    time_limit_s: float = 0.5
    use_milp: bool = True
    workers: int | None = None
    cost: CostModel | None = None  # for choosing the grouping; None: CostModel.default()


def _resolve_groups(jobs: Sequence[Job], options: PlanOptions, groups: Sequence[Sequence[str]] | None) -> list[list[str]]:
    if groups is None:
        o = options
        return choose_grouping(jobs, o.stages, o.capacity, o.pad_multiple, o.cost or CostModel.default())
    names = [n for g in groups for n in g]
    expected = {j.name for j in jobs}
    if sorted(names) != sorted(expected) or any(not g for g in groups):
        raise ScheduleError(f"groups must partition the job names {sorted(expected)} into non-empty lists, got {groups}")
    return [list(g) for g in groups]


class _Planner:
    """State shared by both planners: the problem, and the packings gathered so far.

    The ordering asks for one (group, global batch) at a time; the first request for a global batch
    packs all its groups at once (one budget, parallel MILPs) and keeps the others' bins until asked.
    """

    def __init__(self, jobs: Sequence[Job], options: PlanOptions, groups: Sequence[Sequence[str]] | None):
        validate_problem(jobs, options.stages, options.capacity, options.pad_multiple)
        if options.time_limit_s <= 0:
            raise ScheduleError(f"time_limit_s must be positive, got {options.time_limit_s!r}")
        self.jobs = list(jobs)
        self.options = options
        start = time.perf_counter()
        self.groups = _resolve_groups(self.jobs, options, groups)
        self.grouping_time_s = time.perf_counter() - start if groups is None else 0.0
        by_name = {j.name: j for j in self.jobs}
        self.group_members = [[by_name[n] for n in g] for g in self.groups]
        self.workers = options.workers or min(available_cores(), len(self.groups))
        self.reports: list[PackingReport] = []
        self.batch_times_s: list[float] = []
        self._ready: dict[tuple[int, int], list[list[SampleRef]]] = {}

    def num_batches(self, group: int) -> int:
        return max(j.num_global_batches for j in self.group_members[group])

    def batch_items(self, global_batch: int) -> list[tuple[int, UnitItems]]:
        """(group, its items) for every group that has ``global_batch``."""
        return [
            (k, unit_items(members, global_batch))
            for k, members in enumerate(self.group_members)
            if self.num_batches(k) > global_batch
        ]

    def pack_arguments(self, items: Sequence[tuple[int, UnitItems]]) -> tuple:
        o = self.options
        problems = [unit.problem(o.capacity, o.pad_multiple) for _, unit in items]
        return problems, o.time_limit_s, o.use_milp, self.workers

    def store(self, global_batch: int, items: Sequence[tuple[int, UnitItems]], result: BatchPacking) -> None:
        self.batch_times_s.append(result.time_s)
        for (group, unit), packing in zip(items, result.packings):
            self.reports.append(
                PackingReport(
                    global_batch=global_batch,
                    group=group,
                    num_items=len(unit.refs),
                    num_bins=packing.num_bins,
                    lower_bound=packing.lower_bound,
                    greedy_bins=packing.greedy_bins,
                    solver=packing.solver,
                    solve_time_s=packing.solve_time_s,
                )
            )
            self._ready[(group, global_batch)] = unit.bins(packing)

    def take(self, group: int, global_batch: int) -> list[list[SampleRef]] | None:
        return self._ready.pop((group, global_batch), None)

    def schedule(self, microbatches: list[Microbatch]) -> Schedule:
        o = self.options
        return Schedule(
            stages=o.stages,
            capacity=o.capacity,
            pad_multiple=o.pad_multiple,
            microbatches=microbatches,
            groups=self.groups,
            packings=list(self.reports),
            batch_times_s=list(self.batch_times_s),
            grouping_time_s=self.grouping_time_s,
        )


def plan_schedule(
    jobs: Sequence[Job],
    stages: int,
    capacity: int,
    pad_multiple: int = 1,
    time_limit_s: float = 0.5,
    use_milp: bool = True,
    groups: Sequence[Sequence[str]] | None = None,
    workers: int | None = None,
    cost: CostModel | None = None,
) -> Schedule:
    """Plan all global batches of ``jobs`` synchronously.

    ``groups`` overrides the grouping chosen by simulation
    (:mod:`~lorafusion.scheduler.group_selection`, timed with ``cost``). Raises ScheduleError on bad
    input (the message names the job or parameter).
    """
    options = PlanOptions(stages, capacity, pad_multiple, time_limit_s, use_milp, workers, cost)
    planner = _Planner(jobs, options, groups)

    def unit_source(group: int, global_batch: int) -> list[list[SampleRef]]:
        bins = planner.take(group, global_batch)
        if bins is None:
            items = planner.batch_items(global_batch)
            planner.store(global_batch, items, pack_global_batch(*planner.pack_arguments(items)))
            bins = planner.take(group, global_batch)
        return bins

    microbatches = list(
        order_microbatches(planner.jobs, planner.groups, unit_source, stages, capacity, pad_multiple)
    )
    return planner.schedule(microbatches)


class BackgroundPlanner:
    """Yield the schedule's microbatches while a worker pool packs the next global batches.

    Global batches ``g + 1, ..., g + lookahead`` are submitted for packing as soon as the ordering
    reaches global batch ``g``, so the solver runs while the runtime trains on batch ``g``. The
    result is identical to :func:`plan_schedule` with the same arguments as long as no MILP hits its
    time budget (packing and ordering are deterministic; what a MILP has found when its time runs
    out depends on the machine's load). ``executor`` is ``"process"`` (default: a solver holding the
    GIL cannot slow the training loop's Python thread), ``"thread"``, or an existing
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
        time_limit_s: float = 0.5,
        use_milp: bool = True,
        groups: Sequence[Sequence[str]] | None = None,
        lookahead: int = 2,
        executor: str | Executor = "process",
        max_workers: int = 1,
        workers: int | None = None,
        cost: CostModel | None = None,
    ):
        if lookahead < 1:
            raise ScheduleError(f"lookahead must be >= 1, got {lookahead}")
        options = PlanOptions(stages, capacity, pad_multiple, time_limit_s, use_milp, workers, cost)
        self._planner = _Planner(jobs, options, groups)
        self._num_batches = max(self._planner.num_batches(k) for k in range(len(self._planner.groups)))
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
        self._futures: dict[int, tuple[list[tuple[int, UnitItems]], Future]] = {}
        self._submitted = 0
        self._emitted: list[Microbatch] = []
        self._stream = self._generate()
        self._submit_through(lookahead - 1)  # start packing right away

    def _submit_through(self, last_batch: int) -> None:
        while self._submitted <= min(last_batch, self._num_batches - 1):
            items = self._planner.batch_items(self._submitted)
            future = self._executor.submit(pack_global_batch, *self._planner.pack_arguments(items))
            self._futures[self._submitted] = (items, future)
            self._submitted += 1

    def _unit_source(self, group: int, global_batch: int) -> list[list[SampleRef]]:
        self._submit_through(global_batch + self._lookahead)
        if global_batch in self._futures:
            items, future = self._futures.pop(global_batch)
            self._planner.store(global_batch, items, future.result())
        return self._planner.take(group, global_batch)

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
