"""Intra-op threads for training on the CPU. torch starts one per core, which pays off only on an
idle machine: on a busy one the threads wait for each other (the quickstart ran 12x slower than
on one thread). Unless OMP_NUM_THREADS says otherwise, a CPU run takes the cores it may use that
the load average leaves free, at least one."""

from __future__ import annotations

import os


def usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_cpu_threads(current: int) -> int | None:
    """The thread count for a CPU run (at most `current`, torch's), or None to keep torch's: the
    user set OMP_NUM_THREADS."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on this platform
        busy = 0.0
    return max(1, min(current, usable_cores() - round(busy)))


def set_cpu_threads() -> None:
    import torch

    threads = default_cpu_threads(torch.get_num_threads())
    if threads is not None:
        torch.set_num_threads(threads)
