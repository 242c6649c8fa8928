"""The CPU compatibility megatron-core 0.16's pipeline communication needs, applied only when CUDA
is unavailable (CPU-only torch, gloo), and only by the megatron engine.

megatron-core allocates pipeline receive buffers with `device=torch.cuda.current_device()`, which a
CPU-only torch cannot answer. Without CUDA, current_device() is made to name the CPU, so those
buffers are CPU tensors. The engine also configures megatron so that it never calls
torch.cuda.synchronize (batch_p2p_sync=False) and never exchanges shapes (variable_seq_lengths=False:
every stage derives each microbatch's shape from the shared schedule).
"""

from __future__ import annotations

import torch


def apply_cpu_compat() -> None:
    if torch.cuda.is_available():
        return
    torch.cuda.current_device = lambda: torch.device("cpu")
