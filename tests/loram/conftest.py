"""Tiny random Llamas for the LoRAM tests (built once per session; each test gets a deep copy)."""

import copy

import pytest
import torch
import transformers

VOCAB = 64


def tiny_llama_config(num_attention_heads: int = 4, num_key_value_heads: int = 2, vocab_size: int = VOCAB, **overrides):
    settings = dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads, vocab_size=vocab_size, max_position_embeddings=64,
        attn_implementation="sdpa",
    )
    return transformers.LlamaConfig(**(settings | overrides))


@pytest.fixture(scope="session")
def _prototypes():
    torch.manual_seed(99)
    return {
        "gqa": transformers.LlamaForCausalLM(tiny_llama_config()).eval(),
        "gqa4": transformers.LlamaForCausalLM(tiny_llama_config(num_attention_heads=8, num_key_value_heads=2)).eval(),
    }


@pytest.fixture
def tiny_llama(_prototypes):
    """A fresh fp32 LlamaForCausalLM: 4 layers, hidden 32, 4 heads on 2 KV heads, MLP 48, vocab 64."""
    return copy.deepcopy(_prototypes["gqa"])


@pytest.fixture
def tiny_gqa4_llama(_prototypes):
    """As tiny_llama but 8 query heads on 2 KV heads (4 query heads per KV head, head_dim 4)."""
    return copy.deepcopy(_prototypes["gqa4"])


@pytest.fixture
def input_ids():
    return torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(3))
