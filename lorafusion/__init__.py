"""lorafusion: fast LoRA fine-tuning with fused kernels and multi-job scheduling.

The public names below are imported on first use (PEP 562 module ``__getattr__``), so that
``import lorafusion.scheduler`` - a numpy/scipy package a cluster front end imports to plan jobs -
does not pull in torch through this file.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_adapter": "lorafusion.adapter_loading",
    "save_adapter": "lorafusion.adapters",
    "apply_lora": "lorafusion.apply",
    "apply_multi_lora": "lorafusion.apply",
    "find_target_modules": "lorafusion.apply",
    "get_lora_config": "lorafusion.lora_state",
    "get_multi_lora_configs": "lorafusion.lora_state",
    "lora_modules": "lorafusion.lora_state",
    "multi_lora_modules": "lorafusion.lora_state",
    "LoRAConfig": "lorafusion.config",
    "FusedLoRALinear": "lorafusion.modules",
    "MultiLoRABatch": "lorafusion.modules",
    "MultiLoRALinear": "lorafusion.modules",
    "multi_lora_batch": "lorafusion.modules",
    "fuse_peft": "lorafusion.peft_fusion",
    "unfuse_peft": "lorafusion.peft_fusion",
}

__all__ = ["__version__", *sorted(_EXPORTS)]

if TYPE_CHECKING:  # static analysers see the eager imports
    from lorafusion.adapter_loading import load_adapter
    from lorafusion.adapters import save_adapter
    from lorafusion.apply import apply_lora, apply_multi_lora, find_target_modules
    from lorafusion.config import LoRAConfig
    from lorafusion.lora_state import get_lora_config, get_multi_lora_configs, lora_modules, multi_lora_modules
    from lorafusion.modules import FusedLoRALinear, MultiLoRABatch, MultiLoRALinear, multi_lora_batch
    from lorafusion.peft_fusion import fuse_peft, unfuse_peft


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        # AttributeError (not ImportError) lets `from lorafusion import qlora` fall back to the submodule.
        raise AttributeError(f"module 'lorafusion' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
