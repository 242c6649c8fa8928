"""PruneMap: which MLP channels and attention heads of each decoder layer a LoRAM-pruned model kept.

The map is the bridge between the pruned model and the original one: it sizes the pruned model's
layers, and `recover` uses it to put a LoRA adapter trained on the pruned model back at the
original positions. It records the original model's shape (its fingerprint) and, per layer, the
kept intermediate channels of the MLP and the kept key/value heads of the attention; the kept query
heads follow from the KV heads (grouped-query attention: KV head g serves query heads
g*G .. g*G+G-1, G = num_attention_heads / num_key_value_heads, so a kept KV head keeps all of them).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

PRUNE_MAP_FILE = "prune_map.json"
FORMAT_VERSION = 1

ATTENTION_OUT_PRUNED = ("q_proj", "k_proj", "v_proj")  # output rows pruned (heads)
ATTENTION_IN_PRUNED = ("o_proj",)  # input columns pruned (heads)
MLP_OUT_PRUNED = ("gate_proj", "up_proj")  # output rows pruned (channels)
MLP_IN_PRUNED = ("down_proj",)  # input columns pruned (channels)
LAYER_PROJECTIONS = ATTENTION_OUT_PRUNED + ATTENTION_IN_PRUNED + MLP_OUT_PRUNED + MLP_IN_PRUNED
UNPRUNED_MODULES = ("lm_head",)  # linear layers outside the decoder layers: never pruned


@dataclass(frozen=True)
class ModelShape:
    """The shape of a decoder-only Llama/Qwen2/Mistral model that pruning depends on."""

    model_type: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool

    @classmethod
    def from_config(cls, config) -> ModelShape:
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        return cls(
            model_type=config.model_type,
            hidden_size=config.hidden_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            head_dim=head_dim,
            intermediate_size=config.intermediate_size,
            vocab_size=config.vocab_size,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )

    @property
    def query_heads_per_kv_head(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads


@dataclass(frozen=True)
class LayerPruning:
    """Kept indices of one decoder layer (sorted, original numbering)."""

    mlp_channels: tuple[int, ...]
    kv_heads: tuple[int, ...]


@dataclass(frozen=True)
class PruneMap:
    """The kept channels and heads of every decoder layer, and the original model's shape.

    `layers[i]` holds layer i's kept MLP intermediate channels and KV heads; an unpruned layer
    keeps them all. `method`, `ratio`, `keep_layers` and `seed` record how the map was made;
    `base_model_name_or_path` names the original model (written into recovered adapters).
    """

    original: ModelShape
    layers: tuple[LayerPruning, ...]
    method: str
    ratio: float
    keep_layers: tuple[int, ...]
    seed: int
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        shape = self.original
        if len(self.layers) != shape.num_hidden_layers:
            raise ValueError(
                f"a prune map needs one entry per layer: the original model has {shape.num_hidden_layers} "
                f"layers, the map has {len(self.layers)}"
            )
        for i, layer in enumerate(self.layers):
            for name, kept, limit in (
                ("mlp_channels", layer.mlp_channels, shape.intermediate_size),
                ("kv_heads", layer.kv_heads, shape.num_key_value_heads),
            ):
                if not kept or list(kept) != sorted(set(kept)) or kept[0] < 0 or kept[-1] >= limit:
                    raise ValueError(
                        f"layer {i}: {name} must be a non-empty, sorted list of distinct indices in "
                        f"[0, {limit}), got {list(kept)[:8]}{'...' if len(kept) > 8 else ''}"
                    )

    # ---- sizes ---------------------------------------------------------------------------

    def query_heads(self, layer: int) -> list[int]:
        """Layer `layer`'s kept query heads: every query head of each kept KV head."""
        group = self.original.query_heads_per_kv_head
        return [g * group + i for g in self.layers[layer].kv_heads for i in range(group)]

    def layer_sizes(self, layer: int) -> dict[str, int]:
        """The per-layer config sizes of the pruned model's layer `layer`."""
        kept = self.layers[layer]
        return {
            "intermediate_size": len(kept.mlp_channels),
            "num_attention_heads": len(kept.kv_heads) * self.original.query_heads_per_kv_head,
            "num_key_value_heads": len(kept.kv_heads),
        }

    def is_pruned(self, layer: int) -> bool:
        original = {
            "intermediate_size": self.original.intermediate_size,
            "num_attention_heads": self.original.num_attention_heads,
            "num_key_value_heads": self.original.num_key_value_heads,
        }
        return self.layer_sizes(layer) != original

    # ---- per-module indices --------------------------------------------------------------

    def _channels(self, layer: int, kind: str) -> list[int]:
        """Kept rows of q ('q'), of k/v ('kv'), or kept MLP channels ('mlp'), original numbering."""
        d = self.original.head_dim
        if kind == "mlp":
            return list(self.layers[layer].mlp_channels)
        heads = self.query_heads(layer) if kind == "q" else list(self.layers[layer].kv_heads)
        return [h * d + i for h in heads for i in range(d)]

    def module_indices(self, module_name: str) -> tuple[list[int] | None, list[int] | None]:
        """(kept output rows, kept input columns) of the linear layer `module_name` (a full name such
        as "model.layers.3.self_attn.q_proj"), original numbering; None where nothing is pruned.

        Raises KeyError for a module the map does not know (not one of the seven projections of a
        decoder layer of the original model, nor lm_head)."""
        parts = module_name.split(".")
        if parts[-1] in UNPRUNED_MODULES and len(parts) <= 2:
            return None, None
        try:
            layers_at = parts.index("layers")
            layer = int(parts[layers_at + 1])
        except (ValueError, IndexError):
            layer = None
        projection = parts[-1]
        if layer is None or not 0 <= layer < len(self.layers) or projection not in LAYER_PROJECTIONS:
            raise KeyError(
                f"the prune map does not know module {module_name!r}: it covers the projections "
                f"{list(LAYER_PROJECTIONS)} of layers 0..{len(self.layers) - 1} (model.layers.<i>.self_attn/mlp.<proj>) "
                f"and {list(UNPRUNED_MODULES)}"
            )
        if projection == "q_proj":
            return self._channels(layer, "q"), None
        if projection in ("k_proj", "v_proj"):
            return self._channels(layer, "kv"), None
        if projection == "o_proj":
            return None, self._channels(layer, "q")
        if projection in MLP_OUT_PRUNED:
            return self._channels(layer, "mlp"), None
        return None, self._channels(layer, "mlp")

    def original_shape(self, module_name: str) -> tuple[int, int]:
        """[out_features, in_features] of the linear layer `module_name` in the original model
        (KeyError for a module the map does not know)."""
        self.module_indices(module_name)  # raises for an unknown module
        shape = self.original
        projection = module_name.rsplit(".", 1)[-1]
        query_width = shape.num_attention_heads * shape.head_dim
        kv_width = shape.num_key_value_heads * shape.head_dim
        return {
            "q_proj": (query_width, shape.hidden_size),
            "k_proj": (kv_width, shape.hidden_size),
            "v_proj": (kv_width, shape.hidden_size),
            "o_proj": (shape.hidden_size, query_width),
            "gate_proj": (shape.intermediate_size, shape.hidden_size),
            "up_proj": (shape.intermediate_size, shape.hidden_size),
            "down_proj": (shape.hidden_size, shape.intermediate_size),
            "lm_head": (shape.vocab_size, shape.hidden_size),
        }[projection]

    def pruned_shape(self, module_name: str) -> tuple[int, int]:
        """[out_features, in_features] of the linear layer `module_name` in the pruned model."""
        out_features, in_features = self.original_shape(module_name)
        rows, columns = self.module_indices(module_name)
        return (out_features if rows is None else len(rows), in_features if columns is None else len(columns))

    # ---- files ---------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "original": self.original.__dict__,
            "method": self.method,
            "ratio": self.ratio,
            "keep_layers": list(self.keep_layers),
            "seed": self.seed,
            "base_model_name_or_path": self.base_model_name_or_path,
            "layers": [{"mlp_channels": list(l.mlp_channels), "kv_heads": list(l.kv_heads)} for l in self.layers],
        }

    @classmethod
    def from_dict(cls, data: dict, source: str = "prune map") -> PruneMap:
        try:
            if data.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"format_version must be {FORMAT_VERSION}, got {data.get('format_version')!r}")
            return cls(
                original=ModelShape(**data["original"]),
                layers=tuple(LayerPruning(tuple(l["mlp_channels"]), tuple(l["kv_heads"])) for l in data["layers"]),
                method=data["method"],
                ratio=float(data["ratio"]),
                keep_layers=tuple(data["keep_layers"]),
                seed=int(data["seed"]),
                base_model_name_or_path=data.get("base_model_name_or_path"),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{source} is not a valid LoRAM prune map: {error}") from error

    def save(self, path: str | os.PathLike) -> Path:
        """Write the map as JSON: `path` is a .json file, or a directory that gets prune_map.json."""
        path = Path(path)
        if path.suffix != ".json":
            path = path / PRUNE_MAP_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text(json.dumps(self.to_dict()) + "\n")
        os.replace(temporary, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> PruneMap:
        """Read a map written by `save` (a .json file, or a directory holding prune_map.json)."""
        path = Path(path)
        if path.is_dir():
            path = path / PRUNE_MAP_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no LoRAM prune map at {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from error
        return cls.from_dict(data, source=str(path))

    def check_original(self, config, what: str = "the model") -> None:
        """Raise ValueError unless `config` (a Hugging Face config) has the original model's shape."""
        shape = ModelShape.from_config(config)
        if shape != self.original:
            differences = [
                f"{name}: map {getattr(self.original, name)!r}, {what} {getattr(shape, name)!r}"
                for name in self.original.__dataclass_fields__
                if getattr(self.original, name) != getattr(shape, name)
            ]
            raise ValueError(f"the prune map was made for another model ({'; '.join(differences)})")
