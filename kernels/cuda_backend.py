"""The CUDA C++ extension backend (`backend="cuda"`): the memory-bound LoRA ops and NF4
dequantization as hand-written kernels in csrc/, for machines where Triton cannot run.

The extension module `lorafusion_cuda` is used as installed when it was built ahead of time
(`LORAFUSION_BUILD_CUDA=1 pip install -e .`), otherwise built just in time with ninja from csrc/
on the first use of the backend and cached in torch's extensions directory. Nothing is built or
imported at `import lorafusion`; without a CUDA device and a CUDA build of torch, asking for the
backend raises a RuntimeError that says so.

Dropout: the kernels regenerate the keep-mask from (seed, row * in_features + col) with
Philox-4x32-10 (csrc/philox.cuh) laid out as Triton's `tl.rand` lays it out, so forward and
backward agree and the mask equals the Triton backend's for the same seed (`cuda_keep_mask`).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

EXTENSION_NAME = "lorafusion_cuda"
# csrc/ beside kernels/ in a source checkout (the editable install points here).
CSRC_DIR = Path(__file__).resolve().parent.parent / "csrc"
CUDA_SOURCES = ("lora_down_dy.cu", "lora_dx_da.cu", "lora_up_add.cu", "keep_mask.cu", "nf4_dequantize.cu")
BINDING_SOURCE = "bindings.cpp"
# Exactness: no --use_fast_math (it would change division and flush denormals); the NF4 kernel
# also uses __fmul_rn/__fadd_rn so that no multiply-add is ever contracted.
NVCC_FLAGS = ("-O3", "-std=c++20", "--expt-relaxed-constexpr")


def require_cuda_backend(device: torch.device) -> None:
    """Raises a RuntimeError naming what is missing when backend='cuda' cannot run on `device`."""
    if torch.version.cuda is None or not torch.cuda.is_available():
        raise RuntimeError(
            "backend='cuda' needs a CUDA device and a CUDA build of torch; this torch "
            f"({torch.__version__}) has {'no CUDA support' if torch.version.cuda is None else 'no CUDA device'}. "
            "Use backend='triton', backend='torch' or backend='auto'."
        )
    if device.type != "cuda":
        raise RuntimeError(f"backend='cuda' needs CUDA tensors; the input is on {device}. Move it with .cuda().")


def _gencode_flags() -> list[str]:
    """Code for the GPUs present (TORCH_CUDA_ARCH_LIST, when set, is honoured by torch instead)."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return []
    arches = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return [f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}" for major, minor in arches]


@functools.cache
def load_extension():
    """The compiled extension: the ahead-of-time build if installed, else a JIT build of csrc/ (cached)."""
    require_cuda_backend(torch.device("cuda"))
    try:
        import lorafusion_cuda  # built by LORAFUSION_BUILD_CUDA=1 pip install

        return lorafusion_cuda
    except ImportError:
        pass
    sources = [CSRC_DIR / name for name in (BINDING_SOURCE, *CUDA_SOURCES)]
    missing = [str(path) for path in sources if not path.is_file()]
    if missing:
        raise RuntimeError(
            f"backend='cuda' needs the csrc/ sources to build its extension, and these are missing: {missing}. "
            "Install from a source checkout, or build ahead of time with LORAFUSION_BUILD_CUDA=1 pip install -e ."
        )
    from torch.utils.cpp_extension import load

    return load(
        name=EXTENSION_NAME,
        sources=[str(path) for path in sources],
        extra_cflags=["-O3", "-std=c++20"],
        extra_cuda_cflags=[*NVCC_FLAGS, *_gencode_flags()],
        verbose=os.environ.get("LORAFUSION_CUDA_VERBOSE_BUILD") == "1",
    )


def cuda_extension_builds() -> bool:
    """True when the backend can run here: a CUDA device, and the extension imports or builds."""
    try:
        load_extension()
    except (RuntimeError, OSError, ImportError):
        return False
    return True


def cuda_keep_mask(seed: int, rows: int, cols: int, dropout_p: float, device: torch.device) -> torch.Tensor:
    """The [rows, cols] bool keep-mask that the CUDA kernels regenerate for this seed and p."""
    return load_extension().keep_mask(int(seed), int(rows), int(cols), float(dropout_p), torch.device(device))


def nf4_dequantize(weight, out: torch.Tensor | None = None) -> torch.Tensor:
    """An `NF4Weight` dequantized by the CUDA kernel into `out` (or a new tensor), bit-exact to bitsandbytes."""
    if out is None:
        out = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    nested = (weight.nested_absmax, weight.nested_code, weight.offset) if weight.double_quant else (None, None, None)
    load_extension().nf4_dequantize(
        weight.packed, weight.absmax, weight.code, *nested, out, weight.blocksize, weight.nested_blocksize
    )
    return out


class _CudaOps:
    """The op set of kernels/lora_linear.py, each a call into the extension (same contracts as _TritonOps)."""

    @staticmethod
    def lora_down(x, lora_A, dropout_p, seed):
        return load_extension().lora_down(x, lora_A, dropout_p, seed)

    @staticmethod
    def lora_dy(dy, lora_B, s, scaling):
        return load_extension().lora_dy(dy, lora_B, s, scaling)

    @staticmethod
    def lora_dx_da(ds, lora_A, x, dropout_p, seed, dx_out):
        return load_extension().lora_dx_da(ds, lora_A, x, dropout_p, seed, dx_out)

    @staticmethod
    def linear_lora_gemm(x, weight, bias, s, lora_B, scaling):
        """forward_impl='triton_gemm' on this backend: the base GEMM in cuBLAS, then the CUDA
        epilogue Y += scaling S B^T (Y read and written once more, no separate S B^T product)."""
        y = torch.nn.functional.linear(x, weight, bias)
        load_extension().lora_up_add_(y, s, lora_B, scaling)
        return y

    nf4_dequantize = staticmethod(nf4_dequantize)
