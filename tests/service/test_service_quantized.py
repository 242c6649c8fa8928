"""`lorafusion serve` with model.quantize: nf4: the base is quantized once at start, each job's
adapter goes on the NF4 layers when it arrives and ends equal to `lorafusion train` of that job
alone on the same quantized model, also across a kill -9 and restart (which quantizes again, to
the same bytes); the published adapter loads onto a 4-bit base with our load_adapter and PEFT."""

from __future__ import annotations

import json
import signal

import peft
import pytest
import torch
import transformers
from torch import nn

from lorafusion.adapter_loading import load_adapter
from lorafusion.cli import main
from lorafusion.apply import quantize_linears
from lorafusion.lora_state import lora_modules, multi_lora_modules
from lorafusion.qlora import NF4Linear, quantize_nf4
from lorafusion.service.client import ServiceError
from service_fixtures import (
    RunningService,
    alone_adapter,
    assert_adapters_close,
    job_entry,
    kill_9,
    server_dict,
    service_adapter,
    start_serve,
    wait_for,
)

QUANTIZED = {"quantize": "nf4"}


def test_jobs_submitted_to_a_quantized_service_each_equal_training_alone(tmp_path):
    add = job_entry(tmp_path, "add", max_steps=6)  # all-linear
    rev = job_entry(tmp_path, "rev", target_modules=["q_proj", "v_proj", "down_proj"])
    with RunningService(server_dict(tmp_path, **QUANTIZED, admission="all_live"), tmp_path, microbatch_delay_s=0.05) as service:
        model = service.service.trainer.model
        linears = {name: module for name, module in model.named_modules() if isinstance(module, (nn.Linear, NF4Linear))}
        assert [name for name, module in linears.items() if not isinstance(module, NF4Linear)] == ["lm_head"]
        service.client.submit(add)
        wait_for(lambda: service.state("add")["step"] >= 2, what="add's step 2")
        service.client.submit(rev)  # joins mid-run: its adapter goes on layers add already trains on
        wait_for(lambda: service.state("rev")["step"] >= 1, what="rev's first step")
        layers = multi_lora_modules(model)
        assert layers and all(layer.quantized for layer in layers.values())
        ended = service.wait_ended("add", "rev")
    assert {name: job["state"] for name, job in ended.items()} == {"add": "finished", "rev": "finished"}
    assert ended["rev"]["started_at"] < ended["add"]["ended_at"]  # they shared windows
    for entry in (add, rev):
        assert_adapters_close(service_adapter(tmp_path / "state", entry["name"]), alone_adapter(tmp_path, entry, **QUANTIZED))


def test_a_job_targeting_the_unquantized_output_layer_is_refused(tmp_path):
    with RunningService(server_dict(tmp_path, **QUANTIZED), tmp_path) as service:
        with pytest.raises(ServiceError) as refused:
            service.client.submit(job_entry(tmp_path, "add", target_modules=["q_proj", "lm_head"]))
        assert service.client.jobs() == []
    assert refused.value.problems == [{"key": "target_modules", "reason": (
        "selects lm_head, which a service with model.quantize: nf4 keeps unquantized for every job "
        "(quantizing it for this job would change the others); leave it out of target_modules")}]


def test_the_published_adapter_loads_onto_a_4bit_base(tmp_path):
    rev = job_entry(tmp_path, "rev", max_steps=3)
    with RunningService(server_dict(tmp_path, **QUANTIZED), tmp_path) as service:
        service.client.submit(rev)
        assert service.wait_ended("rev")["rev"]["state"] == "finished"
    base, adapter = tmp_path / "state" / "base_model", tmp_path / "state" / "adapters" / "rev"
    published = service_adapter(tmp_path / "state", "rev")
    settings = json.loads((adapter / "adapter_config.json").read_text())
    scaling = settings["lora_alpha"] / settings["r"]
    assert all(value.abs().sum() > 0 for key, value in published.items() if "lora_B" in key)  # it trained

    # Our 4-bit base (the saved base quantized as the service quantizes it) with the adapter loaded
    # computes, in plain torch, each layer's NF4-rounded weight plus scaling * B @ A.
    ours = load_adapter(quantize_linears(transformers.AutoModelForCausalLM.from_pretrained(base), backend="torch"), adapter, backend="torch")
    reference = transformers.AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        for name, module in reference.named_modules():
            if type(module) is nn.Linear and name != "lm_head":
                key = f"base_model.model.{name}.lora_"
                delta = published[key + "B.weight"] @ published[key + "A.weight"]
                module.weight.copy_(quantize_nf4(module.weight).dequantize(backend="torch") + scaling * delta)
    assert all(layer.quantized for layer in lora_modules(ours).values()) and len(lora_modules(ours)) == 14
    ids = torch.tensor([[257, 10, 11, 12, 13, 62]])
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(input_ids=ids).logits, reference.eval()(input_ids=ids).logits, rtol=1e-5, atol=1e-5)

    # transformers' own 4-bit load (bitsandbytes NF4, double quantization) takes it with our
    # load_adapter and with PEFT, every LoRA weight as published.
    nf4 = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.float32)
    bnb_4bit = load_adapter(transformers.AutoModelForCausalLM.from_pretrained(base, quantization_config=nf4, device_map="cpu"), adapter, backend="torch")
    loaded = {f"base_model.model.{name}.lora_{m}.weight": getattr(layer, f"lora_{m}") for name, layer in lora_modules(bnb_4bit).items() for m in "AB"}
    in_peft = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(
        base, quantization_config=nf4, device_map="cpu"), adapter)
    for read in (loaded, peft.get_peft_model_state_dict(in_peft)):
        assert read.keys() == published.keys()
        for key in published:
            torch.testing.assert_close(read[key].detach(), published[key], atol=0, rtol=0, msg=key)
    assert all(layer.quantized for layer in lora_modules(bnb_4bit).values())


def test_kill_9_and_restart_of_a_quantized_service_loses_nothing(tmp_path):
    config_path = tmp_path / "server.yaml"
    config_path.write_text(json.dumps(server_dict(tmp_path, **QUANTIZED)))
    rev = job_entry(tmp_path, "rev", max_steps=8)
    log = tmp_path / "serve.log"

    process, client = start_serve(config_path, log, microbatch_delay_s=0.05)
    client.submit(rev)
    wait_for(lambda: client.job("rev")["step"] >= 3, what="rev's step 3")
    kill_9(process)  # mid-run: rev has a checkpoint at step 2

    process, client = start_serve(config_path, log)
    try:
        wait_for(lambda: client.job("rev")["state"] == "finished", what="rev to finish")
        logs = [line["line"] for line in client.logs("rev")]
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log.read_text()[-3000:]
    assert any(line.startswith("resumed from its checkpoint at step") for line in logs), logs
    assert_adapters_close(service_adapter(tmp_path / "state", "rev"), alone_adapter(tmp_path, rev, **QUANTIZED))


def test_a_restart_with_another_base_is_refused(tmp_path, capsys):
    """Checkpoints trained on the unquantized base do not continue on the quantized one (nor the
    reverse): a restart that changes the model section is one line naming each changed key."""
    with RunningService(server_dict(tmp_path), tmp_path) as service:
        service.client.submit(job_entry(tmp_path, "rev", max_steps=100))
        wait_for(lambda: service.state("rev")["step"] >= 1, what="rev's first step")
    (tmp_path / "server.yaml").write_text(json.dumps(server_dict(tmp_path, **QUANTIZED)))
    capsys.readouterr()
    assert main(["serve", str(tmp_path / "server.yaml"), "--device", "cpu"]) == 2
    assert capsys.readouterr().err == (
        f"lorafusion serve: {tmp_path / 'state'} was served with another base model (model.quantize is \"nf4\" but "
        "was null): its jobs' checkpoints are of that one; serve it with those settings, or choose another state_dir\n"
    )
    with RunningService(server_dict(tmp_path), tmp_path) as service:  # with its own settings it goes on
        assert service.state("rev")["state"] in ("queued", "running")


def test_a_first_start_that_failed_to_load_its_base_binds_no_settings(tmp_path, monkeypatch, capsys):
    """A start that ends before its base model is loaded (out of memory, Ctrl-C, a bad checkpoint)
    trained nothing: the next start, with other settings, is served, not refused as another base."""

    def out_of_memory(*args, **kwargs):
        raise ValueError("not enough memory for the base model")

    (tmp_path / "server.yaml").write_text(json.dumps(server_dict(tmp_path)))
    with monkeypatch.context() as patched:
        patched.setattr("lorafusion.service.trainer.build_base_model", out_of_memory)
        assert main(["serve", str(tmp_path / "server.yaml"), "--device", "cpu"]) == 2
    assert capsys.readouterr().err == "lorafusion serve: not enough memory for the base model\n"
    with RunningService(server_dict(tmp_path, **QUANTIZED), tmp_path) as service:
        service.client.submit(job_entry(tmp_path, "rev", max_steps=100))
        wait_for(lambda: service.state("rev")["step"] >= 1, what="rev's first step")
    (tmp_path / "server.yaml").write_text(json.dumps(server_dict(tmp_path)))  # the base it trained on is kept now
    assert main(["serve", str(tmp_path / "server.yaml"), "--device", "cpu"]) == 2
    assert "was served with another base model (model.quantize is null but was \"nf4\")" in capsys.readouterr().err
