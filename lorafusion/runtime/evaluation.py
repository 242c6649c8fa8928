"""Greedy completion of prompts and exact-match accuracy: what `lorafusion generate`, `lorafusion
eval` and a training run's eval_data all use, so the three report the same completions.

A forward is a callable from token ids [batch, tokens] to logits [batch, tokens, vocab]: a plain
Hugging Face model, or the training model under one job's adapter (see `adapter_forward`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import DataError, jsonl_lines, parse_jsonl_record

Forward = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class EvalRecord:
    line: int  # 1-based line in its file
    prompt: str
    completion: str | None  # None where the file gives a prompt only


def read_prompt_file(path: str | os.PathLike, need_completion: bool) -> list[EvalRecord]:
    """Records of a JSONL file of {"prompt": ..., "completion": ...} objects (completion optional
    unless `need_completion`); blank lines skipped. DataError naming the file and line otherwise."""
    path = Path(path)
    fields = ("prompt", "completion") if need_completion else ("prompt",)
    records = []
    for number, raw_line in jsonl_lines(path):
        record = parse_jsonl_record(path, number, raw_line, fields, "a prompt file needs", optional=("completion",))
        records.append(EvalRecord(number, record["prompt"], record.get("completion")))
    return records


def greedy_completions(
    forward: Forward, tokenizer, prompts: Sequence[str], max_new_tokens: int, device="cpu", batch_size: int = 64
) -> list[str]:
    """Each prompt's greedy completion, up to its first end-of-sequence token or max_new_tokens.

    Prompts of equal token length are decoded together, so no padding (and no attention mask)
    is needed and each completion is exactly the one its prompt gets alone."""
    prefix = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    encoded = [prefix + tokenizer.encode(p) for p in prompts]
    by_length: dict[int, list[int]] = {}
    for index, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(index)
    completions = [""] * len(prompts)
    with torch.no_grad():
        for indices in by_length.values():
            for start in range(0, len(indices), batch_size):
                group = indices[start : start + batch_size]
                new = _decode(forward, torch.tensor([encoded[i] for i in group], device=device), tokenizer.eos_token_id, max_new_tokens)
                for i, ids in zip(group, new):
                    completions[i] = tokenizer.decode(ids)
    return completions


def _decode(forward: Forward, ids: torch.Tensor, eos: int, max_new_tokens: int) -> list[list[int]]:
    new = torch.empty(ids.shape[0], 0, dtype=ids.dtype, device=ids.device)
    for _ in range(max_new_tokens):
        token = forward(torch.cat([ids, new], dim=1))[:, -1].argmax(dim=-1)
        new = torch.cat([new, token[:, None]], dim=1)
        if bool((new == eos).any(dim=1).all()):
            break
    rows = new.tolist()
    return [row[: row.index(eos)] if eos in row else row for row in rows]


def exact_match(completions: Sequence[str], expected: Sequence[str]) -> float:
    """Fraction of completions equal to their expected text, character for character."""
    return sum(c == e for c, e in zip(completions, expected, strict=True)) / len(expected)


def model_forward(model) -> Forward:
    return lambda ids: model(input_ids=ids).logits


def adapter_forward(model, adapter: str) -> Forward:
    """The forward of a model holding MultiLoRALinear layers (the training model) with every token
    under `adapter`."""
    from lorafusion.modules import MultiLoRABatch, multi_lora_batch

    def forward(ids: torch.Tensor) -> torch.Tensor:
        with multi_lora_batch(model, MultiLoRABatch([adapter], [ids.numel()])):
            return model(input_ids=ids).logits

    return forward
