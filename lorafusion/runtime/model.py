"""The base model of a training run: a local Hugging Face checkpoint (a LoRAM-pruned one too), or an
inline tiny config."""

from __future__ import annotations

import torch
import transformers

from lorafusion import models
from lorafusion.modules.multi_lora_linear import checkpoint_context_fn

from .attention import PACKED_ATTENTION
from .config import ModelSpec

ARCHITECTURES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Checkpoint model types whose attention the packed-microbatch attention computes exactly, with every
# option they pass it (scaling, sliding windows, Gemma2's logit softcap; attention dropout is refused
# below): tested against each sample run alone with the model's eager attention. Others (Gemma3's per-layer rotary embeddings,
# gpt-oss's attention sinks, Falcon's own attention, encoder-decoders) would train a different model
# or fail deep inside transformers.
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2")


def check_architecture(config: transformers.PretrainedConfig, source: str) -> None:
    """One clear line for a checkpoint the runtime cannot train exactly."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{source}: model_type {model_type!r} is not supported by the training runtime (supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}); for other models use lorafusion.fuse_peft in a PEFT script"
        )
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError(
            f"{source}: use_bidirectional_attention=True is not supported by the training runtime (its packed "
            f"attention is causal)"
        )
    # The runtime's dropout is seeded (lora_dropout); attention dropout would draw from torch's global
    # generator, so a resumed run, or a job packed with others, would not train what it trains alone.
    if getattr(config, "attention_dropout", 0.0):
        raise ValueError(
            f"{source}: attention_dropout={config.attention_dropout} is not supported by the training runtime "
            f"(its draws would not be reproducible on resume); set it to 0.0 (lora_dropout regularises the adapters)"
        )


def build_base_model(spec: ModelSpec, device: torch.device | str = "cpu") -> transformers.PreTrainedModel:
    """The frozen base model, in spec.dtype on `device`, with the packed-microbatch attention
    (attention.py). An inline config is initialised from spec.seed, so every process of a run
    builds the same weights."""
    dtype = DTYPES[spec.dtype]
    if spec.path is not None:
        check_architecture(transformers.AutoConfig.from_pretrained(spec.path, local_files_only=True), f"model.path {spec.path}")
    if spec.path is not None and models.is_pruned_checkpoint(spec.path):
        # A LoRAM-pruned model: its layers differ in size, which from_pretrained cannot build.
        model = models.load_pruned_model(spec.path, dtype=dtype, attn_implementation=PACKED_ATTENTION)
    elif spec.path is not None:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            spec.path, local_files_only=True, dtype=dtype, attn_implementation=PACKED_ATTENTION
        )
    else:
        config_class, model_class = ARCHITECTURES[spec.architecture]
        config = config_class(**spec.config)
        check_architecture(config, "model.config")
        config._attn_implementation = PACKED_ATTENTION
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            model = model_class(config)
        model = model.to(dtype)
    model.config.use_cache = False
    if spec.gradient_checkpointing:
        # Blocks are recomputed in the backward pass, outside multi_lora_batch: each gets its batch back.
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False, "context_fn": checkpoint_context_fn(model)}
        )
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    # from_pretrained returns a model in eval mode: training runs need dropout (the adapters' too).
    return model.to(device).train()
