"""Frozen NF4 base weights (bitsandbytes' format) as modules: the layer below the LoRA modules.

- `nf4_from_bnb(packed, quant_state)` / `nf4_to_bnb(weight)`: to and from bitsandbytes'
  (packed uint8, `QuantState`) pair; `nf4_from_linear4bit(module)` / `nf4_to_linear4bit(weight,
  bias)`: to and from `bitsandbytes.nn.Linear4bit`. bitsandbytes is imported only here, lazily.
- `NF4Linear`: a frozen linear layer without adapter on an NF4 base.

Public through `lorafusion.qlora`; the LoRA modules import it from here, so that `qlora` (which
merges and exports models made of LoRA modules) sits above them and nothing imports in a circle.
"""

from __future__ import annotations

import torch
from torch import nn

from lorafusion.kernels.lora_linear import resolve_backend
from lorafusion.kernels.nf4 import NF4Weight, dequantize_workspace, quantize_nf4

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


class NF4LinearFunction(torch.autograd.Function):
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
        return NF4LinearFunction.apply(x, self.weight, self.bias, backend)
