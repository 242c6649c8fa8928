"""Every Triton kernel in kernels/ compiles for real GPUs (sm_80, sm_90) at the launch points the
launchers produce, with a config that fits each launch; and with the Triton our GPU machines
carry (3.6, the floor in pyproject). No GPU needed: see gpu_compile.py for how, and
gpu_compile_points.py for the grid (bf16 at ranks 1, 16, 17, 64, 256; fp16 and fp32 with TF32 at
the narrowest and widest rank tiles; plain fp32 without TF32 at a 16-wide rank tile only, its
compiles being the slowest; every flag: dropout, dX, bias, forward GEMM; multi-adapter batches of
mixed ranks; every NF4 block size).

The compiles run in a subprocess (the kernels must be imported without the interpreter that
conftest.py turns on) and are cached by content under ~/.cache/lorafusion (LORAFUSION_CACHE_DIR).
Under xdist each run uses one process, and the three runs spread over the workers.

Cost, cold: about 730 compiles per sm_80/sm_90 run and 170 for the Triton 3.6 run, 0.6-1.3 CPU
seconds each (plain fp32 and wide rank tiles cost most), so roughly 20 CPU minutes in all; warm
(nothing changed in kernels/): the capture only, about a minute per run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HARNESS = Path(__file__).with_name("gpu_compile.py")
# The Triton on our GPU test machines (beside torch 2.11); pyproject's floor.
GPU_MACHINE_TRITON = "3.6.0"

RUNS = {
    "sm_80": ["--targets", "80", "--grid", "full"],
    "sm_90": ["--targets", "90", "--grid", "full"],
    f"triton-{GPU_MACHINE_TRITON}-sm_90": ["--triton", GPU_MACHINE_TRITON, "--targets", "90", "--grid", "reduced"],
}


@pytest.mark.parametrize("run", RUNS)
def test_every_kernel_compiles_for_gpu(run, tmp_path):
    pytest.importorskip("triton")
    result_path = tmp_path / "result.json"
    jobs = 1 if os.environ.get("PYTEST_XDIST_WORKER") else (os.cpu_count() or 1)
    command = [sys.executable, str(HARNESS), *RUNS[run], "--jobs", str(jobs), "--json", str(result_path)]
    process = subprocess.run(
        command, env=dict(os.environ, TRITON_INTERPRET="0"), capture_output=True, text=True, timeout=2400
    )
    print(process.stdout[-5000:])
    assert result_path.exists(), f"{' '.join(command)} failed:\n{process.stdout[-3000:]}\n{process.stderr[-5000:]}"
    result = json.loads(result_path.read_text())
    print(result["table"])
    assert result["variants"] > 0
    assert not result["failures"], f"{len(result['failures'])} failures:\n" + "\n".join(result["failures"])
