"""load_adapter: put an adapter saved in PEFT's format (by lorafusion or PEFT) on a model, converting
it with apply_lora first when it has no adapter yet."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from lorafusion.adapters import (
    CONFIG_FILE,
    KEY_PREFIX,
    LORA_MATRICES,
    WEIGHTS_FILE,
    adapter_key,
    read_adapter_config,
    read_adapter_weights,
)
from lorafusion.apply import apply_lora, find_target_modules
from lorafusion.config import LoRAConfig
from lorafusion.lora_state import get_lora_config, get_multi_lora_configs, lora_modules

_MAX_KEYS_IN_ERRORS = 10


def _targeted_names(model: nn.Module, config: LoRAConfig, config_file: Path) -> list[str]:
    try:
        return find_target_modules(model, config.target_modules)
    except ValueError as error:
        raise ValueError(f"{config_file}: {error}") from error


def _check_same_adapter_shape(model: nn.Module, current: LoRAConfig, loaded: LoRAConfig, config_file: Path) -> None:
    """On a converted model the layers already exist: the adapter must fit them as they are."""
    for field in ("r", "lora_alpha", "use_rslora"):
        if getattr(current, field) != getattr(loaded, field):
            raise ValueError(
                f"{config_file}: {field}={getattr(loaded, field)!r} but the model's adapter has "
                f"{field}={getattr(current, field)!r}; load it into a model without adapters instead"
            )
    converted = sorted(lora_modules(model))
    wanted = sorted(_targeted_names(model, loaded, config_file))
    if converted != wanted:
        missing = sorted(set(wanted) - set(converted))
        extra = sorted(set(converted) - set(wanted))
        raise ValueError(
            f"{config_file}: target_modules={loaded.target_modules!r} select other layers than the model's "
            f"adapter (not converted: {missing[:_MAX_KEYS_IN_ERRORS]}, not targeted: {extra[:_MAX_KEYS_IN_ERRORS]})"
        )


def _check_saved_base_weights(model: nn.Module, tensors: dict, target_names: list[str], weights_file: Path) -> None:
    """PEFT saves a targeted output layer's base weight beside its adapter (`lm_head.base_layer.weight`,
    save_embedding_layers): it must be this model's weight, and is then dropped from `tensors`."""
    for name in target_names:
        key = f"{KEY_PREFIX}{name}.base_layer.weight"
        if key not in tensors:
            continue
        module = model.get_submodule(name)
        weight = module.weight
        saved = tensors.pop(key)
        if tuple(saved.shape) != tuple(weight.shape) or not torch.equal(saved.to(weight.dtype), weight.detach().cpu()):
            raise ValueError(
                f"{weights_file}: {key} differs from this model's {name}.weight: the adapter was saved with "
                "another base model (or one whose output layer was changed)"
            )


def load_adapter(model: nn.Module, path: str | os.PathLike, backend: str = "auto") -> nn.Module:
    """Load the adapter in directory `path` (lorafusion's or PEFT's save_pretrained) into `model`.

    A model without adapters is first converted with apply_lora and the adapter's config (using
    `backend`); a converted model must already have the adapter's rank, alpha and target layers.
    Every LoRA matrix must be present with the right shape, and no other key may be: any mismatch
    raises before a single weight is copied. Returns the model.
    """
    directory = Path(path)
    loaded_config = read_adapter_config(directory, backend=backend)
    tensors = read_adapter_weights(directory)
    weights_file = directory / WEIGHTS_FILE

    config_file = directory / CONFIG_FILE
    if get_multi_lora_configs(model):
        raise ValueError(
            f"{type(model).__name__} holds named adapters (apply_multi_lora); load_adapter loads into a model "
            "without adapters or one converted by apply_lora"
        )
    current_config = get_lora_config(model)
    if current_config is None and lora_modules(model):
        raise ValueError(f"{type(model).__name__} has FusedLoRALinear layers but no recorded LoRAConfig")
    if current_config is not None:
        _check_same_adapter_shape(model, current_config, loaded_config, config_file)
        merged = [name for name, module in lora_modules(model).items() if module.merged]
        if merged:
            raise RuntimeError(f"cannot load an adapter into merged layers ({merged[:_MAX_KEYS_IN_ERRORS]}); unmerge first")
        target_names = list(lora_modules(model))
    else:
        target_names = _targeted_names(model, loaded_config, config_file)

    expected = {adapter_key(name, matrix): (name, matrix) for name in target_names for matrix in LORA_MATRICES}
    _check_saved_base_weights(model, tensors, target_names, weights_file)
    missing = [key for key in expected if key not in tensors]
    unexpected = sorted(key for key in tensors if key not in expected)
    if missing:
        raise ValueError(f"{weights_file} lacks {len(missing)} LoRA weights: {missing[:_MAX_KEYS_IN_ERRORS]}")
    if unexpected:
        raise ValueError(
            f"{weights_file} has {len(unexpected)} keys that match no targeted layer: "
            f"{unexpected[:_MAX_KEYS_IN_ERRORS]} (expected keys like {next(iter(expected))!r})"
        )
    for key, (name, matrix) in expected.items():
        # in/out_features, not weight.shape: a bitsandbytes Linear4bit's weight is packed.
        base = model.get_submodule(name)
        rank = loaded_config.r
        shape = (rank, base.in_features) if matrix == "lora_A" else (base.out_features, rank)
        if tuple(tensors[key].shape) != shape or not tensors[key].is_floating_point():
            raise ValueError(
                f"{weights_file}: {key} has shape {tuple(tensors[key].shape)} and dtype {tensors[key].dtype}, "
                f"expected a floating-point tensor of shape {shape}"
            )

    # Everything is checked: only now is the model changed.
    if current_config is None:
        apply_lora(model, loaded_config)
    modules = lora_modules(model)
    with torch.no_grad():
        for key, (name, matrix) in expected.items():
            getattr(modules[name], matrix).copy_(tensors[key])
    return model
