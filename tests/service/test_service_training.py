"""The service trains jobs that come and go: each job's adapter equals `lorafusion train` of that
job alone, whatever arrives, leaves or diverges beside it, under either admission (every running
job in each window, or the least work left first). Driven over real HTTP."""

from __future__ import annotations

import pytest
import torch

from lorafusion.runtime.checkpoints import CheckpointStore, load_stage_files
from service_fixtures import (
    RunningService,
    alone_adapter,
    assert_adapters_close,
    job_entry,
    server_dict,
    service_adapter,
    wait_for,
)


ADMISSIONS = pytest.mark.parametrize("admission", ["all_live", "size_aware"])


@ADMISSIONS
def test_jobs_submitted_at_different_moments_each_equal_training_alone(tmp_path, admission):
    add, rev, txt = job_entry(tmp_path, "add", max_steps=6), job_entry(tmp_path, "rev"), job_entry(tmp_path, "txt")
    with RunningService(server_dict(tmp_path, admission=admission), tmp_path, microbatch_delay_s=0.05) as service:
        assert service.client.submit(add)["state"] == "queued"
        wait_for(lambda: service.state("add")["step"] >= 2, what="add's step 2")
        service.client.submit(rev)
        wait_for(lambda: service.state("rev")["step"] >= 1, what="rev's first step")
        service.client.submit(txt)
        ended = service.wait_ended("add", "rev", "txt")
        logs = service.client.logs("rev")
    assert {name: job["state"] for name, job in ended.items()} == {"add": "finished", "rev": "finished", "txt": "finished"}
    if admission == "all_live":  # rev joined while add trained, txt while both did: the windows overlapped.
        assert ended["rev"]["started_at"] < ended["add"]["ended_at"] and ended["txt"]["started_at"] < ended["rev"]["ended_at"]
    assert [line["line"] for line in logs][:2] == ["submitted", "training: 5 steps of 6 samples"]
    assert sum(line["line"].startswith("step ") for line in logs) == 5
    for entry in (add, rev, txt):
        assert_adapters_close(service_adapter(tmp_path / "state", entry["name"]), alone_adapter(tmp_path, entry))


@ADMISSIONS
def test_cancel_mid_run_leaves_the_others_untouched_and_its_checkpoint_loadable(tmp_path, admission):
    add, rev = job_entry(tmp_path, "add"), job_entry(tmp_path, "rev", max_steps=40)
    with RunningService(server_dict(tmp_path, admission=admission), tmp_path, microbatch_delay_s=0.05) as service:
        service.client.submit(add)
        service.client.submit(rev)
        wait_for(lambda: service.state("rev")["step"] >= 3, what="rev's step 3")
        cancelled = service.client.cancel("rev")
        assert cancelled["state"] == "cancelled" and 3 <= cancelled["step"] < 40
        ended = service.wait_ended("add")
        assert service.state("rev")["state"] == "cancelled"
    assert ended["add"]["state"] == "finished"
    assert not (tmp_path / "state" / "adapters" / "rev").exists()
    files = CheckpointStore(tmp_path / "state").latest_complete("rev")
    state = load_stage_files(files)
    assert state["step"] == cancelled["step"]
    assert all(torch.isfinite(value).all() for value in state["parameters"].values())
    assert_adapters_close(service_adapter(tmp_path / "state", "add"), alone_adapter(tmp_path, add))


@ADMISSIONS
def test_a_diverging_job_fails_alone(tmp_path, admission):
    add, rev = job_entry(tmp_path, "add", lr=1e30), job_entry(tmp_path, "rev")
    with RunningService(server_dict(tmp_path, admission=admission), tmp_path) as service:
        service.client.submit(add)
        service.client.submit(rev)
        ended = service.wait_ended("add", "rev")
    assert ended["add"]["state"] == "failed" and "non-finite" in ended["add"]["failure"]
    assert ended["rev"]["state"] == "finished"
    assert_adapters_close(service_adapter(tmp_path / "state", "rev"), alone_adapter(tmp_path, rev))
