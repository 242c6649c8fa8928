"""Packed microbatches: the samples the scheduler put in one microbatch, concatenated into a single
sequence with no attention across samples.

Each sample keeps its own positions (position ids restart at 0) and attends only to itself through
a block-diagonal causal mask, so a packed sample computes exactly what it computes alone. Each
sample is one segment of the microbatch's MultiLoRABatch, trained by its job's adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from lorafusion.modules import MultiLoRABatch

from .data import Sample

IGNORE_INDEX = -100


@dataclass
class PackedMicrobatch:
    input_ids: torch.Tensor  # [1, tokens]
    position_ids: torch.Tensor  # [1, tokens]
    attention_mask: torch.Tensor  # [1, 1, tokens, tokens] bool, True = may attend
    labels: torch.Tensor  # [1, tokens], IGNORE_INDEX where no loss is taken
    sample_of_token: torch.Tensor  # [tokens] index into `jobs`
    jobs: list[str]  # the job of each packed sample, in order
    lora_batch: MultiLoRABatch

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]


def pack_samples(entries: list[tuple[str, Sample]], device: torch.device | str = "cpu") -> PackedMicrobatch:
    """Concatenate (job name, sample) entries into one packed microbatch."""
    if not entries:
        raise ValueError("pack_samples needs at least one sample")
    lengths = [len(sample.input_ids) for _, sample in entries]
    input_ids = torch.tensor([t for _, s in entries for t in s.input_ids], dtype=torch.long)
    labels = torch.tensor([t for _, s in entries for t in s.labels], dtype=torch.long)
    position_ids = torch.cat([torch.arange(n) for n in lengths])
    sample_of_token = torch.repeat_interleave(torch.arange(len(entries)), torch.tensor(lengths))
    causal = position_ids[:, None] >= position_ids[None, :]
    same_sample = sample_of_token[:, None] == sample_of_token[None, :]
    return PackedMicrobatch(
        input_ids=input_ids[None].to(device),
        position_ids=position_ids[None].to(device),
        attention_mask=(causal & same_sample)[None, None].to(device),
        labels=labels[None].to(device),
        sample_of_token=sample_of_token.to(device),
        jobs=[job for job, _ in entries],
        lora_batch=MultiLoRABatch([job for job, _ in entries], lengths),
    )


def per_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each next-token prediction, in fp32: [tokens], entry t scoring the
    prediction of token t (entry 0 and ignored labels are 0). A sample's first label is ignored,
    so no prediction crosses from one packed sample into the next."""
    logits, labels = logits[0], labels[0]
    losses = F.cross_entropy(logits[:-1].float(), labels[1:], ignore_index=IGNORE_INDEX, reduction="none")
    return torch.cat([losses.new_zeros(1), losses])
