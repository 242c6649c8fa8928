"""A tiny random Llama, built once per session; each test gets its own deep copy."""

import copy

import pytest
import torch
import transformers



@pytest.fixture(scope="session")
def _tiny_llama_prototype():
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    )
    torch.manual_seed(1234)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_llama(_tiny_llama_prototype):
    """A fresh fp32 LlamaForCausalLM (2 layers, hidden 64, vocab 128) in eval mode."""
    return copy.deepcopy(_tiny_llama_prototype)


@pytest.fixture
def input_ids():
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(7))


@pytest.fixture
def llama_projections():
    return ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
