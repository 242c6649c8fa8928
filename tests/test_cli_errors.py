"""Every bad input to the command line gets a short answer: an exit code, one line that names the
key, file or record at fault, and no traceback. One row per bad input; add rows as the CLI grows.

Each case builds its inputs in a temporary directory and returns the argv (after `lorafusion`);
the CLI runs in this process, so a case that raised instead of answering fails the test with the
exception itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lorafusion.cli import main
from training_fixtures import config_dict

# ---- inputs ---------------------------------------------------------------------------------------


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def fake_model(tmp: Path) -> Path:
    """Passes the --model directory check (the failure under test comes later)."""
    return write(tmp / "model" / "config.json", "{}").parent


ALIAS_BOMB = "".join(
    f"{name}: &{name} [{', '.join([f'*{previous}'] * 9) if previous else ', '.join(['q_proj'] * 9)}]\n"
    for previous, name in zip([None, "a", "b", "c", "d", "e", "f", "g"], "abcdefgh")
)


def train_config(tmp: Path, text: str | None = None, **job_overrides) -> list[str]:
    """`train` on a tiny valid config with the first job's keys overridden (or on `text` as written)."""
    if text is None:
        data = config_dict(tmp, jobs=("add", "txt"))
        data["jobs"][0].update(job_overrides)
        text = yaml.safe_dump(data)
    return ["train", str(write(tmp / "config.yaml", text)), "--no-progress"]


def train_yaml_with(tmp: Path, replace: str, by: str) -> list[str]:
    text = yaml.safe_dump(config_dict(tmp, jobs=("add", "txt")))
    assert replace in text
    return train_config(tmp, text.replace(replace, by, 1))


def train_config_dict(tmp: Path, change) -> list[str]:
    data = config_dict(tmp, jobs=("add", "txt"))
    change(data)
    return train_config(tmp, yaml.safe_dump(data))


def alias_bomb_in_target_modules(tmp: Path) -> list[str]:
    text = yaml.safe_dump(config_dict(tmp, jobs=("add", "txt")))
    return train_config(tmp, ALIAS_BOMB + text.replace("  lr: 0.01\n", "  lr: 0.01\n  target_modules: *h\n", 1))


def plan_jobs(tmp: Path, text: str | bytes, *extra: str, name: str = "jobs.yaml") -> list[str]:
    return ["plan", "--jobs", str(write(tmp / name, text)), "--no-milp", *extra]


GOOD_JOBS = "jobs:\n  - {name: a, global_batch_size: 2, lengths: [5, 6, 7, 8]}\n"


def bad_records(tmp: Path) -> list[str]:
    data = config_dict(tmp, jobs=("add", "rev", "txt"))
    with open(data["jobs"][0]["data"], "a") as out:
        out.write('{"prompt": "\\ud800", "completion": "1"}\n')  # record 41: a lone surrogate
    with open(data["jobs"][1]["data"], "a") as out:
        out.write("[" * 100_000 + "]" * 100_000 + "\n")  # record 41: nested too deeply for json
    return ["train", str(write(tmp / "config.yaml", yaml.safe_dump(data))), "--no-progress"]


def all_jobs_empty(tmp: Path) -> list[str]:
    data = config_dict(tmp, jobs=("add", "txt"))
    for job in data["jobs"]:
        Path(job["data"]).write_text("\n")
    return ["train", str(write(tmp / "config.yaml", yaml.safe_dump(data))), "--no-progress"]


def one_job(tmp: Path, change) -> list[str]:
    """`train` on the "add" job alone, its keys changed by `change(job, tmp)`."""
    data = config_dict(tmp, jobs=("add",))
    change(data["jobs"][0], tmp)
    return ["train", str(write(tmp / "config.yaml", yaml.safe_dump(data))), "--no-progress"]


def parquet_with_a_null(job: dict, tmp: Path) -> None:
    import pyarrow
    import pyarrow.parquet

    table = pyarrow.table({"question": ["1+1=", "2+2=", "3+3=", None], "answer": ["2", "4", "6", "8"]})
    pyarrow.parquet.write_table(table, tmp / "add.parquet")
    job.update(data=str(tmp / "add.parquet"), columns={"prompt": "question", "completion": "answer"})


def parquet_with_binary_prompts(job: dict, tmp: Path) -> None:
    import pyarrow
    import pyarrow.parquet

    table = pyarrow.table({"question": pyarrow.array([b"1+1="], pyarrow.binary()), "answer": ["2"]})
    pyarrow.parquet.write_table(table, tmp / "add.parquet")
    job.update(data=str(tmp / "add.parquet"), columns={"prompt": "question", "completion": "answer"})


def chat_without_template(job: dict, tmp: Path) -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    job.update(data=str(write(tmp / "chat.jsonl", json.dumps({"messages": messages}) + "\n")), format="messages")


def chat_with_a_number_as_content(tmp: Path) -> list[str]:
    from chat_fixtures import save_chat_tokenizer

    data = config_dict(tmp, jobs=("add",))
    data["tokenizer"] = str(save_chat_tokenizer(tmp / "tokenizer", markers=False))
    messages = [{"role": "user", "content": 5}, {"role": "assistant", "content": "hello"}]
    data["jobs"][0].update(data=str(write(tmp / "chat.jsonl", json.dumps({"messages": messages}) + "\n")), format="messages")
    return ["train", str(write(tmp / "config.yaml", yaml.safe_dump(data))), "--no-progress"]


def bad_eval_record(job: dict, tmp: Path) -> None:
    job.update(eval_data=str(write(tmp / "eval.jsonl", '{"prompt": "1+1=", "completion": "2"}\n{"prompt": "2+2="}\n')))


def dataset_dict(job: dict, tmp: Path) -> None:
    import datasets

    split = datasets.Dataset.from_list([{"prompt": "1+1=", "completion": "2"}])
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(tmp / "splits"))
    job.update(data=str(tmp / "splits"))


# ---- the table: (id, argv builder, exit code, text the message line must contain) ----------------

CASES = [
    # lorafusion generate
    ("generate-missing-model", lambda t: ["generate", "--model", str(t / "nope"), "--prompt", "x"], 2, ["--model", "nope", "not found"]),
    ("generate-model-without-config", lambda t: ["generate", "--model", str(t), "--prompt", "x"], 2, ["--model", "config.json"]),
    ("generate-negative-max-new-tokens", lambda t: ["generate", "--model", str(t), "--prompt", "x", "--max-new-tokens", "-5"], 2, ["--max-new-tokens", "-5"]),
    ("generate-bad-max-new-tokens", lambda t: ["generate", "--model", str(t), "--prompt", "x", "--max-new-tokens", "ten"], 2, ["--max-new-tokens", "ten"]),
    ("generate-bad-adapter", lambda t: ["generate", "--model", str(fake_model(t)), "--adapter", str(t), "--prompt", "x"], 2, ["--adapter", "adapter_config.json"]),
    ("generate-bad-device", lambda t: ["generate", "--model", str(fake_model(t)), "--prompt", "x", "--device", "gpu9"], 2, ["--device", "gpu9"]),
    ("generate-bad-tokenizer", lambda t: ["generate", "--model", str(fake_model(t)), "--prompt", "x", "--tokenizer", str(t / "tok")], 2, ["tokenizer", "tok"]),
    ("generate-hub-id", lambda t: ["generate", "--model", "Qwen/Qwen2.5-0.5B", "--prompt", "x"], 2, ["--model", "Hugging Face Hub id", "hf download Qwen/Qwen2.5-0.5B --local-dir"]),
    # lorafusion plan
    ("plan-missing-jobs-file", lambda t: ["plan", "--jobs", str(t / "none.yaml")], 2, ["none.yaml", "cannot read"]),
    ("plan-invalid-yaml", lambda t: plan_jobs(t, "jobs: [name: a\n"), 2, ["jobs.yaml", "not valid YAML", "line"]),
    ("plan-invalid-json", lambda t: plan_jobs(t, '{"jobs": [}', name="jobs.json"), 2, ["jobs.json", "not valid"]),
    ("plan-not-utf8", lambda t: plan_jobs(t, b"jobs: \xff\xfe\n"), 2, ["jobs.yaml", "UTF-8"]),
    ("plan-batch-size-text", lambda t: plan_jobs(t, GOOD_JOBS.replace("2,", "abc,", 1)), 2, ["jobs[0].global_batch_size", "abc"]),
    ("plan-batch-size-fraction", lambda t: plan_jobs(t, GOOD_JOBS.replace("2,", "2.7,", 1)), 2, ["jobs[0].global_batch_size", "2.7"]),
    ("plan-batch-size-huge", lambda t: plan_jobs(t, GOOD_JOBS.replace("2,", "1000000000000,", 1)), 2, ["jobs[0].global_batch_size"]),
    ("plan-bad-lengths", lambda t: plan_jobs(t, GOOD_JOBS.replace("[5,", "[x,", 1)), 2, ["jobs[0].lengths"]),
    ("plan-duplicate-key", lambda t: plan_jobs(t, GOOD_JOBS + "jobs: []\n"), 2, ["jobs.yaml", "duplicate key 'jobs'", "line 3"]),
    ("plan-alias-bomb", lambda t: plan_jobs(t, ALIAS_BOMB + "jobs: *h\n"), 2, ["jobs.yaml", "aliases"]),
    ("plan-out-missing-directory", lambda t: plan_jobs(t, GOOD_JOBS, "--out", str(t / "no" / "s.json")), 2, ["--out", "does not exist"]),
    ("plan-negative-time-limit", lambda t: plan_jobs(t, GOOD_JOBS, "--time-limit", "-1"), 2, ["--time-limit", "-1"]),
    ("plan-zero-capacity", lambda t: plan_jobs(t, GOOD_JOBS, "--capacity", "0"), 2, ["--capacity"]),
    ("plan-invalid-cost-model", lambda t: plan_jobs(t, GOOD_JOBS, "--cost-model", str(write(t / "cost.yaml", "m: [1,\n"))), 2, ["cost.yaml", "not valid YAML"]),
    ("plan-cost-model-missing-key", lambda t: plan_jobs(t, GOOD_JOBS, "--cost-model", str(write(t / "cost.yaml", "m: {x: 1}\n"))), 2, ["cost.yaml", "num_layers"]),
    ("plan-deep-json-record", lambda t: plan_jobs(t, f"- {{name: a, global_batch_size: 1, data: {write(t / 'd.jsonl', '[' * 100_000 + chr(10))}}}\n"), 2, ["d.jsonl", "line 1"]),
    # lorafusion loram: a missing --model is named, not looked up on the Hugging Face Hub
    ("loram-prune-missing-model", lambda t: ["loram", "prune", "--model", str(t / "nope"), "--out", str(t / "o"), "--ratio", "0.5"], 2, ["--model", "nope", "not found"]),
    ("loram-report-missing-model", lambda t: ["loram", "report", "--model", str(t / "nope")], 2, ["--model", "nope", "not found"]),
    ("loram-align-missing-model", lambda t: ["loram", "align", "--model", str(t / "nope"), "--data", str(t / "d.jsonl"), "--out", str(t / "o"), "--steps", "1"], 2, ["--model", "nope", "not found"]),
    # lorafusion train: refused by validation, each key named
    ("train-model-path-hub-id", lambda t: train_config_dict(t, lambda data: data.update(model={"path": "meta-llama/Llama-3.2-1B"})), 2, ["model.path", "directory not found", "hf download meta-llama/Llama-3.2-1B --local-dir models/Llama-3.2-1B"]),
    ("train-tokenizer-hub-id", lambda t: train_config_dict(t, lambda data: data.update(tokenizer="meta-llama/Llama-3.2-1B")), 2, ["tokenizer", "downloads nothing", "hf download meta-llama/Llama-3.2-1B"]),
    ("train-bad-device", lambda t: [*train_config(t), "--device", "gpu9"], 2, ["--device", "gpu9", "not a torch device"]),
    ("train-invalid-yaml", lambda t: train_config(t, "jobs: [\n"), 2, ["config.yaml", "not valid YAML"]),
    ("train-not-utf8", lambda t: train_config(t, "model: \xff"), 2, ["config.yaml"]),
    ("train-duplicate-key", lambda t: train_yaml_with(t, "  lr: 0.01\n", "  lr: 0.01\n  lr: 0.02\n"), 2, ["config.yaml", "duplicate key 'lr'"]),
    ("train-lr-a-long-string", lambda t: train_config(t, lr="x" * 5000), 2, ["jobs[0].lr: must be a number, got '" + "x" * 56 + "... (str)"]),
    ("train-lr-beyond-float32", lambda t: train_config(t, lr=1e39), 2, ["jobs[0].lr: must be <= 3.40282e+38, got 1e+39"]),
    ("train-max-steps-1e9", lambda t: train_config(t, max_steps="1e9"), 2, ["jobs[0].max_steps"]),
    ("train-max-steps-huge", lambda t: train_config(t, max_steps=10**9), 2, ["jobs[0].max_steps", "1000000000"]),
    ("train-epochs-1e9", lambda t: train_config(t, max_steps=None, epochs="1e9"), 2, ["jobs[0].epochs", "1e9"]),
    ("train-batch-size-1e12", lambda t: train_config(t, global_batch_size=10**12), 2, ["jobs[0].global_batch_size"]),
    ("train-steps-times-batch", lambda t: train_config(t, max_steps=10**6, global_batch_size=10**6), 2, ["jobs[0].max_steps", "global_batch_size"]),
    ("train-seed-2-70", lambda t: train_config(t, seed=2**70), 2, ["jobs[0].seed", str(2**70)]),
    ("train-model-seed-2-70", lambda t: train_config_dict(t, lambda data: data.update(model={**data["model"], "seed": 2**70})), 2, ["model.seed"]),
    ("train-alias-bomb-target-modules", alias_bomb_in_target_modules, 2, ["config.yaml", "aliases"]),
    ("train-every-job-empty", all_jobs_empty, 2, ["no job can train", "'add'", "'txt'", "add.jsonl", "no records"]),
    ("train-columns-not-a-field", lambda t: train_config(t, columns={"answer": "a"}), 2, ["jobs[0].columns.answer", "not a field of format prompt_completion"]),
    ("train-columns-empty", lambda t: train_config(t, columns={}), 2, ["jobs[0].columns", "must be a mapping of field to column name, e.g. {prompt: my_column}; got an empty mapping"]),
    ("train-columns-one-column-for-two-fields", lambda t: train_config(t, columns={"prompt": "q", "completion": "q"}), 2, ["jobs[0].columns.completion", 'column "q" is already prompt\'s']),
    ("train-eval-every-without-eval-records", lambda t: train_config(t, eval_every=5), 2, ["jobs[0].eval_every", "eval_data or eval_fraction"]),
    # datasets and conversations that cannot train: the file (and row or line) named
    ("train-parquet-null-row", lambda t: one_job(t, parquet_with_a_null), 2, ["no job can train", "add.parquet, row 3", 'field "question" must be a string, got null']),
    ("train-parquet-binary-column", lambda t: one_job(t, parquet_with_binary_prompts), 2, ["add.parquet, row 0", 'field "question" must be a string, got binary data']),
    ("train-dataset-dict", lambda t: one_job(t, dataset_dict), 2, ["splits: holds a DatasetDict (splits: test, train)", "give one split's directory"]),
    ("train-messages-without-chat-template", lambda t: one_job(t, chat_without_template), 2, ["chat.jsonl", "format messages needs a tokenizer with a chat template"]),
    ("train-messages-number-content", chat_with_a_number_as_content, 2, ["no job can train", "chat.jsonl, line 1", 'message 0 "content" must be a string or a list of content parts (objects), got a number']),
    ("train-eval-fraction-leaves-nothing", lambda t: one_job(t, lambda job, _: job.update(eval_fraction=0.99)), 2, ["add.jsonl", "eval_fraction=0.99 of 40 records leaves none to train on"]),
    ("train-bad-eval-record", lambda t: one_job(t, bad_eval_record), 2, ["no job can train", "eval.jsonl, line 2", 'missing field "completion"']),
    # a bad record stops only its job, named with its file and line
    ("train-bad-records", bad_records, 1, ["job 'add' failed", "add.jsonl, line 41", "surrogate"]),
    ("train-bad-records-deep", bad_records, 1, ["job 'rev' failed", "rev.jsonl, line 41", "nested too deeply"]),
]


@pytest.mark.parametrize("build,code,needles", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_gets_a_one_line_answer(tmp_path, capsys, build, code, needles):
    argv = build(tmp_path)
    try:
        returned = main(argv)
    except SystemExit as exit:  # argparse's own refusals
        returned = exit.code
    err = capsys.readouterr().err
    assert returned == code, err
    assert "Traceback" not in err
    assert "huggingface.co" not in err
    assert any(all(needle in line for needle in needles) for line in err.splitlines()), err


def test_bad_records_leave_the_other_jobs_finished(tmp_path, capsys):
    assert main(bad_records(tmp_path)) == 1
    out = tmp_path / "run"
    assert (out / "txt" / "adapter_model.safetensors").is_file()
    for job in ("add", "rev"):
        assert json.loads((out / job / "status.json").read_text())["status"] == "failed"
