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
import contextlib
import json
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from lorafusion.safe_yaml import YAMLInputError, load_yaml
from lorafusion.scheduler import (
    CostModel,
    Job,
    ScheduleError,
    plan_schedule,
    simulate_systems,
    verify_schedule,
)


# Far beyond real jobs; a larger value is a typo that would make planning build enormous lists.
MAX_GLOBAL_BATCH_SIZE = 10_000_000


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a {'number' if kind is float else 'whole number'}, got {text!r}") from None
        if not (value > 0 and value < float("inf")):
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jobs", required=True, type=Path, help="YAML file listing the jobs")
    parser.add_argument("--stages", type=_positive(int), default=4, help="pipeline stages S (default 4)")
    parser.add_argument("--capacity", type=_positive(int), default=8192, help="tokens per microbatch (default 8192)")
    parser.add_argument(
        "--pad-multiple", type=_positive(int), default=1, help="pad each job's segment in a microbatch to this multiple"
    )
    parser.add_argument(
        "--time-limit", type=_positive(float), default=0.5, help="MILP time budget per global batch (all its groups together), seconds"
    )
    parser.add_argument("--no-milp", action="store_true", help="greedy first-fit-decreasing packing only")
    parser.add_argument(
        "--out", type=Path, help="write the schedule as JSON to this file, or to stdout with '-' (the summary then goes to stderr); "
        "without --out no file is written"
    )
    parser.add_argument(
        "--cost-model",
        type=Path,
        help="layer-times YAML to fit the simulator's cost model (default: built-in Llama-3.1-8B on H100)",
    )
    parser.add_argument("--model", help="entry of --cost-model to use (default: the first)")


def _token_counter(tokenizer_path: str | None, where: str):
    if tokenizer_path is None:
        return lambda text: len(text.encode("utf-8", errors="surrogatepass")) + 1
    from transformers import AutoTokenizer  # only needed for this option

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path), local_files_only=Path(str(tokenizer_path)).exists())
    except (OSError, ValueError) as error:
        raise ScheduleError(f"{where}.tokenizer: cannot load {tokenizer_path!r}: {' '.join(str(error).split())[:200]}") from None
    return lambda text: len(tokenizer(text)["input_ids"])


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ScheduleError(f"{what} {path}: not valid UTF-8 at byte {error.start}") from None
    except OSError as error:
        raise ScheduleError(f"{what} {path}: cannot read: {error.strerror or error}") from None


def _lengths_from_jsonl(spec: dict[str, Any], base: Path, where: str) -> list[int]:
    if not isinstance(spec["data"], str):
        raise ScheduleError(f"{where}.data: must be a file path, got {spec['data']!r}")
    path = Path(spec["data"])
    path = path if path.is_absolute() else base / path
    field = spec.get("text_field", "text")
    count = _token_counter(spec.get("tokenizer"), where)
    lengths = []
    for number, line in enumerate(_read_text(path, f"{where}.data").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ScheduleError(f"{path}, line {number}: invalid JSON: {error.msg} (column {error.colno})") from None
        except RecursionError:
            raise ScheduleError(f"{path}, line {number}: invalid JSON: nested too deeply") from None
        if not isinstance(record, dict) or field not in record:
            raise ScheduleError(f"{path}, line {number}: expected a JSON object with field {field!r}")
        lengths.append(count(str(record[field])))
    return lengths


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _job(spec: object, where: str, base: Path) -> Job:
    if not isinstance(spec, dict) or "name" not in spec or "global_batch_size" not in spec:
        raise ScheduleError(f"{where}: needs 'name' and 'global_batch_size'")
    size = spec["global_batch_size"]
    if not _is_count(size) or size > MAX_GLOBAL_BATCH_SIZE:
        raise ScheduleError(f"{where}.global_batch_size: must be a whole number in 1..{MAX_GLOBAL_BATCH_SIZE}, got {size!r}")
    if ("lengths" in spec) == ("data" in spec):
        raise ScheduleError(f"{where}: needs exactly one of 'lengths' or 'data'")
    if "lengths" in spec:
        lengths = spec["lengths"]
        if not isinstance(lengths, list) or not all(_is_count(n) for n in lengths):
            raise ScheduleError(f"{where}.lengths: must be a list of token counts >= 1")
    else:
        lengths = _lengths_from_jsonl(spec, base, where)
    return Job(str(spec["name"]), size, lengths)


def load_jobs(path: Path) -> list[Job]:
    """Read a jobs YAML (or JSON) file (format in the module docstring)."""
    try:
        document = load_yaml(_read_text(path, "--jobs"), str(path))
    except YAMLInputError as error:
        raise ScheduleError(str(error)) from None
    specs = document.get("jobs") if isinstance(document, dict) else document
    if not isinstance(specs, list) or not specs:
        raise ScheduleError(f"{path}: expected a non-empty list of jobs (or a 'jobs:' key holding one)")
    return [_job(spec, f"{path}: jobs[{position}]", path.parent) for position, spec in enumerate(specs)]


def _cost_model(args: argparse.Namespace) -> tuple[CostModel, str]:
    if args.cost_model is None:
        return CostModel.default(), "built-in Llama-3.1-8B on H100"
    try:
        models = load_yaml(_read_text(args.cost_model, "--cost-model"), str(args.cost_model))
    except YAMLInputError as error:
        raise ScheduleError(str(error)) from None
    if not isinstance(models, dict) or not models:
        raise ScheduleError(f"--cost-model {args.cost_model}: expected a mapping of model name -> layer times")
    key = args.model or next(iter(models))
    if key not in models:
        raise ScheduleError(f"--model {key!r} is not in {args.cost_model} (has {', '.join(map(str, models))})")
    try:
        return CostModel.from_layer_times(models[key]), f"{key} from {args.cost_model}"
    except KeyError as error:
        raise ScheduleError(f"--cost-model {args.cost_model}: {key}.{error.args[0]} is missing") from None
    except (TypeError, ValueError, AttributeError, ZeroDivisionError, LookupError) as error:
        raise ScheduleError(f"--cost-model {args.cost_model}: entry {key!r} is not a layer-times table ({error})") from None


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(args: argparse.Namespace) -> int:
    try:
        if args.out is not None and not _to_stdout(args) and not args.out.parent.is_dir():
            raise ScheduleError(f"--out {args.out}: directory {args.out.parent} does not exist")
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
    except ScheduleError as error:
        print(f"lorafusion plan: error: {error}", file=sys.stderr)
        return 2

    # With the schedule on stdout, the summary must not mix into it.
    with contextlib.redirect_stdout(sys.stderr) if _to_stdout(args) else contextlib.nullcontext():
        _print_summary(args, jobs, schedule, cost, cost_label)
    if _to_stdout(args):
        sys.stdout.write(schedule.to_json() + "\n")
    elif args.out is not None:
        try:
            args.out.write_text(schedule.to_json() + "\n", encoding="utf-8")
        except OSError as error:
            print(f"lorafusion plan: error: --out {args.out}: {error.strerror or error}", file=sys.stderr)
            return 2
        print(f"wrote {args.out}")
    return 0


def _to_stdout(args: argparse.Namespace) -> bool:
    return args.out is not None and str(args.out) == "-"


def _print_summary(args: argparse.Namespace, jobs, schedule, cost, cost_label: str) -> None:
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
