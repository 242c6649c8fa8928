"""SERVER.yaml's `admission`: which running jobs a planning window trains. Size-aware admission
trains the least work left first (a short job submitted after a long one finishes first), leaves
no job out more than `max_wait_windows` windows in a row, predicts the window it plans ahead, and
keeps its wait counts in the job store across a restart."""

from __future__ import annotations

import sqlite3

import pytest

from lorafusion.service.admission import WindowAdmission
from lorafusion.service.store import JobStore
from lorafusion.service.windows import following_window, window_of
from service_fixtures import (
    RunningService,
    alone_adapter,
    assert_adapters_close,
    job_entry,
    server_dict,
    service_adapter,
    wait_for,
    window_jobs,
)


def windows_until_done(runs, admission: WindowAdmission, window_batches: int = 2) -> list[tuple[str, ...]]:
    """Train (by moving each chosen job's step on) until every job is done; each window's jobs.
    Each window is also checked against the one planned ahead of it."""
    trained, ahead = [], None
    while candidates := window_of(runs, window_batches):
        window = admission.choose(candidates, runs)
        assert ahead is None or window == ahead, (window, ahead)  # the window planned ahead was this one
        admission.record(candidates, window)
        ahead = admission.choose(following_window(runs, window_batches, window), runs)
        for w in window:
            runs[w.name].step = w.end_batch
        trained.append(tuple(w.name for w in window))
    return trained


def test_the_job_with_the_fewest_tokens_left_trains_first_and_all_live_trains_every_job(tmp_path):
    runs = window_jobs(tmp_path)
    size_aware = WindowAdmission("size_aware", capacity=40, window_batches=2, max_wait_windows=64)
    for name, run in runs.items():
        lengths = [len(run.sample_at(i).input_ids) for i in range(len(run.order))]
        size = run.spec.global_batch_size
        assert [size_aware.tokens_from(run, g) for g in range(run.num_steps)] == [sum(lengths[g * size :]) for g in range(run.num_steps)]
    assert size_aware.tokens_from(runs["rev"], 0) < size_aware.tokens_from(runs["add"], 0)
    assert windows_until_done(runs, size_aware) == [("rev",), ("rev",), ("add",), ("add",)]
    assert size_aware.waited == {"add": 0}  # rev ended; add had waited 2 windows, then trained

    runs = window_jobs(tmp_path)
    all_live = WindowAdmission("all_live", capacity=40, window_batches=2, max_wait_windows=64)
    assert windows_until_done(runs, all_live) == [("add", "rev"), ("add", "rev")]


def test_no_job_is_left_out_more_than_max_wait_windows_in_a_row(tmp_path):
    runs = window_jobs(tmp_path)
    runs["add"].step = 2  # add now has fewer tokens left than rev: rev is the long one
    admission = WindowAdmission("size_aware", capacity=40, window_batches=1, max_wait_windows=1)
    assert admission.tokens_from(runs["add"], 2) < admission.tokens_from(runs["rev"], 0)
    # Without the guard: add, add, then rev three times. With it, rev waits one window at most.
    assert windows_until_done(runs, admission, window_batches=1) == [("add",), ("rev",), ("add",), ("rev",), ("rev",)]


def test_the_wait_counts_are_kept_in_the_store_and_a_state_directory_from_before_gets_the_column(tmp_path):
    path = tmp_path / "state.sqlite"
    with sqlite3.connect(path) as db:  # the jobs table as it was before admission
        db.execute("CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT UNIQUE NOT NULL, spec TEXT NOT NULL, "
                   "data_digest TEXT NOT NULL, state TEXT NOT NULL, cancel_requested INTEGER NOT NULL DEFAULT 0, "
                   "submitted_at REAL NOT NULL, started_at REAL, ended_at REAL, step INTEGER NOT NULL DEFAULT 0, "
                   "num_steps INTEGER, loss REAL, tokens INTEGER NOT NULL DEFAULT 0, tokens_per_s REAL, failure TEXT, "
                   "adapter_dir TEXT)")  # fmt: skip
        db.execute("INSERT INTO jobs (name, spec, data_digest, state, submitted_at) VALUES ('old', '{}', 'x', 'queued', 0)")
    db.close()
    store = JobStore(path)
    store.add("a", {}, "x")
    store.add("b", {}, "x")
    assert store.windows_waited() == {}
    store.set_windows_waited({"a": 3, "old": 1, "b": 0})
    store.set_windows_waited({"a": 4, "b": 1})  # old was admitted: back to 0
    store.close()
    reopened = JobStore(path)
    assert reopened.windows_waited() == {"a": 4, "b": 1}
    reopened.close()


@pytest.mark.parametrize("admission", ["size_aware", "all_live"])
def test_under_size_aware_a_short_job_submitted_after_a_long_one_finishes_first(tmp_path, admission):
    long, short = job_entry(tmp_path, "long", like="rev", max_steps=20), job_entry(tmp_path, "short", like="rev", max_steps=5)
    with RunningService(server_dict(tmp_path, admission=admission), tmp_path, microbatch_delay_s=0.05) as service:
        service.client.submit(long)
        wait_for(lambda: service.state("long")["step"] >= 2, what="long's step 2")
        service.client.submit(short)
        ended = service.wait_ended("long", "short")
        long_steps = [line["at"] for line in service.client.logs("long") if line["line"].startswith("step ")]
        submitted_at = service.client.logs("short")[0]["at"]
    assert ended["long"]["state"] == ended["short"]["state"] == "finished"
    beside = sum(submitted_at < at < ended["short"]["ended_at"] for at in long_steps)
    if admission == "size_aware":
        # long trains on only to the end of the window it was in (window_batches: 2), then waits.
        assert ended["short"]["ended_at"] < ended["long"]["ended_at"] and beside <= 2
        for entry in (long, short):
            assert_adapters_close(service_adapter(tmp_path / "state", entry["name"]), alone_adapter(tmp_path, entry))
    else:  # every window trains both: long trained beside short in each of short's 3 windows
        assert beside >= 4
