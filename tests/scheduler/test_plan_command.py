"""The `lorafusion plan` sub-command: jobs file parsing, summary, schedule JSON, errors."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lorafusion.commands import plan
from lorafusion.scheduler import Job, Schedule, verify_schedule

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "jobs.yaml"


def run_plan(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    plan.add_arguments(parser)
    return plan.run(parser.parse_args(list(argv)))


def test_plan_writes_a_verifiable_schedule(tmp_path, capsys):
    (tmp_path / "data.jsonl").write_text('{"text": "héllo"}\n{"text": "abc"}\n\n{"text": "x"}\n', encoding="utf-8")
    (tmp_path / "jobs.yaml").write_text(
        "jobs:\n"
        "  - {name: a, global_batch_size: 2, lengths: [300, 200, 100, 50]}\n"
        "  - {name: b, global_batch_size: 1, data: data.jsonl}\n",
        encoding="utf-8",
    )
    out = tmp_path / "schedule.json"
    assert run_plan("--jobs", str(tmp_path / "jobs.yaml"), "--stages", "2", "--capacity", "512", "--out", str(out)) == 0
    summary = capsys.readouterr().out
    assert "fill ratio" in summary
    for system in ("megatron-lm", "mlora-as-evaluated", "mlora-system", "megatron-padded", "mlora-padded"):
        assert f"over {system}" in summary
    schedule = Schedule.from_json_dict(json.loads(out.read_text()))
    # Byte-level fallback: UTF-8 bytes + 1 ("é" is two bytes).
    jobs = [Job("a", 2, [300, 200, 100, 50]), Job("b", 1, [7, 4, 2])]
    verify_schedule(schedule, jobs)


def test_example_jobs_file_plans(capsys):
    assert run_plan("--jobs", str(EXAMPLE), "--stages", "4", "--capacity", "8192", "--time-limit", "0.2") == 0
    assert "microbatches:" in capsys.readouterr().out


def test_plan_reports_bad_input_clearly(tmp_path, capsys):
    (tmp_path / "jobs.yaml").write_text("- {name: sum-a, global_batch_size: 1, lengths: [10, 5000]}\n")
    assert run_plan("--jobs", str(tmp_path / "jobs.yaml"), "--capacity", "4096") == 2
    assert "job 'sum-a' sample 1 has 5000 tokens, more than capacity=4096" in capsys.readouterr().err
