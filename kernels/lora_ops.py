"""The memory-bound ops of the fused LoRA linear layer, one class per backend with the same
contracts: "torch" (kernels/reference.py in plain torch, the CPU backend, the keep-mask
regenerated from the seed) and "triton" (the Triton kernels); "cuda" is in cuda_backend.py."""

from __future__ import annotations

import torch

from . import reference


class TorchOps:
    """The memory-bound ops in plain torch; dropout's keep-mask regenerated from the seed."""

    @staticmethod
    def _keep(x: torch.Tensor, dropout_p: float, seed: int):
        if dropout_p == 0.0:
            return None
        return reference.torch_keep_mask(seed, tuple(x.shape), dropout_p, x.device)

    @classmethod
    def lora_down(cls, x, lora_A, dropout_p, seed):
        return reference.lora_down_reference(x, lora_A, cls._keep(x, dropout_p, seed), dropout_p)

    @staticmethod
    def lora_dy(dy, lora_B, s, scaling):
        return reference.lora_dy_reference(dy, lora_B, s, scaling)

    @classmethod
    def lora_dx_da(cls, ds, lora_A, x, dropout_p, seed, dx_out):
        keep = cls._keep(x, dropout_p, seed)
        dx_lora, da = reference.lora_dx_da_reference(ds, lora_A, x, keep, dropout_p)
        if dx_out is not None:
            dx_out.copy_(dx_lora)
        return da

    @staticmethod
    def linear_lora_gemm(x, weight, bias, s, lora_B, scaling):
        raise ValueError("forward_impl='triton_gemm' needs backend='triton'")


class TritonOps:
    @staticmethod
    def lora_down(x, lora_A, dropout_p, seed):
        from .lora_down import lora_down

        return lora_down(x, lora_A, dropout_p, seed)

    @staticmethod
    def lora_dy(dy, lora_B, s, scaling):
        from .lora_dy import lora_dy

        return lora_dy(dy, lora_B, s, scaling)

    @staticmethod
    def lora_dx_da(ds, lora_A, x, dropout_p, seed, dx_out):
        from .lora_dx_da import lora_dx_da

        return lora_dx_da(ds, lora_A, x, dropout_p, seed, dx_out)

    @staticmethod
    def linear_lora_gemm(x, weight, bias, s, lora_B, scaling):
        from .linear_lora_gemm import linear_lora_gemm

        return linear_lora_gemm(x, weight, bias, s, lora_B, scaling)
