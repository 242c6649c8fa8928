"""Benchmark of the multi-job scheduler on synthetic summarisation-like workloads.

`python benchmarks/bench_scheduler.py` runs the full sweep (4 jobs, 64 samples per global batch,
S in {1, 2, 4, 8}) and writes benchmarks/results/scheduler_cpu.{csv,md,png}: fill ratio, solver time
per (global batch, group) (median, p95), no-ops, and simulated speedup over the Megatron-style and
mLoRA-style baselines (simulated with the built-in Llama-3.1-8B/H100 cost model; the solver times
are measured on this CPU).

Under pytest (the project collects benchmarks/bench_*.py) the `test_*` functions are a tiny
pytest-benchmark suite that runs in a few seconds.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import platform
import statistics
import time
from collections import Counter
from pathlib import Path

import numpy as np
import scipy

from lorafusion.scheduler import (
    CostModel,
    Job,
    Microbatch,
    megatron_baseline,
    megatron_order,
    mlora_baseline,
    mlora_order,
    pack,
    plan_schedule,
    simulate,
    verify_schedule,
)

RESULTS = Path(__file__).resolve().parent / "results"
MAX_TOKENS = 4096
WORKLOADS = {
    "short (mean 600)": (600, 600, 600, 600),
    "medium (mean 900)": (900, 900, 900, 900),
    "long (mean 1700)": (1700, 1700, 1700, 1700),
    "mixed (600/900/1700/1200)": (600, 900, 1700, 1200),
}


def lognormal_lengths(mean: float, count: int, rng: np.random.Generator, sigma: float = 0.8) -> list[int]:
    """Summarisation-like lengths: log-normal with the given mean, capped at MAX_TOKENS."""
    mu = np.log(mean) - sigma**2 / 2
    return np.clip(np.round(rng.lognormal(mu, sigma, count)), 16, MAX_TOKENS).astype(int).tolist()


def make_jobs(means: tuple[int, ...], global_batch_size: int, global_batches: int, seed: int) -> list[Job]:
    rng = np.random.default_rng(seed)
    return [
        Job(f"job{k}", global_batch_size, lognormal_lengths(mean, global_batch_size * global_batches, rng))
        for k, mean in enumerate(means)
    ]


def unpadded(microbatches: list[Microbatch]) -> list[Microbatch]:
    """Microbatches costed by their real tokens instead of their padded size."""
    return [Microbatch(mb.samples, mb.real_tokens, mb.noop) for mb in microbatches]


def measure(jobs: list[Job], stages: int, capacity: int, time_limit_s: float, cost: CostModel) -> dict:
    start = time.perf_counter()
    schedule = plan_schedule(jobs, stages, capacity, time_limit_s=time_limit_s)
    plan_s = time.perf_counter() - start
    verify_schedule(schedule, jobs)
    ours = simulate(schedule.microbatches, stages, cost)
    megatron = megatron_baseline(jobs, stages, capacity, cost)
    mlora = mlora_baseline(jobs, stages, capacity, cost)
    # The same baseline orders without their padding: what is left of the speedup is the scheduling.
    megatron_unpadded = simulate(unpadded(megatron_order(jobs, stages, capacity)), stages, cost)
    mlora_unpadded = simulate(unpadded(mlora_order(jobs, stages, capacity)), stages, cost)
    solve = sorted(p.solve_time_s for p in schedule.packings)
    return {
        "stages": stages,
        "groups": len(schedule.groups),
        "microbatches": schedule.num_real_microbatches,
        "noops": schedule.num_noops,
        "fill_ratio": schedule.fill_ratio,
        "packings": len(solve),
        "solve_median_s": statistics.median(solve),
        "solve_p95_s": solve[min(len(solve) - 1, int(0.95 * len(solve)))],
        "plan_total_s": plan_s,
        "solvers": " ".join(f"{k}:{v}" for k, v in sorted(Counter(p.solver for p in schedule.packings).items())),
        "bubble": ours.bubble_fraction,
        "tokens_per_s": ours.tokens_per_s,
        "speedup_vs_megatron": ours.tokens_per_s / megatron.tokens_per_s,
        "speedup_vs_mlora": ours.tokens_per_s / mlora.tokens_per_s,
        "speedup_vs_megatron_unpadded": ours.tokens_per_s / megatron_unpadded.tokens_per_s,
        "speedup_vs_mlora_unpadded": ours.tokens_per_s / mlora_unpadded.tokens_per_s,
        "megatron_bubble": megatron.bubble_fraction,
        "mlora_bubble": mlora.bubble_fraction,
    }


def machine_header() -> list[str]:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        cpu = f"{names[0]} x{len(names)}" if names else cpu
    return [
        f"date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"device: CPU only ({cpu}); solver times measured here, throughput simulated with the "
        "built-in Llama-3.1-8B/H100 cost model",
        f"python {platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__} (HiGHS milp)",
    ]


def write_results(rows: list[dict], header: list[str], config: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0])
    with (RESULTS / "scheduler_cpu.csv").open("w", newline="") as f:
        for line in [*header, config]:
            f.write(f"# {line}\n")
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)

    shown = [
        ("workload", "{}"), ("stages", "{}"), ("groups", "{}"), ("microbatches", "{}"), ("noops", "{}"),
        ("fill_ratio", "{:.1%}"), ("solve_median_s", "{:.3f}"), ("solve_p95_s", "{:.3f}"), ("solvers", "{}"),
        ("bubble", "{:.1%}"), ("speedup_vs_megatron", "{:.2f}x"), ("speedup_vs_mlora", "{:.2f}x"),
        ("speedup_vs_megatron_unpadded", "{:.2f}x"), ("speedup_vs_mlora_unpadded", "{:.2f}x"),
    ]  # fmt: skip
    lines = ["# Scheduler benchmark (CPU)", "", *(f"- {line}" for line in [*header, config]), ""]
    lines.append("| " + " | ".join(name for name, _ in shown) + " |")
    lines.append("|" + "---|" * len(shown))
    for row in rows:
        lines.append("| " + " | ".join(fmt.format(row[name]) for name, fmt in shown) + " |")
    (RESULTS / "scheduler_cpu.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for workload in dict.fromkeys(r["workload"] for r in rows):
        sel = [r for r in rows if r["workload"] == workload]
        stages = [r["stages"] for r in sel]
        axes[0].plot(stages, [r["speedup_vs_megatron"] for r in sel], marker="o", label=workload)
        axes[1].plot(stages, [r["speedup_vs_mlora"] for r in sel], marker="o", label=workload)
        axes[2].plot(stages, [100 * r["fill_ratio"] for r in sel], marker="o", label=workload)
    titles = ["simulated speedup vs Megatron-style", "simulated speedup vs mLoRA-style", "fill ratio (%)"]
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("pipeline stages S")
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    axes[0].axhline(1.3, color="grey", linestyle="--", linewidth=1)
    axes[1].axhline(1.15, color="grey", linestyle="--", linewidth=1)
    axes[2].axhline(97, color="grey", linestyle="--", linewidth=1)
    axes[2].legend(fontsize=8)
    fig.suptitle("lorafusion scheduler, 4 jobs x 64 samples/global batch (CPU solver, simulated H100 cost)")
    fig.tight_layout()
    fig.savefig(RESULTS / "scheduler_cpu.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--global-batches", type=int, default=4, help="global batches per job")
    parser.add_argument("--capacity", type=int, default=8192)
    parser.add_argument("--time-limit", type=float, default=1.0, help="MILP time limit per packing (s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cost = CostModel.default()
    rows = []
    for name, means in WORKLOADS.items():
        jobs = make_jobs(means, 64, args.global_batches, args.seed)
        for stages in (1, 2, 4, 8):
            row = {"workload": name, **measure(jobs, stages, args.capacity, args.time_limit, cost)}
            rows.append(row)
            print(
                f"{name:28s} S={stages}: fill {row['fill_ratio']:.1%}, no-ops {row['noops']}, "
                f"solve median {row['solve_median_s']:.3f}s p95 {row['solve_p95_s']:.3f}s, "
                f"speedup {row['speedup_vs_megatron']:.2f}x Megatron, {row['speedup_vs_mlora']:.2f}x mLoRA"
            )
    config = (
        f"config: 4 jobs x 64 samples per global batch x {args.global_batches} global batches, capacity "
        f"{args.capacity}, lengths log-normal (sigma 0.8) capped at {MAX_TOKENS}, MILP time limit "
        f"{args.time_limit} s, pad_multiple 1, seed {args.seed}"
    )
    write_results(rows, machine_header(), config)
    print(f"wrote {RESULTS}/scheduler_cpu.{{csv,md,png}}")


def test_pack_one_global_batch(benchmark):
    rng = np.random.default_rng(0)
    tokens = lognormal_lengths(900, 32, rng) + lognormal_lengths(600, 32, rng)
    segments = [0] * 32 + [1] * 32
    result = benchmark.pedantic(pack, args=(segments, tokens, 8192), kwargs={"time_limit_s": 0.3}, rounds=3)
    assert result.num_bins <= result.greedy_bins


def test_plan_and_simulate_small_workload(benchmark):
    jobs = make_jobs((600, 1700), 16, 2, seed=1)

    def plan_and_simulate():
        schedule = plan_schedule(jobs, 4, 8192, time_limit_s=0.2)
        return schedule, simulate(schedule.microbatches, 4, CostModel.default())

    schedule, result = benchmark.pedantic(plan_and_simulate, rounds=2)
    verify_schedule(schedule, jobs)
    assert result.tokens == sum(sum(j.lengths) for j in jobs)


if __name__ == "__main__":
    main()
