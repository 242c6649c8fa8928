"""`lorafusion plan` writes its schedule only where asked: a file given with --out, or stdout with
`--out -` (the summary then on stderr, so the JSON can be piped); nothing in the working directory."""

from __future__ import annotations

import json

from lorafusion.cli import main
from lorafusion.scheduler import Job, Schedule, verify_schedule

JOBS = "jobs:\n  - {name: a, global_batch_size: 2, lengths: [300, 200, 100, 50]}\n"


def test_plan_out_dash_writes_the_schedule_to_stdout_only(tmp_path, capsys, monkeypatch):
    (tmp_path / "jobs.yaml").write_text(JOBS)
    monkeypatch.chdir(tmp_path)
    assert main(["plan", "--jobs", "jobs.yaml", "--stages", "2", "--capacity", "512", "--no-milp", "--out", "-"]) == 0
    captured = capsys.readouterr()
    schedule = Schedule.from_json_dict(json.loads(captured.out))
    verify_schedule(schedule, [Job("a", 2, [300, 200, 100, 50])])
    assert "fill ratio" in captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jobs.yaml"]


def test_plan_without_out_writes_no_file(tmp_path, capsys, monkeypatch):
    (tmp_path / "jobs.yaml").write_text(JOBS)
    monkeypatch.chdir(tmp_path)
    assert main(["plan", "--jobs", "jobs.yaml", "--stages", "2", "--capacity", "512", "--no-milp"]) == 0
    assert "fill ratio" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jobs.yaml"]
