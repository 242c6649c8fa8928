"""torch.nn modules built on the fused kernels."""

from .lora_linear import FusedLoRALinear

__all__ = ["FusedLoRALinear"]
