"""Size-aware admission of live jobs into a planning window: select_window_jobs' contract."""

from __future__ import annotations

import pytest

from lorafusion.scheduler import CostModel, Job, plan_schedule, simulate
from lorafusion.scheduler.admission import (
    LiveJob,
    remaining_work_s,
    select_window_jobs,
    window_microbatches,
    windows_waited,
)
from lorafusion.scheduler.core import ScheduleError

COST = CostModel.preset("llama-3.1-8b")


def uniform(name: str, batches: int, microbatches_per_batch: int = 1, capacity: int = 1000, waited: int = 0) -> LiveJob:
    """A job whose every global batch fills exactly ``microbatches_per_batch`` microbatches."""
    return LiveJob(name, batches * microbatches_per_batch * capacity, batches, waited)


def test_remaining_work_is_what_one_stage_takes_to_train_the_rest_of_the_job():
    # 3 global batches of 4 samples of 500 tokens: each batch fills two 1000-token microbatches.
    job = Job("a", 4, [500] * 12)
    schedule = plan_schedule([job], 1, 1000, use_milp=False, cost=COST)
    assert schedule.num_real_microbatches == 6
    live = LiveJob("a", sum(job.lengths), job.num_global_batches)
    assert remaining_work_s(live, 1, 1000, COST) == pytest.approx(simulate(schedule.microbatches, 1, COST).makespan_s)
    assert window_microbatches(live, 2, 1000) == 4 and window_microbatches(live, 8, 1000) == 6


def test_one_stage_admits_only_the_job_with_the_least_work_left():
    live = [uniform("big", 40), uniform("small", 3), uniform("medium", 10)]
    assert select_window_jobs(live, 1, 1000, 4, COST) == ["small"]
    # The estimate counts microbatches and optimizer steps, not only tokens: 10 batches of 100
    # tokens cost more than one batch of 1100 tokens (fixed cost per microbatch and per step).
    many = LiveJob("many", 1000, 10)
    one = LiveJob("one", 1100, 1)
    assert remaining_work_s(many, 1, 1000, COST) > remaining_work_s(one, 1, 1000, COST)
    assert select_window_jobs([many, one], 1, 1000, 4, COST) == ["one"]


@pytest.mark.parametrize(
    ("per_batch", "stages", "expected"),
    [
        # Each job has 4 batches in the window, so 3 gaps of S - 1 microbatches of others' work.
        (1, 4, 4),  # 4 microbatches each, 9 needed from the others: 3 others
        (2, 4, 3),  # 8 each, 9 needed: 2 others
        (3, 4, 2),  # 12 each: 1 other
        (1, 2, 2),  # 4 each, 3 needed: 1 other
        (1, 8, 7),  # 4 each, 21 needed: 6 others
    ],
)
def test_enough_jobs_to_fill_the_stages_least_work_first(per_batch, stages, expected):
    live = [uniform(f"j{k}", 20 - k, per_batch) for k in range(10)]  # j9 has the least work
    chosen = select_window_jobs(live, stages, 1000, 4, COST)
    assert chosen == [f"j{k}" for k in range(10 - expected, 10)]  # the shortest, in the order of live


def test_a_job_in_its_last_batch_needs_no_gap_but_fills_the_others():
    # "next" (4 batches in the window, 1 microbatch each) needs 3 gaps of 3 microbatches of others'
    # work; "last" (one batch of 5 microbatches) needs none and gives 5 of them, a filler 4 more.
    last, nxt = uniform("last", 1, 5), uniform("next", 4)
    filler = [uniform(f"f{k}", 40) for k in range(4)]
    assert select_window_jobs([last, nxt, *filler], 4, 1000, 4, COST) == ["last", "next", "f0"]
    # Alone, a job in its last global batch keeps the stages busy as well as any plan of it can.
    assert select_window_jobs([last, *filler], 4, 1000, 4, COST) == ["last"]
    # A window of one global batch has no gaps at all: the job with least work alone.
    assert select_window_jobs([last, nxt, *filler], 4, 1000, 1, COST) == ["next"]


def test_the_pipeline_is_filled_only_as_far_as_the_live_jobs_allow():
    live = [uniform("a", 10), uniform("b", 12)]
    assert select_window_jobs(live, 8, 1000, 4, COST) == ["a", "b"]
    assert select_window_jobs([], 4, 1000, 4, COST) == []


def test_overdue_jobs_go_first_the_longest_waiting_first_whatever_their_size():
    live = [uniform("long", 500, waited=3), uniform("short", 1), uniform("other", 600, waited=5)]
    assert select_window_jobs(live, 1, 1000, 4, COST, max_wait_windows=6) == ["short"]
    assert select_window_jobs(live, 1, 1000, 4, COST, max_wait_windows=5) == ["other"]
    assert select_window_jobs(live, 1, 1000, 4, COST, max_wait_windows=3) == ["other"]
    # Two stages: "other" needs 3 slots of others' work, one overdue job gives 4; "short" stays out.
    assert select_window_jobs(live, 2, 1000, 4, COST, max_wait_windows=3) == ["long", "other"]
    # Ties in waiting: the order of live.
    tied = [uniform("x", 50, waited=4), uniform("y", 5, waited=4)]
    assert select_window_jobs(tied, 1, 1000, 4, COST, max_wait_windows=2) == ["x"]


@pytest.mark.parametrize("max_wait", [0, 3, 5])
def test_a_long_job_is_admitted_under_a_steady_stream_of_short_ones(max_wait):
    """One stage, a window of 2 global batches; every window a short job of 2 global batches
    arrives, so short ones alone keep the stage busy for ever. Without the guard the long job would
    never train; with it, no job waits more than max_wait windows plus one window per overdue job
    ahead of it when it became overdue, and the long job finishes."""
    window = 2
    remaining = {"long": 40}  # global batches left; each batch is one full microbatch
    waited: dict[str, int] = {}
    bound: dict[str, int] = {}  # per overdue job: the most windows in a row it may wait
    windows = 0
    while "long" in remaining:
        remaining[f"short{windows}"] = 2
        live = [uniform(name, left, waited=waited.get(name, 0)) for name, left in remaining.items()]
        overdue = sorted((j for j in live if j.windows_waited >= max_wait), key=lambda j: -j.windows_waited)
        for ahead, job in enumerate(overdue):  # sorted() is stable: ties keep the order of live
            bound.setdefault(job.name, max_wait + ahead)
        chosen = select_window_jobs(live, 1, 1000, window, COST, max_wait)
        assert len(chosen) == 1
        waited = windows_waited(waited, remaining, chosen)
        for name, count in waited.items():
            assert count <= bound.get(name, max_wait), name
        for name in chosen:
            bound.pop(name, None)
            remaining[name] -= min(window, remaining[name])
            if remaining[name] == 0:
                del remaining[name]
        windows += 1
        assert windows < 2000, "the long job starved"
    # Without the guard (in reach), the same stream keeps it out: shorts always have less work.
    assert select_window_jobs([uniform("long", 40, waited=999), uniform("s", 2)], 1, 1000, window, COST, 1000) == ["s"]


def test_windows_waited_counts_windows_left_out_in_a_row():
    counts = windows_waited({}, ["a", "b", "c"], ["a"])
    assert counts == {"a": 0, "b": 1, "c": 1}
    counts = windows_waited(counts, ["b", "c", "d"], ["c"])  # a finished, d arrived
    assert counts == {"b": 2, "c": 0, "d": 1}


ONE = [uniform("a", 1)]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: LiveJob("a", 10, 0), "live job 'a' needs remaining_batches >= 1 and remaining_tokens >= remaining_"),
        (lambda: LiveJob("a", 2, 3), "remaining_batches, got 3 and 2"),
        (lambda: LiveJob("a", 10, 1, -1), "live job 'a': windows_waited must be >= 0, got -1"),
        (lambda: select_window_jobs(ONE, 0, 1000, 4, COST), "stages, capacity and window must be >= 1"),
        (lambda: select_window_jobs(ONE, 1, 1000, 4, COST, -1), "max_wait_windows >= 0, got 1, 1000, 4 and -1"),
        (lambda: select_window_jobs(ONE + ONE, 1, 1000, 4, COST), "live job names must be unique, got \\['a', 'a'\\]"),
    ],
)
def test_bad_input_is_refused_with_the_reason(call, message):
    with pytest.raises(ScheduleError, match=message):
        call()
