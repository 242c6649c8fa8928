"""What `lorafusion train` prints: per-step progress as plain log lines when the output is not a
terminal (no carriage returns or escape codes in a log file), tqdm bars on a terminal, and the
closing summary always, `--no-progress` included."""

from __future__ import annotations

import io

import yaml

from lorafusion.cli import main
from lorafusion.runtime import progress as progress_module
from lorafusion.runtime.progress import Progress
from training_fixtures import config_dict


def write_config(tmp_path) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config_dict(tmp_path, jobs=("add", "txt"), add={"max_steps": 2}, txt={"max_steps": 2})))
    return str(path)


def test_off_a_terminal_progress_is_plain_lines_then_the_summary(tmp_path, capsys):
    assert main(["train", write_config(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "\r" not in captured.out + captured.err and "\x1b" not in captured.out + captured.err
    lines = captured.out.splitlines()
    steps = sorted(line.split(",")[0] for line in lines if ": step " in line)
    assert steps == ["add: step 1/2", "add: step 2/2", "txt: step 1/2", "txt: step 2/2"]
    assert "finished" in captured.out and lines[-1].endswith("tokens/s)")


def test_no_progress_still_prints_the_summary(tmp_path, capsys):
    assert main(["train", write_config(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert ": step " not in out
    assert "finished" in out and out.splitlines()[-1].endswith("tokens/s)")


def test_on_a_terminal_progress_is_one_bar_per_job(monkeypatch):
    monkeypatch.setattr(progress_module, "_on_terminal", lambda: True)
    shown = Progress(True, {"a": (0, 3), "b": (1, 3)})
    assert set(shown._bars) == {"a", "b"}
    shown.close()
    assert Progress("summary", {"a": (0, 3)})._bars == {} and Progress(False, {"a": (0, 3)})._bars == {}


def test_log_lines_thin_out_on_long_jobs(monkeypatch):
    monkeypatch.setattr(progress_module, "_on_terminal", lambda: False)
    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    shown = Progress(True, {"a": (0, 1000)})
    for step in range(1, 1001):
        shown.step("a", step, 1000, 1.0, 10.0)
    assert len(out.getvalue().splitlines()) == 11  # step 1, every 100th (1000 among them)


def test_log_every_sets_the_steps_between_log_lines(tmp_path, capsys):
    data = config_dict(tmp_path, jobs=("add",), add={"max_steps": 7})
    data["log_every"] = 3
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["train", str(path)]) == 0
    steps = [line.split(",")[0] for line in capsys.readouterr().out.splitlines() if ": step " in line]
    assert steps == ["add: step 1/7", "add: step 3/7", "add: step 6/7", "add: step 7/7"]


def test_a_jobs_eval_loss_shows_in_its_line_from_its_eval_on(monkeypatch):
    monkeypatch.setattr(progress_module, "_on_terminal", lambda: False)
    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    shown = Progress(True, {"a": (0, 10)})
    for step in range(1, 11):
        shown.step("a", step, 10, 1.0, 10.0, eval_loss=0.5 if step == 4 else None)
    lines = out.getvalue().splitlines()
    assert lines[2] == "a: step 3/10, loss 1.0000, 10 tokens/s"
    assert lines[3] == "a: step 4/10, loss 1.0000, eval loss 0.5000 (step 4), 10 tokens/s"
    assert lines[-1] == "a: step 10/10, loss 1.0000, eval loss 0.5000 (step 4), 10 tokens/s"
    monkeypatch.setattr(progress_module, "_on_terminal", lambda: True)
    bars = Progress(True, {"a": (0, 3)})
    bars.step("a", 1, 3, 1.0, 10.0, eval_loss=0.25)
    assert "eval=0.2500@1" in str(bars._bars["a"])
    bars.close()
