"""MultiLoRALinear and the multi_lora_batch context: a mixed batch gives each segment what its
adapter alone gives, gradients reach only the adapters present, and bad input fails clearly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorafusion.modules import FusedLoRALinear
from lorafusion.modules.multi_lora_linear import MultiLoRABatch, MultiLoRALinear, multi_lora_batch

ADAPTERS = {"sum": dict(r=4, lora_alpha=8), "rev": dict(r=16, lora_alpha=16, use_rslora=True), "cp": dict(r=1, lora_alpha=2)}


def make_layer(in_features=24, out_features=20, backend="torch", dropout=0.0):
    torch.manual_seed(0)
    base = nn.Linear(in_features, out_features)
    layer = MultiLoRALinear(base, backend=backend)
    for name, settings in ADAPTERS.items():
        layer.add_adapter(name, lora_dropout=dropout, **settings)
        nn.init.normal_(layer.lora_B[name])  # a fresh B is zero: make the LoRA term visible
    return base, layer


def single_adapter_twin(base, layer, name):
    settings = ADAPTERS[name]
    twin = FusedLoRALinear.from_linear(base, **settings, backend=layer.backend)
    with torch.no_grad():
        twin.lora_A.copy_(layer.lora_A[name])
        twin.lora_B.copy_(layer.lora_B[name])
    return twin


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mixed_batch_matches_each_adapter_alone_with_gradients(backend):
    base, layer = make_layer(backend=backend)
    batch = MultiLoRABatch(["rev", "sum", "rev", "cp", "sum"], [5, 0, 3, 1, 9])
    x = torch.randn(batch.num_tokens, 24, requires_grad=True)
    grad_out = torch.randn(batch.num_tokens, 20)
    y = layer(x, batch)
    y.backward(grad_out)

    start = 0
    expected_grads = {name: [torch.zeros_like(layer.lora_A[name]), torch.zeros_like(layer.lora_B[name])] for name in ADAPTERS}
    for name, length in zip(batch.adapter_names, batch.lengths):
        if length == 0:
            continue
        rows = slice(start, start + length)
        twin = single_adapter_twin(base, layer, name)
        x_rows = x.detach()[rows].clone().requires_grad_()
        y_alone = twin(x_rows)
        y_alone.backward(grad_out[rows])
        torch.testing.assert_close(y[rows], y_alone, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x.grad[rows], x_rows.grad, rtol=1e-5, atol=1e-5)
        expected_grads[name][0] += twin.lora_A.grad
        expected_grads[name][1] += twin.lora_B.grad
        start += length
    for name in ADAPTERS:
        torch.testing.assert_close(layer.lora_A[name].grad, expected_grads[name][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.lora_B[name].grad, expected_grads[name][1], rtol=1e-5, atol=1e-5)


def test_absent_adapter_gets_no_gradient_and_its_optimizer_does_not_move_it():
    _, layer = make_layer()
    optimizers = {
        name: torch.optim.AdamW([layer.lora_A[name], layer.lora_B[name]], lr=0.1, weight_decay=0.1) for name in ADAPTERS
    }
    before = {name: layer.lora_A[name].detach().clone() for name in ADAPTERS}
    batch = MultiLoRABatch(["sum", "cp"], [6, 4])
    layer(torch.randn(10, 24), batch).square().sum().backward()
    assert layer.lora_A["rev"].grad is None and layer.lora_B["rev"].grad is None
    for optimizer in optimizers.values():
        optimizer.step()
    assert torch.equal(layer.lora_A["rev"], before["rev"])
    assert not torch.equal(layer.lora_A["sum"], before["sum"])


def test_leading_dims_are_flattened_in_order():
    _, layer = make_layer()
    batch = MultiLoRABatch(["sum", "rev"], [7, 5])
    x = torch.randn(3, 4, 24)
    torch.testing.assert_close(layer(x, batch), layer(x.reshape(12, 24), batch).reshape(3, 4, 20))


def test_dropout_only_in_training_mode():
    _, layer = make_layer(dropout=0.5)
    batch = MultiLoRABatch(["sum", "rev"], [10, 10])
    x = torch.randn(20, 24)
    layer.train()
    train_out = layer(x, batch)
    layer.eval()
    eval_out = layer(x, batch)
    layer_no_dropout = make_layer(dropout=0.0)[1]
    layer_no_dropout.load_state_dict(layer.state_dict())
    torch.testing.assert_close(eval_out, layer_no_dropout(x, batch))
    assert not torch.allclose(train_out, eval_out)


def test_context_hands_the_batch_to_every_layer_and_passes_foreign_adapters_through():
    torch.manual_seed(1)
    first, second = nn.Linear(16, 16), nn.Linear(16, 8)
    model = nn.Sequential(MultiLoRALinear(first), nn.ReLU(), MultiLoRALinear(second))
    model[0].add_adapter("a", r=2)
    model[0].add_adapter("b", r=3)
    model[2].add_adapter("a", r=2)  # adapter "b" does not target the last layer
    for layer in (model[0], model[2]):
        for name in layer.adapter_names:
            nn.init.normal_(layer.lora_B[name])
    batch = MultiLoRABatch(["a", "b"], [3, 4])
    x = torch.randn(7, 16)
    with multi_lora_batch(model, batch):
        y = model(x)
    hidden = torch.relu(model[0](x, batch))
    expected = torch.cat([model[2](hidden[:3], MultiLoRABatch(["a"], [3])), second(hidden[3:])])
    torch.testing.assert_close(y, expected)
    with pytest.raises(ValueError, match="needs a MultiLoRABatch"):
        model(x)  # the context is gone


def test_remove_adapter():
    _, layer = make_layer()
    layer.remove_adapter("cp")
    assert layer.adapter_names == ["sum", "rev"] and "cp" not in layer.lora_A
    with pytest.raises(KeyError, match="no adapter named 'cp'"):
        layer.remove_adapter("cp")


def test_bad_input():
    _, layer = make_layer()
    with pytest.raises(ValueError, match="sum to 9 tokens but x holds 10"):
        layer(torch.randn(10, 24), MultiLoRABatch(["sum"], [9]))
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\]"):
        layer(torch.randn(4, 24), MultiLoRABatch(["nope"], [4]))
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\]"):
        with multi_lora_batch(nn.Sequential(layer), MultiLoRABatch(["sum", "nope"], [2, 2])):
            pass
    with pytest.raises(ValueError, match=r"in_features=24"):
        layer(torch.randn(4, 23), MultiLoRABatch(["sum"], [4]))
    layer.lora_A["sum"] = nn.Parameter(torch.randn(4, 30))
    with pytest.raises(ValueError, match=r"adapter 'sum': lora_A must have shape \(4, 24\)"):
        layer(torch.randn(4, 24), MultiLoRABatch(["sum"], [4]))
    with pytest.raises(ValueError, match="one entry per segment"):
        MultiLoRABatch(["sum", "rev"], [4])
    with pytest.raises(ValueError, match="already exists"):
        layer.add_adapter("rev")
    with pytest.raises(ValueError, match="r \\(the LoRA rank\\)"):
        layer.add_adapter("new", r=0)


def test_adapters_are_fp32_on_a_16_bit_base_and_get_fp32_gradients():
    layer = MultiLoRALinear(torch.nn.Linear(16, 8, dtype=torch.float16), backend="torch")
    layer.add_adapter("a", r=2, lora_alpha=4)
    torch.nn.init.normal_(layer.lora_B["a"])
    assert layer.lora_A["a"].dtype == layer.lora_B["a"].dtype == torch.float32
    x = torch.randn(5, 16, dtype=torch.float16)
    y = layer(x, MultiLoRABatch(["a"], [5]))
    assert y.dtype == torch.float16
    y.float().sum().backward()
    assert layer.lora_A["a"].grad.dtype == torch.float32
    fp16_adapters = MultiLoRALinear(torch.nn.Linear(16, 8, dtype=torch.float16), adapter_dtype=torch.float16)
    fp16_adapters.add_adapter("a", r=2)
    assert fp16_adapters.lora_A["a"].dtype == torch.float16
