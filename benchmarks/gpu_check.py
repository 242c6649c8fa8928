"""One-shot device check: the kernel tests on the hardware and the benchmarks against their targets.

    python benchmarks/gpu_check.py --out DIR            # on a CUDA machine, at most ~8 minutes
    python benchmarks/gpu_check.py --out DIR --dry-run  # the same code paths on the CPU, tiny sizes

On a machine whose Python already holds torch, triton, transformers and peft (no network), it makes
the project importable without installing dependencies, then runs, each phase in a subprocess with
its own time limit:

  tests        tests/kernels/test_on_gpu.py, the CUDA extension's tests and the host-sync test with
               TRITON_INTERPRET=0 (fp16/bf16/fp32 vs float64, forward and every gradient, one large
               shape per op); pass/fail counts
  lora_linear  bench_lora_linear: fused vs PEFT vs the frozen base; cuBLAS vs single-Triton-GEMM forward
  multi_lora   bench_multi_lora: k = 1..8 adapters in one batch
  qlora        bench_qlora: NF4 dequantization vs a plain copy (and the NF4 layer when bitsandbytes is there)
  e2e          bench_e2e: 4 jobs on a random Llama-shaped ~1B model vs PEFT one job after another

and writes to DIR: summary.md (GPU, driver, versions, date, each ratio against its target),
results.csv (every measured number), benchmarks.png, pytest.log and gpu_check.log. A phase that
runs out of time keeps what it measured; one whose optional package is missing says "skipped: why".
Nothing is written that was not measured in this run. --dry-run figures are CPU figures, marked so,
and are never judged against the GPU targets.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"

# Seconds per phase on the GPU (the whole check stays within 8 minutes) and in a dry run.
PHASE_SECONDS = {"install": 60, "tests": 150, "lora_linear": 75, "multi_lora": 55, "qlora": 40, "e2e": 90}
DRY_RUN_SECONDS = {"install": 30, "tests": 60, "lora_linear": 40, "multi_lora": 20, "qlora": 20, "e2e": 60}
BENCHMARK_PHASES = ("lora_linear", "multi_lora", "qlora", "e2e")
# Missing on a GPU machine is not a failure of ours: the phase that needs one says "skipped".
OPTIONAL_PACKAGES = {"bitsandbytes", "peft", "scipy", "matplotlib", "yaml", "deepspeed", "megatron"}
# A phase stops starting new cases this long before its limit, so that it ends on its own.
SOFT_MARGIN_S = 15
DRY_RUN_MARGIN_S = 3

GPU_TESTS = ["tests/kernels/test_on_gpu.py", "tests/kernels/test_cuda_extension.py", "tests/lorafusion/test_host_sync.py"]
# Under the interpreter the host-sync test runs the Triton kernels on the CPU in seconds; the GPU
# test file is collected (and skips, saying why) so that the dry run goes through the same path.
DRY_RUN_TESTS = ["tests/kernels/test_on_gpu.py", "tests/lorafusion/test_host_sync.py", "-k", "on_gpu or fused_lora_linear or nf4_linear"]

# (phase, metric, impl, comparison, target, what) judged on the GPU, one line each in summary.md.
TARGETS = [
    ("lora_linear", "x_base", "fused", "<=", 1.10, "fused LoRA layer fwd+bwd / frozen base linear"),
    ("lora_linear", "speedup_vs_peft", "fused", ">=", 1.30, "PEFT LoRA Linear fwd+bwd / fused"),
    ("multi_lora", "x_one_adapter", "fused", "<=", 1.05, "4 adapters in one batch / 1 adapter (fused)"),
    ("qlora", "ours_of_copy", "ours", ">=", 0.70, "NF4 dequantization bandwidth / copy bandwidth"),
    ("e2e", "speedup_vs_peft", "lorafusion", ">=", 1.30, "4 jobs end to end: lorafusion / PEFT one after another"),
]


# ---------------------------------------------------------------------------------------------
# The driver (main process): installs, runs each phase in a subprocess, writes the report.
# ---------------------------------------------------------------------------------------------


class Log:
    def __init__(self, path: Path):
        self.handle = path.open("a", encoding="utf-8")

    def __call__(self, text: str) -> None:
        stamp = datetime.datetime.now().strftime("%H:%M:%S")
        for line in text.rstrip().splitlines() or [""]:
            print(f"[{stamp}] {line}", flush=True)
            self.handle.write(f"[{stamp}] {line}\n")
        self.handle.flush()


def _imports_from_repo(env: dict) -> bool:
    probe = "import lorafusion, lorafusion.kernels as k; print(k.__file__)"
    try:
        done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0 and Path(done.stdout.strip()).resolve().is_relative_to(REPO / "kernels")


def make_importable(env: dict, scratch: Path, limit_s: float, log: Log) -> tuple[dict, str]:
    """An environment whose Python imports lorafusion from this checkout, and how it was arranged:
    already so; else `pip install --no-deps --no-build-isolation -e .` (offline: setup.py needs only
    setuptools); else a package view on PYTHONPATH (kernels/ and scheduler/ as lorafusion's
    subpackages, as setup.py maps them), which needs nothing."""
    if _imports_from_repo(env):
        return env, "already importable from this checkout"
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-e", str(REPO)]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=limit_s)
        log(done.stdout + done.stderr)
        if done.returncode == 0 and _imports_from_repo(env):
            return env, "pip install --no-deps --no-build-isolation -e ."
    except subprocess.TimeoutExpired:
        log(f"pip install timed out after {limit_s:.0f}s")
    view = scratch / "site" / "lorafusion"
    view.mkdir(parents=True)
    for entry in (REPO / "lorafusion").iterdir():
        (view / entry.name).symlink_to(entry)
    for name in ("kernels", "scheduler"):
        (view / name).symlink_to(REPO / name)
    env = dict(env, PYTHONPATH=os.pathsep.join(filter(None, [str(view.parent), env.get("PYTHONPATH")])))
    if not _imports_from_repo(env):
        raise RuntimeError("lorafusion is not importable from this checkout, by pip or on PYTHONPATH")
    return env, "package view on PYTHONPATH (pip install -e failed)"


def run_tests(env: dict, dry_run: bool, limit_s: float, out: Path, scratch: Path) -> dict:
    """The kernel tests in a pytest subprocess; their counts from its JUnit XML."""
    junit = scratch / "junit.xml"
    files = DRY_RUN_TESTS if dry_run else GPU_TESTS
    command = [sys.executable, "-m", "pytest", *files, "-p", "no:cacheprovider", "-q", "-rfEs", f"--junitxml={junit}"]
    env = dict(env, TRITON_INTERPRET="1" if dry_run else "0")
    started = time.perf_counter()
    timed_out = False
    with (out / "pytest.log").open("w") as log_file:
        log_file.write(f"$ TRITON_INTERPRET={env['TRITON_INTERPRET']} {' '.join(command[1:])}\n")
        log_file.flush()
        try:
            subprocess.run(command, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT, timeout=limit_s)
        except subprocess.TimeoutExpired:
            timed_out = True
    result = {"files": files, "seconds": time.perf_counter() - started, "interpreter": dry_run}
    if not junit.exists():
        result["status"] = f"timed out after {limit_s:.0f}s (no counts)" if timed_out else "failed: pytest wrote no report (see pytest.log)"
        return result
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    root = ElementTree.parse(junit).getroot()
    for suite in [root] if root.tag == "testsuite" else root.iter("testsuite"):
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    result.update(counts)
    bad = counts["failures"] + counts["errors"]
    result["status"] = "ok" if not bad and not timed_out else ("timed out" if timed_out else f"{bad} failed")
    return result


def run_phases(names: list[str], env: dict, dry_run: bool, limits: dict, scratch: Path, log: Log) -> dict:
    """Benchmark phases in one process, killed at the sum of their limits; each phase records its
    rows as it goes and stops starting cases near its own limit. On the GPU each phase gets its
    own process (a hung kernel costs one phase); a dry run shares one (imports cost more than the
    tiny cases there)."""
    limit_s = sum(limits[name] for name in names)
    command = [sys.executable, str(Path(__file__).resolve()), "--phase", ",".join(names), "--work", str(scratch)]
    if dry_run:
        command.append("--dry-run")
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=limit_s)
        log(done.stdout + done.stderr)
        ended = "" if done.returncode == 0 else f"exit code {done.returncode}"
    except subprocess.TimeoutExpired as error:
        log(error.stdout.decode(errors="replace") if isinstance(error.stdout, bytes) else (error.stdout or ""))
        ended = f"killed at the {limit_s:.0f}s limit"
    results = {}
    for name in names:
        path = scratch / f"{name}.json"
        record = json.loads(path.read_text()) if path.exists() else {"rows": [], "status": None}
        status = record.get("status") or (f"not run: {ended}" if ended else "failed: no result")
        if status == "running":
            status = f"{ended or 'ended'} during this phase; the {len(record['rows'])} rows measured before are kept"
        results[name] = {"rows": record["rows"], "status": status, "notes": record.get("notes", []),
                         "seconds": record.get("seconds", time.perf_counter() - started)}
    return results


# ---------------------------------------------------------------------------------------------
# The phases (subprocess side): each appends its rows to WORK/<phase>.json after every case.
# ---------------------------------------------------------------------------------------------


class Recorder:
    def __init__(self, work: Path, phase: str, soft_deadline_s: float):
        self.path = work / f"{phase}.json"
        self.started = time.perf_counter()
        self.deadline = self.started + soft_deadline_s
        self.record = {"rows": [], "status": "running", "notes": []}
        self.save()

    def save(self) -> None:
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.record, default=float))
        temporary.replace(self.path)

    def add(self, rows: list[dict]) -> None:
        self.record["rows"].extend(rows)
        self.save()

    def note(self, text: str) -> None:
        self.record["notes"].append(text)
        self.save()

    def out_of_time(self) -> bool:
        return time.perf_counter() > self.deadline

    def finish(self, status: str) -> None:
        self.record["status"] = status
        self.record["seconds"] = time.perf_counter() - self.started
        self.save()


def _cases(recorder: Recorder, cases: list, measure) -> str:
    """measure(case) for each case in order until the soft deadline; the status line."""
    for done, case in enumerate(cases):
        if recorder.out_of_time():
            return f"partial: time limit reached after {done} of {len(cases)} cases"
        recorder.add(measure(case))
    return "ok"


def phase_lora_linear(device, dry_run: bool, recorder: Recorder) -> str:
    import bench_lora_linear as bench
    import torch

    # The target's shapes first (8192 tokens, hidden 4096-8192, r 16-64), so a cut keeps them.
    shapes = [(128, 64, 8)] if dry_run else [(8192, 4096, 16), (8192, 4096, 64), (8192, 8192, 16), (8192, 8192, 64)]
    dtype = torch.float32 if dry_run else torch.bfloat16

    def measure(shape):
        case = bench.Case(*shape, dtype, device)
        # The CUDA extension's first build takes minutes; its correctness is in the tests phase.
        rows = [bench.measure(case, name, layer) for name, layer in bench.build_layers(case, cuda_backend=False).items()]
        bench.add_ratios(rows)
        return rows

    return _cases(recorder, shapes, measure)


def phase_multi_lora(device, dry_run: bool, recorder: Recorder) -> str:
    import bench_multi_lora as bench
    import torch

    tokens, hidden = (64, 32) if dry_run else (8192, 4096)
    dtype = torch.float32 if dry_run else torch.bfloat16
    # k = 1 and 4 first: the target compares them.
    counts = [1, 4, 2, 8, 3, 5, 6, 7] if not dry_run else [1, 4, 2, 8]
    single = {}

    def measure(k):
        layers, batch = bench.build(tokens, hidden, [16] * k, dtype, device)
        rows = []
        for impl, layer in layers.items():
            ms = bench.measure(layer, batch, tokens, hidden, dtype, device)
            single.setdefault(impl, ms if k == 1 else None)
            rows.append({"tokens": tokens, "hidden": hidden, "r": 16, "k": k, "impl": impl, "fwd_bwd_ms": ms,
                         "x_one_adapter": ms / single[impl] if single.get(impl) else math.nan})
        return rows

    return _cases(recorder, counts, measure)


def phase_qlora(device, dry_run: bool, recorder: Recorder) -> str:
    import bench_qlora as bench
    import torch

    dtype = torch.float32 if dry_run else torch.bfloat16
    dequant_shapes = [(256, 256)] if dry_run else [(8192, 8192), (8192, 28672), (4096, 4096)]
    status = _cases(recorder, dequant_shapes, lambda shape: [dict(bench.measure_dequantization(shape, dtype, device), impl="ours")])
    missing = bench.bitsandbytes_missing()
    if missing:
        recorder.note(f"NF4 layer vs PEFT on bitsandbytes skipped: {missing}; bitsandbytes' dequantize_4bit not timed")
        return status
    if status == "ok":
        layer_shapes = [(64, 128, 8)] if dry_run else [(8192, 4096, 16)]
        status = _cases(recorder, layer_shapes, lambda shape: bench.measure_layer(*shape, dtype, device))
    return status


def phase_e2e(device, dry_run: bool, recorder: Recorder) -> str:
    import bench_e2e as bench

    try:
        import peft  # noqa: F401
    except ImportError as error:
        return f"skipped: the PEFT baseline needs peft ({error})"
    steps = 1 if dry_run else 6
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        config = bench.build_config(directory, device, 4, steps)
        if dry_run:  # the wiring, not the model, is what a dry run checks
            config["model"]["config"] = dict(config["model"]["config"], hidden_size=64, intermediate_size=128, num_hidden_layers=1)
        try:
            import scipy  # noqa: F401
        except ImportError:
            config["scheduler"]["solver"] = "greedy"
            recorder.note("scheduler solver: greedy (scipy, which the MILP needs, is not installed)")
        if not dry_run:
            # Triton compiles and autotunes on first use: a one-step run first, not timed.
            warm = dict(config, output_dir=str(directory / "warm-up"),
                        jobs=[dict(job, max_steps=1) for job in config["jobs"]])
            bench.run_lorafusion(warm, directory, device)
            if recorder.out_of_time():
                return "partial: time limit reached after the warm-up run"
        rows = [bench.run_lorafusion(config, directory, device)]
        recorder.add(rows)
        if recorder.out_of_time():
            return "partial: time limit reached before the PEFT run"
        rows.append(bench.run_peft(config, directory, device))
    for row in rows:
        row["tokens_per_s"] = row["tokens"] / row["seconds"]
        row["speedup_vs_peft"] = row["tokens_per_s"] / (rows[1]["tokens"] / rows[1]["seconds"])
        row["jobs"], row["steps_per_job"] = 4, steps
    recorder.record["rows"] = rows
    recorder.save()
    return "ok"


PHASES = {"lora_linear": phase_lora_linear, "multi_lora": phase_multi_lora, "qlora": phase_qlora, "e2e": phase_e2e}


def run_phase_here(name: str, work: Path, dry_run: bool) -> None:
    limit_s = (DRY_RUN_SECONDS if dry_run else PHASE_SECONDS)[name]
    recorder = Recorder(work, name, max(limit_s - (DRY_RUN_MARGIN_S if dry_run else SOFT_MARGIN_S), 1.0))
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import torch

        device = torch.device("cpu" if dry_run else "cuda")
        torch.manual_seed(0)
        status = PHASES[name](device, dry_run, recorder)
    except Exception as error:  # recorded, not raised: the other phases still run
        if isinstance(error, ModuleNotFoundError) and (error.name or "").split(".")[0] in OPTIONAL_PACKAGES:
            status = f"skipped: {error.name} is not installed"
        else:
            traceback.print_exc()
            status = f"failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    recorder.finish(status)


# ---------------------------------------------------------------------------------------------
# The report.
# ---------------------------------------------------------------------------------------------


def environment(dry_run: bool) -> dict:
    import importlib.metadata

    import torch

    def version(package):
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": version("triton"),
        "transformers": version("transformers"),
        "peft": version("peft"),
        "bitsandbytes": version("bitsandbytes"),
        "host": platform.node(),
    }
    if dry_run:
        info["device"] = f"CPU ({platform.processor() or platform.machine()}), dry run: no GPU figures"
        return info
    info["device"] = torch.cuda.get_device_name(0)
    info["cuda"] = torch.version.cuda
    smi = shutil.which("nvidia-smi")
    if smi:
        done = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True)
        info["driver"] = done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else "unknown"
    return info


def _case_label(row: dict) -> str:
    keys = ("tokens", "hidden", "r", "k", "out_features", "in_features", "dtype", "jobs", "steps_per_job")
    return " ".join(f"{key}={row[key]}" for key in keys if key in row)


def write_csv(path: Path, phases: dict, figures_from: str) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["measured_on", "phase", "case", "impl", "metric", "value"])
        for phase, result in phases.items():
            for row in result["rows"]:
                for metric, value in row.items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool) and metric not in ("tokens", "hidden", "r", "k"):
                        writer.writerow([figures_from, phase, _case_label(row), row.get("impl", ""), metric, value])


def judge(phases: dict, dry_run: bool) -> list[dict]:
    lines = []
    for phase, metric, impl, comparison, target, what in TARGETS:
        rows = [r for r in phases.get(phase, {}).get("rows", []) if r.get("impl") == impl and metric in r]
        if phase == "multi_lora":
            rows = [r for r in rows if r.get("k") == 4]
        values = [(r[metric], _case_label(r)) for r in rows if isinstance(r[metric], (int, float)) and math.isfinite(r[metric])]
        if not values:
            verdict = "not measured"
        elif dry_run:
            verdict = "CPU dry run: not judged"
        else:
            met = all(v <= target if comparison == "<=" else v >= target for v, _ in values)
            verdict = "met" if met else "MISSED"
        lines.append({"what": what, "target": f"{comparison} {target:.2f}", "values": values, "verdict": verdict})
    return lines


def plot(path: Path, phases: dict, title: str) -> str:
    try:
        from harness import new_figure, save_figure
    except ImportError as error:
        return f"no figure: {error}"
    fig, axes = new_figure(2, 2, figsize=(11, 8), squeeze=False)
    lora = [r for r in phases["lora_linear"]["rows"]]
    ax = axes[0][0]
    shapes = list(dict.fromkeys((r["hidden"], r["r"]) for r in lora))
    impls = list(dict.fromkeys(r["impl"] for r in lora))
    for i, impl in enumerate(impls):
        heights = [next((r["x_base"] for r in lora if r["impl"] == impl and (r["hidden"], r["r"]) == s), math.nan) for s in shapes]
        ax.bar([j + i * 0.8 / max(len(impls), 1) for j in range(len(shapes))], heights, 0.8 / max(len(impls), 1), label=impl)
    ax.axhline(1.10, color="red", linestyle="--", linewidth=0.8, label="target (fused)")
    ax.set_xticks(range(len(shapes)), [f"h={h} r={r}" for h, r in shapes])
    ax.set_title("LoRA layer fwd+bwd / frozen base")
    if impls:
        ax.legend(fontsize=7)
    ax = axes[0][1]
    for impl in dict.fromkeys(r["impl"] for r in phases["multi_lora"]["rows"]):
        points = sorted((r["k"], r["fwd_bwd_ms"]) for r in phases["multi_lora"]["rows"] if r["impl"] == impl)
        ax.plot(*zip(*points), marker="o", label=impl)
    ax.set_title("k adapters in one batch: fwd+bwd ms")
    ax.set_xlabel("k")
    if phases["multi_lora"]["rows"]:
        ax.legend(fontsize=7)
    ax = axes[1][0]
    dequant = [r for r in phases["qlora"]["rows"] if "ours_gbs" in r]
    labels = [f"{r['out_features']}x{r['in_features']}" for r in dequant]
    ax.bar([j - 0.2 for j in range(len(dequant))], [r["ours_gbs"] for r in dequant], 0.4, label="NF4 dequant (ours)")
    ax.bar([j + 0.2 for j in range(len(dequant))], [r["copy_gbs"] for r in dequant], 0.4, label="copy")
    ax.set_xticks(range(len(dequant)), labels)
    ax.set_title("GB/s")
    if dequant:
        ax.legend(fontsize=7)
    ax = axes[1][1]
    e2e = phases["e2e"]["rows"]
    ax.bar([r["impl"] for r in e2e], [r.get("tokens_per_s", math.nan) for r in e2e])
    ax.set_title("4 jobs end to end: training tokens/s")
    fig.suptitle(title)
    save_figure(fig, path)
    return "benchmarks.png"


def write_summary(path: Path, info: dict, install: str, tests: dict, phases: dict, verdicts: list, dry_run: bool, total_s: float, figure: str) -> None:
    figures = "CPU (dry run)" if dry_run else f"GPU: {info['device']}"
    lines = ["# lorafusion device check" + (" (DRY RUN on the CPU: no GPU figures)" if dry_run else ""), ""]
    if dry_run:
        lines += ["**Dry run: every figure below was measured on the CPU at tiny sizes. They exercise the code paths and "
                  "say nothing about GPU performance; no target is judged.**", ""]
    lines += ["| | |", "| --- | --- |"]
    for key in ("device", "driver", "cuda", "torch", "triton", "transformers", "peft", "bitsandbytes", "python", "date"):
        if key in info:
            lines.append(f"| {key} | {info[key]} |")
    lines += [f"| lorafusion | {install} |", f"| figures measured on | {figures} |", f"| wall time | {total_s:.0f} s |", ""]
    lines += ["## Kernel tests", ""]
    mode = "TRITON_INTERPRET=1 (interpreter, CPU)" if dry_run else "TRITON_INTERPRET=0 (compiled, on the GPU)"
    counts = ", ".join(f"{tests[k]} {k}" for k in ("passed", "failures", "errors", "skipped") if k in tests)
    lines += [f"{' '.join(tests['files'])} with {mode}: **{tests['status']}** ({counts or 'no counts'}; {tests['seconds']:.0f} s). Log: pytest.log.", ""]
    lines += ["## Targets", "", f"Figures from: {figures}.", "", "| target | | measured | verdict |", "| --- | --- | --- | --- |"]
    for line in verdicts:
        measured = "<br>".join(f"{value:.3f} ({case})" for value, case in line["values"]) or "-"
        lines.append(f"| {line['what']} | {line['target']} | {measured} | {line['verdict']} |")
    lines += ["", "## Phases", "", "| phase | status | seconds | rows |", "| --- | --- | --- | --- |"]
    for name, result in phases.items():
        lines.append(f"| {name} | {result['status']} | {result['seconds']:.0f} | {len(result['rows'])} |")
    notes = [f"- {name}: {note}" for name, result in phases.items() for note in result.get("notes", [])]
    if notes:
        lines += ["", "Notes:", *notes]
    lines += ["", f"Every measured number: results.csv (column measured_on = {figures}). Figure: {figure}. "
              "Phase output: gpu_check.log.", ""]
    path.write_text("\n".join(lines))


def check(out: Path, dry_run: bool) -> int:
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "gpu_check.log")
    limits = DRY_RUN_SECONDS if dry_run else PHASE_SECONDS
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)  # compiled kernels on the GPU; a dry run's benchmarks use the torch backend
    if not dry_run:
        import torch

        if not torch.cuda.is_available():
            log("no CUDA device: run with --dry-run on a machine without a GPU")
            return 2
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch_name:
        scratch = Path(scratch_name)
        env, install = make_importable(env, scratch, limits["install"], log)
        log(f"lorafusion: {install}")
        tests = run_tests(env, dry_run, limits["tests"], out, scratch)
        log(f"tests: {tests['status']}")
        if dry_run:
            phases = run_phases(list(BENCHMARK_PHASES), env, dry_run, limits, scratch, log)
        else:
            phases = {}
            for name in BENCHMARK_PHASES:
                phases.update(run_phases([name], env, dry_run, limits, scratch, log))
        for name, result in phases.items():
            log(f"{name}: {result['status']}")
    info = environment(dry_run)
    figures = "cpu (dry run)" if dry_run else info["device"]
    write_csv(out / "results.csv", phases, figures)
    sys.path.insert(0, str(BENCHMARKS))
    title = f"lorafusion device check, {'CPU DRY RUN (not GPU figures)' if dry_run else info['device']}, {info['date']}"
    try:
        figure = plot(out / "benchmarks.png", phases, title)
    except Exception as error:  # a figure is not worth losing the summary over
        figure = f"no figure: {type(error).__name__}: {error}"
    verdicts = judge(phases, dry_run)
    write_summary(out / "summary.md", info, install, tests, phases, verdicts, dry_run, time.perf_counter() - started, figure)
    log(f"wrote {', '.join(sorted(p.name for p in out.iterdir()))} to {out} in {time.perf_counter() - started:.0f}s")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for summary.md, results.csv, benchmarks.png and the logs")
    parser.add_argument("--dry-run", action="store_true", help="on the CPU at tiny sizes; figures marked as CPU figures")
    parser.add_argument("--phase", help=argparse.SUPPRESS)  # internal: comma-separated phases to run here
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase:
        for name in args.phase.split(","):
            run_phase_here(name, args.work, args.dry_run)
        return 0
    if args.out is None:
        parser.error("--out is required")
    return check(args.out, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
