"""Shared benchmark plumbing: timing, machine description, CSV/PNG output.

Timings on a GPU come from triton.testing.do_bench (median over repetitions, L2 flushed); on the
CPU from a plain median of wall-clock repetitions. Every ratio a benchmark reports is between
numbers measured in the same run.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib.metadata
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def bench_arguments(doc: str) -> argparse.ArgumentParser:
    """The arguments every benchmark script takes: --device and --out-dir (add more to the parser)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    return parser


def new_figure(*args, **kwargs):
    """A matplotlib figure on the file-only backend (no display on benchmark machines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def time_ms(fn: Callable[[], object], device: torch.device, grad_to_none=None, repetitions: int = 5) -> float:
    """Median milliseconds of fn()."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, grad_to_none=grad_to_none, return_mode="median"))
    fn()  # warm-up
    samples = []
    for _ in range(repetitions):
        for tensor in grad_to_none or ():
            tensor.grad = None
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Peak CUDA memory fn() allocates beyond what was allocated before, in MiB (NaN off the GPU)."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info(device: torch.device) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "peft": _version("peft"),
        "lorafusion": _version("lorafusion"),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def write_results(name: str, rows: list[dict], info: dict, out_dir: Path = RESULTS_DIR) -> Path:
    """Writes <name>.csv and <name>.machine.json; returns the CSV path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / f"{name}.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / f"{name}.machine.json").write_text(json.dumps(info, indent=2) + "\n")
    return csv_path


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r[c])) for r in rows)) for c in columns}
    print("  ".join(c.rjust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(_fmt(row[c]).rjust(widths[c]) for c in columns))


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)
