"""Cut a Hugging Face decoder-only causal LM (Llama, Qwen2, Mistral) into pipeline stages.

Stage 0 holds the token embedding, the last stage the final norm and the LM head; decoder layers
are split so that each stage's estimated cost is balanced (a decoder layer costs 1, the embedding
`EMBEDDING_COST`, the norm + head + loss `HEAD_COST`, in decoder-layer units), or as given.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

EMBEDDING_COST = 0.1
HEAD_COST = 1.0


def _decoder(model: nn.Module) -> nn.Module:
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(model, "lm_head"):
        raise TypeError(
            f"{type(model).__name__} is not a Hugging Face decoder-only causal LM "
            "(expected model.model.layers and model.lm_head, as in Llama, Qwen2 and Mistral)"
        )
    return inner


def balanced_stage_layers(num_layers: int, num_stages: int) -> list[int]:
    """Decoder layers per stage, minimising the costliest stage (stage 0 also carries the
    embedding and the last stage the head and loss), then the spread of stage costs."""
    if num_stages < 1:
        raise ValueError(f"pipeline_stages must be >= 1, got {num_stages}")
    if num_stages > num_layers:
        raise ValueError(
            f"pipeline_stages={num_stages} is larger than the model's {num_layers} decoder layers: "
            "every stage needs at least one layer"
        )

    def stage_cost(stage: int, layers: int) -> float:
        return layers + (EMBEDDING_COST if stage == 0 else 0.0) + (HEAD_COST if stage == num_stages - 1 else 0.0)

    # best[s][n]: (max cost, sum of squared costs, counts) for the first s stages holding n layers.
    best: list[dict[int, tuple[float, float, list[int]]]] = [{0: (0.0, 0.0, [])}]
    for stage in range(num_stages):
        row: dict[int, tuple[float, float, list[int]]] = {}
        for used, (worst, squares, counts) in best[stage].items():
            for layers in range(1, num_layers - used - (num_stages - stage - 1) + 1):
                cost = stage_cost(stage, layers)
                candidate = (max(worst, cost), squares + cost * cost, counts + [layers])
                if used + layers not in row or candidate[:2] < row[used + layers][:2]:
                    row[used + layers] = candidate
        best.append(row)
    return best[num_stages][num_layers][2]


class DecoderStage(nn.Module):
    """One pipeline stage of a decoder-only LM: (input ids or hidden states) -> (hidden states or logits).

    Holds references to the original model's modules (no copies), so adapters applied to the full
    model before the split keep their names and values.
    """

    def __init__(self, model: nn.Module, first_layer: int, last_layer: int, is_first: bool, is_last: bool):
        super().__init__()
        decoder = _decoder(model)
        self.is_first, self.is_last = is_first, is_last
        self.first_layer = first_layer
        self.embed_tokens = decoder.embed_tokens if is_first else None
        self.layers = nn.ModuleList(decoder.layers[first_layer:last_layer])
        self.rotary_emb = decoder.rotary_emb
        self.norm = decoder.norm if is_last else None
        self.lm_head = model.lm_head if is_last else None
        # Gemma2 caps its logits in the causal LM's forward, which the last stage replaces.
        self.final_logit_softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)

    def forward(
        self, inputs: torch.Tensor, position_ids: torch.Tensor, sample_lengths: tuple[int, ...] | None = None
    ) -> torch.Tensor:
        """inputs: input ids [1, T] on the first stage, else hidden states [1, T, H]; sample_lengths:
        the packed samples' token counts (each attends to itself only; None: one causal sequence).
        Returns logits [1, T, V] on the last stage, else hidden states."""
        hidden = self.embed_tokens(inputs) if self.is_first else inputs
        position_embeddings = self.rotary_emb(hidden, position_ids=position_ids)
        for layer in self.layers:
            hidden = layer(
                hidden, position_ids=position_ids, position_embeddings=position_embeddings, sample_lengths=sample_lengths
            )
            if isinstance(hidden, tuple):
                hidden = hidden[0]
        if not self.is_last:
            return hidden
        logits = self.lm_head(self.norm(hidden))
        if self.final_logit_softcap is not None:
            logits = torch.tanh(logits / self.final_logit_softcap) * self.final_logit_softcap
        return logits


def split_model(model: nn.Module, num_stages: int, stage_layers: Sequence[int] | None = None) -> list[DecoderStage]:
    """The model's stages; `stage_layers` (decoder layers per stage) overrides the balanced split."""
    num_layers = len(_decoder(model).layers)
    counts = list(stage_layers) if stage_layers is not None else balanced_stage_layers(num_layers, num_stages)
    if len(counts) != num_stages or sum(counts) != num_layers or min(counts) < 1:
        raise ValueError(
            f"stage_layers={counts} must give each of the {num_stages} stages at least one layer and "
            f"sum to the model's {num_layers} decoder layers"
        )
    stages, start = [], 0
    for index, count in enumerate(counts):
        stages.append(DecoderStage(model, start, start + count, index == 0, index == num_stages - 1))
        start += count
    return stages
