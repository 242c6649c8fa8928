"""No host-device synchronisation inside a LoRA layer's forward and backward.

Every read of a device value on the host (`.item()`, `.tolist()`, `.cpu()`, `.numpy()`, `bool()`,
`int()`, `float()` of a tensor, an op whose output size depends on the data, a copy to the CPU)
makes the CPU wait for the GPU's queue to drain: once per layer it starves the GPU, and it forbids
CUDA graphs. The counter below records every such call made by our code (the Triton interpreter,
which stands in for the GPU and reads tensors to run kernels in numpy, is not our code) while a
layer runs forward and backward; the layers must make none.

On the CPU this finds the calls that would sync on a GPU; on a CUDA machine (benchmarks/gpu_check.py
runs this file there) it also sees every copy to the host that really happens.
"""

from __future__ import annotations

import os
import sys
import traceback

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

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

_SYNCING_METHODS = {
    torch.Tensor.item: ".item()",
    torch.Tensor.tolist: ".tolist()",
    torch.Tensor.cpu: ".cpu()",
    torch.Tensor.numpy: ".numpy()",
    torch.Tensor.__bool__: "bool(tensor)",
    torch.Tensor.__int__: "int(tensor)",
    torch.Tensor.__float__: "float(tensor)",
    torch.Tensor.__index__: "tensor as an index",
}
# Ops whose output size depends on the values: the host must read them back to allocate.
_DATA_DEPENDENT_OPS = ("nonzero", "masked_select", "unique", "_unique", "unique_consecutive", "_unique2", "argwhere")
_LIBRARIES = tuple(os.path.dirname(module.__file__) + os.sep for module in (torch, triton) if module is not None)
_COUNTER_FRAMES = {"_record", "_call", "__torch_function__", "__torch_dispatch__", "shim"}
_INTERPRETER = os.path.dirname(triton.__file__) + os.sep if triton is not None else None


class HostSyncCounter:
    """Records, as "what at file:line", every host read of device data that our code makes inside.

    A TorchFunctionMode sees the Python-level calls (`.tolist()`, `.cpu()`, ... are no-ops on CPU
    tensors and never reach the dispatcher, yet sync on a GPU). Autograd does not carry function
    modes into backward, so there the same methods are caught by wrapping them on torch.Tensor for
    the duration. A TorchDispatchMode, which autograd does carry, sees what reaches the dispatcher
    in both passes: scalar reads (`aten._local_scalar_dense`, also from C++), data-dependent
    sizes, boolean indexing and copies from a device to the CPU.
    """

    def __init__(self) -> None:
        self.events: list[str] = []
        self._depth = 0  # inside a call already recorded: do not record its parts again

    def _record(self, what: str) -> None:
        stack = traceback.extract_stack()
        if _INTERPRETER is not None and any(frame.filename.startswith(_INTERPRETER) for frame in stack):
            return  # the Triton interpreter running a kernel: on a GPU no host code does this
        ours = [
            frame
            for frame in stack
            if not frame.filename.startswith(_LIBRARIES) and not (frame.filename == __file__ and frame.name in _COUNTER_FRAMES)
        ]
        where = f"{ours[-1].filename}:{ours[-1].lineno}" if ours else "?"
        self.events.append(f"{what} at {where}")

    def _call(self, what, func, *args, **kwargs):
        if self._depth == 0:
            self._record(what)
        self._depth += 1
        try:
            return func(*args, **kwargs)
        finally:
            self._depth -= 1

    def __enter__(self) -> HostSyncCounter:
        counter = self

        class Functions(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func in _SYNCING_METHODS:
                    return counter._call(_SYNCING_METHODS[func], func, *args, **kwargs)
                return func(*args, **kwargs)

        class Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                what = counter._dispatch_sync(func, args, kwargs)
                if what is not None:
                    return counter._call(what, func, *args, **kwargs)
                return func(*args, **kwargs)

        self._originals = {}
        for method in (torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu):
            self._originals[method.__name__] = method
            setattr(torch.Tensor, method.__name__, self._backward_shim(method))
        self._modes = [Dispatch(), Functions()]
        for mode in self._modes:
            mode.__enter__()
        return self

    def _backward_shim(self, method):
        what = _SYNCING_METHODS[method]

        def shim(tensor, *args, **kwargs):
            if torch._C._is_torch_function_mode_enabled():  # forward: the function mode sees it
                return method(tensor, *args, **kwargs)
            return self._call(what, method, tensor, *args, **kwargs)

        return shim

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        for name, method in self._originals.items():
            setattr(torch.Tensor, name, method)

    @staticmethod
    def _dispatch_sync(func, args, kwargs) -> str | None:
        name = func.overloadpacket.__name__
        if name == "_local_scalar_dense":
            return "a scalar read"
        if name in _DATA_DEPENDENT_OPS:
            return f"aten.{name} (data-dependent size)"
        if name == "repeat_interleave" and kwargs.get("output_size") is None and isinstance(args[0], torch.Tensor) and args[0].dim() > 0 and len(args) < 2:
            return "aten.repeat_interleave without output_size"
        if name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in (args[1] or ())
        ):
            return f"aten.{name} with a boolean mask"
        if name in ("_to_copy", "copy_", "to"):
            source = args[1] if name == "copy_" else args[0]
            target = args[0].device if name == "copy_" else kwargs.get("device")
            if isinstance(source, torch.Tensor) and source.device.type != "cpu" and target is not None and torch.device(target).type == "cpu":
                return f"aten.{name} from {source.device} to the CPU"
        return None


def run_counted(step) -> list[str]:
    with HostSyncCounter() as counter:
        step()
    return counter.events


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
    with HostSyncCounter() as counter:
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
    assert run_counted(_forward_backward(layer, x)) == []
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
        assert run_counted(_forward_backward(layer, x)) == []
    _assert_lora_gradients(layer)
    assert layer.lora_A["c"].grad is None  # no tokens, no gradient: the batch really was mixed


@pytest.mark.parametrize("backend", BACKENDS)
def test_nf4_linear_without_adapter_makes_no_host_sync(backend):
    layer = NF4Linear.from_linear(nn.Linear(64, 48, dtype=DTYPE, device=DEVICE), backend=backend)
    x = _input(16, 64)
    assert run_counted(lambda: layer(x).float().sum().backward()) == []
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
