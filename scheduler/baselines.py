"""The systems LoRAFusion is compared with, modelled as they run, on the same simulator and costs.

Faithful baselines, each with its micro-batch size (samples per micro-batch) as a parameter:

* **Megatron-LM** (:func:`megatron_lm_baseline`): one job at a time, pipeline parallel. A global batch
  is gradient-accumulation steps x a micro-batch of ``micro_batch_size`` consecutive samples, packed
  without padding (variable-length attention); 1F1B, then a flush and the optimizer step before the
  next global batch.
* **mLoRA as LoRAFusion's evaluation ran it** (:func:`mlora_evaluated_baseline`): one continuous 1F1B
  stream of single-job micro-batches of ``micro_batch_size`` consecutive samples, packed, going
  round-robin over the jobs one global batch at a time; no flush and no dependency stall (the next
  global batch's micro-batches enter before the previous step has been applied, as in that
  benchmark), an optimizer step per job after each of its global batches.
* **mLoRA's own system** (:func:`mlora_system_baseline`): one job per micro-batch of
  ``micro_batch_size`` consecutive samples padded to the longest, rounded up to a multiple of 8;
  jobs take turns, and a job is locked until its micro-batch has completed (its backward has left
  stage 0), so its next micro-batch enters at least ``S`` positions later (the rule of
  :func:`~lorafusion.scheduler.core.earliest_next_batch_position`, applied to every micro-batch); a
  no-op when no job may go.

Default micro-batch sizes and their source: LoRAFusion's published runs of Llama-3.1-70B on 4 H100s
with 4 pipeline stages (CentML/lorafusion, benchmarks_paper/scripts/main/3_*_70b_4h100_*.sh) used
``per_device_train_batch_size`` 4 for Megatron-LM on xsum, cnn_dailymail and the mix (2 on
wikisum) with 16 samples per global batch, and 4 for the mLoRA baseline on cnn_dailymail and the mix
(8 on xsum, 2 on wikisum and the heterogeneous mix). mLoRA's own micro-batch (its ``mini_batch_size``
task option) has no default for these workloads in its repository; 4 is taken, the same as the
LoRAFusion runs, and its padding multiple 8 is that of mLoRA's tokenizer padding.

Padded variants, kept as extra rows of the benchmark: :func:`padded_megatron_baseline` and
:func:`padded_mlora_baseline` put ``capacity // longest sample`` samples in a microbatch, each padded
to the longest (at 4-8k-token capacities, usually one sample). They are not how those systems run;
the runtime's ``megatron`` and ``mlora`` policies execute their orders (:func:`megatron_order`,
:func:`mlora_order`).
"""

from __future__ import annotations

from collections.abc import Sequence

from .core import NOOP, Job, Microbatch, Schedule, SampleRef, earliest_next_batch_position, round_up
from .cost_model import CostModel
from .simulator import SimulationResult, simulate

MEGATRON_MICRO_BATCH_SIZE = 4
MLORA_EVALUATED_MICRO_BATCH_SIZE = 4
MLORA_MICRO_BATCH_SIZE = 4
MLORA_PAD_MULTIPLE = 8


def _chunks(job: Job, global_batch: int, micro_batch_size: int) -> list[tuple[SampleRef, ...]]:
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    refs = [SampleRef(job.name, global_batch, i, job.lengths[i]) for i in job.batch_indices(global_batch)]
    return [tuple(refs[k : k + micro_batch_size]) for k in range(0, len(refs), micro_batch_size)]


def packed_microbatches(job: Job, global_batch: int, micro_batch_size: int) -> list[Microbatch]:
    """``micro_batch_size`` consecutive samples per micro-batch, packed: costed by their real tokens."""
    return [Microbatch(c, sum(s.tokens for s in c)) for c in _chunks(job, global_batch, micro_batch_size)]


def padded_microbatches(job: Job, global_batch: int, micro_batch_size: int, pad_multiple: int) -> list[Microbatch]:
    """``micro_batch_size`` consecutive samples per micro-batch, each padded to the longest, rounded up."""
    return [
        Microbatch(c, len(c) * round_up(max(s.tokens for s in c), pad_multiple))
        for c in _chunks(job, global_batch, micro_batch_size)
    ]


def megatron_lm_baseline(
    jobs: Sequence[Job], stages: int, cost: CostModel, micro_batch_size: int = MEGATRON_MICRO_BATCH_SIZE
) -> SimulationResult:
    """One job at a time; each global batch is its own 1F1B run, flushed (see module docstring)."""
    total = SimulationResult(stages, 0.0, 0.0, 0)
    for job in jobs:
        for g in range(job.num_global_batches):
            total = total.then(simulate(packed_microbatches(job, g, micro_batch_size), stages, cost))
    return total


def mlora_evaluated_order(jobs: Sequence[Job], micro_batch_size: int = MLORA_EVALUATED_MICRO_BATCH_SIZE) -> list[Microbatch]:
    """Global batch 0 of every job, then global batch 1 of every job, ...; no no-ops."""
    order: list[Microbatch] = []
    for g in range(max(job.num_global_batches for job in jobs)):
        for job in jobs:
            if g < job.num_global_batches:
                order += packed_microbatches(job, g, micro_batch_size)
    return order


def mlora_evaluated_baseline(
    jobs: Sequence[Job], stages: int, cost: CostModel, micro_batch_size: int = MLORA_EVALUATED_MICRO_BATCH_SIZE
) -> SimulationResult:
    return simulate(mlora_evaluated_order(jobs, micro_batch_size), stages, cost)


def mlora_system_order(
    jobs: Sequence[Job],
    stages: int,
    micro_batch_size: int = MLORA_MICRO_BATCH_SIZE,
    pad_multiple: int = MLORA_PAD_MULTIPLE,
) -> list[Microbatch]:
    """Jobs take turns; a job's next micro-batch waits ``stages`` positions after its previous one."""
    queues = [
        [mb for g in range(job.num_global_batches) for mb in padded_microbatches(job, g, micro_batch_size, pad_multiple)]
        for job in jobs
    ]
    return _round_robin(queues, stages, lock_every_microbatch=True)


def mlora_system_baseline(
    jobs: Sequence[Job],
    stages: int,
    cost: CostModel,
    micro_batch_size: int = MLORA_MICRO_BATCH_SIZE,
    pad_multiple: int = MLORA_PAD_MULTIPLE,
) -> SimulationResult:
    return simulate(mlora_system_order(jobs, stages, micro_batch_size, pad_multiple), stages, cost)


def _round_robin(queues: list[list[Microbatch]], stages: int, lock_every_microbatch: bool) -> list[Microbatch]:
    """One micro-batch per turn; a job waits ``stages`` positions after its previous micro-batch
    (``lock_every_microbatch``) or after the last micro-batch of its previous global batch; a no-op
    when every job waits."""
    heads = [0] * len(queues)
    last_of: dict[tuple[int, int], int] = {}  # (job, global batch) -> position of its latest micro-batch
    order: list[Microbatch] = []
    turn = 0
    while any(h < len(q) for h, q in zip(heads, queues)):
        position = len(order)
        for offset in range(len(queues)):
            j = (turn + offset) % len(queues)
            if heads[j] == len(queues[j]):
                continue
            g = queues[j][heads[j]].samples[0].global_batch
            previous = last_of.get((j, g)) if lock_every_microbatch else None
            previous = last_of.get((j, g - 1)) if previous is None else previous
            if previous is None or position >= earliest_next_batch_position(previous, stages) or (
                not lock_every_microbatch and (j, g) in last_of
            ):
                order.append(queues[j][heads[j]])
                last_of[(j, g)] = position
                heads[j] += 1
                turn = j + 1
                break
        else:
            order.append(NOOP)
    return order


def fixed_size_microbatches(job: Job, global_batch: int, capacity: int) -> list[Microbatch]:
    """Padded variant: ``capacity // longest sample`` consecutive samples each, padded to the
    longest sample in the microbatch."""
    return padded_microbatches(job, global_batch, max(1, capacity // max(job.lengths)), 1)


def megatron_order(jobs: Sequence[Job], stages: int, capacity: int) -> list[Microbatch]:
    """Padded variant's execution order: one job at a time, and after every global batch the S - 1
    no-op slots by which a 1F1B pipeline drains before the optimizer step (a flush)."""
    order: list[Microbatch] = []
    for job in jobs:
        for g in range(job.num_global_batches):
            order += fixed_size_microbatches(job, g, capacity) + [NOOP] * (stages - 1)
    return order


def padded_megatron_baseline(jobs: Sequence[Job], stages: int, capacity: int, cost: CostModel) -> SimulationResult:
    """One job at a time, padded fixed-size microbatches, a pipeline flush after every global batch."""
    total = SimulationResult(stages, 0.0, 0.0, 0)
    for job in jobs:
        for g in range(job.num_global_batches):
            total = total.then(simulate(fixed_size_microbatches(job, g, capacity), stages, cost))
    return total


def mlora_order(jobs: Sequence[Job], stages: int, capacity: int) -> list[Microbatch]:
    """Padded variant's order: round-robin over jobs, one padded fixed-size microbatch per turn,
    skipping a job whose next global batch may not start yet (the scheduler's dependency rule)."""
    queues = [[mb for g in range(job.num_global_batches) for mb in fixed_size_microbatches(job, g, capacity)] for job in jobs]
    return _round_robin(queues, stages, lock_every_microbatch=False)


def padded_mlora_baseline(jobs: Sequence[Job], stages: int, capacity: int, cost: CostModel) -> SimulationResult:
    """All jobs round-robin in one pipeline, one job per padded fixed-size microbatch."""
    return simulate(mlora_order(jobs, stages, capacity), stages, cost)


SYSTEMS = ("lorafusion", "megatron-lm", "mlora-as-evaluated", "mlora-system", "megatron-padded", "mlora-padded")


def simulate_systems(
    schedule: Schedule,
    jobs: Sequence[Job],
    cost: CostModel,
    megatron_micro_batch_size: int = MEGATRON_MICRO_BATCH_SIZE,
    mlora_evaluated_micro_batch_size: int = MLORA_EVALUATED_MICRO_BATCH_SIZE,
    mlora_micro_batch_size: int = MLORA_MICRO_BATCH_SIZE,
) -> dict[str, SimulationResult]:
    """The planned ``schedule`` and every baseline on the same jobs and costs, keyed by :data:`SYSTEMS`."""
    stages, capacity = schedule.stages, schedule.capacity
    return {
        "lorafusion": simulate(schedule.microbatches, stages, cost),
        "megatron-lm": megatron_lm_baseline(jobs, stages, cost, megatron_micro_batch_size),
        "mlora-as-evaluated": mlora_evaluated_baseline(jobs, stages, cost, mlora_evaluated_micro_batch_size),
        "mlora-system": mlora_system_baseline(jobs, stages, cost, mlora_micro_batch_size),
        "megatron-padded": padded_megatron_baseline(jobs, stages, capacity, cost),
        "mlora-padded": padded_mlora_baseline(jobs, stages, capacity, cost),
    }
