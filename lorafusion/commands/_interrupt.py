"""Ctrl-C during `lorafusion train`: the first one stops the run between two microbatches (where
its files are as a `--stop-after` run leaves them: every write done, resumable exactly), a second
one at once; either way one line says where the run stopped and how to resume it, and the exit
status is 130 (128 + SIGINT), as for any program a shell sees killed by Ctrl-C."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import threading
from collections.abc import Iterator

EXIT_INTERRUPTED = 130


@contextlib.contextmanager
def stop_gracefully_on_interrupt(trainers: list) -> Iterator[None]:
    """While in this block, SIGINT asks the trainer in `trainers` (appended once built) to stop
    before its next microbatch; before it exists, or at the second SIGINT, KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
        yield
        return

    def on_interrupt(signum, frame) -> None:
        if trainers and not trainers[-1].stop_requested:
            trainers[-1].stop_requested = True
            return
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _checkpoint_step(trainer, job) -> int | None:
    files = trainer.latest_complete_checkpoint(job)
    return int(files[0].parent.name.removeprefix("step-")) if files else None


def interrupted_message(config_path: str, trainer=None, single_process: bool = True) -> str:
    """The one line printed on Ctrl-C: each unfinished job's step and newest complete checkpoint
    (what --resume continues from), and the command that resumes."""
    resume = f"resume with `lorafusion train {shlex.quote(config_path)} --resume`"
    if trainer is None and single_process:  # still loading data and model: nothing written yet
        return "lorafusion train: interrupted before training started"
    if trainer is None:  # a pipeline engine: no single trainer to ask
        return f"lorafusion train: interrupted; {resume}"
    where, finished = [], []
    for name, job in trainer.jobs.items():
        if job.status == "finished":
            finished.append(repr(name))
        elif job.status == "running":
            step = _checkpoint_step(trainer, job)
            saved = f"checkpoints up to step {step}" if step else "no checkpoint yet"
            where.append(f"step {job.step}/{job.num_steps} of job {name!r} ({saved})")
    finished_part = f"; finished: {', '.join(finished)}" if finished else ""
    return f"lorafusion train: interrupted at {', '.join(where) or 'the end'}{finished_part}; {resume}"


def is_reporting_rank() -> bool:
    """Under torchrun every rank gets the Ctrl-C; one line is enough."""
    return os.environ.get("RANK", "0") == "0"
