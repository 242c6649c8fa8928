"""Evaluation on a pipeline: a job's eval loss, early stopping and exact-match accuracy computed
through the stages, as the single process computes them (eval_loss.py, run_report.py).

Each stage steps a job after its own backward of the job's global batch, at its own time. The
step's eval (and its report, checkpoint or finish) waits for the next eval point, where every stage
has taken the step and no training message is in flight between neighbours: after that backward's
exchange with them (megatron) or after the window's train_batch (DeepSpeed). There the job's eval
microbatches run forward only through the stages (model in eval mode, no gradients; each replica
takes one of every D), the last stages' summed losses are added up over all ranks, and every stage
records the same eval, so all stop a job together. Which jobs are evaluated depends on the schedule
only (not on a failure one stage may not know yet). At the end of the run every rank decodes the
eval_data prompts together for the exact-match accuracy.

A mixin of PipelineTrainer: it uses the trainer's jobs, model, stage, link, device and groups.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lorafusion.modules import MultiLoRABatch, multi_lora_batch
from lorafusion.runtime.eval_loss import evaluating, pack_eval_microbatch, summed_loss
from lorafusion.runtime.job_state import JobRun
from lorafusion.runtime.run_report import eval_accuracy, scores_exact_match


class StageEvaluation:
    """The eval points and the forward-only passes of one pipeline stage."""

    def _step(self, job: JobRun, global_batch: int) -> None:
        self._completed.append((job, global_batch + 1))
        super()._step(job, global_batch)

    def after_step(self, job: JobRun) -> None:
        self._stepped.append(job)

    def count_trained(self, refs: list) -> None:
        # A job stopped early no longer counts its samples, which still flow (the schedule is fixed).
        super().count_trained([ref for ref in refs if not self.jobs[ref.job].stopped_early])

    def complete_steps(self) -> None:
        """The eval point: evaluate the jobs whose eval is due at the steps completed since the last
        one, then report and checkpoint (or finish) the steps this stage took."""
        completed, self._completed = self._completed, []
        stepped, self._stepped = self._stepped, []
        due = [(job, step) for job, step in completed if job.evaluation is not None and job.evaluation.due(step, job.num_steps)]
        losses = self._eval_losses([job for job, _ in due]) if due else {}
        for job, step in due:
            job.evaluation.record(step, losses[job.name], job.named_parameters)
        for job in stepped:
            job.step_eval_loss = losses.get(job.name)
            self.conclude_step(job)

    def _eval_losses(self, jobs: list[JobRun]) -> dict[str, float]:
        """Each job's eval loss, the same on every rank."""
        microbatches = [(job.name, samples) for job in jobs for samples in job.evaluation.microbatches]
        with evaluating(self.model):
            sums = self._forward_only(microbatches[self.replica_index :: self.num_replicas])
        totals = torch.tensor([sums.get(job.name, 0.0) for job in jobs], dtype=torch.float64, device=self.device)
        dist.all_reduce(totals)  # only the last stages' sums are not zero
        return {job.name: total / job.evaluation.target_tokens for job, total in zip(jobs, totals.tolist())}

    # ---- exact-match accuracy: greedy decoding through the stages ---------------------------------

    def _score_exact_match(self) -> None:
        """The closing summary's exact-match accuracy of each finished job with eval_data, decoded
        by every rank together at the end of the run (each replica's pipeline alike)."""
        self._accuracies = {
            name: eval_accuracy(self, name)
            for name, job in self.jobs.items()
            if scores_exact_match(job.spec) and job.status == "finished"
        }

    def exact_match_accuracy(self, name: str) -> float:
        return self._accuracies[name]

    def adapter_forward(self, name: str):
        """Greedy decoding's forward through the stages: token ids [batch, tokens] go through every
        stage under job `name`'s adapter, and the last stage's greedy next tokens are shared with the
        pipeline's ranks, as one-hot logits [batch, 1, vocab] (greedy decoding reads only the last
        position's argmax; sending the vocabulary's logits between ranks would cost far more)."""
        vocab = self.model.config.vocab_size

        def forward(ids: torch.Tensor) -> torch.Tensor:
            batch, tokens = ids.shape
            received = self.link.recv_forward((batch, tokens, self.hidden_size))
            positions = torch.arange(tokens, device=self.device)[None]
            with multi_lora_batch(self.model, MultiLoRABatch([name], [ids.numel()])):
                output = self.stage(ids if received is None else received, positions, None)
            chosen = torch.zeros(batch, dtype=torch.long, device=self.device)
            if self.is_last_stage:
                chosen = output[:, -1].argmax(dim=-1)
            else:
                self.link.send_forward(output)
            dist.all_reduce(chosen, group=self.pipeline_group)  # only the last stage's are not zero
            return torch.nn.functional.one_hot(chosen, vocab)[:, None].float()

        return forward

    def _forward_only(self, microbatches: list[tuple[str, list]]) -> dict[str, float]:
        """(job, eval samples) microbatches forward through this stage, in order; on the last stage,
        each job's summed loss (eval_loss.summed_loss, as the single process sums it)."""
        sums: dict[str, float] = {}
        for name, samples in microbatches:
            packed = pack_eval_microbatch(name, samples, self.device)
            received = self.link.recv_forward((1, packed.num_tokens, self.hidden_size))
            stage_input = packed.input_ids if received is None else received
            with multi_lora_batch(self.model, packed.lora_batch):
                output = self._timed("eval", packed.num_tokens, lambda: self.stage(stage_input, packed.position_ids, packed.sample_lengths))
            if self.is_last_stage:
                sums[name] = sums.get(name, 0.0) + summed_loss(output, packed)
            else:
                self.link.send_forward(output)
        return sums
