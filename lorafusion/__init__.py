"""lorafusion: fast LoRA fine-tuning with fused kernels and multi-job scheduling."""

__version__ = "0.1.0"

from lorafusion.adapters import load_adapter, save_adapter  # noqa: E402
from lorafusion.apply import apply_lora, find_target_modules, get_lora_config, lora_modules  # noqa: E402
from lorafusion.config import LoRAConfig  # noqa: E402
from lorafusion.modules import FusedLoRALinear  # noqa: E402

__all__ = [
    "FusedLoRALinear",
    "LoRAConfig",
    "__version__",
    "apply_lora",
    "find_target_modules",
    "get_lora_config",
    "load_adapter",
    "lora_modules",
    "save_adapter",
]
