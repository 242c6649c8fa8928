"""Run under torchrun by test_resume_stop_points.py: one process group, many runs of one config,
so that each stop point costs a run and not a torchrun start-up.

    resume_worker.py CONFIG.yaml ENGINE STOP[,STOP...] [--replay-without JOB]

Writes OUTPUT_DIR/reference (uninterrupted), OUTPUT_DIR/stop-<k> (stopped after k microbatches,
then resumed) and, with --replay-without, OUTPUT_DIR/replay (the reference's schedule replayed
without JOB; megatron only).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch.distributed as dist
import yaml

from lorafusion.runtime.config import parse_config
from lorafusion.scheduler import Schedule


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("engine", choices=["megatron", "deepspeed"])
    parser.add_argument("stops")
    parser.add_argument("--replay-without", default=None)
    args = parser.parse_args()
    raw = yaml.safe_load(Path(args.config).read_text())
    root = Path(raw["output_dir"])

    def config(output: str, without: str | None = None):
        data = copy.deepcopy(raw)
        data["output_dir"] = str(root / output)
        data["jobs"] = [job for job in data["jobs"] if job["name"] != without]
        return parse_config(data, base_dir=Path(args.config).parent)

    if args.engine == "megatron":
        from lorafusion.engines.megatron_engine import train_with_megatron as train
    else:
        from lorafusion.engines.deepspeed_engine import train_with_deepspeed as train
    dist.init_process_group("gloo")
    try:
        train(config("reference"), progress=False)
        for stop in (int(s) for s in args.stops.split(",")):
            train(config(f"stop-{stop}"), stop_after_microbatches=stop, progress=False)
            train(config(f"stop-{stop}"), resume=True, progress=False)
        if args.replay_without:
            schedule = Schedule.from_json_dict(json.loads((root / "reference" / "schedule.json").read_text()))
            train(config("replay", without=args.replay_without), progress=False, schedule=schedule)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
