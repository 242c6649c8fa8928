"""Run by test_peer_timeout.py under torchrun: `python -m lorafusion.train ARGS...`, except that
global rank STALL_RANK stops itself with SIGSTOP after its first backward, as a hung process would.
Each rank writes its pid to PID_DIR/rank-<R> at start, and the stalling rank PID_DIR/stalled before
it stops (for the test to watch them and kill the stopped one).

    stall_worker.py STALL_RANK PID_DIR CONFIG.yaml [train options]
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from lorafusion import train
from lorafusion.engines.pipeline import PipelineTrainer


def main() -> int:
    stall_rank, pid_dir, rank = int(sys.argv[1]), Path(sys.argv[2]), int(os.environ["RANK"])
    _write(pid_dir / f"rank-{rank}", os.getpid())
    timed = PipelineTrainer._timed  # both engines time each forward and backward through it

    def timed_then_stall(self, kind, tokens, work):
        result = timed(self, kind, tokens, work)
        if kind == "backward" and rank == stall_rank:
            _write(pid_dir / "stalled", os.getpid())
            os.kill(os.getpid(), signal.SIGSTOP)
        return result

    PipelineTrainer._timed = timed_then_stall
    return train.main(sys.argv[3:])


def _write(path: Path, pid: int) -> None:
    """Whole or absent, for a reader polling it."""
    path.with_suffix(".tmp").write_text(str(pid))
    path.with_suffix(".tmp").rename(path)


if __name__ == "__main__":
    sys.exit(main())
