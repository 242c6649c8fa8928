"""`lorafusion plan`: schedule several LoRA jobs into token-capped microbatches and report the result.

jobs file (YAML): either a list of jobs or ``{"jobs": [...]}``; each job is

    name: sum-a                # unique
    global_batch_size: 64      # samples per optimizer step
    lengths: [512, 133, ...]   # token count of each sample, in dataset order
    # ... or, instead of lengths:
    data: data/sum-a.jsonl     # JSONL, one record per sample; relative to the jobs file
    text_field: text           # the record's field holding the sample text (default "text")
    tokenizer: path/or/hub-id  # optional: counts tokens with transformers.AutoTokenizer

Without ``tokenizer`` a sample's length is its UTF-8 byte count + 1 (a byte-level tokenizer plus
an end-of-sequence token): exact for byte-level vocabularies, an over-estimate of roughly 3-4x for
BPE vocabularies on English text, which is safe for capacity planning but not tight.

The schedule JSON written by ``--out`` is documented in README ("Planning multi-job schedules").
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from lorafusion.scheduler import (
    CostModel,
    Job,
    ScheduleError,
    plan_schedule,
    simulate_systems,
    verify_schedule,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jobs", required=True, type=Path, help="YAML file listing the jobs")
    parser.add_argument("--stages", type=int, default=4, help="pipeline stages S (default 4)")
    parser.add_argument("--capacity", type=int, default=8192, help="tokens per microbatch (default 8192)")
    parser.add_argument(
        "--pad-multiple", type=int, default=1, help="pad each job's segment in a microbatch to this multiple"
    )
    parser.add_argument(
        "--time-limit", type=float, default=0.5, help="MILP time budget per global batch (all its groups together), seconds"
    )
    parser.add_argument("--no-milp", action="store_true", help="greedy first-fit-decreasing packing only")
    parser.add_argument("--out", type=Path, help="write the schedule as JSON here")
    parser.add_argument(
        "--cost-model",
        type=Path,
        help="layer-times YAML to fit the simulator's cost model (default: built-in Llama-3.1-8B on H100)",
    )
    parser.add_argument("--model", help="entry of --cost-model to use (default: the first)")


def _token_counter(tokenizer_path: str | None):
    if tokenizer_path is None:
        return lambda text: len(text.encode("utf-8")) + 1
    from transformers import AutoTokenizer  # only needed for this option

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    return lambda text: len(tokenizer(text)["input_ids"])


def _lengths_from_jsonl(spec: dict[str, Any], base: Path) -> list[int]:
    path = Path(spec["data"])
    path = path if path.is_absolute() else base / path
    field = spec.get("text_field", "text")
    count = _token_counter(spec.get("tokenizer"))
    lengths = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            if field not in record:
                raise ScheduleError(f"job {spec.get('name')!r}: {path} line {number} has no field {field!r}")
            lengths.append(count(str(record[field])))
    return lengths


def load_jobs(path: Path) -> list[Job]:
    """Read a jobs YAML file (format in the module docstring)."""
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    specs = document.get("jobs") if isinstance(document, dict) else document
    if not isinstance(specs, list) or not specs:
        raise ScheduleError(f"{path}: expected a non-empty list of jobs (or a 'jobs:' key holding one)")
    jobs = []
    for position, spec in enumerate(specs):
        if not isinstance(spec, dict) or "name" not in spec or "global_batch_size" not in spec:
            raise ScheduleError(f"{path}: job #{position} needs 'name' and 'global_batch_size'")
        if ("lengths" in spec) == ("data" in spec):
            raise ScheduleError(f"{path}: job {spec['name']!r} needs exactly one of 'lengths' or 'data'")
        lengths = spec["lengths"] if "lengths" in spec else _lengths_from_jsonl(spec, path.parent)
        jobs.append(Job(str(spec["name"]), int(spec["global_batch_size"]), lengths))
    return jobs


def _cost_model(args: argparse.Namespace) -> tuple[CostModel, str]:
    if args.cost_model is None:
        return CostModel.default(), "built-in Llama-3.1-8B on H100"
    models = yaml.safe_load(args.cost_model.read_text(encoding="utf-8"))
    key = args.model or next(iter(models))
    if key not in models:
        raise ScheduleError(f"--model {key!r} is not in {args.cost_model} (has {', '.join(models)})")
    return CostModel.from_layer_times(models[key]), f"{key} from {args.cost_model}"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(args: argparse.Namespace) -> int:
    try:
        jobs = load_jobs(args.jobs)
        schedule = plan_schedule(
            jobs,
            stages=args.stages,
            capacity=args.capacity,
            pad_multiple=args.pad_multiple,
            time_limit_s=args.time_limit,
            use_milp=not args.no_milp,
        )
        verify_schedule(schedule, jobs)
        cost, cost_label = _cost_model(args)
    except (ScheduleError, OSError) as error:
        print(f"lorafusion plan: error: {error}", file=sys.stderr)
        return 2

    systems = simulate_systems(schedule, jobs, cost)  # baselines: lorafusion.scheduler.baselines
    ours = systems["lorafusion"]
    solve_times = [p.solve_time_s for p in schedule.packings]
    solvers = ", ".join(f"{name} x{count}" for name, count in Counter(p.solver for p in schedule.packings).items())
    groups = " ".join("[" + ", ".join(g) + "]" for g in schedule.groups)

    print(f"jobs: {len(jobs)}, samples: {sum(len(j.lengths) for j in jobs)}, groups: {groups}")
    print(
        f"microbatches: {schedule.num_real_microbatches} (+{schedule.num_noops} no-ops), "
        f"fill ratio {schedule.fill_ratio:.1%} (stages={args.stages}, capacity={args.capacity})"
    )
    print(
        f"packings: {len(solve_times)} ({solvers}); solve time median {statistics.median(solve_times):.3f} s, "
        f"p95 {_percentile(solve_times, 0.95):.3f} s, total {sum(solve_times):.2f} s"
    )
    print(
        f"simulated ({cost_label}): {ours.tokens_per_s:,.0f} tokens/s, makespan {ours.makespan_s:.2f} s, "
        f"bubble {ours.bubble_fraction:.1%}"
    )
    for name, result in systems.items():
        if name != "lorafusion":
            print(
                f"  {name}: {result.tokens_per_s:,.0f} tokens/s, bubble {result.bubble_fraction:.1%}; "
                f"speedup {ours.tokens_per_s / result.tokens_per_s:.2f}x over {name}"
            )
    if args.out is not None:
        args.out.write_text(schedule.to_json() + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
    return 0
