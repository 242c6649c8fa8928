"""lorafusion: fast LoRA fine-tuning with fused kernels and multi-job scheduling."""

__version__ = "0.1.0"

from lorafusion.adapters import load_adapter, save_adapter  # noqa: E402
from lorafusion.apply import (  # noqa: E402
    apply_lora,
    apply_multi_lora,
    find_target_modules,
    get_lora_config,
    get_multi_lora_configs,
    lora_modules,
    multi_lora_modules,
)
from lorafusion.config import LoRAConfig  # noqa: E402
from lorafusion.modules import FusedLoRALinear, MultiLoRABatch, MultiLoRALinear, multi_lora_batch  # noqa: E402

__all__ = [
    "FusedLoRALinear",
    "LoRAConfig",
    "MultiLoRABatch",
    "MultiLoRALinear",
    "__version__",
    "apply_lora",
    "apply_multi_lora",
    "find_target_modules",
    "get_lora_config",
    "get_multi_lora_configs",
    "load_adapter",
    "lora_modules",
    "multi_lora_batch",
    "multi_lora_modules",
    "save_adapter",
]
