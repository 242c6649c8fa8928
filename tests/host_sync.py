"""HostSyncCounter: records every read of device data on the host that our code makes while active.

Every such read (`.item()`, `.tolist()`, `.cpu()`, `.numpy()`, `bool()`, `int()`, `float()` of a
tensor, an op whose output size depends on the data, a copy to the CPU) makes the CPU wait for the
GPU's queue to drain. The Triton interpreter, which stands in for the GPU and reads tensors to run
kernels in numpy, is not our code and is not counted.

What is device data: on a GPU, any tensor on it (exact). On the CPU, where a test runs in place of
the GPU, any tensor except one born on the host inside the counted region: made in forward by a
factory call that names no device or another device than the one counted (a seed drawn from
torch's CPU generator, bookkeeping built from Python lists), or computed only from such tensors.
Backward does not show a factory's arguments (see below), so there every new tensor counts as
device data: that errs towards reporting a read, never towards missing one.
"""

from __future__ import annotations

import os
import traceback

import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

try:
    import triton
except ImportError:  # pragma: no cover - triton is a Linux dependency
    triton = None

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
_DATA_DEPENDENT_OPS = {"nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_consecutive", "argwhere"}
_LIBRARIES = tuple(os.path.dirname(module.__file__) + os.sep for module in (torch, triton) if module is not None)
_INTERPRETER = os.path.dirname(triton.__file__) + os.sep if triton is not None else None
_THIS_FILE = os.path.abspath(__file__)
_COUNTER_FRAMES = {"_record", "_call", "__torch_function__", "__torch_dispatch__", "shim"}


def _tensors(tree) -> list[torch.Tensor]:
    return [leaf for leaf in pytree.tree_leaves(tree) if isinstance(leaf, torch.Tensor)]


class HostSyncCounter:
    """`with HostSyncCounter(device) as counter:` ... then `counter.events`, one "what at file:line"
    per host read of device data.

    A TorchFunctionMode sees the Python-level calls (`.tolist()`, `.cpu()`, ... are no-ops on CPU
    tensors and never reach the dispatcher, yet sync on a GPU). Autograd does not carry function
    modes into backward, so there `.tolist()`, `.numpy()` and `.cpu()` are caught by wrapping them
    on torch.Tensor for the duration. A TorchDispatchMode, which autograd does carry, sees what
    reaches the dispatcher in both passes: scalar reads (`aten._local_scalar_dense`, also from
    C++), data-dependent sizes, boolean indexing and copies from a device to the CPU.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.events: list[str] = []
        self._depth = 0  # inside a call already recorded: its parts are not recorded again
        self._host_born = WeakIdKeyDictionary()

    # ---- what counts --------------------------------------------------------------------------

    def on_device(self, tensor: torch.Tensor) -> bool:
        if self.device.type != "cpu":
            return tensor.device.type != "cpu"
        return tensor not in self._host_born

    def _dispatch_sync(self, func, args, kwargs) -> str | None:
        name = func.overloadpacket.__name__
        inputs = _tensors((args, kwargs))
        if not any(self.on_device(t) for t in inputs):
            return None
        if name == "_local_scalar_dense":
            return "a scalar read"
        if name in _DATA_DEPENDENT_OPS:
            return f"aten.{name} (data-dependent size)"
        if name == "repeat_interleave" and kwargs.get("output_size") is None and args[0].dim() > 0 and len(args) < 2:
            return "aten.repeat_interleave without output_size"
        if name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in (args[1] or ())
        ):
            return f"aten.{name} with a boolean mask"
        if name in ("_to_copy", "copy_"):
            source, target = (args[1], args[0].device) if name == "copy_" else (args[0], kwargs.get("device"))
            if source.device.type != "cpu" and target is not None and torch.device(target).type == "cpu":
                return f"aten.{name} from {source.device} to the CPU"
        return None

    def _track(self, inputs: list[torch.Tensor], result) -> None:
        # Factories are device data here; in forward the function mode then says where they were born.
        born = bool(inputs) and all(t in self._host_born for t in inputs)
        for tensor in _tensors(result):
            if born:
                self._host_born[tensor] = True
            else:
                self._host_born.pop(tensor, None)

    # ---- recording ----------------------------------------------------------------------------

    def _record(self, what: str) -> None:
        stack = traceback.extract_stack()
        if _INTERPRETER is not None and any(frame.filename.startswith(_INTERPRETER) for frame in stack):
            return  # the Triton interpreter running a kernel: on a GPU no host code does this
        ours = [
            frame
            for frame in stack
            if not frame.filename.startswith(_LIBRARIES)
            and not (frame.filename == _THIS_FILE and frame.name in _COUNTER_FRAMES)
        ]
        self.events.append(f"{what} at {ours[-1].filename}:{ours[-1].lineno}" if ours else what)

    def _call(self, what: str | None, func, *args, **kwargs):
        if what is not None and self._depth == 0:
            self._record(what)
        self._depth += what is not None
        try:
            return func(*args, **kwargs)
        finally:
            self._depth -= what is not None

    def __enter__(self) -> HostSyncCounter:
        counter = self

        class Functions(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func in _SYNCING_METHODS and counter.on_device(args[0]):
                    return counter._call(_SYNCING_METHODS[func], func, *args, **kwargs)
                result = func(*args, **kwargs)
                if not _tensors((args, kwargs)):  # a factory: born where its device argument says
                    device = kwargs.get("device")
                    for tensor in _tensors(result):
                        if device is None or torch.device(device) != counter.device:
                            counter._host_born[tensor] = True
                        else:
                            counter._host_born.pop(tensor, None)
                return result

        class Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                result = counter._call(counter._dispatch_sync(func, args, kwargs), func, *args, **kwargs)
                counter._track(_tensors((args, kwargs)), result)
                return result

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
            if torch._C._is_torch_function_mode_enabled() or not self.on_device(tensor):
                return method(tensor, *args, **kwargs)  # forward: the function mode sees it
            return self._call(what, method, tensor, *args, **kwargs)

        return shim

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        for name, method in self._originals.items():
            setattr(torch.Tensor, name, method)


def run_counted(step, device: torch.device | str = "cpu") -> list[str]:
    """The host reads of device data that `step()` makes."""
    with HostSyncCounter(device) as counter:
        step()
    return counter.events
