"""Compiles every Triton kernel in kernels/ ahead of time for real GPU targets, with no GPU.

    python tests/kernels/gpu_compile.py --targets 80 90 --grid full --json out.json --markdown out.md

The interpreter that runs the kernel tests enforces none of the hardware's rules (shared memory,
layouts, registers), so this compiles what a GPU would compile, with Triton's own compiler and
the ptxas in Triton's wheel:

1. capture (gpu_compile_capture.py): the launch points of gpu_compile_points.py call the real
   launchers on fake CUDA tensors under a fake Triton driver for each target; Triton's own binder
   specialises each launch, and an autotuned kernel is captured once per config its autotuner
   would try for that call, after the autotuner's own pruning.
2. compile: each distinct (kernel, specialisation, constexprs, config, target) once, in a process
   pool, to a cubin; registers and spills from ptxas' -v log, shared memory from the metadata.
   Results are cached by a hash of the kernel's source (with what it calls), the specialisation,
   the options, the target and the Triton version.
3. check: a compile error the autotuner would not skip (it skips only OutOfResources,
   CompileTimeAssertionFailure and PTXASError) fails; a kernel launch for which no config
   compiles and fits the target (shared memory within the per-block opt-in maximum, registers
   within the register file) fails; a @triton.jit function in kernels/ that is neither launched
   nor called by a launched kernel fails.

This process must import the kernels with TRITON_INTERPRET=0 (the decorators read it), so it
runs as its own script; `--triton VERSION` runs it again with that Triton (pip-installed once into
the cache directory) ahead of the installed one.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "0"

from gpu_compile_capture import (  # noqa: E402 - after TRITON_INTERPRET
    SHARED_LIMIT,
    Launch,
    Variant,
    kernel_name,
    resolve,
    capture,
    discover_kernels,
    uncovered_kernels,
)

REGISTERS_PER_SM = 65_536
# The autotuner skips a config that raises one of these; any other compile error reaches the caller.
TOLERATED_ERRORS = ("OutOfResources", "CompileTimeAssertionFailure", "PTXASError")


def default_cache_dir() -> Path:
    return Path(os.environ.get("LORAFUSION_CACHE_DIR", Path.home() / ".cache" / "lorafusion"))


_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


@contextlib.contextmanager
def _captured_output():
    """Everything written to file descriptors 1 and 2 meanwhile (ptxas' log is printed; MLIR's
    diagnostics go to the C++ stderr), as the yielded StringIO's value afterwards."""
    captured = io.StringIO()
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile(mode="w+") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            sink.seek(0)
            captured.write(sink.read())


def _describe(error: BaseException, output: str) -> str:
    """One line: the error's type, where in the kernel source, and its first message line."""
    parts = [type(error).__name__]
    while error is not None:
        node, src = getattr(error, "node", None), getattr(error, "src", None)
        if node is not None and src and hasattr(node, "lineno"):
            parts.append(f"at `{src.splitlines()[node.lineno - 1].strip()}`")
            message = getattr(error, "error_message", None)
        else:
            message = str(error)
        if message:
            parts.append(next(line.strip() for line in message.splitlines() if line.strip()))
        error = error.__cause__
    # A failed MLIR pass says only "PassManager::run failed"; its diagnostic went to stderr.
    diagnostic = re.search(r"error: (.+)", output)
    if diagnostic:
        parts.append(diagnostic.group(1).strip())
    return ": ".join(parts)


def _cpu_seconds() -> float:
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def compile_variant(variant: Variant) -> dict:
    """Compiles in this process; the result is JSON: shared, registers, spills, or the error."""
    import triton
    from triton.backends.compiler import GPUTarget

    triton.knobs.nvidia.dump_ptxas_log = True
    start, start_cpu = time.perf_counter(), _cpu_seconds()
    output = io.StringIO()
    try:
        fn = resolve(variant.kernel)
        source = triton.compiler.ASTSource(fn, variant.signature, variant.constexprs, variant.attrs)
        with _captured_output() as output:
            compiled = triton.compile(source, target=GPUTarget("cuda", variant.cc, 32), options=dict(variant.options))
    except Exception as error:  # noqa: BLE001 - every compile error is a result here
        return {
            "error": _describe(error, output.getvalue()),
            "tolerated": bool({cls.__name__ for cls in type(error).__mro__} & set(TOLERATED_ERRORS)),
            "seconds": time.perf_counter() - start,
            "cpu_seconds": _cpu_seconds() - start_cpu,
        }
    text = output.getvalue()
    registers = _PTXAS_REGISTERS.search(text)
    spills = _PTXAS_SPILLS.search(text)
    if registers is None:
        raise RuntimeError(f"no ptxas log for {variant.kernel} {variant.config} (a cached compile?):\n{text[-2000:]}")
    return {
        "shared": int(compiled.metadata.shared),
        "num_warps": int(compiled.metadata.num_warps),
        "registers": int(registers.group(1)),
        "spill_stores": int(spills.group(1)) if spills else 0,
        "spill_loads": int(spills.group(2)) if spills else 0,
        "seconds": time.perf_counter() - start,
        "cpu_seconds": _cpu_seconds() - start_cpu,
    }


def _init_worker(triton_cache: str):
    # A private cache, always bypassed: a cached kernel would come back without ptxas' log.
    os.environ["TRITON_CACHE_DIR"] = triton_cache
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"


def _param_index(variant: Variant, name: str) -> int:
    return list(variant.signature).index(name) if name in variant.signature else -1


def _constexpr(variant: Variant, name: str):
    index = _param_index(variant, name)
    return variant.constexprs.get((index,)) if index >= 0 else None


def _expected_cost(variant: Variant) -> tuple:
    return (_constexpr(variant, "PRECISION") == "ieee", _constexpr(variant, "BLOCK_R") or 0)


def compile_all(variants: list[Variant], jobs: int, cache_dir: Path, log=print) -> dict[str, dict]:
    """Results by variant key; cached ones are read, the others compiled in `jobs` processes."""
    results_dir = cache_dir / "gpu_compile"
    results_dir.mkdir(parents=True, exist_ok=True)
    results, todo = {}, []
    for variant in variants:
        cached = results_dir / f"{variant.key}.json"
        if cached.exists():
            results[variant.key] = json.loads(cached.read_text())
        else:
            todo.append(variant)
    todo.sort(key=_expected_cost, reverse=True)
    log(f"{len(variants)} variants: {len(results)} cached, {len(todo)} to compile with {jobs} processes")
    if not todo:
        return results
    import multiprocessing

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="triton-cache-") as triton_cache, ProcessPoolExecutor(
        jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker, initargs=(triton_cache,)
    ) as pool:
        for done, (variant, result) in enumerate(zip(todo, pool.map(compile_variant, todo)), 1):
            results[variant.key] = result
            tmp = results_dir / f"{variant.key}.json.tmp{os.getpid()}"
            tmp.write_text(json.dumps(result))
            os.replace(tmp, results_dir / f"{variant.key}.json")
            if done % 50 == 0 or done == len(todo):
                log(f"  compiled {done}/{len(todo)} in {time.perf_counter() - start:.0f} s")
    return results


# ---------------------------------------------------------------------------------------------
# Check and report
# ---------------------------------------------------------------------------------------------


def fits(result: dict, cc: int) -> bool:
    if "error" in result:
        return False
    # Registers are allocated per thread in units of 8.
    registers = -(-result["registers"] // 8) * 8
    return result["shared"] <= SHARED_LIMIT[cc] and registers * 32 * result["num_warps"] <= REGISTERS_PER_SM


def _why_not(result: dict, cc: int) -> str:
    if "error" in result:
        return result["error"]
    if result["shared"] > SHARED_LIMIT[cc]:
        return f"shared memory {result['shared']} B > {SHARED_LIMIT[cc]} B"
    return f"{result['registers']} registers x {32 * result['num_warps']} threads > {REGISTERS_PER_SM}"


def _points_text(points: list[str]) -> str:
    return points[0] + (f" (+{len(points) - 1} more launch points)" if len(points) > 1 else "")


def check(launches: list[Launch], results: dict[str, dict], uncovered: list[str]) -> list[str]:
    failures = [f"{kernel}: a @triton.jit function in kernels/ that no launch point covers" for kernel in uncovered]
    points_of: dict[str, list[str]] = {}
    for launch in launches:
        points_of.setdefault(launch.variant.key, [])
        if launch.point not in points_of[launch.variant.key]:
            points_of[launch.variant.key].append(launch.point)
    seen = set()
    for launch in launches:
        variant, result = launch.variant, results[launch.variant.key]
        if "error" in result and not result["tolerated"] and variant.key not in seen:
            seen.add(variant.key)
            failures.append(
                f"{kernel_name(variant.kernel)} sm_{variant.cc} [{variant.config}] at "
                f"{_points_text(points_of[variant.key])}: compile error: {result['error']}"
            )
    groups: dict[tuple, list[Launch]] = {}
    for launch in launches:
        groups.setdefault((launch.point, launch.launch, launch.variant.cc), []).append(launch)
    unusable: dict[tuple, list[str]] = {}
    for (point, _, cc), group in groups.items():
        if not any(fits(results[launch.variant.key], cc) for launch in group):
            unusable.setdefault(tuple(launch.variant.key for launch in group), []).append(point)
    variant_of = {launch.variant.key: launch.variant for launch in launches}
    for keys, points in unusable.items():
        variants = [variant_of[key] for key in keys]
        reasons = "; ".join(f"[{v.config}] {_why_not(results[v.key], v.cc)}" for v in variants)
        failures.append(
            f"{kernel_name(variants[0].kernel)} sm_{variants[0].cc} at {_points_text(points)}: "
            f"no config compiles and fits: {reasons}"
        )
    return failures


def _cell(result: dict | None, cc: int) -> list[str]:
    if result is None:
        return ["", "", ""]
    if "error" in result:
        return ["error", "", result["error"][:80].replace("|", "/")]
    spills = f"{result['spill_stores']}/{result['spill_loads']}"
    shared = str(result["shared"]) + ("" if fits(result, cc) else " (over)")
    return [str(result["registers"]), spills, shared]


def markdown(launches: list[Launch], results: dict[str, dict], failures: list[str], title: str) -> str:
    import triton

    targets = sorted({l.variant.cc for l in launches})
    rows: dict[tuple, dict[int, dict]] = {}
    points: dict[tuple, list[str]] = {}
    for launch in launches:
        v = launch.variant
        # One row per kernel specialisation and config: the same launch's variants on each target.
        row = (kernel_name(v.kernel), _specialisation(v), v.config)
        rows.setdefault(row, {})[v.cc] = results[v.key]
        points.setdefault(row, [])
        if launch.point not in points[row]:
            points[row].append(launch.point)
    header = ["kernel", "launch point", "config"]
    for cc in targets:
        header += [f"sm_{cc} registers", f"sm_{cc} spills (st/ld B)", f"sm_{cc} shared B"]
    lines = [
        f"## {title}",
        "",
        f"Triton {triton.__version__}; targets {', '.join(f'sm_{cc}' for cc in targets)}; "
        f"shared-memory limits {', '.join(f'sm_{cc} {SHARED_LIMIT[cc]} B' for cc in targets)}. "
        f"{len({l.point for l in launches})} launch points, {len(rows)} kernel variants x configs, "
        f"{len(results)} compiles. Generated by benchmarks/gpu_compile_report.py (tests/kernels/gpu_compile.py).",
        "",
        f"### Failures ({len(failures)})",
        "",
    ]
    lines += [f"- {failure}" for failure in failures] or ["None."]
    lines += ["", "### Compiled variants", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, by_target in sorted(rows.items(), key=lambda item: item[0][0]):
        cells = [row[0], _points_text(points[row]).replace("|", "/"), row[2]]
        for cc in targets:
            cells += _cell(by_target.get(cc), cc)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _specialisation(variant: Variant) -> str:
    return repr(
        (
            sorted(variant.signature.items()),
            sorted(variant.constexprs.items(), key=repr),
            sorted(variant.attrs.items(), key=repr),
        )
    )


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def ensure_triton(version: str, cache_dir: Path) -> Path:
    """A directory holding that Triton (pip-installed there once), to put first on PYTHONPATH."""
    target = cache_dir / f"triton-{version}"
    if not (target / "triton" / "__init__.py").exists():
        staging = Path(tempfile.mkdtemp(prefix=f"triton-{version}-", dir=cache_dir))
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(staging)]
            + [f"triton=={version}"],
            check=True,
        )
        try:
            staging.rename(target)
        except OSError:  # another process installed it meanwhile
            subprocess.run(["rm", "-rf", str(staging)], check=False)
    return target


def _rerun_with_triton(argv: list[str], version: str, cache_dir: Path) -> int:
    path = ensure_triton(version, cache_dir)
    env = dict(os.environ, TRITON_INTERPRET="0")
    env["PYTHONPATH"] = os.pathsep.join([str(path)] + [p for p in [env.get("PYTHONPATH")] if p])
    rest = [a for i, a in enumerate(argv) if a != "--triton" and (i == 0 or argv[i - 1] != "--triton")]
    return subprocess.run([sys.executable, str(Path(__file__).resolve()), *rest], env=env).returncode


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=int, nargs="+", default=[80, 90], choices=sorted(SHARED_LIMIT))
    parser.add_argument("--grid", default="full")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", type=Path, help="write launches, results and failures here")
    parser.add_argument("--markdown", type=Path, help="write the table here")
    parser.add_argument("--title", default="Triton kernels compiled for GPU targets")
    parser.add_argument("--triton", help="compile with this Triton version instead of the installed one")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    args = parser.parse_args(argv)
    if args.triton:
        return _rerun_with_triton(argv, args.triton, args.cache_dir)

    import triton

    from gpu_compile_points import GRIDS

    start = time.perf_counter()
    points = GRIDS[args.grid]()
    launches = []
    for cc in args.targets:
        launches += capture(points, cc)
    variants = list({launch.variant.key: launch.variant for launch in launches}.values())
    print(f"Triton {triton.__version__}: {len(points)} launch points x {len(args.targets)} targets -> "
          f"{len(launches)} kernel launches x configs ({time.perf_counter() - start:.1f} s to capture)")
    results = compile_all(variants, args.jobs, args.cache_dir)
    uncovered = uncovered_kernels(discover_kernels(), {launch.variant.kernel for launch in launches})
    failures = check(launches, results, uncovered)
    table = markdown(launches, results, failures, args.title)
    if args.markdown:
        args.markdown.write_text(table)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "triton": triton.__version__,
                    "failures": failures,
                    "variants": len(variants),
                    "launches": len(launches),
                    # What a run without the cache would spend compiling, in CPU seconds.
                    "cold_cpu_seconds": sum(r["cpu_seconds"] for r in results.values()),
                    "table": table,
                },
                indent=1,
            )
        )
    print(f"{len(failures)} failures; {time.perf_counter() - start:.0f} s in all")
    for failure in failures:
        print("FAIL", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
