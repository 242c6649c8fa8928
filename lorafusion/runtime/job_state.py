"""One job's training state: its data order, global batches, adapter parameters, optimizer, LR
schedule, position and status. Nothing here knows how microbatches are planned or packed, or where
checkpoints go: the training loop (training_loop.py) and its drivers (the offline trainer, the
service) own that."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lorafusion.config import LoRAConfig

from .config import JobSpec
from .config_schema import MAX_SAMPLES_PER_JOB
from .data import Sample
from .eval_loss import JobEvaluation


def job_lora_config(spec: JobSpec, base_model_path: str, backend: str) -> LoRAConfig:
    """The adapter config of a job: what its layers are built from and its adapter_config.json says."""
    return LoRAConfig(
        r=spec.r,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora_dropout,
        use_rslora=spec.use_rslora,
        target_modules=spec.target_modules,
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_path,
        backend=backend,
    )


def training_order(num_samples: int, spec: JobSpec) -> list[int]:
    """Dataset indices in the order the job trains on them: one seeded permutation per epoch,
    as many epochs as max_steps or epochs need."""
    if spec.max_steps is not None:
        total = spec.max_steps * spec.global_batch_size
    else:
        total = math.ceil((spec.epochs if spec.epochs is not None else 1.0) * num_samples)
        if total > MAX_SAMPLES_PER_JOB:
            raise ValueError(
                f"epochs={spec.epochs:g} over {num_samples:,} records is {total:,} samples, "
                f"more than {MAX_SAMPLES_PER_JOB:,}: lower epochs"
            )
    order: list[int] = []
    epoch = 0
    while len(order) < total:
        generator = torch.Generator().manual_seed(spec.seed * 1_000_003 + epoch)
        order += torch.randperm(num_samples, generator=generator).tolist()
        epoch += 1
    return order[:total]


def lr_lambda(spec: JobSpec, num_steps: int):
    """Multiplier of the job's lr at each step: linear warm-up, then constant, linear or cosine decay to 0."""

    def multiplier(step: int) -> float:
        if step < spec.warmup_steps:
            return (step + 1) / (spec.warmup_steps + 1)
        if spec.lr_schedule == "constant":
            return 1.0
        progress = (step - spec.warmup_steps) / max(1, num_steps - spec.warmup_steps)
        if spec.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return multiplier


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every value is finite, read back from the device once rather than once per tensor."""
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


@dataclass
class JobRun:
    """One job's data order, optimizer and progress."""

    spec: JobSpec
    samples: list[Sample] = field(default_factory=list)
    order: list[int] = field(default_factory=list)  # dataset indices in training order
    num_steps: int = 0
    target_tokens: list[int] = field(default_factory=list)  # per global batch
    remaining: list[int] = field(default_factory=list)  # per global batch: samples not trained yet
    optimizer: torch.optim.Optimizer | None = None
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    step: int = 0
    status: str = "running"  # "running" | "finished" | "failed" (the service adds "cancelled")
    failure: str | None = None
    batch_loss: float = 0.0
    # This global batch's loss so far, summed on the device: read back once, at the job's step.
    pending_loss: torch.Tensor | None = None
    batch_tokens: int = 0
    tokens_seen: int = 0
    last_loss: float = math.nan
    published: bool = False  # its adapter and finished status are in output_dir (this run's)
    named_parameters: dict[str, torch.nn.Parameter] = field(default_factory=dict)  # by PEFT key, this stage's
    evaluation: JobEvaluation | None = None  # with held-out records (eval_data or eval_fraction)
    step_eval_loss: float | None = None  # the eval loss at the step just taken, if it was evaluated

    @property
    def stopped_early(self) -> bool:
        return self.evaluation is not None and self.evaluation.stopped

    @property
    def name(self) -> str:
        return self.spec.name

    def prepare(self, named_parameters: dict[str, torch.nn.Parameter]) -> None:
        """Its training order, global batches, optimizer and LR schedule over `named_parameters`
        (this process's share of its adapter, by PEFT key). A job whose order cannot be built fails."""
        if self.status == "failed":
            return
        spec = self.spec
        try:
            self.order = training_order(len(self.samples), spec)
        except ValueError as error:
            self.status, self.failure = "failed", str(error)
            return
        self.num_steps = math.ceil(len(self.order) / spec.global_batch_size)
        self.target_tokens, self.remaining = [], []
        for g in range(self.num_steps):
            batch = self.batch_indices(g)
            self.target_tokens.append(sum(self.samples[i].num_target_tokens for i in batch))
            self.remaining.append(len(batch))
        self.named_parameters = named_parameters
        # A job may target no layer of this pipeline stage: it then has nothing to step here.
        self.optimizer = torch.optim.AdamW(
            list(named_parameters.values()) or [torch.nn.Parameter(torch.zeros(0))],
            lr=spec.lr,
            weight_decay=spec.weight_decay,
        )
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(spec, self.num_steps))

    def batch_indices(self, global_batch: int) -> list[int]:
        """Dataset indices of global batch `global_batch`, in training order."""
        size = self.spec.global_batch_size
        return self.order[global_batch * size : (global_batch + 1) * size]

    def sample_at(self, index: int) -> Sample:
        """The sample at position `index` of the training order."""
        return self.samples[self.order[index]]

    def add_loss(self, loss: torch.Tensor) -> None:
        loss = loss.detach()
        self.pending_loss = loss if self.pending_loss is None else self.pending_loss + loss

    def take_pending_loss(self) -> float | None:
        """The loss summed on the device since the last step, read back (one read per step)."""
        if self.pending_loss is None:
            return None
        loss, self.pending_loss = float(self.pending_loss), None
        return loss

    def optimizer_step(self) -> str | None:
        """Step the optimizer and LR schedule on the gradients in; the reason it cannot (non-finite
        gradients or parameters), or None. Leaves no gradient behind either way."""
        params = list(self.named_parameters.values())
        if not all_finite([p.grad for p in params if p.grad is not None]):
            return f"non-finite gradient at step {self.step + 1}"
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if not all_finite(params):
            return f"non-finite parameters after step {self.step + 1}"
        return None

    def fail(self, reason: str) -> None:
        self.status, self.failure = "failed", reason
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        """This process's share of the job's state: adapter weights and AdamW state (both by PEFT
        key), LR schedule and position."""
        # Copies (also on the CPU, where .cpu() would alias): AdamW updates its state in place.
        optimizer_state = {
            key: {k: v.detach().to("cpu", copy=True) if torch.is_tensor(v) else v for k, v in self.optimizer.state[param].items()}
            for key, param in self.named_parameters.items()
            if param in self.optimizer.state
        }
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "last_loss": self.last_loss,
            "parameters": {key: param.detach().to("cpu", copy=True) for key, param in self.named_parameters.items()},
            "optimizer": optimizer_state,
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "evaluation": None if self.evaluation is None else self.evaluation.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (see state_dict; merged over stages, so it may hold more keys)."""
        with torch.no_grad():
            for key, param in self.named_parameters.items():
                param.copy_(state["parameters"][key])
                if key in state["optimizer"]:
                    self.optimizer.state[param] = {
                        k: v.to(param.device) if torch.is_tensor(v) and v.dim() > 0 else v
                        for k, v in state["optimizer"][key].items()
                    }
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        for group, lr in zip(self.optimizer.param_groups, self.lr_scheduler.get_last_lr()):
            group["lr"] = lr
        self.step, self.tokens_seen, self.last_loss = state["step"], state["tokens_seen"], state["last_loss"]
        if self.evaluation is not None and state.get("evaluation") is not None:
            self.evaluation.load_state_dict(state["evaluation"], keys=self.named_parameters)
        for g in range(self.step):
            self.remaining[g] = 0
        if self.step == self.num_steps or self.stopped_early:
            self.status = "finished"
            self.hold_best_adapter()

    def hold_best_adapter(self) -> None:
        """A finished job under early stopping keeps the adapter of its best eval, in the model too
        (what the closing summary's accuracy then scores is what it publishes)."""
        if self.evaluation is not None and self.evaluation.best_parameters is not None:
            self.load_adapter(self.evaluation.best_parameters)

    def load_adapter(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy `weights` (by PEFT key; a superset of this stage's) into the job's adapter parameters."""
        with torch.no_grad():
            for key, parameter in self.named_parameters.items():
                parameter.copy_(weights[key])
