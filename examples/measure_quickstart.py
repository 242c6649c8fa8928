"""Runs the quickstart afresh and produces every figure the README states about it: per job the
first and last loss, the held-out exact-match accuracy of its adapter and of the base model alone
(both by `lorafusion eval`), and the run's CPU time (user + system of `lorafusion train`, all
threads, as `time` reports them) with the load average it ran under.

    python examples/measure_quickstart.py                 # print the README block
    python examples/measure_quickstart.py --write-readme  # and replace it in README.md

The README block is the text between the two QUICKSTART_MARKERS; tests/runtime/test_quickstart_learns.py
reads its table back and holds a fresh run to it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import resource
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
README = HERE.parent / "README.md"
QUICKSTART_MARKERS = ("<!-- quickstart figures: written by examples/measure_quickstart.py -->", "<!-- end of quickstart figures -->")


def run_quickstart(output_dir: Path) -> dict:
    """`lorafusion train` on examples/quickstart.yaml with output_dir replaced: its CPU and wall
    time, the load average before it, and its closing summary."""
    config = yaml.safe_load((HERE / "quickstart.yaml").read_text())
    config["output_dir"] = str(output_dir)
    for job in config["jobs"]:
        job["data"] = str(HERE / job["data"])
        job["eval_data"] = str(HERE / job["eval_data"])
    path = output_dir.parent / "quickstart.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-m", "lorafusion.cli", "train", str(path), "--no-progress"], check=True, capture_output=True, text=True
    )
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "config": config,
        "summary": run.stdout.strip(),
        "user_s": after.ru_utime - before.ru_utime,
        "system_s": after.ru_stime - before.ru_stime,
        "wall_s": wall,
        "load": load,
    }


def exact_match(eval_file: str, model: Path, adapter: Path | None) -> tuple[int, int]:
    """(right, total) as `lorafusion eval` prints them."""
    from lorafusion.cli import main

    arguments = ["eval", eval_file, "--model", str(model), "--show-errors", "0"]
    if adapter is not None:
        arguments += ["--adapter", str(adapter)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(arguments) == 0
    right, total = re.search(r"exact match: (\d+)/(\d+)", out.getvalue()).groups()
    return int(right), int(total)


def parameters(directory: Path) -> int:
    """Parameters stored in the safetensors files of a model or adapter directory."""
    from safetensors import safe_open

    count = 0
    for path in directory.glob("*.safetensors"):
        with safe_open(path, "pt") as tensors:
            count += sum(math.prod(tensors.get_slice(name).get_shape()) for name in tensors.keys())
    return count


def readme_block(measured: dict, output_dir: Path) -> str:
    metrics = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    rows = ["| job | loss, step 1 -> last | held-out exact match | base model alone |", "|---|---|---|---|"]
    for job in measured["config"]["jobs"]:
        name = job["name"]
        losses = [m["loss"] for m in metrics if m["job"] == name]
        right, total = exact_match(job["eval_data"], output_dir / "base_model", output_dir / name)
        base_right, _ = exact_match(job["eval_data"], output_dir / "base_model", None)
        rows.append(
            f"| {name} ({job['max_steps']} steps) | {losses[0]:.2f} -> {losses[-1]:.3g} | {right / total:.1%} ({right}/{total}) "
            f"| {base_right / total:.1%} ({base_right}/{total}) |"
        )
    cpu = measured["user_s"] + measured["system_s"]
    adapters = sorted({parameters(output_dir / job["name"]) for job in measured["config"]["jobs"]})
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = os.environ.get("OMP_NUM_THREADS")
    threads_note = f"OMP_NUM_THREADS={threads}" if threads else "threads as `lorafusion train` chooses them"
    return "\n".join(
        [
            QUICKSTART_MARKERS[0],
            *rows,
            "",
            textwrap.fill(
                f"Base model: {parameters(output_dir / 'base_model'):,} parameters, frozen; adapters: "
                f"{' to '.join(f'{count:,}' for count in adapters)} each. "
                f"The run took {cpu:.0f} s of CPU ({measured['user_s']:.1f} s user and {measured['system_s']:.1f} s "
                f"system, {measured['wall_s']:.0f} s wall) on a {cores}-core machine (load average "
                f"{measured['load']:.1f} at its start; {threads_note}).",
                width=100,
                break_on_hyphens=False,
            ),
            QUICKSTART_MARKERS[1],
        ]
    )


def write_readme(block: str, readme: Path = README) -> None:
    """Replace the text from the first marker to the second, both included, by `block`."""
    text = readme.read_text(encoding="utf-8")
    start, end = (text.find(marker) for marker in QUICKSTART_MARKERS)
    if start < 0 or end < start:
        raise SystemExit(f"{readme}: the quickstart markers {QUICKSTART_MARKERS} are missing")
    end += len(QUICKSTART_MARKERS[1])
    readme.write_text(text[:start] + block + text[end:], encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-readme", action="store_true", help="replace the figures' block in README.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        output_dir = Path(tmp) / "run"
        measured = run_quickstart(output_dir)
        print(measured["summary"])
        block = readme_block(measured, output_dir)
    print(block)
    if args.write_readme:
        write_readme(block)
        print(f"wrote {README}")


if __name__ == "__main__":
    main()
