"""Faults and launches around the pipeline engines, under torchrun (gloo, CPU): a rank that stops
answering (SIGSTOP) ends the run on the other ranks after parallel.timeout_s with one line naming
it; and a 2-node launch (two torchrun agents meeting through c10d rendezvous on 127.0.0.1) trains
the same adapters as a single process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lorafusion.runtime.config import ConfigError, parse_config
from engines.test_pipeline_training import assert_same_adapters, pipeline_config, run_single_process_on
from training_fixtures import config_dict

HERE = Path(__file__).parent


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("value", "reason"),
    [(-1, "must be > 0"), (0, "must be > 0"), (0.2, "must be >= 1"), ("soon", "must be a number"), (1e9, "must be <= 604800")],
)
def test_bad_timeout_is_refused_naming_the_key(tmp_path, value, reason):
    data = config_dict(tmp_path)
    data["parallel"] = {"engine": "megatron", "pipeline_stages": 2, "timeout_s": value}
    with pytest.raises(ConfigError) as error:
        parse_config(data, tmp_path)
    message = str(error.value)
    assert message.startswith(f"parallel.timeout_s: {reason}") and "\n" not in message, message


def test_timeout_defaults_to_ten_minutes(tmp_path):
    assert parse_config(config_dict(tmp_path), tmp_path).parallel.timeout_s == 600


def _alive(pid: int) -> bool:
    """Running or stopped; not exited (a zombie waiting for torchrun to reap it counts as exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.multiprocess
@pytest.mark.parametrize("engine", ["megatron", "deepspeed"])
def test_a_stopped_rank_is_named_and_the_others_exit(tmp_path, engine):
    timeout_s = 3
    config = pipeline_config(tmp_path, engine, "stalled")
    config["parallel"]["timeout_s"] = timeout_s
    config_path, pids, logs = tmp_path / "stalled.yaml", tmp_path / "pids", tmp_path / "logs"
    config_path.write_text(yaml.safe_dump(config))
    pids.mkdir()
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "--log-dir", str(logs), "--redirects", "3",  # each rank's output in its own files
        str(HERE / "stall_worker.py"), "1", str(pids), str(config_path), "--no-progress",
    ]
    agent = subprocess.Popen(command, env=_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stalled_pid = None
    try:
        deadline = time.monotonic() + 45
        while not (pids / "stalled").exists():
            assert agent.poll() is None and time.monotonic() < deadline, "rank 1 never reached its first backward"
            time.sleep(0.1)
        stalled_pid, stalled_at = int((pids / "stalled").read_text()), time.monotonic()
        rank0_pid = int((pids / "rank-0").read_text())

        # Rank 0 exits by itself: timeout_s, then the heartbeat check, after rank 1 stopped.
        while _alive(rank0_pid) and time.monotonic() < stalled_at + timeout_s + 20:
            time.sleep(0.1)
        waited = time.monotonic() - stalled_at
        assert not _alive(rank0_pid), f"rank 0 still waiting {waited:.0f} s after rank 1 stopped"
        assert waited >= timeout_s - 0.5
        assert _alive(stalled_pid)
        rank0_stderr = next(logs.glob("*/attempt_0/0/stderr.log")).read_text()
        assert "Traceback" not in rank0_stderr
        last_line = rank0_stderr.strip().splitlines()[-1]
        assert last_line.startswith(
            "lorafusion train: rank 1 (pipeline stage 1) stopped answering: rank 0 (pipeline stage 0) timed out"
        ), rank0_stderr[-2000:]
        assert "(parallel.timeout_s: 3)" in last_line
    finally:
        if stalled_pid is not None:
            os.kill(stalled_pid, signal.SIGKILL)
        try:
            output = agent.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:
            agent.kill()
            output = agent.communicate()[0]
    assert agent.returncode != 0
    # torchrun's summary names the first failure: rank 0's own exit status (3: a rank stopped answering).
    root_cause = output[output.index("Root Cause"):]
    assert "rank      : 0" in root_cause and "exitcode  : 3" in root_cause, output[-3000:]


@pytest.mark.multiprocess
def test_two_nodes_through_c10d_rendezvous_match_a_single_process(tmp_path):
    config = pipeline_config(tmp_path, "megatron", "two-nodes")
    config_path = tmp_path / "two-nodes.yaml"
    config_path.write_text(yaml.safe_dump(config))
    endpoint = f"127.0.0.1:{_free_port()}"
    agents = [
        subprocess.Popen(
            [
                sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                "--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
                "--rdzv-id", f"lorafusion-test-{os.getpid()}", "--local-addr", "127.0.0.1",
                "-m", "lorafusion.train", str(config_path), "--no-progress",
            ],
            env=_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for node in (0, 1)
    ]
    outputs = []
    try:
        for agent in agents:
            outputs.append(agent.communicate(timeout=180)[0])
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
    for agent, output in zip(agents, outputs):
        assert agent.returncode == 0, output[-4000:]
    run_dir = tmp_path / "two-nodes"
    assert json.loads((run_dir / "schedule.json").read_text())["stages"] == 2
    assert_same_adapters(run_dir, run_single_process_on(run_dir, tmp_path, "single"))
