"""torch.nn modules built on the fused kernels."""

from .lora_linear import FusedLoRALinear
from .multi_lora_linear import MultiLoRABatch, MultiLoRALinear, checkpoint_context_fn, multi_lora_batch

__all__ = ["FusedLoRALinear", "MultiLoRABatch", "MultiLoRALinear", "checkpoint_context_fn", "multi_lora_batch"]
