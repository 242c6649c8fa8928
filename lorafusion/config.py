"""LoRAConfig: which linear layers get an adapter and with which hyperparameters; PEFT-compatible."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from lorafusion.kernels import lora_scaling
from lorafusion.modules.lora_linear import check_backend, check_lora_hyperparameters

ALL_LINEAR = "all-linear"

# PEFT's TaskType values; PEFT picks the PeftModel subclass from it.
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")

# PEFT LoraConfig fields that lorafusion does not implement, with the values that mean "feature
# off". An adapter_config.json with any other value would be loaded wrongly, so it is refused.
UNSUPPORTED_PEFT_FIELDS: dict[str, tuple[Any, ...]] = {
    "fan_in_fan_out": (False, None),
    "use_dora": (False, None),
    "lora_bias": (False, None),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "layers_to_transform": (None, []),
    "layers_pattern": (None, [], ""),
    "exclude_modules": (None, [], ""),
    "modules_to_save": (None, []),
    "target_parameters": (None, []),
    "trainable_token_indices": (None,),
    "layer_replication": (None,),
    "use_qalora": (False, None),
    "alora_invocation_tokens": (None,),
    "arrow_config": (None,),
}
# Initialisations that leave the base weights as they are: the trained adapter is a plain LoRA.
# PiSSA, OLoRA, LoftQ and CorDA change the base weights, so their adapters do not fit the
# unmodified base that lorafusion loads them onto.
BASE_PRESERVING_INITS = (True, False, "gaussian", "eva", "orthogonal", None)


@dataclass
class LoRAConfig:
    """LoRA hyperparameters and targets, with PEFT's meanings and names.

    target_modules: a list of module names, each matching a module whose full name equals it or
        ends with "." + it; or a regex string that must match the whole module name; or
        "all-linear" (every nn.Linear but the output layer).
    bias: only "none" is supported (biases stay frozen and are not part of the adapter).
    task_type: PEFT's task type (e.g. "CAUSAL_LM"), written to adapter_config.json.
    backend: kernel backend of the FusedLoRALinear layers ("auto", "triton", "torch"); not saved.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str = ALL_LINEAR
    bias: str = "none"
    use_rslora: bool = False
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    backend: str = "auto"

    def __post_init__(self) -> None:
        check_lora_hyperparameters(self.r, self.lora_alpha, self.lora_dropout)
        self.target_modules = normalized_target_modules(self.target_modules)
        if self.bias != "none":
            raise ValueError(
                f"bias must be 'none' (PEFT's 'all' and 'lora_only' are not supported), got {self.bias!r}"
            )
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"use_rslora must be a bool, got {self.use_rslora!r}")
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ValueError(f"task_type must be None or one of {TASK_TYPES}, got {self.task_type!r}")
        if self.base_model_name_or_path is not None and not isinstance(self.base_model_name_or_path, str):
            raise ValueError(f"base_model_name_or_path must be a string or None, got {self.base_model_name_or_path!r}")
        check_backend(self.backend)

    @property
    def scaling(self) -> float:
        return lora_scaling(self.r, self.lora_alpha, self.use_rslora)

    @property
    def targets_all_linear(self) -> bool:
        return isinstance(self.target_modules, str) and self.target_modules.lower() == ALL_LINEAR

    def to_peft_dict(self) -> dict[str, Any]:
        """The adapter_config.json contents that PEFT's LoraConfig loads to the same adapter."""
        return {
            "peft_type": "LORA",
            "task_type": self.task_type,
            "base_model_name_or_path": self.base_model_name_or_path,
            "revision": None,
            "inference_mode": False,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "target_modules": self.target_modules,
            "bias": self.bias,
            "use_rslora": self.use_rslora,
            "init_lora_weights": True,
            "fan_in_fan_out": False,
            "use_dora": False,
            "lora_bias": False,
            "modules_to_save": None,
            "exclude_modules": None,
            "layers_to_transform": None,
            "layers_pattern": None,
            "rank_pattern": {},
            "alpha_pattern": {},
        }

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any], backend: str = "auto", source: str = "adapter config") -> LoRAConfig:
        """Read a PEFT adapter_config.json dict; fields lorafusion cannot honour raise ValueError.

        `source` (the file name) prefixes every error message.
        """
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
        if data.get("peft_type") != "LORA":
            raise ValueError(f"{source}: peft_type must be 'LORA', got {data.get('peft_type')!r}")
        for name, off_values in UNSUPPORTED_PEFT_FIELDS.items():
            if name in data and not any(data[name] == value for value in off_values):
                raise ValueError(
                    f"{source}: {name}={data[name]!r} is not supported by lorafusion (only plain LoRA adapters load; "
                    f"PEFT's own forward runs this one, or use lorafusion.fuse_peft on the PEFT model)"
                )
        init = data.get("init_lora_weights", True)
        if not any(init is value or init == value for value in BASE_PRESERVING_INITS):
            raise ValueError(
                f"{source}: init_lora_weights={init!r} changes the base model's weights (PiSSA, OLoRA, LoftQ, CorDA), so "
                "this adapter is wrong on the unmodified base; convert it to a plain LoRA with PEFT first: "
                "save_pretrained(path, path_initial_model_for_weight_conversion=<the initial adapter>)"
            )
        for name in ("r", "lora_alpha", "target_modules"):
            if name not in data:
                raise ValueError(f"{source}: missing field {name!r}")
        try:
            return cls(
                r=data["r"],
                lora_alpha=data["lora_alpha"],
                lora_dropout=data.get("lora_dropout", 0.0),
                target_modules=data["target_modules"],
                bias=data.get("bias", "none"),
                use_rslora=data.get("use_rslora", False),
                task_type=data.get("task_type"),
                base_model_name_or_path=data.get("base_model_name_or_path"),
                backend=backend,
            )
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from error


def normalized_target_modules(target_modules: object) -> list[str] | str:
    """A regex string (validated) or a de-duplicated list of names, order kept."""
    if isinstance(target_modules, str):
        if not target_modules:
            raise ValueError("target_modules must not be an empty string")
        try:
            re.compile(target_modules)
        except re.error as error:
            raise ValueError(f"target_modules {target_modules!r} is not a valid regex: {error}") from error
        return target_modules
    if isinstance(target_modules, (list, tuple, set, frozenset)):
        names = list(target_modules)
        if not names or not all(isinstance(name, str) and name for name in names):
            raise ValueError(
                f"target_modules must be a non-empty list of module names, a regex string or "
                f"'{ALL_LINEAR}', got {target_modules!r}"
            )
        # PEFT saves target_modules as a set; sorting makes the saved order reproducible.
        return sorted(set(names)) if isinstance(target_modules, (set, frozenset)) else list(dict.fromkeys(names))
    raise ValueError(
        f"target_modules must be a list of module names, a regex string or '{ALL_LINEAR}', got {target_modules!r}"
    )
