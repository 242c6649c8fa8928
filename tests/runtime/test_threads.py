"""CPU runs take the free cores (by the load average), at least one, and OMP_NUM_THREADS wins."""

from __future__ import annotations

import pytest

from lorafusion.runtime import threads


@pytest.mark.parametrize("cores, load, current, expected", [(8, 0.0, 8, 8), (8, 6.2, 8, 2), (8, 30.0, 8, 1), (16, 0.0, 8, 8), (2, 1.6, 2, 1)])
def test_threads_follow_the_free_cores(monkeypatch, cores, load, current, expected):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: cores)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (load, load, load))
    assert threads.default_cpu_threads(current) == expected


def test_omp_num_threads_is_left_to_torch(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.default_cpu_threads(8) is None
