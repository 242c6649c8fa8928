"""`lorafusion train CONFIG.yaml`: fine-tune every job of the config together on one base model."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="training YAML (see examples/quickstart.yaml)")
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument(
        "--resume", action="store_true",
        help="continue the interrupted run in output_dir from its checkpoints (same config; without --resume "
        "a run never starts in a directory holding another run)",
    )
    existing.add_argument(
        "--overwrite", action="store_true",
        help="start afresh in a non-empty output_dir: removes an earlier lorafusion run's outputs there (its "
        "adapters, checkpoints, metrics, schedule, base_model) and writes beside other files; files lorafusion "
        "did not write are never deleted or replaced",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars or summary table")
    parser.add_argument(
        "--stop-after", type=int, default=None, metavar="N", help="stop after N microbatches, as a killed run would"
    )


def _run(config, args):
    progress = not args.no_progress
    if config.parallel.engine == "megatron":
        from lorafusion.engines.megatron_engine import train_with_megatron

        return train_with_megatron(config, args.resume, args.stop_after, progress)
    if config.parallel.engine == "deepspeed":
        from lorafusion.engines.deepspeed_engine import train_with_deepspeed

        return train_with_deepspeed(config, args.resume, args.stop_after, progress)
    from lorafusion.runtime.trainer import MultiJobTrainer

    return MultiJobTrainer(config, device=args.device, progress=progress).train(
        resume=args.resume, stop_after_microbatches=args.stop_after
    )


def _one_line_run_state_warnings(show_other):
    """A warnings.showwarning that prints the runtime's warnings about damaged run state in one
    line each, as the errors are, and leaves other libraries' warnings to `show_other`."""
    from lorafusion.runtime.run_state import RunStateWarning

    def show(message, category, *args, **kwargs) -> None:
        if issubclass(category, RunStateWarning):
            print(f"lorafusion train: warning: {message}", file=sys.stderr)
        else:
            show_other(message, category, *args, **kwargs)

    return show


def run(args: argparse.Namespace) -> int:
    from lorafusion.runtime.config import ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as error:
        print(f"lorafusion train: invalid config {args.config}:\n{error}", file=sys.stderr)
        return 2
    config = dataclasses.replace(config, overwrite=getattr(args, "overwrite", False))
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_run_state_warnings(warnings.showwarning)
            result = _run(config, args)
    except ValueError as error:  # a problem found before training (layout, process count, ...)
        print(f"lorafusion train: {error}", file=sys.stderr)
        return 2
    failed = {name: job.failure for name, job in result.jobs.items() if job.status == "failed"}
    for name, reason in failed.items():
        print(f"lorafusion train: job {name!r} failed: {reason}", file=sys.stderr)
    return 1 if failed else 0
