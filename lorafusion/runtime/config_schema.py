"""The declared schema of a training config: field types with their bounds, and the validators
that need a neighbour (an earlier field of the same section, read from `info.data`) or the config's
context (its directory; the model, scheduler and parallel sections for the jobs, see
runtime.config.ConfigSections).

Every type is strict: YAML's `"3"` is not an integer and `true` is not 1. Numbers are the one
exception: a string holding a float is read as one, because PyYAML (YAML 1.1) reads `1e-3` (an
exponent without a decimal point) as a string. A validator states its problem as the line the user
reads ("must be ..., got ..."); runtime.config_errors words pydantic's own errors the same way.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PlainValidator, Strict, ValidationInfo

from lorafusion.config import normalized_target_modules
from lorafusion.kernels import BACKENDS, MAX_RANK

from .config_errors import describe, fail, fail_at
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

# What a Hugging Face Hub repository id looks like ("meta-llama/Llama-3.2-1B"), as opposed to a path.
HUB_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def _float_from_string(value: object) -> object:
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


T = TypeVar("T")


def without_nulls(value: object) -> object:
    """`key: null` (or `key:` with nothing) means the key's default, as if it were absent."""
    return {key: item for key, item in value.items() if item is not None} if isinstance(value, dict) else value


# A mapping of keys -> values whose nulls mean "the default".
Section = Annotated[T, BeforeValidator(without_nulls)]

PositiveInt = Annotated[int, Strict(), Field(ge=1)]
NonNegativeInt = Annotated[int, Strict(), Field(ge=0)]
Seed = Annotated[int, Strict(), Field(ge=0, le=MAX_SEED)]
# Every number trains in float32 (an AdamW lr of 1e39 overflowed inside torch), so it must be one.
FLOAT32_MAX = 3.4028234663852886e38
Number = Annotated[
    float, Strict(), Field(allow_inf_nan=False, ge=-FLOAT32_MAX, le=FLOAT32_MAX), BeforeValidator(_float_from_string)
]
PositiveNumber = Annotated[Number, Field(gt=0)]
NonNegativeNumber = Annotated[Number, Field(ge=0)]
Flag = Annotated[bool, Strict()]
NonEmptyStr = Annotated[str, Strict(), Field(min_length=1)]


def _rank(r: int) -> int:
    if not 1 <= r <= MAX_RANK:
        fail(f"must be in 1..{MAX_RANK}, got {r}")
    return r


def _below_one(share: float) -> float:
    if share >= 1:
        fail(f"must be in (0, 1): the share of data held out, got {share}")
    return share


def _probability(value: float) -> float:
    if not 0 <= value < 1:
        fail(f"must be in [0, 1), got {value}")
    return value


def _at_least_a_second(value: float) -> float:
    if value < MIN_PARALLEL_TIMEOUT_S:
        fail(f"must be >= {MIN_PARALLEL_TIMEOUT_S:g} (seconds), got {value}")
    return value


Rank = Annotated[int, Strict(), AfterValidator(_rank)]
Probability = Annotated[Number, AfterValidator(_probability)]
TimeoutSeconds = Annotated[Number, Field(gt=0, le=MAX_PARALLEL_TIMEOUT_S), AfterValidator(_at_least_a_second)]


# ---- paths: resolved against the config file's directory (the validation context's base_dir) ----


def resolve(path: str, base_dir: Path) -> Path:
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() else (base_dir / candidate).resolve()


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


def _resolved(value: object, info: ValidationInfo) -> Path:
    if not isinstance(value, str) or not value:
        fail(f"must be a non-empty string, got {describe(value)}")
    return resolve(value, info.context["base_dir"])


def _directory(value: object, info: ValidationInfo) -> str:
    path = _resolved(value, info)
    if not path.is_dir():
        fail(f"directory not found: {path}{hub_hint(value)}")
    return str(path)


def _checkpoint_directory(value: object, info: ValidationInfo) -> str:
    path = _directory(value, info)
    if not (Path(path) / "config.json").is_file():
        fail(f"{path} has no config.json: not a Hugging Face checkpoint directory")
    return path


def _dataset(value: object, info: ValidationInfo) -> Path:
    path = _resolved(value, info)
    if not path.exists():
        fail(f"not found: {path} (a JSONL or Parquet file, or a dataset directory)")
    return path


Directory = Annotated[str, PlainValidator(_directory)]
CheckpointDirectory = Annotated[str, PlainValidator(_checkpoint_directory)]
# A JSONL or Parquet file, or a directory (of Parquet files, or from datasets' save_to_disk).
DatasetPath = Annotated[Path, PlainValidator(_dataset)]


# ---- the base model's inline config ---------------------------------------------------------------


def _divides_by_heads(hidden_size: int, info: ValidationInfo) -> int:
    heads = info.data.get("num_attention_heads")
    if heads is not None and hidden_size % heads:
        fail(f"{hidden_size} is not divisible by num_attention_heads={heads}")
    return hidden_size


def _divides_heads(kv_heads: int, info: ValidationInfo) -> int:
    heads = info.data.get("num_attention_heads")
    if heads is not None and heads % kv_heads:
        fail(f"{kv_heads} does not divide num_attention_heads={heads}")
    return kv_heads


def _covers_the_byte_tokenizer(vocab_size: int, info: ValidationInfo) -> int:
    if info.context.get("byte_tokenizer") and vocab_size < BYTE_TOKENIZER_VOCAB_SIZE:
        fail(f"{vocab_size} is smaller than the byte tokenizer's {BYTE_TOKENIZER_VOCAB_SIZE} tokens (tokenizer: null)")
    return vocab_size


class InlineModelConfig(BaseModel):
    """The keys of an inline Hugging Face config that are checked; the others go to the config class as given."""

    model_config = ConfigDict(extra="allow")

    num_attention_heads: PositiveInt
    hidden_size: Annotated[PositiveInt, AfterValidator(_divides_by_heads)]
    intermediate_size: PositiveInt
    num_hidden_layers: PositiveInt
    vocab_size: Annotated[PositiveInt, AfterValidator(_covers_the_byte_tokenizer)]
    num_key_value_heads: Annotated[PositiveInt, AfterValidator(_divides_heads)] | None = None
    max_position_embeddings: PositiveInt | None = None


def _inline_config(config: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
    """Checked as InlineModelConfig, kept as written (it is passed on as keyword arguments)."""
    InlineModelConfig.model_validate(config, context=info.context)
    return config


InlineConfig = Annotated[dict, AfterValidator(_inline_config)]


# ---- jobs ------------------------------------------------------------------------------------------


def _job_name(name: str) -> str:
    if not JOB_NAME_PATTERN.fullmatch(name):
        fail(f"must match [A-Za-z0-9_-]+ (it names a directory), got {name!r}")
    if name in RESERVED_NAMES:
        fail(f"{name!r} is reserved: output_dir/{name} holds the run's own files; rename the job")
    return name


def _target_modules(value: object) -> list[str] | str:
    try:
        return normalized_target_modules(value)
    except ValueError as error:
        fail(str(error).removeprefix("target_modules "))


def _columns(columns: object, info: ValidationInfo) -> dict[str, str]:
    """The dataset's name for each of the format's fields that it names differently."""
    fields = FORMAT_FIELDS.get(info.data.get("format"), ())
    if not isinstance(columns, dict) or not columns:
        fail(f"must be a mapping of field to column name, e.g. {{{fields[0] if fields else 'text'}: my_column}}; got {'an empty mapping' if columns == {} else describe(columns)}")
    problems = []
    for field, column in columns.items():
        if fields and field not in fields:
            problems.append(((field,), f"not a field of format {info.data['format']}; its fields: {', '.join(fields)}"))
        if not isinstance(column, str) or not column:
            problems.append(((field,), f"must be a column name (a non-empty string), got {describe(column)}"))
    # Each field reads its own column (a field not mapped reads the column of its own name).
    field_of_column: dict[str, str] = {}
    for field in fields:
        column = columns.get(field, field)
        if not isinstance(column, str):
            continue
        if column in field_of_column:
            problems.append(((field,), f'column "{column}" is already {field_of_column[column]}\'s; each field needs its own column'))
        field_of_column[column] = field
    if problems:
        fail_at(problems, columns)
    return dict(columns)


def _samples_within_limit(max_steps: int, info: ValidationInfo) -> int:
    batch = info.data.get("global_batch_size")
    if batch is not None and max_steps * batch > MAX_SAMPLES_PER_JOB:
        fail(f"max_steps x global_batch_size = {max_steps * batch:,} samples, more than {MAX_SAMPLES_PER_JOB:,}")
    return max_steps


def _one_epoch_by_default(epochs: float | None, info: ValidationInfo) -> float | None:
    """With neither max_steps nor epochs, a job reads its data once."""
    return 1.0 if epochs is None and "max_steps" in info.data and info.data["max_steps"] is None else epochs


def _warmup_within_steps(warmup_steps: int, info: ValidationInfo) -> int:
    max_steps = info.data.get("max_steps")
    if max_steps is not None and warmup_steps > max_steps:
        fail(f"{warmup_steps} is more than max_steps={max_steps}")
    return warmup_steps


def _fits_model_and_microbatch(max_seq_len: int, info: ValidationInfo) -> int:
    """A sample must fit a microbatch (scheduler.capacity) and the model's positions."""
    scheduler, model = info.context.get("scheduler"), info.context.get("model")
    problems = []
    if scheduler is not None and max_seq_len > scheduler.capacity:
        problems.append(((), f"{max_seq_len} is larger than scheduler.capacity={scheduler.capacity}: a sample could not fit a microbatch"))
    max_positions = model.config.get("max_position_embeddings") if model is not None else None
    if max_positions is not None and max_seq_len > max_positions:
        problems.append(((), f"{max_seq_len} is larger than model.config.max_position_embeddings={max_positions}"))
    if problems:
        fail_at(problems, max_seq_len)
    return max_seq_len


JobName = Annotated[NonEmptyStr, AfterValidator(_job_name)]
TargetModules = Annotated[list[str] | str, PlainValidator(_target_modules)]
Columns = Annotated[dict[str, str], PlainValidator(_columns)]
GlobalBatchSize = Annotated[int, Strict(), Field(ge=1, le=MAX_GLOBAL_BATCH_SIZE)]
MaxSteps = Annotated[int, Strict(), Field(ge=1, le=MAX_STEPS), AfterValidator(_samples_within_limit)]
Epochs = Annotated[Annotated[PositiveNumber, Field(le=MAX_EPOCHS)] | None, Field(validate_default=True), AfterValidator(_one_epoch_by_default)]
WarmupSteps = Annotated[NonNegativeInt, AfterValidator(_warmup_within_steps)]
MaxSeqLen = Annotated[PositiveInt, Field(validate_default=True), AfterValidator(_fits_model_and_microbatch)]
EvalEvery = Annotated[int, Strict(), Field(ge=1, le=MAX_STEPS)]
HeldOutShare = Annotated[PositiveNumber, AfterValidator(_below_one)]
Patience = Annotated[int, Strict(), Field(ge=1, le=MAX_STEPS)]


# ---- parallel ------------------------------------------------------------------------------------


def _needs_an_engine(size: int, info: ValidationInfo) -> int:
    if size > 1 and info.data.get("engine") == "none":
        fail(f"{size} needs parallel.engine megatron or deepspeed")
    return size


def _one_count_per_stage(stage_layers: tuple[int, ...], info: ValidationInfo) -> tuple[int, ...]:
    stages = info.data.get("pipeline_stages")
    if stages is not None and len(stage_layers) != stages:
        fail(f"needs one layer count per stage ({stages}), got {len(stage_layers)}")
    return stage_layers


ParallelSize = Annotated[PositiveInt, AfterValidator(_needs_an_engine)]
StageLayers = Annotated[tuple[PositiveInt, ...], Field(min_length=1), AfterValidator(_one_count_per_stage)]


def choice(options: tuple[str, ...]) -> Any:
    """One of `options` (a Literal of them, so the schema lists them)."""
    return Literal[options]


Architecture = choice(ARCHITECTURES)
Backend = choice(BACKENDS)
Dtype = choice(DTYPES)
Quantization = choice(QUANTIZATIONS)
DataFormat = choice(DATA_FORMATS)
LRSchedule = choice(LR_SCHEDULES)
Solver = choice(SOLVERS)
SchedulePolicy = choice(SCHEDULE_POLICIES)
ParallelEngine = choice(PARALLEL_ENGINES)
