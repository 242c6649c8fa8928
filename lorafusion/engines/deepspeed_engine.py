"""The DeepSpeed engine: the multi-job runtime on `deepspeed.pipe.PipelineModule` and
`PipelineEngine.train_batch`, for users standardised on DeepSpeed. Launch:
torchrun --nproc_per_node S -m lorafusion.train CONFIG.yaml (NCCL on GPUs, gloo on CPU).

Everything job-related is PipelineTrainer's (pipeline.py): the schedule broadcast from rank 0, the
data, each job's AdamW and LR schedule, its loss normalised over its global batch, stage
checkpoints, metrics on the last stage, the final adapters. Only the execution differs:

- Layers. The PipelineModule has exactly one item per stage (a LayerSpec of `_StageLayer`, built
  only on its own rank) with partition_method="uniform", so DeepSpeed's partition is ours and the
  stage checkpoints are interchangeable with the megatron engine's and the single process's.
- Metadata. Every rank holds the same schedule; the activation tuple carries the microbatch's
  schedule position (hidden states first, then a one-element int64 tensor: DeepSpeed reuses its
  receive buffers by tuple index whatever the dtype, so the order must not vary), and each stage
  rebuilds positions, sample boundaries and adapter segments from it. dynamic_shape=True
  makes DeepSpeed send each activation's shape, so microbatches keep their exact token counts.
- Windows. train_batch() runs gradient_accumulation_steps microbatches, flushes the pipeline, then
  makes ONE optimizer step. The schedule is therefore cut into windows ending where some job's
  global batch completes; each window is one train_batch() with gradient_accumulation_steps set to
  its length, and the engine's optimizer (`_WindowOptimizer`) steps exactly the jobs whose global
  batch completed, with their own AdamW and LR schedule. Jobs still mid-batch keep their
  accumulated gradients: they are set aside during the step (DeepSpeed then clears every gradient
  of the module) and put back after the window.
- Loss scaling. DeepSpeed divides the last stage's loss by gradient_accumulation_steps before the
  backward; the stage multiplies it by the window length first, so each job's gradient is that of
  its own global-batch mean token loss, as in the single-process runtime.
- DeepSpeed's defaults stay out of the numbers: its gradient clipping (1.0 by default, over all of
  a stage's jobs at once) is off, its data-parallel all-reduce is skipped (one replica), and
  train_batch() does not switch the model's training mode (dropout acts as in the other engines).
- No-op microbatches are not run: they exist to keep a job's batches apart in a pipeline that is
  never flushed, and DeepSpeed flushes at every window.
- Non-finite values stop the run on every rank with the same message: the last stage records a
  non-finite loss, every stage checks its gradients (and its parameters after a step), and at the
  end of each window's step all stages exchange what they found.

Limitation: the flush at every window (wherever any job steps) means one job's next global batch
never overlaps another job's tail in the pipeline as it does in the megatron engine. The numbers are
the same; the bubbles are larger.
"""

from __future__ import annotations

import datetime
import logging
import os

import torch
import torch.distributed as dist
from torch import nn

from lorafusion.modules import multi_lora_batch
from lorafusion.runtime.eval_loss import pack_eval_microbatch, summed_loss
from lorafusion.runtime.packing import per_token_loss

from .liveness import process_groups, set_group_timeouts, watching_peers
from .pipeline import PipelineTrainer, check_world, local_device_and_backend

# train_batch() prints its loss every `steps_per_print` windows; the runtime logs per job instead.
_NEVER = 2**62


class _StageLayer(nn.Module):
    """The PipelineModule item of one pipeline stage: the trainer's DecoderStage for this rank."""

    def __init__(self, trainer: DeepSpeedPipelineTrainer, stage_index: int):
        super().__init__()
        if stage_index != trainer.stage_index:
            raise RuntimeError(
                f"DeepSpeed placed pipeline stage {stage_index} on the process of stage {trainer.stage_index}; "
                "the engine expects one PipelineModule item per stage, partitioned uniformly"
            )
        self.stage = trainer.stage
        self._run = trainer.stage_forward

    def forward(self, inputs):
        return self._run(inputs)

    def train(self, mode: bool = True):
        # train_batch() switches the module to training mode; the runtime's model keeps the mode it
        # was built in, as in the other engines (so dropout acts, or not, the same everywhere).
        return self


class _WindowOptimizer(torch.optim.Optimizer):
    """The engine's optimizer: at the end of a window, steps the jobs whose global batch completed
    there (each with its own AdamW and LR schedule) and nothing else."""

    def __init__(self, trainer: DeepSpeedPipelineTrainer, params: list[torch.nn.Parameter]):
        super().__init__(params, defaults={"lr": 0.0})
        self.trainer = trainer

    @torch.no_grad()
    def step(self, closure=None):
        self.trainer.end_window()

    def zero_grad(self, set_to_none: bool = True):
        # Each job's gradients are cleared by its own optimizer when it steps; mid-batch jobs keep theirs.
        pass


class _ForwardLink:
    """Forwards between neighbouring stages outside DeepSpeed's schedules (the end of the run's
    greedy decoding: see PipelineTrainer.adapter_forward). Stage s is rank s (one replica)."""

    def __init__(self, trainer: DeepSpeedPipelineTrainer):
        self.stage, self.last = trainer.stage_index, trainer.is_last_stage
        self.dtype, self.device = trainer.pipeline_dtype, trainer.device

    def recv_forward(self, shape):
        if self.stage == 0:
            return None
        received = torch.empty(shape, dtype=self.dtype, device=self.device)
        dist.recv(received, src=self.stage - 1)
        return received

    def send_forward(self, tensor):
        if not self.last:
            dist.send(tensor.contiguous(), dst=self.stage + 1)


class DeepSpeedPipelineTrainer(PipelineTrainer):
    """PipelineTrainer whose execution is DeepSpeed's PipelineEngine, one train_batch() per window."""

    def __init__(self, config, stage_index: int, device=None, progress: bool = True, peer_watch=None):
        super().__init__(
            config, link_factory=_ForwardLink, stage_index=stage_index, device=device, progress=progress,
            peer_watch=peer_watch,
        )
        self.engine = None
        self._window: list = []
        self._window_refs: dict[int, list] = {}
        self._instructions_run: dict[str, int] = {}
        self._set_aside: dict[torch.nn.Parameter, torch.Tensor] = {}
        self._non_finite: str | None = None
        # While eval_batch() runs: the (job, eval samples) microbatches, and each job's summed loss.
        self._eval_microbatches: list | None = None
        self._eval_sums: dict[str, float] = {}

    @property
    def pipeline_group(self):
        # check_world admits data_parallel == 1 only, so the pipeline is the whole world.
        return dist.group.WORLD

    def _build_engine(self):
        import deepspeed
        from deepspeed.pipe import LayerSpec, PipelineModule

        module = PipelineModule(
            layers=[LayerSpec(_StageLayer, self, index) for index in range(self.num_stages)],
            num_stages=self.num_stages,
            partition_method="uniform",
            activation_checkpoint_interval=0,  # each forward runs once, in microbatch order
            dynamic_shape=True,
        )
        params = [p for job in self.jobs.values() for p in job.named_parameters.values()]
        # A stage no job's adapters reach still needs an optimizer for DeepSpeed to call.
        optimizer = _WindowOptimizer(self, params or [torch.nn.Parameter(torch.zeros(0))])
        existing_groups = process_groups()
        engine, *_ = deepspeed.initialize(
            model=module,
            optimizer=optimizer,
            config={
                "train_micro_batch_size_per_gpu": 1,
                "gradient_accumulation_steps": 1,
                "steps_per_print": _NEVER,
                "zero_optimization": {"stage": 0},
                # DeepSpeed clips to 1.0 by default, over all of a stage's jobs at once: each job's
                # update must see its own unclipped gradient, as in the single-process runtime.
                "gradient_clipping": 0.0,
                "pipeline": {"activation_checkpoint_interval": 0},
            },
        )
        # DeepSpeed's groups (the pipeline's point-to-point pairs among them) get torch's default timeout.
        set_group_timeouts(self.config.parallel.timeout_s, process_groups() - existing_groups)
        if engine.stage_id != self.stage_index:
            raise RuntimeError(f"DeepSpeed made process {dist.get_rank()} stage {engine.stage_id}, not {self.stage_index}")
        # With one data-parallel replica there is nothing to all-reduce.
        engine.pipeline_enable_backward_allreduce = False
        engine._INSTRUCTION_MAP = self._timed_instructions(type(engine)._INSTRUCTION_MAP)
        return engine

    def _timed_instructions(self, instruction_map: dict) -> dict:
        """DeepSpeed's instruction map with this stage's forwards, backwards and optimizer steps
        timed into the stage statistics (pipeline_stats/, as the other engine logs them). The engine
        reads the map per instruction (`_exec_schedule`, DeepSpeed 0.19), so an instance copy takes
        effect. A stage runs a window's forwards, and its backwards, in microbatch order
        (DeepSpeed's TrainSchedule), which gives each timing its microbatch."""
        from deepspeed.runtime.pipe import schedule

        timed = dict(instruction_map)
        for instruction, kind in (
            (schedule.ForwardPass, "forward"),
            (schedule.BackwardPass, "backward"),
            (schedule.OptimizerStep, "step"),
        ):
            timed[instruction] = self._timed_instruction(kind, instruction_map[instruction])
        return timed

    def _timed_instruction(self, kind: str, execute):
        def run(engine, **kwargs):
            logged = kind
            if kind == "step":
                tokens = 0
            elif self._eval_microbatches is not None:  # eval_batch(): forwards only
                logged, index = "eval", self._instructions_run["eval"]
                self._instructions_run["eval"] += 1
                tokens = sum(len(sample.input_ids) for sample in self._eval_microbatches[index][1])
            else:
                index = self._instructions_run[kind]
                self._instructions_run[kind] += 1
                tokens = sum(ref.tokens for ref in self._window[index][1])
            return self._timed(logged, tokens, lambda: execute(engine, **kwargs))

        return run

    # ---- execution ------------------------------------------------------------------------------

    def _one_forward_one_backward(self, slots: list) -> None:
        """One train_batch() (DeepSpeed's 1F1B, then a flush and the step) per window."""
        windows = self._windows([(position, refs) for position, refs in slots if refs])
        if not windows:
            return
        self.engine = self.engine or self._build_engine()
        for window in windows:
            # A job stopped early (at an earlier window's eval) trains no more: its samples become placeholders.
            window = [(position, live) for position, refs in window if (live := [r for r in refs if not self.jobs[r.job].stopped_early])]
            if not window:
                continue
            self._window, self._window_refs = window, dict(window)
            self._instructions_run = {"forward": 0, "backward": 0}
            self.engine.set_train_batch_size(len(window))
            # The first stage reads the inputs, the last the labels: both are the position.
            batches = [(torch.tensor([position]), torch.tensor([position])) for position, _ in window]
            self.engine.train_batch(iter(batches))
            for param, grad in self._set_aside.items():
                param.grad = grad
            self._set_aside.clear()
            self.complete_steps()  # the pipeline is flushed: every stage has stepped the window's jobs

    def _forward_only(self, microbatches: list[tuple[str, list]]) -> dict[str, float]:
        """The eval microbatches through DeepSpeed's eval_batch() (its forward-only schedule), each
        named by a negative position; the last stage sums each job's loss as it goes."""
        if not microbatches:
            return {}
        self.engine = self.engine or self._build_engine()
        self._eval_microbatches, self._eval_sums = microbatches, {}
        self._instructions_run = {"eval": 0}
        try:
            batches = [(torch.tensor([-1 - index]), torch.tensor([-1 - index])) for index in range(len(microbatches))]
            self.engine.eval_batch(
                iter(batches), compute_loss=False, reduce_output=None, bcast_loss=False, num_micro_batches=len(batches)
            )
        finally:
            self._eval_microbatches = None
        return self._eval_sums

    def _windows(self, slots: list) -> list[list]:
        """Consecutive slots, cut after each slot that completes some job's global batch."""
        remaining = {name: list(job.remaining) for name, job in self.jobs.items()}
        windows, current = [], []
        for slot in slots:
            current.append(slot)
            completes = False
            for ref in slot[1]:
                remaining[ref.job][ref.global_batch] -= 1
                completes |= remaining[ref.job][ref.global_batch] == 0
            if completes:
                windows.append(current)
                current = []
        if current:  # a run stopped early ends mid-batch
            windows.append(current)
        return windows

    def stage_forward(self, inputs):
        """This stage's forward of one microbatch: (position) on the first stage, else (hidden,
        position); returns (hidden, position), or on the last stage the loss DeepSpeed backpropagates."""
        if self.stage_index == 0:
            stage_input, position_tensor = None, inputs
        else:
            stage_input, position_tensor = inputs
        position = int(position_tensor.item())
        if position < 0:
            return self._eval_forward(stage_input, position_tensor, -1 - position)
        refs = self._window_refs[position]
        packed = self.pack(position, refs)
        with multi_lora_batch(self.model, packed.lora_batch):
            output = self.stage(packed.input_ids if stage_input is None else stage_input, packed.position_ids, packed.sample_lengths)
        if not self.is_last_stage:
            if not output.requires_grad:
                # No adapter of this microbatch's jobs on the first stage: DeepSpeed still runs a backward here.
                output.requires_grad_()
            return output, position_tensor
        losses = self.job_losses(packed, per_token_loss(output, packed.labels), refs)
        for name, loss in losses.items():
            if not torch.isfinite(loss) and self._non_finite is None:
                self._non_finite = f"job {name!r}: non-finite loss ({loss.item()}) at microbatch {position}"
            self.jobs[name].batch_loss += loss.item()
        # DeepSpeed divides by gradient_accumulation_steps (the window length) before the backward.
        return sum(losses.values()) * len(self._window)

    def _eval_forward(self, stage_input, position_tensor, index: int):
        name, samples = self._eval_microbatches[index]
        packed = pack_eval_microbatch(name, samples, self.device)
        with multi_lora_batch(self.model, packed.lora_batch):
            output = self.stage(packed.input_ids if stage_input is None else stage_input, packed.position_ids, packed.sample_lengths)
        if not self.is_last_stage:
            return output, position_tensor
        total = summed_loss(output, packed)
        self._eval_sums[name] = self._eval_sums.get(name, 0.0) + total
        return torch.tensor(total)

    def end_window(self) -> None:
        """The engine's optimizer step: count the window's samples, step the jobs whose global batch
        completed, and set the other jobs' gradients aside until the next window. Every stage then
        learns what any stage found non-finite (a loss on the last stage; gradients, or parameters
        after a step, anywhere), and all raise the same error rather than wait on each other."""
        found = self._non_finite or self._non_finite_gradients()
        if found is None:
            try:
                self._count_window_and_step()
            except _NonFiniteValues as error:
                found = str(error)
        reports: list = [None] * self.num_stages
        dist.all_gather_object(reports, found, group=self.pipeline_group)
        first = next((report for report in reports if report is not None), None)
        if first is not None:
            raise RuntimeError(
                f"{first}; the pipeline engines stop the run on non-finite values "
                "(the single-process runtime isolates the job)"
            )
        for job in self.jobs.values():
            for param in job.named_parameters.values():
                if param.grad is not None:
                    self._set_aside[param] = param.grad
                    param.grad = None

    def _count_window_and_step(self) -> None:
        for _, refs in self._window:
            self.count_trained(refs)

    def _non_finite_gradients(self) -> str | None:
        for job in self.jobs.values():
            if any(p.grad is not None and not torch.isfinite(p.grad).all() for p in job.named_parameters.values()):
                return f"job {job.name!r}: non-finite gradient before step {job.step + 1}"
        return None

    def fail_job(self, job, reason: str) -> None:
        raise _NonFiniteValues(f"job {job.name!r}: {reason}")


class _NonFiniteValues(Exception):
    """A stage found non-finite values while stepping; end_window reports it to every stage."""


def train_with_deepspeed(config, resume: bool = False, stop_after_microbatches: int | None = None, progress: bool = True):
    """Run `config` on the processes torchrun started, one pipeline stage each."""
    check_world(config, int(os.environ.get("WORLD_SIZE", "1")), supports_data_parallel=False)
    import deepspeed
    from deepspeed.utils import logger as deepspeed_logger

    deepspeed_logger.setLevel(logging.WARNING)
    device, backend = local_device_and_backend()
    owns_group = not dist.is_initialized()
    deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=config.parallel.timeout_s))
    try:
        # DeepSpeed's point-to-point calls are its own: a timeout names the stalled rank from the
        # heartbeats only.
        with watching_peers(config.parallel.timeout_s, f"pipeline stage {dist.get_rank()}") as watch:
            trainer = DeepSpeedPipelineTrainer(config, dist.get_rank(), device=device, progress=progress, peer_watch=watch)
            return trainer.train(resume=resume, stop_after_microbatches=stop_after_microbatches)
    finally:
        if owns_group:
            dist.destroy_process_group()
