"""The training config of `lorafusion train CONFIG.yaml`: YAML -> validated, frozen dataclasses.

Validation runs before any work starts and reports every problem at once (as `ConfigError`), each
with the key path it concerns, so a user fixes a config in one round instead of one error per run.

Shape (defaults in parentheses; see the dataclasses for meanings)::

    model:                      # exactly one of `path` or `architecture` + `config`
      path: /models/Llama-3.2-1B
      architecture: llama       # llama | qwen2 | mistral
      config: {hidden_size: 128, ...}   # inline Hugging Face config kwargs
      dtype: float32            # float32 | bfloat16 | float16
      gradient_checkpointing: false
      seed: 0                   # initialisation seed of an inline-config base model
      quantize: null            # null | nf4
    tokenizer: null             # local tokenizer directory; null: the built-in byte tokenizer
    jobs:
      - name: addition          # required, unique, [A-Za-z0-9_-]+
        data: data/add.jsonl    # required: JSONL, Parquet (file or directory), or a datasets.save_to_disk directory
        format: prompt_completion   # prompt_completion | text | messages (chat template; loss on assistant turns)
        columns: null           # the dataset's names for the format's fields, e.g. {prompt: question, completion: answer}
        r: 8
        lora_alpha: 16
        lora_dropout: 0.0
        use_rslora: false
        target_modules: all-linear
        lr: 2.0e-4
        weight_decay: 0.0
        warmup_steps: 0
        lr_schedule: linear     # constant | linear | cosine
        global_batch_size: 16   # required
        max_steps: null         # at most one of max_steps and epochs; neither: epochs = 1
        epochs: null
        max_seq_len: 512
        seed: 0
        eval_data: null         # held-out records, as `data`: eval loss; prompt_completion also exact-match accuracy
        eval_fraction: null     # instead of eval_data: this share of `data`, split off by `seed`
        eval_every: null        # optimizer steps between eval losses (also at the last step); null: last step only
        early_stopping_patience: null   # evals without a better eval loss that stop the job; publishes its best adapter
    scheduler: {capacity: 4096, solver: milp, time_limit_s: 0.5, pad_multiple: 1}
    parallel: {engine: none, pipeline_stages: 1, data_parallel: 1, timeout_s: 600}
    output_dir: runs/NAME       # (runs/<config file stem>)
    checkpoint_every: 0         # optimizer steps per job between checkpoints; 0: only at the end
    log_every: 1
    backend: auto               # auto | triton | torch

Relative paths (model.path, tokenizer, jobs[].data, output_dir) are resolved against the config
file's directory. Float fields also accept strings such as "1e-3", because PyYAML (YAML 1.1)
reads an exponent without a decimal point as a string.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from lorafusion.config import ALL_LINEAR, normalized_target_modules
from lorafusion.kernels import BACKENDS, MAX_RANK
from lorafusion.safe_yaml import YAMLInputError, load_yaml

from .output_dir import RESERVED_NAMES

ARCHITECTURES = ("llama", "qwen2", "mistral")
DTYPES = ("float32", "bfloat16", "float16")
QUANTIZATIONS = ("nf4",)
DATA_FORMATS = ("prompt_completion", "text", "messages")
# The fields of each format, which a job's `columns` may rename (see runtime.data).
FORMAT_FIELDS = {"prompt_completion": ("prompt", "completion"), "text": ("text",), "messages": ("messages", "tools")}
LR_SCHEDULES = ("constant", "linear", "cosine")
SCHEDULE_POLICIES = ("lorafusion", "megatron", "mlora")
SOLVERS = ("milp", "greedy")
PARALLEL_ENGINES = ("none", "megatron", "deepspeed")
JOB_NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]+")

# Far beyond any real run, and small enough that what is built from them (a job's list of sample
# indices, torch's 64-bit seeds) is built at once: a typo such as `max_steps: 1e9` is refused
# instead of hanging the run before its first step.
MAX_STEPS = 10_000_000
MAX_EPOCHS = 10_000
MAX_GLOBAL_BATCH_SIZE = 10_000_000
MAX_SAMPLES_PER_JOB = 100_000_000  # max_steps x global_batch_size, or epochs x records
MAX_SEED = 2**32 - 1
# parallel.timeout_s: under a second, ordinary jitter (a slow step, a checkpoint write) would stop
# a run; above a week it is a typo (and near torch's int32 milliseconds).
MIN_PARALLEL_TIMEOUT_S = 1.0
MAX_PARALLEL_TIMEOUT_S = 7 * 24 * 3600.0

# The built-in byte tokenizer's vocabulary: 256 bytes + pad, bos, eos (see runtime.tokenizer).
BYTE_TOKENIZER_VOCAB_SIZE = 259

# Inline model-config keys that must be positive integers; the required ones have no sensible default.
REQUIRED_INLINE_CONFIG_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
)
POSITIVE_INT_INLINE_CONFIG_KEYS = (*REQUIRED_INLINE_CONFIG_KEYS, "num_key_value_heads", "max_position_embeddings")

FILE_KEY = "<file>"


class ConfigError(ValueError):
    """All problems found in a config, each as (key path, reason); str() lists them all, one per line,
    e.g. "jobs[1].lora_dropout: must be in [0, 1), got 1.5"."""

    def __init__(self, problems: Sequence[tuple[str, str]]) -> None:
        self.problems: list[tuple[str, str]] = list(problems)
        super().__init__("\n".join(f"{key}: {reason}" for key, reason in self.problems))


@dataclass(frozen=True)
class ModelSpec:
    """The frozen base model: a local checkpoint (`path`) or an inline config built at random.

    path: local Hugging Face checkpoint directory (Llama, Qwen2, Mistral), resolved; or None.
    architecture: with an inline config, "llama" | "qwen2" | "mistral"; None with `path`.
    config: inline Hugging Face config kwargs; {} with `path`.
    dtype: "float32" | "bfloat16" | "float16".
    seed: initialisation seed of an inline-config model.
    quantize: None or "nf4" (the base weights stored in NF4).
    """

    path: str | None
    architecture: str | None
    config: dict
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    seed: int = 0
    quantize: str | None = None


@dataclass(frozen=True)
class JobSpec:
    """One LoRA fine-tuning job: its data, adapter, optimizer and length limits.

    name: unique, [A-Za-z0-9_-]+; the adapter name and the job's output directory name.
    data: JSONL or Parquet file, or a directory of Parquet files or from datasets' save_to_disk,
        resolved. format: "prompt_completion" ({"prompt", "completion"} records, loss on the
        completion), "text" ({"text"} records, loss on all of it) or "messages" (conversations
        rendered by the tokenizer's chat template, loss on the assistant's tokens); see runtime.data.
    global_batch_size: samples per optimizer step.
    max_steps / epochs: at most one is set by the user; with neither, epochs = 1.0.
    max_seq_len: samples are truncated to this many tokens.
    """

    name: str
    data: Path
    format: str
    r: int
    lora_alpha: float
    lora_dropout: float
    use_rslora: bool
    target_modules: list[str] | str
    lr: float
    weight_decay: float
    warmup_steps: int
    lr_schedule: str
    global_batch_size: int
    max_steps: int | None
    epochs: float | None
    max_seq_len: int
    seed: int
    eval_data: Path | None = None  # held-out records in the job's format: eval loss (and exact match for prompt_completion)
    columns: dict[str, str] | None = None  # format field -> the dataset's column name
    eval_fraction: float | None = None  # share of `data` held out for the eval loss instead of eval_data
    eval_every: int | None = None  # optimizer steps between eval losses; None: only at the last step
    early_stopping_patience: int | None = None  # evals without improvement that stop the job (best adapter kept)


@dataclass(frozen=True)
class SchedulerSpec:
    """How the jobs' samples are packed into microbatches (see lorafusion.scheduler).

    capacity: tokens per microbatch. solver: "milp" or "greedy" (first-fit decreasing).
    time_limit_s: MILP time budget per global batch (shared by its groups). pad_multiple: each job's segment in a
    microbatch is padded to a multiple of this. policy: "lorafusion" (grouping, packing and
    dependency-aware ordering), or a baseline's schedule for comparisons: "megatron" (one job at a
    time, fixed-size microbatches, a pipeline flush after every global batch) or "mlora" (one job
    per fixed-size microbatch, jobs round-robin).
    """

    capacity: int = 4096
    solver: str = "milp"
    time_limit_s: float = 0.5
    pad_multiple: int = 1
    policy: str = "lorafusion"


@dataclass(frozen=True)
class ParallelSpec:
    """Distributed execution: engine "none" | "megatron" | "deepspeed", pipeline and data parallelism."""

    engine: str = "none"
    pipeline_stages: int = 1
    data_parallel: int = 1
    stage_layers: tuple[int, ...] | None = None  # decoder layers per stage; None: balanced by cost
    # Seconds a rank waits on another (a send, receive or collective) before the run stops, naming
    # the rank that stopped answering; the engines pass it to every process group they create.
    timeout_s: float = 600.0


@dataclass(frozen=True)
class TrainConfig:
    """A validated `lorafusion train` config.

    tokenizer: local tokenizer directory (resolved), or None for the built-in byte tokenizer.
    output_dir: resolved against the config file's directory.
    checkpoint_every: optimizer steps per job between checkpoints; 0 = only at the end.
    backend: kernel backend, "auto" | "triton" | "torch".
    config_path: the file the config was read from, if any.
    overwrite: a command-line choice, not a YAML key: a fresh run may write into a non-empty
        output_dir (see lorafusion.runtime.output_dir).
    """

    model: ModelSpec
    tokenizer: str | None
    jobs: tuple[JobSpec, ...]
    scheduler: SchedulerSpec
    parallel: ParallelSpec
    output_dir: Path
    checkpoint_every: int
    log_every: int
    backend: str
    config_path: Path | None = None
    overwrite: bool = False


def load_config(path: str | os.PathLike) -> TrainConfig:
    """Read and validate a YAML config file; every problem, the file's own included, raises ConfigError."""
    config_path = Path(path).expanduser().resolve()
    try:
        text = config_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError([(FILE_KEY, f"cannot read {config_path}: {_error_reason(error)}")]) from error
    try:
        data = load_yaml(text, str(config_path))
    except YAMLInputError as error:
        raise ConfigError([(FILE_KEY, str(error))]) from None
    return parse_config(data, config_path.parent, config_path)


def parse_config(data: dict, base_dir: Path, config_path: Path | None = None, require_jobs: bool = True) -> TrainConfig:
    """Validate a config mapping (as read from YAML); relative paths are resolved against `base_dir`.
    With require_jobs=False a mapping without `jobs` is valid (`lorafusion serve`: jobs are submitted later).

    Raises ConfigError listing every problem found.
    """
    checker = _Checker(Path(base_dir))
    if not isinstance(data, dict):
        checker.add(FILE_KEY, f"must be a mapping with keys model, jobs, ...; got {_describe(data)}")
        raise ConfigError(checker.problems)
    checker.check_keys(data, "", _TOP_LEVEL_KEYS, required=("model", "jobs") if require_jobs else ("model",))

    tokenizer = checker.directory(data, "tokenizer", "")
    model = None
    if "model" in data:
        model = _parse_model(checker, data["model"], uses_byte_tokenizer=data.get("tokenizer") is None)
    # An empty section (`scheduler:`) means all defaults.
    scheduler = _parse_scheduler(checker, data.get("scheduler") or {})
    parallel = _parse_parallel(checker, data.get("parallel") or {})
    jobs = _parse_jobs(checker, data["jobs"], scheduler, model, parallel) if "jobs" in data else []

    default_output_dir = f"runs/{config_path.stem}" if config_path is not None else "runs"
    output_dir = checker.string(data, "output_dir", "", default=default_output_dir)
    checkpoint_every = checker.integer(data, "checkpoint_every", "", default=0, minimum=0)
    log_every = checker.integer(data, "log_every", "", default=1, minimum=1)
    backend = checker.choice(data, "backend", "", BACKENDS, default="auto")

    if checker.problems:
        raise ConfigError(checker.problems)
    return TrainConfig(
        model=model,
        tokenizer=tokenizer,
        jobs=tuple(jobs),
        scheduler=scheduler,
        parallel=parallel,
        output_dir=checker.resolve(output_dir),
        checkpoint_every=checkpoint_every,
        log_every=log_every,
        backend=backend,
        config_path=config_path,
    )


_TOP_LEVEL_KEYS = tuple(f.name for f in fields(TrainConfig) if f.name not in ("config_path", "overwrite"))
_MODEL_KEYS = tuple(f.name for f in fields(ModelSpec))
_JOB_KEYS = tuple(f.name for f in fields(JobSpec))
_SCHEDULER_KEYS = tuple(f.name for f in fields(SchedulerSpec))
_PARALLEL_KEYS = tuple(f.name for f in fields(ParallelSpec))


def _parse_model(checker: _Checker, section: object, uses_byte_tokenizer: bool) -> ModelSpec | None:
    model = checker.mapping(section, "model")
    if model is None:
        return None
    checker.check_keys(model, "model", _MODEL_KEYS)
    path = checker.directory(model, "path", "model")
    if path is not None and Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        checker.add("model.path", f"{path} has no config.json: not a Hugging Face checkpoint directory")
    architecture = checker.choice(model, "architecture", "model", ARCHITECTURES, default=None)
    inline_config = checker.mapping(model["config"], "model.config") if model.get("config") is not None else None

    has_path = model.get("path") is not None
    has_architecture, has_config = model.get("architecture") is not None, model.get("config") is not None
    if has_path and (has_architecture or has_config):
        checker.add("model", "set either path or architecture + config, not both")
    elif not (has_path or has_architecture or has_config):
        checker.add("model", "set either path (a local checkpoint) or architecture + config (an inline config)")
    elif not has_path and not has_architecture:
        checker.add("model.architecture", f"required with model.config; one of {', '.join(ARCHITECTURES)}")
    elif not has_path and not has_config:
        checker.add("model.config", "required with model.architecture")
    if inline_config is not None:
        _check_inline_config(checker, inline_config, uses_byte_tokenizer)

    return ModelSpec(
        path=path,
        architecture=architecture,
        config=dict(inline_config or {}),
        dtype=checker.choice(model, "dtype", "model", DTYPES, default="float32"),
        gradient_checkpointing=checker.boolean(model, "gradient_checkpointing", "model", default=False),
        seed=checker.integer(model, "seed", "model", default=0, minimum=0, limit=MAX_SEED),
        quantize=checker.choice(model, "quantize", "model", QUANTIZATIONS, default=None),
    )


def _check_inline_config(checker: _Checker, config: dict, uses_byte_tokenizer: bool) -> None:
    for key in config:
        if not isinstance(key, str):  # the config is passed on as keyword arguments
            checker.add("model.config", f"keys must be strings, got {key!r}")
    for key in REQUIRED_INLINE_CONFIG_KEYS:
        if key not in config:
            checker.add(f"model.config.{key}", "required key is missing")
    sizes = {
        key: checker.integer(config, key, "model.config", default=None, minimum=1)
        for key in POSITIVE_INT_INLINE_CONFIG_KEYS
    }
    hidden, heads, kv_heads = sizes["hidden_size"], sizes["num_attention_heads"], sizes["num_key_value_heads"]
    if hidden is not None and heads is not None and hidden % heads:
        checker.add("model.config.hidden_size", f"{hidden} is not divisible by num_attention_heads={heads}")
    if heads is not None and kv_heads is not None and heads % kv_heads:
        checker.add("model.config.num_key_value_heads", f"{kv_heads} does not divide num_attention_heads={heads}")
    vocab_size = sizes["vocab_size"]
    if uses_byte_tokenizer and vocab_size is not None and vocab_size < BYTE_TOKENIZER_VOCAB_SIZE:
        checker.add(
            "model.config.vocab_size",
            f"{vocab_size} is smaller than the byte tokenizer's {BYTE_TOKENIZER_VOCAB_SIZE} tokens (tokenizer: null)",
        )


def _parse_scheduler(checker: _Checker, section: object) -> SchedulerSpec:
    scheduler = checker.mapping(section, "scheduler")
    if scheduler is None:
        return SchedulerSpec()
    checker.check_keys(scheduler, "scheduler", _SCHEDULER_KEYS)
    return SchedulerSpec(
        capacity=checker.integer(scheduler, "capacity", "scheduler", default=4096, minimum=1),
        solver=checker.choice(scheduler, "solver", "scheduler", SOLVERS, default="milp"),
        time_limit_s=checker.number(scheduler, "time_limit_s", "scheduler", default=0.5, bounds="positive"),
        pad_multiple=checker.integer(scheduler, "pad_multiple", "scheduler", default=1, minimum=1),
        policy=checker.choice(scheduler, "policy", "scheduler", SCHEDULE_POLICIES, default="lorafusion"),
    )


def _parse_parallel(checker: _Checker, section: object) -> ParallelSpec:
    parallel = checker.mapping(section, "parallel")
    if parallel is None:
        return ParallelSpec()
    checker.check_keys(parallel, "parallel", _PARALLEL_KEYS)
    spec = ParallelSpec(
        engine=checker.choice(parallel, "engine", "parallel", PARALLEL_ENGINES, default="none"),
        pipeline_stages=checker.integer(parallel, "pipeline_stages", "parallel", default=1, minimum=1),
        data_parallel=checker.integer(parallel, "data_parallel", "parallel", default=1, minimum=1),
        stage_layers=_stage_layers(checker, parallel),
        timeout_s=checker.number(
            parallel, "timeout_s", "parallel", default=600.0, bounds="positive", maximum=MAX_PARALLEL_TIMEOUT_S
        ),
    )
    if spec.timeout_s is not None and spec.timeout_s < MIN_PARALLEL_TIMEOUT_S:
        checker.add("parallel.timeout_s", f"must be >= {MIN_PARALLEL_TIMEOUT_S:g} (seconds), got {parallel['timeout_s']}")
    if spec.stage_layers is not None and spec.pipeline_stages is not None and len(spec.stage_layers) != spec.pipeline_stages:
        checker.add(
            "parallel.stage_layers",
            f"needs one layer count per stage ({spec.pipeline_stages}), got {len(spec.stage_layers)}",
        )
    if spec.engine == "none":
        for key in ("pipeline_stages", "data_parallel"):
            size = getattr(spec, key)
            if size is not None and size > 1:
                checker.add(f"parallel.{key}", f"{size} needs parallel.engine megatron or deepspeed")
    return spec


def _stage_layers(checker: _Checker, parallel: dict) -> tuple[int, ...] | None:
    value = parallel.get("stage_layers")
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in value):
        checker.add("parallel.stage_layers", f"must be a list of positive layer counts, one per stage, got {value!r}")
        return None
    return tuple(value)


def _parse_jobs(
    checker: _Checker, section: object, scheduler: SchedulerSpec, model: ModelSpec | None, parallel: ParallelSpec
) -> list[JobSpec]:
    if not isinstance(section, list) or not section:
        checker.add("jobs", f"must be a non-empty list of jobs, got {_describe(section)}")
        return []
    max_positions = model.config.get("max_position_embeddings") if model is not None else None
    jobs = []
    first_index_of_name: dict[str, int] = {}
    for index, entry in enumerate(section):
        where = f"jobs[{index}]"
        job = checker.mapping(entry, where)
        if job is None:
            continue
        checker.check_keys(job, where, _JOB_KEYS, required=("name", "data", "global_batch_size"))
        name = checker.string(job, "name", where)
        if name is not None:
            if not JOB_NAME_PATTERN.fullmatch(name):
                checker.add(f"{where}.name", f"must match [A-Za-z0-9_-]+ (it names a directory), got {name!r}")
            elif name in RESERVED_NAMES:
                checker.add(f"{where}.name", f"{name!r} is reserved: output_dir/{name} holds the run's own files; rename the job")
            elif name in first_index_of_name:
                checker.add(f"{where}.name", f"duplicate of jobs[{first_index_of_name[name]}].name {name!r}")
            else:
                first_index_of_name[name] = index

        max_steps = checker.integer(job, "max_steps", where, default=None, minimum=1, limit=MAX_STEPS)
        epochs = checker.number(job, "epochs", where, default=None, bounds="positive", maximum=MAX_EPOCHS)
        global_batch_size = checker.integer(job, "global_batch_size", where, minimum=1, limit=MAX_GLOBAL_BATCH_SIZE)
        if max_steps is not None and global_batch_size is not None and max_steps * global_batch_size > MAX_SAMPLES_PER_JOB:
            checker.add(
                f"{where}.max_steps",
                f"max_steps x global_batch_size = {max_steps * global_batch_size:,} samples, more than {MAX_SAMPLES_PER_JOB:,}",
            )
        if job.get("max_steps") is not None and job.get("epochs") is not None:
            checker.add(where, "max_steps and epochs are both set; set at most one")
        elif job.get("max_steps") is None and job.get("epochs") is None:
            epochs = 1.0
        warmup_steps = checker.integer(job, "warmup_steps", where, default=0, minimum=0)
        if max_steps is not None and warmup_steps is not None and warmup_steps > max_steps:
            checker.add(f"{where}.warmup_steps", f"{warmup_steps} is more than max_steps={max_steps}")

        max_seq_len = checker.integer(job, "max_seq_len", where, default=512, minimum=1)
        if max_seq_len is not None and scheduler.capacity is not None and max_seq_len > scheduler.capacity:
            checker.add(
                f"{where}.max_seq_len",
                f"{max_seq_len} is larger than scheduler.capacity={scheduler.capacity}: "
                "a sample could not fit a microbatch",
            )
        if max_seq_len is not None and _is_int(max_positions) and max_positions >= 1 and max_seq_len > max_positions:
            checker.add(
                f"{where}.max_seq_len",
                f"{max_seq_len} is larger than model.config.max_position_embeddings={max_positions}",
            )

        jobs.append(
            JobSpec(
                name=name,
                data=_dataset_path(checker, job, "data", where),
                format=checker.choice(job, "format", where, DATA_FORMATS, default="prompt_completion"),
                r=checker.integer(job, "r", where, default=8, minimum=1, maximum=MAX_RANK),
                lora_alpha=checker.number(job, "lora_alpha", where, default=16.0, bounds="positive"),
                lora_dropout=checker.number(job, "lora_dropout", where, default=0.0, bounds="probability"),
                use_rslora=checker.boolean(job, "use_rslora", where, default=False),
                target_modules=checker.target_modules(job, where),
                lr=checker.number(job, "lr", where, default=2e-4, bounds="positive"),
                weight_decay=checker.number(job, "weight_decay", where, default=0.0, bounds="non_negative"),
                warmup_steps=warmup_steps,
                lr_schedule=checker.choice(job, "lr_schedule", where, LR_SCHEDULES, default="linear"),
                global_batch_size=global_batch_size,
                max_steps=max_steps,
                epochs=epochs,
                max_seq_len=max_seq_len,
                seed=checker.integer(job, "seed", where, default=0, minimum=0, limit=MAX_SEED),
                eval_data=_dataset_path(checker, job, "eval_data", where) if job.get("eval_data") is not None else None,
                **_evaluation_keys(checker, job, where, parallel),
            )
        )
    return jobs


def _dataset_path(checker: _Checker, job: dict, key: str, where: str) -> Path | None:
    """A JSONL or Parquet file, or a directory (of Parquet files, or from datasets' save_to_disk), resolved."""
    value = checker.string(job, key, where)
    if value is None:
        return None
    resolved = checker.resolve(value)
    if not resolved.exists():
        checker.add(_join(where, key), f"not found: {resolved} (a JSONL or Parquet file, or a dataset directory)")
    return resolved


def _evaluation_keys(checker: _Checker, job: dict, where: str, parallel: ParallelSpec) -> dict:
    """columns, eval_fraction, eval_every and early_stopping_patience of a job, checked together."""
    format = job.get("format", "prompt_completion")
    columns = job.get("columns")
    if columns is not None:
        fields = FORMAT_FIELDS.get(format, ())
        if not isinstance(columns, dict) or not columns:
            checker.add(f"{where}.columns", f"must be a mapping of field to column name, e.g. {{{fields[0] if fields else 'text'}: my_column}}; got {_describe(columns)}")
            columns = None
        else:
            for field, column in columns.items():
                if fields and field not in fields:
                    checker.add(f"{where}.columns.{field}", f"not a field of format {format}; its fields: {', '.join(fields)}")
                if not isinstance(column, str) or not column:
                    checker.add(f"{where}.columns.{field}", f"must be a column name (a non-empty string), got {_describe(column)}")
    eval_fraction = checker.number(job, "eval_fraction", where, default=None, bounds="positive")
    if eval_fraction is not None and eval_fraction >= 1:
        checker.add(f"{where}.eval_fraction", f"must be in (0, 1): the share of data held out, got {job['eval_fraction']}")
    if job.get("eval_fraction") is not None and job.get("eval_data") is not None:
        checker.add(f"{where}.eval_fraction", "set either eval_data or eval_fraction, not both")
    eval_every = checker.integer(job, "eval_every", where, default=None, minimum=1, limit=MAX_STEPS)
    has_eval = job.get("eval_data") is not None or job.get("eval_fraction") is not None
    if job.get("eval_every") is not None and not has_eval:
        checker.add(f"{where}.eval_every", "needs held-out records: set eval_data or eval_fraction")
    if job.get("eval_every") is not None and parallel.engine not in ("none", None):
        checker.add(f"{where}.eval_every", f"the eval loss runs in a single process: needs parallel.engine none, not {parallel.engine}")
    patience = checker.integer(job, "early_stopping_patience", where, default=None, minimum=1, limit=MAX_STEPS)
    if job.get("early_stopping_patience") is not None and job.get("eval_every") is None:
        checker.add(f"{where}.early_stopping_patience", "needs eval_every (and eval_data or eval_fraction)")
    return {
        "columns": dict(columns) if columns is not None else None,
        "eval_fraction": eval_fraction if eval_fraction is not None and eval_fraction < 1 else None,
        "eval_every": eval_every,
        "early_stopping_patience": patience,
    }


_REQUIRED = object()  # default of a key that must be present (its absence is reported by check_keys)


class _Checker:
    """Reads typed values out of config mappings, recording a (key path, reason) for each problem.

    A reader returns the value (or its default when the key is absent or null), or None when the
    value is wrong, so that parsing carries on and finds the remaining problems. Checks relating
    two values skip a None. Nothing built from a None reaches the user: any problem raises.
    """

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self.problems: list[tuple[str, str]] = []

    def add(self, key_path: str, reason: str) -> None:
        self.problems.append((key_path, reason))

    def resolve(self, path: str) -> Path:
        candidate = Path(path).expanduser()
        return candidate if candidate.is_absolute() else (self.base_dir / candidate).resolve()

    def check_keys(self, mapping: dict, where: str, known: Sequence[str], required: Sequence[str] = ()) -> None:
        for key in mapping:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
                hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
                self.add(_join(where, str(key)), f"unknown key; {hint}")
        for key in required:
            if key not in mapping:
                self.add(_join(where, key), "required key is missing")

    def mapping(self, value: object, where: str) -> dict | None:
        if isinstance(value, dict):
            return value
        self.add(where, f"must be a mapping, got {_describe(value)}")
        return None

    def _check(self, mapping: dict, key: str, where: str, default: Any, validate: Callable[[Any], str | None]) -> Any:
        value = mapping.get(key)
        if value is None:
            if default is not _REQUIRED:
                return default
            if key in mapping:  # an absent required key is reported by check_keys
                self.add(_join(where, key), "required, got null")
            return None
        reason = validate(value)
        if reason is not None:
            self.add(_join(where, key), reason)
            return None
        return value

    def integer(
        self,
        mapping: dict,
        key: str,
        where: str,
        default: Any = _REQUIRED,
        minimum: int | None = None,
        maximum: int | None = None,
        limit: int | None = None,
    ) -> Any:
        """An integer in minimum..maximum (named as a range), and at most `limit` (a bound against typos)."""
        def validate(value: Any) -> str | None:
            if not _is_int(value):
                return f"must be an integer, got {_describe(value)}"
            if minimum is not None and maximum is not None and not minimum <= value <= maximum:
                return f"must be in {minimum}..{maximum}, got {value}"
            if minimum is not None and value < minimum:
                return f"must be >= {minimum}, got {value}"
            if limit is not None and value > limit:
                return f"must be <= {limit}, got {value}"
            return None

        return self._check(mapping, key, where, default, validate)

    def number(
        self, mapping: dict, key: str, where: str, default: Any = _REQUIRED, bounds: str = "any", maximum: float | None = None
    ) -> Any:
        """A finite float; bounds "positive" (> 0), "non_negative" (>= 0), "probability" ([0, 1)) or "any";
        at most `maximum`."""

        def validate(value: Any) -> str | None:
            number = _as_float(value)
            if number is None or not math.isfinite(number):
                return f"must be a number, got {_describe(value)}"
            if bounds == "positive" and not number > 0:
                return f"must be > 0, got {value}"
            if bounds == "non_negative" and not number >= 0:
                return f"must be >= 0, got {value}"
            if bounds == "probability" and not 0 <= number < 1:
                return f"must be in [0, 1), got {value}"
            if maximum is not None and number > maximum:
                return f"must be <= {maximum:g}, got {value}"
            return None

        value = self._check(mapping, key, where, default, validate)
        return None if value is None else _as_float(value)

    def boolean(self, mapping: dict, key: str, where: str, default: bool) -> bool | None:
        def validate(value: Any) -> str | None:
            return None if isinstance(value, bool) else f"must be true or false, got {_describe(value)}"

        return self._check(mapping, key, where, default, validate)

    def string(self, mapping: dict, key: str, where: str, default: Any = _REQUIRED) -> Any:
        def validate(value: Any) -> str | None:
            if not isinstance(value, str) or not value:
                return f"must be a non-empty string, got {_describe(value)}"
            return None

        return self._check(mapping, key, where, default, validate)

    def choice(self, mapping: dict, key: str, where: str, choices: Sequence[str], default: Any) -> Any:
        def validate(value: Any) -> str | None:
            return None if value in choices else f"must be one of {', '.join(choices)}; got {_describe(value)}"

        return self._check(mapping, key, where, default, validate)

    def target_modules(self, job: dict, where: str) -> list[str] | str | None:
        def validate(value: Any) -> str | None:
            try:
                normalized_target_modules(value)
            except ValueError as error:
                return str(error).removeprefix("target_modules ")
            return None

        value = self._check(job, "target_modules", where, ALL_LINEAR, validate)
        return None if value is None else normalized_target_modules(value)

    def directory(self, mapping: dict, key: str, where: str) -> str | None:
        """An optional existing directory, resolved, as a string."""
        value = self.string(mapping, key, where, default=None)
        if value is None:
            return None
        resolved = self.resolve(value)
        if not resolved.is_dir():
            self.add(_join(where, key), f"directory not found: {resolved}{hub_hint(value)}")
        return str(resolved)

    def file(self, mapping: dict, key: str, where: str) -> Path | None:
        """A required existing file, resolved."""
        value = self.string(mapping, key, where)
        if value is None:
            return None
        resolved = self.resolve(value)
        if not resolved.is_file():
            self.add(_join(where, key), f"file not found: {resolved}")
        return resolved


# What a Hugging Face Hub repository id looks like ("meta-llama/Llama-3.2-1B"), as opposed to a path.
HUB_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def hub_hint(value: str) -> str:
    """For a missing directory named like a Hub repository: nothing is downloaded (runs must not
    depend on the network midway), so say how to fetch it first."""
    if not HUB_ID_PATTERN.fullmatch(value):
        return ""
    local = f"models/{value.split('/')[1]}"
    return (
        f" ({value!r} looks like a Hugging Face Hub id: lorafusion downloads nothing, so download it first with "
        f"`hf download {value} --local-dir {local}` (older huggingface_hub: `huggingface-cli download`) "
        f"and give that directory)"
    )


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_float(value: object) -> float | None:
    """A YAML number, or a string holding one (PyYAML reads `1e-3` as a string); None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float, str)):
        try:
            return float(value)
        except (ValueError, OverflowError):  # OverflowError: an integer beyond any float
            return None
    return None


def _describe(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, (dict, list)):
        return f"a {'mapping' if isinstance(value, dict) else 'list'}"
    return f"{value!r} ({type(value).__name__})" if isinstance(value, str) else repr(value)


def _error_reason(error: Exception) -> str:
    return error.strerror if isinstance(error, OSError) and error.strerror else str(error)
