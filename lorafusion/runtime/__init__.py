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
