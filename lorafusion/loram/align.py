"""LoRAM alignment: full-parameter continued pre-training of a pruned model on a text corpus, so
that it recovers some of the knowledge pruning removed before adapters are trained on it.

It reuses the training runtime's pieces: `load_jsonl_dataset` (format "text"), its tokenizers,
`pack_samples` (several samples per step in one sequence, block-diagonal attention) and
`per_token_loss`. Each step packs samples (in a seeded shuffled order, cycling over the corpus)
up to `tokens_per_step` tokens and takes one AdamW step on the mean token loss. The model is saved
atomically (written to a temporary directory, then renamed over `output_dir`) every
`checkpoint_every` steps and at the end, with its prune map and tokenizer, so `output_dir` is a
pruned model directory that `lorafusion train` and `lorafusion loram recover` take as they are.
`output_dir` must be new or empty unless `overwrite`; even then only files lorafusion wrote there
are replaced (see lorafusion.runtime.output_dir), and it is locked while align runs.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

from lorafusion.runtime.attention import PACKED_ATTENTION
from lorafusion.runtime.data import Sample, load_jsonl_dataset
from lorafusion.runtime.output_dir import claim_model_directory, discard, publish_files, staging_directory
from lorafusion.runtime.packing import IGNORE_INDEX, pack_samples, per_token_loss
from lorafusion.runtime.tokenizer import load_tokenizer

from lorafusion.models import PruneMap, is_pruned_checkpoint, load_pruned_model, save_pruned_model


def _load_model(model_dir: Path) -> transformers.PreTrainedModel:
    if is_pruned_checkpoint(model_dir):
        return load_pruned_model(model_dir, dtype=torch.float32, attn_implementation=PACKED_ATTENTION)
    return transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, local_files_only=True, dtype=torch.float32, attn_implementation=PACKED_ATTENTION
    )


def _batches(samples: list[Sample], tokens_per_step: int, seed: int):
    """Endless lists of samples of at most tokens_per_step tokens (at least one sample each)."""
    rng = random.Random(seed)
    while True:
        order = list(range(len(samples)))
        rng.shuffle(order)
        batch, tokens = [], 0
        for index in order:
            length = len(samples[index].input_ids)
            if batch and tokens + length > tokens_per_step:
                yield batch
                batch, tokens = [], 0
            batch.append(samples[index])
            tokens += length
        if batch:
            yield batch


def _save(model: transformers.PreTrainedModel, prune_map: PruneMap | None, tokenizer, output_dir: Path) -> None:
    staging = staging_directory(output_dir)
    try:
        if prune_map is not None:
            save_pruned_model(model, prune_map, staging)
        else:
            model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        publish_files(staging, output_dir)
    finally:
        discard(staging)


def align(
    model_dir: str | os.PathLike,
    data: str | os.PathLike,
    output_dir: str | os.PathLike,
    steps: int,
    lr: float = 1e-5,
    weight_decay: float = 0.0,
    tokens_per_step: int = 4096,
    max_seq_len: int = 512,
    tokenizer: str | os.PathLike | None = None,
    checkpoint_every: int = 100,
    seed: int = 0,
    device: torch.device | str = "cpu",
    log: Callable[[int, float], None] | None = None,
    overwrite: bool = False,
) -> list[float]:
    """Continue pre-training the (pruned) model in `model_dir` on the JSONL corpus `data`
    ({"text": ...} records) for `steps` AdamW steps, all parameters trained in fp32; save it to
    `output_dir`. tokenizer: a tokenizer directory, default the model directory's own if it holds
    one, else the byte tokenizer. `log(step, loss)` is called after every step. Returns the losses."""
    for name, value, minimum in (("steps", steps, 1), ("tokens_per_step", tokens_per_step, 1), ("max_seq_len", max_seq_len, 2),
                                 ("checkpoint_every", checkpoint_every, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    model_dir, output_dir = Path(model_dir), Path(output_dir)
    expected = tuple(p.name for p in model_dir.glob("*") if p.is_file() and not p.name.startswith("."))
    with claim_model_directory(output_dir, overwrite, expected):  # locked while align writes there
        if tokenizer is None:
            try:
                tokenizer_model = load_tokenizer(model_dir)
            except ValueError:  # the model directory has no tokenizer
                tokenizer_model = load_tokenizer(None)
        else:
            tokenizer_model = load_tokenizer(tokenizer)
        samples = load_jsonl_dataset(data, "text", tokenizer_model, max_seq_len)
        if not samples:
            raise ValueError(f"{data} holds no records")
        prune_map = PruneMap.load(model_dir) if is_pruned_checkpoint(model_dir) else None
        torch.manual_seed(seed)
        model = _load_model(model_dir).to(device).train()
        model.config.use_cache = False
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        losses = []
        batches = _batches(samples, tokens_per_step, seed)
        for step in range(1, steps + 1):
            packed = pack_samples([("align", sample) for sample in next(batches)], device)
            logits = model(**packed.model_inputs()).logits
            targets = (packed.labels[0, 1:] != IGNORE_INDEX).sum().clamp(min=1)
            loss = per_token_loss(logits, packed.labels).sum() / targets
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if log is not None:
                log(step, losses[-1])
            if step % checkpoint_every == 0 or step == steps:
                _save(model, prune_map, tokenizer_model, output_dir)
        return losses
