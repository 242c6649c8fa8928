"""What a run tells the user about each job beyond its losses: samples cut by max_seq_len (warned
at the start, counted at the end), the first and last loss, the eval loss of its published adapter,
exact-match accuracy on the job's eval_data, and its throughput."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from .output_dir import METRICS_FILE
from .run_state import read_metrics


def truncated_samples(samples) -> int:
    """Samples cut by max_seq_len (data.py and chat.py mark them)."""
    return sum(1 for s in samples if s.truncated)


def warn_truncated(trainer) -> None:
    """One line at the start of a run naming each job that has samples cut by max_seq_len: their
    completions (or texts) lose their ends, and the model never learns to stop."""
    cut = {name: truncated_samples(job.samples) for name, job in trainer.jobs.items()}
    parts = [
        f"{name} {count} of {len(trainer.jobs[name].samples)} (max_seq_len={trainer.jobs[name].spec.max_seq_len})"
        for name, count in cut.items()
        if count
    ]
    if parts:
        print(f"lorafusion train: warning: samples truncated by max_seq_len: {'; '.join(parts)}", file=sys.stderr)


def logged_metrics(output_dir: Path) -> list[dict]:
    """metrics.jsonl's records (which a resumed run keeps), none before a first step."""
    path = Path(output_dir) / METRICS_FILE
    return read_metrics(path) if path.is_file() else []


def first_losses(records: list[dict]) -> dict[str, float]:
    """Each job's loss at its first step, from metrics.jsonl's records."""
    first: dict[str, float] = {}
    for record in records:
        if record.get("step") == 1:
            first.setdefault(record["job"], record["loss"])
    return first


def published_eval_losses(records: list[dict], jobs: dict) -> dict[str, float]:
    """The eval loss of each job's published adapter, from metrics.jsonl's records (so a resumed run
    reports the same): its best eval's under early stopping, else its last eval's (at its last step)."""
    losses: dict[str, list[float]] = {}
    for record in records:
        if "eval_loss" in record:
            losses.setdefault(record["job"], []).append(record["eval_loss"])
    found = {}
    for name, values in losses.items():
        under_patience = name in jobs and jobs[name].spec.early_stopping_patience is not None
        finite = [value for value in values if math.isfinite(value)]
        found[name] = min(finite, default=math.nan) if under_patience else values[-1]
    return found


def scores_exact_match(spec) -> bool:
    """Whether the closing summary gives the job's exact-match accuracy (see eval_accuracy)."""
    return spec.eval_data is not None and spec.format == "prompt_completion"


def eval_accuracy(trainer, name: str) -> float:
    """Exact-match accuracy of the job's adapter, greedy and stopping at the end-of-sequence
    token, on its eval_data (prompt_completion jobs; any dataset kind, under the job's columns): the
    same completions `lorafusion eval` gives with the saved adapter. Decoded by the trainer's
    adapter_forward (on a pipeline, every rank of it takes part)."""
    from .data_sources import read_records
    from .eval_loss import evaluating
    from .evaluation import exact_match, greedy_completions

    spec = trainer.jobs[name].spec
    records = [record.fields for record in read_records(spec.eval_data, "prompt_completion", spec.columns)]
    tokenizer = trainer.tokenizer
    # A completion longer than every expected one is wrong whatever follows, so decoding stops there.
    longest = max(len(tokenizer.encode(r["completion"])) for r in records) + 1
    with evaluating(trainer.model):
        forward = trainer.adapter_forward(name)
        completions = greedy_completions(forward, tokenizer, [r["prompt"] for r in records], longest, trainer.device)
    return exact_match(completions, [r["completion"] for r in records])


def add_job_report(trainer, result) -> None:
    """Fill each job's first loss, truncated samples, tokens/s and (for finished jobs with
    eval_data) eval accuracy into `result`."""
    records = logged_metrics(trainer.output_dir)
    first = first_losses(records)
    evaluated = published_eval_losses(records, trainer.jobs)
    for name, summary in result.jobs.items():
        job = trainer.jobs[name]
        summary.first_loss = first.get(name, math.nan)
        summary.truncated = truncated_samples(job.samples)
        ran = job.tokens_seen - trainer._tokens_at_start.get(name, 0)
        summary.tokens_per_s = ran / max(result.elapsed_s, 1e-9)
        if job.status == "finished":
            summary.eval_loss = evaluated.get(name)
        if scores_exact_match(job.spec) and job.status == "finished":
            summary.eval_accuracy = trainer.exact_match_accuracy(name)


def job_rows(result) -> list[str]:
    """The closing summary's table: one row per job."""
    rows = [f"\n{'job':>14}  {'status':>8}  {'steps':>9}  {'loss first -> last':>18}  {'eval loss':>9}  {'eval acc':>8}  {'truncated':>9}  {'tokens':>9}  {'tokens/s':>8}  output"]
    for name, job in result.jobs.items():
        where = str(job.adapter_dir) if job.adapter_dir else (job.failure or "")
        accuracy = "-" if job.eval_accuracy is None else f"{job.eval_accuracy:.1%}"
        eval_loss = "-" if job.eval_loss is None else f"{job.eval_loss:.4f}"
        loss = f"{job.first_loss:.4f} -> {job.final_loss:.4f}"
        rows.append(
            f"{name:>14}  {job.status:>8}  {job.steps:>4}/{job.num_steps:<4}  {loss:>18}  {eval_loss:>9}  {accuracy:>8}  "
            f"{job.truncated:>9}  {job.tokens:9d}  {job.tokens_per_s:8.0f}  {where}"
        )
    return rows
