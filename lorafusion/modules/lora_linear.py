"""FusedLoRALinear: a linear layer with a LoRA adapter, computed by the fused op of lorafusion.kernels.

It is a drop-in replacement for PEFT's `lora.Linear` holding one adapter, with the parameters named
as PEFT names them once the adapter name is dropped: `weight` and `bias` (the frozen base layer),
`lora_A` [r, in_features] and `lora_B` [out_features, r].
"""

from __future__ import annotations

import math
from numbers import Real

import torch
from torch import nn
from torch.nn import functional as F

from lorafusion.kernels import BACKENDS, MAX_RANK, fused_lora_linear, lora_scaling
from lorafusion.kernels.nf4 import NF4Weight, quantize_nf4

from . import nf4_linear


def check_lora_hyperparameters(r: object, lora_alpha: object, lora_dropout: object) -> None:
    """Raise ValueError naming the first of rank, alpha and dropout probability that is out of range."""
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= MAX_RANK:
        raise ValueError(f"r (the LoRA rank) must be an integer in 1..{MAX_RANK}, got {r!r}")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, Real) or not lora_alpha > 0:
        raise ValueError(f"lora_alpha must be a positive number, got {lora_alpha!r}")
    if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, Real) or not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be a probability in [0, 1), got {lora_dropout!r}")


def check_backend(backend: object) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def default_adapter_dtype(base_dtype: torch.dtype, adapter_dtype: torch.dtype | None = None) -> torch.dtype:
    """adapter_dtype when given, else fp32 on a 16-bit base (as PEFT's autocast_adapter_dtype) and
    the base's dtype otherwise."""
    if adapter_dtype is not None:
        if adapter_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"adapter_dtype must be torch.float32, torch.float16 or torch.bfloat16, got {adapter_dtype}")
        return adapter_dtype
    return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype


class FusedLoRALinear(nn.Module):
    """y = x Wᵀ + b + scaling · dropout(x) Aᵀ Bᵀ, with W and b frozen and A, B trainable.

    Args:
        in_features, out_features: sizes of the base linear layer.
        r: LoRA rank, 1..256.
        lora_alpha: scaling numerator; scaling = lora_alpha / r, or lora_alpha / sqrt(r) with
            `use_rslora`.
        lora_dropout: dropout probability on the LoRA path's input, applied in training mode only.
        bias: whether the base layer has a (frozen) bias.
        dtype, device: of the base weight; the LoRA parameters are on its device.
        adapter_dtype: dtype of lora_A and lora_B; by default fp32 on a 16-bit (or NF4) base, as
            PEFT keeps them (`autocast_adapter_dtype`), so that small updates are not rounded away,
            and the base's dtype otherwise. They compute in the input's dtype either way.
        backend: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch"; see
            `lorafusion.kernels.fused_lora_linear`.

    The base weight is initialised as `nn.Linear` initialises it; build from a trained layer with
    `from_linear`. `lora_A` is Kaiming-uniform (a=sqrt(5)) and `lora_B` zero, as in PEFT, so a
    fresh layer computes exactly the base layer.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        bias: bool = False,
        use_rslora: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        backend: str = "auto",
        adapter_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, size in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
                raise ValueError(f"{name} must be a positive integer, got {size!r}")
        base = nn.Linear(in_features, out_features, bias=bias, dtype=dtype, device=device)
        self._attach(base.weight, base.bias, r, lora_alpha, lora_dropout, use_rslora, backend, adapter_dtype)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        backend: str = "auto",
        quantize: str | None = None,
        double_quant: bool = True,
        blocksize: int = 64,
        adapter_dtype: torch.dtype | None = None,
    ) -> FusedLoRALinear:
        """Wrap `linear`: its weight and bias Parameters are shared (not copied) and frozen.

        QLoRA: with quantize="nf4" the base weight is stored in 4-bit NF4 (bitsandbytes' format,
        `blocksize` elements per absmax, `double_quant` quantizing the absmax too) instead of being
        shared; a `bitsandbytes.nn.Linear4bit` (NF4) or a `lorafusion.qlora.NF4Linear` is taken as
        it is, its storage shared.
        """
        if quantize is not None:
            nf4_linear.check_quantize(quantize)
        if nf4_linear.is_linear4bit(linear):
            weight, bias = nf4_linear.nf4_from_linear4bit(linear)
        elif isinstance(linear, nf4_linear.NF4Linear):
            weight, bias = linear.weight, linear.bias
        elif not isinstance(linear, nn.Linear):
            raise TypeError(
                f"from_linear needs an nn.Linear, a lorafusion.qlora.NF4Linear or a bitsandbytes.nn.Linear4bit, got {type(linear).__name__}"
            )
        elif quantize is not None:
            weight, bias = quantize_nf4(linear.weight, blocksize, double_quant), linear.bias
        else:
            weight, bias = linear.weight, linear.bias
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._attach(weight, bias, r, lora_alpha, lora_dropout, use_rslora, backend, adapter_dtype)
        return layer

    def _attach(
        self,
        weight: nn.Parameter | NF4Weight,
        bias: nn.Parameter | None,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        use_rslora: bool,
        backend: str,
        adapter_dtype: torch.dtype | None,
    ) -> None:
        check_lora_hyperparameters(r, lora_alpha, lora_dropout)
        check_backend(backend)
        if not isinstance(weight, NF4Weight) and not weight.is_floating_point():
            raise TypeError(
                f"the base weight must be a floating-point tensor, got {weight.dtype} "
                "(for a 4-bit base use from_linear(..., quantize='nf4'))"
            )
        self.out_features, self.in_features = weight.shape
        self.weight = weight.requires_grad_(False)
        self.bias = bias.requires_grad_(False) if bias is not None else None
        self.r = r
        self.lora_alpha = lora_alpha
        self.lora_dropout = float(lora_dropout)
        self.use_rslora = bool(use_rslora)
        self.scaling = lora_scaling(r, lora_alpha, self.use_rslora)
        self.backend = backend
        self.merged = False
        factory = {"dtype": default_adapter_dtype(weight.dtype, adapter_dtype), "device": weight.device}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **factory))
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """PEFT's default init: A as nn.Linear's weight, B zero, so the adapter starts as a no-op."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def _check_in_features(self, x: torch.Tensor) -> None:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__} expects input of shape [..., in_features={self.in_features}], "
                f"got x of shape {tuple(x.shape)}"
            )

    def _check_dtype(self, x: torch.Tensor) -> None:
        if x.dtype != self.weight.dtype:
            raise TypeError(
                f"{type(self).__name__}: x.dtype must equal the layer's dtype {self.weight.dtype}, "
                f"got x.dtype={x.dtype}; cast the input or the layer (layer.to(dtype))"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features]; x must have the layer's dtype, except under
        torch.autocast, where x and the parameters are cast to the autocast dtype as F.linear would."""
        self._check_in_features(x)
        autocasting = torch.is_autocast_enabled(x.device.type)
        if not autocasting:
            self._check_dtype(x)
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        weight, bias, lora_A, lora_B = self.weight, self.bias, self.lora_A, self.lora_B
        if autocasting:
            # The fused op is a custom autograd function, which autocast does not cast: do what it
            # does for F.linear, so mixed-precision training (fp32 master weights) works unchanged.
            dtype = torch.get_autocast_dtype(x.device.type)
            x, lora_A, lora_B = (tensor.to(dtype) for tensor in (x, lora_A, lora_B))
            weight = weight.with_compute_dtype(dtype) if self.quantized else weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        return fused_lora_linear(
            x,
            weight,
            bias,
            lora_A,
            lora_B,
            self.scaling,
            dropout_p=self.lora_dropout if self.training else 0.0,
            backend=self.backend,
        )

    def delta_weight(self) -> torch.Tensor:
        """scaling · B A, the update the adapter makes to W, in W's dtype (computed in fp32 or wider)."""
        compute_dtype = torch.promote_types(self.weight.dtype, torch.float32)
        delta = (self.lora_B.to(compute_dtype) @ self.lora_A.to(compute_dtype)) * self.scaling
        return delta.to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W += scaling · B A in place; forward is then the plain linear layer (and dropout-free).

        The base weight is modified in place, so an `nn.Linear` this layer was built from sees the
        merged weight too. In fp16/bf16 merge followed by unmerge restores W only to rounding.
        Raises RuntimeError if already merged.
        """
        if self.merged:
            raise RuntimeError(f"{type(self).__name__}.merge(): the adapter is already merged into the weight")
        if self.quantized:
            raise RuntimeError(
                f"{type(self).__name__}.merge(): the base weight is 4-bit NF4; adding scaling * B A and "
                "re-quantizing to 4 bits would lose most of the update (it is far below one NF4 step). "
                "Use lorafusion.qlora.export_merged(model, path, dtype=torch.bfloat16) to save a "
                "dequantized, merged checkpoint instead"
            )
        self.weight.add_(self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W -= scaling · B A, undoing `merge` provided A and B have not changed since. Raises
        RuntimeError if not merged."""
        if not self.merged:
            raise RuntimeError(f"{type(self).__name__}.unmerge(): the adapter is not merged into the weight")
        self.weight.sub_(self.delta_weight())
        self.merged = False

    @property
    def quantized(self) -> bool:
        """True when the base weight is stored in 4-bit NF4 (an `NF4Weight`)."""
        return isinstance(self.weight, NF4Weight)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, r={self.r}, lora_alpha={self.lora_alpha}, "
            f"lora_dropout={self.lora_dropout}, use_rslora={self.use_rslora}, "
            f"scaling={self.scaling:.6g}, backend={self.backend!r}, merged={self.merged}"
        )
