"""A run owns its output_dir: foreign or earlier runs' directories are refused unless --overwrite,
which never deletes or replaces a file lorafusion did not write; one run at a time (lock);
reserved job names and symbolic links are refused; statuses carry the run id."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from safetensors.torch import load_file

from lorafusion.cli import main
from lorafusion.runtime.config import ConfigError, parse_config
from lorafusion.runtime.output_dir import LOCK_FILE, MARKER_FILE, DirectoryLock
from lorafusion.runtime.trainer import MultiJobTrainer
from training_fixtures import config_dict


def write_config(tmp_path, output="run", jobs=("add", "txt"), **overrides) -> str:
    data = config_dict(tmp_path, jobs=jobs, output=output, **overrides)
    path = tmp_path / f"{output}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def train(config_path: str, *flags: str) -> int:
    return main(["train", config_path, "--no-progress", *flags])


def snapshot(directory):
    """Every file under `directory` with its bytes (links as their target)."""
    return {
        str(path.relative_to(directory)): os.readlink(path) if path.is_symlink() else path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file() or path.is_symlink()
    }


def test_a_foreign_directory_is_refused_and_left_as_it_was(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "mine.txt").write_text("precious")
    (out / "add").mkdir()
    (out / "add" / "notes.md").write_text("mine too")
    before = snapshot(out)
    assert train(write_config(tmp_path)) == 2
    error = capsys.readouterr().err
    assert str(out) in error and "not written by lorafusion" in error and "--overwrite" in error
    assert len(error.strip().splitlines()) == 1
    assert snapshot(out) == before and not (out / LOCK_FILE).exists()
    # --overwrite writes beside other files, but never into a path it did not write.
    assert train(write_config(tmp_path), "--overwrite") == 2
    assert "exists and was not written by lorafusion" in capsys.readouterr().err
    assert {k: v for k, v in snapshot(out).items() if k != LOCK_FILE} == before


def test_overwrite_writes_beside_files_it_did_not_write(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "README.txt").write_text("keep me")
    assert train(write_config(tmp_path), "--overwrite") == 0
    assert (out / "README.txt").read_text() == "keep me"
    assert (out / "add" / "adapter_model.safetensors").is_file()
    marker = json.loads((out / MARKER_FILE).read_text())
    assert json.loads((out / "add" / "status.json").read_text())["run_id"] == marker["run_id"]


def test_an_earlier_run_is_refused_without_resume_or_overwrite(tmp_path, capsys):
    config = write_config(tmp_path)
    assert train(config) == 0
    out = tmp_path / "run"
    before = snapshot(out)
    assert train(config) == 2
    error = capsys.readouterr().err.strip()
    assert error.endswith(
        f"{out} holds a finished lorafusion run; pass --overwrite to train again from scratch, replacing its outputs "
        "(files lorafusion did not write are kept), or choose another output_dir"
    ), error
    assert len(error.splitlines()) == 1
    assert snapshot(out) == before


def test_a_forgotten_resume_keeps_the_interrupted_runs_checkpoints(tmp_path, capsys):
    config = write_config(tmp_path)
    assert train(config, "--stop-after", "4") == 0
    out = tmp_path / "run"
    before = snapshot(out / "checkpoints")
    assert before
    assert train(config) == 2
    assert f"{out} holds an interrupted lorafusion run; continue it with --resume" in capsys.readouterr().err
    assert snapshot(out / "checkpoints") == before
    assert train(config, "--resume") == 0


def test_a_run_is_finished_only_when_every_job_has_ended(tmp_path, capsys):
    """A job without its end status (killed while publishing, or status.json damaged) makes the
    run an interrupted one, which --resume completes."""
    config = write_config(tmp_path)
    assert train(config) == 0
    out = tmp_path / "run"
    (out / "txt" / "status.json").write_text("{")
    assert train(config) == 2
    assert f"{out} holds an interrupted lorafusion run; continue it with --resume" in capsys.readouterr().err
    assert train(config, "--resume") == 0
    assert json.loads((out / "txt" / "status.json").read_text())["status"] == "finished"
    capsys.readouterr()
    assert train(config) == 2
    assert f"{out} holds a finished lorafusion run" in capsys.readouterr().err


def test_overwrite_replaces_only_what_lorafusion_wrote(tmp_path):
    config = write_config(tmp_path)
    assert train(config) == 0
    out = tmp_path / "run"
    (out / "checkpoints" / "notes.txt").write_text("mine")
    (out / "add" / "eval.json").write_text("{}")
    first_run = json.loads((out / MARKER_FILE).read_text())["run_id"]
    # This time "add" diverges: its earlier adapter must not stay beside its failure.
    failing = write_config(tmp_path, add=dict(lr=1e30))
    assert train(failing, "--overwrite") == 1
    assert not (out / "add" / "adapter_model.safetensors").exists()
    assert not (out / "add" / "adapter_config.json").exists()
    status = json.loads((out / "add" / "status.json").read_text())
    assert status["status"] == "failed" and status["run_id"] != first_run
    assert (out / "checkpoints" / "notes.txt").read_text() == "mine"
    assert (out / "add" / "eval.json").read_text() == "{}"
    assert (out / "txt" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("earlier_run", [False, True])
def test_a_second_run_on_a_locked_directory_stops_at_once(tmp_path, capsys, earlier_run):
    config = write_config(tmp_path)
    if earlier_run:
        assert train(config, "--stop-after", "2") == 0
    (tmp_path / "run").mkdir(exist_ok=True)
    before = snapshot(tmp_path / "run")
    lock = DirectoryLock(tmp_path / "run")  # as a run in progress holds it
    try:
        for flags in ([], ["--resume"], ["--overwrite"]):
            assert train(config, *flags) == 2
            error = capsys.readouterr().err
            assert f"{tmp_path / 'run'} is in use by another lorafusion process (pid {os.getpid()})" in error
    finally:
        lock.release()
    assert {k: v for k, v in snapshot(tmp_path / "run").items() if k != LOCK_FILE} == {k: v for k, v in before.items() if k != LOCK_FILE}
    assert train(config, *(["--resume"] if earlier_run else [])) == 0  # released


def test_resume_and_overwrite_exclude_each_other(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        train(write_config(tmp_path), "--resume", "--overwrite")
    assert exit_info.value.code == 2


@pytest.mark.parametrize("name", ["base_model", "checkpoints", "tensorboard", "pipeline_stats", "metrics.jsonl",
                                  ".lorafusion-run.json", "../up", "a/b", ".hidden"])
def test_reserved_and_path_like_job_names_are_refused(tmp_path, name):
    data = config_dict(tmp_path, jobs=("add",))
    data["jobs"][0]["name"] = name
    with pytest.raises(ConfigError) as error:
        parse_config(data, tmp_path)
    assert len(error.value.problems) == 1 and error.value.problems[0][0] == "jobs[0].name"


def test_links_inside_output_dir_are_never_followed(tmp_path, capsys):
    config = write_config(tmp_path)
    assert train(config, "--stop-after", "4") == 0
    out, outside = tmp_path / "run", tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "precious.txt").write_text("do not touch")
    os.rename(out / "checkpoints", tmp_path / "moved-checkpoints")
    (out / "checkpoints").symlink_to(outside, target_is_directory=True)
    for flags in (["--resume"], ["--overwrite"]):
        assert train(config, *flags) == 2
        error = capsys.readouterr().err
        assert f"{out / 'checkpoints'} is a symbolic link" in error, error
        assert snapshot(outside) == {"precious.txt": b"do not touch"}


def test_a_job_directory_that_is_a_link_is_not_written_through(tmp_path, capsys):
    out, outside = tmp_path / "run", tmp_path / "elsewhere"
    out.mkdir()
    outside.mkdir()
    (out / "add").symlink_to(outside, target_is_directory=True)
    assert train(write_config(tmp_path), "--overwrite") == 2  # "add" is in the way: not lorafusion's
    assert "run/add exists and was not written by lorafusion" in capsys.readouterr().err
    assert list(outside.iterdir()) == []


def test_a_stale_adapter_is_republished_and_statuses_carry_the_run_id(tmp_path, monkeypatch):
    """A kill between an adapter's publish and its status: the resumed run publishes it again,
    and its status names this run."""
    reference = MultiJobTrainer(parse_config(config_dict(tmp_path, jobs=("add", "txt"), output="full"), tmp_path), progress=False)
    reference.train()
    config = parse_config(config_dict(tmp_path, jobs=("add", "txt"), output="crash"), tmp_path)
    crashing = MultiJobTrainer(config, progress=False)
    original = crashing._write_status

    def killed(job):
        if job.status == "finished":
            raise KeyboardInterrupt
        original(job)

    monkeypatch.setattr(crashing, "_write_status", killed)
    with pytest.raises(KeyboardInterrupt):
        crashing.train()
    out = tmp_path / "crash"
    published = [job for job in ("add", "txt") if (out / job / "adapter_model.safetensors").exists()]
    assert published and not any((out / job / "status.json").exists() for job in published)
    result = MultiJobTrainer(config, progress=False).train(resume=True)
    assert all(job.status == "finished" for job in result.jobs.values())
    run_id = json.loads((out / MARKER_FILE).read_text())["run_id"]
    for job in ("add", "txt"):
        assert json.loads((out / job / "status.json").read_text())["run_id"] == run_id
        saved, expected = load_file(out / job / "adapter_model.safetensors"), load_file(tmp_path / "full" / job / "adapter_model.safetensors")
        assert saved.keys() == expected.keys() and all((saved[k] - expected[k]).abs().max() < 1e-6 for k in saved)


def test_planning_outside_a_run_writes_nothing(tmp_path):
    trainer = MultiJobTrainer(parse_config(config_dict(tmp_path, jobs=("add",)), tmp_path), progress=False)
    schedule = trainer.plan(resume=False)
    assert not (tmp_path / "run").exists()
    assert trainer.train(schedule=schedule).jobs["add"].status == "finished"
