"""torch.compile(fullgraph=True) traces the fused LoRA layer whole (its memory-bound ops are torch
custom ops with fake implementations), with dropout on, and computes what eager mode does."""

from __future__ import annotations

import pytest
import torch

from lorafusion.modules import FusedLoRALinear


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fullgraph_compile_matches_eager(dropout):
    torch._dynamo.reset()
    layer = FusedLoRALinear(24, 16, r=4, lora_alpha=8, lora_dropout=dropout, bias=True, backend="torch")
    torch.nn.init.normal_(layer.lora_B)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")

    def run(module):
        module.zero_grad()
        x = torch.randn(2, 9, 24, generator=torch.Generator().manual_seed(1), requires_grad=True)
        torch.manual_seed(7)
        y = module(x)
        y.pow(2).sum().backward()
        return y.detach(), x.grad, layer.lora_A.grad.clone(), layer.lora_B.grad.clone()

    for got, expected in zip(run(compiled), run(layer)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    if dropout:
        # A fresh mask every call: the seed is drawn inside the graph, not baked into it.
        x = torch.randn(5, 24)
        assert not torch.equal(compiled(x), compiled(x))


def test_fused_peft_model_compiles_fullgraph_with_dropout():
    import peft

    from lorafusion import fuse_peft

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)

        def forward(self, x):
            return self.down(torch.relu(self.up(x)))

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = peft.get_peft_model(MLP(), peft.LoraConfig(r=4, target_modules=["up", "down"], lora_dropout=0.2,
                                                       init_lora_weights=False))
    assert len(fuse_peft(model, backend="torch").fused) == 2
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(6, 16)
    torch.manual_seed(3)
    expected = model(x)
    torch.manual_seed(3)
    torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-6)
    compiled(x).sum().backward()
    assert all(p.grad is not None for name, p in model.named_parameters() if "lora_" in name)
