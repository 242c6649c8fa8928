"""Benchmark of the multi-job scheduler: predicted throughput of every system, and planning time.

`python benchmarks/bench_scheduler.py` runs two sweeps and writes benchmarks/results/scheduler_cpu.{csv,md,png}
and scheduler_planning_cpu.csv:

1. throughput: 4 jobs x 16 samples per global batch (the global batch of LoRAFusion's published
   Llama-3.1-70B runs) on four synthetic summarisation-like length distributions, S in {1, 2, 4, 8},
   capacity 6144. For each workload it prints the predicted tokens/s of LoRAFusion's schedule and
   of every baseline of lorafusion.scheduler.baselines (Megatron-LM, mLoRA as LoRAFusion's
   evaluation ran it, mLoRA's own system; the padded "capacity // longest" variants as extra rows),
   all simulated with the Llama-3.1-70B/H100 cost model (measured per-layer times, activation
   checkpointing), so that they can be set against measured cluster results;
2. planning: 4, 16 and 64 jobs on the mixed workload at S = 4, planning time per global batch
   (median, p95; measured on this CPU), the one-off grouping choice, microbatches and fill, against
   the heuristic-only planner (use_milp=False) measured in the same run.

Under pytest (the project collects benchmarks/bench_*.py) the `test_*` functions are a tiny
pytest-benchmark suite that runs in a few seconds on 2 cores.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import platform
import time
from collections import Counter
from pathlib import Path

import numpy as np
import scipy

from lorafusion.scheduler import (
    CostModel,
    Job,
    PackingProblem,
    pack_global_batch,
    plan_schedule,
    simulate_systems,
    verify_schedule,
)
from lorafusion.scheduler.baselines import (
    MEGATRON_MICRO_BATCH_SIZE,
    MLORA_EVALUATED_MICRO_BATCH_SIZE,
    MLORA_MICRO_BATCH_SIZE,
    SYSTEMS,
)

RESULTS = Path(__file__).resolve().parent / "results"
MAX_TOKENS = 4096
GLOBAL_BATCH_SIZE = 16
WORKLOADS = {
    "short (mean 600)": (600, 600, 600, 600),
    "medium (mean 900)": (900, 900, 900, 900),
    "long (mean 1700)": (1700, 1700, 1700, 1700),
    "mixed (600/900/1700/1200)": (600, 900, 1700, 1200),
}
MIXED = WORKLOADS["mixed (600/900/1700/1200)"]
BASELINES = [s for s in SYSTEMS if s != "lorafusion"]


def lognormal_lengths(mean: float, count: int, rng: np.random.Generator, sigma: float = 0.8) -> list[int]:
    """Summarisation-like lengths: log-normal with the given mean, capped at MAX_TOKENS."""
    mu = np.log(mean) - sigma**2 / 2
    return np.clip(np.round(rng.lognormal(mu, sigma, count)), 16, MAX_TOKENS).astype(int).tolist()


def make_jobs(means: tuple[int, ...], num_jobs: int, global_batches: int, seed: int) -> list[Job]:
    """``num_jobs`` jobs cycling through ``means``, GLOBAL_BATCH_SIZE samples per global batch."""
    rng = np.random.default_rng(seed)
    size = GLOBAL_BATCH_SIZE
    return [
        Job(f"job{k}", size, lognormal_lengths(means[k % len(means)], size * global_batches, rng))
        for k in range(num_jobs)
    ]


def throughput_row(jobs: list[Job], stages: int, capacity: int, time_limit_s: float, cost: CostModel) -> dict:
    schedule = plan_schedule(jobs, stages, capacity, time_limit_s=time_limit_s, cost=cost)
    verify_schedule(schedule, jobs)
    systems = simulate_systems(schedule, jobs, cost)
    ours = systems["lorafusion"]
    row = {
        "stages": stages,
        "groups": len(schedule.groups),
        "microbatches": schedule.num_real_microbatches,
        "noops": schedule.num_noops,
        "fill_ratio": schedule.fill_ratio,
        "bubble": ours.bubble_fraction,
    }
    for name, result in systems.items():
        row[f"tokens_per_s_{name}"] = result.tokens_per_s
    for name in BASELINES:
        row[f"speedup_vs_{name}"] = ours.tokens_per_s / systems[name].tokens_per_s
    return row


def planning_row(num_jobs: int, global_batches: int, capacity: int, time_limit_s: float, use_milp: bool) -> dict:
    jobs = make_jobs(MIXED, num_jobs, global_batches, seed=1)
    start = time.perf_counter()
    schedule = plan_schedule(jobs, 4, capacity, time_limit_s=time_limit_s, use_milp=use_milp)
    total = time.perf_counter() - start
    verify_schedule(schedule, jobs)
    times = np.array(schedule.batch_times_s)
    return {
        "jobs": num_jobs,
        "planner": "heuristic+milp" if use_milp else "heuristic only",
        "global_batches": global_batches,
        "groups": len(schedule.groups),
        "batch_median_s": float(np.median(times)),
        "batch_p95_s": float(np.percentile(times, 95)),
        "batch_max_s": float(times.max()),
        "grouping_s": schedule.grouping_time_s,
        "total_s": total,
        "microbatches": schedule.num_real_microbatches,
        "noops": schedule.num_noops,
        "fill_ratio": schedule.fill_ratio,
        "solvers": " ".join(f"{k}:{v}" for k, v in sorted(Counter(p.solver for p in schedule.packings).items())),
    }


def machine_header(cost_label: str) -> list[str]:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        cpu = f"{names[0]} x{len(names)}" if names else cpu
    return [
        f"date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"device: CPU only ({cpu}, shared with other work); planning times measured here, throughput simulated "
        f"with {cost_label}",
        f"python {platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__} (HiGHS milp)",
    ]


def write_csv(path: Path, rows: list[dict], comments: list[str]) -> None:
    with path.open("w", newline="") as f:
        for line in comments:
            f.write(f"# {line}\n")
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(rows: list[dict], shown: list[tuple[str, str, str]]) -> list[str]:
    lines = ["| " + " | ".join(title for _, title, _ in shown) + " |", "|" + "---|" * len(shown)]
    for row in rows:
        lines.append("| " + " | ".join(fmt.format(row[key]) for key, _, fmt in shown) + " |")
    return lines


def write_results(throughput: list[dict], planning: list[dict], header: list[str], config: list[str]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_csv(RESULTS / "scheduler_cpu.csv", throughput, header + config)
    write_csv(RESULTS / "scheduler_planning_cpu.csv", planning, header + config)
    kilo = "{:,.0f}"
    shown = [("workload", "workload", "{}"), ("stages", "S", "{}"), ("microbatches", "microbatches", "{}"),
             ("noops", "no-ops", "{}"), ("fill_ratio", "fill", "{:.1%}"), ("bubble", "bubble", "{:.1%}")]
    shown += [(f"tokens_per_s_{s}", f"{s} tok/s", kilo) for s in SYSTEMS]
    shown += [(f"speedup_vs_{s}", f"vs {s}", "{:.2f}x") for s in BASELINES]
    planning_shown = [("jobs", "jobs", "{}"), ("planner", "planner", "{}"), ("global_batches", "global batches", "{}"),
                      ("groups", "groups", "{}"), ("batch_median_s", "per global batch median (s)", "{:.3f}"),
                      ("batch_p95_s", "p95 (s)", "{:.3f}"), ("batch_max_s", "max (s)", "{:.3f}"),
                      ("grouping_s", "grouping choice, once (s)", "{:.2f}"), ("microbatches", "microbatches", "{}"),
                      ("noops", "no-ops", "{}"), ("fill_ratio", "fill", "{:.2%}"), ("solvers", "packings", "{}")]  # fmt: skip
    lines = ["# Scheduler benchmark (CPU planning, simulated H100 throughput)", ""]
    lines += [f"- {line}" for line in header + config] + [""]
    lines += ["## Predicted throughput, every system (tokens/s) and LoRAFusion's speedup over each", ""]
    lines += ["`megatron-lm`, `mlora-as-evaluated` and `mlora-system` are the baselines modelled as those systems run "
              "(lorafusion/scheduler/baselines.py); `megatron-padded` and `mlora-padded` are the earlier "
              "`capacity // longest sample`, padded-to-the-longest variants, kept for reference only.", ""]  # fmt: skip
    lines += markdown_table(throughput, shown) + [""]
    lines += ["## Planning time per global batch (mixed workload, S = 4)", ""]
    lines += markdown_table(planning, planning_shown)
    (RESULTS / "scheduler_cpu.md").write_text("\n".join(lines) + "\n")
    plot(throughput, planning)


def plot(throughput: list[dict], planning: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    for workload in dict.fromkeys(r["workload"] for r in throughput):
        sel = [r for r in throughput if r["workload"] == workload]
        stages = [r["stages"] for r in sel]
        for ax, system in zip(axes[:3], ("megatron-lm", "mlora-as-evaluated", "mlora-system")):
            ax.plot(stages, [r[f"speedup_vs_{system}"] for r in sel], marker="o", label=workload)
    for ax, system in zip(axes[:3], ("Megatron-LM", "mLoRA as evaluated", "mLoRA's own system")):
        ax.set_title(f"predicted speedup vs {system}")
        ax.set_xlabel("pipeline stages S")
        ax.set_xscale("log", base=2)
        ax.axhline(1.0, color="grey", linewidth=1)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    ours = [r for r in planning if r["planner"] == "heuristic+milp"]
    jobs = [r["jobs"] for r in ours]
    axes[3].plot(jobs, [r["batch_median_s"] for r in ours], marker="o", label="median")
    axes[3].plot(jobs, [r["batch_p95_s"] for r in ours], marker="o", label="p95")
    axes[3].set_title("planning time per global batch (s, this CPU)")
    axes[3].set_xlabel("jobs")
    axes[3].set_xscale("log", base=2)
    axes[3].legend(fontsize=8)
    axes[3].grid(alpha=0.3)
    fig.suptitle("lorafusion scheduler: Llama-3.1-70B/H100 cost model, 16 samples per global batch")
    fig.tight_layout()
    fig.savefig(RESULTS / "scheduler_cpu.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--global-batches", type=int, default=8, help="global batches per job (throughput sweep)")
    parser.add_argument("--planning-batches", type=int, default=25, help="global batches per job (planning sweep)")
    parser.add_argument("--capacity", type=int, default=6144)
    parser.add_argument("--time-limit", type=float, default=0.5, help="MILP budget per global batch (s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cost = CostModel.preset("llama-3.1-70b")
    cost_label = "the Llama-3.1-70B/H100 cost model (CostModel.preset, activation checkpointing)"
    throughput = []
    for name, means in WORKLOADS.items():
        jobs = make_jobs(means, 4, args.global_batches, args.seed)
        for stages in (1, 2, 4, 8):
            row = {"workload": name, **throughput_row(jobs, stages, args.capacity, args.time_limit, cost)}
            throughput.append(row)
            predicted = ", ".join(f"{s} {row[f'tokens_per_s_{s}']:,.0f}" for s in SYSTEMS)
            print(f"{name:28s} S={stages}: predicted tokens/s: {predicted}")
    planning = []
    for num_jobs in (4, 16, 64):
        for use_milp in (True, False):
            row = planning_row(num_jobs, args.planning_batches, args.capacity, args.time_limit, use_milp)
            planning.append(row)
            print(
                f"{num_jobs:3d} jobs, {row['planner']:15s}: per global batch median {row['batch_median_s']:.3f} s, "
                f"p95 {row['batch_p95_s']:.3f} s; grouping {row['grouping_s']:.2f} s once; "
                f"{row['microbatches']} microbatches, fill {row['fill_ratio']:.2%}"
            )
    config = [
        f"config: {GLOBAL_BATCH_SIZE} samples per global batch per job, capacity {args.capacity}, lengths "
        f"log-normal (sigma 0.8) capped at {MAX_TOKENS}, pad_multiple 1, MILP budget {args.time_limit} s per global "
        f"batch, seed {args.seed}; throughput: 4 jobs x {args.global_batches} global batches; planning: "
        f"{args.planning_batches} global batches per job",
        f"baseline micro-batch sizes (samples): Megatron-LM {MEGATRON_MICRO_BATCH_SIZE}, mLoRA as evaluated "
        f"{MLORA_EVALUATED_MICRO_BATCH_SIZE}, mLoRA's own {MLORA_MICRO_BATCH_SIZE} (padded to a multiple of 8)",
    ]
    write_results(throughput, planning, machine_header(cost_label), config)
    print(f"wrote {RESULTS}/scheduler_cpu.{{csv,md,png}} and scheduler_planning_cpu.csv")


def test_pack_one_global_batch(benchmark):
    rng = np.random.default_rng(0)
    tokens = lognormal_lengths(900, 32, rng) + lognormal_lengths(600, 32, rng)
    problem = PackingProblem(tuple([0] * 32 + [1] * 32), tuple(tokens), 8192, optimise_leftover=False)
    result = benchmark.pedantic(pack_global_batch, args=([problem, problem], 0.3), rounds=3)
    assert all(p.num_bins <= p.greedy_bins for p in result.packings)


def test_plan_and_simulate_small_workload(benchmark):
    jobs = make_jobs((600, 1700), 2, 2, seed=1)
    cost = CostModel.preset("llama-3.1-70b")

    def plan_and_simulate():
        schedule = plan_schedule(jobs, 4, 8192, time_limit_s=0.2)
        return schedule, simulate_systems(schedule, jobs, cost)

    schedule, systems = benchmark.pedantic(plan_and_simulate, rounds=2)
    verify_schedule(schedule, jobs)
    assert {r.tokens for r in systems.values()} == {sum(sum(j.lengths) for j in jobs)}


if __name__ == "__main__":
    main()
