"""What a run shows while it trains, and whether it ends with a summary.

`progress` (the trainer's argument, passed through by every engine):
    True / "auto"  tqdm bars, one per job, when stdout and stderr are both terminals; otherwise plain
                   log lines on stdout (a log file or a pipe gets no carriage returns or cursor
                   movements); then the closing summary
    "summary"      no per-step output, only the closing summary (`lorafusion train --no-progress`)
    False          nothing (library use, tests)
"""

from __future__ import annotations

import sys

# Plain log lines per job without log_every: its first and last step and about this many in between.
LOG_LINES_PER_JOB = 10


def shows_summary(progress: bool | str) -> bool:
    return progress in (True, "auto", "summary")


def _on_terminal() -> bool:
    return sys.stdout.isatty() and sys.stderr.isatty()


class Progress:
    """Per-step progress of the running jobs: `jobs` maps each to (steps done, steps in all)."""

    def __init__(self, progress: bool | str, jobs: dict[str, tuple[int, int]], log_every: int | None = None) -> None:
        self._log_every = log_every
        self._bars: dict = {}
        self._lines = False
        self._eval: dict[str, tuple[float, int]] = {}  # each job's latest eval loss and its step
        if progress not in (True, "auto") or not jobs:
            return
        if not _on_terminal():
            self._lines = True
            return
        from tqdm.auto import tqdm

        self._bars = {
            name: tqdm(total=total, initial=done, desc=f"{name:>12}", position=i, unit="step", dynamic_ncols=True)
            for i, (name, (done, total)) in enumerate(jobs.items())
        }

    def step(self, name: str, step: int, total: int, loss: float, tokens_per_s: float, eval_loss: float | None = None) -> None:
        """A job's optimizer step; `eval_loss` when the job was evaluated at it (shown from then on,
        with the step it was measured at)."""
        if eval_loss is not None:
            self._eval[name] = (eval_loss, step)
        shown_eval = self._eval.get(name)
        if name in self._bars:
            self._bars[name].update(1)
            postfix = {"loss": f"{loss:.4f}", "tok_s": f"{tokens_per_s:.0f}"}
            if shown_eval is not None:
                postfix["eval"] = f"{shown_eval[0]:.4f}@{shown_eval[1]}"
            self._bars[name].set_postfix(postfix)
        elif self._lines and (step in (1, total) or step % (self._log_every or max(1, total // LOG_LINES_PER_JOB)) == 0):
            evaluated = "" if shown_eval is None else f", eval loss {shown_eval[0]:.4f} (step {shown_eval[1]})"
            print(f"{name}: step {step}/{total}, loss {loss:.4f}{evaluated}, {tokens_per_s:.0f} tokens/s", flush=True)

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars = {}
