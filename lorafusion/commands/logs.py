"""`lorafusion logs NAME`: a job's log lines from a running `lorafusion serve`."""

from __future__ import annotations

import argparse
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lorafusion.service.client import add_connection_arguments

    parser.add_argument("name", help="the job's name")
    add_connection_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from lorafusion.commands.submit import report_error
    from lorafusion.service.client import ServiceClient, ServiceError

    try:
        lines = ServiceClient.from_args(args).logs(args.name)
    except ServiceError as error:
        return report_error("logs", error)
    for line in lines:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(line["at"]))
        print(f"{stamp}  {line['line']}")
    return 0
