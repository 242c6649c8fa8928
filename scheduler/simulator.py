"""Discrete-event model of 1F1B pipeline execution.

Execution (:func:`simulate`): stage ``s`` runs ``S - s - 1`` warm-up forwards, then alternates one
forward and one backward, then drains the remaining backwards (1F1B). The forward of microbatch
``i`` on stage ``s`` waits for its forward on stage ``s - 1``; its backward on stage ``s`` waits for
its backward on stage ``s + 1`` (the last stage: for its own forward). A stage's time per forward and
backward, and the optimizer step it runs after the last backward of a job's global batch, come from
the :class:`~lorafusion.scheduler.cost_model.CostModel`. A no-op microbatch costs nothing; the wait
it stands for comes out of the dependencies. Communication costs only what the cost model's
``stage_fixed_s`` charges. The baselines built on this live in :mod:`lorafusion.scheduler.baselines`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .core import Microbatch
from .cost_model import CostModel


@dataclass(frozen=True)
class SimulationResult:
    """Makespan (s), busy stage-seconds, and the sample (unpadded) tokens trained."""

    stages: int
    makespan_s: float
    busy_s: float
    tokens: int

    @property
    def bubble_fraction(self) -> float:
        """Share of stage-time spent idle."""
        return 1.0 - self.busy_s / (self.stages * self.makespan_s) if self.makespan_s else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.makespan_s if self.makespan_s else 0.0

    def then(self, other: SimulationResult) -> SimulationResult:
        """Two runs one after the other (the pipeline drains in between)."""
        return SimulationResult(
            self.stages, self.makespan_s + other.makespan_s, self.busy_s + other.busy_s, self.tokens + other.tokens
        )


def _one_f_one_b_order(stage: int, stages: int, num_microbatches: int) -> list[tuple[str, int]]:
    warmup = min(stages - stage - 1, num_microbatches)
    order = [("F", i) for i in range(warmup)]
    for i in range(num_microbatches - warmup):
        order += [("F", warmup + i), ("B", i)]
    order += [("B", i) for i in range(num_microbatches - warmup, num_microbatches)]
    return order


def _run(microbatches: Sequence[Microbatch], stages: int, cost: CostModel) -> tuple[SimulationResult, np.ndarray]:
    """One 1F1B run: the result, and when each microbatch's backward (with the optimizer steps
    charged after it) ends on each stage (``[stage, microbatch]``)."""
    if stages < 1:
        raise ValueError(f"stages must be >= 1, got {stages}")
    n = len(microbatches)
    last_of_batch: dict[tuple[str, int], int] = {}
    for i, mb in enumerate(microbatches):
        for s in mb.samples:
            last_of_batch[(s.job, s.global_batch)] = i
    optimizer_steps_after = [0] * n
    for i in last_of_batch.values():
        optimizer_steps_after[i] += 1

    forward_s = [cost.stage_forward_s(mb.tokens, stages) for mb in microbatches]
    backward_s = [cost.stage_backward_s(mb.tokens, stages) for mb in microbatches]
    step_s = cost.optimizer_step_s / stages
    done = {"F": np.full((stages, n), np.nan), "B": np.full((stages, n), np.nan)}
    orders = [_one_f_one_b_order(s, stages, n) for s in range(stages)]
    cursor = [0] * stages
    clock = [0.0] * stages
    busy = 0.0
    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for s in range(stages):
            while cursor[s] < len(orders[s]):
                kind, i = orders[s][cursor[s]]
                if kind == "F":
                    ready_at = 0.0 if s == 0 else done["F"][s - 1, i]
                    duration = forward_s[i]
                else:
                    ready_at = done["F"][s, i] if s == stages - 1 else done["B"][s + 1, i]
                    duration = backward_s[i] + step_s * optimizer_steps_after[i]
                if math.isnan(ready_at):
                    break
                clock[s] = max(clock[s], ready_at) + duration
                done[kind][s, i] = clock[s]
                busy += duration
                cursor[s] += 1
                remaining -= 1
                progressed = True
        if not progressed:  # pragma: no cover - 1F1B orders cannot deadlock
            raise RuntimeError("pipeline simulation deadlocked")
    tokens = sum(mb.real_tokens for mb in microbatches)
    result = SimulationResult(stages=stages, makespan_s=max(clock) if n else 0.0, busy_s=busy, tokens=tokens)
    return result, done["B"]


def simulate(microbatches: Sequence[Microbatch], stages: int, cost: CostModel) -> SimulationResult:
    """Simulate one 1F1B run of ``microbatches`` (execution order) over ``stages`` stages.

    The schedule is assumed to satisfy verify_schedule's dependency rule; each job's optimizer step
    on a stage is placed after that stage's backward of the job's last microbatch of each batch.
    """
    return _run(microbatches, stages, cost)[0]


def job_finish_times(microbatches: Sequence[Microbatch], stages: int, cost: CostModel) -> dict[str, float]:
    """When each job's training in this run ends: the latest time, over its microbatches and all
    stages, at which one of its backwards (and the optimizer steps after it) completes; seconds
    from the run's start, in the same simulation as :func:`simulate`. The last of them is the
    run's makespan."""
    _, backward_done = _run(microbatches, stages, cost)
    finish: dict[str, float] = {}
    for i, mb in enumerate(microbatches):
        for job in mb.jobs:
            finish[job] = max(finish.get(job, 0.0), float(backward_done[:, i].max()))
    return finish
