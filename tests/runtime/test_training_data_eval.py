"""Training on real data end to end (tiny Llama, CPU): a chat job trains on its assistant tokens and
exports a PEFT adapter; Parquet and save_to_disk datasets train the same adapter as the equivalent
JSONL; the eval loss a run logs equals a float64 forward of the published adapter over the held-out
records; early stopping publishes the adapter of the best eval, also after a kill and --resume."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file
from torch.nn import functional as F

from chat_fixtures import CONVERSATIONS, VOCAB_SIZE, save_chat_tokenizer, write_chat_jsonl
from lorafusion import multi_lora_modules
from lorafusion.adapters import adapter_key
from lorafusion.runtime.config import parse_config
from lorafusion.runtime.data import IGNORE_INDEX, load_samples
from lorafusion.runtime.eval_loss import JobEvaluation, split_off_eval
from lorafusion.runtime.tokenizer import ByteTokenizer
from lorafusion.runtime.trainer import MultiJobTrainer
from training_fixtures import TINY_MODEL, config_dict

import datasets  # the `data` extra, part of `dev`: missing, these tests fail rather than skip


def saved_adapter(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "adapter_model.safetensors")


def train(data: dict, tmp_path: Path, progress: bool = False):
    trainer = MultiJobTrainer(parse_config(data, base_dir=tmp_path), device="cpu", progress=progress)
    return trainer, trainer.train()


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_chat_job_trains_and_exports_a_peft_adapter(tmp_path: Path) -> None:
    tokenizer_dir = save_chat_tokenizer(tmp_path / "tokenizer", markers=False)
    chats = write_chat_jsonl(tmp_path / "chat.jsonl", [conversation for conversation, _ in CONVERSATIONS] * 6)
    data = config_dict(tmp_path, jobs=("add",), add={"data": str(chats), "format": "messages", "max_seq_len": 256, "max_steps": 3, "global_batch_size": 4})
    data["tokenizer"] = str(tokenizer_dir)
    data["model"] = {**TINY_MODEL, "config": {**TINY_MODEL["config"], "vocab_size": VOCAB_SIZE, "max_position_embeddings": 256}}
    data["scheduler"]["capacity"] = 512
    trainer, result = train(data, tmp_path)
    assert result.jobs["add"].status == "finished" and result.jobs["add"].steps == 3
    # The loss of a step is over the assistant tokens only: the samples' labels hold nothing else.
    sample = trainer.jobs["add"].samples[1]
    assert 0 < sample.num_target_tokens < len(sample.input_ids) // 3
    out = Path(data["output_dir"])
    base = transformers.AutoModelForCausalLM.from_pretrained(out / "base_model", local_files_only=True)
    assert transformers.AutoTokenizer.from_pretrained(out / "base_model").chat_template  # saved with the model
    peft_model = peft.PeftModel.from_pretrained(base, out / "add").eval()
    ids = torch.tensor([sample.input_ids])
    with torch.no_grad():
        trained = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            untouched = peft_model(input_ids=ids).logits
    assert not torch.allclose(trained, untouched, atol=1e-4)  # the adapter learnt something


def test_disk_datasets_train_the_same_adapter_as_jsonl(tmp_path: Path) -> None:
    jsonl = Path(config_dict(tmp_path, jobs=("add",))["jobs"][0]["data"])
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    table = datasets.Dataset.from_list([{"question": r["prompt"], "answer": r["completion"], "id": i} for i, r in enumerate(records)])
    table.to_parquet(str(tmp_path / "add.parquet"))
    table.save_to_disk(str(tmp_path / "add_saved"))
    columns = {"prompt": "question", "completion": "answer"}
    adapters = {}
    for name, settings in {
        "jsonl": {},
        "parquet": {"data": str(tmp_path / "add.parquet"), "columns": columns},
        "saved": {"data": str(tmp_path / "add_saved"), "columns": columns},
    }.items():
        data = config_dict(tmp_path, jobs=("add",), output=name, add={"lora_dropout": 0.1, **settings})
        _, result = train(data, tmp_path)
        assert result.jobs["add"].status == "finished"
        adapters[name] = saved_adapter(tmp_path / name / "add")
    for name in ("parquet", "saved"):
        assert adapters[name].keys() == adapters["jsonl"].keys()
        assert all(torch.equal(adapters[name][key], adapters["jsonl"][key]) for key in adapters["jsonl"])


def peft_eval_loss(output_dir: Path, job: str, samples) -> float:
    """The published adapter loaded by PEFT onto the saved base model, each sample alone, float64."""
    base = transformers.AutoModelForCausalLM.from_pretrained(output_dir / "base_model", local_files_only=True)
    model = peft.PeftModel.from_pretrained(base, output_dir / job).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for sample in samples:
            logits = model(input_ids=torch.tensor([sample.input_ids])).logits[0]
            labels = torch.tensor(sample.labels)
            total += float(F.cross_entropy(logits[:-1].double(), labels[1:], ignore_index=IGNORE_INDEX, reduction="sum"))
            count += int((labels[1:] != IGNORE_INDEX).sum())
    return total / count


def test_logged_eval_loss_equals_a_forward_of_the_published_adapter(tmp_path: Path, monkeypatch, capsys) -> None:
    scalars = {}

    class FakeWriter:  # stands in for torch.utils.tensorboard.SummaryWriter
        def __init__(self, log_dir):
            pass

        def add_scalar(self, tag, value, step):
            scalars[tag, step] = value

        def close(self):
            pass

    monkeypatch.setattr("lorafusion.runtime.trainer._tensorboard_writer", FakeWriter)
    settings = {"eval_fraction": 0.25, "eval_every": 2, "max_steps": 5, "lora_dropout": 0.1}
    data = config_dict(tmp_path, jobs=("add", "txt"), add=settings)
    _, result = train(data, tmp_path, progress=True)  # not a terminal here: plain progress lines
    out = Path(data["output_dir"])
    logged = {r["step"]: r["eval_loss"] for r in metrics(out) if r["job"] == "add" and "eval_loss" in r}
    assert sorted(logged) == [2, 4, 5]  # every eval_every steps and at the last one
    assert result.jobs["add"].eval_loss == logged[5] and result.jobs["txt"].eval_loss is None  # the closing summary's
    assert {step: value for (tag, step), value in scalars.items() if tag == "add/eval_loss"} == logged
    assert f"add: step 5/5, loss {result.jobs['add'].final_loss:.4f}, eval loss {logged[5]:.4f} (step 5)" in capsys.readouterr().out
    assert not any("eval_loss" in r for r in metrics(out) if r["job"] == "txt")
    samples = load_samples(data["jobs"][0]["data"], "prompt_completion", ByteTokenizer(), 24)
    train_samples, held_out = split_off_eval(samples, 0.25, seed=1, source="add.jsonl")
    assert len(held_out) == 10
    assert logged[5] == pytest.approx(peft_eval_loss(out, "add", held_out), rel=1e-5)
    assert logged[2] != logged[5]
    # Evaluating changes nothing in training: the same adapter as a run without eval steps, trained
    # on the same 30 records (eval_data holds the other 10 there, evaluated only at the end).
    lines = Path(data["jobs"][0]["data"]).read_text().splitlines()
    kept = {s.record for s in train_samples}
    (tmp_path / "train30.jsonl").write_text("".join(line + "\n" for number, line in enumerate(lines, 1) if number in kept))
    plain = config_dict(tmp_path, jobs=("add", "txt"), output="plain", add={"max_steps": 5, "lora_dropout": 0.1, "data": str(tmp_path / "train30.jsonl")})
    train(plain, tmp_path)
    ours, theirs = saved_adapter(out / "add"), saved_adapter(tmp_path / "plain" / "add")
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)


SCRIPTED_EVAL_LOSSES = [3.0, 2.0, 2.5, 2.6, 1.0, 0.5]  # best at the 2nd eval; patience 2 stops at the 4th


def scripted_evaluation(monkeypatch) -> dict[int, dict[str, torch.Tensor]]:
    """Eval losses from the script above, and a copy of the adapter at each eval (by eval number)."""
    snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def loss(self, model, adapter, device):
        snapshots[len(snapshots) + 1] = {
            adapter_key(name, matrix): getattr(layer, matrix)[adapter].detach().clone()
            for name, layer in multi_lora_modules(model).items()
            if adapter in layer.adapters
            for matrix in ("lora_A", "lora_B")
        }
        return SCRIPTED_EVAL_LOSSES[len(snapshots) - 1]

    monkeypatch.setattr(JobEvaluation, "loss", loss)
    return snapshots


def test_early_stopping_publishes_the_best_steps_adapter(tmp_path: Path, monkeypatch) -> None:
    snapshots = scripted_evaluation(monkeypatch)
    settings = {"eval_fraction": 0.1, "eval_every": 1, "early_stopping_patience": 2, "max_steps": 6}
    data = config_dict(tmp_path, jobs=("add", "txt"), add=settings, checkpoint_every=1)
    _, result = train(data, tmp_path)
    out = Path(data["output_dir"])
    assert result.jobs["add"].status == "finished" and result.jobs["add"].steps == 4  # stopped early
    assert result.jobs["txt"].status == "finished" and result.jobs["txt"].steps == 3
    assert result.jobs["add"].eval_loss == 2.0  # the published adapter's: the best eval's
    assert [r["step"] for r in metrics(out) if r["job"] == "add"] == [1, 2, 3, 4]
    published = saved_adapter(out / "add")
    assert published.keys() == snapshots[2].keys()
    assert all(torch.equal(published[key], snapshots[2][key]) for key in published)
    assert not all(torch.equal(published[key], snapshots[4][key]) for key in published)
    status = json.loads((out / "add" / "status.json").read_text())
    assert status["status"] == "finished" and status["step"] == 4


def test_early_stopping_after_a_kill_and_resume(tmp_path: Path, monkeypatch) -> None:
    settings = {"eval_fraction": 0.1, "eval_every": 1, "early_stopping_patience": 2, "max_steps": 6}
    data = config_dict(tmp_path, jobs=("add",), add=settings, checkpoint_every=1)
    snapshots = scripted_evaluation(monkeypatch)
    config = parse_config(data, base_dir=tmp_path)
    interrupted = MultiJobTrainer(config, device="cpu", progress=False)
    result = interrupted.train(stop_after_microbatches=3)
    assert result.interrupted and 1 < len(snapshots) < 4
    done = len(snapshots)
    resumed = MultiJobTrainer(config, device="cpu", progress=False).train(resume=True)
    assert resumed.jobs["add"].steps == 4 and len(snapshots) == 4
    published = saved_adapter(Path(data["output_dir"]) / "add")
    assert all(torch.equal(published[key], snapshots[2][key]) for key in published), done
    # Resuming a finished, early-stopped run changes nothing, and holds the published adapter (what
    # the closing summary's accuracy scores).
    again = MultiJobTrainer(config, device="cpu", progress=False)
    summary = again.train(resume=True).jobs["add"]
    assert summary.steps == 4 and summary.eval_loss == 2.0 and len(snapshots) == 4
    assert all(torch.equal(again.jobs["add"].named_parameters[key].detach(), published[key]) for key in published)


def test_early_stopping_killed_before_publishing_resumes_holding_the_best_adapter(tmp_path: Path, monkeypatch) -> None:
    # Killed after the early stop's checkpoint, before the adapter was published: --resume publishes
    # it, and the model then holds it (what the closing summary scores), as in the uninterrupted run.
    settings = {"eval_fraction": 0.1, "eval_every": 1, "early_stopping_patience": 2, "max_steps": 6}
    data = config_dict(tmp_path, jobs=("add",), add=settings, checkpoint_every=1)
    snapshots = scripted_evaluation(monkeypatch)
    config = parse_config(data, base_dir=tmp_path)

    def killed(self, job):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(MultiJobTrainer, "publish_adapter", killed)
        with pytest.raises(KeyboardInterrupt):
            MultiJobTrainer(config, device="cpu", progress=False).train()
    assert len(snapshots) == 4 and not (Path(data["output_dir"]) / "add" / "adapter_model.safetensors").exists()
    resumed = MultiJobTrainer(config, device="cpu", progress=False)
    summary = resumed.train(resume=True).jobs["add"]
    assert summary.status == "finished" and summary.steps == 4 and len(snapshots) == 4
    published = saved_adapter(Path(data["output_dir"]) / "add")
    assert all(torch.equal(published[key], snapshots[2][key]) for key in published)
    assert all(torch.equal(resumed.jobs["add"].named_parameters[key].detach(), published[key]) for key in published)


def test_a_real_early_stopping_run_publishes_its_lowest_eval_loss(tmp_path: Path) -> None:
    # Trained on sums at a high lr, scored on "abab..." texts (as completions of an empty prompt):
    # the eval loss falls, then rises; the job stops two evals after its lowest, and publishes that
    # eval's adapter.
    texts = Path(config_dict(tmp_path, jobs=("add",))["jobs"][0]["data"]).parent / "txt.jsonl"
    held_out_file = tmp_path / "texts_as_completions.jsonl"
    held_out_file.write_text("".join(
        json.dumps({"prompt": "", "completion": json.loads(line)["text"]}) + "\n" for line in texts.read_text().splitlines()
    ))
    settings = {"eval_data": str(held_out_file), "eval_every": 1, "early_stopping_patience": 2, "max_steps": 12,
                "lr": 0.05, "lr_schedule": "constant"}
    data = config_dict(tmp_path, jobs=("add",), add=settings)
    _, result = train(data, tmp_path)
    out = Path(data["output_dir"])
    logged = [r["eval_loss"] for r in metrics(out) if "eval_loss" in r]
    best = logged.index(min(logged))
    steps = result.jobs["add"].steps
    assert len(logged) == steps and steps == best + 1 + 2 < 12  # stopped two evals after its best (step 7 here)
    held_out = load_samples(held_out_file, "prompt_completion", ByteTokenizer(), 24)
    assert peft_eval_loss(out, "add", held_out) == pytest.approx(logged[best], rel=1e-5)
    assert result.jobs["add"].eval_loss == logged[best]


def test_evaluating_jobs_resume_to_the_uninterrupted_run_at_every_stop_point(tmp_path: Path) -> None:
    # Eval losses, early stopping (a job stops partway, publishing its best eval's adapter), dropout
    # and checkpoints every 2 steps: stopped after k microbatches and resumed, every job publishes the
    # uninterrupted run's adapter bit for bit and logs the same eval losses.
    evaluated = {"eval_fraction": 0.2, "eval_every": 1, "lora_dropout": 0.2, "lr": 0.05, "lr_schedule": "constant"}
    data = config_dict(
        tmp_path, jobs=("add", "txt"), checkpoint_every=2,
        # add's eval loss is lowest at step 3 (between two checkpoints), then rises: it stops at step 5.
        add={**evaluated, "lr": 0.03, "seed": 2, "early_stopping_patience": 2, "max_steps": 10}, txt={**evaluated, "max_steps": 5},
    )
    root = Path(data["output_dir"])

    def trainer(output: str) -> MultiJobTrainer:
        return MultiJobTrainer(parse_config({**data, "output_dir": str(root / output)}, base_dir=tmp_path), device="cpu", progress=False)

    reference = trainer("reference").train()
    assert reference.jobs["add"].steps == 5  # stopped early
    expected = {(r["job"], r["step"]): r.get("eval_loss") for r in metrics(root / "reference")}
    for stop in range(1, reference.microbatches_run):
        assert trainer(f"stop-{stop}").train(stop_after_microbatches=stop).interrupted
        resumed = trainer(f"stop-{stop}").train(resume=True)
        assert {name: job.steps for name, job in resumed.jobs.items()} == {name: job.steps for name, job in reference.jobs.items()}
        assert {(r["job"], r["step"]): r.get("eval_loss") for r in metrics(root / f"stop-{stop}")} == expected, stop
        for job in ("add", "txt"):
            published, wanted = saved_adapter(root / f"stop-{stop}" / job), saved_adapter(root / "reference" / job)
            assert all(torch.equal(published[key], wanted[key]) for key in wanted), (stop, job)


def test_a_job_whose_eval_loss_is_not_finite_fails_instead_of_stopping_early(tmp_path: Path) -> None:
    # lr 1e30 blows the adapter up at its first step: its eval loss is NaN before any training loss
    # is. A NaN never improves, so early stopping alone would "finish" the job and publish the
    # diverged adapter; it fails, as a non-finite training loss does, and the other job goes on.
    diverging = {"eval_fraction": 0.2, "eval_every": 1, "early_stopping_patience": 1, "lr": 1e30, "max_steps": 6}
    data = config_dict(tmp_path, jobs=("add", "txt"), add=diverging)
    _, result = train(data, tmp_path)
    add = result.jobs["add"]
    assert add.status == "failed", (add.status, add.failure)
    assert add.failure.startswith("non-finite eval loss (nan) at step 1"), add.failure
    assert result.jobs["txt"].status == "finished"
    assert not (Path(data["output_dir"]) / "add" / "adapter_model.safetensors").exists()
