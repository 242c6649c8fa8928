"""Packing, grouping, ordering, verification and background planning of lorafusion.scheduler."""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorafusion.scheduler import (
    BackgroundPlanner,
    CostModel,
    Job,
    Microbatch,
    SampleRef,
    Schedule,
    ScheduleError,
    PackingProblem,
    candidate_groupings,
    choose_grouping,
    greedy_pack,
    group_jobs,
    pack,
    pack_global_batch,
    padded_tokens,
    plan_schedule,
    simulate,
    verify_schedule,
)
from lorafusion.scheduler.bins import shrink_lightest_bin
from lorafusion.scheduler.group_selection import heuristic_makespan, probe_jobs
from lorafusion.scheduler.packing import SOLVERS, bin_load

PROPERTY_SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def workloads(draw, max_jobs: int = 4, max_samples: int = 24):
    """Random jobs, stages, capacity and padding that are valid scheduler input."""
    capacity = draw(st.sampled_from([256, 512, 1024]))
    pad_multiple = draw(st.sampled_from([1, 8, 32]))
    stages = draw(st.integers(1, 5))
    jobs = []
    for j in range(draw(st.integers(1, max_jobs))):
        lengths = draw(st.lists(st.integers(1, capacity - pad_multiple + 1), min_size=1, max_size=max_samples))
        batch = draw(st.integers(1, len(lengths)))
        jobs.append(Job(f"job{j}", batch, lengths))
    return jobs, stages, capacity, pad_multiple


@PROPERTY_SETTINGS
@given(workloads())
def test_planned_schedules_verify(workload):
    jobs, stages, capacity, pad_multiple = workload
    schedule = plan_schedule(jobs, stages, capacity, pad_multiple, time_limit_s=0.2)
    verify_schedule(schedule, jobs)
    assert all(p.num_bins <= p.greedy_bins for p in schedule.packings)
    assert all(p.num_bins >= p.lower_bound for p in schedule.packings)


@PROPERTY_SETTINGS
@given(
    st.lists(st.tuples(st.integers(0, 2), st.integers(1, 300)), min_size=1, max_size=40),
    st.sampled_from([1, 16]),
)
def test_packing_never_uses_more_bins_than_greedy(items, pad_multiple):
    segments = [s for s, _ in items]
    tokens = [n for _, n in items]
    result = pack(segments, tokens, 512, pad_multiple, time_limit_s=0.2)
    assert result.num_bins <= len(greedy_pack(segments, tokens, 512, pad_multiple))
    assert result.solver in SOLVERS
    assert sorted(i for b in result.bins for i in b) == list(range(len(items)))
    assert all(bin_load(b, segments, tokens, pad_multiple) <= 512 for b in result.bins)
    assert list(result.loads) == sorted(result.loads, reverse=True)


def exhaustive_optimum(segments, tokens, capacity, pad_multiple) -> tuple[int, int]:
    """(fewest bins, then smallest possible lightest-bin load) by trying every assignment."""
    n = len(tokens)
    best = (n + 1, capacity + 1)
    for assignment in itertools.product(range(n), repeat=n):
        bins = [[i for i in range(n) if assignment[i] == b] for b in range(n)]
        bins = [b for b in bins if b]
        loads = [bin_load(b, segments, tokens, pad_multiple) for b in bins]
        if max(loads) <= capacity:
            best = min(best, (len(bins), min(loads)))
    return best


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 1), st.integers(1, 100)), min_size=1, max_size=6),
    st.sampled_from([1, 8]),
)
def test_packing_matches_exhaustive_optimum_on_small_instances(items, pad_multiple):
    segments = [s for s, _ in items]
    tokens = [n for _, n in items]
    capacity = 128
    result = pack(segments, tokens, capacity, pad_multiple, time_limit_s=5.0, leftover_gap=0.0)
    assert result.solver in {"greedy-optimal", "milp", "greedy-checked"}
    assert (result.num_bins, min(result.loads)) == exhaustive_optimum(segments, tokens, capacity, pad_multiple)


def test_milp_beats_first_fit_decreasing_when_it_can():
    # FFD: 5+4 | 3+3+3 | 2 (three bins); the optimum is 5+3+2 | 4+3+3.
    tokens = [5, 4, 3, 3, 3, 2]
    result = pack([0] * 6, tokens, 10, time_limit_s=5.0)
    assert len(greedy_pack([0] * 6, tokens, 10)) == 3
    assert result.num_bins == 2
    assert result.solver == "milp"


def test_segment_padding_counts_each_job_separately():
    samples = [SampleRef("a", 0, 0, 10), SampleRef("a", 0, 1, 10), SampleRef("b", 0, 0, 1)]
    assert padded_tokens(samples, 16) == 32 + 16
    assert padded_tokens(samples, 1) == 21


@pytest.mark.parametrize(
    ("jobs", "stages", "capacity", "message"),
    [
        ([Job("sum-a", 2, [10, 5000, 10])], 2, 4096, "job 'sum-a' sample 1 has 5000 tokens, more than capacity=4096"),
        ([Job("empty", 1, [])], 2, 4096, "job 'empty' has no samples"),
        ([Job("big", 8, [10, 10, 10])], 2, 4096, "job 'big': global_batch_size=8 is larger than its dataset"),
        ([Job("a", 1, [10])], 0, 4096, "stages must be an integer >= 1, got 0"),
        ([Job("a", 1, [10])], 2, 0, "capacity must be a positive integer"),
        ([], 2, 4096, "no jobs given"),
        ([Job("a", 1, [10]), Job("a", 1, [10])], 2, 4096, "job name 'a' appears twice"),
    ],
)
def test_bad_input_gives_a_clear_error(jobs, stages, capacity, message):
    with pytest.raises(ScheduleError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan_schedule(jobs, stages, capacity)


def test_padding_can_push_a_sample_over_capacity():
    with pytest.raises(ScheduleError, match=r"sample 0 has 100 tokens \(padded to 128\), more than capacity=120"):
        plan_schedule([Job("a", 1, [100])], 1, 120, pad_multiple=64)


def test_single_job_gets_exactly_the_unavoidable_noops():
    # One job, every global batch fits one microbatch: S - 1 no-ops between consecutive batches.
    job = Job("solo", 2, [100] * 10)
    schedule = plan_schedule([job], stages=4, capacity=1000)
    verify_schedule(schedule, [job])
    assert schedule.num_real_microbatches == 5
    assert schedule.num_noops == 4 * 3
    assert [mb.noop for mb in schedule.microbatches[:5]] == [False, True, True, True, False]


def test_groups_stagger_jobs_without_noops():
    jobs = [Job(f"j{k}", 8, [500] * 32) for k in range(4)]  # 4000 tokens per job per batch
    schedule = plan_schedule(jobs, stages=4, capacity=1000)
    verify_schedule(schedule, jobs)
    assert schedule.num_noops == 0
    assert len(schedule.groups) >= 2
    assert schedule.fill_ratio == 1.0


def test_leftovers_of_different_groups_share_a_microbatch():
    # Each group's batch leaves a 300-token leftover; ordering merges them instead of emitting two.
    jobs = [Job("a", 3, [1000, 1000, 300] * 2), Job("b", 3, [1000, 1000, 300] * 2)]
    schedule = plan_schedule(jobs, stages=2, capacity=1000, groups=[["a"], ["b"]])
    verify_schedule(schedule, jobs)
    assert any(mb.jobs == {"a", "b"} for mb in schedule.microbatches)
    assert schedule.num_real_microbatches < 6 * 2


def test_grouping_rule():
    jobs = [Job(f"j{k}", 16, [512] * 64) for k in range(4)]  # one full 8192 microbatch per batch each
    assert group_jobs(jobs, stages=1, capacity=8192) == [["j0", "j1", "j2", "j3"]]
    assert len(group_jobs(jobs, stages=2, capacity=8192)) == 2
    assert len(group_jobs(jobs, stages=4, capacity=8192)) == 4  # needs 3 full bins from the others
    assert len(group_jobs(jobs, stages=8, capacity=8192)) == 4  # nothing staggers enough: one job each


def make_schedule(microbatches, stages=2, capacity=100):
    return Schedule(stages=stages, capacity=capacity, pad_multiple=1, microbatches=microbatches)


def mb(*samples):
    refs = tuple(SampleRef(job, g, i, n) for job, g, i, n in samples)
    return Microbatch(refs, padded_tokens(refs, 1))


JOB = Job("a", 1, [10, 20])


@pytest.mark.parametrize(
    ("microbatches", "message"),
    [
        ([mb(("a", 0, 0, 10)), Microbatch((), 0, True), mb(("a", 1, 1, 20))], None),
        ([mb(("a", 0, 0, 10)), mb(("a", 1, 1, 20))], "batch 1 starts at microbatch 1, but batch 0 ends at 0"),
        ([mb(("a", 0, 0, 10))], "1 samples never scheduled, first is sample 1"),
        ([mb(("a", 0, 0, 10)), Microbatch((), 0, True), mb(("a", 1, 1, 20)), mb(("a", 0, 0, 10))], "appears twice"),
        ([mb(("a", 0, 0, 10)), Microbatch((), 0, True), mb(("a", 1, 1, 25))], "has 20 tokens, the schedule says 25"),
        ([mb(("a", 0, 0, 10)), Microbatch((), 0, True), mb(("a", 0, 1, 20))], "belongs to global batch 1"),
        ([mb(("b", 0, 0, 10))], "unknown job 'b'"),
        ([Microbatch((SampleRef("a", 0, 0, 10),), 99)], "says 99 tokens; its padded total"),
        ([Microbatch((), 0, False)], "has no samples but is not marked as a no-op"),
    ],
)
def test_verify_schedule_catches_each_violation(microbatches, message):
    schedule = make_schedule(microbatches)
    if message is None:
        verify_schedule(schedule, [JOB])
    else:
        with pytest.raises(ScheduleError, match=message):
            verify_schedule(schedule, [JOB])


def test_verify_schedule_catches_over_capacity():
    job = Job("a", 2, [60, 60])
    schedule = make_schedule([mb(("a", 0, 0, 60), ("a", 0, 1, 60))], capacity=100)
    with pytest.raises(ScheduleError, match="120 tokens, more than capacity=100"):
        verify_schedule(schedule, [job])


def test_json_round_trip_keeps_the_contract():
    jobs = [Job("a", 2, [300, 200, 100, 50]), Job("b", 1, [400, 400])]
    schedule = plan_schedule(jobs, stages=2, capacity=512)
    data = json.loads(schedule.to_json())
    assert {"stages", "capacity", "microbatches"} <= set(data)
    first_sample = next(s for m in data["microbatches"] for s in m["samples"])
    assert set(first_sample) == {"job", "global_batch", "index", "tokens"}
    restored = Schedule.from_json_dict(data)
    assert restored.microbatches == schedule.microbatches
    verify_schedule(restored, jobs)


def comparable(schedule: Schedule):
    return schedule.microbatches, [dataclasses.replace(p, solve_time_s=0.0) for p in schedule.packings]


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_background_planner_matches_synchronous_planning(executor):
    # Identity holds when no packing hits its time limit (a timeout depends on machine load), so the
    # limit is generous here and the test checks that none timed out.
    jobs = [Job(f"j{k}", 6, [(37 * k + 101 * i) % 500 + 50 for i in range(30)]) for k in range(3)]
    expected = plan_schedule(jobs, stages=3, capacity=1024, pad_multiple=8, time_limit_s=30.0)
    assert not any("timeout" in p.solver for p in expected.packings)
    assert any(p.solver == "milp" for p in expected.packings)  # the MILP path is exercised
    with BackgroundPlanner(jobs, 3, 1024, pad_multiple=8, time_limit_s=30.0, executor=executor) as planner:
        streamed = [next(iter(planner)) for _ in range(3)]  # the runtime pulls microbatches one by one
        schedule = planner.schedule()
    assert streamed == schedule.microbatches[:3]
    assert comparable(schedule) == comparable(expected)


@PROPERTY_SETTINGS
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(1, 300)), min_size=1, max_size=40), st.sampled_from([1, 16]))
def test_local_search_keeps_a_valid_packing_and_never_grows_the_leftover(items, pad_multiple):
    segments = [s for s, _ in items]
    tokens = [n for _, n in items]
    greedy = greedy_pack(segments, tokens, 512, pad_multiple)
    shrunk = shrink_lightest_bin(greedy, segments, tokens, 512, pad_multiple)
    assert sorted(i for b in shrunk for i in b) == list(range(len(items)))
    assert len(shrunk) <= len(greedy)
    loads = [bin_load(b, segments, tokens, pad_multiple) for b in shrunk]
    assert max(loads) <= 512
    assert min(loads) <= min(bin_load(b, segments, tokens, pad_multiple) for b in greedy)


def test_local_search_moves_items_out_of_the_lightest_bin():
    tokens, segments = [6, 2, 5, 2], [0, 0, 0, 0]
    shrunk = shrink_lightest_bin([[0, 1], [2, 3]], segments, tokens, 10, 1)
    assert sorted(bin_load(b, segments, tokens, 1) for b in shrunk) == [5, 10]
    assert shrink_lightest_bin([[0], [1]], [0, 0], [5, 3], 10, 1) == [[0, 1]]  # an emptied bin disappears


def test_global_batch_runs_the_milp_only_where_the_bin_count_bound_may_be_beaten():
    easy = PackingProblem((0, 0, 1, 1), (500, 500, 500, 500), 1000)  # FFD meets ceil(2000 / 1000)
    hard = PackingProblem((0,) * 6, (5, 4, 3, 3, 3, 2), 10, optimise_leftover=False)  # FFD 3 bins, LB 2
    result = pack_global_batch([easy, hard], time_limit_s=5.0, workers=2)
    assert [p.solver for p in result.packings] == ["greedy-optimal", "milp"]
    assert [p.num_bins for p in result.packings] == [2, 2]
    assert result.time_s >= max(p.solve_time_s for p in result.packings)


def test_global_batch_budget_is_shared_and_keeps_the_heuristic_when_it_runs_out():
    hard = PackingProblem((0,) * 6, (5, 4, 3, 3, 3, 2), 10, optimise_leftover=False)
    result = pack_global_batch([hard, hard], time_limit_s=1e-9)
    assert [p.solver for p in result.packings] == ["greedy-timeout", "greedy-timeout"]
    assert all(p.num_bins == 3 for p in result.packings)


def test_planner_records_one_time_per_global_batch():
    jobs = [Job("a", 4, [100] * 12), Job("b", 2, [300] * 8)]  # 3 and 4 global batches
    schedule = plan_schedule(jobs, stages=2, capacity=1024)
    assert len(schedule.batch_times_s) == 4
    assert len(schedule.packings) == sum(
        min(4, max(j.num_global_batches for j in jobs if j.name in g)) for g in schedule.groups
    )


@pytest.mark.parametrize("stages", [1, 2, 4])
def test_grouping_is_the_fastest_candidate_by_simulation(stages):
    # Padded segments make one big group costly: each microbatch would carry many padded job segments.
    jobs = [Job(f"j{k}", 8, [(53 * i + 17 * k) % 700 + 30 for i in range(24)]) for k in range(6)]
    cost = CostModel.default()
    chosen = choose_grouping(jobs, stages, 2048, 128, cost)
    candidates = candidate_groupings(jobs, stages, 2048)
    probe = probe_jobs(jobs, 3)
    times = [heuristic_makespan(probe, g, stages, 2048, 128, cost) for g in candidates]
    assert chosen == candidates[times.index(min(times))]
    planned = plan_schedule(jobs, stages, 2048, pad_multiple=128, time_limit_s=0.2)
    ruled = plan_schedule(jobs, stages, 2048, pad_multiple=128, time_limit_s=0.2, groups=group_jobs(jobs, stages, 2048))
    verify_schedule(planned, jobs)
    assert planned.groups == chosen
    assert simulate(planned.microbatches, stages, cost).makespan_s <= simulate(ruled.microbatches, stages, cost).makespan_s
