"""apply_lora / apply_multi_lora: put LoRA adapters on the targeted nn.Linear layers of a model, as
PEFT would: one FusedLoRALinear adapter, or many named adapters in MultiLoRALinear layers."""

from __future__ import annotations

import functools
import re
import sys
import zlib

import torch
from torch import nn

from lorafusion.config import ALL_LINEAR, LoRAConfig, normalized_target_modules
from lorafusion.modules import FusedLoRALinear, MultiLoRALinear
from lorafusion.adapters import save_adapter_beside, save_trainable_for_resume
from lorafusion.lora_state import (
    CONFIG_ATTRIBUTE,
    MULTI_CONFIG_ATTRIBUTE,
    get_lora_config,
    get_multi_lora_configs,
)
from lorafusion.qlora import NF4Linear, check_quantize

_MAX_NAMES_IN_ERRORS = 20


def _output_layer(model: nn.Module) -> nn.Module | None:
    """The output projection "all-linear" leaves out: get_output_embeddings(), else a module named lm_head."""
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    if callable(get_output_embeddings):
        return get_output_embeddings()
    return getattr(model, "lm_head", None)


def _is_linear(module: nn.Module) -> bool:
    # A converted layer still counts as the linear it replaced, so targets resolve the same before
    # and after apply_lora (load_adapter compares them); so does a linear quantized to NF4Linear.
    return isinstance(module, (nn.Linear, FusedLoRALinear, MultiLoRALinear, NF4Linear))


def _name_matches(name: str, target_modules: list[str] | str) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == target or name.endswith("." + target) for target in target_modules)


def _summary(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_NAMES_IN_ERRORS])
    return shown + (f", ... ({len(names)} in all)" if len(names) > _MAX_NAMES_IN_ERRORS else "")


def find_target_modules(model: nn.Module, target_modules: list[str] | str) -> list[str]:
    """Full names of the linear layers `target_modules` selects, in model order (PEFT's rules).

    A list entry matches a module named exactly so or ending with "." + entry; a string is a regex
    that must match the whole name; "all-linear" is every nn.Linear except the output layer.
    Raises ValueError when an entry (or the regex) selects no linear layer, or when a target
    matches a module that is not an nn.Linear.
    """
    target_modules = normalized_target_modules(target_modules)
    named_modules = [(name, module) for name, module in model.named_modules() if name]
    linear_names = [name for name, module in named_modules if _is_linear(module)]
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        _check_all_linear_means_what_peft_means(model)
        output_layer = _output_layer(model)
        selected = [name for name, module in named_modules if _is_linear(module) and module is not output_layer]
        if not selected:
            raise ValueError(
                f"target_modules='all-linear' found no nn.Linear layer in {type(model).__name__}{_conv1d_hint(model)}"
            )
        return selected

    matched = [(name, module) for name, module in named_modules if _name_matches(name, target_modules)]
    not_linear = [f"{name} ({type(module).__name__})" for name, module in matched if not _is_linear(module)]
    if not_linear:
        raise ValueError(
            f"target_modules={target_modules!r} matches modules that are not nn.Linear, which cannot take "
            f"a LoRA adapter: {_summary(not_linear)}{_conv1d_hint(model)}"
        )
    selected = [name for name, _ in matched]
    if isinstance(target_modules, str):
        if not selected:
            raise ValueError(_unmatched_regex_message(model, target_modules, linear_names))
        return selected
    unmatched = [entry for entry in target_modules if not any(_name_matches(name, [entry]) for name in selected)]
    if unmatched:
        short_names = sorted({name.rsplit(".", 1)[-1] for name in linear_names})
        raise ValueError(
            f"target_modules entries {unmatched} match no nn.Linear layer in {type(model).__name__}; "
            f"linear layer names there: {_summary(short_names)}"
        )
    return selected


def _unmatched_regex_message(model: nn.Module, pattern: str, linear_names: list[str]) -> str:
    # A bare layer name given as a string is the usual slip: PEFT reads it as a whole-name regex.
    if not linear_names:
        return f"target_modules={pattern!r} matches no nn.Linear layer in {type(model).__name__}{_conv1d_hint(model)}"
    names_it_ends = any(_name_matches(name, [pattern]) for name in linear_names)
    hint = f"; to select layers by the end of their name, give a list: [{pattern!r}]" if names_it_ends else ""
    return (
        f"target_modules={pattern!r} is a string, which PEFT reads as a regular expression that must match a "
        f"whole module name (such as {linear_names[0]!r}), and it matches none{hint}"
    )


def _check_all_linear_means_what_peft_means(model: nn.Module) -> None:
    """'all-linear' must select what PEFT's does, or be refused: an adapter PEFT would build
    differently (or cannot read) is never written."""
    if type(model).__name__.endswith("ForSequenceClassification"):
        raise ValueError(
            f"target_modules='all-linear' on {type(model).__name__}: PEFT leaves the classification head out and trains "
            "it fully (modules_to_save), which lorafusion does not; train sequence classification with PEFT"
        )
    experts = [name for name, module in model.named_modules() if any(p.dim() == 3 for p in module.parameters(recurse=False))]
    if experts:
        raise ValueError(
            f"target_modules='all-linear' on {type(model).__name__}: PEFT also adapts its mixture-of-experts weights "
            f"({_summary(experts)}: fused 3-D expert parameters, target_parameters), which lorafusion cannot; list the "
            "modules to adapt instead, e.g. target_modules=['q_proj', 'k_proj', 'v_proj', 'o_proj']"
        )


def _conv1d_hint(model: nn.Module) -> str:
    """GPT-2-style models keep their projections in transformers' Conv1D (weight stored transposed,
    PEFT's fan_in_fan_out), which lorafusion does not adapt: say so rather than 'not nn.Linear'."""
    if not any(type(module).__name__ == "Conv1D" for module in model.modules()):
        return ""
    return (
        f"; {type(model).__name__} keeps its projections in transformers' Conv1D layers (weights stored "
        "transposed, PEFT's fan_in_fan_out=True), which lorafusion does not adapt: train this model with PEFT"
    )


def apply_lora(
    model: nn.Module,
    config: LoRAConfig,
    quantize: str | None = None,
    quantize_other_linears: bool = False,
    double_quant: bool = True,
    blocksize: int = 64,
) -> nn.Module:
    """Replace the targeted nn.Linear layers by FusedLoRALinear sharing their weights; freeze the rest.

    Every parameter but the new lora_A / lora_B is frozen. The config is recorded on the model for
    save_adapter. The model is modified in place and returned. Applying twice raises ValueError.

    QLoRA: quantize="nf4" stores the targeted layers' base weights in 4-bit NF4 (`double_quant`,
    `blocksize` as in bitsandbytes); with quantize_other_linears=True every other nn.Linear but the
    output layer becomes a frozen `lorafusion.qlora.NF4Linear` too. Targeted
    `bitsandbytes.nn.Linear4bit` layers keep their NF4 storage whatever `quantize` says.

    Hugging Face Trainer: on a transformers model, `model.save_pretrained(dir)` (so Trainer's
    save_model and checkpoints) also writes the adapter in PEFT's format beside the checkpoint,
    which `from_pretrained(dir)` loads on top of the base; a bitsandbytes 4-bit model counts as
    carrying adapters, so Trainer trains it, and saves its adapter (no base weights).
    """
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"config must be a LoRAConfig, got {type(config).__name__}")
    if quantize is not None:
        check_quantize(quantize)
    elif quantize_other_linears:
        raise ValueError("quantize_other_linears=True needs quantize='nf4'")
    if _has_adapters(model):
        raise ValueError(
            f"{type(model).__name__} already has LoRA adapters; apply_lora converts a model once "
            "(use load_adapter to load other adapter weights into it)"
        )
    target_names = find_target_modules(model, config.target_modules)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for name in target_names:
        parent_name, _, child_name = name.rpartition(".")
        linear = model.get_submodule(name)
        layer = FusedLoRALinear.from_linear(
            linear,
            r=config.r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            use_rslora=config.use_rslora,
            backend=config.backend,
            quantize=quantize,
            double_quant=double_quant,
            blocksize=blocksize,
        )
        layer.train(linear.training)
        setattr(model.get_submodule(parent_name), child_name, layer)
    if quantize_other_linears:
        quantize_linears(model, config.backend, blocksize, double_quant)
    setattr(model, CONFIG_ATTRIBUTE, config)
    _fit_for_transformers_trainer(model)
    return model


def _fit_for_transformers_trainer(model: nn.Module) -> None:
    """A transformers model with our adapter saves and trains under Hugging Face's Trainer.

    save_pretrained (Trainer.save_model, its checkpoints) also writes the adapter in PEFT's format:
    from_pretrained drops the lora_A/lora_B keys of a full checkpoint without a word, but loads an
    adapter it finds beside the model. A bitsandbytes 4-bit model is marked as carrying adapters
    (transformers' own flag for it), else Trainer refuses it as "purely quantized" though its LoRA
    parameters are what trains.
    """
    transformers = sys.modules.get("transformers")  # a transformers model means it is imported
    if transformers is None or not isinstance(model, transformers.PreTrainedModel):
        return
    # A partial of a module-level function, not a bound method: torch.save/pickle and deepcopy keep it.
    model.save_pretrained = functools.partial(_save_pretrained_with_adapter, model)
    if getattr(model, "is_quantized", False):
        model._hf_peft_config_loaded = True


def _save_pretrained_with_adapter(self, save_directory, *args, is_main_process: bool = True, **kwargs) -> None:
    """transformers' save_pretrained, then this model's LoRA adapter in PEFT's format beside it
    (adapter_config.json, adapter_model.safetensors): `AutoModelForCausalLM.from_pretrained(dir)`
    loads the base from the checkpoint and the adapter on top of it, `PeftModel.from_pretrained`
    and `lorafusion.load_adapter` read the adapter, and Trainer resumes from the full checkpoint.
    A 4-bit model writes no base weights (its NF4 base is the checkpoint it was loaded from)."""
    quantized = getattr(self, "is_quantized", False)
    if not quantized:
        type(self).save_pretrained(self, save_directory, *args, is_main_process=is_main_process, **kwargs)
    if is_main_process:
        save_adapter_beside(self, save_directory)
        if quantized:
            save_trainable_for_resume(self, save_directory)


def quantize_linears(model: nn.Module, backend: str = "auto", blocksize: int = 64, double_quant: bool = True) -> nn.Module:
    """Every plain nn.Linear of `model` but the output layer becomes a frozen NF4Linear (what
    quantize_other_linears does to the layers no adapter targets). Adapters may go on the
    quantized layers afterwards (MultiLoRALinear and FusedLoRALinear.from_linear take an
    NF4Linear's weight as it is): the service quantizes its base once, before any job arrives.
    Returns the model, changed in place."""
    output_layer = _output_layer(model)
    others = [
        (name, module) for name, module in model.named_modules() if type(module) is nn.Linear and module is not output_layer
    ]
    for name, linear in others:
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, NF4Linear.from_linear(linear, blocksize, double_quant, backend=backend))
    return model


def _has_adapters(model: nn.Module) -> bool:
    return (
        get_lora_config(model) is not None
        or bool(get_multi_lora_configs(model))
        or any(isinstance(m, (FusedLoRALinear, MultiLoRALinear)) for m in model.modules())
    )


def adapter_init_generator(seed: int, module_name: str) -> torch.Generator:
    """The generator that initialises an adapter's A in the module `module_name`: a function of the
    job's seed and the module's name only, so a job starts from the same adapter whatever runs
    beside it and however the model is split into pipeline stages."""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{module_name}".encode()))


def to_multi_lora_linear(model: nn.Module, module_name: str, **layer_options) -> MultiLoRALinear:
    """Replace the nn.Linear `module_name` of `model` by a MultiLoRALinear sharing its weight (no
    adapters yet; `layer_options` as MultiLoRALinear's), in its train/eval mode, its dropout masks
    seeded by its name; returns it."""
    linear = model.get_submodule(module_name)
    layer = MultiLoRALinear(linear, **layer_options)
    layer.train(linear.training)
    layer.dropout_seed_offset = zlib.crc32(module_name.encode())
    parent_name, _, child_name = module_name.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, layer)
    return layer


def apply_multi_lora(
    model: nn.Module,
    configs: dict[str, LoRAConfig],
    init_seeds: dict[str, int] | None = None,
    quantize: str | None = None,
    quantize_other_linears: bool = False,
    double_quant: bool = True,
    blocksize: int = 64,
) -> nn.Module:
    """Give `model` one named LoRA adapter per entry of `configs` ({job name: LoRAConfig}).

    Every nn.Linear targeted by at least one config becomes a MultiLoRALinear sharing its weight;
    each adapter is added only to the layers its own target_modules select. Every other parameter
    is frozen. With `init_seeds` ({job name: seed}), each adapter is initialised from its job's
    seed and the module's name (see adapter_init_generator). Run the model inside
    `multi_lora_batch(model, batch)`. Returns the model, changed in place.

    QLoRA: quantize="nf4" stores the targeted layers' base weights in 4-bit NF4 (`double_quant`,
    `blocksize` as in bitsandbytes); with quantize_other_linears=True every other nn.Linear but the
    output layer becomes a frozen `lorafusion.qlora.NF4Linear` too (as in apply_lora).
    """
    if not isinstance(configs, dict) or not configs:
        raise ValueError("configs must be a non-empty dict {adapter name: LoRAConfig}")
    if init_seeds is not None and set(init_seeds) != set(configs):
        raise ValueError(f"init_seeds must name the same adapters as configs, got {sorted(init_seeds)} for {sorted(configs)}")
    for name, config in configs.items():
        if not isinstance(config, LoRAConfig):
            raise TypeError(f"configs[{name!r}] must be a LoRAConfig, got {type(config).__name__}")
    if quantize is not None:
        check_quantize(quantize)
    elif quantize_other_linears:
        raise ValueError("quantize_other_linears=True needs quantize='nf4'")
    backends = sorted({config.backend for config in configs.values()})
    if len(backends) > 1:
        raise ValueError(f"all adapters of a model share one kernel backend, got backends {backends}")
    if _has_adapters(model):
        raise ValueError(f"{type(model).__name__} already has LoRA adapters; apply_multi_lora converts a model once")
    targets = {name: find_target_modules(model, config.target_modules) for name, config in configs.items()}
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    layers = {
        module_name: to_multi_lora_linear(
            model, module_name, backend=backends[0], quantize=quantize, double_quant=double_quant, blocksize=blocksize
        )
        for module_name in dict.fromkeys(n for names in targets.values() for n in names)
    }
    if quantize_other_linears:
        quantize_linears(model, backends[0], blocksize, double_quant)
    for adapter, config in configs.items():
        for module_name in targets[adapter]:
            seed = None if init_seeds is None else init_seeds[adapter]
            layers[module_name].add_adapter(
                adapter,
                r=config.r,
                lora_alpha=config.lora_alpha,
                lora_dropout=config.lora_dropout,
                use_rslora=config.use_rslora,
                generator=None if seed is None else adapter_init_generator(seed, module_name),
            )
    setattr(model, MULTI_CONFIG_ATTRIBUTE, dict(configs))
    return model
