"""MultiLoRALinear: one frozen base linear layer shared by many named LoRA adapters, each trained
on its own token segments of a packed microbatch (lorafusion.kernels.fused_multi_lora_linear).

Parameters are named as PEFT names a multi-adapter LoRA layer: `lora_A[name]` [r, in_features] and
`lora_B[name]` [out_features, r] in ParameterDicts, beside the shared, frozen `weight` and `bias`.
The base weight may be 4-bit NF4 (QLoRA, an `NF4Weight`): every adapter then trains over it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from lorafusion.kernels import SegmentMeta, build_segment_meta, fused_multi_lora_linear, lora_scaling
from lorafusion.kernels.segments import sample_dropout_rows
from lorafusion.kernels.lora_linear import resolve_backend
from lorafusion.kernels.nf4 import NF4Weight, quantize_nf4
from .lora_linear import check_backend, check_lora_hyperparameters, default_adapter_dtype
from .nf4_linear import NF4Linear, NF4LinearFunction, check_quantize, is_linear4bit, nf4_from_linear4bit


@dataclass(frozen=True)
class AdapterSettings:
    r: int
    lora_alpha: float
    lora_dropout: float
    use_rslora: bool

    @property
    def scaling(self) -> float:
        return lora_scaling(self.r, self.lora_alpha, self.use_rslora)


def _check_dropout_samples(dropout_samples: Sequence[tuple[int, int]], num_tokens: int) -> None:
    counted = 0
    for entry in dropout_samples:
        if (
            not isinstance(entry, tuple) or len(entry) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) for v in entry)
            or not -(2**63) <= entry[0] < 2**63 or entry[1] < 0
        ):
            raise ValueError(f"dropout_samples must be (int64 key, token count >= 0) pairs, got {entry!r}")
        counted += entry[1]
    if counted != num_tokens:
        raise ValueError(f"dropout_samples cover {counted} tokens but the segments hold {num_tokens}")


class MultiLoRABatch:
    """The consecutive token segments of one packed microbatch and the adapter that trains each.

    Segment i is `lengths[i]` consecutive tokens of the flattened input, trained by adapter
    `adapter_names[i]`; a name may repeat, a length may be 0, and a None name gets the base output
    only (rows that keep others in place, e.g. samples already trained). Build it once per microbatch: the
    kernels' segment metadata is derived once per distinct layer configuration and cached here,
    so every layer of the model reuses it. `dropout_seed` makes the adapters' dropout masks a
    function of the batch (each layer adds its own `dropout_seed_offset`); None draws seeds from
    torch's generator. `dropout_samples`: the (key, token count) of each packed sample, in order,
    covering the batch's tokens; a token's mask is then named by its sample's key and its position
    in the sample instead of its row, so a sample with the same key draws the same masks wherever
    it is packed and whatever it is packed with (a job trains as if alone, dropout included).
    """

    def __init__(
        self,
        adapter_names: Sequence[str | None],
        lengths: Sequence[int],
        dropout_seed: int | None = None,
        dropout_samples: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        if len(adapter_names) != len(lengths):
            raise ValueError(
                f"adapter_names and lengths need one entry per segment, got {len(adapter_names)} names "
                f"and {len(lengths)} lengths"
            )
        for name in adapter_names:
            if name is not None and (not isinstance(name, str) or not name):
                raise ValueError(f"adapter_names must be non-empty strings or None, got {name!r}")
        for length in lengths:
            if isinstance(length, bool) or not isinstance(length, int) or length < 0:
                raise ValueError(f"lengths must be integers >= 0, got {length!r}")
        if dropout_seed is not None and not 0 <= dropout_seed < 2**31 - 1:
            raise ValueError(f"dropout_seed must be in [0, 2**31 - 1), got {dropout_seed}")
        if dropout_samples is not None:
            _check_dropout_samples(dropout_samples, sum(lengths))
        self.adapter_names = tuple(adapter_names)
        self.lengths = tuple(lengths)
        self.dropout_seed = dropout_seed
        self.dropout_samples = None if dropout_samples is None else tuple(dropout_samples)
        self._metas: dict[tuple, SegmentMeta] = {}
        self._dropout_rows: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)

    def adapters_with_tokens(self) -> list[str]:
        """Adapter names with at least one token, in order of first appearance."""
        return list(dict.fromkeys(n for n, length in zip(self.adapter_names, self.lengths) if length > 0 and n is not None))

    def segment_meta(
        self, adapters: dict[str, tuple[int, float, float]], device: torch.device
    ) -> SegmentMeta:
        """Kernel metadata for a layer holding `adapters` (name -> (rank, scaling, dropout p), in the
        order their weights are concatenated). Tokens of other adapters get the base output only."""
        key = (tuple(adapters.items()), device)
        meta = self._metas.get(key)
        if meta is None:
            index = {name: i for i, name in enumerate(adapters)}
            passthrough = len(adapters)  # a rank-0 adapter: no LoRA term
            segments = [(index.get(n, passthrough), length) for n, length in zip(self.adapter_names, self.lengths) if length > 0]
            settings = list(adapters.values()) + [(0, 0.0, 0.0)]
            has_dropout = any(p > 0.0 for _, _, p in settings)
            meta = build_segment_meta(
                [a for a, _ in segments], [length for _, length in segments],
                [s[0] for s in settings], [s[1] for s in settings], [s[2] for s in settings], device,
                dropout_rows=self.dropout_rows(device) if has_dropout else None,
            )
            self._metas[key] = meta
        return meta

    def dropout_rows(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(positions, keys) naming each token's dropout mask on `device`, or None (by row)."""
        if self.dropout_samples is None:
            return None
        if device not in self._dropout_rows:
            keys, counts = zip(*self.dropout_samples) if self.dropout_samples else ((), ())
            self._dropout_rows[device] = sample_dropout_rows(list(keys), list(counts), device)
        return self._dropout_rows[device]

    def __repr__(self) -> str:
        return f"MultiLoRABatch(adapter_names={list(self.adapter_names)}, lengths={list(self.lengths)})"


class MultiLoRALinear(nn.Module):
    """y = x Wᵀ + b, plus for each token scaling_a · dropout_a(x) A_aᵀ B_aᵀ of its segment's adapter a.

    Wraps `base_linear` (its weight and bias are shared, not copied, and frozen). QLoRA: with
    quantize="nf4" the base weight is stored in 4-bit NF4 instead (`blocksize` elements per absmax,
    `double_quant` quantizing the absmax too, as in bitsandbytes) and dequantized into a shared
    workspace at each use; an `NF4Linear` or an NF4 `bitsandbytes.nn.Linear4bit` is taken as it
    is, its storage shared. Adapters are kept in `adapter_dtype` (by default fp32 on a 16-bit or
    NF4 base, as PEFT keeps them, and the base's dtype otherwise) and are
    added with `add_adapter`; `forward(x, batch)` takes x [tokens, in_features] (or [..., in_features],
    flattened in order) and a `MultiLoRABatch` saying which adapter owns which tokens, or takes the
    batch from an enclosing `multi_lora_batch(model, batch)` context. Each adapter's scaling and
    dropout are its own, whatever it is batched with; dropout acts on the LoRA path only, in
    training mode only. An adapter without tokens in a batch gets no gradient (None).
    """

    def __init__(
        self,
        base_linear: nn.Module,
        backend: str = "auto",
        quantize: str | None = None,
        double_quant: bool = True,
        blocksize: int = 64,
        adapter_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_backend(backend)
        if quantize is not None:
            check_quantize(quantize)
        if is_linear4bit(base_linear):
            weight, bias = nf4_from_linear4bit(base_linear)
        elif isinstance(base_linear, NF4Linear):
            weight, bias = base_linear.weight, base_linear.bias
        elif not isinstance(base_linear, nn.Linear):
            raise TypeError(
                "MultiLoRALinear wraps an nn.Linear, a lorafusion.qlora.NF4Linear or a bitsandbytes.nn.Linear4bit, "
                f"got {type(base_linear).__name__}"
            )
        elif quantize is not None:
            weight, bias = quantize_nf4(base_linear.weight, blocksize, double_quant), base_linear.bias
        else:
            weight, bias = base_linear.weight, base_linear.bias
        self.out_features, self.in_features = weight.shape
        self.weight = weight.requires_grad_(False)
        self.bias = bias.requires_grad_(False) if bias is not None else None
        self.backend = backend
        self.adapter_dtype = default_adapter_dtype(weight.dtype, adapter_dtype)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.adapters: dict[str, AdapterSettings] = {}
        self._context_batch: MultiLoRABatch | None = None
        # Added to a batch's dropout seed so that layers draw different masks. apply_multi_lora sets
        # it from the module's name (independent of how the model is split into stages); a layer
        # built by hand should get a distinct value too.
        self.dropout_seed_offset = 0

    @property
    def quantized(self) -> bool:
        """True when the base weight is stored in 4-bit NF4 (an `NF4Weight`)."""
        return isinstance(self.weight, NF4Weight)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.adapters)

    def add_adapter(
        self,
        name: str,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        """A new adapter, initialised as PEFT does (A Kaiming-uniform, B zero: the layer's output is
        unchanged). `generator` (a CPU generator) seeds A's initialisation; A is drawn in fp32 on the
        CPU and then cast, so the same seed gives the same adapter on any device and dtype."""
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"adapter name must be a non-empty string without '.', got {name!r}")
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists in this layer")
        check_lora_hyperparameters(r, lora_alpha, lora_dropout)
        factory = {"dtype": self.adapter_dtype, "device": self.weight.device}
        # kaiming_uniform_(a=sqrt(5)) as nn.Linear and PEFT use: bound = 1 / sqrt(fan_in).
        bound = 1.0 / math.sqrt(self.in_features)
        lora_A = torch.empty(r, self.in_features).uniform_(-bound, bound, generator=generator)
        self.lora_A[name] = nn.Parameter(lora_A.to(**factory))
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, r, **factory))
        self.adapters[name] = AdapterSettings(r, lora_alpha, float(lora_dropout), bool(use_rslora))

    def remove_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise KeyError(f"no adapter named {name!r}; this layer holds {self.adapter_names}")
        del self.lora_A[name], self.lora_B[name], self.adapters[name]

    def forward(self, x: torch.Tensor, batch: MultiLoRABatch | None = None) -> torch.Tensor:
        explicit = batch is not None
        batch = batch if explicit else self._context_batch
        if batch is None:
            raise ValueError(
                "MultiLoRALinear.forward needs a MultiLoRABatch: call forward(x, batch) or run the "
                "model inside `with multi_lora_batch(model, batch):`"
            )
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"MultiLoRALinear expects input of shape [..., in_features={self.in_features}], got x of shape {tuple(x.shape)}"
            )
        if x.dtype != self.weight.dtype:
            raise TypeError(f"MultiLoRALinear: x.dtype must equal the layer's dtype {self.weight.dtype}, got {x.dtype}")
        names = batch.adapters_with_tokens()
        held = [n for n in names if n in self.adapters]
        if explicit and len(held) < len(names):
            unknown = [n for n in names if n not in self.adapters]
            raise ValueError(f"unknown adapter(s) {unknown} in the batch; this layer holds {self.adapter_names}")
        if not held:
            if self.quantized:
                # NF4Linear's op: dequantized into the shared workspace, differentiable in x.
                return NF4LinearFunction.apply(x, self.weight, self.bias, resolve_backend(self.backend, x.device))
            return F.linear(x, self.weight, self.bias)
        meta = self.segment_meta(batch, x.device)
        lora_A_cat, lora_B_cat = self._concatenated(held)
        seed = None if batch.dropout_seed is None else (batch.dropout_seed + self.dropout_seed_offset) % (2**31 - 1)
        return fused_multi_lora_linear(
            x, self.weight, self.bias, lora_A_cat, lora_B_cat, meta, backend=self.backend, dropout_seed=seed
        )

    def segment_meta(self, batch: MultiLoRABatch, device: torch.device | None = None) -> SegmentMeta | None:
        """The kernel metadata this layer uses for `batch` (None when none of its adapters has tokens
        there), built on first request and cached in the batch for every layer of the same settings.

        Building it copies small tables to the device, which waits for the device: `multi_lora_batch`
        builds it for every layer on entry, so that the layers' forward and backward never wait.
        """
        held = [n for n in batch.adapters_with_tokens() if n in self.adapters]
        if not held:
            return None
        settings = {
            n: (a.r, a.scaling, a.lora_dropout if self.training else 0.0)
            for n, a in ((n, self.adapters[n]) for n in held)
        }
        return batch.segment_meta(settings, self.weight.device if device is None else device)

    def _concatenated(self, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """A and B of `names` stacked along the rank (differentiable: each gradient flows back to
        its own parameter)."""
        for name in names:
            r = self.adapters[name].r
            for kind, shape in (("lora_A", (r, self.in_features)), ("lora_B", (self.out_features, r))):
                actual = tuple(getattr(self, kind)[name].shape)
                if actual != shape:
                    raise ValueError(f"adapter {name!r}: {kind} must have shape {shape} for this layer, got {actual}")
        if len(names) == 1:
            return self.lora_A[names[0]], self.lora_B[names[0]]
        return torch.cat([self.lora_A[n] for n in names]), torch.cat([self.lora_B[n] for n in names], dim=1)

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}(r={a.r}, alpha={a.lora_alpha}, dropout={a.lora_dropout})" for n, a in self.adapters.items())
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quantized={self.quantized}, backend={self.backend!r}, adapters=[{adapters}]"
        )


@contextmanager
def multi_lora_batch(model: nn.Module, batch: MultiLoRABatch) -> Iterator[MultiLoRABatch]:
    """Hands `batch` to every MultiLoRALinear in `model` for the forward passes run inside.

    Adapter names are checked against the adapters the model holds; a job whose adapter does not
    target some layer gets that layer's base output for its tokens. Every layer's segment metadata
    is built here, before the forward pass, in each layer's current train/eval mode.
    """
    layers = [m for m in model.modules() if isinstance(m, MultiLoRALinear)]
    if not layers:
        raise ValueError("the model has no MultiLoRALinear layers; convert it with apply_multi_lora first")
    known = set().union(*(layer.adapters for layer in layers))
    unknown = [n for n in batch.adapters_with_tokens() if n not in known]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown} in the batch; the model holds {sorted(known)}")
    for layer in layers:
        layer.segment_meta(batch)
    with _batches_held([(layer, batch) for layer in layers]):
        yield batch


def checkpoint_context_fn(model: nn.Module) -> Callable[[], tuple[AbstractContextManager, AbstractContextManager]]:
    """torch.utils.checkpoint's `context_fn` (use_reentrant=False) for gradient checkpointing of a
    model holding MultiLoRALinear layers: a checkpointed block is run again in the backward pass,
    after `multi_lora_batch` has ended, so the recomputation is given back the batch each layer
    held when the block ran forward (and so the same segments and dropout masks)."""

    def context_fn() -> tuple[AbstractContextManager, AbstractContextManager]:
        held = [(layer, layer._context_batch) for layer in model.modules() if isinstance(layer, MultiLoRALinear)]
        return nullcontext(), _batches_held(held)

    return context_fn


@contextmanager
def _batches_held(held: list[tuple[MultiLoRALinear, MultiLoRABatch | None]]) -> Iterator[None]:
    previous = [layer._context_batch for layer, _ in held]
    for layer, batch in held:
        layer._context_batch = batch
    try:
        yield
    finally:
        for (layer, _), before in zip(held, previous):
            layer._context_batch = before
