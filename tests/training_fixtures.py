"""Tiny training workloads shared by the runtime and engine tests: a 2-layer Llama config and three
small jobs (addition, string reversal, plain text) written as JSONL into a test's directory."""

from __future__ import annotations

import json
import random
from pathlib import Path

from lorafusion.runtime.config import parse_config

TINY_MODEL = {
    "architecture": "llama",
    "config": {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 260, "max_position_embeddings": 64,
    },
    "seed": 3,
}


def write_jobs_data(directory: Path) -> dict[str, Path]:
    rng = random.Random(0)
    files = {
        "add": [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a, b in ((rng.randrange(50), rng.randrange(50)) for _ in range(40))],
        "rev": [{"prompt": f"{w}>", "completion": w[::-1]} for w in ("".join(rng.choice("abcde") for _ in range(rng.randrange(2, 7))) for _ in range(40))],
        "txt": [{"text": "ab" * rng.randrange(2, 9)} for _ in range(40)],
    }
    paths = {}
    for name, records in files.items():
        paths[name] = directory / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in records))
    return paths


def config_dict(tmp_path: Path, jobs=("add", "rev", "txt"), output="run", **overrides) -> dict:
    """The raw YAML mapping of a tiny multi-job run (write it out for torchrun, or parse it)."""
    paths = write_jobs_data(tmp_path)
    job_settings = {
        # Dropout on two of the jobs: every "equals training alone / an uninterrupted run" test
        # then holds the dropout masks to it too.
        "add": dict(r=4, lora_alpha=8, lr=1e-2, global_batch_size=8, max_steps=4, seed=1, lora_dropout=0.1),
        "rev": dict(r=8, lora_alpha=8, lr=5e-3, global_batch_size=6, max_steps=5, seed=2, lora_dropout=0.2),
        "txt": dict(r=2, lora_alpha=4, lr=1e-2, global_batch_size=5, max_steps=3, seed=3),
    }
    data = {
        "model": TINY_MODEL,
        "jobs": [
            {"name": name, "data": str(paths[name]), "format": "text" if name == "txt" else "prompt_completion",
             "max_seq_len": 24, **job_settings[name], **overrides.get(name, {})}
            for name in jobs
        ],
        "scheduler": {"capacity": 96, "solver": "greedy"},
        "output_dir": str(tmp_path / output),
        "checkpoint_every": overrides.get("checkpoint_every", 2),
        "backend": "torch",
    }
    return data


def make_config(tmp_path: Path, jobs=("add", "rev", "txt"), output="run", **overrides):
    return parse_config(config_dict(tmp_path, jobs, output, **overrides), base_dir=tmp_path)
