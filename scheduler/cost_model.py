"""How long a pipeline stage takes for a microbatch, fitted from measured per-layer times.

Per stage and microbatch of ``t`` (padded) tokens, with the model split evenly over ``S`` stages:

* forward:  ``(forward_fixed_s + forward_per_token_s * t) / S + stage_fixed_s``;
* backward: ``(backward_fixed_s + backward_per_token_s * t) / S + stage_fixed_s``, plus the forward
  once more when ``activation_checkpointing`` is on (each layer's forward is recomputed in the
  backward, as in the published LoRAFusion, Megatron-LM and mLoRA runs, which all used it);
* after the last backward of a job's global batch, that job's optimizer step, ``optimizer_step_s / S``.

The ``*_fixed_s`` terms are the per-microbatch cost that does not shrink with fewer tokens (small
GEMMs, kernel launches), fitted from the layers; ``stage_fixed_s`` is what the layer measurements
do not contain (they were taken with CUDA graphs and without inter-stage transfers): launch
overhead and point-to-point latency per stage and pass. It is 0 unless set from a measured run. The
embedding and LM head (``pre_post`` in the calibration file) are spread over the stages with the
decoder layers; on the 70B model they are under 2% of a microbatch's time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np


@dataclass(frozen=True)
class CostModel:
    """Whole-model times in seconds (all layers on one device); see the module docstring."""

    forward_fixed_s: float
    forward_per_token_s: float
    backward_fixed_s: float
    backward_per_token_s: float
    optimizer_step_s: float = 0.0
    stage_fixed_s: float = 0.0
    activation_checkpointing: bool = False

    def forward(self, tokens: int) -> float:
        return self.forward_fixed_s + self.forward_per_token_s * tokens if tokens else 0.0

    def backward(self, tokens: int) -> float:
        """The backward alone, without the recomputed forward of activation checkpointing."""
        return self.backward_fixed_s + self.backward_per_token_s * tokens if tokens else 0.0

    def stage_forward_s(self, tokens: int, stages: int) -> float:
        return self.forward(tokens) / stages + self.stage_fixed_s if tokens else 0.0

    def stage_backward_s(self, tokens: int, stages: int) -> float:
        recompute = self.forward(tokens) if self.activation_checkpointing else 0.0
        return (self.backward(tokens) + recompute) / stages + self.stage_fixed_s if tokens else 0.0

    def with_options(self, **changes: object) -> CostModel:
        return replace(self, **changes)

    @classmethod
    def from_layer_times(
        cls,
        model: Mapping,
        optimizer_bytes_per_param: float = 32.0,
        memory_bandwidth_bytes_per_s: float = 2.0e12,
        activation_checkpointing: bool = True,
        stage_fixed_s: float = 0.0,
    ) -> CostModel:
        """Fit the linear model to one model's entry of a measured layer-times file.

        ``model`` has the keys of /work/shared/calibration/layer-times-h100.yaml:
        ``num_layers``, ``decoder_layer_fwd_time_by_tokens``, ``decoder_layer_fwd_bwd_time_by_tokens``,
        ``pre_post_layer_fwd_bwd_time_by_tokens`` (token count -> seconds) and
        ``decoder_layer_lora_param_count_per_rank``. Whole-model forward = layers x layer forward +
        the pre/post layers' forward share (taken in the decoder layers' forward:total ratio);
        backward = the rest. Least squares over the measured token counts. The optimizer step is
        not measured there: it is estimated as memory-bound AdamW over the LoRA parameters
        (``optimizer_bytes_per_param`` moved per parameter at ``memory_bandwidth_bytes_per_s``).
        """
        layers = int(model["num_layers"])
        fwd = {int(k): float(v) for k, v in model["decoder_layer_fwd_time_by_tokens"].items()}
        fwd_bwd = {int(k): float(v) for k, v in model["decoder_layer_fwd_bwd_time_by_tokens"].items()}
        pre_post = {int(k): float(v) for k, v in model.get("pre_post_layer_fwd_bwd_time_by_tokens", {}).items()}
        tokens = sorted(fwd)
        forward_times, backward_times = [], []
        for t in tokens:
            share = fwd[t] / fwd_bwd[t]
            extra = pre_post.get(t, 0.0)
            forward_times.append(layers * fwd[t] + share * extra)
            backward_times.append(layers * (fwd_bwd[t] - fwd[t]) + (1 - share) * extra)
        f_slope, f_fixed = np.polyfit(tokens, forward_times, 1)
        b_slope, b_fixed = np.polyfit(tokens, backward_times, 1)
        lora_params = layers * float(model.get("decoder_layer_lora_param_count_per_rank", 0))
        return cls(
            forward_fixed_s=max(float(f_fixed), 0.0),
            forward_per_token_s=float(f_slope),
            backward_fixed_s=max(float(b_fixed), 0.0),
            backward_per_token_s=float(b_slope),
            optimizer_step_s=lora_params * optimizer_bytes_per_param / memory_bandwidth_bytes_per_s,
            stage_fixed_s=stage_fixed_s,
            activation_checkpointing=activation_checkpointing,
        )

    @classmethod
    def preset(cls, name: str) -> CostModel:
        """:meth:`from_layer_times` of the LoRAFusion artifact's measured H100 layer times (the
        figures in /work/shared/calibration/layer-times-h100.yaml), with activation checkpointing:
        ``"llama-3.1-8b"``, ``"qwq-32b"`` or ``"llama-3.1-70b"``."""
        figures = {
            "llama-3.1-8b": (6.9891e-4, 3.6133e-05, 1.38625e-2, 3.5220e-05, 6.7109e-4),
            "qwq-32b": (1.3406e-2, 1.3008e-4, 2.8378e-2, 1.3739e-4, 2.1475e-3),
            "llama-3.1-70b": (2.7593e-2, 2.5837e-4, 2.1464e-2, 2.7222e-4, 3.3135e-3),
        }
        if name not in figures:
            raise ValueError(f"unknown cost model preset {name!r}; known: {', '.join(figures)}")
        return cls(*figures[name], activation_checkpointing=True)

    @classmethod
    def default(cls) -> CostModel:
        """Llama-3.1-8B on H100 with activation checkpointing (:meth:`preset`)."""
        return cls.preset("llama-3.1-8b")


def stage_work_s(cost: CostModel, stages: int, tokens: int, microbatches: int, optimizer_steps: int) -> float:
    """Time one stage spends on ``microbatches`` holding ``tokens`` sample tokens in all (forward and
    backward, activation-checkpointing recompute included) plus ``optimizer_steps`` optimizer steps.
    The cost model is linear in tokens, so only the totals matter."""
    one = cost.stage_forward_s(1, stages) + cost.stage_backward_s(1, stages)
    per_token = cost.stage_forward_s(2, stages) + cost.stage_backward_s(2, stages) - one
    return microbatches * one + (tokens - microbatches) * per_token + optimizer_steps * cost.optimizer_step_s / stages
