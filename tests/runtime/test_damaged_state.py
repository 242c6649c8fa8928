"""--resume over damaged run state: a torn metrics line is dropped, a damaged newest checkpoint
falls back to the one before, an empty schedule.json is planned again, a truncated status.json is
taken from the checkpoints, a base model cut short is saved again; each with a one-line warning.
What cannot be recovered is named (file and fault), never a bare JSON traceback."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file

from lorafusion.cli import main
from lorafusion.runtime.config import parse_config
from lorafusion.runtime.output_dir import MANIFEST_FILE, OutputDirError
from lorafusion.runtime.run_state import RunStateWarning
from lorafusion.runtime.trainer import MultiJobTrainer
from training_fixtures import config_dict

JOBS = ("add", "rev")


def trainer(tmp_path, output, **overrides) -> MultiJobTrainer:
    return MultiJobTrainer(parse_config(config_dict(tmp_path, jobs=JOBS, output=output, **overrides), tmp_path), progress=False)


@pytest.fixture
def reference(tmp_path):
    trainer(tmp_path, "full").train()
    return tmp_path / "full"


@pytest.fixture
def interrupted(tmp_path):
    """A run killed after 6 microbatches ("rev" has checkpoints at steps 2 and 4 by then)."""
    assert trainer(tmp_path, "run", checkpoint_every=1).train(stop_after_microbatches=6).interrupted
    return tmp_path / "run"


def resume(tmp_path, **overrides):
    return trainer(tmp_path, "run", checkpoint_every=1, **overrides).train(resume=True)


def assert_same_adapters(a, b):
    for job in JOBS:
        saved, expected = load_file(a / job / "adapter_model.safetensors"), load_file(b / job / "adapter_model.safetensors")
        assert saved.keys() == expected.keys()
        for key in saved:
            torch.testing.assert_close(saved[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_torn_metrics_line_is_dropped(tmp_path, interrupted, reference):
    with open(interrupted / "metrics.jsonl", "a") as out:
        out.write('{"job": "add", "st')
    with pytest.warns(RunStateWarning, match=r"metrics.jsonl: dropped its damaged last line"):
        result = resume(tmp_path)
    assert all(job.status == "finished" for job in result.jobs.values())
    assert sorted(r["step"] for r in metrics(interrupted) if r["job"] == "add") == [1, 2, 3, 4]
    assert_same_adapters(interrupted, reference)


def test_a_damaged_line_inside_metrics_is_named(tmp_path, interrupted):
    lines = (interrupted / "metrics.jsonl").read_text().splitlines()
    lines[0] = lines[0][:10]
    (interrupted / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(OutputDirError, match=r"metrics.jsonl: line 1 is damaged"):
        resume(tmp_path)


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, interrupted, reference):
    steps = sorted(int(p.name.removeprefix("step-")) for p in (interrupted / "checkpoints" / "rev").glob("step-*"))
    assert len(steps) >= 2
    newest = interrupted / "checkpoints" / "rev" / f"step-{steps[-1]}" / "stage-0-of-1.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    with pytest.warns(RunStateWarning, match=rf"step-{steps[-1]} of job 'rev' is damaged .*falling back"):
        result = resume(tmp_path)
    assert result.jobs["rev"].status == "finished"
    assert_same_adapters(interrupted, reference)


@pytest.mark.parametrize("content", ["", '{"stages": 1, "micro'])
def test_an_empty_or_truncated_schedule_is_planned_again(tmp_path, interrupted, reference, content):
    (interrupted / "schedule.json").write_text(content)
    with pytest.warns(RunStateWarning, match=r"schedule.json: damaged schedule: .*planning the schedule again"):
        result = resume(tmp_path)
    assert all(job.status == "finished" for job in result.jobs.values())
    assert_same_adapters(interrupted, reference)


def test_a_truncated_status_is_taken_from_the_checkpoints(tmp_path):
    config = config_dict(tmp_path, jobs=JOBS, output="run", add=dict(lr=1e30))
    MultiJobTrainer(parse_config(config, tmp_path), progress=False).train()
    status = tmp_path / "run" / "add" / "status.json"
    status.write_text(status.read_text()[:15])
    (tmp_path / "run" / "rev" / "status.json").write_text("")  # a finished job's: its adapter is published again
    with pytest.warns(RunStateWarning) as warned:
        result = MultiJobTrainer(parse_config(config, tmp_path), progress=False).train(resume=True)
    messages = " | ".join(str(w.message) for w in warned)
    assert "add/status.json: damaged job status: it is not valid JSON" in messages
    assert "rev/status.json: damaged job status: it is empty" in messages
    assert result.jobs["add"].status == "failed" and result.jobs["rev"].status == "finished"
    assert json.loads(status.read_text())["status"] == "failed"
    assert json.loads((tmp_path / "run" / "rev" / "status.json").read_text())["status"] == "finished"


def test_a_base_model_save_cut_short_is_saved_again(tmp_path, interrupted):
    base = interrupted / "base_model"
    manifest = json.loads((base / MANIFEST_FILE).read_text())
    # As a kill in the middle of publishing leaves it: weights gone, manifest marked incomplete.
    (base / "model.safetensors").unlink()
    (base / MANIFEST_FILE).write_text(json.dumps({"files": manifest["files"], "complete": False}))
    (base / ".lorafusion-tmp-leftover").mkdir()
    resume(tmp_path)
    assert json.loads((base / MANIFEST_FILE).read_text())["complete"] is True
    assert not (base / ".lorafusion-tmp-leftover").exists()
    transformers.AutoModelForCausalLM.from_pretrained(base, local_files_only=True)


def test_the_cli_gives_one_line_warnings_and_names_unrecoverable_files(tmp_path, capsys):
    data = config_dict(tmp_path, jobs=JOBS, output="run")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["train", str(path), "--no-progress", "--stop-after", "4"]) == 0
    (tmp_path / "run" / "schedule.json").write_text("")
    assert main(["train", str(path), "--no-progress", "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"lorafusion train: warning: {tmp_path / 'run' / 'schedule.json'}: damaged schedule: it is empty" in err
    (tmp_path / "run" / ".lorafusion-run.json").write_text("{")
    assert main(["train", str(path), "--no-progress", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"lorafusion train: {tmp_path / 'run' / '.lorafusion-run.json'}: damaged run marker")
    assert len(err.splitlines()) == 1
