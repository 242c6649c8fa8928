"""Runs the quickstart afresh and prints the figures the README states about it: per job the first
and last loss and the held-out exact-match accuracy, and the run's CPU time (user + system, all
threads, as `time` reports it). Rerun it after changing the quickstart, and copy its lines into
the README.

    python examples/measure_quickstart.py
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        config = yaml.safe_load((HERE / "quickstart.yaml").read_text())
        config["output_dir"] = str(Path(tmp) / "run")
        for job in config["jobs"]:
            job["data"] = str(HERE / job["data"])
            job["eval_data"] = str(HERE / job["eval_data"])
        path = Path(tmp) / "quickstart.yaml"
        path.write_text(yaml.safe_dump(config))
        run = subprocess.run(
            [sys.executable, "-m", "lorafusion.cli", "train", str(path), "--no-progress"], check=True, capture_output=True, text=True
        )
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        metrics = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    print(run.stdout.strip())  # the closing summary: each job's losses and eval accuracy
    print(f"CPU time: {usage.ru_utime:.1f} s user + {usage.ru_stime:.1f} s system")
    for job in config["jobs"]:
        losses = [m["loss"] for m in metrics if m["job"] == job["name"]]
        print(f"{job['name']}: loss {losses[0]:.2f} -> {losses[-1]:.2f} over {len(losses)} logged steps")


if __name__ == "__main__":
    main()
