"""`model.quantize: nf4` in the training runtime: multi-job QLoRA on a tiny Llama runs end to end
with 4-bit base linears, its loss falls, and it trains exactly as the same run on the dequantized
(NF4-rounded) full-precision base does."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from lorafusion import multi_lora_modules
from lorafusion.qlora import NF4Linear, quantize_nf4
from lorafusion.runtime import trainer as trainer_module
from lorafusion.runtime.trainer import MultiJobTrainer


def _trainer_test_helpers():
    """tests/runtime/test_trainer.py as a module (tests are not a package), for its config helpers."""
    spec = importlib.util.spec_from_file_location("runtime_trainer_test_helpers", Path(__file__).with_name("test_trainer.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


helpers = _trainer_test_helpers()
TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def qlora_config(tmp_path: Path, output: str, quantize: str | None):
    config = helpers.make_config(
        tmp_path, jobs=("add", "txt"), output=output,
        add=dict(max_steps=12, lr=2e-2, lr_schedule="constant", target_modules=TARGETS),
        txt=dict(max_steps=4, target_modules=["q_proj", "v_proj"]),
    )
    return dataclasses.replace(config, model=dataclasses.replace(config.model, quantize=quantize))


def job_losses(config, job: str) -> list[float]:
    records = [json.loads(line) for line in (config.output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["job"] == job]


def test_nf4_multi_job_training_runs_and_its_loss_falls(tmp_path):
    config = qlora_config(tmp_path, "nf4", "nf4")
    trainer = MultiJobTrainer(config, progress=False)
    layers = multi_lora_modules(trainer.model)
    assert layers and all(layer.quantized for layer in layers.values())
    assert isinstance(trainer.model.model.layers[0].self_attn.k_proj, NF4Linear)  # no job targets it
    assert type(trainer.model.model.embed_tokens) is nn.Embedding

    result = trainer.train()
    assert all(job.status == "finished" for job in result.jobs.values()), result.jobs
    losses = job_losses(config, "add")
    assert len(losses) == 12
    assert max(losses[-3:]) < 0.5 * losses[0]
    assert (config.output_dir / "add" / "adapter_model.safetensors").is_file()


def test_nf4_training_equals_training_on_the_dequantized_base(tmp_path, monkeypatch):
    quantized = qlora_config(tmp_path, "nf4", "nf4")
    MultiJobTrainer(quantized, progress=False).train()

    build = trainer_module.build_base_model

    def nf4_rounded_base(spec, device):
        model = build(spec, device)
        with torch.no_grad():
            for module in model.modules():
                if type(module) is nn.Linear:
                    module.weight.copy_(quantize_nf4(module.weight).dequantize(backend="torch"))
        return model

    monkeypatch.setattr(trainer_module, "build_base_model", nf4_rounded_base)
    rounded = qlora_config(tmp_path, "rounded", None)
    MultiJobTrainer(rounded, progress=False).train()
    for job in ("add", "txt"):
        expected = job_losses(rounded, job)
        assert expected and job_losses(quantized, job) == pytest.approx(expected, rel=1e-6)
