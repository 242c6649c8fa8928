"""Which running jobs a planning window trains (SERVER.yaml's `admission`).

* ``all_live``: every running job, each window (the pipeline shared among them, like processor
  sharing).
* ``size_aware`` (the default): the jobs that the scheduler's
  :func:`~lorafusion.scheduler.admission.select_window_jobs` picks: the least estimated work left
  first, as many as keep the stages busy (on the service's one process that is one job per window),
  and a job left out `max_wait_windows` windows in a row goes first whatever its size. Mean job
  completion time is smallest when the job with the least work left trains first (SRPT);
  benchmarks/results/online_table.md has the simulator's figures and the end-to-end CPU ones.

A job's remaining work is estimated from its remaining samples' token counts (in its own training
order, from the window's first global batch) with the scheduler's cost model, by default
:meth:`CostModel.default` (a fit of measured Llama-3.1-8B/H100 layer times). Only the ranking of
jobs matters, and on one stage the model ranks them almost by remaining tokens (its per-microbatch
and per-step terms are small beside its per-token one), so the default serves any base model; it
predicts no time on this machine.

Admission changes when a job trains, never what: an admitted job trains its next global batches
in its own order, as it would alone. The wait counts are bookkeeping kept in the job store
(store.py), so a restart keeps each job's place in the starvation guard.
"""

from __future__ import annotations

from itertools import accumulate

from lorafusion.runtime.job_state import JobRun
from lorafusion.scheduler import CostModel
from lorafusion.scheduler.admission import LiveJob, select_window_jobs, windows_waited

from .windows import Window

ADMISSIONS = ("size_aware", "all_live")
SERVICE_STAGES = 1  # the service trains in one process


class WindowAdmission:
    """Chooses each window's jobs among the running ones and counts the windows each waited."""

    def __init__(self, mode: str, capacity: int, window_batches: int, max_wait_windows: int,
                 waited: dict[str, int] | None = None, cost: CostModel | None = None):  # fmt: skip
        if mode not in ADMISSIONS:
            raise ValueError(f"admission must be one of {', '.join(ADMISSIONS)}, got {mode!r}")
        self.mode, self.capacity, self.window_batches = mode, capacity, window_batches
        self.max_wait_windows = max_wait_windows
        self.cost = cost or CostModel.default()
        self.waited: dict[str, int] = dict(waited or {})
        self._tokens_from: dict[str, tuple[JobRun, list[int]]] = {}  # per job: tokens from each global batch on

    def choose(self, candidates: Window, jobs: dict[str, JobRun]) -> Window:
        """The window's jobs among `candidates` (every running job's next global batches; for the
        window after the current one, as they will be once it is trained and counted)."""
        if self.mode == "all_live" or len(candidates) <= 1:
            return candidates
        live = [
            LiveJob(w.name, self.tokens_from(jobs[w.name], w.first_batch), jobs[w.name].num_steps - w.first_batch,
                    self.waited.get(w.name, 0))  # fmt: skip
            for w in candidates
        ]
        names = set(select_window_jobs(live, SERVICE_STAGES, self.capacity, self.window_batches, self.cost,
                                       self.max_wait_windows))  # fmt: skip
        return tuple(w for w in candidates if w.name in names)

    def record(self, candidates: Window, chosen: Window) -> bool:
        """Count a window that trains `chosen` of `candidates` (jobs not among them are no longer
        live: their counts go); whether any count changed."""
        before = self.waited
        self.waited = windows_waited(before, [w.name for w in candidates], [w.name for w in chosen])
        return before != self.waited

    def tokens_from(self, job: JobRun, global_batch: int) -> int:
        """The tokens of the job's samples from its global batch `global_batch` on."""
        cached = self._tokens_from.get(job.name)
        if cached is None or cached[0] is not job:  # a job's order is fixed once it is prepared
            batches = [sum(len(job.samples[i].input_ids) for i in job.batch_indices(g)) for g in range(job.num_steps)]
            cached = (job, list(accumulate(reversed(batches)))[::-1])
            self._tokens_from[job.name] = cached
        return cached[1][global_batch]

    def forget(self, name: str) -> None:
        """A job that ended: its token sums go."""
        self._tokens_from.pop(name, None)
