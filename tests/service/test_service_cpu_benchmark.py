"""benchmarks/service_cpu.py drives the real service for bench_online.measure_end_to_end."""

from __future__ import annotations

import time

from bench_online import measure_end_to_end
from service_cpu import tiny_cpu_service

from lorafusion.scheduler import Job
from lorafusion.scheduler.online import Arrival


def test_a_trace_replayed_against_the_tiny_service_finishes_every_job(tmp_path):
    arrivals = [Arrival(Job("long", 4, [40] * 16), 0.0), Arrival(Job("short", 2, [30, 25, 60, 20]), 0.5)]
    started = time.time()
    with tiny_cpu_service(tmp_path / "work") as (submit, finished):
        result = measure_end_to_end(arrivals, submit, finished, clock=time.time, timeout_s=300)
    assert set(result.finish_s) == {"long", "short"}
    assert all(0 < finish <= time.time() - started for finish in result.finish_s.values())
    assert result.finish_s["short"] > 0.5 and result.tokens == 16 * 40 + 135
