"""Planning windows: each running job's next global batches, planned together and mapped back to
the job's own global batches and positions in its training order."""

from __future__ import annotations

from lorafusion.runtime.config import SchedulerSpec
from lorafusion.service.windows import following_window, plan_window, window_of
from service_fixtures import window_jobs


def test_a_window_covers_each_running_jobs_next_batches_and_maps_back_to_them(tmp_path):
    runs = window_jobs(tmp_path)  # add: 30 samples in batches of 8 (4 steps); rev: 17 in batches of 6 (3 steps)
    runs["add"].step = 1
    window = window_of(runs, 2)
    assert [(w.name, w.first_batch, w.end_batch) for w in window] == [("add", 1, 3), ("rev", 0, 2)]
    schedule = plan_window(window, SchedulerSpec(capacity=40, solver="greedy"))
    refs = [ref for microbatch in schedule.microbatches for ref in microbatch.samples]
    for name, first, end in (("add", 1, 3), ("rev", 0, 2)):
        run = runs[name]
        mine = [ref for ref in refs if ref.job == name]
        size = run.spec.global_batch_size
        assert sorted(ref.index for ref in mine) == list(range(first * size, end * size))
        assert all(ref.global_batch == ref.index // size for ref in mine)
        assert all(ref.tokens == len(run.sample_at(ref.index).input_ids) for ref in mine)
        # Global batches in order: a job's batch g + 1 starts after its batch g ends.
        positions = {g: [i for i, mb in enumerate(schedule.microbatches) for r in mb.samples if r.job == name and r.global_batch == g] for g in range(first, end)}
        assert max(positions[first]) <= min(positions[first + 1])
    after = following_window(runs, 2, window)
    assert [(w.name, w.first_batch, w.end_batch) for w in after] == [("add", 3, 4), ("rev", 2, 3)]
    runs["rev"].status = "cancelled"
    assert [w.name for w in following_window(runs, 2, window)] == ["add"]


def test_a_planner_worker_that_dies_is_replaced(tmp_path):
    """The worker killed (out of memory, by hand): the next plans are made by a new one, not the
    service's end (a BrokenProcessPool from plan() stopped its training thread)."""
    import os
    import signal

    from lorafusion.service.windows import WindowPlanner

    spec = SchedulerSpec(capacity=40, solver="greedy")
    window, planner = window_of(window_jobs(tmp_path), 2), WindowPlanner(spec)
    try:
        assert planner.plan(window) == plan_window(window, spec)
        for pid in list(planner._executor._processes):
            os.kill(pid, signal.SIGKILL)
        assert planner.plan(window) == plan_window(window, spec)  # planned while the worker was gone
        for pid in list(planner._executor._processes):
            os.kill(pid, signal.SIGKILL)
        planner.plan_ahead(window)  # submitted to the dead worker: planned again when asked for
        assert planner.plan(window) == plan_window(window, spec)
    finally:
        planner.close()
