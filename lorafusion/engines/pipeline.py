"""Multi-job 1F1B pipeline training: one process per pipeline stage, the scheduler's microbatches
flowing through the stages with no flush between global batches.

Every rank holds the same schedule (planned once, broadcast), so each stage knows every
microbatch's token count and segment metadata without sending them: activations travel with the
exact shape of their microbatch, and each stage rebuilds the packed metadata (positions, mask,
adapter segments) from the schedule. After the backward of a job's last microbatch of a global
batch, each stage steps that job's adapters in its own layers. The scheduler keeps a job's next
global batch at least S microbatches after its previous one, which is exactly what 1F1B needs for
that batch's first forward, on every stage, to come after the previous batch's step there.

No-op microbatches (inserted by the scheduler where no job may go) keep their pipeline slot with
an empty activation, so the positions the scheduler reasoned about are the ones executed. So do
microbatches with nothing left to train: those of jobs restored past them on --resume, or of jobs
absent when a schedule is replayed. A resumed run therefore executes the very positions of an
uninterrupted one, only with fewer samples in them.

A job whose loss, gradients or parameters become non-finite stops, and the others go on, as in
the single-process runtime. A stage learns of a failure where it happens (the last stage from the
job's loss, any stage from its gradients or parameters at a step) and tells its neighbours: every
activation and gradient sent between stages carries a flag per job in extra rows. Data-parallel
replicas combine their flags in the reduction at each job step, and all ranks once more at the
end, so a failed job is never stepped again once a stage knows, is reported, and is not published.
Its samples still flow through the stages (the schedule is fixed); they no longer count.

A job's evals (eval loss, early stopping, exact-match accuracy) run through the stages at points
where every stage has stepped it: see stage_evaluation.py.

The communication is abstract (`StageLink`): the megatron-core engine provides it with megatron's
P2PCommunicator; see megatron_engine.py.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist

from lorafusion.modules import multi_lora_batch
from lorafusion.runtime.job_state import JobRun
from lorafusion.runtime.output_dir import PIPELINE_STATS_DIR, write_atomically
from lorafusion.runtime.packing import per_token_loss
from lorafusion.runtime.trainer import MultiJobTrainer, TrainResult
from lorafusion.scheduler import Schedule

from .stage_evaluation import StageEvaluation
from .stages import split_model


class StageLink(Protocol):
    """Point-to-point exchange with the neighbouring stages (megatron's P2PCommunicator calls)."""

    def recv_forward(self, shape: tuple[int, ...]) -> torch.Tensor | None: ...
    def send_forward(self, tensor: torch.Tensor | None) -> None: ...
    def send_forward_recv_backward(self, tensor: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor | None: ...
    def send_backward_recv_forward(self, grad: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor | None: ...
    def recv_backward(self, shape: tuple[int, ...]) -> torch.Tensor | None: ...
    def send_backward(self, grad: torch.Tensor | None) -> None: ...


@dataclass
class _InFlight:
    """A microbatch forwarded on this stage and waiting for its backward."""

    position: int
    refs: list
    stage_input: torch.Tensor | None
    stage_output: torch.Tensor | None  # the loss on the last stage


class PipelineTrainer(StageEvaluation, MultiJobTrainer):
    """MultiJobTrainer on one stage of an S-stage pipeline (torch.distributed must be initialised);
    its jobs' evals run through the stages (stage_evaluation.py)."""

    publishes_when_finished = False

    def __init__(
        self,
        config,
        link_factory,
        stage_index: int,
        device=None,
        progress: bool = True,
        replica_index: int = 0,
        data_parallel_group=None,
        peer_watch=None,
    ):
        self.num_stages = config.parallel.pipeline_stages
        self.peer_watch = peer_watch  # liveness.PeerWatch: the link names the peer of each transfer to it
        self.stage_index = stage_index
        self.num_replicas = config.parallel.data_parallel
        self.replica_index = replica_index
        self.data_parallel_group = data_parallel_group
        self._link_factory = link_factory
        self._chunk_refs: dict[int, list] = {}
        self._completed: list[tuple[JobRun, int]] = []  # (job, step) of the batches completed since the last eval point
        self._stepped: list[JobRun] = []  # the jobs this stage stepped since then, to report and checkpoint
        self._accuracies: dict[str, float] = {}
        super().__init__(config, device=device, progress=progress)

    # ---- data parallelism: D replicas of the pipeline, each taking one microbatch of every D ----
    #
    # The schedule is planned for S x D pipeline positions, then cut into chunks of D consecutive
    # microbatches; replica r runs the r-th of each chunk. Two dependent microbatches S x D
    # positions apart are then S chunks apart, which is what each replica's 1F1B needs; every
    # replica counts the whole chunk towards its jobs' global batches, so all replicas step a job
    # at the same point of their pipelines and sum its gradients there.

    @property
    def is_reporter(self) -> bool:
        return self.is_last_stage and self.replica_index == 0

    @property
    def planning_stages(self) -> int:
        return self.num_stages * self.num_replicas

    def reduce_gradients(self, job: JobRun) -> None:
        if self.num_replicas == 1:
            return
        params = list(job.named_parameters.values())
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        # The loss and a failure flag travel in the same all-reduce: each replica's last stage holds
        # its share of the loss, and any replica may have found non-finite values.
        extra = torch.tensor([job.batch_loss, float(job.status == "failed")], dtype=torch.float64, device=self.device)
        flat = torch.cat([g.reshape(-1).to(torch.float64) for g in grads] + [extra])
        dist.all_reduce(flat, group=self.data_parallel_group)
        offset = 0
        for param, grad in zip(params, grads):
            param.grad = flat[offset : offset + grad.numel()].view_as(grad).to(grad.dtype)
            offset += grad.numel()
        job.batch_loss = float(flat[-2])
        if flat[-1] > 0:
            self.fail_job(job, "non-finite values on another data-parallel replica")

    def save_checkpoint(self, job: JobRun) -> None:
        if self.replica_index == 0:  # the replicas hold the same adapters
            super().save_checkpoint(job)

    # ---- the stage ------------------------------------------------------------------------------

    def setup_stage(self) -> None:
        stages = split_model(self.model, self.num_stages, self.config.parallel.stage_layers)
        self.stage = stages[self.stage_index]
        kept = {id(p) for p in self.stage.parameters()}
        # Other stages' modules go to the meta device (structure and names stay, memory goes);
        # a module sharing a parameter with this stage (tied embeddings) stays.
        for other in stages:
            if other is self.stage:
                continue
            for module in (other.embed_tokens, other.norm, other.lm_head, *other.layers):
                if module is not None and not any(id(p) in kept for p in module.parameters()):
                    module.to("meta")
        self._stage_lora = {id(m) for m in self.stage.modules()}
        self.hidden_size = self.model.config.hidden_size
        self.pipeline_dtype = next(p for p in self.stage.parameters()).dtype
        self.link: StageLink = self._link_factory(self)

    def owned_lora_modules(self) -> dict:
        return {name: m for name, m in super().owned_lora_modules().items() if id(m) in self._stage_lora}

    # ---- run-level set-up: one writer, the same schedule everywhere -----------------------------

    def prepare_run(self, resume: bool, schedule: Schedule | None) -> Schedule:
        """Global rank 0 (where Hugging Face's save_pretrained writes) sets up the run's files and
        plans; every rank gets the schedule (or the error, so that all ranks stop with the same
        message instead of waiting on each other)."""
        payload: list = [None]
        if dist.get_rank() == 0:
            try:
                payload[0] = super().prepare_run(resume, schedule)
            except Exception as error:  # noqa: BLE001 - re-raised on every rank below
                # A ValueError (a refused output_dir, changed data, ...) stays one: the CLI prints it in one line.
                payload[0] = (ValueError if isinstance(error, ValueError) else RuntimeError)(str(error))
        dist.broadcast_object_list(payload, src=0)
        if isinstance(payload[0], Exception):
            raise payload[0]
        return payload[0]

    @property
    def pipeline_group(self):
        return self.link.group

    # ---- 1F1B -----------------------------------------------------------------------------------

    def train(self, resume: bool = False, stop_after_microbatches: int | None = None, schedule: Schedule | None = None) -> TrainResult:
        try:
            return self._train(resume, stop_after_microbatches, schedule)
        finally:
            # Also when stopped early: a process may start another run on the same output_dir
            # while DeepSpeed still holds this trainer.
            self.release_output_dir()

    def _train(self, resume: bool, stop_after_microbatches: int | None, schedule: Schedule | None) -> TrainResult:
        schedule = self.begin(resume, schedule)
        slots, busy = [], []
        microbatches = schedule.microbatches
        for start in range(0, len(microbatches), self.num_replicas):
            chunk = microbatches[start : start + self.num_replicas]
            chunk_refs = [self.live_refs(microbatch) for microbatch in chunk]
            position = start + self.replica_index
            slots.append((position, chunk_refs[self.replica_index] if self.replica_index < len(chunk) else []))
            busy.append(any(chunk_refs))  # the same on every replica: all run the same slots
            self._chunk_refs[position] = [ref for refs in chunk_refs for ref in refs]
        slots, run = _slots_to_run(slots, busy, stop_after_microbatches)
        self._compute_log: list[tuple[str, int, float]] = []
        loop_started = time.perf_counter()
        try:
            self._one_forward_one_backward(slots)
        finally:
            self._close_progress()
        if self.replica_index == 0:
            self._write_stage_stats(time.perf_counter() - loop_started)
        self._share_failures()
        if stop_after_microbatches is not None:
            return self._result(run, interrupted=True)
        self._score_exact_match()
        if self.is_reporter:
            for job in self.jobs.values():
                if job.status == "finished":
                    self.publish_adapter(job)
        dist.barrier()
        return self.finish(run)

    def _timed(self, kind: str, tokens: int, work):
        """Run `work`, logging its compute time on this stage (for the measured bubble fraction)."""
        started = time.perf_counter()
        result = work()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._compute_log.append((kind, tokens, time.perf_counter() - started))
        return result

    def _write_stage_stats(self, wall_s: float) -> None:
        """output_dir/pipeline_stats/stage-<s>.json: the loop's wall time and each forward and
        backward's compute time on this stage; 1 - busy / wall, over stages, is the bubble."""
        stats = {
            "stage": self.stage_index,
            "stages": self.num_stages,
            "wall_s": wall_s,
            "busy_s": sum(seconds for _, _, seconds in self._compute_log),
            "compute": self._compute_log,
        }
        write_atomically(self.output_dir / PIPELINE_STATS_DIR / f"stage-{self.stage_index}.json", json.dumps(stats), root=self.output_dir)

    def _shape(self, slot) -> tuple[int, int, int]:
        # A tuple: megatron's combined send/recv calls take a list as a list of shapes.
        position, refs = slot
        # A microbatch with samples to train is packed whole, placeholders included (see pack).
        tokens = sum(ref.tokens for ref in self.schedule.microbatches[position].samples) if refs else 0
        return (1, tokens, self.hidden_size)

    def _one_forward_one_backward(self, slots: list) -> None:
        """Megatron's non-interleaved 1F1B order over the whole run: S - s - 1 warm-up forwards,
        then one forward and one backward at a time, then the remaining backwards."""
        total = len(slots)
        warmup = min(self.num_stages - self.stage_index - 1, total)
        in_flight: deque[_InFlight] = deque()
        link = self.link
        forward, backward = self._timed_forward, self._timed_backward
        flagged, unflagged = self._with_flags, self._without_flags
        for i in range(warmup):
            stage_input = unflagged(link.recv_forward(self._wire_shape(slots[i])))
            link.send_forward(flagged(forward(slots[i], stage_input, in_flight)))
        steady = total - warmup
        stage_input = unflagged(link.recv_forward(self._wire_shape(slots[warmup]))) if steady > 0 else None
        # The eval point after the k-th backward: stage s has sent its gradient to stage s - 1 and
        # received the forward stage s - 1 sent before that backward, so the eval's forwards are the
        # next messages on every link.
        for k in range(steady):
            output = forward(slots[warmup + k], stage_input, in_flight)
            output_grad = unflagged(link.send_forward_recv_backward(flagged(output), self._wire_shape(slots[k])))
            input_grad = backward(in_flight.popleft(), output_grad)
            if k == steady - 1:
                link.send_backward(flagged(input_grad))
            else:
                stage_input = unflagged(
                    link.send_backward_recv_forward(flagged(input_grad), self._wire_shape(slots[warmup + k + 1]))
                )
            self.complete_steps()
        for k in range(steady, total):
            output_grad = unflagged(link.recv_backward(self._wire_shape(slots[k])))
            link.send_backward(flagged(backward(in_flight.popleft(), output_grad)))
            self.complete_steps()

    # ---- failure flags between stages ------------------------------------------------------------

    @property
    def _flag_rows(self) -> int:
        return -(-len(self.jobs) // self.hidden_size)

    def _wire_shape(self, slot) -> tuple[int, int, int]:
        """What travels between stages for `slot`: its activations (or gradients) plus the flag rows."""
        return (1, self._shape(slot)[1] + self._flag_rows, self.hidden_size)

    def _with_flags(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        if tensor is None:
            return None
        flags = torch.zeros(self._flag_rows * self.hidden_size, dtype=tensor.dtype, device=tensor.device)
        flags[: len(self.jobs)] = torch.tensor([float(job.status == "failed") for job in self.jobs.values()])
        return torch.cat([tensor, flags.view(1, self._flag_rows, self.hidden_size)], dim=1)

    def _without_flags(self, received: torch.Tensor | None) -> torch.Tensor | None:
        if received is None:
            return None
        tokens = received.shape[1] - self._flag_rows
        for flag, job in zip(received[0, tokens:].reshape(-1).tolist(), self.jobs.values()):
            if flag > 0:
                self.fail_job(job, "non-finite values on another pipeline stage")
        return received[:, :tokens].detach()

    def _share_failures(self) -> None:
        """After the loop (no message in flight): every rank learns every failure."""
        flags = torch.tensor([float(job.status == "failed") for job in self.jobs.values()], device=self.device)
        dist.all_reduce(flags)
        for flag, job in zip(flags.tolist(), self.jobs.values()):
            if flag > 0:
                self.fail_job(job, "non-finite values on another rank")

    def _timed_forward(self, slot, stage_input, in_flight):
        tokens = self._shape(slot)[1]
        return self._timed("forward", tokens, lambda: self._forward(slot, stage_input, in_flight))

    def _timed_backward(self, item: _InFlight, output_grad):
        tokens = sum(ref.tokens for ref in item.refs)
        return self._timed("backward", tokens, lambda: self._backward(item, output_grad))

    def _forward(self, slot, stage_input: torch.Tensor | None, in_flight: deque) -> torch.Tensor | None:
        position, refs = slot
        if not refs:  # a no-op keeps its slot with an empty activation
            empty = torch.zeros(self._shape(slot), dtype=self.pipeline_dtype, device=self.device)
            in_flight.append(_InFlight(position, refs, stage_input, None))
            return None if self.is_last_stage else empty
        packed = self.pack(position, refs)
        if stage_input is None:
            stage_input = packed.input_ids
        else:
            stage_input.requires_grad_()
        with multi_lora_batch(self.model, packed.lora_batch):
            output = self.stage(stage_input, packed.position_ids, packed.sample_lengths)
        if self.is_last_stage:
            losses = self.job_losses(packed, per_token_loss(output, packed.labels), refs)
            kept = []
            for name, loss in losses.items():
                job = self.jobs[name]
                if job.status == "running" and not torch.isfinite(loss):
                    self.fail_job(job, f"non-finite loss ({loss.item()}) at microbatch {position}")
                if job.status != "running":
                    continue  # failed or stopped early: its tokens still flow; their loss no longer counts
                job.batch_loss += loss.item()
                kept.append(loss)
            output = sum(kept) if kept else None
        in_flight.append(_InFlight(position, refs, stage_input if stage_input.is_floating_point() else None, output))
        return None if self.is_last_stage else output

    def _backward(self, item: _InFlight, output_grad: torch.Tensor | None) -> torch.Tensor | None:
        if not item.refs:
            input_grad = None if item.stage_input is None else torch.zeros_like(item.stage_input)
        else:
            if self.is_last_stage:
                if item.stage_output is not None:  # None: every job of the microbatch has failed
                    item.stage_output.backward()
            elif item.stage_output.requires_grad:  # else no adapter of these jobs on this (first) stage
                torch.autograd.backward(item.stage_output, grad_tensors=output_grad)
            input_grad = None
            if item.stage_input is not None:
                input_grad = item.stage_input.grad if item.stage_input.grad is not None else torch.zeros_like(item.stage_input)
        # The whole chunk counts (all replicas' samples), so every replica steps at the same point.
        self.count_trained(self._chunk_refs.get(item.position, item.refs))
        return input_grad

    def fail_job(self, job: JobRun, reason: str) -> None:
        if job.status == "failed":
            return
        print(f"lorafusion train: job {job.name!r} stopped on stage {self.stage_index}: {reason}", file=sys.stderr)
        super().fail_job(job, reason)


def _slots_to_run(slots: list, busy: list[bool], stop_after: int | None) -> tuple[list, int]:
    """The slots from the first with samples left to train (after a resume) to the last, or to the
    `stop_after`-th such slot; and how many of them have samples.

    Empty slots in between stay, as empty activations: the scheduler keeps a job's dependent
    global batches S positions apart, and dropping a slot between them (a job already trained,
    or absent from a replayed schedule) would run the next batch's forward before the previous
    batch's step. Dropping slots before the first busy one shifts every later slot alike."""
    busy_slots = [index for index, flag in enumerate(busy) if flag]
    if stop_after is not None:
        busy_slots = busy_slots[: max(stop_after, 0)]
    if not busy_slots:
        return [], 0
    return slots[busy_slots[0] : busy_slots[-1] + 1], len(busy_slots)


def local_device_and_backend() -> tuple[torch.device, str]:
    """This process's device and collective backend under torchrun: its GPU (LOCAL_RANK) with
    NCCL, or the CPU with gloo."""
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cuda", torch.cuda.current_device()), "nccl"
    return torch.device("cpu"), "gloo"


def check_world(config, world_size: int, supports_data_parallel: bool = True) -> None:
    """The process count must be pipeline_stages x data_parallel; say so before any communication."""
    stages, replicas = config.parallel.pipeline_stages, config.parallel.data_parallel
    if world_size != stages * replicas:
        raise ValueError(
            f"parallel.pipeline_stages={stages} x parallel.data_parallel={replicas} = {stages * replicas} "
            f"processes are needed, but {world_size} were started (torchrun --nproc_per_node {stages * replicas})"
        )
    if replicas != 1 and not supports_data_parallel:
        raise ValueError(
            f"parallel.data_parallel={replicas}: the {config.parallel.engine} engine runs one pipeline "
            "replica; use data_parallel: 1, or engine: megatron"
        )

