"""The megatron-core engine: megatron's parallel_state for the process groups and its
P2PCommunicator for activations and gradients between stages, driving lorafusion's multi-job
1F1B (pipeline.py). Launch: torchrun --nproc_per_node S -m lorafusion.train CONFIG.yaml
(NCCL on GPUs, gloo on CPU)."""

from __future__ import annotations

import os

import torch.distributed as dist

from .megatron_cpu import apply_cpu_compat
from .pipeline import PipelineTrainer, check_world, local_device_and_backend


class MegatronLink:
    """StageLink over megatron-core's P2PCommunicator for one stage."""

    def __init__(self, trainer: PipelineTrainer):
        from megatron.core import parallel_state
        from megatron.core.model_parallel_config import ModelParallelConfig
        from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

        self.group = parallel_state.get_pipeline_model_parallel_group()
        config = ModelParallelConfig(
            pipeline_model_parallel_size=trainer.num_stages,
            pipeline_dtype=trainer.pipeline_dtype,
            batch_p2p_comm=False,
            batch_p2p_sync=False,
            variable_seq_lengths=False,
        )
        self.comm = P2PCommunicator(self.group, config)
        self.first, self.last = trainer.stage_index == 0, trainer.is_last_stage

    def recv_forward(self, shape):
        return self.comm.recv_forward(shape, self.first)

    def send_forward(self, tensor):
        self.comm.send_forward(tensor, self.last)

    def send_forward_recv_backward(self, tensor, shape):
        return self.comm.send_forward_recv_backward(tensor, shape, self.last)

    def send_backward_recv_forward(self, grad, shape):
        return self.comm.send_backward_recv_forward(grad, shape, self.first)

    def recv_backward(self, shape):
        return self.comm.recv_backward(shape, self.last)

    def send_backward(self, grad):
        self.comm.send_backward(grad, self.first)


def train_with_megatron(
    config, resume: bool = False, stop_after_microbatches: int | None = None, progress: bool = True, schedule=None
):
    """Run `config` on the processes torchrun started, one pipeline stage each (`schedule`: see
    MultiJobTrainer.train)."""
    check_world(config, int(os.environ.get("WORLD_SIZE", "1")))
    from megatron.core import parallel_state

    apply_cpu_compat()
    device, backend = local_device_and_backend()
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group(backend)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=1, pipeline_model_parallel_size=config.parallel.pipeline_stages
    )
    try:
        trainer = PipelineTrainer(
            config,
            MegatronLink,
            parallel_state.get_pipeline_model_parallel_rank(),
            device=device,
            progress=progress,
            replica_index=parallel_state.get_data_parallel_rank(),
            data_parallel_group=parallel_state.get_data_parallel_group(),
        )
        return trainer.train(resume=resume, stop_after_microbatches=stop_after_microbatches, schedule=schedule)
    finally:
        parallel_state.destroy_model_parallel()
        if owns_group:
            dist.destroy_process_group()
