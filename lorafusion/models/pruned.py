"""A LoRAM-pruned model's files: config.json (with every layer's own sizes) + safetensors +
prune_map.json, and the model rebuilt from them.

Below the runtime (which trains on a pruned directory like on any checkpoint) and below
lorafusion.loram (which prunes, aligns and recovers); see lorafusion/loram/prune.py for why the
layers carry their own sizes.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
import transformers

from .prune_map import PRUNE_MAP_FILE, PruneMap

LAYER_SIZES_ATTRIBUTE = "loram_layer_sizes"


def pruned_config(config: transformers.PretrainedConfig, prune_map: PruneMap) -> transformers.PretrainedConfig:
    """The pruned model's config: the pruned layers' sizes at the top level, head_dim explicit (it
    no longer follows from hidden_size / num_attention_heads), every layer's sizes in
    `loram_layer_sizes`."""
    config = copy.deepcopy(config)
    layer_sizes = [prune_map.layer_sizes(i) for i in range(len(prune_map.layers))]
    pruned_layers = [i for i in range(len(prune_map.layers)) if prune_map.is_pruned(i)]
    for key, value in layer_sizes[pruned_layers[0] if pruned_layers else 0].items():
        setattr(config, key, value)
    config.head_dim = prune_map.original.head_dim
    setattr(config, LAYER_SIZES_ATTRIBUTE, layer_sizes)
    return config


def empty_pruned_model(config: transformers.PretrainedConfig, prune_map: PruneMap, dtype: torch.dtype) -> transformers.PreTrainedModel:
    """A model with the pruned shapes (weights not meaningful yet)."""
    config = pruned_config(config, prune_map)
    model = transformers.AutoModelForCausalLM.from_config(config)
    for layer, sizes in enumerate(getattr(config, LAYER_SIZES_ATTRIBUTE)):
        if all(getattr(config, key) == value for key, value in sizes.items()):
            continue
        layer_config = copy.deepcopy(config)
        for key, value in sizes.items():
            setattr(layer_config, key, value)
        decoder_layer = model.model.layers[layer]
        decoder_layer.self_attn = type(decoder_layer.self_attn)(layer_config, layer)
        decoder_layer.mlp = type(decoder_layer.mlp)(layer_config)
        # The sizes are baked into the modules; share the model's config so that settings changed
        # on it later (the attention implementation) reach these layers too.
        decoder_layer.self_attn.config = decoder_layer.mlp.config = config
    return model.to(dtype)


def save_pruned_model(model: transformers.PreTrainedModel, prune_map: PruneMap, path: str | os.PathLike) -> Path:
    """Write the pruned model (config.json + safetensors, via save_pretrained) and prune_map.json."""
    path = Path(path)
    model.save_pretrained(path)
    prune_map.save(path / PRUNE_MAP_FILE)
    return path


def is_pruned_checkpoint(path: str | os.PathLike) -> bool:
    """True for a directory holding a LoRAM-pruned model (config.json beside prune_map.json)."""
    path = Path(path)
    return (path / PRUNE_MAP_FILE).is_file() and (path / "config.json").is_file()


def load_pruned_model(
    path: str | os.PathLike, dtype: torch.dtype | None = None, attn_implementation: str = "sdpa"
) -> transformers.PreTrainedModel:
    """Rebuild a model written by `save_pruned_model` (or `lorafusion loram prune`), with every
    layer at its own size. dtype: default, the dtype the checkpoint was saved in."""
    from safetensors.torch import load_file

    path = Path(path)
    if not is_pruned_checkpoint(path):
        raise FileNotFoundError(f"{path} is not a LoRAM-pruned model directory (it needs config.json and {PRUNE_MAP_FILE})")
    prune_map = PruneMap.load(path)
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    config._attn_implementation = attn_implementation
    layer_sizes = getattr(config, LAYER_SIZES_ATTRIBUTE, None)
    expected = [prune_map.layer_sizes(i) for i in range(len(prune_map.layers))]
    if layer_sizes != expected:
        raise ValueError(f"{path}: config.json's {LAYER_SIZES_ATTRIBUTE} disagrees with {PRUNE_MAP_FILE}; the files come from different prunings")
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = empty_pruned_model(config, prune_map, dtype)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} holds no .safetensors weights")
    tensors = {}
    for file in files:
        tensors.update(load_file(file))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if prune_map.original.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"{path}: the weights do not fit the pruned model (missing {sorted(set(missing) - tied)[:5]}, unexpected {unexpected[:5]})")
    if tied:
        model.tie_weights()
    return model.eval()
