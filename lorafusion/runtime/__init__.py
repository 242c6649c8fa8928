"""The multi-job training runtime behind `lorafusion train CONFIG.yaml`: config, tokenizer, data."""

from lorafusion.runtime.config import (
    ConfigError,
    JobSpec,
    ModelSpec,
    ParallelSpec,
    SchedulerSpec,
    TrainConfig,
    load_config,
    parse_config,
)
from lorafusion.runtime.data import IGNORE_INDEX, DataError, Sample, load_jsonl_dataset
from lorafusion.runtime.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "ByteTokenizer",
    "ConfigError",
    "DataError",
    "HFTokenizer",
    "JobSpec",
    "ModelSpec",
    "ParallelSpec",
    "Sample",
    "SchedulerSpec",
    "TrainConfig",
    "load_config",
    "load_jsonl_dataset",
    "load_tokenizer",
    "parse_config",
]
