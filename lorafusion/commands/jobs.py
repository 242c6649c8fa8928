"""`lorafusion jobs`: the jobs of a running `lorafusion serve`, one row each."""

from __future__ import annotations

import argparse
import json
import math


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lorafusion.service.client import add_connection_arguments

    parser.add_argument("--json", action="store_true", help="the API's JSON records instead of the table")
    add_connection_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from lorafusion.commands.submit import report_error
    from lorafusion.service.client import ServiceClient, ServiceError

    try:
        jobs = ServiceClient.from_args(args).jobs()
    except ServiceError as error:
        return report_error("jobs", error)
    if args.json:
        print(json.dumps(jobs, indent=2))
        return 0
    print("\n".join(job_table(jobs)))
    return 0


def job_table(jobs: list[dict]) -> list[str]:
    rows = [f"{'job':>16}  {'state':>9}  {'step':>11}  {'loss':>8}  {'eval_loss':>9}  {'tokens/s':>8}  {'ETA':>8}  detail"]
    for job in jobs:
        steps = f"{job['step']}/{job['num_steps']}" if job["num_steps"] else "-"
        loss = "-" if job["loss"] is None or not math.isfinite(job["loss"]) else f"{job['loss']:.4f}"
        eval_loss = "-" if job.get("eval_loss") is None or not math.isfinite(job["eval_loss"]) else f"{job['eval_loss']:.4f}"
        rate = "-" if job["tokens_per_s"] is None else f"{job['tokens_per_s']:.0f}"
        eta = "-" if job["eta_s"] is None else _duration(job["eta_s"])
        detail = job["failure"] or job["adapter_dir"] or ("cancel requested" if job["cancel_requested"] else "")
        rows.append(f"{job['name']:>16}  {job['state']:>9}  {steps:>11}  {loss:>8}  {eval_loss:>9}  {rate:>8}  {eta:>8}  {detail}")
    return rows


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
