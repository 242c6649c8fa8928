"""Resume equals an uninterrupted run, over stop points, on every engine: the final adapters of a
run stopped after k microbatches and resumed are bit-identical to those of a run never stopped.

The config (capacity 32, a checkpoint every 2 steps, dropout on) gives runs where, after a resume,
some microbatches hold only samples already trained while a job's next global batch follows
closely: a pipeline that dropped those microbatches ran that batch's forward before the previous
batch's step (stop 12 failed with an in-place autograd error; others silently differed)."""

from __future__ import annotations

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
from training_fixtures import config_dict

JOBS = ("add", "rev", "txt")
WORKER = Path(__file__).with_name("resume_worker.py")


def resume_config(tmp_path: Path, engine: str, output: str = "runs") -> dict:
    config = config_dict(tmp_path, output=output, checkpoint_every=2)
    config["scheduler"]["capacity"] = 32
    config["jobs"][0]["lora_dropout"] = 0.2  # masks are drawn per row of the packed microbatch
    config["jobs"][1]["target_modules"] = ["q_proj", "v_proj", "lm_head"]  # no adapter on some layers
    config["parallel"] = {"engine": engine, "pipeline_stages": 1 if engine == "none" else 2}
    return config


def assert_bit_identical(reference: Path, other: Path, jobs=JOBS) -> None:
    for job in jobs:
        expected = load_file(reference / job / "adapter_model.safetensors")
        actual = load_file(other / job / "adapter_model.safetensors")
        assert expected.keys() == actual.keys()
        for key in expected:
            assert torch.equal(expected[key], actual[key]), f"{other.name}: {job} {key} differs"


def test_single_process_resume_equals_uninterrupted_at_every_stop_point(tmp_path):
    data = resume_config(tmp_path, "none")
    root = Path(data["output_dir"])

    def trainer(output: str) -> MultiJobTrainer:
        return MultiJobTrainer(parse_config({**data, "output_dir": str(root / output)}, tmp_path), progress=False)

    total = trainer("reference").train().microbatches_run
    for stop in range(1, total, 5):
        assert trainer(f"stop-{stop}").train(stop_after_microbatches=stop).interrupted
        trainer(f"stop-{stop}").train(resume=True)
        assert_bit_identical(root / "reference", root / f"stop-{stop}")


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "engine,stops",
    [("megatron", [3, 6, 9, 12, 15, 18]), ("deepspeed", [5, 12])],
)
def test_two_stage_resume_equals_uninterrupted(tmp_path, engine, stops):
    data = resume_config(tmp_path, engine)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    replay = ["--replay-without", "add"] if engine == "megatron" else []
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(WORKER), str(path), engine, ",".join(map(str, stops)), *replay,
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    root = Path(data["output_dir"])
    for stop in stops:
        assert_bit_identical(root / "reference", root / f"stop-{stop}")
    if replay:
        # The schedule replayed without "add": the others train as they did beside it.
        assert_bit_identical(root / "reference", root / "replay", jobs=("rev", "txt"))
