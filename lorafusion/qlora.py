"""QLoRA: frozen base weights in 4-bit NF4 (bitsandbytes' format) under the fused LoRA path.

- `quantize_nf4(weight, blocksize=64, double_quant=True)` -> `NF4Weight` (lorafusion.kernels.nf4),
  the same bytes bitsandbytes' `quantize_4bit(..., quant_type="nf4")` writes.
- `nf4_from_bnb(packed, quant_state)` / `nf4_to_bnb(weight)`: to and from bitsandbytes'
  (packed uint8, `QuantState`) pair; `nf4_from_linear4bit(module)` / `nf4_to_linear4bit(weight,
  bias)`: to and from `bitsandbytes.nn.Linear4bit`. bitsandbytes is imported only here, lazily.
- `NF4Linear`: a frozen linear layer without adapter on an NF4 base (for the linears that
  `apply_lora(..., quantize="nf4", quantize_other_linears=True)` quantizes but does not target).
- `memory_report(model)`: bytes per base parameter and total model bytes, against bf16.
- `export_merged(model, path, dtype)`: dequantize, merge the adapters, save a standard checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from lorafusion.kernels.lora_linear import resolve_backend
from lorafusion.kernels.nf4 import NESTED_BLOCKSIZE, NF4_BLOCKSIZES, NF4Weight, dequantize_workspace, quantize_nf4

QUANTIZE_CHOICES = ("nf4",)


def check_quantize(quantize: object) -> None:
    """Only NF4 is supported; anything else (fp4, fp8, int8, ...) is refused by name."""
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(
            f"quantize must be one of {QUANTIZE_CHOICES} or None, got {quantize!r}: only 4-bit NF4 base "
            "weights (bitsandbytes' format) are supported"
        )


def nf4_from_bnb(packed: torch.Tensor, quant_state) -> NF4Weight:
    """An `NF4Weight` sharing the tensors of a bitsandbytes NF4 (packed uint8, QuantState) pair."""
    if quant_state.quant_type != "nf4":
        raise ValueError(f"quant_state.quant_type must be 'nf4', got {quant_state.quant_type!r}")
    shape = tuple(quant_state.shape)
    if len(shape) != 2:
        raise ValueError(f"quant_state.shape must be 2-D [out_features, in_features], got {shape}")
    nested = {}
    if quant_state.nested:
        nested = {
            "nested_absmax": quant_state.state2.absmax,
            "nested_code": quant_state.state2.code,
            "offset": torch.as_tensor(quant_state.offset, dtype=torch.float32, device=packed.device),
            "nested_blocksize": quant_state.state2.blocksize,
        }
    return NF4Weight(
        packed.reshape(-1).view(torch.uint8),
        quant_state.absmax,
        shape,
        quant_state.dtype,
        blocksize=quant_state.blocksize,
        code=quant_state.code,
        **nested,
    )


def nf4_to_bnb(weight: NF4Weight):
    """(packed [ceil(numel/2), 1] uint8, bitsandbytes QuantState) sharing `weight`'s tensors."""
    from bitsandbytes.functional import QuantState

    state2 = None
    if weight.double_quant:
        state2 = QuantState(
            absmax=weight.nested_absmax,
            code=weight.nested_code,
            blocksize=weight.nested_blocksize,
            dtype=torch.float32,
        )
    quant_state = QuantState(
        absmax=weight.absmax,
        shape=weight.shape,
        code=weight.code,
        blocksize=weight.blocksize,
        quant_type="nf4",
        dtype=weight.dtype,
        offset=weight.offset,
        state2=state2,
    )
    return weight.packed.view(-1, 1), quant_state


def is_linear4bit(module: nn.Module) -> bool:
    """True for a `bitsandbytes.nn.Linear4bit`, without importing bitsandbytes unless loaded."""
    import sys

    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def nf4_from_linear4bit(module: nn.Module) -> tuple[NF4Weight, torch.Tensor | None]:
    """(NF4Weight, bias) of a quantized `bitsandbytes.nn.Linear4bit` (moved to its device first)."""
    import bitsandbytes as bnb

    if not isinstance(module, bnb.nn.Linear4bit):
        raise TypeError(f"expected a bitsandbytes.nn.Linear4bit, got {type(module).__name__}")
    if module.weight.quant_type != "nf4":
        raise ValueError(f"only NF4 Linear4bit layers are supported, got quant_type={module.weight.quant_type!r}")
    quant_state = getattr(module.weight, "quant_state", None)
    if quant_state is None:
        raise ValueError(
            "the Linear4bit's weight is not quantized yet (bitsandbytes quantizes on .to(device) / .cuda())"
        )
    weight = nf4_from_bnb(module.weight.data, quant_state)
    return weight, module.bias


def nf4_to_linear4bit(weight: NF4Weight, bias: torch.Tensor | None = None) -> nn.Module:
    """A `bitsandbytes.nn.Linear4bit` computing with `weight` (compute dtype = weight.dtype)."""
    import bitsandbytes as bnb

    packed, quant_state = nf4_to_bnb(weight)
    out_features, in_features = weight.shape
    module = bnb.nn.Linear4bit(
        in_features,
        out_features,
        bias=bias is not None,
        compute_dtype=weight.dtype,
        compress_statistics=weight.double_quant,
        quant_type="nf4",
        device="meta",
    )
    module.weight = bnb.nn.Params4bit(
        packed,
        requires_grad=False,
        quant_state=quant_state,
        blocksize=weight.blocksize,
        compress_statistics=weight.double_quant,
        quant_type="nf4",
        bnb_quantized=True,
    )
    if bias is not None:
        module.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return module


class _NF4LinearFunction(torch.autograd.Function):
    """y = x W^T + b with W dequantized into the shared workspace, in forward and again in backward."""

    @staticmethod
    def forward(ctx, x, weight: NF4Weight, bias, backend: str):
        dequantized = weight.dequantize(dequantize_workspace(weight.shape, weight.dtype, weight.device), backend)
        ctx.weight, ctx.backend = weight, backend
        return torch.nn.functional.linear(x, dequantized, bias)

    @staticmethod
    def backward(ctx, grad_y):
        weight = ctx.weight
        dequantized = weight.dequantize(dequantize_workspace(weight.shape, weight.dtype, weight.device), ctx.backend)
        return grad_y @ dequantized, None, None, None


class NF4Linear(nn.Module):
    """A frozen linear layer on an NF4 base weight (no adapter); differentiable in its input."""

    def __init__(self, weight: NF4Weight, bias: torch.Tensor | None = None, backend: str = "auto") -> None:
        super().__init__()
        self.weight = weight
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.backend = backend
        self.out_features, self.in_features = weight.shape

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True, backend: str = "auto"):
        """Quantize `linear`'s weight to NF4; its bias is kept as it is."""
        return cls(quantize_nf4(linear.weight, blocksize, double_quant), linear.bias, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features or x.dtype != self.weight.dtype:
            raise ValueError(
                f"NF4Linear expects x of shape [..., {self.in_features}] and dtype {self.weight.dtype}, "
                f"got {tuple(x.shape)} {x.dtype}"
            )
        backend = resolve_backend(self.backend, x.device)
        return _NF4LinearFunction.apply(x, self.weight, self.bias, backend)


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
    from lorafusion.modules import FusedLoRALinear

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
