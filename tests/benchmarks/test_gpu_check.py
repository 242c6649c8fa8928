"""benchmarks/gpu_check.py --dry-run: the device check's code paths on the CPU, its files, and a
summary that presents every figure as a CPU figure and judges no GPU target."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_dry_run_writes_the_report_with_cpu_figures_only(tmp_path):
    out = tmp_path / "out"
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    files = sorted(path.name for path in out.iterdir())
    assert files == ["benchmarks.png", "gpu_check.log", "pytest.log", "results.csv", "summary.md"]  # <= 8 come back
    assert (out / "benchmarks.png").read_bytes().startswith(b"\x89PNG")

    summary = (out / "summary.md").read_text()
    assert "DRY RUN on the CPU: no GPU figures" in summary.splitlines()[0]
    assert "| figures measured on | CPU (dry run) |" in summary
    assert "TRITON_INTERPRET=1 (interpreter, CPU)" in summary and "0 failures, 0 errors" in summary
    target_rows = [line for line in summary.splitlines() if line.startswith("| ") and ("<=" in line or ">=" in line)]
    assert len(target_rows) == 5
    # Every target measured, none judged: a CPU figure is never a verdict on a GPU target.
    assert all(line.endswith("| CPU dry run: not judged |") for line in target_rows), target_rows
    assert " met |" not in summary and "MISSED" not in summary
    phase_rows = [line for line in summary.split("## Phases")[1].splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split(" | ")[1] for row in phase_rows] == ["ok"] * 4, phase_rows

    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {row["measured_on"] for row in rows} == {"cpu (dry run)"}
    assert {row["phase"] for row in rows} == {"lora_linear", "multi_lora", "qlora", "e2e"}
    fused = [r for r in rows if r["phase"] == "lora_linear" and r["impl"] == "fused" and r["metric"] == "fwd_bwd_ms"]
    assert fused and all(float(r["value"]) > 0 for r in fused)
    assert {r["case"].split(" k=")[1].split()[0] for r in rows if r["phase"] == "multi_lora"} >= {"1", "4"}
