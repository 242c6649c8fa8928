"""Which live jobs a planning window trains: least remaining work first, as many as keep the pipeline full.

Planning every live job into every window shares the pipeline between them, like processor
sharing; on one GPU that gives no more throughput than one job at a time, and delays every job
behind the others' work (mean completion time is smallest when the job with the least work left
goes first, SRPT). :func:`select_window_jobs` admits the live jobs with the least estimated work
left (:func:`remaining_work_s`, from the cost model), only as many as the pipeline needs:

* **Enough to stay full.** Under the dependency rule
  (:func:`~lorafusion.scheduler.core.earliest_next_batch_position`) a job's next global batch
  starts ``stages`` positions after its previous one's last microbatch, so between two of its
  batches ``stages - 1`` microbatches of *other* jobs are needed, else the planner inserts no-ops.
  A job with ``b`` global batches in the window needs ``(b - 1) * (stages - 1)`` such slots; jobs
  are admitted until, for every admitted job, the other admitted jobs' microbatches in the window
  (:func:`window_microbatches`: its batches times its mean tokens per batch over the capacity,
  rounded up) cover them. On one stage that is one job; at S stages it is enough to stagger. The
  count follows from the jobs' sizes, the capacity and the stage count, not from a constant.
* **No starvation.** A job left out for ``max_wait_windows`` windows in a row is *overdue*.
  Overdue jobs go before the ranking, whatever their size: the longest-waiting first (ties: the
  order of ``live``), as many as keep the pipeline full (at least one). A job's place among the
  overdue only improves (every job left out waits one window more, a job admitted starts again
  from 0, a new one from 0), and each window admits the first overdue job, so an overdue job
  trains within as many windows as there were overdue jobs ahead of it when it became overdue,
  plus one: no job waits more than ``max_wait_windows`` plus the number of live jobs windows in a
  row, and a long job advances however many short jobs keep arriving. When no job is overdue this
  is plain least-work-first. The caller keeps the counts (:func:`windows_waited`): bookkeeping,
  not state a job's training depends on (a service that restarts may start them from 0).

Admission only changes *when* a job trains, never *what*: an admitted job trains its next global
batches in its own order, as it would alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .core import ScheduleError
from .cost_model import CostModel, stage_work_s

# On the simulated traces of benchmarks/bench_online.py (online_table.md, window 4) 64 windows is within
# 4% of 256 on mean and p95 completion time; 8 or 16 raise both on one GPU (overdue long jobs go ahead
# of short ones more often); at 4 stages it makes no difference.
DEFAULT_MAX_WAIT_WINDOWS = 64


@dataclass(frozen=True)
class LiveJob:
    """What admission needs to know of a live job: the tokens and global batches it has not yet
    trained (its samples from its current step on), and for how many windows in a row it has been
    live and not admitted (0 for a job that just arrived or trained in the last window)."""

    name: str
    remaining_tokens: int
    remaining_batches: int
    windows_waited: int = 0

    def __post_init__(self) -> None:
        if self.remaining_batches < 1 or self.remaining_tokens < self.remaining_batches:
            raise ScheduleError(
                f"live job {self.name!r} needs remaining_batches >= 1 and remaining_tokens >= remaining_batches, "
                f"got {self.remaining_batches} and {self.remaining_tokens}"
            )
        if self.windows_waited < 0:
            raise ScheduleError(f"live job {self.name!r}: windows_waited must be >= 0, got {self.windows_waited}")


def microbatches_per_batch(job: LiveJob, capacity: int) -> int:
    """At least this many microbatches of ``capacity`` tokens hold one of its (mean) global batches."""
    return math.ceil(job.remaining_tokens / job.remaining_batches / capacity)


def window_microbatches(job: LiveJob, window: int, capacity: int) -> int:
    """Microbatches of the job's next ``window`` global batches (fewer if it has fewer left)."""
    return min(window, job.remaining_batches) * microbatches_per_batch(job, capacity)


def remaining_work_s(job: LiveJob, stages: int, capacity: int, cost: CostModel) -> float:
    """Estimated pipeline time the job still needs: one stage's work on its remaining tokens, in
    their microbatches, with one optimizer step per remaining global batch."""
    microbatches = job.remaining_batches * microbatches_per_batch(job, capacity)
    return stage_work_s(cost, stages, job.remaining_tokens, microbatches, job.remaining_batches)


def _keeps_pipeline_full(admitted: Sequence[LiveJob], window: int, stages: int, capacity: int) -> bool:
    sizes = [window_microbatches(j, window, capacity) for j in admitted]
    total = sum(sizes)
    return all(
        total - size >= (min(window, j.remaining_batches) - 1) * (stages - 1) for j, size in zip(admitted, sizes)
    )


def select_window_jobs(
    live: Sequence[LiveJob],
    stages: int,
    capacity: int,
    window: int,
    cost: CostModel,
    max_wait_windows: int = DEFAULT_MAX_WAIT_WINDOWS,
) -> list[str]:
    """Names of the live jobs the next window plans, in the order of ``live`` (see the module
    docstring): the overdue jobs (``windows_waited >= max_wait_windows``) longest-waiting first,
    then the least remaining work first (ties: the order of ``live``), until the admitted jobs keep
    ``stages`` stages busy over a window of ``window`` global batches in microbatches of
    ``capacity`` tokens (or none is left). Empty only when ``live`` is."""
    if stages < 1 or capacity < 1 or window < 1 or max_wait_windows < 0:
        raise ScheduleError(
            f"stages, capacity and window must be >= 1 and max_wait_windows >= 0, got {stages}, {capacity}, "
            f"{window} and {max_wait_windows}"
        )
    names = [j.name for j in live]
    if len(set(names)) != len(names):
        raise ScheduleError(f"live job names must be unique, got {names}")
    # sorted() is stable: ties keep the order of live.
    overdue = sorted((j for j in live if j.windows_waited >= max_wait_windows), key=lambda j: -j.windows_waited)
    ranked = sorted((j for j in live if j.windows_waited < max_wait_windows),
                    key=lambda j: remaining_work_s(j, stages, capacity, cost))  # fmt: skip
    admitted: list[LiveJob] = []
    for job in overdue + ranked:
        if admitted and _keeps_pipeline_full(admitted, window, stages, capacity):
            break
        admitted.append(job)
    chosen = {j.name for j in admitted}
    return [name for name in names if name in chosen]


def windows_waited(previous: Mapping[str, int], live: Iterable[str], admitted: Iterable[str]) -> dict[str, int]:
    """The counts after a window: 0 for the jobs it admitted, one more for the live jobs it left
    out (a job not in ``previous`` had waited 0); jobs no longer live are dropped."""
    chosen = set(admitted)
    return {name: 0 if name in chosen else previous.get(name, 0) + 1 for name in live}
