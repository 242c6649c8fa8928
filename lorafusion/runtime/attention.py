"""Attention for packed microbatches: each packed sample attends causally to itself only.

Registered with transformers' AttentionInterface as "lorafusion_packed" and selected by the
runtime's model loader. Called with `sample_lengths` (the packed samples' token counts, in order),
it runs causal scaled-dot-product attention per sample, so the work is that of the samples run
alone (a block-diagonal mask over the whole microbatch would cost tokens² per head and keep a
tokens² mask alive). Without `sample_lengths` (e.g. generation) it is transformers' SDPA attention.
"""

from __future__ import annotations

import torch
import transformers
from torch.nn import functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward

PACKED_ATTENTION = "lorafusion_packed"


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sample_lengths: tuple[int, ...] | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query [batch, heads, tokens, head_dim], key/value [batch, kv_heads, tokens, head_dim] ->
    ([batch, tokens, heads, head_dim], None), as transformers' attention functions return."""
    if sample_lengths is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if sum(sample_lengths) != query.shape[2]:
        raise ValueError(f"sample_lengths sum to {sum(sample_lengths)} but the microbatch has {query.shape[2]} tokens")
    grouped = getattr(module, "num_key_value_groups", 1) > 1
    outputs, start = [], 0
    for length in sample_lengths:
        span = slice(start, start + length)
        outputs.append(
            F.scaled_dot_product_attention(
                query[:, :, span], key[:, :, span], value[:, :, span],
                dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=grouped,
            )
        )
        start += length
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


transformers.AttentionInterface.register(PACKED_ATTENTION, packed_attention)
