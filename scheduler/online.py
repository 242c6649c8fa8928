"""Jobs that arrive over time: the service's planning windows, and the references it is judged by.

A trace is a list of :class:`Arrival` (a job and the second it is submitted, from time 0). Each
policy trains every sample of every job once (its result lists them) and is timed by the pipeline
simulator (:mod:`~lorafusion.scheduler.simulator`) with one cost model; the bound trains nothing:

* :func:`fifo` - one job at a time in arrival order, each trained alone. How a job runs alone is
  given as its :class:`AloneRun`: :func:`megatron_alone` (as Megatron-LM trains it,
  :func:`~lorafusion.scheduler.baselines.megatron_lm_baseline`) or :func:`planned_alone` (this
  scheduler's plan of that job by itself).
* :func:`planning_windows` - the service: at a window's start the jobs that have arrived and are
  not finished are *live*; the scheduler plans their next ``window`` global batches together
  (:func:`~lorafusion.scheduler.planner.plan_schedule`, grouping choice included) and the window
  runs as one 1F1B run; a job that arrives during a window joins at the next one; with no job
  live the pipeline idles until the next arrival. A job finishes when its last backward ends in
  its last window. Two simplifications, both stated wherever results are shown: the pipeline
  drains at every window boundary (no overlap of a window's tail with the next one's head is
  credited, so S > 1 pays S - 1 microbatch slots per window), and planning costs no training time
  (the service plans the next window in the background while the current one trains).
* :func:`planning_windows` with ``admission=SizeAware(...)`` - the same service, but each window
  plans only the live jobs that :func:`~lorafusion.scheduler.admission.select_window_jobs` picks:
  least remaining work first, as many as keep the pipeline's stages busy, and none left out for
  more than ``max_wait_windows`` windows in a row. Planning every live job shares the pipeline
  like processor sharing, which loses to FIFO on mean completion time when job sizes vary little;
  the size-aware admission is SRPT-like instead.
* :func:`offline_bound` - a lower bound that no policy beats, even one that knows every arrival
  in advance: per job, its global batches one after another, each at least its stage-0 work and
  its longest sample's round trip through the pipeline; for the makespan, the work still to come
  at every arrival. The bound is provable under the cost model and the dependency rule; a plan of
  all jobs together from time 0 is not one (the heuristic planner can do worse on it than on the
  service's windows).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .admission import DEFAULT_MAX_WAIT_WINDOWS, LiveJob, select_window_jobs, windows_waited
from .baselines import MEGATRON_MICRO_BATCH_SIZE, packed_microbatches
from .core import Job, Microbatch, Schedule, ScheduleError
from .cost_model import CostModel, stage_work_s
from .planner import PlanOptions, plan_schedule
from .simulator import job_finish_times, simulate
from .verify import verify_schedule

TrainedSample = tuple[str, int]  # (job name, sample index in the job's dataset order)


@dataclass(frozen=True)
class Arrival:
    job: Job
    at_s: float


@dataclass(frozen=True)
class SizeAware:
    """The service's size-aware admission: each window plans only the live jobs that
    :func:`~lorafusion.scheduler.admission.select_window_jobs` picks (least remaining work first,
    as many as keep the pipeline full, none left out more than ``max_wait_windows`` in a row)."""

    max_wait_windows: int = DEFAULT_MAX_WAIT_WINDOWS

    @property
    def label(self) -> str:
        return f"service, least work first, wait <= {self.max_wait_windows}"


@dataclass(frozen=True)
class AloneRun:
    """A job trained with the whole pipeline to itself: how long it takes and what it trains."""

    duration_s: float
    trained: tuple[TrainedSample, ...]


@dataclass(frozen=True)
class OnlineResult:
    """Per job: arrival and finish (seconds from time 0); the run's makespan (when the last job
    ends), the sample tokens trained, every (job, sample) trained in training order, and the
    number of planning windows (0 where the policy has none)."""

    policy: str
    arrival_s: Mapping[str, float]
    finish_s: Mapping[str, float]
    makespan_s: float
    tokens: int
    trained: tuple[TrainedSample, ...]
    windows: int = 0

    def completion_times_s(self) -> np.ndarray:
        """Job completion time (finish - arrival) of every job, in arrival order."""
        return np.array([self.finish_s[name] - at for name, at in self.arrival_s.items()])

    @property
    def mean_jct_s(self) -> float:
        return float(self.completion_times_s().mean())

    @property
    def p95_jct_s(self) -> float:
        return float(np.percentile(self.completion_times_s(), 95))

    @property
    def span_s(self) -> float:
        """From the first arrival to the end of the last job."""
        return self.makespan_s - min(self.arrival_s.values())

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.span_s

    @property
    def jobs_per_hour(self) -> float:
        return 3600.0 * len(self.arrival_s) / self.span_s


def _trained(microbatches: Sequence[Microbatch], offsets: Mapping[str, int] | None = None) -> list[TrainedSample]:
    offsets = offsets or {}
    return [(s.job, offsets.get(s.job, 0) + s.index) for mb in microbatches for s in mb.samples]


def _in_arrival_order(arrivals: Sequence[Arrival]) -> list[Arrival]:
    ordered = sorted(arrivals, key=lambda a: a.at_s)  # stable: ties keep the trace's order
    if not ordered:
        raise ScheduleError("a trace needs at least one job")
    names = [a.job.name for a in ordered]
    if len(set(names)) != len(names):
        raise ScheduleError("job names in a trace must be unique")
    if any(a.at_s < 0 for a in ordered):
        raise ScheduleError("arrival times must be >= 0 (seconds from the trace's start)")
    return ordered


def _result(
    policy: str,
    ordered: Sequence[Arrival],
    finish: Mapping[str, float],
    makespan_s: float,
    trained: Sequence[TrainedSample],
    windows: int = 0,
) -> OnlineResult:
    arrival_s = {a.job.name: a.at_s for a in ordered}
    tokens = sum(sum(a.job.lengths) for a in ordered)
    return OnlineResult(policy, arrival_s, dict(finish), makespan_s, tokens, tuple(trained), windows)


def _cost(options: PlanOptions) -> CostModel:
    return options.cost or CostModel.default()


def _plan(jobs: Sequence[Job], options: PlanOptions) -> Schedule:
    o = options
    schedule = plan_schedule(
        jobs, o.stages, o.capacity, o.pad_multiple, o.time_limit_s, o.use_milp, workers=o.workers, cost=o.cost
    )
    verify_schedule(schedule, jobs)
    return schedule


def megatron_alone(
    job: Job, stages: int, cost: CostModel, micro_batch_size: int = MEGATRON_MICRO_BATCH_SIZE
) -> AloneRun:
    """The job as Megatron-LM trains it: each global batch its own flushed 1F1B run."""
    duration, trained = 0.0, []
    for g in range(job.num_global_batches):
        microbatches = packed_microbatches(job, g, micro_batch_size)
        duration += simulate(microbatches, stages, cost).makespan_s
        trained += _trained(microbatches)
    return AloneRun(duration, tuple(trained))


def planned_alone(job: Job, options: PlanOptions) -> AloneRun:
    """The job planned by this scheduler with nothing beside it, as one 1F1B run."""
    schedule = _plan([job], options)
    duration = simulate(schedule.microbatches, options.stages, _cost(options)).makespan_s
    return AloneRun(duration, tuple(_trained(schedule.microbatches)))


def fifo(arrivals: Sequence[Arrival], alone: Mapping[str, AloneRun], policy: str = "fifo") -> OnlineResult:
    """One job at a time in arrival order; a job starts when it has arrived and the one before has ended."""
    ordered = _in_arrival_order(arrivals)
    clock, finish, trained = 0.0, {}, []
    for arrival in ordered:
        run = alone[arrival.job.name]
        clock = max(clock, arrival.at_s) + run.duration_s
        finish[arrival.job.name] = clock
        trained += run.trained
    return _result(policy, ordered, finish, clock, trained)


def window_slice(job: Job, first_batch: int, num_batches: int) -> Job:
    """Global batches ``first_batch`` .. ``first_batch + num_batches - 1`` of ``job`` as a job of
    its own, same name: its sample ``i`` is the job's sample ``first_batch * global_batch_size + i``.
    A final partial batch stays one global batch (its size is then the samples it has)."""
    if not 0 <= first_batch < job.num_global_batches or num_batches < 1:
        raise ScheduleError(
            f"job {job.name!r} has global batches 0..{job.num_global_batches - 1}; "
            f"cannot slice {num_batches} from {first_batch}"
        )
    start = first_batch * job.global_batch_size
    lengths = job.lengths[start : start + num_batches * job.global_batch_size]
    return Job(job.name, min(job.global_batch_size, len(lengths)), lengths)


def planning_windows(
    arrivals: Sequence[Arrival], window: int, options: PlanOptions, admission: SizeAware | None = None
) -> OnlineResult:
    """The service: windows of ``window`` global batches over the live jobs (see module docstring);
    with ``admission``, over those :func:`~lorafusion.scheduler.admission.select_window_jobs` picks."""
    if window < 1:
        raise ScheduleError(f"window must be >= 1 global batch, got {window}")
    o = options
    cost = _cost(o)
    pending = _in_arrival_order(arrivals)
    next_batch: dict[str, int] = {}
    waited: dict[str, int] = {}
    live: list[Job] = []
    clock, finish, trained, windows = 0.0, {}, [], 0
    while pending or live:
        if not live:
            clock = max(clock, pending[0].at_s)
        while pending and pending[0].at_s <= clock:
            job = pending.pop(0).job
            live.append(job)
            next_batch[job.name] = 0
        chosen = list(live)
        if admission is not None:
            names = select_window_jobs(
                [_live_job(j, next_batch[j.name], waited.get(j.name, 0)) for j in live],
                o.stages, o.capacity, window, cost, admission.max_wait_windows,
            )  # fmt: skip
            waited = windows_waited(waited, [j.name for j in live], names)
            chosen = [j for j in live if j.name in names]
        slices = [window_slice(job, next_batch[job.name], window) for job in chosen]
        schedule = _plan(slices, o)
        ends = job_finish_times(schedule.microbatches, o.stages, cost)
        trained += _trained(schedule.microbatches, {j.name: next_batch[j.name] * j.global_batch_size for j in chosen})
        for job, part in zip(chosen, slices):
            next_batch[job.name] += part.num_global_batches
            if next_batch[job.name] == job.num_global_batches:
                finish[job.name] = clock + ends[job.name]
                live.remove(job)
        clock += max(ends.values())
        windows += 1
    policy = f"service (window {window})" if admission is None else f"{admission.label} (window {window})"
    return _result(policy, _in_arrival_order(arrivals), finish, clock, trained, windows)


def _live_job(job: Job, next_batch: int, windows_waited: int) -> LiveJob:
    remaining = job.lengths[next_batch * job.global_batch_size :]
    return LiveJob(job.name, sum(remaining), job.num_global_batches - next_batch, windows_waited)


def global_batch_lower_bound_s(job: Job, global_batch: int, stages: int, cost: CostModel) -> float:
    """No schedule trains this global batch faster, from its first forward to its last backward on
    stage 0: stage 0 runs all of its tokens (in one microbatch at the very least: the bound holds
    for any microbatch sizes, capacity or not, as Megatron-LM's are sample counts; padding only
    adds cost) and its optimizer step; and its longest sample's microbatch goes through every
    stage's forward and back through every backward, one after the other."""
    lengths = [job.lengths[i] for i in job.batch_indices(global_batch)]
    work = stage_work_s(cost, stages, sum(lengths), 1, 1)
    longest = max(lengths)
    return max(work, stages * (cost.stage_forward_s(longest, stages) + cost.stage_backward_s(longest, stages)))


def offline_bound(arrivals: Sequence[Arrival], stages: int, cost: CostModel) -> OnlineResult:
    """A lower bound for any policy, even one that knows every arrival in advance, under this cost
    model and the scheduler's dependency rule (a job's global batch starts on stage 0 only after
    its previous one's last backward there; :func:`~lorafusion.scheduler.core.earliest_next_batch_position`):

    * a job completes no sooner than its arrival plus the sum of its global batches'
      :func:`global_batch_lower_bound_s`;
    * the last job ends no sooner than, for every arrival time ``r``, ``r`` plus stage 0's work on
      every job that arrives at ``r`` or later (all their tokens, at least one microbatch, one
      optimizer step per job and global batch).

    Its ``trained`` is empty: it is a bound, not a schedule. Every percentile of the per-job bounds
    bounds the same percentile of any policy's completion times."""
    ordered = _in_arrival_order(arrivals)
    finish = {
        a.job.name: a.at_s
        + sum(global_batch_lower_bound_s(a.job, g, stages, cost) for g in range(a.job.num_global_batches))
        for a in ordered
    }
    makespan = max(finish.values())
    for k, arrival in enumerate(ordered):
        later = [a.job for a in ordered[k:]]
        tokens = sum(sum(j.lengths) for j in later)
        steps = sum(j.num_global_batches for j in later)
        work = stage_work_s(cost, stages, tokens, 1, steps)
        makespan = max(makespan, arrival.at_s + work)
    return _result("offline bound", ordered, finish, makespan, ())
