"""torch.compile(fullgraph=True) traces the fused LoRA layer whole (its memory-bound ops are torch
custom ops with fake implementations), with dropout on, and computes what eager mode does.

Each test runs in a fresh interpreter: dynamo's tracing crashed (segfault in a fake-tensor op
call) in CI workers where earlier tests had left Python threads running (tqdm's monitor, test
servers); alone, in a process of its own, it traces as a user's script does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorafusion.modules import FusedLoRALinear

_CHILD = "LORAFUSION_COMPILE_TEST_CHILD"


def ran_in_a_fresh_interpreter(request) -> bool:
    """In the test worker: run this test alone in a new pytest process and check it passed (True).
    In that process: False, and the test runs."""
    if os.environ.get(_CHILD):
        return False
    root = Path(__file__).resolve().parents[2]
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", request.node.nodeid]
    result = subprocess.run(command, cwd=root, env={**os.environ, _CHILD: "1"}, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(command)} exited {result.returncode}:\n{result.stdout[-4000:]}\n{result.stderr[-3000:]}"
    assert "1 passed" in result.stdout.splitlines()[-1], result.stdout[-2000:]
    return True


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fullgraph_compile_matches_eager(dropout, request):
    if ran_in_a_fresh_interpreter(request):
        return
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


def test_fused_peft_model_compiles_fullgraph_with_dropout(request):
    if ran_in_a_fresh_interpreter(request):
        return
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
