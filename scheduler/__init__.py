"""Multi-job scheduler: grouping, packing, ordering, verification and a pipeline simulator.

Installed as lorafusion.scheduler; pure Python on numpy/scipy, independent of the kernels, the
runtime and torch.

Typical use::

    from lorafusion.scheduler import Job, plan_schedule, verify_schedule, simulate_systems, CostModel

    jobs = [Job("sum-a", global_batch_size=64, lengths=[...]), ...]
    schedule = plan_schedule(jobs, stages=4, capacity=8192)
    verify_schedule(schedule, jobs)
    for system, result in simulate_systems(schedule, jobs, CostModel.preset("llama-3.1-70b")).items():
        print(system, result.tokens_per_s)
"""

from .baselines import (
    SYSTEMS,
    fixed_size_microbatches,
    megatron_lm_baseline,
    megatron_order,
    mlora_evaluated_baseline,
    mlora_evaluated_order,
    mlora_order,
    mlora_system_baseline,
    mlora_system_order,
    packed_microbatches,
    padded_megatron_baseline,
    padded_microbatches,
    padded_mlora_baseline,
    simulate_systems,
)
from .batch_packing import BatchPacking, pack_global_batch
from .core import (
    Job,
    Microbatch,
    PackingReport,
    SampleRef,
    Schedule,
    ScheduleError,
    earliest_next_batch_position,
    padded_tokens,
)
from .cost_model import CostModel
from .group_selection import choose_grouping
from .grouping import candidate_groupings, group_jobs
from .ordering import order_microbatches
from .packing import Packing, PackingProblem, greedy_pack, pack
from .planner import BackgroundPlanner, plan_schedule
from .simulator import SimulationResult, job_finish_times, simulate
from .verify import verify_schedule

__all__ = [
    "SYSTEMS",
    "BackgroundPlanner",
    "BatchPacking",
    "CostModel",
    "Job",
    "Microbatch",
    "Packing",
    "PackingProblem",
    "PackingReport",
    "SampleRef",
    "Schedule",
    "ScheduleError",
    "SimulationResult",
    "candidate_groupings",
    "choose_grouping",
    "earliest_next_batch_position",
    "fixed_size_microbatches",
    "greedy_pack",
    "group_jobs",
    "job_finish_times",
    "megatron_lm_baseline",
    "megatron_order",
    "mlora_evaluated_baseline",
    "mlora_evaluated_order",
    "mlora_order",
    "mlora_system_baseline",
    "mlora_system_order",
    "order_microbatches",
    "pack",
    "pack_global_batch",
    "packed_microbatches",
    "padded_megatron_baseline",
    "padded_microbatches",
    "padded_mlora_baseline",
    "padded_tokens",
    "plan_schedule",
    "simulate",
    "simulate_systems",
    "verify_schedule",
]
