"""The megatron-core engine: megatron's parallel_state for the process groups and its
P2PCommunicator for activations and gradients between stages, driving lorafusion's multi-job
1F1B (pipeline.py). Launch: torchrun --nproc_per_node S -m lorafusion.train CONFIG.yaml
(NCCL on GPUs, gloo on CPU)."""

from __future__ import annotations

import contextlib
import datetime
import os

import torch.distributed as dist

from .liveness import watching_peers
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
        # Gloo's timeout error names no rank: each transfer names its peer for the message.
        self.watching = trainer.peer_watch.waiting_on if trainer.peer_watch is not None else _unwatched
        stage = trainer.stage_index
        self.previous = f"rank {parallel_state.get_pipeline_model_parallel_prev_rank()} (pipeline stage {stage - 1})"
        self.next = f"rank {parallel_state.get_pipeline_model_parallel_next_rank()} (pipeline stage {stage + 1})"

    def recv_forward(self, shape):
        with self.watching(self.previous):
            return self.comm.recv_forward(shape, self.first)

    def send_forward(self, tensor):
        with self.watching(self.next):
            self.comm.send_forward(tensor, self.last)

    def send_forward_recv_backward(self, tensor, shape):
        with self.watching(self.next):
            return self.comm.send_forward_recv_backward(tensor, shape, self.last)

    def send_backward_recv_forward(self, grad, shape):
        with self.watching(self.previous):
            return self.comm.send_backward_recv_forward(grad, shape, self.first)

    def recv_backward(self, shape):
        with self.watching(self.next):
            return self.comm.recv_backward(shape, self.last)

    def send_backward(self, grad):
        with self.watching(self.previous):
            self.comm.send_backward(grad, self.first)


@contextlib.contextmanager
def _unwatched(peer: str):
    yield


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
    timeout_s = config.parallel.timeout_s
    if owns_group:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=config.parallel.pipeline_stages,
        distributed_timeout_minutes=timeout_s / 60,
    )
    stage, replica = parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_data_parallel_rank()
    role = f"pipeline stage {stage}" + (f", replica {replica}" if config.parallel.data_parallel > 1 else "")
    try:
        with watching_peers(timeout_s, role) as watch:
            trainer = PipelineTrainer(
                config,
                MegatronLink,
                stage,
                device=device,
                progress=progress,
                replica_index=replica,
                data_parallel_group=parallel_state.get_data_parallel_group(),
                peer_watch=watch,
            )
            return trainer.train(resume=resume, stop_after_microbatches=stop_after_microbatches, schedule=schedule)
    finally:
        parallel_state.destroy_model_parallel()
        if owns_group:
            dist.destroy_process_group()
