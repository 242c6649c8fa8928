"""Planning windows: the scheduler plans, for the jobs live at a window's start, their next
`window_batches` global batches each; the next window is planned in a worker process while the
current one trains, and planned again if the jobs changed meanwhile (one arrived, was cancelled,
failed).

A window's plan is made on window-local jobs (global batches and sample indices from 0) and
mapped back to each job's own global batch and position in its training order, so the training
loop sees the same SampleRefs as in an offline run."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from lorafusion.runtime.config import SchedulerSpec
from lorafusion.runtime.job_state import JobRun
from lorafusion.runtime.planning import plan_microbatches
from lorafusion.scheduler import Job, Microbatch, SampleRef, Schedule


@dataclass(frozen=True)
class WindowJob:
    """Global batches first_batch..end_batch-1 of one job, with its samples' token counts."""

    name: str
    first_batch: int
    end_batch: int
    global_batch_size: int
    lengths: tuple[int, ...]


Window = tuple[WindowJob, ...]


def window_of(jobs: dict[str, JobRun], window_batches: int, starts: dict[str, int] | None = None) -> Window:
    """The window of every running job from its step (or from `starts[name]`, a predicted step)."""
    window = []
    for name, job in jobs.items():
        start = (starts or {}).get(name, job.step)
        if job.status != "running" or start >= job.num_steps:
            continue
        end = min(start + window_batches, job.num_steps)
        size = job.spec.global_batch_size
        indices = range(start * size, min(end * size, len(job.order)))
        window.append(WindowJob(name, start, end, size, tuple(len(job.sample_at(i).input_ids) for i in indices)))
    return tuple(window)


def following_window(jobs: dict[str, JobRun], window_batches: int, current: Window) -> Window:
    """The window after `current` if every job in it trains it through: each starts where its
    current window ends; jobs not in it start at their step."""
    return window_of(jobs, window_batches, {w.name: w.end_batch for w in current})


def plan_window(window: Window, spec: SchedulerSpec) -> Schedule:
    """The window's microbatches (one pipeline stage), with each SampleRef in job coordinates."""
    local = plan_microbatches([Job(w.name, w.global_batch_size, w.lengths) for w in window], spec, stages=1)
    offset = {w.name: w for w in window}
    microbatches = [
        Microbatch(
            tuple(
                SampleRef(
                    ref.job,
                    ref.global_batch + offset[ref.job].first_batch,
                    ref.index + offset[ref.job].first_batch * offset[ref.job].global_batch_size,
                    ref.tokens,
                )
                for ref in microbatch.samples
            ),
            microbatch.tokens,
            microbatch.noop,
        )
        for microbatch in local.microbatches
    ]
    return Schedule(stages=1, capacity=local.capacity, pad_multiple=local.pad_multiple, microbatches=microbatches)


def _exit_with_parent(parent_pid: int) -> None:
    """In the worker: end when the service does, however it ends (a kill -9 would otherwise leave
    the worker waiting on its queue for ever)."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="lorafusion-plan-watch", daemon=True).start()


def _ready() -> None:
    """Nothing: submitted first, so that the worker is up before the first window."""


class WindowPlanner:
    """Plans windows in one worker process (a solver holding the GIL would slow training), keeping
    the plan of the window expected next. A worker that dies (killed, out of memory) is replaced."""

    def __init__(self, spec: SchedulerSpec):
        self.spec = spec
        self._executor = self._start_worker()
        self._ahead: tuple[Window, Future] | None = None

    @staticmethod
    def _start_worker() -> ProcessPoolExecutor:
        executor = ProcessPoolExecutor(
            max_workers=1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_exit_with_parent,
            initargs=(os.getpid(),),
        )
        executor.submit(_ready)  # the worker starts (imports) now, while the base model loads
        return executor

    def _submit(self, window: Window) -> Future:
        try:
            return self._executor.submit(plan_window, window, self.spec)
        except BrokenProcessPool:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = self._start_worker()
            return self._executor.submit(plan_window, window, self.spec)

    def plan_ahead(self, window: Window) -> None:
        """Start planning `window` in the background (unless it is already being planned)."""
        if not window or (self._ahead is not None and self._ahead[0] == window):
            return
        if self._ahead is not None:
            self._ahead[1].cancel()
        self._ahead = (window, self._submit(window))

    def plan(self, window: Window) -> Schedule:
        """The plan of `window`: the one planned ahead if it was this window, else planned now."""
        self.plan_ahead(window)
        _, future = self._ahead
        self._ahead = None
        try:
            return future.result()
        except BrokenProcessPool:  # the worker died with it: a new one plans it
            return self._submit(window).result()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
