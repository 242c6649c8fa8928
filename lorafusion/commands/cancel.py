"""`lorafusion cancel NAME`: stop a job of a running `lorafusion serve` (its last checkpoint stays)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lorafusion.service.client import add_connection_arguments

    parser.add_argument("name", help="the job's name")
    add_connection_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from lorafusion.commands.submit import report_error
    from lorafusion.service.client import ServiceClient, ServiceError

    try:
        job = ServiceClient.from_args(args).cancel(args.name)
    except ServiceError as error:
        return report_error("cancel", error)
    if job["state"] == "cancelled":
        print(f"cancelled job {args.name!r} at step {job['step']}/{job['num_steps'] or 0}")
    else:
        print(f"job {args.name!r}: cancel requested; it is {job['state']}")
    return 0
