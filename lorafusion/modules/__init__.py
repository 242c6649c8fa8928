"""torch.nn modules built on the fused kernels."""

from .lora_linear import FusedLoRALinear
from .multi_lora_linear import MultiLoRABatch, MultiLoRALinear, multi_lora_batch

__all__ = ["FusedLoRALinear", "MultiLoRABatch", "MultiLoRALinear", "multi_lora_batch"]
