"""Submitted jobs with held-out records (eval_data, or eval_fraction of their data): their eval
losses at every eval_every steps equal those of `lorafusion train` of the job alone, to fp32
tolerance, whatever trains beside them; early stopping stops the job alone and publishes its best
eval's adapter; eval_data obeys the data roots like data. The eval losses are in the job's metrics
(GET /jobs/NAME/metrics), its log lines and `lorafusion jobs`."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from lorafusion.commands.jobs import job_table
from lorafusion.service.client import ServiceError
from service_fixtures import (
    RunningService,
    alone_adapter,
    assert_adapters_close,
    job_entry,
    kill_9,
    server_dict,
    service_adapter,
    start_serve,
    wait_for,
)

# add's eval loss is lowest at step 4 (a checkpoint, with checkpoint_every 2), then rises: it stops at step 6 of 10.
EARLY_STOPPING = {"eval_fraction": 0.2, "eval_every": 1, "early_stopping_patience": 2, "max_steps": 10, "lr": 0.03,
                  "lr_schedule": "constant", "lora_dropout": 0.0}


def alone_eval_losses(tmp_path: Path, entry: dict) -> tuple[dict, dict[int, float]]:
    """The adapter and the eval losses by step of `lorafusion train` of the job alone."""
    adapter = alone_adapter(tmp_path, entry)
    records = [json.loads(line) for line in (tmp_path / f"alone-{entry['name']}" / "metrics.jsonl").read_text().splitlines()]
    return adapter, {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}


def eval_losses(metrics: list[dict]) -> dict[int, float]:
    return {r["step"]: r["eval_loss"] for r in metrics if "eval_loss" in r}


def assert_same_eval_losses(got: dict[int, float], expected: dict[int, float]) -> None:
    assert list(got) == list(expected)
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step


def test_submitted_jobs_evaluate_and_stop_early_as_training_alone(tmp_path):
    add = job_entry(tmp_path, "add", **EARLY_STOPPING)
    held_out = tmp_path / "data" / "rev_eval.jsonl"
    held_out.write_text("".join((tmp_path / "data" / "rev.jsonl").read_text().splitlines(keepends=True)[:7]))
    rev = job_entry(tmp_path, "rev", eval_data=str(held_out), eval_every=2, lora_dropout=0.0)
    with RunningService(server_dict(tmp_path, admission="all_live"), tmp_path, microbatch_delay_s=0.02) as service:
        service.client.submit(add)
        wait_for(lambda: service.state("add")["step"] >= 1, what="add's first step")
        service.client.submit(rev)  # joins while add trains: they share windows
        ended = service.wait_ended("add", "rev")
        metrics = {name: service.client.metrics(name) for name in ("add", "rev")}
        logs = [line["line"] for line in service.client.logs("add")]
        table = job_table(service.client.jobs())
    assert {name: (job["state"], job["step"]) for name, job in ended.items()} == {"add": ("finished", 6), "rev": ("finished", 5)}
    for entry in (add, rev):
        adapter, expected = alone_eval_losses(tmp_path, entry)
        assert_same_eval_losses(eval_losses(metrics[entry["name"]]), expected)
        # With early stopping, the adapter of the best eval (step 4), as training alone publishes.
        assert_adapters_close(service_adapter(tmp_path / "state", entry["name"]), adapter)
    assert list(eval_losses(metrics["rev"])) == [2, 4, 5]  # every eval_every steps and at the last
    assert [r["step"] for r in metrics["add"]] == [1, 2, 3, 4, 5, 6]
    best = min(eval_losses(metrics["add"]).values())
    assert "stopped early at step 6: no better eval loss in 2 evals" in logs
    assert f"the adapter is that of its best eval: step 4, eval_loss {best:.6f}" in logs
    assert any(line.startswith("step 4/10 loss ") and f" eval_loss {best:.6f} " in line for line in logs), logs
    assert table[0].split()[:5] == ["job", "state", "step", "loss", "eval_loss"]
    assert table[1].split()[4] == f"{metrics['add'][-1]['eval_loss']:.4f}"


def test_eval_data_is_checked_as_data_is(tmp_path):
    outside = tmp_path / "secret.jsonl"
    outside.write_text('{"prompt": "a", "completion": "b"}\n')
    broken = tmp_path / "data" / "broken.jsonl"
    broken.parent.mkdir()
    broken.write_text('{"prompt": "1+1=", "completion": "2"}\n{"prompt": "x"}\n')
    with RunningService(server_dict(tmp_path), tmp_path) as service:
        with pytest.raises(ServiceError) as refused:
            service.client.submit(job_entry(tmp_path, "add", eval_data=str(outside), eval_every=1))
        assert refused.value.problems == [{
            "key": "eval_data", "reason": f"{outside} is not under the server's data_roots ({(tmp_path / 'data').resolve()})",
        }]
        with pytest.raises(ServiceError) as refused:
            service.client.submit(job_entry(tmp_path, "add", eval_data=str(broken), eval_every=1))
        assert refused.value.problems == [{
            "key": "eval_data", "reason": f'{broken}, line 2: missing field "completion" (format prompt_completion needs "prompt", "completion")',
        }]
        assert service.client.jobs() == []


def test_an_evaluating_job_killed_and_restarted_has_the_eval_losses_of_training_alone(tmp_path):
    """kill -9 after the job's best eval (step 4, its checkpoint) and before its early stop: the restarted service
    redoes the steps after its last checkpoint, evaluates them again to the same losses, stops at the
    same step and publishes the best eval's adapter, restored from the checkpoint's eval state."""
    config_path = tmp_path / "server.yaml"
    config_path.write_text(json.dumps(server_dict(tmp_path)))
    add = job_entry(tmp_path, "add", **EARLY_STOPPING)
    log = tmp_path / "serve.log"
    process, client = start_serve(config_path, log, microbatch_delay_s=0.1)
    client.submit(add)
    wait_for(lambda: client.job("add")["step"] >= 5, what="add's step 5")
    kill_9(process)  # between its checkpoint at step 4 and its early stop at step 6
    process, client = start_serve(config_path, log)
    try:
        wait_for(lambda: client.job("add")["state"] == "finished", what="add to finish")
        metrics, logs = client.metrics("add"), [line["line"] for line in client.logs("add")]
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log.read_text()[-3000:]
    assert any(line.startswith("resumed from its checkpoint at step 4/10") for line in logs), logs
    adapter, expected = alone_eval_losses(tmp_path, add)
    assert_same_eval_losses(eval_losses(metrics), expected)
    assert [r["step"] for r in metrics] == [1, 2, 3, 4, 5, 6]
    assert_adapters_close(service_adapter(tmp_path / "state", "add"), adapter)


def test_a_restart_names_the_file_of_an_accepted_job_that_changed(tmp_path):
    """data or eval_data changed while the service was down: the job fails at the restart, naming
    the key and the file that changed (not the other one)."""
    held_out = tmp_path / "data" / "add_eval.jsonl"
    add = job_entry(tmp_path, "add", eval_data=str(held_out), eval_every=2, max_steps=100)
    held_out.write_text("".join((tmp_path / "data" / "add.jsonl").read_text().splitlines(keepends=True)[:5]))
    rev = job_entry(tmp_path, "rev", max_steps=100)
    with RunningService(server_dict(tmp_path, admission="all_live"), tmp_path, microbatch_delay_s=0.02) as service:
        service.client.submit(add)
        service.client.submit(rev)
        wait_for(lambda: service.state("add")["step"] >= 1 and service.state("rev")["step"] >= 1, what="both jobs' first steps")
    with held_out.open("a") as eval_file:
        eval_file.write('{"prompt": "1+1=", "completion": "2"}\n')
    with Path(rev["data"]).open("a") as data_file:
        data_file.write('{"prompt": "abc", "completion": "cba"}\n')
    with RunningService(server_dict(tmp_path, admission="all_live"), tmp_path) as service:
        ended = service.wait_ended("add", "rev")
    assert (ended["add"]["state"], ended["add"]["failure"]) == ("failed", f"eval_data: {held_out} changed since the job was accepted")
    assert (ended["rev"]["state"], ended["rev"]["failure"]) == ("failed", f"data: {rev['data']} changed since the job was accepted")
