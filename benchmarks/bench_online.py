"""Jobs that arrive over time (issue 14): job completion time and throughput of FIFO, the service and the bound.

`python benchmarks/bench_online.py` writes benchmarks/results/online_{summary,jobs,windows}.csv,
online_table.md and online.png. Every figure is a prediction of the pipeline simulator
(lorafusion.scheduler.simulator) with the Llama-3.1-8B/H100 cost model (CostModel.preset, fitted to
the LoRAFusion artifact's measured H100 layer times, /work/shared/calibration/layer-times-h100.yaml,
activation checkpointing); nothing is measured on a GPU.

The trace: ``--jobs`` jobs per seed, each with 16 samples per global batch and log-normal sample
lengths around one of the scheduler benchmark's means (600/900/1700/1200 tokens, its
``lognormal_lengths``), its number of global batches log-uniform in [4, 128] (a few long jobs,
many short ones); Poisson arrivals whose rate is ``--load`` times what one-job-at-a-time Megatron-LM
can serve at that stage count (the mean of its per-job times), so FIFO runs at that utilisation;
0.9 for the main table, and 2.0 (``--overload``) for a throughput table: below load 1 every policy
keeps up with the arrivals and throughput over the trace is set by them, above it each policy's
own rate shows.

The policies (lorafusion/scheduler/online.py, whose docstring states the model): (a) ``fifo``, one
job at a time in arrival order, each trained alone as Megatron-LM trains it; ``fifo-planned``, the
same with each job planned alone by our scheduler; (b) ``service``, planning windows of W global
batches over the jobs live at the window start, planned by plan_schedule, a job arriving mid-window
joining at the next one, the pipeline drained between windows, planning hidden behind training;
``service, least work first``, the same windows over only the live jobs that
lorafusion/scheduler/admission.py's select_window_jobs admits (least estimated work left first, as
many as keep the stages busy; jobs left out ``wait`` windows in a row go first); (c) ``offline
bound``, a lower bound no policy beats even knowing every arrival in advance.

Under pytest the `test_*` functions are a small pytest-benchmark suite on a tiny trace (seconds on
2 cores). :func:`measure_end_to_end` is the hook for the end-to-end measurement of the real service
on CPU at tiny size: it replays a trace against anything that can submit a job and report finish
times, and returns the same result type as the simulated policies.
"""

from __future__ import annotations

import argparse
import itertools
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
from bench_scheduler import (
    GLOBAL_BATCH_SIZE,
    MAX_TOKENS,
    MIXED,
    lognormal_lengths,
    machine_header,
    markdown_table,
    write_csv,
)

from lorafusion.scheduler import CostModel, Job
from lorafusion.scheduler.online import (
    AloneRun,
    Arrival,
    OnlineResult,
    fifo,
    megatron_alone,
    offline_bound,
    SizeAware,
    planned_alone,
    planning_windows,
)
from lorafusion.scheduler.planner import PlanOptions

RESULTS = Path(__file__).resolve().parent / "results"
COST_LABEL = (
    "the Llama-3.1-8B/H100 cost model (CostModel.preset('llama-3.1-8b'): a linear fit of the LoRAFusion artifact's "
    "measured H100 per-layer times, /work/shared/calibration/layer-times-h100.yaml; activation checkpointing)"
)
# Job sizes in global batches. Which policy wins on completion time depends on how variable they
# are (with sizes about as variable as exponential ones FIFO and sharing tie on the mean), so two:
SIZES = {
    # squared coefficient of variation 0.84
    "log-uniform 4-128": lambda rng: math.exp(rng.uniform(math.log(4), math.log(128))),
    # median 16, sigma 1.5 (uncapped squared coefficient of variation 8.5; ~4.5 once capped), as in
    # cluster traces, where a few jobs take most of the time
    "log-normal median 16, sigma 1.5, 2-512": lambda rng: min(max(rng.lognormal(math.log(16), 1.5), 2), 512),
}


def make_jobs(num_jobs: int, sizes: str, rng: np.random.Generator) -> list[Job]:
    """Jobs of the scheduler benchmark's kind (its length means and log-normal lengths), ``sizes``
    global batches each (a key of SIZES)."""
    jobs = []
    for k in range(num_jobs):
        batches = int(round(SIZES[sizes](rng)))
        mean = MIXED[int(rng.integers(len(MIXED)))]
        jobs.append(Job(f"job{k}", GLOBAL_BATCH_SIZE, lognormal_lengths(mean, GLOBAL_BATCH_SIZE * batches, rng)))
    return jobs


def poisson_arrivals(jobs: Sequence[Job], rate_per_s: float, rng: np.random.Generator) -> list[Arrival]:
    """The first job at time 0, then exponential gaps of mean 1 / rate."""
    gaps = rng.exponential(1.0 / rate_per_s, len(jobs))
    gaps[0] = 0.0
    return [Arrival(job, float(at)) for job, at in zip(jobs, np.cumsum(gaps))]


def run_policies(
    jobs: Sequence[Job],
    gaps_seed: int,
    stages: int,
    load: float,
    windows: Sequence[int],
    options: PlanOptions,
    size_aware: Sequence[tuple[int, SizeAware]] = (),
) -> tuple[float, list[OnlineResult]]:
    """(arrival rate in jobs/s, every policy's result) for one trace at one stage count: the
    service over all live jobs at each of ``windows``, and with each (window, admission) of
    ``size_aware``."""
    cost = options.cost
    megatron = {j.name: megatron_alone(j, stages, cost) for j in jobs}
    rate = load / float(np.mean([run.duration_s for run in megatron.values()]))
    arrivals = poisson_arrivals(jobs, rate, np.random.default_rng(gaps_seed))
    planned = {j.name: planned_alone(j, options) for j in jobs}
    results = [fifo(arrivals, megatron, "fifo (Megatron-LM)"), fifo(arrivals, planned, "fifo (planned alone)")]
    results += [planning_windows(arrivals, w, options) for w in windows]
    results += [planning_windows(arrivals, w, options, admission) for w, admission in size_aware]
    results.append(offline_bound(arrivals, stages, cost))
    return rate, results


def summary_row(result: OnlineResult, baseline: OnlineResult, service: OnlineResult, **setup: object) -> dict:
    """One policy's figures, with ratios against FIFO (Megatron-LM) and the all-live service."""
    return {
        **setup,
        "policy": result.policy,
        "mean_jct_s": result.mean_jct_s,
        "p95_jct_s": result.p95_jct_s,
        "makespan_s": result.span_s,
        "tokens_per_s": result.tokens_per_s,
        "jobs_per_hour": result.jobs_per_hour,
        "windows": result.windows,
        "mean_jct_vs_fifo": result.mean_jct_s / baseline.mean_jct_s,
        "p95_jct_vs_fifo": result.p95_jct_s / baseline.p95_jct_s,
        "tokens_per_s_vs_fifo": result.tokens_per_s / baseline.tokens_per_s,
        "mean_jct_vs_service": result.mean_jct_s / service.mean_jct_s,
        "p95_jct_vs_service": result.p95_jct_s / service.p95_jct_s,
        "tokens_per_s_vs_service": result.tokens_per_s / service.tokens_per_s,
    }


def averaged(rows: list[dict], keys: Sequence[str]) -> list[dict]:
    """One row per (sizes, stages, policy): the mean over seeds of every numeric column."""
    out: dict[tuple, dict] = {}
    for row in rows:
        key = (row["sizes"], row["stages"], row["policy"])
        group = out.setdefault(key, {"sizes": row["sizes"], "stages": row["stages"], "policy": row["policy"], "_n": 0})
        group["_n"] += 1
        for column in keys:
            group[column] = group.get(column, 0.0) + row[column]
    for group in out.values():
        n = group.pop("_n")
        for column in keys:
            group[column] /= n
    return list(out.values())


def measure_end_to_end(
    arrivals: Sequence[Arrival],
    submit: Callable[[Job], None],
    finished: Callable[[], Mapping[str, float]],
    time_scale: float = 1.0,
    timeout_s: float = 3600.0,
    poll_s: float = 0.05,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> OnlineResult:
    """Hook for the end-to-end measurement of the real service (issue 14; bench_online_cpu.py runs
    it against the tiny service on the CPU).

    Replays ``arrivals`` against a running service: ``submit(job)`` is called at
    ``time_scale * arrival`` seconds after the start (e.g. write the job's data and YAML, then
    ``POST`` it), and ``finished()`` is polled until every job is in it; it returns ``{job name:
    the clock() time the job finished}`` for the jobs finished so far (e.g. from the jobs API).
    Completion times are measured with ``clock`` from the replay's start and scaled back by
    ``1 / time_scale``, so the result compares directly with the simulated policies of the same
    trace. ``trained`` is empty: the samples a real run trained are the service's tests' business.
    Raises TimeoutError naming the unfinished jobs after ``timeout_s``.
    """
    if time_scale <= 0:
        raise ValueError(f"time_scale must be > 0, got {time_scale!r}")
    ordered = sorted(arrivals, key=lambda a: a.at_s)
    start = clock()
    for arrival in ordered:
        wait = start + time_scale * arrival.at_s - clock()
        if wait > 0:
            sleep(wait)
        submit(arrival.job)
    names = {a.job.name for a in ordered}
    while True:
        done = dict(finished())
        if names <= done.keys():
            break
        if clock() - start > timeout_s:
            raise TimeoutError(f"jobs not finished after {timeout_s} s: {', '.join(sorted(names - done.keys()))}")
        sleep(poll_s)
    finish = {a.job.name: (done[a.job.name] - start) / time_scale for a in ordered}
    return OnlineResult(
        "service (measured)",
        {a.job.name: a.at_s for a in ordered},
        finish,
        makespan_s=max(finish.values()),
        tokens=sum(sum(a.job.lengths) for a in ordered),
        trained=(),
    )


SHOWN = [
    ("sizes", "job sizes (global batches)", "{}"),
    ("stages", "S", "{}"),
    ("policy", "policy", "{}"),
    ("mean_jct_s", "mean JCT (s)", "{:,.0f}"),
    ("p95_jct_s", "p95 JCT (s)", "{:,.0f}"),
    ("mean_jct_vs_fifo", "mean JCT / FIFO", "{:.2f}"),
    ("p95_jct_vs_fifo", "p95 JCT / FIFO", "{:.2f}"),
    ("makespan_s", "makespan (s)", "{:,.0f}"),
    ("tokens_per_s", "tokens/s", "{:,.0f}"),
    ("jobs_per_hour", "jobs/hour", "{:,.1f}"),
]
OVERLOAD_SHOWN = [
    *SHOWN[:3],
    ("makespan_s", "makespan (s)", "{:,.0f}"),
    ("tokens_per_s", "tokens/s", "{:,.0f}"),
    ("tokens_per_s_vs_fifo", "tokens/s / FIFO", "{:.2f}"),
    ("jobs_per_hour", "jobs/hour", "{:,.1f}"),
]
VS_SERVICE = [
    ("mean_jct_vs_service", "mean JCT / service", "{:.2f}"),
    ("p95_jct_vs_service", "p95 JCT / service", "{:.2f}"),
    ("tokens_per_s_vs_service", "tokens/s / service", "{:.2f}"),
]
SWEEP_SHOWN = [*SHOWN[:7], *VS_SERVICE, SHOWN[8]]
ADMISSION_SHOWN = [*SHOWN[:2], ("load", "load", "{}"), *VS_SERVICE, *SHOWN[5:7], OVERLOAD_SHOWN[5]]
NUMERIC = [key for key, _, _ in SHOWN if key not in ("sizes", "stages", "policy")] + ["tokens_per_s_vs_fifo"]
NUMERIC += [key for key, _, _ in VS_SERVICE]


def write_results(
    summary: list[dict],
    jobs_rows: list[dict],
    sweep: list[dict],
    setup: list[str],
    load: float,
    overload: float,
    guard: SizeAware,
    window: int,
) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    date, device, versions = machine_header(COST_LABEL)
    device = device.split(";")[0].replace("CPU only", "simulated on a CPU")
    header = [date, f"{device}; no time here is measured: all are predicted with {COST_LABEL}", versions]
    write_csv(RESULTS / "online_summary.csv", summary, header + setup)
    write_csv(RESULTS / "online_jobs.csv", jobs_rows, header + setup)
    write_csv(RESULTS / "online_windows.csv", sweep, header + setup)
    lines = ["# Jobs arriving over time: simulated job completion time and throughput", ""]
    lines += [
        "**These are predictions of the pipeline simulator with a cost model fitted to measured H100 layer times, "
        "not measurements.** JCT = finish - arrival; makespan, tokens/s and jobs/hour are over the span from the "
        "first arrival to the last finish; ratios are against `fifo (Megatron-LM)` on the same trace, averaged over "
        "seeds; `/ service` ratios are against the service over all live jobs with the same window W.",
        "",
    ]
    lines += [f"- {line}" for line in header + setup] + [""]
    lines += [
        "How to read it: below load 1 every policy keeps up with the arrivals, so tokens/s and jobs/hour over the "
        "span differ little; the difference is in how long jobs wait. The service shares the pipeline between the "
        "live jobs, so at S = 1 (where packing gains little over Megatron-LM) it trades FIFO's queueing for sharing, "
        "which wins when job sizes vary much more than exponential ones would and loses (at p95 most) when they "
        "vary less. At S > 1 several live jobs also fill "
        "the pipeline bubbles that a job alone leaves. The bound lets every job run as if the pipeline had nothing "
        "else to do and hardly a bubble of its own, so at S = 4 it lies far below what a schedule reaches.",
        "",
        "The size-aware admission (`service, least work first`) plans only the live jobs with the least estimated "
        "work left, as many as keep the stages busy: one job at a time on one GPU, so it runs like shortest-"
        "remaining-work-first instead of sharing the GPU, and a few staggered jobs at S = 4. Below load 1 that "
        "shortens mean and p95 JCT against the all-live service in every case of the main table, most on one GPU; "
        "against FIFO its p95 is shortest except on one GPU with log-uniform sizes, where long jobs wait behind "
        "short ones and it about ties FIFO. Its cost is throughput under overload at S > 1: with fewer jobs in a "
        "window there is less to pack and stagger, so at load 2.0 its tokens/s is below the all-live service's "
        "(equal at S = 1), though its mean JCT stays shorter. With windows of one global batch at S > 1 it admits "
        "one job per window (a one-batch window has no dependency gaps to fill) and each window pays the "
        "pipeline's fill and drain for a few microbatches: lower tokens/s than the all-live service there, and "
        "longer JCT with log-uniform sizes (window table); use W >= 2 with pipeline stages. A tighter wait guard "
        "lets overdue long jobs go ahead of short ones more often, which raises mean and p95 JCT on one GPU (guard "
        "table).",
        "",
    ]
    lines += [f"## Every policy at load {load} (mean over seeds)", ""]
    lines += markdown_table(averaged([r for r in summary if r["load"] == load], NUMERIC), SHOWN) + [""]
    lines += [f"## Throughput at load {overload} (arrivals outpace every policy; mean over seeds)", ""]
    lines += markdown_table(averaged([r for r in summary if r["load"] == overload], NUMERIC), OVERLOAD_SHOWN) + [""]
    lines += [f"## Size-aware admission against the all-live service, window {window} (mean over seeds)", ""]
    chosen = f"{guard.label} (window {window})"
    for at in (load, overload):
        rows = averaged([r for r in summary if r["load"] == at and r["policy"] == chosen], NUMERIC)
        lines += markdown_table([{**r, "load": at} for r in rows], ADMISSION_SHOWN)[2 if at == overload else 0 :]
    lines += ["", f"## Window size W of both services at load {load} (mean over seeds)", ""]
    kinds = ("service (", f"{guard.label} (")
    lines += markdown_table(averaged([r for r in sweep if r["policy"].startswith(kinds)], NUMERIC), SWEEP_SHOWN)
    lines += ["", f"## The size-aware service's wait guard (max_wait_windows), window {window}, load {load}", ""]
    guarded = [r for r in sweep if "least work first" in r["policy"] and window_of(r["policy"]) == window]
    by_wait = sorted(
        averaged(guarded, NUMERIC),
        key=lambda r: (list(SIZES).index(r["sizes"]), r["stages"], int(r["policy"].split("<= ")[1].split()[0])),
    )
    lines += markdown_table(by_wait, SWEEP_SHOWN) + [""]
    table = RESULTS / "online_table.md"
    kept = marked_sections(table)  # e.g. the end-to-end CPU measurement, written by bench_online_cpu.py
    table.write_text("\n".join(lines) + ("\n" + kept if kept else ""))
    plot(jobs_rows, sweep, guard)


_MARKED = re.compile(r"<!-- begin: (.+?) -->\n.*?<!-- end: \1 -->\n", re.S)


def marked_sections(path: Path) -> str:
    """The sections of `path` that other scripts write (see :func:`replace_marked_section`)."""
    return "".join(m.group(0) for m in _MARKED.finditer(path.read_text())) if path.exists() else ""


def replace_marked_section(path: Path, marker: str, lines: Sequence[str]) -> None:
    """Write `lines` as the section of `path` marked `marker` (appended if there is none), keeping
    the rest: a results table that several scripts write parts of."""
    begin, end = f"<!-- begin: {marker} -->", f"<!-- end: {marker} -->"
    block = "\n".join([begin, *lines, end]) + "\n"
    text = path.read_text() if path.exists() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


def plot(jobs_rows: list[dict], sweep: list[dict], guard: SizeAware) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys((r["sizes"], r["stages"]) for r in jobs_rows))
    fig, axes = plt.subplots(2, len(cases), figsize=(5.5 * len(cases), 8.5), squeeze=False)
    for column, (sizes, stages) in enumerate(cases):
        ax = axes[0][column]
        case_jobs = [r for r in jobs_rows if (r["sizes"], r["stages"]) == (sizes, stages)]
        for policy in dict.fromkeys(r["policy"] for r in case_jobs):
            jct = np.sort([r["jct_s"] for r in case_jobs if r["policy"] == policy])
            ax.step(jct, np.arange(1, len(jct) + 1) / len(jct), where="post", label=policy)
        ax.set_xscale("log")
        ax.set_xlabel("job completion time (s, simulated)")
        ax.set_ylabel("share of jobs (all seeds)")
        ax.set_title(f"JCT distribution, S = {stages}\njob sizes: {sizes}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax = axes[1][column]
        case = [r for r in averaged(sweep, NUMERIC) if (r["sizes"], r["stages"]) == (sizes, stages)]
        for kind, short, style in (("service (", "all live", "--"), (f"{guard.label} (", "least work first", "-")):
            rows = [r for r in case if r["policy"].startswith(kind)]
            ws = [window_of(r["policy"]) for r in rows]
            for key, color, what in (("mean_jct_vs_fifo", "C0", "mean"), ("p95_jct_vs_fifo", "C1", "p95")):
                ax.plot(ws, [r[key] for r in rows], style, color=color, marker="o", label=f"{short}: {what} JCT")
        ax.axhline(1.0, color="grey", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("service window W (global batches)")
        ax.set_ylabel("ratio to FIFO (Megatron-LM)")
        ax.set_title(f"services' JCT / FIFO's, S = {stages}\njob sizes: {sizes}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Jobs arriving over time: pipeline-simulator predictions, Llama-3.1-8B / H100 cost model")
    fig.tight_layout()
    fig.savefig(RESULTS / "online.png", dpi=110)
    plt.close(fig)


def window_of(policy: str) -> int | None:
    """The W of a service policy's name ("... (window W)"); None for the others."""
    head, _, tail = policy.rpartition(" (window ")
    return int(tail.rstrip(")")) if head else None


def simulate_traces(
    args: argparse.Namespace, load: float, windows: Sequence[int], size_aware: Sequence[tuple[int, SizeAware]]
) -> tuple[list[dict], list[dict], dict]:
    """Every (job sizes, stages, seed) at ``load``: (a row per policy, a row per job and policy,
    the arrival rate of each trace). Ratios are against FIFO (Megatron-LM) and against the all-live
    service of the same window (of ``args.window`` for the policies without one)."""
    cost = CostModel.preset("llama-3.1-8b")
    rows, jobs_rows, rates = [], [], {}
    for sizes, stages, seed in itertools.product(SIZES, args.stages, args.seeds):
        options = PlanOptions(stages, args.capacity, use_milp=False, cost=cost)
        started = time.perf_counter()
        jobs = make_jobs(args.jobs, sizes, np.random.default_rng(seed))
        rate, results = run_policies(jobs, 1000 + seed, stages, load, windows, options, size_aware)
        rates[(sizes, stages, seed)] = rate
        setup = {"sizes": sizes, "load": load, "stages": stages, "seed": seed, "arrivals_per_hour": 3600 * rate}
        all_live = {window_of(r.policy): r for r in results if r.policy.startswith("service (")}
        for result in results:
            service = all_live[window_of(result.policy) or args.window]
            rows.append(summary_row(result, results[0], service, **setup))
            for name, at in result.arrival_s.items():
                jobs_rows.append({**setup, "policy": result.policy, "job": name, "arrival_s": at,
                                  "jct_s": result.finish_s[name] - at})  # fmt: skip
            print(
                f"{sizes[:11]} load {load} S={stages} seed={seed} {result.policy:50s} mean JCT "
                f"{result.mean_jct_s:9,.0f} s, p95 {result.p95_jct_s:9,.0f} s, {result.tokens_per_s:8,.0f} tokens/s"
            )
        print(f"  ({time.perf_counter() - started:.0f} s to simulate)")
    return rows, jobs_rows, rates


def rates_text(rates: Mapping[tuple, float]) -> str:
    cases = dict.fromkeys((sizes, stages) for sizes, stages, _ in rates)
    return "; ".join(
        f"{sizes}, S={stages}: " + ", ".join(f"{3600 * r:.1f}" for k, r in rates.items() if k[:2] == (sizes, stages))
        for sizes, stages in cases
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=40, help="jobs per trace")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--load", type=float, default=0.9, help="arrival rate over FIFO (Megatron-LM) service rate")
    parser.add_argument("--overload", type=float, default=2.0, help="a second load, above 1, for throughput")
    parser.add_argument("--window", type=int, default=4, help="the service's window (global batches), main table")
    parser.add_argument("--sweep", type=int, nargs="+", default=[1, 4, 16], help="windows of the window sweep")
    parser.add_argument("--capacity", type=int, default=4096, help="tokens per microbatch (the runtime's default)")
    parser.add_argument("--waits", type=int, nargs="+", default=[8, 16, 64, 256],
                        help="max_wait_windows of the size-aware service's guard sweep")  # fmt: skip
    args = parser.parse_args()
    windows = sorted(set(args.sweep) | {args.window})
    guard = SizeAware()
    size_aware = [(w, guard) for w in windows]
    size_aware += [(args.window, SizeAware(m)) for m in sorted(set(args.waits) - {guard.max_wait_windows})]
    main_services = {f"service (window {args.window})", f"{guard.label} (window {args.window})"}

    def shown(row: dict) -> bool:
        return not row["policy"].startswith("service") or row["policy"] in main_services

    rows, jobs_rows, rates = simulate_traces(args, args.load, windows, size_aware)
    summary = [r for r in rows if shown(r)]
    sweep = [r for r in rows if r["policy"].startswith("service")]
    jobs_rows = [r for r in jobs_rows if shown(r)]
    overload, _, overload_rates = simulate_traces(args, args.overload, [args.window], [(args.window, guard)])
    setup_lines = [
        f"model: Llama-3.1-8B, LoRA, bf16, activation checkpointing; stages S in {args.stages} (S = 1: one GPU)",
        f"trace: {args.jobs} jobs per seed, seeds {args.seeds}; {GLOBAL_BATCH_SIZE} samples per global batch; "
        f"lengths log-normal (sigma 0.8) around 600/900/1700/1200 tokens (one mean per job), capped at {MAX_TOKENS}; "
        f"global batches per job: {' or '.join(SIZES)} (table column 'job sizes')",
        f"arrivals: Poisson at load {args.load} of FIFO (Megatron-LM)'s service rate on that trace at that S (its "
        f"mean time per job alone); jobs/hour per seed: {rates_text(rates)}; overload table: load {args.overload}, "
        f"jobs/hour: {rates_text(overload_rates)}",
        f"service: window W = {args.window} global batches in the main table (sweep: {sorted(set(args.sweep))}); "
        f"capacity {args.capacity} tokens per microbatch; heuristic packing (use_milp=False, for speed; the MILP the "
        "runtime uses by default can only lower a global batch's microbatch count); pipeline drained between "
        "windows; planning time not charged (the service plans in the background)",
        f"service, least work first: the same windows over the jobs select_window_jobs admits "
        "(lorafusion/scheduler/admission.py): least estimated remaining work first (cost model), as many as cover "
        "every admitted job's dependency gaps ((batches in the window - 1) x (S - 1) microbatches of the others' "
        f"work), jobs left out {guard.max_wait_windows} windows in a row first (the default guard; sweep: "
        f"{sorted(set(args.waits))})",
        "fifo (Megatron-LM): micro-batches of 4 consecutive samples, packed, a flush after every global batch; "
        "fifo (planned alone): each job planned alone by plan_schedule",
        "offline bound: per job, its global batches back to back, each no faster than its stage-0 work or its longest "
        "sample's round trip through the pipeline; makespan no shorter than the work arriving at or after each "
        "arrival (lorafusion/scheduler/online.py); a lower bound for any policy, not a schedule",
    ]
    write_results(summary + overload, jobs_rows, sweep, setup_lines, args.load, args.overload, guard, args.window)
    print(f"wrote {RESULTS}/online_{{summary,jobs,windows}}.csv, online_table.md, online.png")


def tiny_trace(seed: int = 0) -> list[Arrival]:
    rng = np.random.default_rng(seed)
    jobs = [
        Job(f"job{k}", 4, lognormal_lengths(MIXED[k % len(MIXED)], 4 * n, rng)) for k, n in enumerate((6, 1, 2, 1))
    ]
    return poisson_arrivals(jobs, rate_per_s=1.0, rng=rng)


def test_service_on_a_tiny_trace(benchmark, admission=None):
    arrivals = tiny_trace()
    options = PlanOptions(4, 8192, use_milp=False, cost=CostModel.preset("llama-3.1-8b"))
    service = benchmark.pedantic(planning_windows, args=(arrivals, 2, options, admission), rounds=2)
    bound = offline_bound(arrivals, 4, options.cost)
    assert sorted(service.trained) == sorted((a.job.name, i) for a in arrivals for i in range(len(a.job.lengths)))
    assert bound.mean_jct_s <= service.mean_jct_s and bound.makespan_s <= service.makespan_s


def test_size_aware_service_on_a_tiny_trace(benchmark):
    test_service_on_a_tiny_trace(benchmark, SizeAware())


def test_fifo_and_bound_on_a_tiny_trace(benchmark):
    arrivals = tiny_trace()
    cost = CostModel.preset("llama-3.1-8b")

    def fifo_and_bound() -> tuple[OnlineResult, OnlineResult]:
        alone: dict[str, AloneRun] = {a.job.name: megatron_alone(a.job, 4, cost) for a in arrivals}
        return fifo(arrivals, alone), offline_bound(arrivals, 4, cost)

    first_in, bound = benchmark.pedantic(fifo_and_bound, rounds=3)
    assert bound.p95_jct_s <= first_in.p95_jct_s and bound.makespan_s <= first_in.makespan_s


def test_the_end_to_end_hook_replays_arrivals_and_times_completions():
    """measure_end_to_end against a fake service on a fake clock: each job takes 2 s from submission."""
    import pytest

    arrivals = tiny_trace()
    now = [0.0]
    submitted: dict[str, float] = {}

    def sleep(seconds: float) -> None:
        now[0] += seconds

    def finished() -> dict[str, float]:
        return {name: at + 2.0 for name, at in submitted.items() if now[0] >= at + 2.0}

    def submit(job: Job) -> None:
        submitted[job.name] = now[0]

    result = measure_end_to_end(arrivals, submit, finished, time_scale=0.5, clock=lambda: now[0], sleep=sleep)
    for arrival in arrivals:  # submitted on (scaled) time, and 2 s of wall time is 4 s of trace time
        assert submitted[arrival.job.name] == pytest.approx(0.5 * arrival.at_s)
        assert result.finish_s[arrival.job.name] == pytest.approx(arrival.at_s + 4.0)
    assert result.mean_jct_s == pytest.approx(4.0)
    stuck = {}
    with pytest.raises(TimeoutError, match="jobs not finished after 1.0 s: job0, job1, job2, job3"):
        measure_end_to_end(arrivals, lambda job: None, lambda: stuck, timeout_s=1.0, clock=lambda: now[0], sleep=sleep)


if __name__ == "__main__":
    main()
