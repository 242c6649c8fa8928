"""Ctrl-C during `lorafusion train`: a real SIGINT to a real process. It answers with one line
naming each job's step, its newest checkpoint and the resume command, exits 130, and leaves a run
that --resume finishes without any recovery warning, every step logged once."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from training_fixtures import config_dict


def wait_until_finished(job: str, steps: int, metrics: Path, process: subprocess.Popen, timeout_s: float = 240.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the run ended before the interrupt: {process.communicate()}")
        if metrics.is_file() and f'"job": "{job}", "step": {steps},' in metrics.read_text():
            return
        time.sleep(0.02)
    raise AssertionError(f"job {job!r} did not reach step {steps} within the time limit")


def test_sigint_stops_with_one_line_and_the_run_resumes(tmp_path):
    # Enough steps that the run is still training when the signal comes.
    data = config_dict(tmp_path, jobs=("add", "txt"), add={"max_steps": 120}, txt={"max_steps": 6}, checkpoint_every=2)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(data))
    out = Path(data["output_dir"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "lorafusion.cli", "train", str(config), "--no-progress"]

    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    wait_until_finished("txt", 6, out / "metrics.jsonl", process)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)

    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    match = re.search(r"interrupted at step (\d+)/120 of job 'add' \(checkpoints up to step (\d+)\)", lines[0])
    assert match, lines[0]
    step, checkpoint = int(match[1]), int(match[2])
    assert checkpoint <= step and checkpoint % 2 == 0
    assert "finished: 'txt'" in lines[0]
    assert f"resume with `lorafusion train {config} --resume`" in lines[0]
    assert "\x1b" not in stdout + stderr and "\r" not in stdout + stderr
    # Consistent state: the newest checkpoint complete, no temporary or empty step directory.
    newest = out / "checkpoints" / "add" / f"step-{checkpoint}"
    assert (newest / "stage-0-of-1.pt").is_file()
    for directory in (out / "checkpoints").glob("*/step-*"):
        assert any(directory.iterdir()), f"empty {directory}"
    assert not [p for p in out.rglob(".lorafusion-tmp-*")]

    resumed = subprocess.run(command + ["--resume"], capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "warning" not in resumed.stderr.lower(), resumed.stderr
    steps = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        steps.setdefault(record["job"], []).append(record["step"])
    assert steps == {"add": list(range(1, 121)), "txt": list(range(1, 7))}
    # The summary keeps this process's figures apart from the whole run's.
    summary = resumed.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"this process \(resumed\): (\d+) microbatches, (\d+) tokens in .* tokens/s\); whole run: (\d+) tokens", summary)
    assert match, summary
    assert 0 < int(match[1]) and 0 < int(match[2]) < int(match[3])
