"""Multi-job scheduler: grouping, packing, ordering, verification and a pipeline simulator.

Installed as lorafusion.scheduler; pure Python, independent of the kernels and the runtime.

Typical use::

    from lorafusion.scheduler import Job, plan_schedule, verify_schedule, simulate, CostModel

    jobs = [Job("sum-a", global_batch_size=64, lengths=[...]), ...]
    schedule = plan_schedule(jobs, stages=4, capacity=8192)
    verify_schedule(schedule, jobs)
    print(simulate(schedule.microbatches, stages=4, cost=CostModel.default()).tokens_per_s)
"""

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
from .grouping import group_jobs
from .ordering import order_microbatches
from .packing import Packing, greedy_pack, pack
from .planner import BackgroundPlanner, plan_schedule
from .simulator import (
    CostModel,
    SimulationResult,
    fixed_size_microbatches,
    megatron_baseline,
    megatron_order,
    mlora_baseline,
    mlora_order,
    simulate,
)
from .verify import verify_schedule

__all__ = [
    "BackgroundPlanner",
    "CostModel",
    "Job",
    "Microbatch",
    "Packing",
    "PackingReport",
    "SampleRef",
    "Schedule",
    "ScheduleError",
    "SimulationResult",
    "earliest_next_batch_position",
    "fixed_size_microbatches",
    "greedy_pack",
    "group_jobs",
    "megatron_baseline",
    "megatron_order",
    "mlora_baseline",
    "mlora_order",
    "order_microbatches",
    "pack",
    "padded_tokens",
    "plan_schedule",
    "simulate",
    "verify_schedule",
]
