"""Fused LoRA kernels (Triton) and their plain-torch references; installed as lorafusion.kernels.

Knows nothing of the training runtime: it takes tensors and returns tensors.
"""

from .lora_linear import BACKENDS, FORWARD_IMPLS, LoRALinearFunction, fused_lora_linear, resolve_backend
from .multi_lora_linear import MultiLoRALinearFunction, fused_multi_lora_linear
from .reference import lora_linear_reference, lora_scaling, torch_keep_mask
from .segments import SegmentMeta, build_segment_meta
from .utils import MAX_RANK

__all__ = [
    "BACKENDS",
    "FORWARD_IMPLS",
    "MAX_RANK",
    "LoRALinearFunction",
    "MultiLoRALinearFunction",
    "SegmentMeta",
    "build_segment_meta",
    "fused_multi_lora_linear",
    "fused_lora_linear",
    "lora_linear_reference",
    "lora_scaling",
    "resolve_backend",
    "torch_keep_mask",
]
