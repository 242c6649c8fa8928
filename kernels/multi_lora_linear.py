"""Multi-adapter fused LoRA linear: one base GEMM over all tokens of a packed microbatch, and each
segment's own adapter on the LoRA path, fused as in the single-adapter op (lora_linear.py):

forward   S  = multi_lora_down(X)                per segment dropout_a(X) A_a^T  (Triton)
          Y  = multi_lora_up(S) + bias           per segment scaling_a S B_a^T   (Triton, Y written once)
          Y += X W^T                             cuBLAS addmm, beta = 1
backward  dS, dB_cat = multi_lora_dy(dY)         one pass over dY              (Triton)
          dX, dA_cat = multi_lora_dx_da(dS, X)   mask regenerated per tile     (Triton)
          dX += dY W                             cuBLAS addmm, beta = 1

An adapter's scaling and dropout are its own (alpha / r or alpha / sqrt(r)), whatever it is
mixed with, and dropout touches only the LoRA path, with one seed for forward and backward.

An NF4 base (`kernels.nf4.NF4Weight`, QLoRA) is handled as in the single-adapter op: dequantized
into the shared workspace right before `Y += X W^T`, and again in backward right before
`dX += dY W`; the dequantized weight is never saved between them.
"""

from __future__ import annotations

import torch

from .lora_linear import _base_weight, as_rows, check_dtypes_and_devices, compute_adapters, lora_backward, resolve_backend
from .nf4 import NF4Weight
from .reference import torch_keep_mask
from .segments import SegmentMeta
from .utils import new_dropout_seed


class _TorchMultiOps:
    """The torch backend: a loop over segments with the reference ops, the mask regenerated from the seed."""

    @staticmethod
    def _dropout_scale(x: torch.Tensor, meta: SegmentMeta, seed: int):
        """keep / (1 - p_a) per element, or None without dropout: dropout_a(X) = X * this."""
        if not meta.has_dropout:
            return None
        row_p = meta.row_dropout_p(x.device)[:, None]
        keep = torch_keep_mask(seed, tuple(x.shape), row_p, x.device, meta.dropout_position, meta.dropout_key)
        return (keep / (1.0 - row_p)).to(x.dtype)

    @staticmethod
    def _dropout(x, scale):
        return x if scale is None else x * scale

    @classmethod
    def down(cls, x, lora_A_cat, meta, seed):
        x_dropped = cls._dropout(x, cls._dropout_scale(x, meta, seed))
        s = torch.zeros((x.shape[0], meta.max_rank), dtype=x.dtype, device=x.device)
        for adapter, start, length in meta.segments:
            rank, offset = meta.ranks[adapter], meta.rank_offsets[adapter]
            rows = slice(start, start + length)
            s[rows, :rank] = x_dropped[rows] @ lora_A_cat[offset : offset + rank].t()
        return s

    @staticmethod
    def up(s, lora_B_cat, bias, meta):
        y = torch.zeros((s.shape[0], lora_B_cat.shape[0]), dtype=s.dtype, device=s.device)
        for adapter, start, length in meta.segments:
            rank, offset = meta.ranks[adapter], meta.rank_offsets[adapter]
            rows = slice(start, start + length)
            y[rows] = meta.scalings[adapter] * (s[rows, :rank] @ lora_B_cat[:, offset : offset + rank].t())
        if bias is not None:
            y += bias
        return y

    @staticmethod
    def dy(dy, lora_B_cat, s, meta):
        ds = torch.zeros_like(s)
        db = torch.zeros((lora_B_cat.shape[0], meta.total_rank), dtype=torch.float32, device=dy.device)
        for adapter, start, length in meta.segments:
            rank, offset, scaling = meta.ranks[adapter], meta.rank_offsets[adapter], meta.scalings[adapter]
            rows = slice(start, start + length)
            ds[rows, :rank] = scaling * (dy[rows] @ lora_B_cat[:, offset : offset + rank])
            db[:, offset : offset + rank] += scaling * (dy[rows].t() @ s[rows, :rank]).float()
        return ds, db

    @classmethod
    def dx_da(cls, ds, lora_A_cat, x, meta, seed, dx_out):
        scale = cls._dropout_scale(x, meta, seed)
        x_dropped = cls._dropout(x, scale)
        da = torch.zeros((meta.total_rank, x.shape[1]), dtype=torch.float32, device=x.device)
        dx_lora = torch.zeros_like(x) if dx_out is not None else None
        for adapter, start, length in meta.segments:
            rank, offset = meta.ranks[adapter], meta.rank_offsets[adapter]
            rows = slice(start, start + length)
            da[offset : offset + rank] += (ds[rows, :rank].t() @ x_dropped[rows]).float()
            if dx_lora is not None:
                dx_lora[rows] = ds[rows, :rank] @ lora_A_cat[offset : offset + rank]
        if dx_out is not None:
            dx_out.copy_(cls._dropout(dx_lora, scale))
        return da


class _TritonMultiOps:
    @staticmethod
    def down(x, lora_A_cat, meta, seed):
        from .multi_lora_down import multi_lora_down

        return multi_lora_down(x, lora_A_cat, meta, seed)

    @staticmethod
    def up(s, lora_B_cat, bias, meta):
        from .multi_lora_up import multi_lora_up

        return multi_lora_up(s, lora_B_cat, bias, meta)

    @staticmethod
    def dy(dy, lora_B_cat, s, meta):
        from .multi_lora_dy import multi_lora_dy

        return multi_lora_dy(dy, lora_B_cat, s, meta)

    @staticmethod
    def dx_da(ds, lora_A_cat, x, meta, seed, dx_out):
        from .multi_lora_dx_da import multi_lora_dx_da

        return multi_lora_dx_da(ds, lora_A_cat, x, meta, seed, dx_out)


_OPS = {"torch": _TorchMultiOps, "triton": _TritonMultiOps}


def _dx_da(ops, ds, lora_A_cat, x2d, meta, seed, need_dx):
    """(the LoRA part of dX or None, dA_cat in fp32), as lora_backward takes them."""
    dx = torch.empty_like(x2d, memory_format=torch.contiguous_format) if need_dx else None
    return dx, ops.dx_da(ds, lora_A_cat, x2d, meta, seed, dx)


class MultiLoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, weight, bias, lora_A_cat, lora_B_cat, meta, backend, dropout_seed):
        """x2d is [tokens, in_features], reshaped by the caller (see LoRALinearFunction.forward)."""
        ops = _OPS[backend]
        ctx.adapter_dtype = lora_A_cat.dtype
        lora_A_cat, lora_B_cat = compute_adapters(x2d, lora_A_cat, lora_B_cat)
        if not meta.has_dropout:
            seed = 0
        else:
            seed = int(new_dropout_seed()) if dropout_seed is None else dropout_seed
        s = ops.down(x2d, lora_A_cat, meta, seed)
        y = ops.up(s, lora_B_cat, bias, meta)
        quantized_weight = weight if isinstance(weight, NF4Weight) else None
        weight = _base_weight(weight, backend)
        y.addmm_(x2d, weight.t())
        # An NF4 weight is kept as such (a non-tensor on ctx), never its dequantized workspace.
        ctx.save_for_backward(x2d, None if quantized_weight is not None else weight, lora_A_cat, lora_B_cat, s)
        ctx.quantized_weight = quantized_weight
        ctx.meta, ctx.seed, ctx.backend, ctx.has_bias = meta, seed, backend, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        ops, meta = _OPS[ctx.backend], ctx.meta
        grads = lora_backward(
            ctx,
            ctx.saved_tensors,
            dy,
            lambda dy2d, lora_B_cat, s: ops.dy(dy2d, lora_B_cat, s, meta),
            lambda ds, lora_A_cat, x2d, need_dx: _dx_da(ops, ds, lora_A_cat, x2d, meta, ctx.seed, need_dx),
        )
        return *grads, None, None, None


def fused_multi_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor | NF4Weight,
    bias: torch.Tensor | None,
    lora_A_cat: torch.Tensor,
    lora_B_cat: torch.Tensor,
    meta: SegmentMeta,
    backend: str = "auto",
    dropout_seed: int | None = None,
) -> torch.Tensor:
    """Y = X W^T (+ bias) + per segment scaling_a * dropout_a(X) A_a^T B_a^T.

    x: [..., in_features], its tokens (leading dims flattened in order) laid out as meta's
    segments; weight: [out_features, in_features], a tensor or a frozen `kernels.nf4.NF4Weight`
    (its compute dtype must equal x.dtype); lora_A_cat: [sum of ranks, in_features] and
    lora_B_cat: [out_features, sum of ranks], the adapters' A and B concatenated in adapter order
    (see segments.py), in x's dtype or another (e.g. fp32 on a 16-bit base, see
    lora_linear.compute_adapters). dropout_seed: the Philox seed of the dropout masks (0 <= seed < 2**31);
    None draws one from torch's generator.
    """
    if len(weight.shape) != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"x.shape[-1] must equal in_features={in_features}, got x of shape {tuple(x.shape)}")
    tokens = x.numel() // in_features
    if tokens != meta.num_tokens:
        raise ValueError(
            f"the batch's segment lengths sum to {meta.num_tokens} tokens but x holds {tokens} "
            f"(x of shape {tuple(x.shape)})"
        )
    if tuple(lora_A_cat.shape) != (meta.total_rank, in_features):
        raise ValueError(f"lora_A_cat must be [{meta.total_rank}, {in_features}], got {tuple(lora_A_cat.shape)}")
    if tuple(lora_B_cat.shape) != (out_features, meta.total_rank):
        raise ValueError(f"lora_B_cat must be [{out_features}, {meta.total_rank}], got {tuple(lora_B_cat.shape)}")
    check_dtypes_and_devices(x, weight, bias, lora_A_cat, lora_B_cat)
    if meta.block_adapter.device != x.device:
        raise ValueError(f"the segment metadata is on {meta.block_adapter.device} but x is on {x.device}")
    if dropout_seed is not None and not 0 <= dropout_seed < 2**31 - 1:
        raise ValueError(f"dropout_seed must be in [0, 2**31 - 1), got {dropout_seed}")
    resolved = resolve_backend(backend, x.device)
    if resolved not in _OPS:
        raise ValueError(f"backend={resolved!r} has no multi-adapter kernels; use 'triton', 'torch' or 'auto'")
    if tokens == 0:
        return torch.nn.functional.linear(x, _base_weight(weight, resolved), bias)
    y = MultiLoRALinearFunction.apply(as_rows(x), weight, bias, lora_A_cat, lora_B_cat, meta, resolved, dropout_seed)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], out_features)
