"""A job's eval loss during training, and early stopping on it.

The held-out records are the job's `eval_data` (read like its `data`: same format and columns), or
`eval_fraction` of its data, split off by its seed. Every `eval_every` optimizer steps, and at its
last step, the job's adapter scores them: its mean token cross-entropy over all their target
tokens, exactly what its training loss is over a global batch, computed on the job's own packed
eval microbatches without gradients (the model in eval mode, so no LoRA dropout). With
`early_stopping_patience`, a job whose eval loss has not improved for that many evals stops, and
the adapter it publishes is the one of its best eval (also when it runs to its last step).

A single process scores the samples here (`eval_loss`); the pipeline engines run the same packed
microbatches forward through their stages once every stage has stepped the job, and share the
summed losses (engines/stage_evaluation.py), so every stage records the same evals and stops together.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from lorafusion.modules import multi_lora_batch

from .config import JobSpec
from .data import DataError, Opener, Sample, load_samples, open_binary
from .data_sources import data_digest
from .packing import PackedMicrobatch, pack_samples, per_token_loss

# Mixed into the job's seed for the eval_fraction split, so that it is not the permutation of the
# job's first epoch.
_SPLIT_SEED_OFFSET = 7_919


def job_samples(spec: JobSpec, tokenizer, opener: Opener = open_binary) -> tuple[list[Sample], list[Sample]]:
    """The job's training and held-out samples (the latter empty without eval_data or eval_fraction),
    every file opened with `opener`. Raises DataError naming the file and record of a bad one, in
    either file."""
    samples = load_samples(spec.data, spec.format, tokenizer, spec.max_seq_len, spec.columns, opener)
    if spec.eval_data is not None:
        return samples, load_samples(spec.eval_data, spec.format, tokenizer, spec.max_seq_len, spec.columns, opener)
    if spec.eval_fraction is not None:
        return split_off_eval(samples, spec.eval_fraction, spec.seed, spec.data)
    return samples, []


def job_data_digest(spec: JobSpec, opener: Opener = open_binary) -> str:
    """The job's data (and eval_data, which early stopping makes part of its result), hashed: what
    a resumed run or a restarted service checks them against."""
    digest = data_digest(spec.data, opener)
    return digest if spec.eval_data is None else f"{digest}+{data_digest(spec.eval_data, opener)}"


def split_off_eval(samples: list[Sample], fraction: float, seed: int, source) -> tuple[list[Sample], list[Sample]]:
    """(training, held-out) samples: round(fraction x records) of them, at least one, chosen by a
    permutation seeded by `seed`; both keep the file's order. The same seed gives the same split."""
    held_out = max(1, round(fraction * len(samples)))
    if held_out >= len(samples):
        raise DataError(source, None, f"eval_fraction={fraction:g} of {len(samples)} records leaves none to train on")
    generator = torch.Generator().manual_seed(seed * 1_000_003 + _SPLIT_SEED_OFFSET)
    chosen = set(torch.randperm(len(samples), generator=generator)[:held_out].tolist())
    return (
        [s for i, s in enumerate(samples) if i not in chosen],
        [s for i, s in enumerate(samples) if i in chosen],
    )


def pack_eval_microbatches(samples: list[Sample], capacity: int) -> list[list[Sample]]:
    """The samples, in order, cut into microbatches of at most `capacity` tokens (a sample longer
    than that gets one of its own)."""
    microbatches: list[list[Sample]] = []
    tokens = 0
    for sample in samples:
        if not microbatches or tokens + len(sample.input_ids) > capacity:
            microbatches.append([])
            tokens = 0
        microbatches[-1].append(sample)
        tokens += len(sample.input_ids)
    return microbatches


def pack_eval_microbatch(adapter: str, samples: list[Sample], device) -> PackedMicrobatch:
    return pack_samples([(adapter, sample) for sample in samples], device)


def summed_loss(logits: torch.Tensor, packed: PackedMicrobatch) -> float:
    """The cross-entropy of every target token of a packed eval microbatch, summed in float64."""
    return float(per_token_loss(logits, packed.labels).double().sum())


def target_tokens(microbatches: list[list[Sample]]) -> int:
    return sum(sample.num_target_tokens for samples in microbatches for sample in samples)


@contextmanager
def evaluating(model) -> Iterator[None]:
    """The model in eval mode (no LoRA dropout) without gradients, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def eval_loss(model, adapter: str, microbatches: list[list[Sample]], device) -> float:
    """Mean token cross-entropy of the samples under `adapter`: the sum over every target token of
    every microbatch, divided by their count. No gradients; the model is put in eval mode for it.
    (The pipeline engines compute the same sums through their stages: engines/stage_evaluation.py.)"""
    total = 0.0
    with evaluating(model):
        for samples in microbatches:
            packed = pack_eval_microbatch(adapter, samples, device)
            with multi_lora_batch(model, packed.lora_batch):
                total += summed_loss(model(**packed.model_inputs()).logits, packed)
    return total / target_tokens(microbatches)


class JobEvaluation:
    """When a job is evaluated, what its evals found, and whether it stops early."""

    def __init__(self, spec: JobSpec, samples: list[Sample], capacity: int) -> None:
        self.every = spec.eval_every
        self.patience = spec.early_stopping_patience
        self.microbatches = pack_eval_microbatches(samples, capacity)
        self.target_tokens = target_tokens(self.microbatches)
        self.best_loss = math.inf
        self.best_step = 0
        self.evals_since_best = 0
        # The adapter of the best eval so far, by PEFT key (kept only with early stopping).
        self.best_parameters: dict[str, torch.Tensor] | None = None
        self.stopped = False  # patience ran out: the job stops at this step

    def due(self, step: int, num_steps: int) -> bool:
        return step == num_steps or (self.every is not None and step % self.every == 0)

    def loss(self, model, adapter: str, device) -> float:
        return eval_loss(model, adapter, self.microbatches, device)

    def record(self, step: int, loss: float, parameters: dict[str, torch.Tensor]) -> bool:
        """Note the eval loss at `step` (and the adapter, when it is the best so far and early
        stopping is on); True when the job has now gone `patience` evals without improving."""
        if loss < self.best_loss:  # a NaN never improves
            self.best_loss, self.best_step, self.evals_since_best = loss, step, 0
            if self.patience is not None:
                self.best_parameters = {key: p.detach().cpu().clone() for key, p in parameters.items()}
        else:
            self.evals_since_best += 1
        self.stopped = self.patience is not None and self.evals_since_best >= self.patience
        return self.stopped

    def state_dict(self) -> dict:
        """What a checkpoint keeps, so a resumed run stops (and publishes) as an uninterrupted one."""
        return {
            "best_loss": self.best_loss,
            "best_step": self.best_step,
            "evals_since_best": self.evals_since_best,
            "best_parameters": self.best_parameters,
            "stopped": self.stopped,
        }

    def load_state_dict(self, state: dict, keys=None) -> None:
        """Continue from `state`; `keys`: the adapter parameters this process holds (a checkpoint
        merged over pipeline stages holds every stage's best adapter)."""
        self.best_loss, self.best_step = state["best_loss"], state["best_step"]
        self.evals_since_best, self.best_parameters = state["evals_since_best"], state["best_parameters"]
        if self.best_parameters is not None and keys is not None:
            self.best_parameters = {key: self.best_parameters[key] for key in keys}
        self.stopped = state["stopped"]


def published_parameters(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The adapter a finished job publishes from its last checkpoint: its best eval's under early
    stopping, else its last step's."""
    evaluation = checkpoint.get("evaluation")
    if evaluation is not None and evaluation.get("best_parameters") is not None:
        return evaluation["best_parameters"]
    return checkpoint["parameters"]
