"""Captures the Triton kernel launches of the real launchers on fake CUDA tensors, for any GPU target
and without one (see gpu_compile.py), and finds the @triton.jit functions that none covers.

Each launch goes through Triton's own `JITFunction.run` under a fake driver that reports the
target: its binder specialises the arguments (ints equal to 1 and unit strides become constexprs,
16-divisible ints and aligned pointers get divisibility hints) and parses the options, up to the
compile call, which is recorded instead of run. An autotuned kernel is captured once per config
that its autotuner would try for that call, after the autotuner's own pruning.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import hashlib
import importlib
import pkgutil
import weakref
from types import SimpleNamespace
from unittest import mock

# Per-block opt-in shared memory maxima (what Triton compares metadata.shared with at launch) and
# SM counts of the machines these targets stand for (A100, H100/H200).
SHARED_LIMIT = {80: 166_912, 90: 232_448}
SM_COUNT = {80: 108, 90: 132}
KERNEL_PACKAGE = "lorafusion.kernels"
# The dropout seed of every launch point (a value drawn from torch's generator reads back as it):
# neither 1 nor a multiple of 16, as 15 in 16 seeds are, so the seed argument specialises like
# theirs (Triton would compile another variant, with a divisibility hint, for the rest).
FAKE_SEED = 123_456_789


@dataclasses.dataclass(frozen=True)
class Variant:
    """One compile: everything triton.compile needs, picklable for the process pool."""

    kernel: str  # "module:qualname" of the @triton.jit function
    cc: int
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    config: str

    @functools.cached_property
    def key(self) -> str:
        return _variant_key(self)


@dataclasses.dataclass(frozen=True)
class Launch:
    """A kernel launch of a launch point on one target, compiled with one of its configs."""

    point: str
    launch: str  # kernel and its occurrence within the point
    variant: Variant


def kernel_name(kernel: str) -> str:
    return kernel.split(":")[1]


def jit_function(obj):
    from triton.runtime.jit import JITFunction

    while not isinstance(obj, JITFunction):
        obj = obj.fn  # Autotuner, Heuristics
    return obj


def resolve(kernel: str):
    module, qualname = kernel.split(":")
    return jit_function(getattr(importlib.import_module(module), qualname))


def _config_label(options) -> str:
    return f"w{options.num_warps} s{options.num_stages}" + (f" r{options.maxnreg}" if options.maxnreg else "")


class _FakeDriver:
    """What JITFunction.run asks the driver for on the way to a compile: the target, and a device
    and stream that are only used as keys."""

    def __init__(self, cc: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", cc, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.target.arch  # one binder cache per target

    def get_current_stream(self, device=None):
        return 0


def _no_host_readback_mode():
    """Fake tensors hold no values: a random number drawn from torch's generator and read back
    (a dropout seed) is FAKE_SEED; reading any other tensor's value is an error."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class NoHostReadback(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.random = {}  # id -> weakref: tensors compare elementwise, so no WeakSet

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                drawn = self.random.get(id(args[0]))
                if drawn is not None and drawn() is args[0]:
                    return FAKE_SEED
                raise RuntimeError(f"a launcher read a tensor's value ({func}), which a fake tensor does not have")
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten.randint, torch.ops.aten.random_):
                self.random[id(out)] = weakref.ref(out)
            return out

    return NoHostReadback()


@functools.cache
def _fake_mode():
    """One fake mode for every capture in the process: fake tensors that the kernels' modules keep
    between calls (the NF4 dequantization workspace) belong to the mode that made them."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode()


@contextlib.contextmanager
def fake_gpu(cc: int):
    """Tensors created on "cuda" are fake (shapes, strides and dtypes only), torch.cuda describes
    the target's GPU, and Triton's driver reports the target."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily
    from triton.runtime.driver import driver

    props = SimpleNamespace(
        name=f"fake sm_{cc}",
        major=cc // 10,
        minor=cc % 10,
        multi_processor_count=SM_COUNT[cc],
        shared_memory_per_block_optin=SHARED_LIMIT[cc],
        total_memory=80 << 30,
        warp_size=32,
    )
    cuda_patches = {
        "is_available": lambda: True,
        "device_count": lambda: 1,
        "current_device": lambda: 0,
        "get_device_properties": lambda *args, **kwargs: props,
        "get_device_capability": lambda *args, **kwargs: (props.major, props.minor),
    }
    tensor = torch.tensor

    def tensor_on_fake_cuda(data, *args, device=None, **kwargs):
        # torch.tensor(values, device="cuda") needs CUDA even for a fake tensor: made on the CPU
        # and replaced by a fake CUDA tensor of its shape and dtype (the values do not matter).
        if device is None or torch.device(device).type != "cuda":
            return tensor(data, *args, device=device, **kwargs)
        return torch.empty_like(tensor(data, *args, **kwargs), device=device)

    getitem = torch.Tensor.__getitem__

    def getitem_on_fake_cuda(self, index):
        # Python indexing takes a CUDA device guard, which a CPU-only torch lacks: the view is
        # worked out on a meta twin and taken from the fake tensor with as_strided.
        if not (isinstance(self, FakeTensor) and self.device.type == "cuda"):
            return getitem(self, index)
        twin = _meta_copy(self)
        with unset_fake_temporarily():
            view = getitem(twin, index)
        if view._base is None:
            raise NotImplementedError(f"indexing a fake CUDA tensor with {index!r} (not a view)")
        return self.as_strided(view.shape, view.stride(), view.storage_offset())

    pin_memory = torch.Tensor.pin_memory

    def pin_memory_of_fake(self, *args, **kwargs):
        # Pinned host memory (for asynchronous copies) means nothing to a fake tensor.
        return self if isinstance(self, FakeTensor) else pin_memory(self, *args, **kwargs)

    to = torch.Tensor.to

    def to_fake_cuda(self, *args, **kwargs):
        # A copy onto the device takes a CUDA device guard too: a new fake CUDA tensor instead.
        device, dtype, _, memory_format = torch._C._nn._parse_to(*args, **kwargs)
        if not isinstance(self, FakeTensor) or device is None or device.type != "cuda" or self.device == device:
            return to(self, *args, **kwargs)
        fmt = torch.preserve_format if memory_format is None else memory_format
        return torch.empty_like(self, dtype=dtype or self.dtype, device=device, memory_format=fmt)

    previous_driver = driver._active
    driver.set_active(_FakeDriver(cc))
    try:
        with contextlib.ExitStack() as stack:
            for name, value in cuda_patches.items():
                stack.enter_context(mock.patch.object(torch.cuda, name, value))
            stack.enter_context(mock.patch.object(torch, "tensor", tensor_on_fake_cuda))
            stack.enter_context(mock.patch.object(torch.Tensor, "__getitem__", getitem_on_fake_cuda))
            stack.enter_context(mock.patch.object(torch.Tensor, "pin_memory", pin_memory_of_fake))
            stack.enter_context(mock.patch.object(torch.Tensor, "to", to_fake_cuda))
            stack.enter_context(_fake_mode())
            stack.enter_context(_no_host_readback_mode())
            yield
    finally:
        driver._active = previous_driver


def _meta_copy(value):
    """A meta tensor with a fake tensor's shape, strides, dtype and storage offset (so its data_ptr
    has the alignment a real one would): what Triton's binder reads."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

    if not isinstance(value, FakeTensor):
        return value
    extent = 1 + sum((size - 1) * stride for size, stride in zip(value.shape, value.stride()) if size > 0)
    with unset_fake_temporarily():
        storage = torch.empty(value.storage_offset() + extent, dtype=value.dtype, device="meta")
        return storage.as_strided(value.shape, value.stride(), value.storage_offset())


class _Recorder:
    def __init__(self, cc: int):
        self.cc = cc
        self.point = None
        self.occurrences: dict[str, int] = {}
        self.launch = None  # set while an autotuned launch runs its configs
        self.config = None
        self.launches: list[Launch] = []

    def start_launch(self, fn) -> str:
        kernel = f"{fn.module}:{fn.fn.__qualname__}"
        n = self.occurrences.get(kernel, 0)
        self.occurrences[kernel] = n + 1
        return f"{kernel_name(kernel)}#{n}"

    @contextlib.contextmanager
    def patched(self):
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction

        recorder = self
        jit_run = JITFunction.run

        def autotuner_run(self, *args, **kwargs):
            args = [_meta_copy(a) for a in args]
            kwargs = {k: _meta_copy(v) for k, v in kwargs.items()}
            # As Autotuner.run: its own pruning (early_config_prune, perf_model) when it has a choice.
            self.nargs = dict(zip(self.arg_names, args))
            configs = self.prune_configs(kwargs) if len(self.configs) > 1 else self.configs
            self.nargs = None
            recorder.launch = recorder.start_launch(jit_function(self))
            try:
                for config in configs:
                    recorder.config = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
                    self.fn.run(*args, **kwargs, **config.all_kwargs())
            finally:
                recorder.launch = recorder.config = None

        def run(self, *args, grid, warmup, **kwargs):
            args = [_meta_copy(a) for a in args]
            kwargs = {k: _meta_copy(v) for k, v in kwargs.items()}
            standalone = recorder.launch is None
            if standalone:
                recorder.launch = recorder.start_launch(self)
            try:
                return jit_run(self, *args, grid=grid, warmup=warmup, **kwargs)
            finally:
                if standalone:
                    recorder.launch = None

        def do_compile(self, key, signature, device, constexprs, options, attrs, warmup):
            label = _config_label(options)
            if recorder.config:
                label = f"{recorder.config} {label}"
            variant = Variant(
                f"{self.module}:{self.fn.__qualname__}",
                recorder.cc,
                dict(signature),
                dict(constexprs),
                dict(attrs),
                dict(options.__dict__),
                label,
            )
            recorder.launches.append(Launch(recorder.point, recorder.launch, variant))
            return None  # JITFunction.run returns before launching

        with mock.patch.object(Autotuner, "run", autotuner_run), mock.patch.object(
            JITFunction, "run", run
        ), mock.patch.object(JITFunction, "_do_compile", do_compile):
            yield


def capture(points, cc: int) -> list[Launch]:
    recorder = _Recorder(cc)
    with fake_gpu(cc), recorder.patched():
        for point in points:
            recorder.point = point.label
            recorder.occurrences = {}
            before = len(recorder.launches)
            point.run()
            if len(recorder.launches) == before:
                raise RuntimeError(f"launch point {point.label!r} launched no Triton kernel")
    return recorder.launches


def discover_kernels() -> dict[str, object]:
    """Every @triton.jit function defined in the kernel package's modules, by "module:qualname"."""
    from triton.runtime.jit import KernelInterface

    package = importlib.import_module(KERNEL_PACKAGE)
    found = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{KERNEL_PACKAGE}.{info.name}")
        for value in vars(module).values():
            if isinstance(value, KernelInterface):  # JITFunction, Autotuner, Heuristics
                fn = jit_function(value)
                if fn.module == module.__name__:
                    found[f"{fn.module}:{fn.fn.__qualname__}"] = fn
    return found


def _callees(fn) -> set[str]:
    """The @triton.jit functions that fn's body calls, by name or as a module's attribute."""
    from triton.runtime.jit import JITFunction

    called = set()
    for node in ast.walk(ast.parse(fn.src)):
        if not isinstance(node, ast.Call):
            continue
        target = node.func
        if isinstance(target, ast.Name):
            value = fn.fn.__globals__.get(target.id)
        elif isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name):
            value = getattr(fn.fn.__globals__.get(target.value.id), target.attr, None)
        else:
            continue
        if isinstance(value, JITFunction):
            called.add(f"{value.module}:{value.fn.__qualname__}")
    return called


def uncovered_kernels(discovered: dict, launched: set[str]) -> list[str]:
    """The discovered functions that are neither launched nor called, directly or not, by a
    launched kernel."""
    reached, frontier = set(), list(launched)
    while frontier:
        kernel = frontier.pop()
        if kernel in reached:
            continue
        reached.add(kernel)
        if kernel in discovered:
            frontier.extend(_callees(discovered[kernel]))
    return sorted(set(discovered) - reached)


def _variant_key(variant: Variant) -> str:
    import triton

    # extern_libs holds the install path of libdevice: the same for one Triton version anywhere.
    options = {k: v for k, v in variant.options.items() if k != "extern_libs"}
    text = repr(
        (
            triton.__version__,
            resolve(variant.kernel).cache_key,
            variant.cc,
            sorted(variant.signature.items()),
            sorted(variant.constexprs.items(), key=repr),
            sorted(variant.attrs.items(), key=repr),
            sorted(options.items()),
        )
    )
    return hashlib.sha256(text.encode()).hexdigest()[:32]
