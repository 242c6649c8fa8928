"""The loop that trains the microbatches a planner hands it: several jobs' adapters on one frozen
base model, their samples packed together.

A microbatch's loss is, per job, the sum of its tokens' cross-entropy divided by the number of
target tokens in that job's whole global batch, so when the global batch's last microbatch is done
the job's gradient is that of its mean token loss over the global batch, exactly as if it had
trained alone; then (and only then) the job steps (job_state.JobRun).

Two drivers use it: the offline trainer (trainer.MultiJobTrainer: every job known at the start,
one planned schedule) and the service (lorafusion.service: jobs come and go between planning
windows). A driver sets `model`, `device`, `jobs`, `checkpoints` (a CheckpointStore),
`checkpoint_every`, and `schedule`, whose microbatches `pack` reads by position; it may override
the hooks `_write_status`, `_log_step` and `publish_adapter`.

The pipeline engines (lorafusion.engines) run the same loop on one stage each, through this
interface: they override `setup_stage`, `owned_lora_modules`, `reduce_gradients`,
`save_checkpoint`, `fail_job`, `count_trained` and `after_step` (a job's eval runs through every
stage once all have stepped it), set `stage_index`, `num_stages`, `publishes_when_finished`, and
call `live_refs`, `pack`, `job_losses`, `count_trained`, `conclude_step` and `fail_job`.
"""

from __future__ import annotations

import math

import torch

from lorafusion.lora_state import multi_lora_modules
from lorafusion.adapters import adapter_key
from lorafusion.modules import multi_lora_batch
from lorafusion.scheduler import Schedule

from .checkpoints import CheckpointStore
from .job_state import JobRun
from .packing import PackedMicrobatch, pack_samples, padding_sample, per_token_loss, sample_dropout_key


class TrainingLoop:
    """Trains microbatches of `jobs`; see the module docstring for what a driver provides."""

    model: torch.nn.Module
    device: torch.device
    jobs: dict[str, JobRun]
    checkpoints: CheckpointStore
    checkpoint_every: int | None = None
    schedule: Schedule  # the microbatches being trained, by position
    # Every microbatch's dropout seed (each layer mixes in its own offset; each sample its key).
    dropout_seed_base: int = 0

    # ---- pipeline stage (a single process is stage 0 of 1) --------------------------------------

    stage_index = 0
    num_stages = 1
    # A single process has every stage's weights when a job finishes; a pipeline publishes after
    # all stages have written their last checkpoint.
    publishes_when_finished = True

    @property
    def is_last_stage(self) -> bool:
        return self.stage_index == self.num_stages - 1

    @property
    def is_reporter(self) -> bool:
        """The one process that logs, shows progress and writes statuses: the last stage (of the
        first data-parallel replica), where the losses are."""
        return self.is_last_stage

    def setup_stage(self) -> None:
        """Pipeline engines cut the model here, after the adapters are on (so names and initial
        values do not depend on the stage layout)."""

    def owned_lora_modules(self) -> dict:
        """The MultiLoRALinear layers this process trains, by full module name."""
        return multi_lora_modules(self.model)

    def prepare_job(self, job: JobRun) -> None:
        """The job's order, global batches, optimizer and LR schedule over its adapter's
        parameters in this process's layers."""
        job.prepare({
            adapter_key(module_name, matrix): getattr(layer, matrix)[job.name]
            for module_name, layer in self.owned_lora_modules().items()
            if job.name in layer.adapters
            for matrix in ("lora_A", "lora_B")
        })

    # ---- one microbatch -------------------------------------------------------------------------

    def live_refs(self, microbatch) -> list:
        """The microbatch's samples still to train: of known, running jobs, in global batches not
        already done (after a resume)."""
        return [
            ref
            for ref in microbatch.samples
            if ref.job in self.jobs
            and self.jobs[ref.job].status == "running"
            and self.jobs[ref.job].remaining[ref.global_batch] > 0
        ]

    def pack(self, position: int, refs: list) -> PackedMicrobatch:
        """The samples of microbatch `position`, packed, with a placeholder for each of its samples
        not in `refs`. A sample's dropout masks depend only on the run's seed, the layer and the
        sample's job and place in that job's training order (packing.sample_dropout_key), so a job
        draws the same masks alone or beside others, in the offline run and the service, on every
        pipeline engine and after a resume: the RNG state a checkpoint would otherwise keep."""
        trained = set(refs)
        entries, keys = [], []
        for ref in self.schedule.microbatches[position].samples:
            if ref in trained:
                entries.append((ref.job, self.jobs[ref.job].sample_at(ref.index)))
                keys.append(sample_dropout_key(ref.job, ref.index))
            else:
                entries.append((None, padding_sample(ref.tokens)))
                keys.append(0)
        seed = self.dropout_seed_base % (2**31 - 1)
        return pack_samples(entries, self.device, dropout_seed=seed, dropout_keys=keys)

    def _run_microbatch(self, position: int, refs: list) -> None:
        # Every operation is per token or per sample (packed attention, per-segment adapters), so a
        # job's non-finite values stay in its own rows and gradients: it fails at its step, and the
        # others' losses go on. Nothing is read back here: a read per microbatch would make the host
        # wait for the device's queue to drain before it could queue the next microbatch.
        losses = self._forward(position, refs)
        sum(losses.values()).backward()
        for name, loss in losses.items():
            self.jobs[name].add_loss(loss)
        self.count_trained([ref for ref in refs if self.jobs[ref.job].status == "running"])

    def _forward(self, position: int, refs: list) -> dict[str, torch.Tensor]:
        """Each job's share of the microbatch loss (token cross-entropy sum / its global batch's target tokens)."""
        packed = self.pack(position, refs)
        with multi_lora_batch(self.model, packed.lora_batch):
            logits = self.model(**packed.model_inputs()).logits
        return self.job_losses(packed, per_token_loss(logits, packed.labels), refs)

    def job_losses(self, packed: PackedMicrobatch, token_losses: torch.Tensor, refs: list) -> dict[str, torch.Tensor]:
        names = list(dict.fromkeys(packed.jobs))
        job_of_sample = torch.tensor([names.index(j) for j in packed.jobs], device=token_losses.device)
        sums = token_losses.new_zeros(len(names)).index_add(0, job_of_sample[packed.sample_of_token], token_losses)
        batch_of_job = {ref.job: ref.global_batch for ref in refs}
        return {
            name: sums[i] / self.jobs[name].target_tokens[batch_of_job[name]]
            for i, name in enumerate(names)
            if name is not None  # placeholders carry no loss
        }

    def count_trained(self, refs: list) -> None:
        """Book the samples as trained (their gradients are in); step each job whose global batch
        this completes."""
        for ref in refs:
            job = self.jobs[ref.job]
            job.batch_tokens += ref.tokens
            job.tokens_seen += ref.tokens
            job.remaining[ref.global_batch] -= 1
            if job.remaining[ref.global_batch] == 0:
                self._step(job, ref.global_batch)

    # ---- a job's step ---------------------------------------------------------------------------

    def _read_back_loss(self, job: JobRun, global_batch: int) -> None:
        """Add the loss summed on the device to batch_loss (one read per job step); a non-finite one
        fails the job, as its gradients and its metrics would be meaningless."""
        loss = job.take_pending_loss()
        if loss is None:
            return
        if not math.isfinite(loss):
            self.fail_job(job, f"non-finite loss ({loss}) in global batch {global_batch}")
            return
        job.batch_loss += loss

    def reduce_gradients(self, job: JobRun) -> None:
        """Data-parallel engines sum the job's gradients (and its loss) over replicas here."""

    def _step(self, job: JobRun, global_batch: int) -> None:
        self._read_back_loss(job, global_batch)
        self.reduce_gradients(job)  # first: data-parallel replicas all take part, and may report a failure
        if job.status in ("failed", "cancelled"):  # a pipeline still carries a failed job's samples; it never steps again
            job.optimizer.zero_grad(set_to_none=True)
            return
        if global_batch != job.step:
            raise RuntimeError(f"job {job.name!r}: global batch {global_batch} completed before batch {job.step} (schedule out of order)")
        failure = job.optimizer_step()
        if failure is not None:
            self.fail_job(job, failure)
            return
        job.step += 1
        job.last_loss = job.batch_loss
        self.after_step(job)

    def after_step(self, job: JobRun) -> None:
        """Evaluate, report and checkpoint the step the job has just taken. A pipeline engine defers
        this until every stage has taken the step (the eval runs through all of them)."""
        self._evaluate(job)
        self.conclude_step(job)

    def conclude_step(self, job: JobRun) -> None:
        """Report the job's step (with its eval loss, if evaluated), then checkpoint it, or finish
        the job at its last step or an early stop. A non-finite eval loss fails the job, as a
        non-finite training loss does (its adapter diverged; early stopping would publish it)."""
        if job.step_eval_loss is not None and not math.isfinite(job.step_eval_loss):
            self.fail_job(job, f"non-finite eval loss ({job.step_eval_loss}) at step {job.step}")
            return
        if self.is_reporter:
            self._log_step(job)
        job.batch_loss, job.batch_tokens = 0.0, 0
        every = self.checkpoint_every
        if job.step == job.num_steps or job.stopped_early:
            job.status = "finished"
            self.save_checkpoint(job)
            job.hold_best_adapter()
            if self.publishes_when_finished:
                self.publish_adapter(job)
        elif every and job.step % every == 0:
            self.save_checkpoint(job)

    def _evaluate(self, job: JobRun) -> None:
        """The job's eval loss when an eval is due at its step (eval_loss.py), into step_eval_loss;
        it may stop the job early."""
        job.step_eval_loss = None
        if job.evaluation is not None and job.evaluation.due(job.step, job.num_steps):
            job.step_eval_loss = job.evaluation.loss(self.model, job.name, self.device)
            job.evaluation.record(job.step, job.step_eval_loss, job.named_parameters)

    def fail_job(self, job: JobRun, reason: str) -> None:
        job.fail(reason)
        self._write_status(job)

    def save_checkpoint(self, job: JobRun) -> None:
        self.checkpoints.save(job)

    # ---- driver hooks ---------------------------------------------------------------------------

    def _write_status(self, job: JobRun) -> None:
        """Record that the job failed or finished (its adapter published)."""

    def _log_step(self, job: JobRun) -> None:
        """Report a job's optimizer step (its loss is job.batch_loss, its tokens job.batch_tokens)."""

    def publish_adapter(self, job: JobRun):
        """Write the finished job's adapter."""
        raise NotImplementedError
