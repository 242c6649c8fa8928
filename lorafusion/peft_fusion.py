"""One line of speed for an existing PEFT script: `fuse_peft(model)`.

Every PEFT LoRA `Linear` whose computation the fused op reproduces gets its forward replaced, on
the instance, by one that calls `kernels.fused_lora_linear`; PEFT's modules, parameter names,
`state_dict`, `save_pretrained`, `merge_and_unload`, `set_adapter` and `disable_adapter` are
untouched, because nothing but the bound forward changes. `unfuse_peft` removes it again. A
bitsandbytes NF4 `Linear4bit` base (QLoRA) runs lorafusion's NF4 path on the same storage.

The fused forward checks, on every call, that the call is one it computes as PEFT does: adapters
enabled and not merged, one active adapter on the layer, plain LoRA (no DoRA or other variant, no
`lora_bias`), a dense `nn.Linear` base in the input's dtype (or under autocast). A mixed batch
(`adapter_names`, one adapter per sample) runs the multi-adapter kernels when the input has the
base's dtype. Any other call runs PEFT's own forward, so a fused model is never silently
different. Layers that can never be fused (embeddings, convolutions, `fan_in_fan_out`, DoRA,
8-bit or FP4 bases, `target_parameters` LoRA such as MoE experts and routers that "all-linear"
adapts in PEFT 0.21) are left as they are and named in the report.

Numerics: the LoRA path computes in the input's dtype with fp32 accumulation, as PEFT's does under
autocast; with fp32 adapters on a 16-bit base outside autocast PEFT computes that path in fp32,
and the two differ by the input dtype's rounding. Dropout draws its mask from lorafusion's Philox
stream (the same keep probability and 1/(1-p) scaling as torch's dropout, not the same bits).
"""

from __future__ import annotations

import logging
import types
from dataclasses import dataclass, field

import torch
from torch import nn

from lorafusion.kernels.lora_linear import BACKENDS, fused_lora_linear
from lorafusion.kernels.multi_lora_linear import fused_multi_lora_linear
from lorafusion.kernels.segments import build_segment_meta

logger = logging.getLogger(__name__)

_FUSED_MARK = "_lorafusion_fused_backend"
# The NF4 view (lorafusion's NF4Weight, sharing storage) of a bitsandbytes Linear4bit base.
_NF4_BASE = "_lorafusion_nf4_base"


@dataclass
class FusionReport:
    """What fuse_peft did: the names of the fused layers, and of the others with the reason."""

    fused: list[str] = field(default_factory=list)
    left: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        line = f"lorafusion: fused {len(self.fused)} PEFT LoRA layer(s)"
        if self.left:
            reasons = sorted(set(self.left.values()))
            line += f", left {len(self.left)} on PEFT's forward ({'; '.join(reasons)})"
        return line


def _peft_lora_classes():
    """(PEFT's LoraLayer, its dense Linear layer, its bitsandbytes Linear4bit layer or None)."""
    try:
        from peft.tuners.lora import LoraLayer
        from peft.tuners.lora.layer import Linear
    except ImportError as error:  # pragma: no cover - peft is what the caller brings
        raise ImportError("fuse_peft needs the peft package (pip install peft)") from error
    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:  # bitsandbytes absent: PEFT defines no 4-bit layer
        Linear4bit = None
    return LoraLayer, Linear, Linear4bit


def _nf4_base(base) -> tuple[object | None, str | None]:
    """(lorafusion's NF4Weight view of a bitsandbytes NF4 Linear4bit base, None) or (None, why not)."""
    from lorafusion import qlora

    if not qlora.is_linear4bit(base):
        return None, f"{type(base).__name__} base layers are not fused"
    try:
        weight, _ = qlora.nf4_from_linear4bit(base)
    except ValueError as error:
        return None, f"Linear4bit base: {error}"
    return weight, None


def _never_fusable(module, lora_linear_classes) -> str | None:
    """Why this PEFT LoRA layer can never take the fused forward, or None (an NF4 base's view is
    kept on the module)."""
    if type(module) not in lora_linear_classes:
        if hasattr(module, "parameter_name"):  # PEFT's ParamWrapper, built for target_parameters
            return (f"target_parameters LoRA on a {type(module.get_base_layer()).__name__}.{module.parameter_name} "
                    "parameter (e.g. MoE experts or router) is not fused")
        return f"{type(module).__name__} layers are not fused"
    base = module.get_base_layer()
    if type(base) is not nn.Linear:
        nf4_weight, reason = _nf4_base(base)
        if reason is not None:
            return reason
        setattr(module, _NF4_BASE, nf4_weight)
    if getattr(module, "fan_in_fan_out", False):
        return "fan_in_fan_out is not fused"
    for adapter in module.lora_A:
        if adapter in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(adapter, False):
            return "DoRA and other LoRA variants are not fused"
        if getattr(module, "lora_bias", {}).get(adapter, False):
            return "lora_bias is not fused"
        if not isinstance(module.lora_dropout[adapter], (nn.Dropout, nn.Identity)):
            return f"dropout module {type(module.lora_dropout[adapter]).__name__} is not fused"
    return None


def _fusable_call(module, weight, x: torch.Tensor, args, kwargs) -> str | None:
    """The one active adapter when this call computes exactly as PEFT's forward would, else None."""
    if args or kwargs or module.disable_adapters or module.merged:
        return None
    active = [name for name in module.active_adapters if name in module.lora_A]
    if len(active) != 1 or active[0] in getattr(module, "lora_variant", {}):
        return None
    autocasting = torch.is_autocast_enabled(x.device.type)
    # A 4-bit base computes in its compute dtype, whatever autocast says: fused only when x has it.
    if (autocasting and hasattr(module, _NF4_BASE)) or (not autocasting and x.dtype != weight.dtype):
        return None
    if x.device != weight.device or x.shape[-1] != weight.shape[1]:
        return None
    return active[0]


def _dropout_p(module, adapter: str) -> float:
    dropout = module.lora_dropout[adapter]
    return dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0


def _mixed_batch_forward(module, weight, bias, x: torch.Tensor, adapter_names) -> torch.Tensor | None:
    """PEFT's mixed batch (`adapter_names`, one per sample along x's first dimension) through the
    multi-adapter kernels, or None when PEFT's own forward must run it. Samples of '__base__', or
    of an adapter this layer does not hold, get the base output, as in PEFT."""
    if module.disable_adapters or module.merged or torch.is_autocast_enabled(x.device.type):
        return None
    if x.dim() < 2 or len(adapter_names) != x.shape[0] or x.dtype != weight.dtype or x.device != weight.device:
        return None
    held = list(dict.fromkeys(name for name in adapter_names if name in module.lora_A))
    if not held or any(name in getattr(module, "lora_variant", {}) for name in held):
        return None
    index = {name: i for i, name in enumerate(held)}
    base_only = len(held)  # a rank-0 adapter: adds nothing
    rows_per_sample = x.numel() // (x.shape[0] * x.shape[-1])
    segment_adapters = [index.get(name, base_only) for name in adapter_names]
    meta = build_segment_meta(
        segment_adapters,
        [rows_per_sample] * len(adapter_names),
        [module.lora_A[name].weight.shape[0] for name in held] + [0],
        [float(module.scaling[name]) for name in held] + [1.0],
        [_dropout_p(module, name) for name in held] + [0.0],
        x.device,
    )
    lora_A_cat = torch.cat([module.lora_A[name].weight for name in held])
    lora_B_cat = torch.cat([module.lora_B[name].weight for name in held], dim=1)
    return fused_multi_lora_linear(x, weight, bias, lora_A_cat, lora_B_cat, meta, backend=getattr(module, _FUSED_MARK))


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    base = self.get_base_layer()
    weight, bias = getattr(self, _NF4_BASE, base.weight), base.bias
    if not args and list(kwargs) == ["adapter_names"]:
        y = _mixed_batch_forward(self, weight, bias, x, kwargs["adapter_names"])
        return y if y is not None else type(self).forward(self, x, *args, **kwargs)
    adapter = _fusable_call(self, weight, x, args, kwargs)
    if adapter is None:
        return type(self).forward(self, x, *args, **kwargs)
    lora_A, lora_B = self.lora_A[adapter].weight, self.lora_B[adapter].weight
    if torch.is_autocast_enabled(x.device.type):
        # A custom autograd Function is not cast by autocast: cast as it would for F.linear.
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    return fused_lora_linear(
        x, weight, bias, lora_A, lora_B, float(self.scaling[adapter]), _dropout_p(self, adapter),
        backend=getattr(self, _FUSED_MARK),
    )


def fuse_peft(model: nn.Module, backend: str = "auto") -> FusionReport:
    """Makes every PEFT LoRA Linear of `model` (a PeftModel or any module tree) that the fused op
    computes exactly use it, in place; returns the report and logs its one-line summary."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    lora_layer, linear_class, linear4bit_class = _peft_lora_classes()
    lora_linear_classes = {linear_class, linear4bit_class} - {None}
    report = FusionReport()
    for name, module in model.named_modules():
        if not isinstance(module, lora_layer):
            continue
        reason = _never_fusable(module, lora_linear_classes)
        if reason is not None:
            report.left[name] = reason
            continue
        setattr(module, _FUSED_MARK, backend)
        module.forward = types.MethodType(_fused_forward, module)
        report.fused.append(name)
    logger.info(report.summary())
    return report


def unfuse_peft(model: nn.Module) -> int:
    """Restores PEFT's own forward on every layer fuse_peft changed; returns how many."""
    restored = 0
    for module in model.modules():
        if hasattr(module, _FUSED_MARK):
            del module.forward
            delattr(module, _FUSED_MARK)
            if hasattr(module, _NF4_BASE):
                delattr(module, _NF4_BASE)
            restored += 1
    return restored
