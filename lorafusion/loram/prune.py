"""Structured pruning of Llama/Qwen2/Mistral decoders for LoRAM (the pruned model's files: lorafusion.models).

`prune` removes, in every decoder layer outside `keep_layers`, the same number of MLP intermediate
channels (gate/up rows and down columns together) and of key/value heads (each with its query
heads: q/k/v rows and o columns together). Which ones go is decided per layer by the method:
"random" (seeded), "magnitude" (L2 norms of the weights that read or write a channel / head group)
or "activation" (input-activation norm times weight norm of down_proj / o_proj on calibration
batches, as Wanda scores weights).

Design (per-layer sizes): Hugging Face configs have one intermediate_size and head count for every
layer, but the layers LoRAM leaves unpruned (the first and last by default) keep their original
sizes. The attention modules of Llama, Qwen2 and Mistral reshape with -1 heads and keep the
query-per-KV-head ratio in `num_key_value_groups`, which pruning whole KV groups leaves unchanged,
so a layer runs with any head count once its Linear modules have the pruned sizes. The pruned
model is therefore a plain transformers model whose config carries the pruned layers' sizes at the
top level (plus an explicit head_dim and `loram_layer_sizes`, every layer's sizes), and whose
unpruned layers' attention and MLP modules are built at their own sizes. Its directory holds the
usual config.json + safetensors and `prune_map.json`; `lorafusion.models.load_pruned_model` rebuilds it
(transformers' from_pretrained alone cannot size the unpruned layers; with keep_layers=() every
layer has the same size and the directory is an ordinary checkpoint as well).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import transformers
from torch import nn

from lorafusion.models.prune_map import LayerPruning, ModelShape, PruneMap
from lorafusion.models.pruned import empty_pruned_model

METHODS = ("random", "magnitude", "activation")
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")


# ---- checks ------------------------------------------------------------------------------------


def _check_model(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        found = getattr(config, "model_type", type(model).__name__)
        raise ValueError(f"LoRAM pruning supports {SUPPORTED_MODEL_TYPES} causal LMs, got {found!r}")
    shape = ModelShape.from_config(config)
    if shape.num_attention_heads % shape.num_key_value_heads:
        raise ValueError(
            f"num_attention_heads ({shape.num_attention_heads}) must be a multiple of num_key_value_heads "
            f"({shape.num_key_value_heads})"
        )
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            if type(module) is not nn.Linear:
                raise TypeError(
                    f"{name} is a {type(module).__name__}; prune the plain model, before adding adapters or quantizing"
                )


def _check_ratio(ratio: object) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio (the fraction of channels and heads removed per pruned layer) must be in [0, 1), got {ratio!r}")
    return float(ratio)


def _normalized_keep_layers(keep_layers: Iterable[int] | None, num_layers: int) -> tuple[int, ...]:
    if keep_layers is None:
        return tuple(sorted({0, num_layers - 1}))
    normalized = set()
    for layer in keep_layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not -num_layers <= layer < num_layers:
            raise ValueError(f"keep_layers must hold layer indices in [-{num_layers}, {num_layers}), got {layer!r}")
        normalized.add(layer % num_layers)
    return tuple(sorted(normalized))


def kept_count(total: int, ratio: float) -> int:
    """How many of `total` channels or KV heads a pruned layer keeps: at least one."""
    return max(1, total - round(ratio * total))


# ---- importance --------------------------------------------------------------------------------


def _layer_modules(model: nn.Module, layer: int) -> tuple[nn.Module, nn.Module]:
    decoder_layer = model.model.layers[layer]
    return decoder_layer.self_attn, decoder_layer.mlp


def _head_scores_from_channels(channel_scores: torch.Tensor, shape: ModelShape) -> torch.Tensor:
    """Per-KV-head scores from per-query-channel scores [num_heads * head_dim]: summed over each
    KV head's query heads."""
    return channel_scores.reshape(shape.num_key_value_heads, -1).sum(dim=1)


def _magnitude_scores(model: nn.Module, layer: int, shape: ModelShape) -> tuple[torch.Tensor, torch.Tensor]:
    attention, mlp = _layer_modules(model, layer)
    with torch.no_grad():
        mlp_scores = (
            mlp.gate_proj.weight.float().norm(dim=1) + mlp.up_proj.weight.float().norm(dim=1)
            + mlp.down_proj.weight.float().norm(dim=0)
        )
        query_channels = attention.q_proj.weight.float().norm(dim=1) + attention.o_proj.weight.float().norm(dim=0)
        kv_channels = attention.k_proj.weight.float().norm(dim=1) + attention.v_proj.weight.float().norm(dim=1)
        head_scores = _head_scores_from_channels(query_channels, shape) + kv_channels.reshape(shape.num_key_value_heads, -1).sum(dim=1)
    return mlp_scores, head_scores


def _activation_scores(
    model: nn.Module, calibration: Sequence[torch.Tensor], shape: ModelShape
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (MLP channel scores, KV head scores): ||input channel||_2 over the calibration
    tokens times ||weight column||_2, at the inputs of down_proj and o_proj."""
    squares: dict[nn.Module, torch.Tensor] = {}

    def accumulate(module, inputs):
        x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
        squares[module] = squares.get(module, 0) + (x * x).sum(dim=0)

    hooks = []
    for layer in range(shape.num_hidden_layers):
        attention, mlp = _layer_modules(model, layer)
        hooks += [mlp.down_proj.register_forward_pre_hook(accumulate), attention.o_proj.register_forward_pre_hook(accumulate)]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for batch in calibration:
                model(input_ids=batch.to(device))
    finally:
        for hook in hooks:
            hook.remove()
    scores = []
    for layer in range(shape.num_hidden_layers):
        attention, mlp = _layer_modules(model, layer)
        mlp_scores = squares[mlp.down_proj].sqrt() * mlp.down_proj.weight.float().norm(dim=0)
        query_channels = squares[attention.o_proj].sqrt() * attention.o_proj.weight.float().norm(dim=0)
        scores.append((mlp_scores, _head_scores_from_channels(query_channels, shape)))
    return scores


def _check_calibration(calibration: object) -> list[torch.Tensor]:
    if calibration is None:
        raise ValueError("method='activation' needs calibration: a list of token-id batches (LongTensor [batch, seq])")
    batches = [calibration] if isinstance(calibration, torch.Tensor) else list(calibration)
    if not batches:
        raise ValueError("calibration must hold at least one token-id batch")
    for i, batch in enumerate(batches):
        if not isinstance(batch, torch.Tensor) or batch.dtype != torch.long or batch.dim() != 2:
            raise ValueError(f"calibration[{i}] must be a LongTensor [batch, seq] of token ids, got {batch!r:.80}")
    return batches


def _top(scores: torch.Tensor, count: int) -> tuple[int, ...]:
    return tuple(sorted(torch.topk(scores, count).indices.tolist()))


def make_prune_map(
    model: nn.Module,
    ratio: float,
    method: str = "random",
    keep_layers: Iterable[int] | None = None,
    seed: int = 0,
    calibration: Sequence[torch.Tensor] | torch.Tensor | None = None,
) -> PruneMap:
    """The PruneMap `prune` would apply (same arguments). With method="random" the weights are
    not read, so `model` may live on the meta device (a map for a model too large to load)."""
    _check_model(model)
    ratio = _check_ratio(ratio)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method != "activation" and calibration is not None:
        raise ValueError(f"calibration is used only by method='activation', not method={method!r}")
    shape = ModelShape.from_config(model.config)
    keep = _normalized_keep_layers(keep_layers, shape.num_hidden_layers)
    mlp_keep = kept_count(shape.intermediate_size, ratio)
    head_keep = kept_count(shape.num_key_value_heads, ratio)

    activation_scores = _activation_scores(model, _check_calibration(calibration), shape) if method == "activation" else None
    layers = []
    for layer in range(shape.num_hidden_layers):
        if layer in keep:
            layers.append(LayerPruning(tuple(range(shape.intermediate_size)), tuple(range(shape.num_key_value_heads))))
            continue
        if method == "random":
            generator = torch.Generator().manual_seed(seed * 1_000_003 + layer)
            mlp_scores = torch.rand(shape.intermediate_size, generator=generator)
            head_scores = torch.rand(shape.num_key_value_heads, generator=generator)
        elif method == "magnitude":
            mlp_scores, head_scores = _magnitude_scores(model, layer, shape)
        else:
            mlp_scores, head_scores = activation_scores[layer]
        layers.append(LayerPruning(_top(mlp_scores, mlp_keep), _top(head_scores, head_keep)))
    return PruneMap(
        original=shape,
        layers=tuple(layers),
        method=method,
        ratio=ratio,
        keep_layers=keep,
        seed=seed,
        base_model_name_or_path=getattr(model.config, "_name_or_path", None) or None,
    )


def prune(
    model: nn.Module,
    ratio: float,
    method: str = "random",
    keep_layers: Iterable[int] | None = None,
    seed: int = 0,
    calibration: Sequence[torch.Tensor] | torch.Tensor | None = None,
) -> tuple[transformers.PreTrainedModel, PruneMap]:
    """A structurally pruned copy of `model` (a Llama/Qwen2/Mistral causal LM) and its PruneMap.

    ratio: fraction of MLP channels and of KV heads (each with its query heads) removed in every
        pruned layer, in [0, 1); every pruned layer keeps the same count, at least one of each.
    method: "random" (seeded by `seed`), "magnitude" or "activation" (needs `calibration`, a
        list of LongTensor [batch, seq] token batches run through `model`).
    keep_layers: layer indices left unpruned (negative ones count from the end); default: the
        first and the last layer.
    The original model is not changed. Returns (pruned model, prune map).
    """
    prune_map = make_prune_map(model, ratio, method, keep_layers, seed, calibration)
    return apply_prune_map(model, prune_map), prune_map


# ---- building the pruned model -----------------------------------------------------------------


def _sliced_state_dict(model: nn.Module, prune_map: PruneMap) -> dict[str, torch.Tensor]:
    sliced = {}
    for key, tensor in model.state_dict().items():
        module_name, _, kind = key.rpartition(".")
        if module_name.rsplit(".", 1)[-1] not in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            sliced[key] = tensor
            continue
        rows, columns = prune_map.module_indices(module_name)
        if rows is not None:
            tensor = tensor.index_select(0, torch.tensor(rows, device=tensor.device))
        if columns is not None and kind == "weight":
            tensor = tensor.index_select(1, torch.tensor(columns, device=tensor.device))
        sliced[key] = tensor
    return sliced


def apply_prune_map(model: nn.Module, prune_map: PruneMap) -> transformers.PreTrainedModel:
    """A pruned copy of `model` with the channels and heads `prune_map` keeps (the map must have
    been made for a model of this shape; ValueError otherwise)."""
    _check_model(model)
    prune_map.check_original(model.config)
    dtype = next(model.parameters()).dtype
    pruned = empty_pruned_model(model.config, prune_map, dtype)
    pruned.load_state_dict(_sliced_state_dict(model, prune_map), strict=True)
    pruned.to(next(model.parameters()).device)
    pruned.train(model.training)
    return pruned
