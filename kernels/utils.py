"""Helpers shared by the Triton kernels and their launchers."""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a Linux dependency
    triton = None
    tl = None

MAX_RANK = 256


def is_interpreting() -> bool:
    """True under TRITON_INTERPRET=1, where kernels run on the CPU through numpy."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_usable(device: torch.device) -> bool:
    """Triton kernels run on CUDA devices, or anywhere under the interpreter."""
    if triton is None:
        return False
    return device.type == "cuda" or is_interpreting()


def require_triton(device: torch.device) -> None:
    if triton is None:
        raise RuntimeError("backend='triton' needs the triton package, which is not installed")
    if not triton_usable(device):
        raise RuntimeError(
            f"backend='triton' needs a CUDA device (or TRITON_INTERPRET=1 for the interpreter); "
            f"the input is on {device}. Use backend='torch' or backend='auto'."
        )


def rank_block(rank: int) -> int:
    """Padded rank tile: tl.dot needs each dimension >= 16 and a power of two."""
    return max(16, triton.next_power_of_2(rank))


def autotune_configs(configs: list) -> list:
    # The interpreter fails with more than one config ('0 active drivers'): it gets the first.
    return configs[:1] if is_interpreting() else configs


def upcast_dots(dtype: torch.dtype) -> bool:
    """The interpreter multiplies bf16 bit patterns in tl.dot and gets bf16 arithmetic wrong: there,
    bf16 tiles are converted to fp32 before any math. On a GPU bf16 stays on the tensor cores."""
    return is_interpreting() and dtype == torch.bfloat16


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use TF32 only where torch's own matmuls do, so both backends agree."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not is_interpreting():
        return "tf32"
    return "ieee"


def new_dropout_seed(device: torch.device | None = None) -> torch.Tensor:
    """A Philox seed as a 0-d int64 CPU tensor, drawn from torch's CPU generator: torch.manual_seed
    makes dropout repeatable, nothing is read back from the GPU (no host-device sync per layer),
    and under torch.compile it is drawn inside the graph, fresh at every call. `device` is unused:
    the seed lives on the host whatever the data's device."""
    del device
    return torch.randint(0, 2**31 - 1, (), dtype=torch.int64)


# Shared memory a config may plan for when no GPU tells us its own limit: the per-block opt-in
# maximum of sm_86/sm_89 (the smallest of the architectures we target; sm_80 has 163 KiB and
# sm_90 227 KiB). Configs that fit it fit everywhere.
SMALLEST_SHARED_MEMORY = 101_376
# fp32 accumulator elements a thread may hold in registers before ptxas starts spilling (of 255
# registers, the rest hold addresses, operands and the dropout mask).
MAX_ACCUMULATOR_PER_THREAD = 128


def shared_memory_limit() -> int:
    if torch.cuda.is_available() and not is_interpreting():
        properties = torch.cuda.get_device_properties(torch.cuda.current_device())
        return getattr(properties, "shared_memory_per_block_optin", SMALLEST_SHARED_MEMORY)
    return SMALLEST_SHARED_MEMORY


def prune_by_footprint(footprint):
    """An autotune `early_config_prune` keeping the configs whose (shared bytes, fp32 accumulator
    elements) estimate, from footprint(config, element_bytes, **launch_constexprs), fits the GPU:
    a wide rank tile must not leave a launch point with no config that compiles and fits. When
    none fits, the smallest is kept (the ahead-of-time compile test checks it really fits)."""

    def prune(configs, named_args, **kwargs):
        element_bytes = next(
            arg.element_size() for name, arg in named_args.items() if name.endswith("_ptr") and torch.is_tensor(arg)
        )
        limit = shared_memory_limit()
        estimates = [(footprint(config, element_bytes, **kwargs), config) for config in configs]
        fitting = [
            config
            for (shared, accumulator), config in estimates
            if shared <= limit and accumulator <= MAX_ACCUMULATOR_PER_THREAD * 32 * config.num_warps
        ]
        if fitting:
            return fitting
        return [min(estimates, key=lambda item: item[0])[1]]

    return prune


def m_bucket(num_rows: int) -> int:
    """Token counts grouped for autotuning keys: a new microbatch length reuses the tuned config of
    its power-of-two bucket instead of benchmarking again."""
    return triton.next_power_of_2(max(num_rows, 1))


if triton is not None:

    @triton.jit
    def keyed_keep_mask(seed, positions, keys, col_start, num_cols, dropout_p, BLOCK_K: tl.constexpr):
        """Dropout keep-mask of the [rows, col_start + arange(BLOCK_K)] tile of a row-major
        [*, num_cols] matrix whose rows are named by (key, position) (col_start and BLOCK_K
        multiples of 4; positions and keys: int64 [rows]).

        Element (row, col) keeps when word col % 4 of Philox-4x32-10 with key `seed` and counter
        (position * ceil(num_cols / 4) + col // 4, key), each an int64 in two 32-bit words, as a
        uniform in [0, 1), is >= p: one Philox call yields four elements. The mask is a function
        of the element's logical name, so every kernel that touches it, with any tiling,
        regenerates the same bit (forward and backward agree without storing a mask), a sample
        named by its own key and its token positions draws the same mask wherever it is packed,
        and the CUDA and torch backends compute the same bits (csrc/philox.cuh,
        reference.torch_keep_mask). With key 0 the counter is Triton's tl.randint4x offset.
        """
        quads = col_start // 4 + tl.arange(0, BLOCK_K // 4)
        counters = positions[:, None].to(tl.int64) * ((num_cols + 3) // 4) + quads[None, :]
        row_keys = keys[:, None].to(tl.int64) + tl.zeros_like(counters)
        w0, w1, w2, w3 = tl.philox(
            seed, counters.to(tl.uint32), (counters >> 32).to(tl.uint32), row_keys.to(tl.uint32), (row_keys >> 32).to(tl.uint32)
        )
        u0 = tl.uint_to_uniform_float(w0)
        u1 = tl.uint_to_uniform_float(w1)
        u2 = tl.uint_to_uniform_float(w2)
        u3 = tl.uint_to_uniform_float(w3)
        # join(join(u0, u2), join(u1, u3))[.., q, j, i] is word 2i + j, which row-major flattening
        # puts at column 4q + 2j + i: column 4q + w holds word w.
        uniforms = tl.reshape(tl.join(tl.join(u0, u2), tl.join(u1, u3)), (positions.shape[0], BLOCK_K))
        return uniforms >= dropout_p

    @triton.jit
    def keep_mask(seed, rows, col_start, num_cols, dropout_p, BLOCK_K: tl.constexpr):
        """The keep-mask of rows named by their index alone (key 0): a single adapter's batch."""
        return keyed_keep_mask(seed, rows, tl.zeros_like(rows), col_start, num_cols, dropout_p, BLOCK_K)

    @triton.jit
    def keyed_keep_factor(seed, positions, keys, col_start, num_cols, dropout_p, BLOCK_K: tl.constexpr):
        """keyed_keep_mask as a 0/1 fp32 tile (see keep_factor)."""
        return keyed_keep_mask(seed, positions, keys, col_start, num_cols, dropout_p, BLOCK_K).to(tl.float32)

    @triton.jit
    def keep_factor(seed, rows, col_start, num_cols, dropout_p, BLOCK_K: tl.constexpr):
        """The keep-mask as a 0/1 fp32 tile. Kernels multiply by it rather than select with the i1
        tile: an i1 tile used in two layouts goes through shared memory, which cannot hold 1-bit
        elements (the compile fails on tensor-core dots), and multiplying keeps what PEFT's
        dropout does with a dropped NaN or inf (NaN * 0 = NaN) instead of silently zeroing it."""
        return keep_mask(seed, rows, col_start, num_cols, dropout_p, BLOCK_K).to(tl.float32)

    @triton.jit
    def tile_dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b, acc, input_precision=PRECISION)
