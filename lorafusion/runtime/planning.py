"""Planning microbatches for the jobs of a run: the configured scheduler policy over scheduler Jobs
(one per job: its global batch size and its samples' token counts in training order)."""

from __future__ import annotations

from lorafusion.scheduler import Job, Schedule, megatron_order, mlora_order, plan_schedule

from .config import SchedulerSpec


def plan_microbatches(jobs: list[Job], spec: SchedulerSpec, stages: int) -> Schedule:
    """The schedule of `jobs` under `spec`'s policy for `stages` pipeline positions."""
    if spec.policy == "lorafusion":
        return plan_schedule(
            jobs,
            stages=stages,
            capacity=spec.capacity,
            pad_multiple=spec.pad_multiple,
            time_limit_s=spec.time_limit_s,
            use_milp=spec.solver == "milp",
        )
    baseline_order = megatron_order if spec.policy == "megatron" else mlora_order
    microbatches = baseline_order(jobs, stages, spec.capacity)
    return Schedule(stages=stages, capacity=spec.capacity, pad_multiple=1, microbatches=microbatches)
