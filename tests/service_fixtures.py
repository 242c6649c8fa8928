"""A tiny service for the tests: the 2-layer model and jobs of training_fixtures, run in this
process (a thread trains, the HTTP server answers on a free port) and driven over real HTTP."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from lorafusion.runtime.config import parse_config
from lorafusion.runtime.trainer import MultiJobTrainer
from lorafusion.service.client import ServiceClient
from lorafusion.service.config import parse_server_config
from lorafusion.service.server import Service
from training_fixtures import TINY_MODEL, config_dict


def server_dict(tmp_path: Path, **overrides) -> dict:
    """SERVER.yaml's mapping: the tiny model, jobs' data under tmp_path/data."""
    (tmp_path / "data").mkdir(exist_ok=True)
    return {
        "model": TINY_MODEL,
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


def alone_adapter(tmp_path: Path, entry: dict) -> dict[str, torch.Tensor]:
    """The adapter `lorafusion train` gives for the job trained alone."""
    config = parse_config(
        {"model": TINY_MODEL, "jobs": [entry], "scheduler": {"capacity": 96, "solver": "greedy"},
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
        ended = ("finished", "failed", "cancelled")
        wait_for(lambda: all(self.state(n)["state"] in ended for n in names), timeout_s, f"jobs {names} to end")
        return {n: self.state(n) for n in names}

    def __exit__(self, *exc_info) -> None:
        self.service.trainer.stop_requested.set()
        self.thread.join(timeout=60)
