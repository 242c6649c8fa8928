"""A tiny service for the tests: the 2-layer model and jobs of training_fixtures, run in this
process (a thread trains, the HTTP server answers on a free port) and driven over real HTTP."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from lorafusion.runtime.config import parse_config
from lorafusion.runtime.data import Sample
from lorafusion.runtime.job_state import JobRun
from lorafusion.runtime.trainer import MultiJobTrainer
from lorafusion.service.client import ServiceClient
from lorafusion.service.config import parse_server_config
from lorafusion.service.server import Service
from lorafusion.service.store import TERMINAL_STATES
from training_fixtures import TINY_MODEL, config_dict, make_config


def tiny_model(quantize: str | None = None) -> dict:
    """The tiny model's section, its base weights in NF4 with quantize="nf4"."""
    return TINY_MODEL if quantize is None else {**TINY_MODEL, "quantize": quantize}


def server_dict(tmp_path: Path, quantize: str | None = None, **overrides) -> dict:
    """SERVER.yaml's mapping: the tiny model (model.quantize: `quantize`), jobs' data under tmp_path/data."""
    (tmp_path / "data").mkdir(exist_ok=True)
    return {
        "model": tiny_model(quantize),
        "scheduler": {"capacity": 96, "solver": "greedy"},
        "backend": "torch",
        "checkpoint_every": 2,
        "state_dir": str(tmp_path / "state"),
        "data_roots": [str(tmp_path / "data")],
        "port": 0,
        "window_batches": 2,
        **overrides,
    }


def job_entry(tmp_path: Path, name: str, like: str | None = None, **overrides) -> dict:
    """The training fixtures' job `like` ("add", "rev", "txt"; default `name`) named `name`, its
    data under tmp_path/data."""
    data_dir = tmp_path / "data"
    data_dir.mkdir(exist_ok=True)
    entry = config_dict(data_dir, jobs=(like or name,))["jobs"][0]
    return {**entry, "name": name, **overrides}


def alone_adapter(tmp_path: Path, entry: dict, quantize: str | None = None) -> dict[str, torch.Tensor]:
    """The adapter `lorafusion train` gives for the job trained alone (model.quantize: `quantize`)."""
    config = parse_config(
        {"model": tiny_model(quantize), "jobs": [entry], "scheduler": {"capacity": 96, "solver": "greedy"},
         "output_dir": str(tmp_path / f"alone-{entry['name']}"), "backend": "torch"},
        base_dir=tmp_path,
    )
    result = MultiJobTrainer(config, progress=False).train()
    assert result.jobs[entry["name"]].status == "finished"
    return load_file(config.output_dir / entry["name"] / "adapter_model.safetensors")


def service_adapter(state_dir: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(state_dir / "adapters" / name / "adapter_model.safetensors")


def assert_adapters_close(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=atol, msg=key)


def wait_for(predicate, timeout_s: float = 120.0, what: str = "the condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


class RunningService:
    """`with RunningService(config_dict) as service:` a started service and its client;
    `microbatch_delay_s` slows each microbatch so that a test can act mid-run."""

    def __init__(self, data: dict, base_dir: Path, microbatch_delay_s: float = 0.0, token: str | None = None):
        self.config = parse_server_config(data, base_dir)
        self.delay, self.token = microbatch_delay_s, token

    def __enter__(self) -> RunningService:
        self.service = Service.start(self.config, device="cpu")
        if self.delay:
            run_microbatch = self.service.trainer._run_microbatch

            def slowed(position, refs):
                time.sleep(self.delay)
                run_microbatch(position, refs)

            self.service.trainer._run_microbatch = slowed
        self.thread = threading.Thread(target=self.service.train_until_stopped, daemon=True)
        self.thread.start()
        self.client = ServiceClient(self.service.url, self.token or self.config.token, timeout_s=60)
        return self

    def state(self, name: str) -> dict:
        return self.client.job(name)

    def wait_ended(self, *names: str, timeout_s: float = 120.0) -> dict[str, dict]:
        wait_for(lambda: all(self.state(n)["state"] in TERMINAL_STATES for n in names), timeout_s, f"jobs {names} to end")
        return {n: self.state(n) for n in names}

    def __exit__(self, *exc_info) -> None:
        self.service.trainer.stop_requested.set()
        self.thread.join(timeout=60)


# ---- `lorafusion serve` as a real subprocess, for kill -9 ----------------------------------------


# `lorafusion serve` with each microbatch slowed by DELAY seconds, so that a test can kill it mid-run.
_SLOWED_SERVE = (
    "import sys, time\n"
    "from lorafusion.service.trainer import ServiceTrainer\n"
    "run_microbatch = ServiceTrainer._run_microbatch\n"
    "def slowed(self, *args):\n"
    "    time.sleep(DELAY)\n"
    "    run_microbatch(self, *args)\n"
    "ServiceTrainer._run_microbatch = slowed\n"
    "from lorafusion.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def start_serve(config_path, log_path, microbatch_delay_s: float = 0.0) -> tuple[subprocess.Popen, ServiceClient]:
    """`lorafusion serve CONFIG` in a subprocess (stderr appended to `log_path`) and its client."""
    program = ["-c", _SLOWED_SERVE.replace("DELAY", repr(microbatch_delay_s))] if microbatch_delay_s else ["-m", "lorafusion.cli"]
    process = subprocess.Popen(
        [sys.executable, *program, "serve", str(config_path), "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=open(log_path, "a"), text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    line = process.stdout.readline()
    assert "listening on" in line, (line, log_path.read_text()[-3000:])
    return process, ServiceClient(line.split("listening on ")[1].split()[0], timeout_s=60)


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def kill_9(process: subprocess.Popen) -> None:
    """SIGKILL the service; its planner worker must not outlive it."""
    workers = children(process.pid)
    assert workers  # the planner worker (started with the service) and multiprocessing's resource tracker
    process.send_signal(signal.SIGKILL)
    process.wait()
    wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), 30, "the planner worker to end")


def window_jobs(tmp_path: Path) -> dict[str, JobRun]:
    """Two prepared jobs for planning-window tests: add, 30 samples of 3-9 tokens in batches of 8
    (4 steps); rev, 17 in batches of 6 (3 steps)."""
    specs = make_config(tmp_path, jobs=("add", "rev")).jobs
    runs = {}
    for spec, count in zip(specs, (30, 17)):
        run = JobRun(dataclasses.replace(spec, max_steps=None, epochs=1.0), samples=[
            Sample(i + 1, tuple(range(3 + i % 7)), (-100, *range(1, 3 + i % 7))) for i in range(count)
        ])  # fmt: skip
        run.prepare({})
        runs[spec.name] = run
    return runs
