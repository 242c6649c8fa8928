"""The pieces both drivers (offline trainer, service) share: a job's training state (job_state.py:
data order, global batches, optimizer step, what a checkpoint keeps) and the checkpoint store
(checkpoints.py: atomic stage files, complete only with every stage's, the newest intact one
restored, a damaged one passed over)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from lorafusion.runtime.checkpoints import CheckpointStore, load_stage_files
from lorafusion.runtime.data import Sample
from lorafusion.runtime.eval_loss import JobEvaluation, published_parameters
from lorafusion.runtime.job_state import JobRun, training_order
from lorafusion.runtime.run_state import RunStateWarning
from training_fixtures import make_config


def spec(tmp_path, **overrides):
    return dataclasses.replace(make_config(tmp_path, jobs=("add",)).jobs[0], **overrides)


def samples(count: int) -> list[Sample]:
    # Sample i has i + 1 target tokens, so a global batch's target count names its samples.
    return [Sample(i + 1, tuple(range(i + 3)), (-100, -100, *range(2, i + 3))) for i in range(count)]


def job(tmp_path, count=10, weights=None, **overrides) -> JobRun:
    run = JobRun(spec(tmp_path, **overrides), samples=samples(count))
    weights = weights if weights is not None else {"w": torch.nn.Parameter(torch.ones(3))}
    run.prepare(weights)
    return run


def test_training_order_is_one_seeded_permutation_per_epoch(tmp_path):
    order = training_order(10, spec(tmp_path, max_steps=None, epochs=2.5, global_batch_size=4))
    assert len(order) == 25 and sorted(order[:10]) == sorted(order[10:20]) == list(range(10))
    assert order == training_order(10, spec(tmp_path, max_steps=None, epochs=2.5, global_batch_size=4))
    assert order[:10] != training_order(10, spec(tmp_path, max_steps=None, epochs=2.5, global_batch_size=4, seed=7))[:10]


def test_prepare_cuts_the_order_into_global_batches(tmp_path):
    run = job(tmp_path, max_steps=None, epochs=1.0, global_batch_size=4)
    assert run.num_steps == 3 and run.remaining == [4, 4, 2]
    assert run.target_tokens == [sum(i + 1 for i in run.batch_indices(g)) for g in range(3)]
    assert run.sample_at(5) is run.samples[run.order[5]]
    too_many = job(tmp_path, count=10, max_steps=None, epochs=10_000.0, global_batch_size=4)
    assert too_many.status == "running"  # 100,000 samples is within the limit
    with pytest.raises(ValueError, match="lower epochs"):
        training_order(20_000, spec(tmp_path, max_steps=None, epochs=10_000.0))


def test_a_step_on_non_finite_gradients_fails_and_changes_nothing(tmp_path):
    run = job(tmp_path)
    weight = run.named_parameters["w"]
    weight.grad = torch.tensor([1.0, math.nan, 0.0])
    assert run.optimizer_step() == "non-finite gradient at step 1"
    assert torch.equal(weight.detach(), torch.ones(3))


def test_a_job_continued_from_its_state_dict_steps_as_the_original(tmp_path):
    def step(run: JobRun, grad: torch.Tensor) -> None:
        run.named_parameters["w"].grad = grad.clone()
        assert run.optimizer_step() is None
        run.step += 1

    original = job(tmp_path, warmup_steps=1, lr_schedule="cosine")
    for k in range(2):
        step(original, torch.tensor([0.5, -1.0, 2.0]) * (k + 1))
    state = original.state_dict()
    copy = job(tmp_path, warmup_steps=1, lr_schedule="cosine", weights={"w": torch.nn.Parameter(torch.zeros(3))})
    copy.load_state_dict(state)
    assert copy.step == 2 and copy.remaining[:2] == [0, 0] and copy.remaining[2] == 8
    for run in (original, copy):
        step(run, torch.tensor([1.0, 1.0, -3.0]))
    assert torch.equal(original.named_parameters["w"], copy.named_parameters["w"])
    assert original.lr_scheduler.get_last_lr() == copy.lr_scheduler.get_last_lr()


def stepped(tmp_path, store: CheckpointStore, run, steps) -> None:
    for k in steps:
        run.step = k
        with torch.no_grad():
            for param in run.named_parameters.values():
                param.fill_(k)
        store.save(run)


def test_each_stage_keeps_its_two_newest_steps_and_a_step_is_complete_with_every_stage(tmp_path):
    first = job(tmp_path, weights={"a": torch.nn.Parameter(torch.zeros(2))})
    second = job(tmp_path, weights={"b": torch.nn.Parameter(torch.zeros(3))})
    stage0, stage1 = CheckpointStore(tmp_path / "run", 0, 2), CheckpointStore(tmp_path / "run", 1, 2)
    stepped(tmp_path, stage0, first, [1, 2, 3])
    stepped(tmp_path, stage1, second, [1, 2])
    assert sorted(stage0.steps_with_file("add", own_only=True)) == [2, 3]
    assert not (tmp_path / "run" / "checkpoints" / "add" / "step-1" / "stage-0-of-2.pt").exists()
    files = stage0.latest_complete("add")  # step 3 lacks stage 1
    assert [f.name for f in files] == ["stage-0-of-2.pt", "stage-1-of-2.pt"] and files[0].parent.name == "step-2"
    merged = load_stage_files(files)
    assert merged["step"] == 2 and torch.equal(merged["parameters"]["a"], torch.full((2,), 2.0))
    assert torch.equal(merged["parameters"]["b"], torch.full((3,), 2.0))
    # A single process restores the two stages' step onto its one stage.
    whole = job(tmp_path, weights={"a": torch.nn.Parameter(torch.zeros(2)), "b": torch.nn.Parameter(torch.zeros(3))})
    assert CheckpointStore(tmp_path / "run").restore(whole) and whole.step == 2
    assert torch.equal(whole.named_parameters["b"].detach(), torch.full((3,), 2.0))


def test_the_best_adapter_of_an_early_stopped_job_is_merged_over_its_stages(tmp_path):
    # Each pipeline stage records the same evals and keeps the best eval's adapter of its own layers.
    settings = {"eval_fraction": 0.1, "eval_every": 1, "early_stopping_patience": 2}

    def evaluated_job(weights):
        run = job(tmp_path, weights=weights, **settings)
        run.evaluation = JobEvaluation(run.spec, [], capacity=96)
        return run

    stages = [evaluated_job({"a": torch.nn.Parameter(torch.zeros(2))}), evaluated_job({"b": torch.nn.Parameter(torch.zeros(3))})]
    stores = [CheckpointStore(tmp_path / "run", index, 2) for index in range(2)]
    for step, loss in ((1, 3.0), (2, 2.0), (3, 2.5), (4, 2.6)):
        for run, store in zip(stages, stores):
            run.step = step
            with torch.no_grad():
                for param in run.named_parameters.values():
                    param.fill_(step)
            run.evaluation.record(step, loss, run.named_parameters)
            store.save(run)
    assert all(run.stopped_early for run in stages)
    merged = load_stage_files(stores[0].latest_complete("add"))
    assert merged["step"] == 4 and merged["evaluation"]["best_step"] == 2
    best = published_parameters(merged)
    assert best.keys() == {"a", "b"} and torch.equal(best["a"], torch.full((2,), 2.0)) and torch.equal(best["b"], torch.full((3,), 2.0))
    # Restored onto one stage (a single process), or onto the first of two, the job is finished and
    # holds the best adapter of the layers it has; it keeps only those.
    whole = evaluated_job({"a": torch.nn.Parameter(torch.zeros(2)), "b": torch.nn.Parameter(torch.zeros(3))})
    first = evaluated_job({"a": torch.nn.Parameter(torch.zeros(2))})
    for run in (whole, first):
        assert CheckpointStore(tmp_path / "run").restore(run) and run.status == "finished" and run.step == 4
        assert run.evaluation.best_parameters.keys() == run.named_parameters.keys()
        assert all(torch.equal(param.detach(), best[key]) for key, param in run.named_parameters.items())


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path):
    store = CheckpointStore(tmp_path / "run")
    run = job(tmp_path)
    stepped(tmp_path, store, run, [1, 2])
    store.stage_file("add", 2).write_bytes(b"torn")
    fresh = job(tmp_path, weights={"w": torch.nn.Parameter(torch.zeros(3))})
    with pytest.warns(RunStateWarning, match="step-2 of job 'add' is damaged"):
        assert store.restore(fresh)
    assert fresh.step == 1 and torch.equal(fresh.named_parameters["w"].detach(), torch.ones(3))
    assert not CheckpointStore(tmp_path / "empty").restore(job(tmp_path))


def test_only_the_checkpoint_of_the_jobs_step_is_published(tmp_path):
    store = CheckpointStore(tmp_path / "run")
    run = job(tmp_path)
    stepped(tmp_path, store, run, [1])
    run.step = 2  # its step-2 checkpoint was never written
    with pytest.raises(RuntimeError, match="newest complete checkpoint is step 1, not the last step 2"):
        store.publish_adapter(run, {}, tmp_path / "run" / "add")
    assert not (tmp_path / "run" / "add").exists()
