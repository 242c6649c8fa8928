"""kill -9 of `lorafusion serve`, then `lorafusion serve` again: every accepted job goes on from
its last checkpoint and ends with the adapter it would have had without the kill (that of
training it alone). A real subprocess, killed with SIGKILL."""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3

import torch

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


def test_kill_9_and_restart_loses_nothing(tmp_path):
    config_path = tmp_path / "server.yaml"
    config_path.write_text(json.dumps(server_dict(tmp_path)))
    add, rev = job_entry(tmp_path, "add", max_steps=10), job_entry(tmp_path, "rev", max_steps=12)
    log = tmp_path / "serve.log"

    process, client = start_serve(config_path, log)
    client.submit(add)
    client.submit(rev)
    kill_9(process)  # accepted, perhaps not yet trained at all

    process, client = start_serve(config_path, log)
    wait_for(lambda: client.job("rev")["step"] >= 3, what="rev's step 3")
    kill_9(process)  # mid-run: rev has a checkpoint at step 2
    killed_at = {name: (tmp_path / "state" / "checkpoints" / name).is_dir() for name in ("add", "rev")}

    process, client = start_serve(config_path, log)
    try:
        wait_for(lambda: all(client.job(n)["state"] == "finished" for n in ("add", "rev")), what="both jobs to finish")
        logs = [line["line"] for line in client.logs("rev")]
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log.read_text()[-3000:]
    assert killed_at["rev"]
    assert any(line.startswith("resumed from its checkpoint at step") for line in logs), logs
    for entry in (add, rev):
        assert_adapters_close(service_adapter(tmp_path / "state", entry["name"]), alone_adapter(tmp_path, entry))


def test_a_job_killed_between_its_last_checkpoint_and_its_adapter_is_published_at_restart(tmp_path):
    add = job_entry(tmp_path, "add")
    with RunningService(server_dict(tmp_path), tmp_path) as service:
        service.client.submit(add)
        service.wait_ended("add")
    published = service_adapter(tmp_path / "state", "add")
    # What a kill right after the job's last checkpoint leaves: no adapter, the job running in the database.
    shutil.rmtree(tmp_path / "state" / "adapters" / "add")
    with sqlite3.connect(tmp_path / "state" / "state.sqlite") as db:
        db.execute("UPDATE jobs SET state = 'running', ended_at = NULL, adapter_dir = NULL WHERE name = 'add'")
    db.close()
    with RunningService(server_dict(tmp_path), tmp_path) as service:
        ended = service.wait_ended("add")
        logs = [line["line"] for line in service.client.logs("add")]
    assert ended["add"]["state"] == "finished" and ended["add"]["step"] == 4
    assert "resumed from its checkpoint at step 4/4" in logs
    republished = service_adapter(tmp_path / "state", "add")
    assert all(torch.equal(published[key], republished[key]) for key in published)


def test_a_stopped_service_checkpoints_its_running_jobs_and_continues_them(tmp_path):
    rev = job_entry(tmp_path, "rev", max_steps=12)
    config = server_dict(tmp_path, checkpoint_every=0)  # checkpoints only at the end, and at a stop
    with RunningService(config, tmp_path, microbatch_delay_s=0.05) as service:
        service.client.submit(rev)
        wait_for(lambda: service.state("rev")["step"] >= 3, what="rev's step 3")
    steps = sorted(int(p.name.removeprefix("step-")) for p in (tmp_path / "state" / "checkpoints" / "rev").glob("step-*"))
    assert len(steps) == 1 and 3 <= steps[0] < 12
    with RunningService(config, tmp_path) as service:
        ended = service.wait_ended("rev")
        logs = [line["line"] for line in service.client.logs("rev")]
    assert ended["rev"]["state"] == "finished"
    assert f"resumed from its checkpoint at step {steps[0]}/12" in logs
    assert_adapters_close(service_adapter(tmp_path / "state", "rev"), alone_adapter(tmp_path, rev))
