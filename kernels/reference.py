"""Plain-torch definitions of the LoRA linear layer: the test oracle and the torch backend's ops.

Every Triton kernel in this package has its contract written here in unfused torch. The Triton
kernels and these functions take the same arguments, so tests can run both on the same inputs
(in float64 for the oracle) and the CPU backend can run these directly.
"""

from __future__ import annotations

import torch


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """alpha / r, or alpha / sqrt(r) with rsLoRA (as PEFT defines them)."""
    return lora_alpha / (r**0.5) if use_rslora else lora_alpha / r


_WORD = 0xFFFFFFFF
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85


def _mul_hi_lo(a: torch.Tensor, constant: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of a * constant for 32-bit words held in int64 (split in 16-bit
    halves so that no product overflows int64)."""
    high_half = (a >> 16) * constant
    low_half = (a & 0xFFFF) * constant
    return (high_half + (low_half >> 16)) >> 16, (((high_half & 0xFFFF) << 16) + low_half) & _WORD


def philox_words(seed: int, counters: torch.Tensor, keys: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """The four output words of Philox-4x32-10 with key (seed_lo, seed_hi) and counter
    (counter_lo, counter_hi, key_lo, key_hi), int64 counters and keys broadcasting together, as
    Triton's tl.philox computes them (with keys None: 0, tl.randint4x's counter for int64 offsets)."""
    c0, c1 = counters & _WORD, (counters >> 32) & _WORD
    if keys is None:
        c2 = c3 = torch.zeros_like(counters)
    else:
        c0, c1, keys = torch.broadcast_tensors(c0, c1, keys)
        c2, c3 = keys & _WORD, (keys >> 32) & _WORD
    k0, k1 = seed & _WORD, (seed >> 32) & _WORD
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(c2, _PHILOX_ROUND_B)
        hi_a, lo_a = _mul_hi_lo(c0, _PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY_A) & _WORD, (k1 + _PHILOX_KEY_B) & _WORD
    return c0, c1, c2, c3


def _uniform(words: torch.Tensor) -> torch.Tensor:
    """Triton's uint_to_uniform_float: the word as int32, negatives complemented, times 2^-31 in fp32."""
    as_int32 = torch.where(words >= 2**31, _WORD - words, words)
    return as_int32.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def torch_keep_mask(
    seed: int,
    shape: tuple[int, ...],
    dropout_p: float | torch.Tensor,
    device: torch.device,
    row_positions: torch.Tensor | None = None,
    row_keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dropout keep-mask over X viewed as [rows, cols], regenerated from a seed rather than stored.

    Bit for bit the Triton kernels' mask (kernels/utils.keyed_keep_mask) and the CUDA backend's:
    element (row, col) keeps when word col % 4 of Philox with key `seed` and counter
    (position * ceil(cols / 4) + col // 4, key), as a uniform in [0, 1), is >= p, so every backend
    draws the same dropout. A row's position and key are row_positions[row] and row_keys[row]
    (int64 [rows]; by default the row index and 0): rows named by (sample, token) keep their mask
    wherever the sample is packed. dropout_p may be a tensor broadcasting against shape (a
    probability per row, for multi-adapter batches).
    """
    rows = 1
    for size in shape[:-1]:
        rows *= size
    cols = shape[-1]
    quads = (cols + 3) // 4
    if row_positions is None:
        row_positions = torch.arange(rows, dtype=torch.int64, device=device)
    counters = row_positions.to(device=device, dtype=torch.int64)[:, None] * quads + torch.arange(quads, device=device)
    keys = None if row_keys is None else row_keys.to(device=device, dtype=torch.int64)[:, None]
    uniforms = torch.stack([_uniform(word) for word in philox_words(int(seed), counters, keys)], dim=-1)
    uniforms = uniforms.view(rows, quads * 4)[:, :cols].reshape(shape)
    if torch.is_tensor(dropout_p):
        dropout_p = dropout_p.to(torch.float32)
    return uniforms >= dropout_p


def dropout_input(x: torch.Tensor, keep: torch.Tensor | None, dropout_p: float) -> torch.Tensor:
    if keep is None or dropout_p == 0.0:
        return x
    return x * keep.to(x.dtype) / (1.0 - dropout_p)


def lora_down_reference(x: torch.Tensor, lora_A: torch.Tensor, keep: torch.Tensor | None, dropout_p: float) -> torch.Tensor:
    """S = dropout(X) A^T, X [M, K], A [r, K] -> S [M, r]."""
    return dropout_input(x, keep, dropout_p) @ lora_A.t()


def lora_dy_reference(dy: torch.Tensor, lora_B: torch.Tensor, s: torch.Tensor, scaling: float):
    """dS = scaling * dY B and dB = scaling * dY^T S, dY [M, N], B [N, r], S [M, r]."""
    return scaling * (dy @ lora_B), scaling * (dy.t() @ s)


def lora_dx_da_reference(
    ds: torch.Tensor, lora_A: torch.Tensor, x: torch.Tensor, keep: torch.Tensor | None, dropout_p: float
):
    """LoRA part of dX = dropout'(dS A) and dA = dS^T dropout(X)."""
    return dropout_input(ds @ lora_A, keep, dropout_p), ds.t() @ dropout_input(x, keep, dropout_p)


def lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    keep: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Y = X W^T + b + scaling * dropout(X) A^T B^T, unfused; autograd gives every gradient.

    `keep` is the dropout keep-mask over X viewed as [tokens, in_features].
    """
    x2d = x.reshape(-1, x.shape[-1])
    y = x2d @ weight.t()
    if bias is not None:
        y = y + bias
    y = y + scaling * (lora_down_reference(x2d, lora_A, keep, dropout_p) @ lora_B.t())
    return y.reshape(*x.shape[:-1], weight.shape[0])


def nf4_block_absmax_reference(weight) -> torch.Tensor:
    """fp32 absmax of every block of an `NF4Weight`; with double quantization
    dynamic[qabsmax] * nested_absmax[block // 256], rounded to fp32, then + offset (two roundings)."""
    if not weight.double_quant:
        return weight.absmax
    scale = weight.nested_code[weight.absmax.long()]
    blocks, nested_blocksize = scale.numel(), weight.nested_blocksize
    padded = torch.nn.functional.pad(scale, (0, -blocks % nested_blocksize))
    scaled = (padded.view(-1, nested_blocksize) * weight.nested_absmax[:, None]).view(-1)[:blocks]
    return scaled + weight.offset


def nf4_dequantize_reference(weight) -> torch.Tensor:
    """An `NF4Weight` dequantized in plain torch: code[index] * absmax[block] in fp32, then cast to
    weight.dtype (rounded to nearest even). The CPU backend, and the Triton kernel's contract."""
    # Both elements of a byte in one lookup: a 256 x 2 table of (code[high nibble], code[low nibble]).
    byte_values = torch.arange(256, device=weight.code.device)
    pair_table = torch.stack((weight.code[byte_values >> 4], weight.code[byte_values & 15]), dim=1)
    values = pair_table[weight.packed.long()].view(-1)
    absmax = nf4_block_absmax_reference(weight)
    padded = torch.nn.functional.pad(values, (0, absmax.numel() * weight.blocksize - values.numel()))
    scaled = (padded.view(-1, weight.blocksize) * absmax[:, None]).view(-1)[: weight.numel()]
    return scaled.to(weight.dtype).view(weight.shape)
