"""What a converted model carries: its LoRA layers, and the configs apply_lora / apply_multi_lora
recorded on it (read by the adapter writer, load_adapter and the runtime)."""

from __future__ import annotations

from torch import nn

from lorafusion.config import LoRAConfig
from lorafusion.modules import FusedLoRALinear, MultiLoRALinear

# Attributes of the model where apply_lora records its config, and apply_multi_lora its configs
# by adapter name.
CONFIG_ATTRIBUTE = "lorafusion_config"
MULTI_CONFIG_ATTRIBUTE = "lorafusion_multi_configs"


def lora_modules(model: nn.Module) -> dict[str, FusedLoRALinear]:
    """The FusedLoRALinear layers of `model` by full module name, in model order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, FusedLoRALinear)}


def get_lora_config(model: nn.Module) -> LoRAConfig | None:
    """The LoRAConfig apply_lora (or load_adapter) recorded on `model`, or None."""
    return getattr(model, CONFIG_ATTRIBUTE, None)


def multi_lora_modules(model: nn.Module) -> dict[str, MultiLoRALinear]:
    """The MultiLoRALinear layers of `model` by full module name, in model order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, MultiLoRALinear)}


def get_multi_lora_configs(model: nn.Module) -> dict[str, LoRAConfig]:
    """The LoRAConfig of each adapter apply_multi_lora put on `model` (empty if none)."""
    return getattr(model, MULTI_CONFIG_ATTRIBUTE, {})
