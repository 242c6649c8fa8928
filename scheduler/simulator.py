"""Discrete-event model of 1F1B pipeline execution, and the two baselines it is compared with.

Cost model (:class:`CostModel`): the whole model's forward and backward times are each linear in a
microbatch's padded token count, ``fixed + per_token * tokens`` (the fixed part is the per-microbatch
overhead: kernel launches, small GEMMs); the model is split evenly over ``S`` stages, so one stage
takes ``1/S`` of each. After the last backward of a job's global batch on a stage, that stage runs
the job's optimizer step (``optimizer_step_s / S``) before its next operation. A no-op microbatch
costs nothing; the wait it stands for comes out of the dependencies.

Execution (:func:`simulate`): stage ``s`` runs ``S - s - 1`` warm-up forwards, then alternates one
forward and one backward, then drains the remaining backwards (1F1B). The forward of microbatch
``i`` on stage ``s`` waits for its forward on stage ``s - 1``; its backward on stage ``s`` waits for
its backward on stage ``s + 1`` (the last stage: for its own forward). Communication is free.

Baselines, simulated with the same cost model:

* Megatron-style (:func:`megatron_baseline`): one job at a time, fixed-size microbatches (a fixed
  number of consecutive samples, the most that fit ``capacity`` when every sample is as long as the
  job's longest, each padded to the longest in its microbatch), and a pipeline flush plus optimizer
  step after every global batch.
* mLoRA-style (:func:`mlora_baseline`): the same fixed-size single-job microbatches, but the jobs'
  microbatches are issued round-robin into one pipeline, skipping a job whose next global batch is
  not yet allowed (same dependency rule as the scheduler) and issuing a no-op when no job is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .core import NOOP, Job, Microbatch, SampleRef, earliest_next_batch_position


@dataclass(frozen=True)
class CostModel:
    """Whole-model times in seconds (all layers on one device); see the module docstring."""

    forward_fixed_s: float
    forward_per_token_s: float
    backward_fixed_s: float
    backward_per_token_s: float
    optimizer_step_s: float = 0.0

    def forward(self, tokens: int) -> float:
        return self.forward_fixed_s + self.forward_per_token_s * tokens if tokens else 0.0

    def backward(self, tokens: int) -> float:
        return self.backward_fixed_s + self.backward_per_token_s * tokens if tokens else 0.0

    @classmethod
    def from_layer_times(
        cls, model: Mapping, optimizer_bytes_per_param: float = 32.0, memory_bandwidth_bytes_per_s: float = 2.0e12
    ) -> CostModel:
        """Fit the linear model to one model's entry of a measured layer-times file.

        ``model`` has the keys of /work/shared/calibration/layer-times-h100.yaml:
        ``num_layers``, ``decoder_layer_fwd_time_by_tokens``, ``decoder_layer_fwd_bwd_time_by_tokens``,
        ``pre_post_layer_fwd_bwd_time_by_tokens`` (token count -> seconds) and
        ``decoder_layer_lora_param_count_per_rank``. Whole-model forward = layers x layer forward +
        the pre/post layers' forward share (taken in the decoder layers' forward:total ratio);
        backward = the rest. Least squares over the measured token counts. The optimizer step is
        not measured there: it is estimated as memory-bound AdamW over the LoRA parameters
        (``optimizer_bytes_per_param`` moved per parameter at ``memory_bandwidth_bytes_per_s``).
        """
        layers = int(model["num_layers"])
        fwd = {int(k): float(v) for k, v in model["decoder_layer_fwd_time_by_tokens"].items()}
        fwd_bwd = {int(k): float(v) for k, v in model["decoder_layer_fwd_bwd_time_by_tokens"].items()}
        pre_post = {int(k): float(v) for k, v in model.get("pre_post_layer_fwd_bwd_time_by_tokens", {}).items()}
        tokens = sorted(fwd)
        forward_times, backward_times = [], []
        for t in tokens:
            share = fwd[t] / fwd_bwd[t]
            extra = pre_post.get(t, 0.0)
            forward_times.append(layers * fwd[t] + share * extra)
            backward_times.append(layers * (fwd_bwd[t] - fwd[t]) + (1 - share) * extra)
        f_slope, f_fixed = np.polyfit(tokens, forward_times, 1)
        b_slope, b_fixed = np.polyfit(tokens, backward_times, 1)
        lora_params = layers * float(model.get("decoder_layer_lora_param_count_per_rank", 0))
        return cls(
            forward_fixed_s=max(float(f_fixed), 0.0),
            forward_per_token_s=float(f_slope),
            backward_fixed_s=max(float(b_fixed), 0.0),
            backward_per_token_s=float(b_slope),
            optimizer_step_s=lora_params * optimizer_bytes_per_param / memory_bandwidth_bytes_per_s,
        )

    @classmethod
    def default(cls) -> CostModel:
        """Llama-3.1-8B on H100, fitted with :meth:`from_layer_times` from the LoRAFusion
        artifact's measured layer times (the figures in /work/shared/calibration/layer-times-h100.yaml)."""
        return cls(
            forward_fixed_s=6.9891e-4,
            forward_per_token_s=3.6133e-05,
            backward_fixed_s=1.38625e-2,
            backward_per_token_s=3.5220e-05,
            optimizer_step_s=6.7109e-4,
        )


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


def simulate(microbatches: Sequence[Microbatch], stages: int, cost: CostModel) -> SimulationResult:
    """Simulate one 1F1B run of ``microbatches`` (execution order) over ``stages`` stages.

    The schedule is assumed to satisfy verify_schedule's dependency rule; each job's optimizer step
    on a stage is placed after that stage's backward of the job's last microbatch of each batch.
    """
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

    forward_s = [cost.forward(mb.tokens) / stages for mb in microbatches]
    backward_s = [cost.backward(mb.tokens) / stages for mb in microbatches]
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
    return SimulationResult(stages=stages, makespan_s=max(clock) if n else 0.0, busy_s=busy, tokens=tokens)


def fixed_size_microbatches(job: Job, global_batch: int, capacity: int) -> list[Microbatch]:
    """Megatron/mLoRA-style microbatches: ``capacity // longest sample`` consecutive samples each,
    padded to the longest sample in the microbatch."""
    per_microbatch = max(1, capacity // max(job.lengths))
    indices = list(job.batch_indices(global_batch))
    result = []
    for start in range(0, len(indices), per_microbatch):
        chunk = indices[start : start + per_microbatch]
        samples = tuple(SampleRef(job.name, global_batch, i, job.lengths[i]) for i in chunk)
        result.append(Microbatch(samples=samples, tokens=len(chunk) * max(s.tokens for s in samples)))
    return result


def megatron_order(jobs: Sequence[Job], stages: int, capacity: int) -> list[Microbatch]:
    """Megatron-style execution order: one job at a time, fixed-size microbatches, and after every
    global batch the S - 1 no-op slots by which a 1F1B pipeline drains before the optimizer step
    (a flush)."""
    order: list[Microbatch] = []
    for job in jobs:
        for g in range(job.num_global_batches):
            order += fixed_size_microbatches(job, g, capacity) + [NOOP] * (stages - 1)
    return order


def megatron_baseline(jobs: Sequence[Job], stages: int, capacity: int, cost: CostModel) -> SimulationResult:
    """One job at a time, fixed-size microbatches, a pipeline flush after every global batch."""
    total = SimulationResult(stages, 0.0, 0.0, 0)
    for job in jobs:
        for g in range(job.num_global_batches):
            total = total.then(simulate(fixed_size_microbatches(job, g, capacity), stages, cost))
    return total


def mlora_order(jobs: Sequence[Job], stages: int, capacity: int) -> list[Microbatch]:
    """Round-robin over jobs, one single-job fixed-size microbatch per turn (see module docstring)."""
    queues = [
        [mb for g in range(job.num_global_batches) for mb in fixed_size_microbatches(job, g, capacity)] for job in jobs
    ]
    heads = [0] * len(jobs)
    last_position: dict[tuple[str, int], int] = {}
    order: list[Microbatch] = []
    turn = 0
    while any(h < len(q) for h, q in zip(heads, queues)):
        position = len(order)
        for offset in range(len(jobs)):
            j = (turn + offset) % len(jobs)
            if heads[j] == len(queues[j]):
                continue
            mb = queues[j][heads[j]]
            g = mb.samples[0].global_batch
            previous = last_position.get((jobs[j].name, g - 1))
            if previous is None or position >= earliest_next_batch_position(previous, stages):
                order.append(mb)
                last_position[(jobs[j].name, g)] = position
                heads[j] += 1
                turn = j + 1
                break
        else:
            order.append(NOOP)
    return order


def mlora_baseline(jobs: Sequence[Job], stages: int, capacity: int, cost: CostModel) -> SimulationResult:
    """All jobs round-robin in one pipeline, one job per fixed-size microbatch."""
    return simulate(mlora_order(jobs, stages, capacity), stages, cost)
