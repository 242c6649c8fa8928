"""`lorafusion submit JOB.yaml`: send one job to a running `lorafusion serve`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lorafusion.service.client import add_connection_arguments

    parser.add_argument("job", metavar="JOB.yaml", help="one job, as an entry of a training config's jobs list "
                        "(relative data paths are resolved against this file's directory)")
    add_connection_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from lorafusion.safe_yaml import YAMLInputError, load_yaml
    from lorafusion.service.client import ServiceClient, ServiceError, job_with_absolute_paths, json_problem

    path = Path(args.job).expanduser().resolve()
    try:
        job = load_yaml(path.read_text(encoding="utf-8"), str(path))
    except (OSError, UnicodeDecodeError) as error:
        print(f"lorafusion submit: cannot read {path}: {getattr(error, 'strerror', None) or error}", file=sys.stderr)
        return 2
    except YAMLInputError as error:
        print(f"lorafusion submit: {error}", file=sys.stderr)
        return 2
    unsendable = json_problem(job)
    if unsendable:
        print(f"lorafusion submit: {path}: {unsendable} cannot be sent as JSON; write it as a string or number", file=sys.stderr)
        return 2
    try:
        record = ServiceClient.from_args(args).submit(job_with_absolute_paths(job, path.parent))
    except ServiceError as error:
        return report_error("submit", error, f" {args.job}")
    print(f"submitted job {record['name']!r} ({record['state']})")
    return 0


def report_error(command: str, error, where: str = "") -> int:
    """The service's refusal: its one line, or every problem one per line, key path first."""
    problems = getattr(error, "problems", [])
    if len(problems) > 1:
        print(f"lorafusion {command}: refused{where} by the service at {error.url}:", file=sys.stderr)
        for problem in problems:
            print(f"{problem['key']}: {problem['reason']}", file=sys.stderr)
    else:
        print(f"lorafusion {command}: {error}", file=sys.stderr)
    return 2
