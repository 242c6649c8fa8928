"""No host-device synchronisation inside a LoRA layer's forward and backward.

Every read of a device value on the host (`.item()`, `.tolist()`, `.cpu()`, `.numpy()`, `bool()`,
`int()`, `float()` of a tensor, an op whose output size depends on the data, a copy to the CPU)
makes the CPU wait for the GPU's queue to drain: once per layer it starves the GPU, and it forbids
CUDA graphs. The counter (tests/host_sync.py) records every such call made by our code while a
layer runs forward and backward; the layers must make none.

On the CPU this finds the calls that would sync on a GPU; on a CUDA machine (benchmarks/gpu_check.py
runs this file there) it also sees every copy to the host that really happens.
"""

from __future__ import annotations

import os

import pytest
import torch
from host_sync import HostSyncCounter, run_counted
from torch import nn

from lorafusion.modules import FusedLoRALinear
from lorafusion.modules.multi_lora_linear import MultiLoRABatch, MultiLoRALinear, multi_lora_batch
from lorafusion.qlora import NF4Linear

try:
    import triton
except ImportError:  # pragma: no cover - triton is a Linux dependency
    triton = None

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# The interpreter gets bf16 arithmetic wrong (see kernels/utils.py); a GPU runs the training dtype.
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
TRITON_RUNS = triton is not None and (DEVICE.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not TRITON_RUNS, reason="no CUDA and no interpreter"))]

# ----------------------------------------------------------------------------------------------
# The counter itself: it must see each kind of sync, in forward and in backward.
# ----------------------------------------------------------------------------------------------


class _Syncing(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sync):
        ctx.sync = sync
        sync(x)
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        ctx.sync(grad)
        return grad * 2, None


SYNCS = {
    "item": lambda t: t.sum().item(),
    "tolist": lambda t: t.tolist(),
    "cpu": lambda t: t.cpu(),
    "numpy": lambda t: t.detach().numpy(),
    "bool": lambda t: bool(t.sum() > 0),
    "int": lambda t: int(t[0].long()),
    "float": lambda t: float(t[0]),
    "nonzero": lambda t: t.nonzero(),
    "mask": lambda t: t[t > 0],
}


@pytest.mark.parametrize("kind", list(SYNCS))
def test_counter_sees_each_sync_in_forward_and_in_backward(kind):
    x = torch.randn(4, requires_grad=True)
    with HostSyncCounter(x.device) as counter:
        y = _Syncing.apply(x, SYNCS[kind])
        forward_events = list(counter.events)
        y.sum().backward()
    backward_events = counter.events[len(forward_events):]
    # Exactly one each: a sync seen by two of the counter's hooks is still one sync.
    assert len(forward_events) == 1 and len(backward_events) == 1, counter.events
    assert all(__file__ in event for event in counter.events), counter.events
    assert x.grad is not None and torch.equal(x.grad, torch.full_like(x, 2.0))


def test_counter_ignores_plain_compute_and_restores_tensor_methods():
    before = (torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu)
    x = torch.randn(8, 8, requires_grad=True)
    assert run_counted(lambda: (x @ x).relu().sum().backward()) == []
    assert (torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu) == before


def test_values_born_on_the_host_are_not_device_data():
    x = torch.randn(8)

    def step():
        seed = int(torch.randint(0, 2**31 - 1, ()))  # a host-side draw, as a dropout seed is
        torch.arange(4)[torch.arange(4) > 1].tolist()  # host bookkeeping
        scaled = torch.full((8,), 2.0, device=x.device) * seed  # made for the device: device data
        return x + scaled

    assert run_counted(step) == []
    assert len(run_counted(lambda: float((x + torch.randint(0, 5, ())).sum()))) == 1
    assert len(run_counted(lambda: torch.zeros(3, device=x.device).tolist())) == 1


# ----------------------------------------------------------------------------------------------
# The layers.
# ----------------------------------------------------------------------------------------------


def _forward_backward(layer, x, *args):
    def step():
        layer(x, *args).float().square().sum().backward()

    return step


def _input(tokens: int, features: int) -> torch.Tensor:
    return torch.randn(tokens, features, dtype=DTYPE, device=DEVICE, requires_grad=True)


def _assert_lora_gradients(layer) -> None:
    """The counted step really ran backward through the LoRA path."""
    grads = [p.grad for name, p in layer.named_parameters() if "lora_" in name and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_fused_lora_linear_forward_backward_makes_no_host_sync(backend, quantize):
    base = nn.Linear(64, 48, bias=True, dtype=DTYPE, device=DEVICE)
    layer = FusedLoRALinear.from_linear(base, r=8, lora_alpha=16, lora_dropout=0.1, backend=backend, quantize=quantize)
    nn.init.normal_(layer.lora_B)
    layer.train()
    x = _input(32, 64)
    assert run_counted(_forward_backward(layer, x), DEVICE) == []
    _assert_lora_gradients(layer)
    assert x.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("quantize", [None, "nf4"])
@pytest.mark.parametrize("dropout_seed", [None, 1234])
def test_multi_lora_linear_forward_backward_makes_no_host_sync(backend, quantize, dropout_seed):
    base = nn.Linear(64, 48, bias=True, dtype=DTYPE, device=DEVICE)
    layer = MultiLoRALinear(base, backend=backend, quantize=quantize)
    for name, r in (("a", 4), ("b", 16), ("c", 8)):
        layer.add_adapter(name, r=r, lora_alpha=2 * r, lora_dropout=0.1)
        nn.init.normal_(layer.lora_B[name])
    layer.train()
    batch = MultiLoRABatch(["b", "a", "c", "b"], [20, 7, 0, 13], dropout_seed=dropout_seed)
    x = _input(batch.num_tokens, 64)
    # The batch's metadata is built once per microbatch, before the layers run (multi_lora_batch
    # does this on entry); what is counted is the per-layer work.
    with multi_lora_batch(layer, batch):
        assert run_counted(_forward_backward(layer, x), DEVICE) == []
    _assert_lora_gradients(layer)
    assert layer.lora_A["c"].grad is None  # no tokens, no gradient: the batch really was mixed


@pytest.mark.parametrize("backend", BACKENDS)
def test_nf4_linear_without_adapter_makes_no_host_sync(backend):
    layer = NF4Linear.from_linear(nn.Linear(64, 48, dtype=DTYPE, device=DEVICE), backend=backend)
    x = _input(16, 64)
    assert run_counted(lambda: layer(x).float().sum().backward(), DEVICE) == []
    assert x.grad is not None


def test_multi_lora_batch_builds_every_layers_metadata_on_entry():
    model = nn.Sequential(
        MultiLoRALinear(nn.Linear(16, 16, dtype=DTYPE, device=DEVICE)),
        MultiLoRALinear(nn.Linear(16, 8, dtype=DTYPE, device=DEVICE)),
    )
    model[0].add_adapter("a", r=4)
    model[1].add_adapter("a", r=2)  # another rank: another metadata entry
    batch = MultiLoRABatch(["a"], [5])
    with multi_lora_batch(model, batch):
        assert len(batch._metas) == 2
        built = dict(batch._metas)
        model(torch.randn(5, 16, dtype=DTYPE, device=DEVICE))
        assert batch._metas == built  # the forward pass reused them and built none
