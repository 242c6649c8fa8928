"""Parameter storage of the original model vs the LoRAM-pruned model vs the pruned model in NF4
(QLoRAM), computed from shapes alone: the models are built on the meta device, so a 70B-shaped
report needs no weights and no memory."""

from __future__ import annotations

import copy
import math

import torch
import transformers
from torch import nn

from lorafusion.kernels.nf4 import NESTED_BLOCKSIZE, check_blocksize

from lorafusion.models import LAYER_SIZES_ATTRIBUTE, PruneMap, empty_pruned_model

NF4_TABLE_BYTES = 16 * 4  # the fp32 NF4 code
NESTED_TABLE_BYTES = 256 * 4 + 4  # the fp32 dynamic code and the fp32 offset


def nf4_bytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> int:
    """Bytes an NF4Weight of `numel` elements stores (codes, absmax statistics and tables), as
    `NF4Weight.nbytes()` counts them."""
    check_blocksize(blocksize)
    blocks = math.ceil(numel / blocksize)
    stored = (numel + 1) // 2 + NF4_TABLE_BYTES
    if double_quant:
        return stored + blocks + 4 * math.ceil(blocks / NESTED_BLOCKSIZE) + NESTED_TABLE_BYTES
    return stored + 4 * blocks


def _original_config(config: transformers.PretrainedConfig, prune_map: PruneMap) -> transformers.PretrainedConfig:
    """The original model's config from the original's or the pruned model's config."""
    config = copy.deepcopy(config)
    shape = prune_map.original
    for key in ("intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim"):
        setattr(config, key, getattr(shape, key))
    if hasattr(config, LAYER_SIZES_ATTRIBUTE):
        delattr(config, LAYER_SIZES_ATTRIBUTE)
    prune_map.check_original(config, "the config")
    return config


def _storage(model: nn.Module, dtype_bytes: int, blocksize: int, double_quant: bool) -> dict[str, int]:
    """Parameters, bytes in the 16-bit dtype, and bytes with the decoder layers' linears in NF4
    (embeddings, norms and the output layer stay 16-bit, as QLoRA keeps them)."""
    parameters = {id(p): p for p in model.parameters()}  # tied weights counted once
    count = sum(p.numel() for p in parameters.values())
    quantized = [m.weight for name, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in f".{name}"]
    quantized_elements = sum(w.numel() for w in quantized)
    nf4 = sum(nf4_bytes(w.numel(), blocksize, double_quant) for w in quantized)
    return {"parameters": count, "bytes": count * dtype_bytes, "nf4_bytes": (count - quantized_elements) * dtype_bytes + nf4}


def loram_memory_report(
    config: transformers.PretrainedConfig,
    prune_map: PruneMap,
    dtype: torch.dtype = torch.bfloat16,
    blocksize: int = 64,
    double_quant: bool = True,
) -> dict[str, float]:
    """Parameter storage of the original model (in `dtype`), the pruned model (in `dtype`) and
    the pruned model with its decoder linears in NF4 (QLoRAM), and the reduction factors.

    config: the original model's or the pruned model's Hugging Face config. Keys: *_parameters,
    *_bytes for original / pruned / pruned_nf4 (original_nf4_bytes too: plain QLoRA), and
    parameter_reduction (original / pruned parameters), storage_reduction (original bytes /
    pruned NF4 bytes, the paper's "parameter storage" factor, 15.81x for LLaMA-3.1-70B QLoRAM-Stru).
    """
    dtype_bytes = torch.empty(0, dtype=dtype).element_size()
    original_config = _original_config(config, prune_map)
    with torch.device("meta"):
        original = transformers.AutoModelForCausalLM.from_config(original_config)
        pruned = empty_pruned_model(original_config, prune_map, dtype)
    original_storage = _storage(original, dtype_bytes, blocksize, double_quant)
    pruned_storage = _storage(pruned, dtype_bytes, blocksize, double_quant)
    return {
        "original_parameters": original_storage["parameters"],
        "original_bytes": original_storage["bytes"],
        "original_nf4_bytes": original_storage["nf4_bytes"],
        "pruned_parameters": pruned_storage["parameters"],
        "pruned_bytes": pruned_storage["bytes"],
        "pruned_nf4_bytes": pruned_storage["nf4_bytes"],
        "parameter_reduction": original_storage["parameters"] / pruned_storage["parameters"],
        "storage_reduction": original_storage["bytes"] / pruned_storage["nf4_bytes"],
    }
