"""Model formats below the runtime: the LoRAM-pruned checkpoint (a model whose layers have their own
sizes) and its prune map."""

from .prune_map import PRUNE_MAP_FILE, LayerPruning, ModelShape, PruneMap
from .pruned import LAYER_SIZES_ATTRIBUTE, empty_pruned_model, is_pruned_checkpoint, load_pruned_model, pruned_config, save_pruned_model

__all__ = [
    "LAYER_SIZES_ATTRIBUTE",
    "PRUNE_MAP_FILE",
    "LayerPruning",
    "ModelShape",
    "PruneMap",
    "empty_pruned_model",
    "is_pruned_checkpoint",
    "load_pruned_model",
    "pruned_config",
    "save_pruned_model",
]
