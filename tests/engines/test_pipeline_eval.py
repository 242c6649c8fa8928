"""Per-job evaluation on the pipeline engines (2 ranks under torchrun, gloo, CPU): the eval losses a
pipelined run logs, reports and stops on equal the single process's on the same schedule, early
stopping publishes the same best step's adapter, a killed run resumes to the uninterrupted one, and
the closing summary's exact-match accuracy decodes through the stages to the single process's
completions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from engines.test_pipeline_training import assert_same_adapters, pipeline_config, torchrun
from engines.test_resume_stop_points import WORKER, assert_bit_identical
from lorafusion.runtime import evaluation
from lorafusion.runtime.config import parse_config
from lorafusion.runtime.trainer import MultiJobTrainer
from lorafusion.scheduler import Schedule

pytestmark = pytest.mark.multiprocess

ENGINES = ["megatron", "deepspeed"]
EXACT_MATCH_WORKER = Path(__file__).with_name("exact_match_worker.py")


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def eval_losses(output_dir: Path) -> dict[tuple[str, int], float]:
    return {(r["job"], r["step"]): r["eval_loss"] for r in metrics(output_dir) if "eval_loss" in r}


def single_process_on(config: dict, schedule_dir: Path, tmp_path: Path, output: str) -> Path:
    """The single-process runtime on the schedule a pipelined run executed."""
    data = {**config, "parallel": {"engine": "none"}, "output_dir": str(tmp_path / output)}
    schedule = Schedule.from_json_dict(json.loads((schedule_dir / "schedule.json").read_text()))
    MultiJobTrainer(parse_config(data, tmp_path), progress=False).train(schedule=schedule)
    return tmp_path / output


def evaluated_config(tmp_path: Path, engine: str, output: str) -> dict:
    """"add" scored on a held-out share of its data (with LoRA dropout in training, none in its eval),
    "txt" on an eval_data file, every 2 steps and at the last; "rev" not evaluated."""
    config = pipeline_config(tmp_path, engine, output)
    held_out = tmp_path / "txt_eval.jsonl"
    held_out.write_text("".join(json.dumps({"text": "ba" * n}) + "\n" for n in range(2, 12)))
    config["jobs"][0].update(eval_fraction=0.25, eval_every=2)
    config["jobs"][2].update(eval_data=str(held_out), eval_every=2)
    return config


def early_stopping_config(tmp_path: Path, engine: str, output: str) -> dict:
    """"add" trained on sums at a high lr and scored on "abab..." texts: its eval loss falls, then
    rises, and it stops two evals after its lowest; "txt" trains alongside to its end."""
    config = pipeline_config(tmp_path, engine, output)
    texts = tmp_path / "texts_as_completions.jsonl"
    texts.write_text("".join(
        json.dumps({"prompt": "", "completion": json.loads(line)["text"]}) + "\n"
        for line in (tmp_path / "txt.jsonl").read_text().splitlines()
    ))
    config["jobs"][0].update(eval_data=str(texts), eval_every=1, early_stopping_patience=2, max_steps=12, lr=0.05, lr_schedule="constant")
    config["jobs"] = [config["jobs"][0], config["jobs"][2]]
    config["checkpoint_every"] = 1
    return config


@pytest.mark.parametrize("engine,stages,replicas", [("megatron", 2, 1), ("deepspeed", 2, 1), ("megatron", 1, 2)])
def test_pipelined_eval_losses_equal_the_single_process(tmp_path, engine, stages, replicas):
    config = evaluated_config(tmp_path, engine, "piped")
    config["parallel"].update(pipeline_stages=stages, data_parallel=replicas)
    piped = torchrun(config, tmp_path, stages * replicas)
    assert piped.returncode == 0, piped.stderr[-4000:]
    single = single_process_on(config, tmp_path / "piped", tmp_path, "single")
    expected = eval_losses(single)
    assert sorted(expected) == [("add", 2), ("add", 4), ("txt", 2), ("txt", 3)]
    found = eval_losses(tmp_path / "piped")
    assert found.keys() == expected.keys()
    for key, value in expected.items():
        assert found[key] == pytest.approx(value, rel=1e-6, abs=0), key
    assert_same_adapters(tmp_path / "piped", single)
    # The closing summary (printed by the reporting stage) gives the published adapter's eval loss.
    rows = [line.split() for line in piped.stdout.splitlines()]
    summary = {row[0]: row[6] for row in rows if row[:2] in (["add", "finished"], ["txt", "finished"])}
    assert summary == {"add": f"{expected['add', 4]:.4f}", "txt": f"{expected['txt', 3]:.4f}"}, piped.stdout


@pytest.mark.parametrize("engine", ENGINES)
def test_early_stopping_keeps_the_single_process_best_step_and_resumes_at_every_stop_point(tmp_path, engine):
    # One process group runs the uninterrupted run and, for each stop point, a run stopped after
    # that many microbatches then resumed (resume_worker.py). "add" steps at microbatches 1, 3, 5,
    # 7, 8, 9, 10, ... and "txt" finishes at 6; "add" stops two evals after its best (when written:
    # best at step 5, stopped at step 7), so the stops fall before its best, at it, between it and
    # the stop, at the stop (checkpointed, not yet published) and past it.
    stops = [2, 6, 8, 9, 10, 12]
    config = early_stopping_config(tmp_path, engine, "runs")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(WORKER), str(path), engine, ",".join(map(str, stops)),
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    reference = tmp_path / "runs" / "reference"

    single = single_process_on(config, reference, tmp_path, "single")
    expected = eval_losses(single)
    best = min((loss, step) for (job, step), loss in expected.items() if job == "add")[1]
    steps = max(step for job, step in expected if job == "add")
    assert steps == best + 2 < 12  # stopped two evals after its best
    found = eval_losses(reference)
    assert found.keys() == expected.keys()
    for key, value in expected.items():
        assert found[key] == pytest.approx(value, rel=1e-6, abs=0), key
    status = json.loads((reference / "add" / "status.json").read_text())
    assert status["status"] == "finished" and status["step"] == steps
    assert_same_adapters(reference, single, jobs=("add", "txt"))  # "add": the best step's adapter

    for stop in stops:
        assert eval_losses(tmp_path / "runs" / f"stop-{stop}") == found, stop
        assert_bit_identical(reference, tmp_path / "runs" / f"stop-{stop}", jobs=("add", "txt"))


@pytest.mark.parametrize("engine", ENGINES)
def test_exact_match_accuracy_decodes_through_the_stages_as_the_single_process(tmp_path, engine, monkeypatch):
    # "add" (prompt_completion) with eval_data: the closing summary's exact-match accuracy. Every rank
    # decodes the prompts greedily together (the last stage's next tokens shared); the completions
    # and the accuracy equal the single process's on the same schedule.
    config = pipeline_config(tmp_path, engine, "piped")
    held_out = tmp_path / "add_eval.jsonl"
    held_out.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "completion": str(a + b)}) + "\n" for a, b in ((3, 4), (12, 30), (7, 7), (45, 9), (1, 1), (20, 22))))
    config["jobs"][0]["eval_data"] = str(held_out)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(EXACT_MATCH_WORKER), str(path), engine]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    ranks = [json.loads((tmp_path / "piped" / f"exact_match-rank{rank}.json").read_text()) for rank in range(2)]

    decoded: list[list[str]] = []
    greedy_completions = evaluation.greedy_completions

    def recording(*positional, **keywords):
        decoded.append(greedy_completions(*positional, **keywords))
        return decoded[-1]

    monkeypatch.setattr(evaluation, "greedy_completions", recording)
    data = {**config, "parallel": {"engine": "none"}, "output_dir": str(tmp_path / "single")}
    schedule = Schedule.from_json_dict(json.loads((tmp_path / "piped" / "schedule.json").read_text()))
    single = MultiJobTrainer(parse_config(data, tmp_path), progress=False).train(schedule=schedule)
    assert len(decoded) == 1 and len(decoded[0]) == 6 and any(decoded[0])
    assert ranks[0]["completions"] == ranks[1]["completions"] == decoded
    assert ranks[1]["accuracies"]["add"] == single.jobs["add"].eval_accuracy is not None
    assert ranks[1]["accuracies"]["rev"] is None  # no eval_data


def test_megatron_fails_a_job_whose_eval_loss_is_not_finite(tmp_path):
    # As the single process does: the diverged job fails (not "finished" by early stopping with its
    # diverged adapter published) on every stage at once, and the others go on.
    config = pipeline_config(tmp_path, "megatron", "nan-eval")
    config["jobs"][0].update(lr=1e30, lora_dropout=0.0, eval_fraction=0.25, eval_every=1, early_stopping_patience=1)
    run = torchrun(config, tmp_path, 2)
    assert run.returncode == 1, run.stderr[-4000:]  # a failed job makes the run's exit status 1
    assert "job 'add' failed: non-finite eval loss (nan) at step 1" in run.stderr, run.stderr[-4000:]
    out = tmp_path / "nan-eval"
    assert json.loads((out / "add" / "status.json").read_text())["status"] == "failed"
    assert not (out / "add" / "adapter_model.safetensors").exists()
    assert all(json.loads((out / job / "status.json").read_text())["status"] == "finished" for job in ("rev", "txt"))
