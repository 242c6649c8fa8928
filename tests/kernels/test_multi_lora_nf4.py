"""Multi-adapter LoRA over an NF4 base (QLoRA for multi-job training): MultiLoRALinear on a 4-bit
weight gives the outputs and gradients of the same layer on the dequantized weight (torch backend,
and the Triton kernels under the interpreter), keeps no dequantized copy between forward and
backward, and apply_multi_lora(quantize="nf4") quantizes what it should."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

from lorafusion import LoRAConfig, apply_multi_lora
from lorafusion.kernels.nf4 import NF4Weight
from lorafusion.modules import MultiLoRABatch, MultiLoRALinear, multi_lora_batch
from lorafusion.qlora import NF4Linear, nf4_to_linear4bit, quantize_nf4

ADAPTERS = {"a": dict(r=4, lora_alpha=8), "b": dict(r=2, lora_alpha=2, use_rslora=True), "c": dict(r=8, lora_alpha=4)}


def layer_pair(in_features: int, out_features: int, backend: str, seed: int = 0):
    """(the layer on an NF4 base, the same layer on that base dequantized), equal adapters."""
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features)
    quantized = MultiLoRALinear(linear, backend=backend, quantize="nf4", blocksize=64)
    dequantized_linear = nn.Linear(in_features, out_features)
    with torch.no_grad():
        dequantized_linear.weight.copy_(quantized.weight.dequantize(backend="torch"))
        dequantized_linear.bias.copy_(linear.bias)
    plain = MultiLoRALinear(dequantized_linear, backend="torch")
    for name, settings in ADAPTERS.items():
        quantized.add_adapter(name, **settings)
        plain.add_adapter(name, **settings)
        with torch.no_grad():  # a non-zero B, so the LoRA path contributes to the output and dA
            quantized.lora_B[name].normal_(generator=torch.Generator().manual_seed(len(name) + seed))
            plain.lora_A[name].copy_(quantized.lora_A[name])
            plain.lora_B[name].copy_(quantized.lora_B[name])
    return quantized, plain


def output_and_gradients(layer: MultiLoRALinear, x: torch.Tensor, batch: MultiLoRABatch, grad_out: torch.Tensor):
    x = x.clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    # In a model, a layer gets the base output for tokens of adapters that other layers hold.
    elsewhere = MultiLoRALinear(nn.Linear(2, 2))
    elsewhere.add_adapter("other", r=1)
    with multi_lora_batch(nn.ModuleList([layer, elsewhere]), batch):
        y = layer(x)
    y.backward(grad_out)
    grads = {f"{kind}.{n}": getattr(layer, kind)[n].grad for kind in ("lora_A", "lora_B") for n in layer.adapters}
    return y.detach(), x.grad, grads


def assert_same_layer(quantized, plain, tokens_by_adapter, atol):
    batch = MultiLoRABatch([n for n, _ in tokens_by_adapter], [t for _, t in tokens_by_adapter])
    g = torch.Generator().manual_seed(5)
    x = torch.randn(batch.num_tokens, quantized.in_features, generator=g)
    grad_out = torch.randn(batch.num_tokens, quantized.out_features, generator=g)
    y_q, dx_q, grads_q = output_and_gradients(quantized, x, batch, grad_out)
    y_p, dx_p, grads_p = output_and_gradients(plain, x, batch, grad_out)
    torch.testing.assert_close(y_q, y_p, rtol=1e-5, atol=atol)
    torch.testing.assert_close(dx_q, dx_p, rtol=1e-5, atol=atol)
    assert grads_q.keys() == grads_p.keys()
    for key in grads_q:
        if grads_p[key] is None:
            assert grads_q[key] is None, key
        else:
            torch.testing.assert_close(grads_q[key], grads_p[key], rtol=1e-5, atol=atol, msg=key)


def test_nf4_layer_equals_the_layer_on_the_dequantized_weight_torch_backend():
    quantized, plain = layer_pair(128, 96, backend="torch")
    assert isinstance(quantized.weight, NF4Weight) and quantized.quantized and not plain.quantized
    # Adapters repeated and interleaved, "c" without tokens, "other" not held (base output only).
    segments = [("a", 7), ("b", 5), ("other", 4), ("a", 3), ("c", 0), ("b", 9)]
    assert_same_layer(quantized, plain, segments, atol=1e-5)


def test_nf4_layer_equals_the_layer_on_the_dequantized_weight_triton_interpreter():
    quantized, plain = layer_pair(64, 32, backend="triton", seed=1)
    assert_same_layer(quantized, plain, [("b", 5), ("a", 6), ("c", 3)], atol=1e-4)


def test_tokens_of_no_held_adapter_still_get_the_nf4_base_and_its_input_gradient():
    quantized, plain = layer_pair(64, 48, backend="torch", seed=2)
    assert_same_layer(quantized, plain, [("other", 6)], atol=1e-5)


def test_the_dequantized_weight_is_not_saved_for_backward():
    quantized, _ = layer_pair(64, 48, backend="torch")
    x = torch.randn(8, 64, requires_grad=True)
    y = quantized(x, MultiLoRABatch(["a", "b"], [4, 4]))
    saved = y.grad_fn.saved_tensors
    assert all(t is None or t.numel() != quantized.weight.numel() for t in saved), "a dequantized weight was saved"


def test_an_nf4_linear_and_a_bitsandbytes_linear4bit_are_taken_as_they_are():
    weight = quantize_nf4(torch.randn(48, 64), blocksize=64)
    from_nf4_linear = MultiLoRALinear(NF4Linear(weight, torch.randn(48)), backend="torch")
    assert from_nf4_linear.weight is weight and from_nf4_linear.bias is not None
    from_bnb = MultiLoRALinear(nf4_to_linear4bit(weight), backend="torch")
    assert from_bnb.quantized and from_bnb.weight.packed.data_ptr() == weight.packed.data_ptr()
    with pytest.raises(TypeError, match="MultiLoRALinear wraps an nn.Linear, a lorafusion.qlora.NF4Linear"):
        MultiLoRALinear(nn.Conv1d(4, 4, 1))
    with pytest.raises(ValueError, match="quantize must be one of .*'fp4'"):
        MultiLoRALinear(nn.Linear(64, 8), quantize="fp4")


def tiny_llama() -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(config)


def test_apply_multi_lora_quantizes_targeted_and_other_linears_but_not_the_output_layer():
    configs = {
        "q": LoRAConfig(r=4, target_modules=["q_proj"], backend="torch"),
        "v": LoRAConfig(r=2, target_modules=["v_proj", "down_proj"], backend="torch"),
    }
    model = apply_multi_lora(tiny_llama(), configs, quantize="nf4", quantize_other_linears=True)
    layer = model.model.layers[0]
    assert all(m.quantized for m in (layer.self_attn.q_proj, layer.self_attn.v_proj, layer.mlp.down_proj))
    assert isinstance(layer.self_attn.k_proj, NF4Linear) and isinstance(layer.mlp.up_proj, NF4Linear)
    assert type(model.lm_head) is nn.Linear
    ids = torch.randint(0, 128, (1, 6))
    with multi_lora_batch(model, MultiLoRABatch(["q", "v"], [3, 3])):
        model(input_ids=ids).logits.sum().backward()
    assert layer.self_attn.q_proj.lora_A["q"].grad is not None


def test_apply_multi_lora_refuses_other_linears_without_quantize():
    with pytest.raises(ValueError, match="quantize_other_linears=True needs quantize='nf4'"):
        apply_multi_lora(tiny_llama(), {"q": LoRAConfig(r=4, target_modules=["q_proj"])}, quantize_other_linears=True)
