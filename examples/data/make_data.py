"""Writes the quickstart's data: a training file and a held-out eval file per task.

    python examples/data/make_data.py

Deterministic (fixed seed), so rerunning it rewrites the same files. Eval records are never in the
training file: an adapter's eval accuracy is on prompts it has not seen.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORDS_TRAINED = 3000  # per word task; addition trains on every sum it does not hold out
EVAL_RECORDS = 200


def addition(rng: random.Random) -> list[dict]:
    """Every sum of a three-digit number and a digit (9000 of them; 8800 trained on, each seen about
    three times). With the 1000 sums of a number below 100 and a digit, 800 of them trained on, the
    adapter learnt the training sums by heart in our trials and got few unseen ones right; with more
    sums than it can memorise, it learns to add and carry instead."""
    pairs = [(a, b) for a in range(100, 1000) for b in range(10)]
    rng.shuffle(pairs)
    return [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a, b in pairs]


def _words(rng: random.Random, lengths: tuple[int, int]) -> list[str]:
    """Distinct words of distinct lowercase letters. Distinct letters keep each output letter's source
    unambiguous; with short words, the copy is learnt within the quickstart's budget (reversing
    words of 4 letters took about 500 steps in our trials, of 3 letters under 300)."""
    seen: dict[str, None] = {}
    while len(seen) < WORDS_TRAINED + EVAL_RECORDS:
        seen["".join(rng.sample(string.ascii_lowercase, rng.randint(*lengths)))] = None
    return list(seen)


def reverse(rng: random.Random) -> list[dict]:
    # No task name in the prompt: the adapter is the task, and every prompt token costs training time.
    return [{"prompt": f"{w} ->", "completion": f" {w[::-1]}"} for w in _words(rng, (3, 3))]


def uppercase(rng: random.Random) -> list[dict]:
    # The same prompt format as reverse: one prompt, two adapters, two answers.
    return [{"prompt": f"{w} ->", "completion": f" {w.upper()}"} for w in _words(rng, (3, 4))]


def write(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def main(directory: Path = HERE) -> None:
    for seed, (name, make) in enumerate([("addition", addition), ("reverse", reverse), ("uppercase", uppercase)]):
        records = make(random.Random(seed))
        write(directory / f"{name}_eval.jsonl", records[:EVAL_RECORDS])
        write(directory / f"{name}.jsonl", records[EVAL_RECORDS:])


if __name__ == "__main__":
    main()
