"""Jobs arriving over time, measured end to end on the CPU at tiny size (issue 14).

`python benchmarks/bench_online_cpu.py` replays one Poisson trace against the real service
(benchmarks/service_cpu.py: `lorafusion serve` in this process, 2-layer Llama of hidden size 32,
byte tokenizer, real HTTP) three ways, each on a fresh service: (a) ``fifo``, one job at a time in
arrival order (the service is handed the next job when the one before has finished, so each job
trains alone), (b) ``all_live``, every running job in each planning window, (c) ``size_aware``,
the least work left first (SERVER.yaml's `admission`). It writes
benchmarks/results/online_cpu_e2e.csv (per policy), online_cpu_e2e_jobs.csv and
online_cpu_e2e.png (per job) and the end-to-end section of online_table.md.

The trace: ``--jobs`` jobs of 8 samples per global batch, each with log-uniform 4-64 global
batches and log-normal sample lengths (the scheduler benchmark's ``lognormal_lengths``) around one
of 150/225/425/300 tokens (a quarter of its means, for a toy model); Poisson arrivals at ``--load``
times the rate one job at a time can serve, from the seconds per token of a calibration job trained
alone on the same machine just before. torch runs one intra-op thread throughout: with torch's
default two on the shared 2-core machine, one job's tokens/s in the service's log went from about
800 to 24,000 within one run as the others' load changed, which would favour whichever policy ran
at a quiet moment. Times are CPU seconds of a toy model on a shared machine:
only the ratios between the policies of one run mean anything, and nothing here says what a GPU
does. Under pytest, `test_*` is a small pytest-benchmark check of the measurement path (seconds).
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from bench_online import RESULTS, measure_end_to_end, poisson_arrivals, replace_marked_section
from bench_scheduler import lognormal_lengths, machine_header, markdown_table, write_csv
from service_cpu import one_at_a_time, tiny_cpu_service

from lorafusion.scheduler import Job
from lorafusion.scheduler.online import Arrival, OnlineResult

POLICIES = ("fifo", "all_live", "size_aware")
BATCH = 8
MEANS = (150, 225, 425, 300)
MAX_LENGTH = 1024
MIN_BATCHES, MAX_BATCHES = 4, 64
E2E_MARKER = "end-to-end on CPU (benchmarks/bench_online_cpu.py)"


def cpu_jobs(num_jobs: int, rng: np.random.Generator) -> list[Job]:
    jobs = []
    for k in range(num_jobs):
        batches = int(round(math.exp(rng.uniform(math.log(MIN_BATCHES), math.log(MAX_BATCHES)))))
        lengths = np.minimum(lognormal_lengths(MEANS[k % len(MEANS)], BATCH * batches, rng), MAX_LENGTH)
        jobs.append(Job(f"job{k}", BATCH, [int(n) for n in lengths]))
    return jobs


def seconds_per_token(work_dir: Path, rng: np.random.Generator) -> float:
    """The tiny service's wall seconds per token for a job trained alone (from its submission)."""
    job = Job("calibration", BATCH, [int(n) for n in lognormal_lengths(MEANS[-1], BATCH * 6, rng)])
    with tiny_cpu_service(work_dir) as (submit, finished):
        result = measure_end_to_end([Arrival(job, 0.0)], submit, finished, clock=time.time, timeout_s=600)
    return result.finish_s[job.name] / sum(job.lengths)


def run_policy(policy: str, arrivals: Sequence[Arrival], work_dir: Path, timeout_s: float = 1800) -> OnlineResult:
    """The trace replayed against a fresh tiny service under `policy` (one of POLICIES)."""
    admission = "size_aware" if policy == "fifo" else policy  # with one job at a time, admission has no choice
    with tiny_cpu_service(work_dir, admission=admission) as (submit, finished):
        if policy == "fifo":
            with one_at_a_time(submit, finished) as (queue, done):
                return measure_end_to_end(arrivals, queue, done, clock=time.time, timeout_s=timeout_s)
        return measure_end_to_end(arrivals, submit, finished, clock=time.time, timeout_s=timeout_s)


def load_average() -> float:
    return os.getloadavg()[0]


def measure(arrivals: Sequence[Arrival], work_dir: Path, policies: Sequence[str] = POLICIES, rounds: int = 1) -> list[dict]:
    """One row per round and policy: its result and the 1-minute load average before and after it.
    Every other round runs the policies in reverse order, so that a drift of the machine's load
    over the run does not favour the policies that run first."""
    rows = []
    for round_ in range(rounds):
        for policy in policies if round_ % 2 == 0 else policies[::-1]:
            before = load_average()
            started = time.perf_counter()
            result = run_policy(policy, arrivals, work_dir / f"{policy}-{round_}")
            rows.append({"round": round_, "policy": policy, "result": result, "load_before": before,
                         "load_after": load_average(), "wall_s": time.perf_counter() - started})  # fmt: skip
    return rows


def summary_rows(measured: list[dict]) -> list[dict]:
    """Per round and policy, ratios against FIFO of the same round; then the mean over rounds."""
    fifo = {row["round"]: row["result"] for row in measured if row["policy"] == "fifo"}
    rows = [
        {
            "round": row["round"],
            "policy": row["policy"],
            "jobs": len(row["result"].finish_s),
            "mean_jct_s": row["result"].mean_jct_s,
            "p95_jct_s": row["result"].p95_jct_s,
            "makespan_s": row["result"].makespan_s,
            "tokens_per_s": row["result"].tokens_per_s,
            "mean_jct_vs_fifo": row["result"].mean_jct_s / fifo[row["round"]].mean_jct_s,
            "p95_jct_vs_fifo": row["result"].p95_jct_s / fifo[row["round"]].p95_jct_s,
            "load_before": row["load_before"],
            "load_after": row["load_after"],
        }
        for row in sorted(measured, key=lambda r: (r["round"], POLICIES.index(r["policy"])))
    ]
    rounds = len(fifo)
    if rounds > 1:
        for policy in dict.fromkeys(row["policy"] for row in rows):
            mine = [row for row in rows if row["policy"] == policy]
            rows.append({"round": "mean", "policy": policy, "jobs": mine[0]["jobs"],
                         **{key: float(np.mean([row[key] for row in mine])) for key in list(mine[0])[3:]}})  # fmt: skip
    return rows


def job_rows(arrivals: Sequence[Arrival], measured: list[dict]) -> list[dict]:
    rows = []
    for arrival in sorted(arrivals, key=lambda a: a.at_s):
        job = arrival.job
        row = {"job": job.name, "global_batches": job.num_global_batches, "tokens": sum(job.lengths),
               "arrival_s": arrival.at_s}  # fmt: skip
        for policy in POLICIES:  # the mean over rounds
            jcts = [each["result"].finish_s[job.name] - arrival.at_s for each in measured if each["policy"] == policy]
            if jcts:
                row[f"jct_s_{policy}"] = float(np.mean(jcts))
        rows.append(row)
    return rows


SHOWN = [
    ("round", "round", "{}"),
    ("policy", "policy", "{}"),
    ("mean_jct_s", "mean JCT (s)", "{:.1f}"),
    ("p95_jct_s", "p95 JCT (s)", "{:.1f}"),
    ("mean_jct_vs_fifo", "mean JCT / FIFO", "{:.2f}"),
    ("p95_jct_vs_fifo", "p95 JCT / FIFO", "{:.2f}"),
    ("makespan_s", "makespan (s)", "{:.1f}"),
    ("tokens_per_s", "tokens/s", "{:,.0f}"),
    ("load_before", "load avg before", "{:.1f}"),
    ("load_after", "load avg after", "{:.1f}"),
]


def write_results(summary: list[dict], jobs: list[dict], setup: list[str]) -> None:
    date, device, versions = machine_header("nothing: every time here is measured on this CPU")
    device = device.split(";")[0] + "; every time here is measured on this CPU, none is a GPU figure"
    header = [date, device, versions, *setup]
    write_csv(RESULTS / "online_cpu_e2e.csv", summary, header)
    write_csv(RESULTS / "online_cpu_e2e_jobs.csv", jobs, header)
    shown_jobs = [("job", "job", "{}"), ("global_batches", "global batches", "{}"), ("tokens", "tokens", "{:,}"),
                  ("arrival_s", "arrival (s)", "{:.1f}")] + [
        (f"jct_s_{p}", f"JCT {p} (s)", "{:.1f}") for p in POLICIES if f"jct_s_{p}" in jobs[0]
    ]  # fmt: skip
    lines = [
        "## Measured end to end on the CPU at tiny size (one trace)",
        "",
        "**Measured, not simulated: CPU seconds of a toy model on a shared machine.** The real service "
        "(`lorafusion serve` in-process, real HTTP, benchmarks/service_cpu.py) on a 2-layer Llama (hidden size 32, "
        "byte tokenizer); the trace replayed by bench_online.measure_end_to_end on a fresh service per policy. Only "
        "the ratios between the policies of this run mean anything; nothing here is a GPU figure.",
        "",
        *[f"- {line}" for line in header],
        "",
        *markdown_table(summary, SHOWN),
        "",
        *markdown_table(jobs, shown_jobs),
    ]
    replace_marked_section(RESULTS / "online_table.md", E2E_MARKER, lines)
    plot(jobs)


def plot(jobs: list[dict]) -> None:
    """Each job's completion time under each policy (mean over rounds), jobs in arrival order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = [p for p in POLICIES if f"jct_s_{p}" in jobs[0]]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(policies)
    for k, policy in enumerate(policies):
        ax.bar(np.arange(len(jobs)) + k * width, [float(j[f"jct_s_{policy}"]) for j in jobs], width, label=policy)
    ax.set_xticks(np.arange(len(jobs)) + width * (len(policies) - 1) / 2)
    ax.set_xticklabels([f"{j['job']}\n{int(j['tokens']) / 1000:.0f}k tok" for j in jobs], fontsize=8)
    ax.set_ylabel("job completion time (s, measured)")
    ax.set_title("The tiny service on a shared 2-core CPU: JCT per job (mean over rounds), jobs in arrival order", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "online_cpu_e2e.png", dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--load", type=float, default=0.9)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(args.seed)
    jobs = cpu_jobs(args.jobs, rng)
    with tempfile.TemporaryDirectory(prefix="lorafusion-online-cpu-") as scratch:
        per_token = seconds_per_token(Path(scratch) / "calibration", rng)
        rate = args.load / (per_token * float(np.mean([sum(j.lengths) for j in jobs])))
        arrivals = poisson_arrivals(jobs, rate, rng)
        measured = measure(arrivals, Path(scratch), rounds=args.rounds)
    summary = summary_rows(measured)
    setup = [
        f"trace: {args.jobs} jobs (seed {args.seed}), {BATCH} samples per global batch, global batches log-uniform "
        f"{MIN_BATCHES}-{MAX_BATCHES}, lengths log-normal (sigma 0.8) around {'/'.join(map(str, MEANS))} tokens (capped at {MAX_LENGTH}); "
        f"{sum(sum(j.lengths) for j in jobs):,} tokens in all",
        f"arrivals: Poisson at {rate:.3f} jobs/s, load {args.load} of one job at a time by a calibration job trained "
        f"alone just before ({per_token * 1e3:.2f} ms per token)",
        "service: capacity 2048 tokens, window_batches 2, greedy packing, checkpoint_every 0, lr 1e-3, r 4; "
        "size_aware with max_wait_windows 64; fifo hands the service the next job once the one before finished; "
        "each service trains a one-sample warm-up job before the trace starts; torch intra-op threads: 1",
        f"{args.rounds} rounds, the policies in reverse order every other round; wall time per policy in order run "
        "(s): " + ", ".join(f"{row['policy']} {row['wall_s']:.0f}" for row in measured),
    ]
    write_results(summary, job_rows(arrivals, measured), setup)
    for row in summary:
        print(f"{row['round']!s:>4} {row['policy']:>10}: mean JCT {row['mean_jct_s']:.1f} s, p95 {row['p95_jct_s']:.1f} s "
              f"({row['mean_jct_vs_fifo']:.2f}x / {row['p95_jct_vs_fifo']:.2f}x FIFO)")  # fmt: skip
    print(f"wrote {RESULTS}/online_cpu_e2e.csv, online_cpu_e2e_jobs.csv and the end-to-end section of online_table.md")


def test_each_policy_measured_end_to_end_on_a_tiny_trace(benchmark, tmp_path):
    """A long job, then a short one: one at a time the short one waits for the long one; under
    size_aware it finishes first."""
    arrivals = [Arrival(Job("long", 4, [40] * 64), 0.0), Arrival(Job("short", 2, [30, 25]), 0.05)]
    measured = benchmark.pedantic(measure, args=(arrivals, tmp_path, ("fifo", "size_aware")), rounds=1)
    fifo, size_aware = (row["result"] for row in measured)
    assert fifo.finish_s["long"] < fifo.finish_s["short"]
    assert size_aware.finish_s["short"] < size_aware.finish_s["long"]  # (times on a shared CPU are too noisy to compare)
    summary = summary_rows(measured)
    assert [row["policy"] for row in summary] == ["fifo", "size_aware"] and summary[0]["mean_jct_vs_fifo"] == 1.0
    assert job_rows(arrivals, measured)[1]["jct_s_fifo"] == fifo.finish_s["short"] - 0.05



def test_a_marked_section_is_replaced_in_place_and_kept_when_the_simulated_tables_are_rewritten(tmp_path):
    from bench_online import marked_sections

    table = tmp_path / "table.md"
    table.write_text("# simulated\n")
    replace_marked_section(table, E2E_MARKER, ["first"])
    replace_marked_section(table, E2E_MARKER, ["second", "run"])
    kept = marked_sections(table)
    assert table.read_text() == "# simulated\n\n" + kept and kept.splitlines()[1:3] == ["second", "run"]


if __name__ == "__main__":
    main()
