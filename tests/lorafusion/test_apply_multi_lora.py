"""apply_multi_lora on a tiny Llama: a packed batch gives each job's sequences exactly what a model
with that job's adapter alone gives, and each adapter saves in PEFT's format, loadable by PEFT."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

from lorafusion import LoRAConfig, apply_lora
from lorafusion.adapters import save_adapter
from lorafusion.apply import apply_multi_lora
from lorafusion.lora_state import lora_modules, multi_lora_modules
from lorafusion.modules import MultiLoRABatch, multi_lora_batch

JOBS = {
    "qv": LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "all": LoRAConfig(r=8, lora_alpha=16, target_modules="all-linear", use_rslora=True),
    "mlp": LoRAConfig(r=2, lora_alpha=2, target_modules=r".*\.mlp\.down_proj"),
}


@pytest.fixture
def multi_model(tiny_llama):
    base = copy.deepcopy(tiny_llama)
    model = apply_multi_lora(tiny_llama, JOBS)
    torch.manual_seed(3)
    for layer in multi_lora_modules(model).values():
        for name in layer.adapter_names:
            torch.nn.init.normal_(layer.lora_B[name], std=0.1)
    return base, model


def single_job_model(base, multi_model, job):
    model = apply_lora(copy.deepcopy(base), JOBS[job])
    multi_layers = multi_lora_modules(multi_model)
    with torch.no_grad():
        for name, layer in lora_modules(model).items():
            layer.lora_A.copy_(multi_layers[name].lora_A[job])
            layer.lora_B.copy_(multi_layers[name].lora_B[job])
    return model


def test_each_adapter_only_on_its_targets(multi_model):
    _, model = multi_model
    layers = multi_lora_modules(model)
    assert set(layers["model.layers.0.self_attn.q_proj"].adapter_names) == {"qv", "all"}
    assert set(layers["model.layers.1.mlp.down_proj"].adapter_names) == {"all", "mlp"}
    assert "lm_head" not in layers
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_packed_batch_matches_each_job_alone(multi_model, input_ids):
    base, model = multi_model
    ids = torch.cat([input_ids, input_ids[:1]])  # 3 sequences of 9 tokens
    batch = MultiLoRABatch(["all", "qv", "mlp"], [9, 9, 9])
    with multi_lora_batch(model, batch):
        packed_logits = model(ids).logits
        packed_logits.square().mean().backward()
    for row, job in enumerate(["all", "qv", "mlp"]):
        alone = single_job_model(base, model, job)
        logits = alone(ids[row : row + 1]).logits
        torch.testing.assert_close(packed_logits[row : row + 1], logits, rtol=1e-5, atol=1e-5)
    # Gradients for the job's parameters equal the job-alone gradients of its share of the loss.
    alone = single_job_model(base, model, "qv")
    (alone(ids[1:2]).logits.square().sum() / packed_logits.numel()).backward()
    layer_name = "model.layers.1.self_attn.v_proj"
    torch.testing.assert_close(
        multi_lora_modules(model)[layer_name].lora_B["qv"].grad, lora_modules(alone)[layer_name].lora_B.grad, rtol=1e-4, atol=1e-7
    )


def test_each_adapter_saves_in_peft_format_and_loads_in_peft(multi_model, input_ids, tmp_path):
    base, model = multi_model
    batch = MultiLoRABatch(["all"], [input_ids.numel()])
    with torch.no_grad(), multi_lora_batch(model, batch):
        ours = model(input_ids).logits
    save_adapter(model, tmp_path / "all", adapter="all")
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "all")
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids).logits, ours, rtol=1e-5, atol=1e-5)


def test_bad_input(multi_model, tmp_path):
    base, model = multi_model
    with pytest.raises(ValueError, match=r"holds adapters \['all', 'mlp', 'qv'\]: name the one"):
        save_adapter(model, tmp_path / "x")
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        save_adapter(model, tmp_path / "x", adapter="nope")
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_multi_lora(model, JOBS)
    with pytest.raises(ValueError, match=r"entries \['nope_proj'\] match no nn.Linear"):
        apply_multi_lora(copy.deepcopy(base), {"x": LoRAConfig(target_modules=["nope_proj"])})
    with pytest.raises(ValueError, match="non-empty dict"):
        apply_multi_lora(copy.deepcopy(base), {})
