"""Run under torchrun by test_pipeline_eval.py: one run of a config on a pipeline engine that
records, on every rank, the greedy completions its closing summary's exact-match accuracy scores
(decoded by all ranks together), and the run's accuracies (the reporting rank's).

    exact_match_worker.py CONFIG.yaml ENGINE

Writes OUTPUT_DIR/exact_match-rank<r>.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch.distributed as dist
import yaml

from lorafusion.runtime import evaluation
from lorafusion.runtime.config import parse_config


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("engine", choices=["megatron", "deepspeed"])
    args = parser.parse_args()
    config = parse_config(yaml.safe_load(Path(args.config).read_text()), base_dir=Path(args.config).parent)
    decoded: list[list[str]] = []
    greedy_completions = evaluation.greedy_completions

    def recording(*positional, **keywords):
        decoded.append(greedy_completions(*positional, **keywords))
        return decoded[-1]

    evaluation.greedy_completions = recording
    if args.engine == "megatron":
        from lorafusion.engines.megatron_engine import train_with_megatron as train
    else:
        from lorafusion.engines.deepspeed_engine import train_with_deepspeed as train
    dist.init_process_group("gloo")
    try:
        result = train(config, progress=False)
        accuracies = {name: job.eval_accuracy for name, job in result.jobs.items()}
        record = {"completions": decoded, "accuracies": accuracies}
        Path(config.output_dir, f"exact_match-rank{dist.get_rank()}.json").write_text(json.dumps(record))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
