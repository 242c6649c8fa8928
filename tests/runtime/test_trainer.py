"""End-to-end multi-job training on a tiny Llama (CPU, torch backend, dropout 0): packed attention
equals each sample alone, multi-job training equals each job alone on the same microbatches, loss
falls, kill-and-resume equals an uninterrupted run, failures stay with their job, PEFT loads outputs."""

from __future__ import annotations

import dataclasses
import json

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

from lorafusion import multi_lora_modules
from lorafusion.modules import MultiLoRABatch, multi_lora_batch
from lorafusion.runtime.config import ModelSpec
from lorafusion.runtime.data import Sample
from lorafusion.runtime.model import build_base_model
from lorafusion.runtime.packing import pack_samples, per_token_loss
from lorafusion.runtime.trainer import MultiJobTrainer
from training_fixtures import TINY_MODEL, make_config

def adapters(trainer: MultiJobTrainer, job: str) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{matrix}": getattr(layer, matrix)[job].detach().clone()
        for name, layer in multi_lora_modules(trainer.model).items()
        if job in layer.adapters
        for matrix in ("lora_A", "lora_B")
    }


def assert_adapters_close(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=atol, msg=key)


def test_packed_microbatch_equals_each_sample_alone():
    model = build_base_model(make_spec_model())
    # The last sample has no BOS (as with tokenizers that lack one): its first label is a real token.
    samples = [Sample(1, (257, 5, 6, 7, 8, 258), (-100, -100, 6, 7, 8, 258)), Sample(2, (257, 9, 10, 258), (-100, 9, 10, 258)),
               Sample(3, (12, 11, 258), (12, 11, 258))]
    packed = pack_samples([("a", s) for s in samples])
    with torch.no_grad():
        logits = model(**packed.model_inputs()).logits
        losses = per_token_loss(logits, packed.labels)
        start = 0
        for sample in samples:
            alone = model(input_ids=torch.tensor([sample.input_ids])).logits
            n = len(sample.input_ids)
            torch.testing.assert_close(logits[:, start : start + n], alone, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(losses[start : start + n], per_token_loss(alone, torch.tensor([sample.labels])), rtol=1e-5, atol=1e-6)
            start += n
    # The first label of every sample is ignored, so no loss crosses sample boundaries.
    assert losses[0] == 0 and losses[6] == 0 and losses[10] == 0


def make_spec_model():
    return ModelSpec(path=None, architecture="llama", config=TINY_MODEL["config"], dtype="float32",
                     gradient_checkpointing=False, seed=3, quantize=None)


def test_multi_job_training_equals_each_job_alone_on_the_same_microbatches(tmp_path):
    together = MultiJobTrainer(make_config(tmp_path), progress=False)
    result = together.train()
    assert all(job.status == "finished" for job in result.jobs.values()), result.jobs
    schedule = together.plan(resume=True)
    assert any(len({ref.job for ref in mb.samples}) > 1 for mb in schedule.microbatches)  # jobs really mixed
    for job in ("add", "rev", "txt"):
        alone = MultiJobTrainer(make_config(tmp_path, jobs=(job,), output=f"alone-{job}"), progress=False)
        alone.train(schedule=schedule)
        assert_adapters_close(adapters(together, job), adapters(alone, job))


def test_jobs_with_dropout_trained_together_equal_each_job_alone_on_its_own_plan(tmp_path):
    # Alone, a job's samples are packed into other microbatches at other rows; its dropout masks
    # are named by its samples (not by rows or microbatch positions), so its adapter is the same.
    config = make_config(tmp_path, add=dict(lora_dropout=0.3), rev=dict(lora_dropout=0.5))
    together = MultiJobTrainer(config, progress=False)
    together.train()
    for job in ("add", "rev"):
        alone = MultiJobTrainer(
            make_config(tmp_path, jobs=(job,), output=f"alone-{job}", add=dict(lora_dropout=0.3), rev=dict(lora_dropout=0.5)),
            progress=False,
        )
        alone.train()
        assert alone.plan(resume=True).microbatches != together.plan(resume=True).microbatches
        assert_adapters_close(adapters(together, job), adapters(alone, job))
    # The dropout is real: without it the adapter differs.
    undropped = MultiJobTrainer(make_config(tmp_path, jobs=("add",), output="undropped", add=dict(lora_dropout=0.0)), progress=False)
    undropped.train()
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(adapters(together, "add").values(), adapters(undropped, "add").values()))


def test_gradient_checkpointing_trains_the_adapters_it_trains_without(tmp_path):
    # The checkpointed decoder layers are run again in the backward pass, after multi_lora_batch
    # has ended: they get their microbatch's batch back (segments and dropout masks).
    def trained(output, gradient_checkpointing):
        config = make_config(tmp_path, jobs=("add", "rev"), output=output, add=dict(lora_dropout=0.3, max_steps=3), rev=dict(max_steps=3))
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, gradient_checkpointing=gradient_checkpointing))
        trainer = MultiJobTrainer(config, progress=False)
        result = trainer.train()
        assert all(job.status == "finished" for job in result.jobs.values()), result.jobs
        return trainer

    plain, checkpointed = trained("plain", False), trained("checkpointed", True)
    assert checkpointed.model.model.layers[0].gradient_checkpointing
    for job in ("add", "rev"):
        assert_adapters_close(adapters(checkpointed, job), adapters(plain, job))


def test_loss_falls_and_metrics_are_written(tmp_path):
    # The base is random: the adapter on lm_head is what can learn the answers' token distribution.
    targets = ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    config = make_config(tmp_path, jobs=("add",), add=dict(max_steps=12, lr=3e-2, lr_schedule="constant", target_modules=targets))
    MultiJobTrainer(config, progress=False).train()
    records = [json.loads(line) for line in (config.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))
    assert {"job", "step", "loss", "tokens"} <= records[0].keys() and records[0]["tokens"] > 0
    assert max(r["loss"] for r in records[-3:]) < 0.7 * records[0]["loss"]


def test_kill_and_resume_equals_uninterrupted_run(tmp_path):
    with_dropout = dict(add=dict(lora_dropout=0.3))  # masks are named by sample and layer, not drawn from RNG state
    uninterrupted = MultiJobTrainer(make_config(tmp_path, output="full", **with_dropout), progress=False)
    uninterrupted.train()
    killed = MultiJobTrainer(make_config(tmp_path, output="resumed", **with_dropout), progress=False)
    assert killed.train(stop_after_microbatches=5).interrupted
    assert (tmp_path / "resumed" / "checkpoints").is_dir()
    resumed = MultiJobTrainer(make_config(tmp_path, output="resumed", **with_dropout), progress=False)
    result = resumed.train(resume=True)
    assert all(job.status == "finished" for job in result.jobs.values())
    for job in ("add", "rev", "txt"):
        assert_adapters_close(adapters(uninterrupted, job), adapters(resumed, job))
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines() if '"add"' in line]
    assert sorted(steps) == [1, 2, 3, 4]  # steps redone after the checkpoint are logged once


def test_a_diverging_job_is_stopped_and_the_others_are_unaffected(tmp_path):
    config = make_config(tmp_path, add=dict(lr=1e30))
    trainer = MultiJobTrainer(config, progress=False)
    result = trainer.train()
    assert result.jobs["add"].status == "failed" and "non-finite" in result.jobs["add"].failure
    assert json.loads((config.output_dir / "add" / "status.json").read_text())["status"] == "failed"
    assert result.jobs["rev"].status == result.jobs["txt"].status == "finished"
    clean = MultiJobTrainer(make_config(tmp_path, jobs=("rev",), output="clean"), progress=False)
    clean.train(schedule=trainer.plan(resume=True))
    assert_adapters_close(adapters(trainer, "rev"), adapters(clean, "rev"), atol=1e-5)


def test_a_bad_record_stops_only_its_job(tmp_path):
    config = make_config(tmp_path)
    with open(config.jobs[1].data, "a") as out:
        out.write('{"prompt": "x"}\n')  # no completion: record 41
    result = MultiJobTrainer(config, progress=False).train()
    assert result.jobs["rev"].status == "failed" and "41" in result.jobs["rev"].failure
    assert result.jobs["add"].status == result.jobs["txt"].status == "finished"


def test_outputs_load_in_peft(tmp_path):
    config = make_config(tmp_path, jobs=("add", "rev"))
    trainer = MultiJobTrainer(config, progress=False)
    trainer.train()
    out = config.output_dir
    assert (out / "add" / "adapter_model.safetensors").is_file()
    base = transformers.AutoModelForCausalLM.from_pretrained(out / "base_model", local_files_only=True)
    peft_model = peft.PeftModel.from_pretrained(base, out / "rev").eval()
    ids = torch.tensor([[257, 10, 11, 12, 13]])
    trainer.model.eval()
    with torch.no_grad(), multi_lora_batch(trainer.model, MultiLoRABatch(["rev"], [5])):
        ours = trainer.model(input_ids=ids).logits
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, ours, rtol=1e-5, atol=1e-5)
    saved = load_file(out / "rev" / "adapter_model.safetensors")
    assert any(key.endswith("lora_B.weight") and value.abs().sum() > 0 for key, value in saved.items())


@pytest.mark.parametrize("policy", ["megatron", "mlora"])
def test_baseline_schedules_train_the_same_adapters(tmp_path, policy):
    """A job's step sums its whole global batch, so how samples are grouped into microbatches (the
    schedule policy) changes the speed, never the result."""
    ours = MultiJobTrainer(make_config(tmp_path, output="ours"), progress=False)
    ours.train()
    config = make_config(tmp_path, output=policy)
    config = dataclasses.replace(config, scheduler=dataclasses.replace(config.scheduler, policy=policy))
    baseline = MultiJobTrainer(config, progress=False)
    baseline.train()
    schedule = baseline.plan(resume=True)
    assert all(len({ref.job for ref in mb.samples}) <= 1 for mb in schedule.microbatches)  # one job per microbatch
    for job in ("add", "rev", "txt"):
        assert_adapters_close(adapters(ours, job), adapters(baseline, job), atol=1e-5)


def test_resume_after_a_kill_between_a_jobs_last_checkpoint_and_its_adapter(tmp_path, monkeypatch):
    full = MultiJobTrainer(make_config(tmp_path, output="full"), progress=False)
    full.train()
    crashing = MultiJobTrainer(make_config(tmp_path, output="crash"), progress=False)

    def killed(job):
        raise KeyboardInterrupt  # right after the first finishing job's final checkpoint

    monkeypatch.setattr(crashing, "publish_adapter", killed)
    with pytest.raises(KeyboardInterrupt):
        crashing.train()
    assert not any((tmp_path / "crash" / job / "adapter_model.safetensors").exists() for job in ("add", "rev", "txt"))
    result = MultiJobTrainer(make_config(tmp_path, output="crash"), progress=False).train(resume=True)
    assert all(job.status == "finished" for job in result.jobs.values())
    for job in ("add", "rev", "txt"):
        saved = load_file(tmp_path / "crash" / job / "adapter_model.safetensors")
        expected = load_file(tmp_path / "full" / job / "adapter_model.safetensors")
        assert saved.keys() == expected.keys()
        for key in saved:
            torch.testing.assert_close(saved[key], expected[key], rtol=1e-5, atol=1e-6)


def test_steps_go_to_tensorboard_when_it_is_installed(tmp_path, monkeypatch):
    scalars = []

    class FakeWriter:  # stands in for torch.utils.tensorboard.SummaryWriter
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, step):
            scalars.append((tag, step))

        def close(self):
            scalars.append(("closed", None))

    monkeypatch.setattr("lorafusion.runtime.trainer._tensorboard_writer", lambda log_dir: FakeWriter(log_dir))
    MultiJobTrainer(make_config(tmp_path, jobs=("add",)), progress=False).train()
    assert ("add/loss", 1) in scalars and ("add/lr", 4) in scalars and scalars[-1] == ("closed", None)


def test_resume_refuses_changed_job_data(tmp_path):
    config = make_config(tmp_path, jobs=("add", "rev"))
    MultiJobTrainer(config, progress=False).train(stop_after_microbatches=2)
    with open(config.jobs[1].data, "a") as out:
        out.write('{"prompt": "zz>", "completion": "zz"}\n')
    with pytest.raises(ValueError, match=r"jobs \['rev'\] differ"):
        MultiJobTrainer(config, progress=False).train(resume=True)


def test_resume_refuses_a_run_whose_dropout_masks_were_drawn_by_row(tmp_path):
    # A run checkpointed by a lorafusion that drew masks by microbatch row (its fingerprint has no
    # dropout_masks) would continue with other masks: neither run. Jobs without dropout resume.
    config = make_config(tmp_path, jobs=("add", "txt"))  # add has dropout, txt none
    MultiJobTrainer(config, progress=False).train(stop_after_microbatches=2)
    schedule_file = config.output_dir / "schedule.json"
    saved = json.loads(schedule_file.read_text())
    for job in saved["fingerprint"]["jobs"].values():
        job.pop("dropout_masks", None)
    schedule_file.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"jobs \['add'\] were trained with dropout masks drawn by microbatch row"):
        MultiJobTrainer(config, progress=False).train(resume=True)


def test_resume_refuses_another_base_model(tmp_path):
    # Another model.seed is another inline base model: its checkpoints' adapters were trained on the
    # first one (which base_model/ still holds), so continuing them would train neither run.
    config = make_config(tmp_path, jobs=("add",))
    MultiJobTrainer(config, progress=False).train(stop_after_microbatches=2)
    other = dataclasses.replace(config, model=dataclasses.replace(config.model, seed=config.model.seed + 1))
    with pytest.raises(ValueError, match=r"schedule\.json was planned for another base model or tokenizer \(model\.seed differs\)"):
        MultiJobTrainer(other, progress=False).train(resume=True)
    assert MultiJobTrainer(config, progress=False).train(resume=True).jobs["add"].status == "finished"


def test_the_resume_fingerprint_does_not_depend_on_key_order():
    # yaml.safe_dump sorts keys: the same inline model config or columns written in another order
    # is the same run (a torchrun worker's config once failed to resume in the parent this way).
    from lorafusion.runtime.trainer import _stable_text

    assert _stable_text({"b": 1, "a": {"d": 2, "c": 3}}) == _stable_text({"a": {"c": 3, "d": 2}, "b": 1})
    assert _stable_text({"a": 1}) != _stable_text({"a": 2}) and _stable_text(0.5) == "0.5"
