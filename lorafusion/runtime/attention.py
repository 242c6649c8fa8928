"""Attention for packed microbatches: each packed sample attends causally to itself only.

Registered with transformers' AttentionInterface as "lorafusion_packed" and selected by the
runtime's model loader. Called with `sample_lengths` (the packed samples' token counts, in order),
each sample attends to itself alone, with the attention options the model passes (scaling,
dropout, sliding window, logit softcap), so a packed sample computes what it computes alone. A
block-diagonal mask over the whole microbatch would cost tokens² per head instead.

Kernels (select_kernel picks one per call):
- "per_sample": scaled-dot-product attention per sample (the eager softmax with a logit softcap,
  which SDPA lacks). On CPU it is the fastest exact one: FlexAttention with a document mask has no
  backward there, and its compiled forward took 3.7x as long (benchmarks/results/e2e_attention_cpu.csv:
  14 samples, 1014 tokens, 4 heads of 32, one thread: 3.7 ms per sample, 13.8 ms flex) and 2.4x
  (8 samples, 2048 tokens, 8 heads of 64: 25 vs 59 ms); uncompiled it materialises tokens² scores (41x).
- "flash_attn": flash-attn's flash_attn_varlen_func, one call per layer for the whole microbatch;
  CUDA, fp16/bf16, every option above.
- "torch_varlen": torch.nn.attention.varlen.varlen_attn (flash attention inside torch), one call
  per layer; CUDA sm80+, fp16/bf16, no softcap and no dropout.
Both varlen kernels take cumulative sample offsets (cu_seqlens), built once per microbatch on its
device and reused by every layer.

Without `sample_lengths` (generation) each batch row is one sequence, its queries the last tokens
of its keys (a KV cache).
"""

from __future__ import annotations

import functools
import inspect
import itertools
from dataclasses import dataclass

import torch
import transformers
from torch.nn import functional as F

PACKED_ATTENTION = "lorafusion_packed"
KERNELS = ("per_sample", "flash_attn", "torch_varlen")
_HALF_DTYPES = (torch.float16, torch.bfloat16)
_MAX_FLASH_HEAD_DIM = 256


@dataclass(frozen=True)
class AttentionOptions:
    """The attention arguments a model's attention module passes."""

    scaling: float | None = None  # None: 1/sqrt(head_dim)
    dropout: float = 0.0
    sliding_window: int | None = None  # keys a query sees, itself included (transformers' meaning)
    softcap: float | None = None  # scores -> softcap * tanh(scores / softcap) before the softmax


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sample_lengths: tuple[int, ...] | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query [batch, heads, tokens, head_dim], key/value [batch, kv_heads, tokens, head_dim] ->
    ([batch, tokens, heads, head_dim], None), as transformers' attention functions return."""
    if kwargs.get("s_aux") is not None:
        raise ValueError("attention sinks (s_aux) are not supported by the packed attention")
    if not getattr(module, "is_causal", True):
        raise ValueError("bidirectional attention is not supported by the packed attention (it is causal)")
    options = AttentionOptions(scaling=scaling, dropout=dropout, sliding_window=sliding_window or None, softcap=softcap or None)
    if sample_lengths is None:
        output = attend_alone(query, key, value, options, mask=attention_mask)
        return output.transpose(1, 2).contiguous(), None
    return attend_packed(query, key, value, tuple(sample_lengths), options), None


def attend_packed(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    sample_lengths: tuple[int, ...],
    options: AttentionOptions,
    kernel: str | None = None,
) -> torch.Tensor:
    """Each sample of the packed sequence attends causally to itself: [batch, tokens, heads, head_dim].
    `kernel`: one of KERNELS (None: select_kernel's choice)."""
    if sum(sample_lengths) != query.shape[2]:
        raise ValueError(f"sample_lengths sum to {sum(sample_lengths)} but the microbatch has {query.shape[2]} tokens")
    kernel = kernel or select_kernel(query, key, options)
    if kernel == "per_sample":
        outputs, start = [], 0
        for length in sample_lengths:
            span = slice(start, start + length)
            outputs.append(attend_alone(query[:, :, span], key[:, :, span], value[:, :, span], options))
            start += length
        return torch.cat(outputs, dim=2).transpose(1, 2).contiguous()
    if kernel not in KERNELS:
        raise ValueError(f"kernel {kernel!r} is not one of {', '.join(KERNELS)}")
    return _attend_varlen(query, key, value, sample_lengths, options, kernel)


def select_kernel(query: torch.Tensor, key: torch.Tensor, options: AttentionOptions) -> str:
    """The fastest kernel that computes these options exactly on query's device and dtype."""
    on_cuda = query.device.type == "cuda"
    return choose_kernel(
        on_cuda, query.shape[0], query.dtype, query.shape[-1], options,
        has_flash_attn=on_cuda and _flash_attn_varlen() is not None,
        has_torch_varlen=on_cuda and _torch_varlen(_device_index(query.device)) is not None,
    )


def choose_kernel(
    on_cuda: bool, batch: int, dtype: torch.dtype, head_dim: int, options: AttentionOptions,
    has_flash_attn: bool, has_torch_varlen: bool,
) -> str:
    """select_kernel's rule: a varlen kernel for one packed CUDA sequence in fp16/bf16 (flash-attn's
    first, as it computes every option), else attention per sample."""
    if not on_cuda or batch != 1 or dtype not in _HALF_DTYPES or head_dim > _MAX_FLASH_HEAD_DIM or head_dim % 8:
        return "per_sample"
    if has_flash_attn:
        return "flash_attn"
    if has_torch_varlen and options.softcap is None and not options.dropout:
        return "torch_varlen"
    return "per_sample"


def attend_alone(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, options: AttentionOptions, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """One sequence per batch row; the queries are its last query.shape[2] tokens. `mask` (bool, or
    additive), when given, replaces the causal and sliding-window mask. -> [batch, heads, queries, head_dim]"""
    num_queries, num_keys = query.shape[2], key.shape[2]
    if mask is not None:
        mask = mask[:, :, :, :num_keys]
    elif options.softcap is not None or not _plain_causal_suffices(num_queries, num_keys, options.sliding_window):
        mask = causal_mask(num_queries, num_keys, options.sliding_window, query.device)
    if options.softcap is None:
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=options.dropout, scale=options.scaling,
            is_causal=mask is None and num_queries == num_keys, enable_gqa=query.shape[1] != key.shape[1],
        )
    return _softcapped_attention(query, key, value, mask, options)


def _plain_causal_suffices(num_queries: int, num_keys: int, window: int | None) -> bool:
    """SDPA without a mask (is_causal when square) computes it: no window cuts in, and the queries
    are all the keys or a single last token."""
    return (window is None or num_keys <= window) and (num_queries == num_keys or num_queries == 1)


def causal_mask(num_queries: int, num_keys: int, window: int | None, device: torch.device) -> torch.Tensor:
    """[queries, keys] bool, True where query i (position num_keys - num_queries + i) sees the key:
    keys at or before it, and within `window` keys of it."""
    query_positions = torch.arange(num_keys - num_queries, num_keys, device=device)[:, None]
    key_positions = torch.arange(num_keys, device=device)[None, :]
    allowed = key_positions <= query_positions
    if window is not None:
        allowed &= key_positions > query_positions - window
    return allowed


def _softcapped_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, options: AttentionOptions
) -> torch.Tensor:
    """Gemma2's eager attention: softcap * tanh(scores / softcap), masked, softmax in at least fp32."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scale = options.scaling if options.scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / options.softcap) * options.softcap
    scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.promote_types(query.dtype, torch.float32)).to(query.dtype)
    if options.dropout:
        weights = F.dropout(weights, p=options.dropout)
    return torch.matmul(weights, value)


# ---- variable-length kernels (CUDA) -------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def cu_seqlens(sample_lengths: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """[samples + 1] int32 offsets of the samples in the packed sequence, on `device`: built once per
    microbatch (the first layer's call) and reused by the other layers, so they copy nothing to the device."""
    return torch.tensor([0, *itertools.accumulate(sample_lengths)], dtype=torch.int32, device=device)


def _attend_varlen(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    sample_lengths: tuple[int, ...],
    options: AttentionOptions,
    kernel: str,
) -> torch.Tensor:
    if query.shape[0] != 1:
        raise ValueError(f"the {kernel} kernel takes one packed sequence, got a batch of {query.shape[0]}")
    # [1, heads, tokens, head_dim] -> [tokens, heads, head_dim]
    query, key, value = (tensor[0].transpose(0, 1) for tensor in (query, key, value))
    offsets = cu_seqlens(sample_lengths, query.device)
    longest = max(sample_lengths)
    # Flash attention's window counts the keys left of the query; transformers' counts the query too.
    # A window no sample fills is no window (flash's local-attention path would only cost time).
    window = options.sliding_window
    left = window - 1 if window is not None and window < longest else -1
    if kernel == "flash_attn":
        flash_varlen = _flash_attn_varlen()
        if flash_varlen is None:
            raise ValueError("kernel 'flash_attn' needs the flash-attn package")
        output = flash_varlen(
            query, key, value, offsets, offsets, longest, longest, dropout_p=options.dropout,
            softmax_scale=options.scaling, causal=True, window_size=(left, 0), softcap=options.softcap or 0.0,
        )
    else:
        torch_varlen = _torch_varlen(_device_index(query.device))
        if torch_varlen is None:
            raise ValueError("kernel 'torch_varlen' needs torch.nn.attention.varlen (with scale and window_size) on a CUDA sm80+ device")
        if options.softcap is not None or options.dropout:
            raise ValueError("kernel 'torch_varlen' computes neither a logit softcap nor attention dropout")
        function, takes_gqa = torch_varlen
        grouped = query.shape[1] != key.shape[1]
        if grouped and not takes_gqa:
            groups = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        extra = {"enable_gqa": True} if grouped and takes_gqa else {}
        output = function(
            query.contiguous(), key.contiguous(), value.contiguous(), offsets, offsets, longest, longest,
            scale=options.scaling, window_size=(left, 0), **extra,
        )
    return output.unsqueeze(0)


def _device_index(device: torch.device) -> int:
    if device.index is not None or device.type != "cuda":
        return device.index or 0
    return torch.cuda.current_device()


@functools.lru_cache(maxsize=1)
def _flash_attn_varlen():
    """flash_attn.flash_attn_varlen_func when flash-attn (2.6+, for softcap) is installed, else None."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    if "softcap" not in inspect.signature(flash_attn_varlen_func).parameters:
        return None
    return flash_attn_varlen_func


@functools.lru_cache(maxsize=8)
def _torch_varlen(device_index: int):
    """(varlen_attn, whether it takes enable_gqa) where torch has varlen_attn with scale and
    window_size (torch 2.10+; 2.9's took is_causal instead) and the device runs flash attention (sm80+); else None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    parameters = inspect.signature(varlen_attn).parameters
    if not {"scale", "window_size"} <= parameters.keys():
        return None
    if not torch.backends.cuda.is_flash_attention_available() or torch.cuda.get_device_capability(device_index) < (8, 0):
        return None
    return varlen_attn, "enable_gqa" in parameters


transformers.AttentionInterface.register(PACKED_ATTENTION, packed_attention)
