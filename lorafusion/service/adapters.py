"""Adapters put on and taken off a running base model, one job at a time (apply_multi_lora converts
a model once, for jobs all known at the start). A job's adapter starts from the same weights as
in an offline run: its seed and each module's name (adapter_init_generator).

A quantized base (model.quantize: nf4) was quantized once, before any job (apply.quantize_linears):
its layers are NF4Linear, and an adapter goes on top of the NF4 weight as it is, the bytes
`lorafusion train` quantizes for that job alone. Only the output layer stays unquantized there."""

from __future__ import annotations

import torch

from lorafusion.apply import adapter_init_generator, find_target_modules, to_multi_lora_linear
from lorafusion.lora_state import multi_lora_modules
from lorafusion.config import LoRAConfig
from lorafusion.modules import MultiLoRALinear


def target_problems(model: torch.nn.Module, config: LoRAConfig, quantized: bool = False) -> list[tuple[str, str]]:
    """Why `config` cannot go on `model`: targets that select no linear layer, or a rank larger
    than a targeted layer's smaller dimension; on a `quantized` base, targets left unquantized
    (the output layer). Empty if it fits."""
    try:
        targets = find_target_modules(model, config.target_modules)
    except ValueError as error:
        return [("target_modules", str(error))]
    unquantized = [name for name in targets if isinstance(model.get_submodule(name), torch.nn.Linear)]
    if quantized and unquantized:
        # lorafusion train quantizes a targeted output layer for the jobs that target it; here it
        # is one layer shared by every job, and quantizing it would change the jobs beside this one.
        return [("target_modules", (
            f"selects {', '.join(unquantized)}, which a service with model.quantize: nf4 keeps unquantized for "
            "every job (quantizing it for this job would change the others); leave it out of target_modules"
        ))]
    too_small = [
        f"{name} ({layer.in_features}x{layer.out_features})"
        for name in targets
        for layer in [model.get_submodule(name)]
        if config.r > min(layer.in_features, layer.out_features)
    ]
    if too_small:
        return [("r", f"{config.r} is larger than the smaller dimension of targeted layers {', '.join(too_small[:5])}")]
    return []


def add_adapter(model: torch.nn.Module, name: str, config: LoRAConfig, seed: int) -> None:
    """Give `model` the adapter `name` on the layers `config` targets, converting each targeted
    nn.Linear to a MultiLoRALinear the first time a job targets it."""
    for module_name in find_target_modules(model, config.target_modules):
        layer = model.get_submodule(module_name)
        if not isinstance(layer, MultiLoRALinear):
            layer = to_multi_lora_linear(model, module_name, backend=config.backend)
        layer.add_adapter(
            name,
            r=config.r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            use_rslora=config.use_rslora,
            generator=adapter_init_generator(seed, module_name),
        )


def remove_adapter(model: torch.nn.Module, name: str) -> None:
    """Take the adapter `name` off every layer (its memory goes; the converted layers stay)."""
    for layer in multi_lora_modules(model).values():
        if name in layer.adapters:
            layer.remove_adapter(name)
