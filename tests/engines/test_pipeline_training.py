"""Pipeline-parallel multi-job training under torchrun (2 ranks, gloo, CPU): the same losses and final
adapters as the single-process runtime on the same schedule, kill-and-resume, and bad configs that
fail on every rank with the same message instead of hanging."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lorafusion.runtime.config import parse_config
from lorafusion.runtime.trainer import MultiJobTrainer
from lorafusion.scheduler import Schedule
from training_fixtures import config_dict

pytestmark = pytest.mark.multiprocess

ENGINES = ["megatron", "deepspeed"]
TIMEOUT_S = 240


def torchrun(config: dict, directory: Path, nproc: int, *args: str) -> subprocess.CompletedProcess:
    path = directory / f"config-{len(list(directory.glob('config-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
        "-m", "lorafusion.train", str(path), "--no-progress", *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=directory)


def assert_ranks_refuse_with(stderr: str, message: str) -> None:
    """Every rank refuses the run with `message` (and no other answer). Counting the lines would
    be racy: torchrun stops the other ranks as soon as one exits, maybe before they print."""
    answers = [line for line in stderr.splitlines() if line.startswith("lorafusion train:")]
    assert answers and all(message in line for line in answers), stderr[-4000:]


def pipeline_config(tmp_path: Path, engine: str, output: str, stages: int = 2, replicas: int = 1) -> dict:
    config = config_dict(tmp_path, jobs=("add", "rev", "txt"), output=output)
    # "rev" trains only some layers: stages holding none of them must still carry its tokens.
    config["jobs"][1]["target_modules"] = ["q_proj", "v_proj", "lm_head"]
    # Dropout masks are named per (sample, layer), so they agree across engines and stage counts.
    config["jobs"][0]["lora_dropout"] = 0.2
    config["parallel"] = {"engine": engine, "pipeline_stages": stages, "data_parallel": replicas}
    return config


def final_adapter(output_dir: Path, job: str) -> dict[str, torch.Tensor]:
    return load_file(output_dir / job / "adapter_model.safetensors")


def losses(output_dir: Path) -> dict[tuple[str, int], float]:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {(r["job"], r["step"]): r["loss"] for r in records}


def assert_same_adapters(a: Path, b: Path, jobs=("add", "rev", "txt")):
    for job in jobs:
        first, second = final_adapter(a, job), final_adapter(b, job)
        assert first.keys() == second.keys()
        for key in first:
            torch.testing.assert_close(first[key], second[key], rtol=1e-5, atol=1e-6, msg=f"{job} {key}")


@pytest.mark.parametrize("engine", ENGINES)
def test_two_stage_training_matches_single_process_and_resumes(tmp_path, engine):
    piped = torchrun(pipeline_config(tmp_path, engine, "piped"), tmp_path, 2)
    assert piped.returncode == 0, piped.stderr[-4000:]
    piped_dir = tmp_path / "piped"

    # The single-process runtime on the very schedule the pipeline ran.
    assert json.loads((piped_dir / "schedule.json").read_text())["stages"] == 2
    single_dir = run_single_process_on(piped_dir, tmp_path, "single")

    piped_losses, single_losses = losses(piped_dir), losses(single_dir)
    assert piped_losses.keys() == single_losses.keys() and len(piped_losses) == 4 + 5 + 3
    for key, value in single_losses.items():
        assert piped_losses[key] == pytest.approx(value, rel=1e-5), key
    assert_same_adapters(piped_dir, single_dir)

    # Killed after a few microbatches, then resumed: the same final adapters. This run checkpoints
    # its decoder layers' activations (model.gradient_checkpointing): they are recomputed in the
    # backward, after the forward's multi_lora_batch has ended, and must train the same adapters.
    checkpointed = pipeline_config(tmp_path, engine, "resumed")
    checkpointed["model"] = {**checkpointed["model"], "gradient_checkpointing": True}  # not the shared TINY_MODEL
    killed = torchrun(checkpointed, tmp_path, 2, "--stop-after", "6")
    assert killed.returncode == 0, killed.stderr[-4000:]
    assert not (tmp_path / "resumed" / "add" / "adapter_model.safetensors").exists()
    resumed = torchrun(checkpointed, tmp_path, 2, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert_same_adapters(piped_dir, tmp_path / "resumed")


def run_single_process_on(schedule_dir: Path, tmp_path: Path, output: str) -> Path:
    """The single-process runtime on the schedule a distributed run executed."""
    data = pipeline_config(tmp_path, "megatron", output)
    data["parallel"] = {"engine": "none"}
    schedule = Schedule.from_json_dict(json.loads((schedule_dir / "schedule.json").read_text()))
    MultiJobTrainer(parse_config(data, tmp_path), progress=False).train(schedule=schedule)
    return tmp_path / output


@pytest.mark.parametrize("stages,replicas", [(1, 2), (2, 2)])
def test_data_parallel_replicas_match_single_process(tmp_path, stages, replicas):
    """Replicas take one microbatch of every D, sum each job's gradients when its global batch
    completes, and end with the single-process adapters."""
    run = torchrun(pipeline_config(tmp_path, "megatron", "dp", stages, replicas), tmp_path, stages * replicas)
    assert run.returncode == 0, run.stderr[-4000:]
    single_dir = run_single_process_on(tmp_path / "dp", tmp_path, "single")
    dp_losses, single_losses = losses(tmp_path / "dp"), losses(single_dir)
    assert dp_losses.keys() == single_losses.keys()
    for key, value in single_losses.items():
        assert dp_losses[key] == pytest.approx(value, rel=1e-5), key
    assert_same_adapters(tmp_path / "dp", single_dir)


def test_deepspeed_refuses_data_parallelism(tmp_path):
    result = torchrun(pipeline_config(tmp_path, "deepspeed", "bad", stages=1, replicas=2), tmp_path, 2)
    assert result.returncode != 0
    assert_ranks_refuse_with(result.stderr, "the deepspeed engine runs one pipeline replica")


@pytest.mark.parametrize("engine", ENGINES)
def test_bad_layout_fails_on_every_rank_with_the_same_message(tmp_path, engine):
    result = torchrun(pipeline_config(tmp_path, engine, "bad", stages=3), tmp_path, 3)
    assert result.returncode != 0
    message = "pipeline_stages=3 is larger than the model's 2 decoder layers"
    assert_ranks_refuse_with(result.stderr, message)


@pytest.mark.parametrize("engine", ENGINES)
def test_wrong_process_count_fails_clearly(tmp_path, engine):
    result = torchrun(pipeline_config(tmp_path, engine, "bad"), tmp_path, 3)
    assert result.returncode != 0
    assert_ranks_refuse_with(result.stderr, "= 2 processes are needed, but 3 were started")


@pytest.mark.parametrize("stages,replicas", [(2, 1), (1, 2)])
def test_megatron_stops_a_diverging_job_and_the_others_are_unaffected(tmp_path, stages, replicas):
    config = pipeline_config(tmp_path, "megatron", "diverged", stages, replicas)
    config["jobs"][0].update(lr=1e30, lora_dropout=0.0)  # "add" blows up after its first step
    run = torchrun(config, tmp_path, stages * replicas)
    assert run.returncode == 1, run.stderr[-4000:]  # a failed job makes the run's exit status 1
    assert "job 'add' failed: non-finite" in run.stderr
    out = tmp_path / "diverged"
    assert json.loads((out / "add" / "status.json").read_text())["status"] == "failed"
    assert not (out / "add" / "adapter_model.safetensors").exists()
    # The other jobs end as if "add" had never been there, on the same microbatches.
    data = pipeline_config(tmp_path, "megatron", "clean")
    data["jobs"] = data["jobs"][1:]
    data["parallel"] = {"engine": "none"}
    schedule = Schedule.from_json_dict(json.loads((out / "schedule.json").read_text()))
    MultiJobTrainer(parse_config(data, tmp_path), progress=False).train(schedule=schedule)
    assert_same_adapters(out, tmp_path / "clean", jobs=("rev", "txt"))


def test_a_pipelined_run_resumes_on_another_stage_count(tmp_path):
    """Stage checkpoints restore onto any layout; the schedule is planned again for the new one."""
    def config(output: str, engine: str) -> dict:
        data = pipeline_config(tmp_path, "megatron", output)
        if engine == "none":
            data["parallel"] = {"engine": "none"}
        return data

    killed = torchrun(config("moved", "megatron"), tmp_path, 2, "--stop-after", "6")
    assert killed.returncode == 0, killed.stderr[-4000:]
    assert any((tmp_path / "moved" / "checkpoints").rglob("stage-1-of-2.pt"))
    MultiJobTrainer(parse_config(config("moved", "none"), tmp_path), progress=False).train(resume=True)
    MultiJobTrainer(parse_config(config("reference", "none"), tmp_path), progress=False).train()
    assert_same_adapters(tmp_path / "moved", tmp_path / "reference")
