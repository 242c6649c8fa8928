"""Recovering a LoRA adapter trained on a LoRAM-pruned model for the original model.

For a linear layer whose output rows were pruned (q/k/v, gate/up), B [out, r] grows to the
original out_features with zero rows at the pruned positions; for one whose input columns were
pruned (o, down), A [r, in] grows to the original in_features with zero columns there. So the
recovered delta B·A equals the trained delta on the kept positions and is zero elsewhere, and the
original model's kept channels see exactly the update they saw in the pruned model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from lorafusion.adapters import CONFIG_FILE, KEY_PREFIX, WEIGHTS_FILE, write_adapter_directory

from lorafusion.models import PruneMap

_MATRIX_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


def _split_key(key: str, adapter_dir: Path) -> tuple[str, str]:
    """(module name, "lora_A" | "lora_B") of a PEFT adapter key."""
    suffix = next((s for s in _MATRIX_SUFFIXES if key.endswith(s)), None)
    if not key.startswith(KEY_PREFIX) or suffix is None:
        raise ValueError(
            f"{adapter_dir / WEIGHTS_FILE}: key {key!r} is not a LoRA matrix "
            f"('{KEY_PREFIX}<module>.lora_A.weight' / '.lora_B.weight'); only plain LoRA adapters on linear layers can be recovered"
        )
    return key[len(KEY_PREFIX) : -len(suffix)], suffix[1:7]


def _expanded(tensor: torch.Tensor, dim: int, kept: list[int], size: int) -> torch.Tensor:
    """`tensor` grown along `dim` to `size`, its slices placed at `kept`, zeros elsewhere."""
    shape = list(tensor.shape)
    shape[dim] = size
    full = tensor.new_zeros(shape)
    full.index_copy_(dim, torch.tensor(kept, dtype=torch.long), tensor)
    return full


def recover_state_dict(tensors: dict[str, torch.Tensor], prune_map: PruneMap, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """The adapter tensors (PEFT keys) expanded to the original model's shapes."""
    recovered = {}
    for key, tensor in tensors.items():
        module_name, matrix = _split_key(key, adapter_dir)
        try:
            rows, columns = prune_map.module_indices(module_name)
        except KeyError as error:
            raise ValueError(f"{adapter_dir}: the adapter targets {module_name!r}, {error.args[0]}") from None
        pruned_out, pruned_in = prune_map.pruned_shape(module_name)
        original_out, original_in = prune_map.original_shape(module_name)
        expected = (tensor.shape[0], pruned_in) if matrix == "lora_A" else (pruned_out, tensor.shape[1])
        if tensor.dim() != 2 or tuple(tensor.shape) != expected:
            raise ValueError(
                f"{adapter_dir}: {key} has shape {tuple(tensor.shape)} but the pruned model's {module_name} is "
                f"[{pruned_out}, {pruned_in}] (expected {list(expected)}): the adapter was not trained on the "
                "model this prune map describes"
            )
        if matrix == "lora_A" and columns is not None:
            tensor = _expanded(tensor, 1, columns, original_in)
        elif matrix == "lora_B" and rows is not None:
            tensor = _expanded(tensor, 0, rows, original_out)
        recovered[key] = tensor.contiguous()
    return recovered


def recover(
    adapter_dir: str | os.PathLike,
    prune_map: PruneMap | str | os.PathLike,
    out_dir: str | os.PathLike,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write to `out_dir` a PEFT-format adapter for the original model from the adapter in
    `adapter_dir` trained on the pruned model that `prune_map` (a PruneMap, or its file or
    directory) describes. `base_model_name_or_path` (default: the one the map records) goes into
    the adapter's config. Returns out_dir."""
    adapter_dir = Path(adapter_dir)
    if not isinstance(prune_map, PruneMap):
        prune_map = PruneMap.load(prune_map)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (adapter_dir / name).is_file():
            raise FileNotFoundError(f"{adapter_dir} is not an adapter directory: {name} is missing")
    peft_config = json.loads((adapter_dir / CONFIG_FILE).read_text())
    tensors = recover_state_dict(load_file(adapter_dir / WEIGHTS_FILE), prune_map, adapter_dir)
    base = base_model_name_or_path or prune_map.base_model_name_or_path
    if base:
        peft_config["base_model_name_or_path"] = base
    write_adapter_directory(tensors, peft_config, out_dir)
    return Path(out_dir)
