"""Packed microbatches: the samples the scheduler put in one microbatch, concatenated into a single
sequence with no attention across samples.

Each sample keeps its own positions (position ids restart at 0) and attends only to itself (the
runtime's packed attention, attention.py, runs per sample), so a packed sample computes exactly
what it computes alone. Consecutive samples of one job form one segment of the microbatch's
MultiLoRABatch, trained by that job's adapter.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from lorafusion.modules import MultiLoRABatch

from .data import IGNORE_INDEX, Sample


@dataclass
class PackedMicrobatch:
    input_ids: torch.Tensor  # [1, tokens]
    position_ids: torch.Tensor  # [1, tokens]
    sample_lengths: tuple[int, ...]  # tokens of each packed sample, in order
    labels: torch.Tensor  # [1, tokens], IGNORE_INDEX where no loss is taken
    sample_of_token: torch.Tensor  # [tokens] index into `jobs`
    jobs: list[str | None]  # the job of each packed sample, in order (None: a placeholder, see padding_sample)
    lora_batch: MultiLoRABatch

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]

    def model_inputs(self) -> dict:
        """Keyword arguments of a Hugging Face causal LM forward (with the packed attention)."""
        return {"input_ids": self.input_ids, "position_ids": self.position_ids, "sample_lengths": self.sample_lengths}


def padding_sample(tokens: int) -> Sample:
    """A placeholder of `tokens` tokens with no loss, packed (under job None, so no adapter) where a
    microbatch's sample is not trained this time: a job restored past it on --resume, or absent
    from a replayed schedule. The other samples keep their rows and their dropout keys."""
    return Sample(record=0, input_ids=(0,) * tokens, labels=(IGNORE_INDEX,) * tokens)


def sample_dropout_key(job: str, index: int) -> int:
    """The int64 that names the dropout masks of the sample at position `index` of job `job`'s
    training order (its visit in that epoch included): the same wherever the scheduler packs it,
    beside whichever jobs, on every engine and after a resume."""
    digest = hashlib.blake2b(f"{job}\0{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def pack_samples(
    entries: list[tuple[str | None, Sample]],
    device: torch.device | str = "cpu",
    dropout_seed: int | None = None,
    dropout_keys: list[int] | None = None,
) -> PackedMicrobatch:
    """Concatenate (job name, sample) entries into one packed microbatch; `dropout_seed` seeds the
    adapters' dropout masks and `dropout_keys` (one per entry, see sample_dropout_key) names each
    sample's (see MultiLoRABatch; None: by row). A None job name marks a placeholder."""
    if not entries:
        raise ValueError("pack_samples needs at least one sample")
    lengths = [len(sample.input_ids) for _, sample in entries]
    input_ids = torch.tensor([t for _, s in entries for t in s.input_ids], dtype=torch.long)
    labels = torch.tensor([t for _, s in entries for t in s.labels], dtype=torch.long)
    # No prediction crosses from one sample into the next: a sample's first token is never a
    # target (tokenizers without a BOS token would otherwise make it one).
    labels[torch.tensor([0, *itertools.accumulate(lengths[:-1])])] = IGNORE_INDEX
    position_ids = torch.cat([torch.arange(n) for n in lengths])
    sample_of_token = torch.repeat_interleave(torch.arange(len(entries)), torch.tensor(lengths))
    jobs = [job for job, _ in entries]
    return PackedMicrobatch(
        input_ids=input_ids[None].to(device),
        position_ids=position_ids[None].to(device),
        sample_lengths=tuple(lengths),
        labels=labels[None].to(device),
        sample_of_token=sample_of_token.to(device),
        jobs=jobs,
        lora_batch=MultiLoRABatch(
            *_job_segments(jobs, lengths),
            dropout_seed=dropout_seed,
            dropout_samples=None if dropout_keys is None else list(zip(dropout_keys, lengths)),
        ),
    )


def _job_segments(jobs: list[str | None], lengths: list[int]) -> tuple[list[str | None], list[int]]:
    """Consecutive samples of one job merged into one adapter segment (fewer, longer segments)."""
    names: list[str | None] = []
    totals: list[int] = []
    for job, length in zip(jobs, lengths):
        if names and names[-1] == job:
            totals[-1] += length
        else:
            names.append(job)
            totals.append(length)
    return names, totals


def per_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each next-token prediction, in fp32: [tokens], entry t scoring the
    prediction of token t (entry 0 and ignored labels are 0). pack_samples ignores each sample's
    first label, so no prediction crosses from one packed sample into the next."""
    logits, labels = logits[0], labels[0]
    losses = F.cross_entropy(logits[:-1].float(), labels[1:], ignore_index=IGNORE_INDEX, reduction="none")
    return torch.cat([losses.new_zeros(1), losses])
