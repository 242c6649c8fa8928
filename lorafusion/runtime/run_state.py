"""Reading back what a run left in its output_dir, for --resume. A kill can tear the last line of
metrics.jsonl; a full disk or a bad copy can damage any file. What can be recovered is, with a
RunStateWarning saying what was dropped; what cannot raises OutputDirError naming the file and
the fault (never a bare JSON traceback)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

from .output_dir import ADAPTER_FILES, OutputDirError, read_json


class RunStateWarning(UserWarning):
    """Damaged run state that was recovered from (the message says how)."""


def warn(message: str) -> None:
    warnings.warn(message, RunStateWarning, stacklevel=3)


def status_record(run_id: str, job) -> dict:
    """status.json of a job that failed or finished (and whose adapter is then published)."""
    return {
        "run_id": run_id,
        "status": job.status,
        "failure": job.failure,
        "step": job.step,
        "num_steps": job.num_steps,
        "tokens_seen": job.tokens_seen,
        "last_loss": None if math.isnan(job.last_loss) else job.last_loss,
        "stopped_early": job.stopped_early,  # finished before its last step (early stopping)
    }


def read_status(path: Path, run_id: str) -> dict | None:
    """The status this run wrote for a job, or None: none written, an earlier run's (another
    run id), a finished one whose adapter files are gone, or a damaged one (with a warning; the
    job then continues from its checkpoints, which redoes at most the adapter's publishing)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        status = read_json(path, "job status")
    except OutputDirError as error:
        warn(f"{error}; the job's state is taken from its checkpoints instead")
        return None
    if status.get("run_id") != run_id:
        return None
    if status.get("status") == "failed":
        return status
    complete = status.get("status") == "finished" and all(
        isinstance(status.get(key), int) for key in ("step", "tokens_seen")
    )
    if not complete:
        warn(f"{path}: damaged job status (fields missing); the job's state is taken from its checkpoints instead")
        return None
    if not all((path.parent / name).is_file() for name in ADAPTER_FILES):
        return None
    return status


def read_metrics(path: Path) -> list[dict]:
    """The records of metrics.jsonl. Its last line, if damaged (a kill in the middle of an append
    tears it), is dropped with a warning; a damaged line before it raises OutputDirError."""
    lines = Path(path).read_bytes().split(b"\n")
    numbered = [(number, line) for number, line in enumerate(lines, 1) if line.strip()]
    records = []
    for position, (number, line) in enumerate(numbered):
        try:
            record = json.loads(line.decode("utf-8"))
            fault = None if isinstance(record, dict) and {"job", "step"} <= record.keys() else "not a step record"
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            fault = f"not valid JSON ({error})"
        if fault is None:
            records.append(record)
        elif position == len(numbered) - 1:
            warn(f"{path}: dropped its damaged last line {number} ({fault}), the torn end of an interrupted append")
        else:
            raise OutputDirError(f"{path}: line {number} is damaged ({fault}); remove or repair that line to resume")
    return records
