"""LoRAM ("Train Small, Infer Large"): train a LoRA adapter on a structurally pruned base model,
then recover it to the original shapes for the original model.

- `prune(model, ratio, method, keep_layers)` -> (pruned model, PruneMap); `save_pruned_model`,
  `load_pruned_model` (from lorafusion.models, where the runtime loads a pruned directory from too).
- `recover(adapter_dir, prune_map, out_dir)`: a PEFT adapter for the original model.
- `align(...)`: full-parameter continued pre-training of the pruned model on a text corpus.
- `loram_memory_report(prune_map)`: parameters and bytes of original vs pruned vs pruned + NF4.
"""

from lorafusion.models import (
    PRUNE_MAP_FILE,
    LayerPruning,
    ModelShape,
    PruneMap,
    is_pruned_checkpoint,
    load_pruned_model,
    pruned_config,
    save_pruned_model,
)

from .memory import loram_memory_report
from .prune import METHODS, apply_prune_map, kept_count, make_prune_map, prune
from .recover import recover

__all__ = [
    "METHODS",
    "PRUNE_MAP_FILE",
    "LayerPruning",
    "ModelShape",
    "PruneMap",
    "apply_prune_map",
    "is_pruned_checkpoint",
    "kept_count",
    "load_pruned_model",
    "loram_memory_report",
    "make_prune_map",
    "prune",
    "pruned_config",
    "recover",
    "save_pruned_model",
]
