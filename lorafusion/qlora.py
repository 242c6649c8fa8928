"""QLoRA: frozen base weights in 4-bit NF4 (bitsandbytes' format) under the fused LoRA path.

- `quantize_nf4(weight, blocksize=64, double_quant=True)` -> `NF4Weight` (lorafusion.kernels.nf4),
  the same bytes bitsandbytes' `quantize_4bit(..., quant_type="nf4")` writes.
- `nf4_from_bnb(packed, quant_state)` / `nf4_to_bnb(weight)`: to and from bitsandbytes'
  (packed uint8, `QuantState`) pair; `nf4_from_linear4bit(module)` / `nf4_to_linear4bit(weight,
  bias)`: to and from `bitsandbytes.nn.Linear4bit` (bitsandbytes is imported lazily).
- `NF4Linear`: a frozen linear layer without adapter on an NF4 base (for the linears that
  `apply_lora(..., quantize="nf4", quantize_other_linears=True)` quantizes but does not target).
  These live in lorafusion.modules.nf4_linear, below the LoRA modules that use them.
- `memory_report(model)`: bytes per base parameter and total model bytes, against bf16.
- `export_merged(model, path, dtype)`: dequantize, merge the adapters, save a standard checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from lorafusion.kernels.nf4 import NESTED_BLOCKSIZE, NF4_BLOCKSIZES, NF4Weight, quantize_nf4
from lorafusion.modules import FusedLoRALinear
from lorafusion.modules.nf4_linear import (
    QUANTIZE_CHOICES,
    NF4Linear,
    check_quantize,
    is_linear4bit,
    nf4_from_bnb,
    nf4_from_linear4bit,
    nf4_to_bnb,
    nf4_to_linear4bit,
)


def _base_weights(model: nn.Module):
    """(name, element count, stored bytes) of every non-LoRA parameter and NF4 weight of `model`."""
    for name, module in model.named_modules():
        if isinstance(module, NF4Weight):
            yield name, module.numel(), module.nbytes()
    for name, parameter in model.named_parameters():
        if "lora_" not in name:
            yield name, parameter.numel(), parameter.numel() * parameter.element_size()


def memory_report(model: nn.Module) -> dict[str, float]:
    """Memory of `model`'s base weights and of the whole model, against the same model in bf16.

    base_parameters: elements of every frozen (non-LoRA) weight, NF4 ones counted unpacked;
    base_bytes / bytes_per_base_parameter: as stored (NF4 codes, statistics and tables included);
    model_bytes: every parameter and buffer; bf16_*: the same parameters all stored in bf16.
    """
    base = list(_base_weights(model))
    base_parameters = sum(count for _, count, _ in base)
    base_bytes = sum(size for _, _, size in base)
    model_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    lora_elements = sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
    bf16_model_bytes = 2 * (base_parameters + lora_elements)
    return {
        "base_parameters": base_parameters,
        "base_bytes": base_bytes,
        "bytes_per_base_parameter": base_bytes / max(base_parameters, 1),
        "bf16_base_bytes": 2 * base_parameters,
        "model_bytes": model_bytes,
        "bf16_model_bytes": bf16_model_bytes,
        "model_bytes_vs_bf16": model_bytes / max(bf16_model_bytes, 1),
    }


@torch.no_grad()
def merged_state_dict(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The state dict of `model` as a plain model: every LoRA layer's weight dequantized (if NF4)
    and merged (W + scaling B A, computed in fp32), NF4 linears dequantized, LoRA tensors dropped,
    floating-point tensors cast to `dtype`. Keys are those of the model before apply_lora."""
    merged = {}
    handled = set()
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, (FusedLoRALinear, NF4Linear)):
            weight = module.weight
            weight = weight.dequantize(backend="torch") if isinstance(weight, NF4Weight) else weight.detach()
            weight = weight.float()
            if isinstance(module, FusedLoRALinear) and not module.merged:
                weight = weight + module.scaling * (module.lora_B.float() @ module.lora_A.float())
            merged[prefix + "weight"] = weight.to(dtype)
            if module.bias is not None:
                merged[prefix + "bias"] = module.bias.detach().to(dtype)
            handled.add(prefix)
    for key, tensor in model.state_dict().items():
        owner = key.rsplit(".", 1)[0] + "." if "." in key else ""
        if any(owner.startswith(prefix) for prefix in handled if prefix):
            continue
        merged[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return merged


def export_merged(model: nn.Module, path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Dequantize, merge the adapters and save a standard checkpoint loadable into the original,
    unquantized model. `path` is a directory (created if needed) or a .safetensors file. Into a
    directory go model.safetensors and, for a Hugging Face model, its config.json (without any
    quantization_config, dtype set to `dtype`) and generation_config.json: a checkpoint that
    `AutoModelForCausalLM.from_pretrained(path)` loads. A .safetensors file gets the tensors only.
    Merging into the 4-bit base itself is refused (see FusedLoRALinear.merge); this is the
    lossless way to ship a QLoRA fine-tune. Returns the tensor file written."""
    from safetensors.torch import save_file

    path = Path(path)
    directory = path.suffix != ".safetensors"
    if directory:
        path.mkdir(parents=True, exist_ok=True)
        path = path / "model.safetensors"
    tensors = {key: tensor.contiguous() for key, tensor in merged_state_dict(model, dtype).items()}
    # safetensors refuses tensors sharing storage (tied embeddings): store each one on its own.
    seen = set()
    for key, tensor in tensors.items():
        if tensor.data_ptr() in seen:
            tensors[key] = tensor.clone()
        seen.add(tensor.data_ptr())
    # The "format" entry is what transformers' loader expects of a PyTorch safetensors checkpoint.
    save_file(tensors, str(path), metadata={"format": "pt"})
    if directory:
        _save_plain_config(model, path.parent, dtype)
    return path


def _save_plain_config(model: nn.Module, directory: Path, dtype: torch.dtype) -> None:
    """The model's Hugging Face config as that of a plain, unquantized `dtype` model (nothing for
    a model without one)."""
    import copy

    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        return
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    config.save_pretrained(directory)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and hasattr(generation_config, "save_pretrained"):
        generation_config.save_pretrained(directory)


__all__ = [
    "NESTED_BLOCKSIZE",
    "NF4Linear",
    "NF4_BLOCKSIZES",
    "NF4Weight",
    "QUANTIZE_CHOICES",
    "check_quantize",
    "export_merged",
    "memory_report",
    "merged_state_dict",
    "is_linear4bit",
    "nf4_from_bnb",
    "nf4_from_linear4bit",
    "nf4_to_bnb",
    "nf4_to_linear4bit",
    "quantize_nf4",
]
