"""Jobs arriving over time: FIFO, the service's planning windows, and the lower bound, on the simulator."""

from __future__ import annotations

import numpy as np
import pytest

from lorafusion.scheduler import (
    CostModel,
    Job,
    Microbatch,
    SampleRef,
    job_finish_times,
    megatron_lm_baseline,
    plan_schedule,
    simulate,
)
from lorafusion.scheduler.core import ScheduleError
from lorafusion.scheduler.online import (
    Arrival,
    SizeAware,
    fifo,
    megatron_alone,
    offline_bound,
    planned_alone,
    planning_windows,
    stage_work_s,
    window_slice,
)
from lorafusion.scheduler.planner import PlanOptions

COST = CostModel.preset("llama-3.1-8b")
CAPACITY = 4096


def options(stages: int) -> PlanOptions:
    return PlanOptions(stages, CAPACITY, time_limit_s=0.2, use_milp=False, cost=COST)


def random_job(name: str, batches: int, rng: np.random.Generator, global_batch_size: int = 4, extra: int = 0) -> Job:
    return Job(name, global_batch_size, rng.integers(50, 2000, batches * global_batch_size + extra).tolist())


def random_trace(seed: int, num_jobs: int = 5) -> list[Arrival]:
    rng = np.random.default_rng(seed)
    arrivals, clock = [], 0.0
    for k in range(num_jobs):
        # Some jobs end in a partial global batch; sizes vary from 1 to 8 global batches.
        arrivals.append(Arrival(random_job(f"j{k}", int(rng.integers(1, 9)), rng, extra=int(rng.integers(0, 3))), clock))
        clock += float(rng.exponential(3.0))
    return arrivals


def all_policies(arrivals: list[Arrival], stages: int):
    o = options(stages)
    jobs = [a.job for a in arrivals]
    megatron = {j.name: megatron_alone(j, stages, COST) for j in jobs}
    planned = {j.name: planned_alone(j, o) for j in jobs}
    return [
        fifo(arrivals, megatron, "fifo"),
        fifo(arrivals, planned, "fifo-planned"),
        planning_windows(arrivals, 1, o),
        planning_windows(arrivals, 3, o),
        planning_windows(arrivals, 2, o, SizeAware(max_wait_windows=2)),
        planning_windows(arrivals, 2, o, SizeAware()),
    ]


def test_job_finish_times_are_when_each_job_last_leaves_the_pipeline():
    cost = CostModel(0.0, 1e-3, 0.0, 1e-3)
    a0, a1, b0 = SampleRef("a", 0, 0, 100), SampleRef("a", 0, 1, 100), SampleRef("b", 0, 0, 100)
    order = [Microbatch((a0,), 100), Microbatch((b0,), 100), Microbatch((a1,), 100)]
    # One stage: each microbatch takes 0.1 s forward + 0.1 s backward, one after the other.
    assert job_finish_times(order, 1, cost) == pytest.approx({"a": 0.6, "b": 0.4})
    for stages in (1, 2, 4):
        finish = job_finish_times(order, stages, cost)
        assert max(finish.values()) == pytest.approx(simulate(order, stages, cost).makespan_s)
        assert finish["b"] < finish["a"]


def test_stage_work_is_what_the_simulator_keeps_each_stage_busy_with():
    rng = np.random.default_rng(3)
    jobs = [random_job("a", 3, rng), random_job("b", 2, rng)]
    for stages in (1, 4):
        schedule = plan_schedule(jobs, stages, CAPACITY, use_milp=False, cost=COST)
        result = simulate(schedule.microbatches, stages, COST)
        steps = sum(j.num_global_batches for j in jobs)
        work = stage_work_s(COST, stages, result.tokens, schedule.num_real_microbatches, steps)
        assert stages * work == pytest.approx(result.busy_s)


def test_window_slice_keeps_the_jobs_batches_and_a_final_partial_one():
    job = Job("a", 4, range(1, 11))  # batches [1..4], [5..8], [9, 10]
    middle = window_slice(job, 1, 1)
    assert (middle.name, middle.global_batch_size, middle.lengths) == ("a", 4, (5, 6, 7, 8))
    tail = window_slice(job, 1, 5)
    assert tail.lengths == tuple(range(5, 11)) and tail.num_global_batches == 2
    last = window_slice(job, 2, 1)
    assert (last.global_batch_size, last.lengths) == (2, (9, 10))
    with pytest.raises(ScheduleError, match="job 'a' has global batches 0..2; cannot slice 1 from 3"):
        window_slice(job, 3, 1)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("stages", [1, 4])
def test_every_policy_trains_every_sample_exactly_once(seed, stages):
    arrivals = random_trace(seed)
    expected = sorted((a.job.name, i) for a in arrivals for i in range(len(a.job.lengths)))
    for result in all_policies(arrivals, stages):
        assert sorted(result.trained) == expected, result.policy
        assert result.tokens == sum(sum(a.job.lengths) for a in arrivals)
        # A job never finishes before it arrived, nor after the run ended.
        for name, at in result.arrival_s.items():
            assert at < result.finish_s[name] <= result.makespan_s + 1e-9


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("stages", [1, 2, 4])
def test_no_policy_beats_the_offline_bound(seed, stages):
    arrivals = random_trace(seed)
    bound = offline_bound(arrivals, stages, COST)
    assert bound.trained == ()
    for result in all_policies(arrivals, stages):
        for name in bound.finish_s:
            assert bound.finish_s[name] <= result.finish_s[name] + 1e-9, (result.policy, name)
        assert bound.mean_jct_s <= result.mean_jct_s + 1e-9
        assert bound.p95_jct_s <= result.p95_jct_s + 1e-9
        assert bound.makespan_s <= result.makespan_s + 1e-9
        assert bound.tokens_per_s >= result.tokens_per_s - 1e-6


@pytest.mark.parametrize("stages", [1, 4])
def test_short_jobs_behind_a_long_one_finish_sooner_in_the_service(stages):
    rng = np.random.default_rng(7)
    arrivals = [Arrival(random_job("long", 30, rng, global_batch_size=16), 0.0)]
    arrivals += [Arrival(random_job(f"short{k}", 1, rng, global_batch_size=16), 0.01 * (k + 1)) for k in range(3)]
    fifo_megatron, fifo_planned, service, *_ = all_policies(arrivals, stages)
    for alone in (fifo_megatron, fifo_planned):
        assert service.mean_jct_s < 0.5 * alone.mean_jct_s, (alone.policy, service.mean_jct_s, alone.mean_jct_s)
        # Each short job ends within a few windows in the service, instead of after the long job.
        for k in range(3):
            assert service.finish_s[f"short{k}"] < alone.finish_s["long"]


def test_on_one_stage_the_size_aware_service_runs_the_least_work_first_not_side_by_side():
    rng = np.random.default_rng(9)
    big, small = random_job("big", 8, rng, global_batch_size=8), random_job("small", 4, rng, global_batch_size=8)
    arrivals = [Arrival(big, 0.0), Arrival(small, 0.0)]
    o = options(1)
    shared = planning_windows(arrivals, 2, o)
    size_aware = planning_windows(arrivals, 2, o, SizeAware())
    assert size_aware.policy == "service, least work first, wait <= 64 (window 2)"
    # small trains alone first (2 windows), then big alone (4): each finishes as if run back to back.
    assert size_aware.windows == 6
    alone = {j.name: planned_alone(j, o).duration_s for j in (big, small)}
    assert size_aware.finish_s["small"] == pytest.approx(alone["small"], rel=0.02)
    assert size_aware.finish_s["big"] == pytest.approx(alone["small"] + alone["big"], rel=0.02)
    # Side by side, small waits for big's share of every window; the total work is the same.
    assert shared.finish_s["small"] > 1.5 * size_aware.finish_s["small"]
    assert size_aware.mean_jct_s < shared.mean_jct_s
    assert size_aware.makespan_s == pytest.approx(shared.makespan_s, rel=0.02)


@pytest.mark.parametrize("guard", [True, False])
def test_a_long_job_finishes_under_a_steady_stream_of_short_ones_only_with_the_guard(guard):
    """One stage; identical short jobs arrive as fast as they train, so least work first alone
    would keep the long job out until the stream ends; the wait guard lets it through."""
    rng = np.random.default_rng(10)
    long_job = random_job("long", 12, rng, global_batch_size=8)
    lengths = random_job("s", 2, rng, global_batch_size=8).lengths
    shorts = [Job(f"short{k}", 8, lengths) for k in range(30)]
    alone_short = planned_alone(shorts[0], options(1)).duration_s
    arrivals = [Arrival(long_job, 0.0)] + [Arrival(job, alone_short * k) for k, job in enumerate(shorts)]
    result = planning_windows(arrivals, 2, options(1), SizeAware(max_wait_windows=3 if guard else 10**6))
    last_short = max(result.finish_s[j.name] for j in shorts)
    assert sorted(result.trained) == sorted((a.job.name, i) for a in arrivals for i in range(len(a.job.lengths)))
    if guard:
        # Its 6 windows come within the first ~30 windows, long before the 30 shorts are all done.
        assert result.finish_s["long"] < 0.8 * last_short
    else:
        assert result.finish_s["long"] == pytest.approx(result.makespan_s)
        alone_long = planned_alone(long_job, options(1)).duration_s
        assert result.finish_s["long"] - last_short == pytest.approx(alone_long, rel=0.05)


def test_one_window_over_jobs_present_from_the_start_is_the_scheduler_plan():
    rng = np.random.default_rng(5)
    jobs = [random_job(f"j{k}", n, rng) for k, n in enumerate((3, 5, 2))]
    arrivals = [Arrival(j, 0.0) for j in jobs]
    for stages in (1, 4):
        service = planning_windows(arrivals, 5, options(stages))
        schedule = plan_schedule(jobs, stages, CAPACITY, time_limit_s=0.2, use_milp=False, cost=COST)
        assert service.windows == 1
        assert service.makespan_s == pytest.approx(simulate(schedule.microbatches, stages, COST).makespan_s)
        assert service.finish_s == pytest.approx(job_finish_times(schedule.microbatches, stages, COST))


def test_fifo_of_jobs_present_from_the_start_is_megatron_one_job_after_another():
    rng = np.random.default_rng(6)
    jobs = [random_job(f"j{k}", n, rng) for k, n in enumerate((3, 2))]
    result = fifo([Arrival(j, 0.0) for j in jobs], {j.name: megatron_alone(j, 4, COST) for j in jobs})
    assert result.makespan_s == pytest.approx(megatron_lm_baseline(jobs, 4, COST).makespan_s)
    assert result.finish_s["j0"] == pytest.approx(megatron_lm_baseline(jobs[:1], 4, COST).makespan_s)


def test_an_idle_service_waits_for_the_next_arrival():
    rng = np.random.default_rng(8)
    first, second = random_job("a", 1, rng), random_job("b", 1, rng)
    service = planning_windows([Arrival(first, 0.0), Arrival(second, 1000.0)], 4, options(1))
    alone_b = planned_alone(second, options(1)).duration_s
    assert service.windows == 2
    assert service.finish_s["b"] == pytest.approx(1000.0 + alone_b)
    assert service.span_s == pytest.approx(1000.0 + alone_b)


@pytest.mark.parametrize(
    ("arrivals", "window", "message"),
    [
        ([], 1, "a trace needs at least one job"),
        ([Arrival(Job("a", 1, [5]), 0.0), Arrival(Job("a", 1, [5]), 1.0)], 1, "job names in a trace must be unique"),
        ([Arrival(Job("a", 1, [5]), -1.0)], 1, "arrival times must be >= 0"),
        ([Arrival(Job("a", 1, [5]), 0.0)], 0, "window must be >= 1 global batch, got 0"),
    ],
)
def test_bad_traces_are_refused_with_the_reason(arrivals, window, message):
    with pytest.raises(ScheduleError, match=message):
        planning_windows(arrivals, window, options(1))
