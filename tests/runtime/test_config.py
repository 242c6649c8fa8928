"""lorafusion.runtime.config: the shipped quickstart loads; every validation rule reports its key path."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from lorafusion.runtime.config import ConfigError, JobSpec, TrainConfig, load_config, parse_config

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples" / "quickstart.yaml"

TINY_MODEL = {
    "architecture": "llama",
    "config": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 260,
        "max_position_embeddings": 512,
    },
}


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    for name in ("a", "b"):
        (tmp_path / "data" / f"{name}.jsonl").write_text('{"prompt": "1+1=", "completion": "2"}\n')
    return tmp_path


def with_inline_config(**changes: object) -> dict:
    """TINY_MODEL with config keys changed; a None value removes the key."""
    config = {**TINY_MODEL["config"], **changes}
    return {**TINY_MODEL, "config": {key: value for key, value in config.items() if value is not None}}


def minimal_config() -> dict:
    return {
        "model": copy.deepcopy(TINY_MODEL),
        "jobs": [
            {"name": "a", "data": "data/a.jsonl", "global_batch_size": 4},
            {"name": "b", "data": "data/b.jsonl", "global_batch_size": 2},
        ],
    }


def problems_of(data: dict, base_dir: Path) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, base_dir)
    for key, reason in caught.value.problems:  # our one-line wording, never pydantic's own
        assert "\n" not in reason and "Input should" not in reason and "pydantic" not in reason, (key, reason)
    return caught.value.problems


def only_problem(data: dict, base_dir: Path) -> tuple[str, str]:
    problems = problems_of(data, base_dir)
    assert len(problems) == 1, problems
    return problems[0]


def test_quickstart_loads() -> None:
    config = load_config(QUICKSTART)
    assert isinstance(config, TrainConfig)
    assert config.config_path == QUICKSTART
    assert [job.name for job in config.jobs] == ["addition", "reverse", "uppercase"]
    assert len({(job.r, job.lr, job.global_batch_size) for job in config.jobs}) == 3
    assert config.model.architecture == "llama" and config.model.config["vocab_size"] >= 259
    assert config.tokenizer is None
    assert config.output_dir == QUICKSTART.parent / "runs" / "quickstart"
    for job in config.jobs:
        assert job.data.is_file() and job.data.parent == QUICKSTART.parent / "data"
        assert job.max_steps is not None and job.epochs is None


def test_defaults(base_dir: Path) -> None:
    config = parse_config(minimal_config(), base_dir)
    job = config.jobs[0]
    assert job == JobSpec(
        name="a",
        data=base_dir / "data" / "a.jsonl",
        format="prompt_completion",
        r=8,
        lora_alpha=16.0,
        lora_dropout=0.0,
        use_rslora=False,
        target_modules="all-linear",
        lr=2e-4,
        weight_decay=0.0,
        warmup_steps=0,
        lr_schedule="linear",
        global_batch_size=4,
        max_steps=None,
        epochs=1.0,
        max_seq_len=512,
        seed=0,
    )
    assert (config.scheduler.capacity, config.scheduler.solver, config.scheduler.time_limit_s) == (4096, "milp", 0.5)
    assert config.scheduler.pad_multiple == 1
    assert (config.parallel.engine, config.parallel.pipeline_stages, config.parallel.data_parallel) == ("none", 1, 1)
    assert (config.checkpoint_every, config.log_every, config.backend) == (0, None, "auto")
    assert (config.model.dtype, config.model.gradient_checkpointing, config.model.seed) == ("float32", False, 0)
    assert config.model.quantize is None and config.model.path is None
    assert config.output_dir == base_dir / "runs" and config.config_path is None


def test_relative_paths_resolve_against_the_config_file_directory(base_dir: Path, tmp_path: Path, monkeypatch) -> None:
    data = minimal_config()
    (base_dir / "tok").mkdir()
    data["tokenizer"] = "tok"
    data["output_dir"] = "out/run1"
    config_file = base_dir / "train.yaml"
    config_file.write_text(yaml.safe_dump(data))
    monkeypatch.chdir(tmp_path / "data")  # relative to the file, not to the working directory
    config = load_config(config_file)
    assert config.jobs[1].data == base_dir / "data" / "b.jsonl"
    assert config.tokenizer == str(base_dir / "tok")
    assert config.output_dir == base_dir / "out" / "run1"


def test_default_output_dir_is_named_after_the_config_file(base_dir: Path) -> None:
    config = parse_config(minimal_config(), base_dir, base_dir / "my_run.yaml")
    assert config.output_dir == base_dir / "runs" / "my_run"


def test_float_strings_from_yaml_exponents_are_accepted(base_dir: Path) -> None:
    data = yaml.safe_load("lr: 1e-3")  # PyYAML reads this as the string "1e-3"
    config_data = minimal_config()
    config_data["jobs"][0]["lr"] = data["lr"]
    assert parse_config(config_data, base_dir).jobs[0].lr == 1e-3


def test_model_path_checkpoint(base_dir: Path) -> None:
    checkpoint = base_dir / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    data = minimal_config()
    data["model"] = {"path": "ckpt", "dtype": "bfloat16"}
    model = parse_config(data, base_dir).model
    assert (model.path, model.architecture, model.config, model.dtype) == (str(checkpoint), None, {}, "bfloat16")


@pytest.mark.parametrize(
    ("job_changes", "key", "reason"),
    [
        ({"lora_dropout": 1.5}, "jobs[1].lora_dropout", "must be in [0, 1), got 1.5"),
        ({"r": 0}, "jobs[1].r", "must be in 1..256, got 0"),
        ({"r": 257}, "jobs[1].r", "must be in 1..256, got 257"),
        ({"r": "eight"}, "jobs[1].r", "must be an integer, got 'eight' (str)"),
        ({"r": 8.0}, "jobs[1].r", "must be an integer, got 8.0"),
        ({"lora_alpha": 0}, "jobs[1].lora_alpha", "must be > 0, got 0"),
        ({"lr": 0.0}, "jobs[1].lr", "must be > 0, got 0.0"),
        ({"lr": "fast"}, "jobs[1].lr", "must be a number, got 'fast' (str)"),
        ({"weight_decay": -0.1}, "jobs[1].weight_decay", "must be >= 0, got -0.1"),
        ({"global_batch_size": 0}, "jobs[1].global_batch_size", "must be >= 1, got 0"),
        ({"max_seq_len": 0}, "jobs[1].max_seq_len", "must be >= 1, got 0"),
        ({"use_rslora": "yes"}, "jobs[1].use_rslora", "must be true or false, got 'yes' (str)"),
        ({"format": "chat"}, "jobs[1].format", "must be one of prompt_completion, text, messages; got 'chat' (str)"),
        ({"lr_schedule": "step"}, "jobs[1].lr_schedule", "must be one of constant, linear, cosine; got 'step' (str)"),
        ({"max_steps": 10, "epochs": 2}, "jobs[1]", "max_steps and epochs are both set; set at most one"),
        ({"max_steps": 0}, "jobs[1].max_steps", "must be >= 1, got 0"),
        ({"max_steps": 5, "warmup_steps": 6}, "jobs[1].warmup_steps", "6 is more than max_steps=5"),
        ({"name": "a"}, "jobs[1].name", "duplicate of jobs[0].name 'a'"),
        ({"name": "my job"}, "jobs[1].name", "must match [A-Za-z0-9_-]+ (it names a directory), got 'my job'"),
        ({"target_modules": []}, "jobs[1].target_modules", None),
        ({"lora_alpah": 16}, "jobs[1].lora_alpah", "unknown key; did you mean 'lora_alpha'?"),
        ({"max_seq_len": 8192}, "jobs[1].max_seq_len", None),
        ({"columns": {"prompt": "question", "answer": "a"}}, "jobs[1].columns.answer",
         "not a field of format prompt_completion; its fields: prompt, completion"),
        ({"columns": {"text": ""}, "format": "text"}, "jobs[1].columns.text", "must be a column name (a non-empty string), got '' (str)"),
        ({"columns": ["text"]}, "jobs[1].columns", "must be a mapping of field to column name, e.g. {prompt: my_column}; got a list"),
        ({"eval_fraction": 1.0}, "jobs[1].eval_fraction", "must be in (0, 1): the share of data held out, got 1.0"),
        ({"eval_fraction": 0}, "jobs[1].eval_fraction", "must be > 0, got 0"),
        ({"eval_fraction": 0.1, "eval_data": "data/a.jsonl"}, "jobs[1].eval_fraction", "set either eval_data or eval_fraction, not both"),
        ({"eval_every": 10}, "jobs[1].eval_every", "needs held-out records: set eval_data or eval_fraction"),
        ({"eval_every": 0, "eval_fraction": 0.1}, "jobs[1].eval_every", "must be >= 1, got 0"),
        ({"early_stopping_patience": 2, "eval_fraction": 0.1}, "jobs[1].early_stopping_patience",
         "needs eval_every (and eval_data or eval_fraction)"),
        ({"early_stopping_patience": 0, "eval_every": 5, "eval_fraction": 0.1}, "jobs[1].early_stopping_patience", "must be >= 1, got 0"),
    ],
)
def test_job_validation(base_dir: Path, job_changes: dict, key: str, reason: str | None) -> None:
    data = minimal_config()
    data["model"]["config"]["max_position_embeddings"] = 100_000
    data["jobs"][1].update(job_changes)
    problem = only_problem(data, base_dir)
    assert problem[0] == key
    if reason is not None:
        assert problem[1] == reason


@pytest.mark.parametrize(
    ("job_changes", "key", "reason"),
    [
        ({"r": "8"}, "jobs[1].r", "must be an integer, got '8' (str)"),
        ({"r": True}, "jobs[1].r", "must be an integer, got True"),
        ({"global_batch_size": 4.0}, "jobs[1].global_batch_size", "must be an integer, got 4.0"),
        ({"lr": True}, "jobs[1].lr", "must be a number, got True"),
        ({"lr": "inf"}, "jobs[1].lr", "must be a number, got 'inf' (str)"),
        ({"lr": float("nan")}, "jobs[1].lr", "must be a number, got nan"),
        ({"use_rslora": 1}, "jobs[1].use_rslora", "must be true or false, got 1"),
        ({"name": 3}, "jobs[1].name", "must be a non-empty string, got 3"),
        ({"name": None}, "jobs[1].name", "required, got null"),
        ({"data": ["data/b.jsonl"]}, "jobs[1].data", "must be a non-empty string, got a list"),
        ({7: 1}, "jobs[1].7", None),
        ({"epochs": "1e9"}, "jobs[1].epochs", "must be <= 10000, got 1e9"),
        ({"seed": 2**70}, "jobs[1].seed", f"must be <= {2**32 - 1}, got {2**70}"),
        ({"name": "run.json"}, "jobs[1].name", "must match [A-Za-z0-9_-]+ (it names a directory), got 'run.json'"),
    ],
)
def test_types_are_strict(base_dir: Path, job_changes: dict, key: str, reason: str | None) -> None:
    """No silent coercion: "8" is not 8 and true is not 1; a float string is a number (YAML 1.1's 1e-3)."""
    data = minimal_config()
    data["jobs"][1].update(job_changes)
    problem = only_problem(data, base_dir)
    assert problem[0] == key
    if reason is not None:
        assert problem[1] == reason


def test_null_means_the_default(base_dir: Path) -> None:
    data = minimal_config()
    data["jobs"][1].update(r=None, lr=None, max_steps=None, target_modules=None)
    data.update(scheduler=None, parallel={"engine": None}, tokenizer=None, log_every=None)
    config = parse_config(data, base_dir)
    job = config.jobs[1]
    assert (job.r, job.lr, job.max_steps, job.epochs, job.target_modules) == (8, 2e-4, None, 1.0, "all-linear")
    assert (config.scheduler.capacity, config.parallel.engine, config.tokenizer, config.log_every) == (4096, "none", None, None)


def test_the_default_max_seq_len_meets_a_small_capacity(base_dir: Path) -> None:
    data = minimal_config()
    data["scheduler"] = {"capacity": 100}
    assert problems_of(data, base_dir) == [
        (f"jobs[{index}].max_seq_len", "512 is larger than scheduler.capacity=100: a sample could not fit a microbatch")
        for index in (0, 1)
    ]


def test_max_seq_len_beyond_capacity_and_positions_gets_both_problems(base_dir: Path) -> None:
    data = minimal_config()
    data["jobs"][0]["max_seq_len"] = 8192
    assert sorted(reason for _, reason in problems_of(data, base_dir)) == [
        "8192 is larger than model.config.max_position_embeddings=512",
        "8192 is larger than scheduler.capacity=4096: a sample could not fit a microbatch",
    ]


@pytest.mark.parametrize(
    ("parallel", "key", "reason"),
    [
        ({"stage_layers": [1, 0]}, "parallel.stage_layers[1]", "must be >= 1, got 0"),
        ({"stage_layers": [1]}, "parallel.stage_layers", "needs one layer count per stage (2), got 1"),
        ({"stage_layers": "1,1"}, "parallel.stage_layers", "must be a list, got '1,1' (str)"),
        ({"pipeline_stages": True}, "parallel.pipeline_stages", "must be an integer, got True"),
        ({"timeout_s": "1e9"}, "parallel.timeout_s", "must be <= 604800, got 1e9"),
    ],
)
def test_parallel_validation(base_dir: Path, parallel: dict, key: str, reason: str) -> None:
    data = minimal_config()
    data["parallel"] = {"engine": "megatron", "pipeline_stages": 2, **parallel}
    assert only_problem(data, base_dir) == (key, reason)


def test_several_problems_in_one_section_and_between_sections(base_dir: Path) -> None:
    data = minimal_config()
    data["model"]["config"].update(hidden_size=66, num_hidden_layers=0)
    data["jobs"][1].update(r=0, max_steps=5, epochs=2, warmup_steps=6, eval_every=2)
    assert sorted(problems_of(data, base_dir)) == [
        ("jobs[1]", "max_steps and epochs are both set; set at most one"),
        ("jobs[1].eval_every", "needs held-out records: set eval_data or eval_fraction"),
        ("jobs[1].r", "must be in 1..256, got 0"),
        ("jobs[1].warmup_steps", "6 is more than max_steps=5"),
        ("model.config.hidden_size", "66 is not divisible by num_attention_heads=4"),
        ("model.config.num_hidden_layers", "must be >= 1, got 0"),
    ]


def test_max_seq_len_larger_than_capacity(base_dir: Path) -> None:
    data = minimal_config()
    data["model"]["config"]["max_position_embeddings"] = 8192
    data["jobs"][0]["max_seq_len"] = 8192
    error_text = str(pytest.raises(ConfigError, parse_config, data, base_dir).value)
    assert error_text == (
        "jobs[0].max_seq_len: 8192 is larger than scheduler.capacity=4096: a sample could not fit a microbatch"
    )


def test_max_seq_len_larger_than_model_positions(base_dir: Path) -> None:
    data = minimal_config()
    data["jobs"][0]["max_seq_len"] = 600
    assert only_problem(data, base_dir) == (
        "jobs[0].max_seq_len",
        "600 is larger than model.config.max_position_embeddings=512",
    )


@pytest.mark.parametrize("missing", ["name", "data", "global_batch_size"])
def test_missing_job_keys(base_dir: Path, missing: str) -> None:
    data = minimal_config()
    del data["jobs"][0][missing]
    assert only_problem(data, base_dir) == (f"jobs[0].{missing}", "required key is missing")


def test_missing_data_file(base_dir: Path) -> None:
    data = minimal_config()
    data["jobs"][0]["data"] = "data/missing.jsonl"
    assert only_problem(data, base_dir) == ("jobs[0].data", f"not found: {base_dir / 'data' / 'missing.jsonl'} (a JSONL or Parquet file, or a dataset directory)")


@pytest.mark.parametrize("missing", ["model", "jobs"])
def test_missing_top_level_keys(base_dir: Path, missing: str) -> None:
    data = minimal_config()
    del data[missing]
    assert only_problem(data, base_dir) == (missing, "required key is missing")


@pytest.mark.parametrize(
    ("data_changes", "key", "reason"),
    [
        ({"jobs": []}, "jobs", "must be a non-empty list of jobs, got a list"),
        ({"tokenizer": "no/such/dir"}, "tokenizer", None),
        ({"output_dir": 3}, "output_dir", "must be a non-empty string, got 3"),
        ({"checkpoint_every": -1}, "checkpoint_every", "must be >= 0, got -1"),
        ({"log_every": 0}, "log_every", "must be >= 1, got 0"),
        ({"backend": "bogus"}, "backend", "must be one of auto, triton, torch, cuda; got 'bogus' (str)"),
        ({"schedular": {}}, "schedular", "unknown key; did you mean 'scheduler'?"),
        ({"scheduler": {"solver": "cplex"}}, "scheduler.solver", "must be one of milp, greedy; got 'cplex' (str)"),
        ({"scheduler": {"capacity": 0}}, "scheduler.capacity", "must be >= 1, got 0"),
        ({"scheduler": {"time_limit_s": 0}}, "scheduler.time_limit_s", "must be > 0, got 0"),
        ({"scheduler": {"pad_multiple": 0}}, "scheduler.pad_multiple", "must be >= 1, got 0"),
        ({"scheduler": {"capacty": 10}}, "scheduler.capacty", "unknown key; did you mean 'capacity'?"),
        ({"scheduler": [1]}, "scheduler", "must be a mapping, got a list"),
        ({"parallel": {"engine": "fsdp"}}, "parallel.engine", None),
        ({"parallel": {"engine": "megatron", "pipeline_stages": 0}}, "parallel.pipeline_stages", None),
        ({"parallel": {"pipeline_stages": 4}}, "parallel.pipeline_stages", "4 needs parallel.engine megatron or deepspeed"),
    ],
)
def test_top_level_validation(base_dir: Path, data_changes: dict, key: str, reason: str | None) -> None:
    data = minimal_config()
    data.update(data_changes)
    problem = only_problem(data, base_dir)
    assert problem[0] == key
    if reason is not None:
        assert problem[1] == reason


@pytest.mark.parametrize(
    ("model", "key", "reason"),
    [
        ({"architecture": "gpt2", "config": TINY_MODEL["config"]}, "model.architecture", None),
        ({"config": TINY_MODEL["config"]}, "model.architecture", None),
        ({"architecture": "llama"}, "model.config", "required with model.architecture"),
        ({"dtype": "float32"}, "model", None),
        ({"path": "ckpt", **TINY_MODEL}, "model", "set either path or architecture + config, not both"),
        ({"path": "no/such/model"}, "model.path", None),
        ({**TINY_MODEL, "dtype": "float64"}, "model.dtype", None),
        ({**TINY_MODEL, "quantize": "int8"}, "model.quantize", "must be one of nf4; got 'int8' (str)"),
        ({**TINY_MODEL, "gradient_checkpointing": 1}, "model.gradient_checkpointing", None),
        ({**TINY_MODEL, "archtecture": "llama"}, "model.archtecture", "unknown key; did you mean 'architecture'?"),
        (with_inline_config(vocab_size=128), "model.config.vocab_size", None),
        (with_inline_config(hidden_size=66), "model.config.hidden_size", None),
        (with_inline_config(num_key_value_heads=3), "model.config.num_key_value_heads", None),
        (with_inline_config(num_hidden_layers=0), "model.config.num_hidden_layers", None),
        (with_inline_config(num_hidden_layers=None), "model.config.num_hidden_layers", "required key is missing"),
        ({**TINY_MODEL, "config": [1, 2]}, "model.config", "must be a mapping, got a list"),
        ({**TINY_MODEL, "config": {**TINY_MODEL["config"], 7: 1}}, "model.config", "keys must be strings, got 7"),
    ],
)
def test_model_validation(base_dir: Path, model: dict, key: str, reason: str | None) -> None:
    (base_dir / "ckpt").mkdir()
    (base_dir / "ckpt" / "config.json").write_text("{}")
    data = minimal_config()
    data["model"] = model
    problem = only_problem(data, base_dir)
    assert problem[0] == key
    if reason is not None:
        assert problem[1] == reason


def test_model_path_without_config_json(base_dir: Path) -> None:
    data = minimal_config()
    data["model"] = {"path": "data"}
    assert only_problem(data, base_dir)[0] == "model.path"


def test_small_vocab_is_fine_with_a_tokenizer_directory(base_dir: Path) -> None:
    (base_dir / "tok").mkdir()
    data = minimal_config()
    data["tokenizer"] = "tok"
    data["model"]["config"]["vocab_size"] = 128
    assert parse_config(data, base_dir).model.config["vocab_size"] == 128


def test_all_problems_are_reported_together(base_dir: Path) -> None:
    data = minimal_config()
    data["jobs"][0].update(lora_dropout=1.5, r=0, data="data/missing.jsonl")
    data["jobs"][1].update(name="a", lr=-1)
    data["scheduler"] = {"solver": "nope"}
    data["outptu_dir"] = "x"
    with pytest.raises(ConfigError) as caught:
        parse_config(data, base_dir)
    keys = [key for key, _ in caught.value.problems]
    assert sorted(keys) == sorted(
        [
            "outptu_dir",
            "scheduler.solver",
            "jobs[0].data",
            "jobs[0].r",
            "jobs[0].lora_dropout",
            "jobs[1].name",
            "jobs[1].lr",
        ]
    )
    lines = str(caught.value).splitlines()
    assert len(lines) == len(keys)
    assert "jobs[0].lora_dropout: must be in [0, 1), got 1.5" in lines
    assert "outptu_dir: unknown key; did you mean 'output_dir'?" in lines


def test_unreadable_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "absent.yaml")
    assert caught.value.problems[0][0] == "<file>" and "absent.yaml" in str(caught.value)

    bad = tmp_path / "bad.yaml"
    bad.write_text("jobs: [\n  - name: a\n")
    with pytest.raises(ConfigError) as caught:
        load_config(bad)
    assert caught.value.problems[0][0] == "<file>" and "not valid YAML" in str(caught.value)

    not_a_mapping = tmp_path / "list.yaml"
    not_a_mapping.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError) as caught:
        load_config(not_a_mapping)
    assert caught.value.problems == [("<file>", "must be a mapping with keys model, jobs, ...; got a list")]


def test_config_error_is_a_value_error() -> None:
    error = ConfigError([("a.b", "bad"), ("c", "worse")])
    assert isinstance(error, ValueError)
    assert str(error) == "a.b: bad\nc: worse"
