"""A job's eval loss on its packed eval microbatches equals a float64 forward of each eval sample
alone; the eval_fraction split is deterministic by seed; early stopping's bookkeeping."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch.nn import functional as F

from lorafusion.apply import apply_multi_lora
from lorafusion.config import LoRAConfig
from lorafusion.modules import MultiLoRABatch, multi_lora_batch
from lorafusion.runtime.config import ModelSpec
from lorafusion.runtime.data import IGNORE_INDEX, load_samples
from lorafusion.runtime.eval_loss import (
    JobEvaluation,
    eval_loss,
    job_samples,
    pack_eval_microbatches,
    published_parameters,
    split_off_eval,
)
from lorafusion.runtime.model import build_base_model
from lorafusion.runtime.tokenizer import ByteTokenizer
from training_fixtures import TINY_MODEL, make_config, write_jobs_data


def model_with_adapters():
    spec = ModelSpec(path=None, architecture="llama", config=TINY_MODEL["config"], seed=3)
    model = build_base_model(spec, "cpu")
    configs = {name: LoRAConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.1, backend="torch") for name in ("a", "b")}
    apply_multi_lora(model, configs, init_seeds={"a": 1, "b": 2})
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B starts at zero: give both adapters weights that change the logits
        for module in model.modules():
            if hasattr(module, "lora_B") and isinstance(module.lora_B, torch.nn.ParameterDict):
                for parameter in module.lora_B.values():
                    parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return model.train()


def manual_eval_loss(model, adapter: str, samples) -> float:
    """Each sample alone, in float64 cross-entropy: the sum over target tokens / their count."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for sample in samples:
            ids = torch.tensor([sample.input_ids])
            with multi_lora_batch(model, MultiLoRABatch([adapter], [ids.numel()])):
                logits = model(input_ids=ids).logits[0]
            labels = torch.tensor(sample.labels)
            total += float(F.cross_entropy(logits[:-1].double(), labels[1:], ignore_index=IGNORE_INDEX, reduction="sum"))
            count += int((labels[1:] != IGNORE_INDEX).sum())
    model.train()
    return total / count


def test_eval_loss_equals_a_forward_of_each_sample_alone(tmp_path: Path) -> None:
    paths = write_jobs_data(tmp_path)
    samples = load_samples(paths["add"], "prompt_completion", ByteTokenizer(), 24)[:13]
    microbatches = pack_eval_microbatches(samples, capacity=40)
    assert len(microbatches) > 3 and any(len(mb) > 1 for mb in microbatches)
    assert [s for mb in microbatches for s in mb] == samples and all(sum(len(s.input_ids) for s in mb) <= 40 for mb in microbatches)
    model = model_with_adapters()
    loss_a = eval_loss(model, "a", microbatches, "cpu")
    assert model.training  # restored
    assert math.isclose(loss_a, manual_eval_loss(model, "a", samples), rel_tol=1e-6)
    assert abs(loss_a - eval_loss(model, "b", microbatches, "cpu")) > 1e-3  # the adapter matters
    # No dropout and no gradients: the same value again, and nothing accumulated.
    assert eval_loss(model, "a", microbatches, "cpu") == loss_a
    assert all(p.grad is None for p in model.parameters())


def test_eval_fraction_split_is_deterministic_by_seed(tmp_path: Path) -> None:
    samples = load_samples(write_jobs_data(tmp_path)["rev"], "prompt_completion", ByteTokenizer(), 24)
    train, held_out = split_off_eval(samples, 0.2, seed=5, source="rev.jsonl")
    assert len(held_out) == 8 and len(train) == 32
    assert sorted(s.record for s in train + held_out) == [s.record for s in samples]
    assert [s.record for s in held_out] == sorted(s.record for s in held_out)  # file order kept
    assert split_off_eval(samples, 0.2, seed=5, source="x") == (train, held_out)
    assert split_off_eval(samples, 0.2, seed=6, source="x")[1] != held_out
    assert len(split_off_eval(samples, 0.001, seed=5, source="x")[1]) == 1


def test_job_samples_reads_eval_data_or_splits_by_fraction(tmp_path: Path) -> None:
    config = make_config(tmp_path, jobs=("add",), add={"eval_fraction": 0.25})
    train, held_out = job_samples(config.jobs[0], ByteTokenizer())
    assert (len(train), len(held_out)) == (30, 10)
    config = make_config(tmp_path, jobs=("add",), add={"eval_data": str(tmp_path / "rev.jsonl")})
    train, held_out = job_samples(config.jobs[0], ByteTokenizer())
    assert (len(train), len(held_out)) == (40, 40) and held_out[0].input_ids != train[0].input_ids


def test_early_stopping_keeps_the_best_adapter(tmp_path: Path) -> None:
    spec = make_config(tmp_path, jobs=("add",), add={"eval_fraction": 0.1, "eval_every": 2, "early_stopping_patience": 2}).jobs[0]
    evaluation = JobEvaluation(spec, [], capacity=96)
    assert [step for step in range(1, 10) if evaluation.due(step, num_steps=9)] == [2, 4, 6, 8, 9]
    weights = {"w": torch.zeros(2)}
    found = []
    for step, loss in ((2, 3.0), (4, 2.0), (6, 2.5), (8, float("nan")), (10, 1.0)):
        weights["w"] += 1
        found.append(evaluation.record(step, loss, weights))
    assert found == [False, False, False, True, False]  # stops after two evals without a better loss
    assert (evaluation.best_step, evaluation.best_loss) == (10, 1.0)
    restored = JobEvaluation(spec, [], capacity=96)
    restored.load_state_dict(evaluation.state_dict())
    assert restored.state_dict()["best_step"] == 10 and torch.equal(restored.best_parameters["w"], torch.full((2,), 5.0))
    checkpoint = {"parameters": {"w": torch.zeros(2)}, "evaluation": evaluation.state_dict()}
    assert torch.equal(published_parameters(checkpoint)["w"], torch.full((2,), 5.0))
    assert torch.equal(published_parameters({"parameters": {"w": torch.zeros(2)}})["w"], torch.zeros(2))
