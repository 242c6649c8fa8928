"""What only the DeepSpeed engine needs tested (the tests shared with the megatron engine are in
test_pipeline_training.py): DeepSpeed's defaults do not leak into training (its gradient clipping,
on by default, would rescale every job's gradients at once), a microbatch whose jobs have no
adapter on the first stage still runs DeepSpeed's backward there, and a non-finite loss stops the
run on every rank with the same message."""

from __future__ import annotations

import json

import pytest

from engines.test_pipeline_training import assert_same_adapters, losses, pipeline_config, torchrun
from lorafusion.runtime.config import parse_config
from lorafusion.runtime.trainer import MultiJobTrainer
from lorafusion.scheduler import Schedule

pytestmark = pytest.mark.multiprocess


def test_large_gradients_and_jobs_absent_from_a_stage_match_the_single_process(tmp_path):
    config = pipeline_config(tmp_path, "deepspeed", "piped")
    config["jobs"][0]["lora_alpha"] = 512  # "add": gradient norms far above DeepSpeed's default clip of 1.0
    config["jobs"][2]["target_modules"] = ["lm_head"]  # "txt": no adapter on stage 0
    piped = torchrun(config, tmp_path, 2)
    assert piped.returncode == 0, piped.stderr[-4000:]

    config["parallel"], config["output_dir"] = {"engine": "none"}, str(tmp_path / "single")
    schedule = Schedule.from_json_dict(json.loads((tmp_path / "piped" / "schedule.json").read_text()))
    MultiJobTrainer(parse_config(config, tmp_path), progress=False).train(schedule=schedule)
    piped_losses, single_losses = losses(tmp_path / "piped"), losses(tmp_path / "single")
    assert piped_losses.keys() == single_losses.keys()
    for key, value in single_losses.items():
        assert piped_losses[key] == pytest.approx(value, rel=1e-5), key
    assert_same_adapters(tmp_path / "piped", tmp_path / "single")


def test_non_finite_values_stop_every_rank_with_the_same_message(tmp_path):
    config = pipeline_config(tmp_path, "deepspeed", "diverging")
    config["jobs"][0]["lr"] = 1e30  # "add" diverges after its first step
    result = torchrun(config, tmp_path, 2)
    assert result.returncode != 0
    messages = [line.split("RuntimeError: ", 1)[1] for line in result.stderr.splitlines() if "RuntimeError: job 'add'" in line]
    assert len(messages) == 2 and messages[0] == messages[1], result.stderr[-4000:]
    assert "non-finite" in messages[0] and "stop the run" in messages[0]
    assert not (tmp_path / "diverging" / "add" / "adapter_model.safetensors").exists()
