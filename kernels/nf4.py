"""NF4 (4-bit NormalFloat) base weights in bitsandbytes' layout: storage, quantization, and a
Triton dequantization kernel that is bit-exact to `bitsandbytes.functional.dequantize_4bit`.

Layout (bitsandbytes' `quantize_4bit(..., quant_type="nf4")`): the weight is flattened row-major
and cut into blocks of `blocksize` elements (the last block may be partial); each block keeps its
absolute maximum in fp32 and each element a 4-bit index into the 16-value NF4 table, two indices
per byte with the first element in the high nibble. With double quantization the fp32 absmax
vector is stored as `absmax - mean(absmax)`, 8-bit blockwise (block 256) on bitsandbytes'
signed dynamic map, plus the fp32 mean (`offset`) and one fp32 absmax per 256 absmax values.

Dequantized value = code[index] * absmax[block], multiplied in fp32 then rounded to the compute
dtype; with double quantization absmax[block] = dynamic[qabsmax] * nested_absmax[block // 256]
+ offset, a multiply and a separate add (never a fused multiply-add, which rounds differently).

Quantization is done once per weight and runs in plain torch; dequantization runs at every
forward and backward of the LoRA layer and has a Triton kernel (CUDA, or the interpreter).
"""

from __future__ import annotations

import torch
from torch import nn

from . import reference
from .utils import autotune_configs, require_triton, triton, tl, triton_usable

NF4_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The 16 NF4 levels: quantiles of N(0, 1) scaled to [-1, 1] with an exact zero (QLoRA, Dettmers
# et al. 2023), written as the fp32 values bitsandbytes stores, so the tables are equal bit for bit.
NF4_LEVELS = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)


def nf4_code(device: torch.device | str | None = None) -> torch.Tensor:
    """The NF4 table, fp32 [16], sorted ascending (index 7 is exactly zero)."""
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


def dynamic_code(device: torch.device | str | None = None) -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (fp32 [256], sorted), used for the absmax of absmax.

    For each exponent e in 0..6 the 2**e midpoints of an even split of [0.1, 1], times 10**(e-6),
    with both signs, plus 0 and 1; computed with the same fp32 arithmetic as bitsandbytes so the
    maps agree bit for bit.
    """
    values = [0.0, 1.0]
    for exponent in range(7):
        edges = torch.linspace(0.1, 1.0, 2**exponent + 1, dtype=torch.float32)
        midpoints = (edges[:-1] + edges[1:]) / 2.0
        magnitude = 10.0 ** (exponent - 6)
        values += (magnitude * midpoints).tolist() + (-magnitude * midpoints).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32, device=device)


def check_blocksize(blocksize: object) -> None:
    if isinstance(blocksize, bool) or blocksize not in NF4_BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {NF4_BLOCKSIZES} (as in bitsandbytes), got {blocksize!r}")


class NF4Weight(nn.Module):
    """A frozen 2-D weight [out_features, in_features] stored in NF4, bitsandbytes' byte layout.

    Buffers (they follow `.to(device)` and appear in `state_dict`): `packed` uint8
    [ceil(numel / 2)], `absmax` (fp32 [blocks], or uint8 [blocks] when double-quantized), `code`
    fp32 [16]; with double quantization also `nested_absmax` fp32 [ceil(blocks / 256)],
    `nested_code` fp32 [256] and `offset` fp32 []. `dtype` is the compute dtype dequantization
    produces (bitsandbytes' QuantState.dtype); `.to(dtype)` changes it and never touches the
    stored statistics. Build one with `quantize_nf4`, or from bitsandbytes with
    `lorafusion.qlora.nf4_from_bnb`.
    """

    def __init__(
        self,
        packed: torch.Tensor,
        absmax: torch.Tensor,
        shape: tuple[int, int],
        dtype: torch.dtype,
        blocksize: int = 64,
        code: torch.Tensor | None = None,
        nested_absmax: torch.Tensor | None = None,
        nested_code: torch.Tensor | None = None,
        offset: torch.Tensor | None = None,
        nested_blocksize: int = NESTED_BLOCKSIZE,
    ) -> None:
        super().__init__()
        check_blocksize(blocksize)
        if len(shape) != 2 or min(shape) <= 0:
            raise ValueError(f"shape must be [out_features, in_features] with both positive, got {tuple(shape)}")
        if dtype not in COMPUTE_DTYPES:
            raise TypeError(f"dtype (the compute dtype) must be float32, float16 or bfloat16, got {dtype}")
        numel = shape[0] * shape[1]
        blocks = -(-numel // blocksize)
        packed = packed.reshape(-1)
        if packed.dtype != torch.uint8 or packed.numel() != (numel + 1) // 2:
            raise ValueError(
                f"packed must be uint8 with ceil(numel / 2) = {(numel + 1) // 2} bytes for shape {tuple(shape)}, "
                f"got {packed.dtype} with {packed.numel()}"
            )
        double_quant = nested_absmax is not None
        if double_quant and (offset is None or absmax.dtype != torch.uint8):
            raise ValueError("double quantization needs uint8 absmax, nested_absmax and offset together")
        if not double_quant and absmax.dtype != torch.float32:
            raise ValueError(f"absmax must be float32 without double quantization, got {absmax.dtype}")
        if absmax.numel() != blocks:
            raise ValueError(f"absmax must have ceil(numel / blocksize) = {blocks} entries, got {absmax.numel()}")
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.blocksize = blocksize
        self.nested_blocksize = nested_blocksize
        self.register_buffer("packed", packed)
        self.register_buffer("absmax", absmax.reshape(-1))
        self.register_buffer("code", nf4_code(packed.device) if code is None else code.to(torch.float32))
        if double_quant:
            if nested_absmax.numel() != -(-blocks // nested_blocksize):
                raise ValueError(
                    f"nested_absmax must have ceil({blocks} / {nested_blocksize}) entries, got {nested_absmax.numel()}"
                )
            self.register_buffer("nested_absmax", nested_absmax.reshape(-1).to(torch.float32))
            self.register_buffer(
                "nested_code", dynamic_code(packed.device) if nested_code is None else nested_code.to(torch.float32)
            )
            self.register_buffer("offset", offset.reshape(()).to(torch.float32))
        else:
            self.nested_absmax = self.nested_code = self.offset = None

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def dim(self) -> int:
        return 2

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def nbytes(self) -> int:
        """Bytes of everything stored: codes, statistics and tables."""
        return sum(buffer.numel() * buffer.element_size() for buffer in self.buffers())

    def with_compute_dtype(self, dtype: torch.dtype) -> NF4Weight:
        """The same stored weight (buffers shared, not copied) dequantizing to `dtype`."""
        if dtype == self.dtype:
            return self
        return NF4Weight(
            self.packed,
            self.absmax,
            tuple(self.shape),
            dtype,
            blocksize=self.blocksize,
            code=self.code,
            nested_absmax=self.nested_absmax,
            nested_code=self.nested_code,
            offset=self.offset,
            nested_blocksize=self.nested_blocksize,
        )

    def _apply(self, fn, recurse=True):
        # nn.Module.to(dtype) would cast the fp32 statistics; here a dtype only changes the compute
        # dtype, and only the device is applied to the buffers. The probe shows what fn would do.
        probe = fn(torch.empty(0, dtype=self.dtype, device=self.device))
        if probe.is_floating_point() and probe.dtype in COMPUTE_DTYPES:
            self.dtype = probe.dtype
        for name, buffer in self._buffers.items():
            if buffer is not None:
                self._buffers[name] = buffer.to(probe.device)
        return self

    def dequantize(self, out: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
        """The weight [out_features, in_features] in `self.dtype`, equal bit for bit to
        bitsandbytes' `dequantize_4bit`. `out` (contiguous, that shape and dtype) is filled and
        returned instead of allocating. backend: "auto" (Triton on CUDA, torch elsewhere),
        "triton" or "torch"."""
        if out is not None and (out.shape != self.shape or out.dtype != self.dtype or not out.is_contiguous()):
            raise ValueError(
                f"out must be a contiguous {self.dtype} tensor of shape {tuple(self.shape)}, "
                f"got {out.dtype} {tuple(out.shape)} contiguous={out.is_contiguous()}"
            )
        if backend not in ("auto", "triton", "torch"):
            raise ValueError(f"backend must be one of ('auto', 'triton', 'torch'), got {backend!r}")
        if backend == "auto":
            backend = "triton" if self.device.type == "cuda" and triton_usable(self.device) else "torch"
        if backend == "triton":
            require_triton(self.device)
            return nf4_dequantize(self, out)
        result = reference.nf4_dequantize_reference(self)
        return result if out is None else out.copy_(result)

    def extra_repr(self) -> str:
        return (
            f"shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}, "
            f"double_quant={self.double_quant}"
        )


def _blockwise_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    blocks = -(-flat.numel() // blocksize)
    padded = torch.nn.functional.pad(flat.abs(), (0, blocks * blocksize - flat.numel()))
    return padded.view(blocks, blocksize).amax(dim=1)


def _nearest_level(scaled: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    # Ties go to the lower level (bucketize with right=False), as in bitsandbytes.
    return torch.bucketize(scaled, (levels[:-1] + levels[1:]) / 2.0, out_int32=True).to(torch.uint8)


def _scale_by_block(flat: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    # Multiply by the reciprocal (not divide), as bitsandbytes does: the codes then agree exactly.
    inverse = (1.0 / absmax.clamp(min=1e-38)).repeat_interleave(blocksize)[: flat.numel()]
    return torch.clamp(flat * inverse, -1.0, 1.0)


@torch.no_grad()
def quantize_nf4(
    weight: torch.Tensor,
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
) -> NF4Weight:
    """Quantize a 2-D floating-point weight to NF4 exactly as bitsandbytes' `quantize_4bit(w,
    quant_type="nf4", blocksize=..., compress_statistics=double_quant)` does (same bytes).

    compute_dtype: the dtype dequantization produces; defaults to the weight's dtype.
    """
    check_blocksize(blocksize)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must be a 2-D tensor [out_features, in_features], got {shape}")
    if weight.dtype not in COMPUTE_DTYPES:
        raise TypeError(f"weight.dtype must be float32, float16 or bfloat16 to quantize to NF4, got {weight.dtype}")
    flat = weight.detach().reshape(-1).to(torch.float32)
    if not torch.isfinite(flat).all():
        raise ValueError("weight contains inf or NaN; NF4 blockwise scaling needs finite values")
    code = nf4_code(weight.device)
    absmax = _blockwise_absmax(flat, blocksize)
    scaled = _scale_by_block(flat, absmax, blocksize)
    if scaled.numel() % 2:  # the unused low nibble of an odd-sized weight holds the code of 0.0
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    indices = _nearest_level(scaled, code)
    packed = (indices[0::2] << 4) | indices[1::2]
    nested = {}
    if double_quant:
        offset = absmax.mean()
        centered = absmax - offset
        nested_code = dynamic_code(weight.device)
        nested_absmax = _blockwise_absmax(centered, NESTED_BLOCKSIZE)
        absmax = _nearest_level(_scale_by_block(centered, nested_absmax, NESTED_BLOCKSIZE), nested_code)
        nested = {"nested_absmax": nested_absmax, "nested_code": nested_code, "offset": offset}
    return NF4Weight(
        packed,
        absmax,
        tuple(weight.shape),
        compute_dtype or weight.dtype,
        blocksize=blocksize,
        code=code,
        **nested,
    )


# ---------------------------------------------------------------------------------------------
# Triton dequantization
# ---------------------------------------------------------------------------------------------


# Triton is a Linux-only dependency; without it the torch backend dequantizes.
if triton is not None:

    def _dequantize_configs():
        return autotune_configs(
            [
                triton.Config({"BLOCK_BYTES": 1024}, num_warps=4),
                triton.Config({"BLOCK_BYTES": 2048}, num_warps=4),
                triton.Config({"BLOCK_BYTES": 4096}, num_warps=8),
                triton.Config({"BLOCK_BYTES": 8192}, num_warps=8),
            ]
        )


    @triton.autotune(configs=_dequantize_configs(), key=["num_bytes", "BLOCKSIZE", "DOUBLE_QUANT", "BF16_BITS"])
    @triton.jit
    def _nf4_dequantize_kernel(
        packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, out_ptr,
        num_elements, num_bytes,
        BLOCKSIZE: tl.constexpr,
        NESTED_BLOCK: tl.constexpr,
        DOUBLE_QUANT: tl.constexpr,
        BF16_BITS: tl.constexpr,
        BLOCK_BYTES: tl.constexpr,
    ):
        byte_idx = tl.program_id(0).to(tl.int64) * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
        byte_ok = byte_idx < num_bytes
        packed = tl.load(packed_ptr + byte_idx, mask=byte_ok, other=0).to(tl.int32)
        # Block sizes are even, so both elements of a byte share one block and one absmax.
        block = (byte_idx * 2) // BLOCKSIZE
        if DOUBLE_QUANT:
            qabsmax = tl.load(absmax_ptr + block, mask=byte_ok, other=0).to(tl.int32)
            scale = tl.load(nested_code_ptr + qabsmax) * tl.load(
                nested_absmax_ptr + block // NESTED_BLOCK, mask=byte_ok, other=0.0
            )
            absmax = scale + tl.load(offset_ptr)  # launched with fp fusion off: no FMA here
        else:
            absmax = tl.load(absmax_ptr + block, mask=byte_ok, other=0.0)
        high = tl.load(code_ptr + (packed >> 4)) * absmax
        low = tl.load(code_ptr + (packed & 15)) * absmax
        values = tl.interleave(high, low)
        elem_idx = tl.program_id(0).to(tl.int64) * (2 * BLOCK_BYTES) + tl.arange(0, 2 * BLOCK_BYTES)
        if BF16_BITS:
            # fp32 -> bf16 rounded to nearest even in integers, stored through an int16 view: exact on
            # the GPU and in the interpreter (whose own bf16 cast truncates). Values are finite.
            bits = values.to(tl.int32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            tl.store(out_ptr + elem_idx, (bits >> 16).to(tl.int16), mask=elem_idx < num_elements)
        else:
            tl.store(out_ptr + elem_idx, values.to(out_ptr.dtype.element_ty), mask=elem_idx < num_elements)


def nf4_dequantize(weight: NF4Weight, out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton launcher: dequantize `weight` into `out` (or a new tensor) in `weight.dtype`."""
    if out is None:
        out = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    bf16 = weight.dtype == torch.bfloat16
    target = out.view(torch.int16) if bf16 else out
    num_bytes = weight.packed.numel()
    grid = lambda meta: (triton.cdiv(num_bytes, meta["BLOCK_BYTES"]),)  # noqa: E731
    double_quant = weight.double_quant
    _nf4_dequantize_kernel[grid](
        weight.packed,
        weight.absmax,
        weight.code,
        weight.nested_absmax if double_quant else weight.absmax,
        weight.nested_code if double_quant else weight.code,
        weight.offset if double_quant else weight.code,
        target,
        weight.numel(),
        num_bytes,
        BLOCKSIZE=weight.blocksize,
        NESTED_BLOCK=weight.nested_blocksize,
        DOUBLE_QUANT=double_quant,
        BF16_BITS=bf16,
        enable_fp_fusion=False,
    )
    return out


_WORKSPACES: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def dequantize_workspace(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A [shape] view of one flat buffer per (device, dtype), grown to the largest weight asked
    for and reused by every NF4 layer, so no full-precision weight is allocated per call.

    The LoRA op dequantizes into it, uses it in one GEMM and is done with it before the next layer
    dequantizes: that holds on one CUDA stream (work is ordered) and on the CPU (synchronous).
    """
    numel = shape[0] * shape[1]
    key = (torch.device(device), dtype)
    buffer = _WORKSPACES.get(key)
    if buffer is None or buffer.numel() < numel:
        _WORKSPACES.pop(key, None)  # let the old buffer go before allocating the larger one
        buffer = torch.empty(numel, dtype=dtype, device=device)
        _WORKSPACES[key] = buffer
    return buffer[:numel].view(shape)


def release_workspaces() -> None:
    """Free the dequantization workspaces (they are re-created on the next NF4 forward)."""
    _WORKSPACES.clear()


__all__ = [
    "NF4_BLOCKSIZES",
    "NF4Weight",
    "dequantize_workspace",
    "dynamic_code",
    "nf4_code",
    "nf4_dequantize",
    "quantize_nf4",
    "release_workspaces",
]
