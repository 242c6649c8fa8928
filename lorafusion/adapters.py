"""LoRA adapters in PEFT's on-disk format: save_adapter, the writer and readers (load_adapter, which
puts a saved adapter on a model, is in adapter_loading.py, above apply).

An adapter is a directory holding
  adapter_config.json          PEFT's LoraConfig fields (peft_type "LORA", r, lora_alpha, ...)
  adapter_model.safetensors    one tensor per LoRA matrix, named as PEFT names them:
                               "base_model.model." + module name + ".lora_A.weight" / ".lora_B.weight"
so PEFT's PeftModel.from_pretrained reads what save_adapter writes, and load_adapter reads what
PEFT's save_pretrained writes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lorafusion.config import LoRAConfig
from lorafusion.file_modes import follow_umask_tree
from lorafusion.lora_state import get_lora_config, get_multi_lora_configs, lora_modules, multi_lora_modules
from lorafusion.modules import FusedLoRALinear

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# PEFT wraps the model twice (PeftModel.base_model is a LoraModel whose .model is the model).
KEY_PREFIX = "base_model.model."
LORA_MATRICES = ("lora_A", "lora_B")

_MAX_KEYS_IN_ERRORS = 10


def adapter_key(module_name: str, matrix: str) -> str:
    """PEFT's state-dict key of a LoRA matrix ("lora_A" or "lora_B") of the named module."""
    return f"{KEY_PREFIX}{module_name}.{matrix}.weight"


def _converted_modules(model: nn.Module) -> dict[str, FusedLoRALinear]:
    modules = lora_modules(model)
    if get_lora_config(model) is None or not modules:
        raise ValueError(
            f"{type(model).__name__} has no LoRA adapter to save: convert it with apply_lora (or load_adapter) first"
        )
    return modules


def _multi_adapter(model: nn.Module, adapter: str | None) -> str:
    configs = get_multi_lora_configs(model)
    if adapter is None:
        if len(configs) != 1:
            raise ValueError(f"the model holds adapters {sorted(configs)}: name the one to save with adapter=...")
        return next(iter(configs))
    if adapter not in configs:
        raise ValueError(f"no adapter named {adapter!r}; the model holds {sorted(configs)}")
    return adapter


def adapter_state_dict(model: nn.Module, adapter: str | None = None) -> dict[str, torch.Tensor]:
    """The LoRA matrices of the model's adapter (for a multi-adapter model, the one named
    `adapter`) under PEFT's key names, detached, on the CPU."""
    if get_multi_lora_configs(model):
        adapter = _multi_adapter(model, adapter)
        matrices = {
            adapter_key(name, matrix): getattr(module, matrix)[adapter]
            for name, module in multi_lora_modules(model).items()
            if adapter in module.adapters
            for matrix in LORA_MATRICES
        }
    else:
        if adapter is not None:
            raise ValueError(f"adapter={adapter!r} names an adapter of a multi-adapter model, but this model has one adapter")
        matrices = {
            adapter_key(name, matrix): getattr(module, matrix)
            for name, module in _converted_modules(model).items()
            for matrix in LORA_MATRICES
        }
    return {key: tensor.detach().to("cpu", copy=True).contiguous() for key, tensor in matrices.items()}


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter: str | None = None) -> Path:
    """Write the model's adapter to directory `path` in PEFT's format; returns the path.

    For a model converted by apply_multi_lora, `adapter` names the adapter to write (each adapter
    is saved on its own, loadable by PEFT on the base model).

    Written atomically: both files go into a temporary directory beside `path`, which then takes
    its place, so `path` never holds a half-written adapter. An existing adapter directory at
    `path` is replaced; a directory holding anything else is refused rather than deleted.
    """
    write_adapter_directory(adapter_state_dict(model, adapter), _peft_config(model, adapter), path)
    return Path(path)


def _peft_config(model: nn.Module, adapter: str | None) -> dict:
    multi_configs = get_multi_lora_configs(model)
    config = multi_configs[_multi_adapter(model, adapter)] if multi_configs else get_lora_config(model)
    peft_config = config.to_peft_dict()
    if peft_config["base_model_name_or_path"] is None:
        # What AutoPeftModelForCausalLM loads the base from: the name the model was loaded by.
        peft_config["base_model_name_or_path"] = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    return peft_config


def save_adapter_beside(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the model's adapter files into `directory`, leaving whatever else it holds (a Trainer's
    output or checkpoint directory), as PEFT's save_pretrained does; each file is replaced atomically."""
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".adapter.tmp-", dir=target))
    try:
        write_adapter_directory(adapter_state_dict(model), _peft_config(model, None), staging / "adapter")
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            os.replace(staging / "adapter" / name, target / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# What Trainer's resume_from_checkpoint reads where a checkpoint has no model.safetensors: a
# sharded-checkpoint index, loaded with strict=False.
RESUME_INDEX_FILE = "model.safetensors.index.json"
RESUME_WEIGHTS_FILE = "lorafusion_trainable.safetensors"


def save_trainable_for_resume(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write the model's trainable parameters under its own state_dict names, with an index that
    points to them, into `directory`: Hugging Face Trainer resumes a 4-bit run from that (the frozen
    4-bit base is the checkpoint the model was loaded from; Trainer warns that its keys are missing)."""
    target = Path(directory)
    tensors = {name: p.detach().to("cpu", copy=True).contiguous() for name, p in model.named_parameters() if p.requires_grad}
    index = {
        "metadata": {"note": "lorafusion: trainable (LoRA) parameters only, for Trainer's resume_from_checkpoint; "
                             "the base is the model this was trained on"},
        "weight_map": {name: RESUME_WEIGHTS_FILE for name in tensors},
    }
    staging = Path(tempfile.mkdtemp(prefix=".trainable.tmp-", dir=target))
    try:
        save_file(tensors, str(staging / RESUME_WEIGHTS_FILE), metadata={"format": "pt"})
        (staging / RESUME_INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        follow_umask_tree(staging)
        for name in (RESUME_WEIGHTS_FILE, RESUME_INDEX_FILE):
            os.replace(staging / name, target / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_adapter_directory(tensors: dict[str, torch.Tensor], peft_config: dict, path: str | os.PathLike) -> None:
    """Atomically write `tensors` and `peft_config` as an adapter directory at `path`."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"save_adapter: {target} exists and is not a directory")
    if target.is_dir():
        foreign = sorted(entry.name for entry in target.iterdir() if entry.name not in (CONFIG_FILE, WEIGHTS_FILE))
        if foreign:
            raise FileExistsError(
                f"save_adapter: {target} holds files other than an adapter ({', '.join(foreign)}); "
                "refusing to replace it"
            )
    target.parent.mkdir(parents=True, exist_ok=True)

    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        with open(staging / CONFIG_FILE, "w", encoding="utf-8") as handle:
            json.dump(peft_config, handle, indent=2, sort_keys=True)
            handle.write("\n")
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            with open(staging / name, "rb") as handle:
                os.fsync(handle.fileno())
        follow_umask_tree(staging)  # mkdtemp made it 0700, the weights' writer 0600
        replace_directory(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def replace_directory(source: Path, target: Path) -> None:
    """Move `source` to `target`, replacing a directory there; rename is atomic, so `target` is
    either the old adapter, briefly absent, or the new one."""
    if not target.exists():
        os.replace(source, target)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, retired / target.name)
    try:
        os.replace(source, target)
    except OSError:
        os.replace(retired / target.name, target)  # the old adapter back; the retired copy stays if this fails
        shutil.rmtree(retired, ignore_errors=True)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def read_adapter_config(path: str | os.PathLike, backend: str = "auto") -> LoRAConfig:
    """The LoRAConfig in `path`/adapter_config.json; errors name the file."""
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory {directory} does not exist (or is not a directory)")
    config_file = directory / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: not a PEFT/lorafusion adapter directory")
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_file} is not valid JSON: {error}") from error
    return LoRAConfig.from_peft_dict(data, backend=backend, source=str(config_file))


def read_adapter_weights(directory: Path) -> dict[str, torch.Tensor]:
    weights_file = directory / WEIGHTS_FILE
    if not weights_file.is_file():
        hint = ""
        if (directory / "adapter_model.bin").is_file():
            hint = " (adapter_model.bin is a pickle; re-save it with PEFT's save_pretrained(safe_serialization=True))"
        raise FileNotFoundError(f"{weights_file} not found{hint}")
    try:
        return load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{weights_file} is not a readable safetensors file: {error}") from error
