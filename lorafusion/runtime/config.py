"""The training config of `lorafusion train CONFIG.yaml`: YAML -> validated, frozen dataclasses.

Validation runs before any work starts and reports every problem at once (as `ConfigError`), each
with the key path it concerns, so a user fixes a config in one round instead of one error per run.
The dataclasses below are the schema: pydantic validates a mapping into them, by the field types of
runtime.config_schema (strict, bounded, paths checked), and refuses unknown keys by name. A job
submitted to `lorafusion serve` is checked by the same JobSpec.

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
    scheduler: {capacity: 4096, solver: milp, time_limit_s: 0.5, pad_multiple: 1, policy: lorafusion}
    parallel: {engine: none, pipeline_stages: 1, data_parallel: 1, stage_layers: null, timeout_s: 600}
    output_dir: runs/NAME       # (runs/<config file stem>)
    checkpoint_every: 0         # optimizer steps per job between checkpoints; 0: only at the end
    log_every: null             # steps between plain progress lines (not on a terminal); null: about ten per job
    backend: auto               # auto | triton | torch | cuda

Relative paths (model.path, tokenizer, jobs[].data, output_dir) are resolved against the config
file's directory. Float fields also accept strings such as "1e-3", because PyYAML (YAML 1.1)
reads an exponent without a decimal point as a string.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator, model_validator, with_config

from lorafusion.config import ALL_LINEAR
from lorafusion.safe_yaml import YAMLInputError, load_yaml

from .config_errors import describe, fail, problem
from .config_schema import (
    ARCHITECTURES,
    JOB_NAME_PATTERN,
    Architecture,
    Backend,
    CheckpointDirectory,
    Columns,
    DataFormat,
    DatasetPath,
    Directory,
    Dtype,
    Epochs,
    EvalEvery,
    Flag,
    GlobalBatchSize,
    HeldOutShare,
    InlineConfig,
    JobName,
    LRSchedule,
    MaxSeqLen,
    MaxSteps,
    NonEmptyStr,
    NonNegativeInt,
    NonNegativeNumber,
    ParallelEngine,
    ParallelSize,
    Patience,
    PositiveInt,
    PositiveNumber,
    Probability,
    Quantization,
    Rank,
    SchedulePolicy,
    Section,
    Seed,
    Solver,
    StageLayers,
    TargetModules,
    TimeoutSeconds,
    WarmupSteps,
    resolve,
    without_nulls,
)
from .output_dir import RESERVED_NAMES

FILE_KEY = "<file>"
STRICT_SECTION = ConfigDict(extra="forbid")


class ConfigError(ValueError):
    """All problems found in a config, each as (key path, reason); str() lists them all, one per line,
    e.g. "jobs[1].lora_dropout: must be in [0, 1), got 1.5"."""

    def __init__(self, problems: Sequence[tuple[str, str]]) -> None:
        self.problems: list[tuple[str, str]] = list(problems)
        super().__init__("\n".join(f"{key}: {reason}" for key, reason in self.problems))


@with_config(STRICT_SECTION)
@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """The frozen base model: a local checkpoint (`path`) or an inline config built at random.

    path: local Hugging Face checkpoint directory (Llama, Qwen2, Mistral), resolved; or None.
    architecture: with an inline config, "llama" | "qwen2" | "mistral"; None with `path`.
    config: inline Hugging Face config kwargs; {} with `path`.
    dtype: "float32" | "bfloat16" | "float16".
    seed: initialisation seed of an inline-config model.
    quantize: None or "nf4" (the base weights stored in NF4).
    """

    path: CheckpointDirectory | None = None
    architecture: Architecture | None = None
    config: InlineConfig = field(default_factory=dict)
    dtype: Dtype = "float32"
    gradient_checkpointing: Flag = False
    seed: Seed = 0
    quantize: Quantization | None = None


@with_config(STRICT_SECTION)
@dataclass(frozen=True, kw_only=True)
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

    Fields are validated in this order, so a field's checks may read the ones above it.
    """

    name: JobName
    data: DatasetPath
    format: DataFormat = "prompt_completion"
    r: Rank = 8
    lora_alpha: PositiveNumber = 16.0
    lora_dropout: Probability = 0.0
    use_rslora: Flag = False
    target_modules: TargetModules = ALL_LINEAR
    lr: PositiveNumber = 2e-4
    weight_decay: NonNegativeNumber = 0.0
    lr_schedule: LRSchedule = "linear"
    global_batch_size: GlobalBatchSize
    max_steps: MaxSteps | None = None
    epochs: Epochs = None
    warmup_steps: WarmupSteps = 0
    max_seq_len: MaxSeqLen = 512
    seed: Seed = 0
    eval_data: DatasetPath | None = None  # held-out records in the job's format: eval loss (and exact match for prompt_completion)
    columns: Columns | None = None  # format field -> the dataset's column name
    eval_fraction: HeldOutShare | None = None  # share of `data` held out for the eval loss instead of eval_data
    eval_every: EvalEvery | None = None  # optimizer steps between eval losses; None: only at the last step
    early_stopping_patience: Patience | None = None  # evals without improvement that stop the job (best adapter kept)


@with_config(STRICT_SECTION)
@dataclass(frozen=True, kw_only=True)
class SchedulerSpec:
    """How the jobs' samples are packed into microbatches (see lorafusion.scheduler).

    capacity: tokens per microbatch. solver: "milp" or "greedy" (first-fit decreasing).
    time_limit_s: MILP time budget per global batch (shared by its groups). pad_multiple: each job's segment in a
    microbatch is padded to a multiple of this. policy: "lorafusion" (grouping, packing and
    dependency-aware ordering), or a baseline's schedule for comparisons: "megatron" (one job at a
    time, fixed-size microbatches, a pipeline flush after every global batch) or "mlora" (one job
    per fixed-size microbatch, jobs round-robin).
    """

    capacity: PositiveInt = 4096
    solver: Solver = "milp"
    time_limit_s: PositiveNumber = 0.5
    pad_multiple: PositiveInt = 1
    policy: SchedulePolicy = "lorafusion"


@with_config(STRICT_SECTION)
@dataclass(frozen=True, kw_only=True)
class ParallelSpec:
    """Distributed execution: engine "none" | "megatron" | "deepspeed", pipeline and data parallelism."""

    engine: ParallelEngine = "none"
    pipeline_stages: ParallelSize = 1
    data_parallel: ParallelSize = 1
    stage_layers: StageLayers | None = None  # decoder layers per stage; None: balanced by cost
    # Seconds a rank waits on another (a send, receive or collective) before the run stops, naming
    # the rank that stopped answering; the engines pass it to every process group they create.
    timeout_s: TimeoutSeconds = 600.0


@dataclass(frozen=True)
class TrainConfig:
    """A validated `lorafusion train` config.

    tokenizer: local tokenizer directory (resolved), or None for the built-in byte tokenizer.
    output_dir: resolved against the config file's directory.
    checkpoint_every: optimizer steps per job between checkpoints; 0 = only at the end.
    backend: kernel backend, "auto" | "triton" | "torch" | "cuda".
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
    log_every: int | None
    backend: str
    config_path: Path | None = None
    overwrite: bool = False


class ConfigSections(BaseModel):
    """The YAML keys of a config (TrainConfig less what the command line adds). Without `jobs` as
    `lorafusion serve` reads them: its jobs are submitted later, and checked one at a time."""

    model_config = ConfigDict(extra="forbid")

    # Validated in this order: the jobs are checked against the sections above them.
    model: Section[ModelSpec]
    tokenizer: Directory | None = None
    scheduler: Section[SchedulerSpec] = SchedulerSpec()
    parallel: Section[ParallelSpec] = ParallelSpec()
    jobs: tuple[Section[JobSpec], ...] = ()
    output_dir: NonEmptyStr | None = None
    checkpoint_every: NonNegativeInt = 0
    log_every: PositiveInt | None = None
    backend: Backend = "auto"

    _nulls_are_defaults = model_validator(mode="before")(without_nulls)

    @field_validator("jobs", mode="wrap")
    @classmethod
    def _jobs_see_the_sections(cls, jobs: Any, handler: Any, info: ValidationInfo) -> Any:
        if not isinstance(jobs, list) or not jobs:
            fail(f"must be a non-empty list of jobs, got {describe(jobs)}")
        info.context.update(info.data)  # the model, scheduler and parallel sections that validated
        return handler(jobs)


class ConfigFile(ConfigSections):
    """A `lorafusion train` config: the sections with at least one job."""

    jobs: tuple[Section[JobSpec], ...]


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
    if not isinstance(data, dict):
        raise ConfigError([(FILE_KEY, f"must be a mapping with keys model, jobs, ...; got {describe(data)}")])
    problems = _combination_problems(data)
    context = {"base_dir": Path(base_dir), "byte_tokenizer": data.get("tokenizer") is None}
    try:
        sections = (ConfigFile if require_jobs else ConfigSections).model_validate(data, context=context)
    except ValidationError as error:
        problems += [problem(details, data, _section_keys) for details in error.errors()]
    if problems:
        raise ConfigError(problems)
    default_output_dir = f"runs/{config_path.stem}" if config_path is not None else "runs"
    return TrainConfig(
        model=sections.model,
        tokenizer=sections.tokenizer,
        jobs=sections.jobs,
        scheduler=sections.scheduler,
        parallel=sections.parallel,
        output_dir=resolve(sections.output_dir or default_output_dir, Path(base_dir)),
        checkpoint_every=sections.checkpoint_every,
        log_every=sections.log_every,
        backend=sections.backend,
        config_path=config_path,
    )


def _combination_problems(data: dict) -> list[tuple[str, str]]:
    """Which keys may be set together, read from the mapping as written: a key counts as set when
    it is not null, whether or not its value is valid."""
    problems = []
    model = data.get("model")
    given = {key for key in ("path", "architecture", "config") if model.get(key) is not None} if isinstance(model, dict) else None
    if given is not None and "path" in given and len(given) > 1:
        problems.append(("model", "set either path or architecture + config, not both"))
    elif given is not None and not given:
        problems.append(("model", "set either path (a local checkpoint) or architecture + config (an inline config)"))
    elif given == {"config"}:
        problems.append(("model.architecture", f"required with model.config; one of {', '.join(ARCHITECTURES)}"))
    elif given == {"architecture"}:
        problems.append(("model.config", "required with model.architecture"))

    first_index_of_name: dict[str, int] = {}
    for index, job in enumerate(data["jobs"] if isinstance(data.get("jobs"), list) else []):
        if not isinstance(job, dict):
            continue
        where = f"jobs[{index}]"
        given = {key for key, value in job.items() if value is not None}
        if {"max_steps", "epochs"} <= given:
            problems.append((where, "max_steps and epochs are both set; set at most one"))
        if {"eval_fraction", "eval_data"} <= given:
            problems.append((f"{where}.eval_fraction", "set either eval_data or eval_fraction, not both"))
        if "eval_every" in given and not given & {"eval_data", "eval_fraction"}:
            problems.append((f"{where}.eval_every", "needs held-out records: set eval_data or eval_fraction"))
        if "early_stopping_patience" in given and "eval_every" not in given:
            problems.append((f"{where}.early_stopping_patience", "needs eval_every (and eval_data or eval_fraction)"))
        name = job.get("name")
        if isinstance(name, str) and JOB_NAME_PATTERN.fullmatch(name) and name not in RESERVED_NAMES:
            if name in first_index_of_name:
                problems.append((f"{where}.name", f"duplicate of jobs[{first_index_of_name[name]}].name {name!r}"))
            else:
                first_index_of_name[name] = index
    return problems


def _section_keys(loc: tuple) -> list[str] | None:
    """The keys of the section that holds loc[-1] (for jobs[1].lr a JobSpec's), None outside the sections."""
    owner = _SECTIONS.get(tuple(part for part in loc[:-1] if isinstance(part, str)))
    if owner is None:
        return None
    return list(owner.model_fields) if owner is ConfigSections else [f.name for f in fields(owner)]


_SECTIONS = {(): ConfigSections, ("model",): ModelSpec, ("jobs",): JobSpec, ("scheduler",): SchedulerSpec, ("parallel",): ParallelSpec}


def _error_reason(error: Exception) -> str:
    return error.strerror if isinstance(error, OSError) and error.strerror else str(error)
