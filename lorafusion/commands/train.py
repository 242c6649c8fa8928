"""`lorafusion train CONFIG.yaml`: fine-tune every job of the config together on one base model."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings

from ._interrupt import EXIT_INTERRUPTED, interrupted_message, is_reporting_rank, stop_gracefully_on_interrupt


# Distinct from a config error (2) and a failed job (1): the run itself was cut short by another rank.
EXIT_RANK_STOPPED_ANSWERING = 3


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
    parser.add_argument(
        "--no-progress", action="store_true",
        help="no per-step progress (bars on a terminal, log lines otherwise); the closing summary is still printed",
    )
    parser.add_argument(
        "--stop-after", type=int, default=None, metavar="N", help="stop after N microbatches, as a killed run would"
    )


def _run(config, args, trainers: list):
    progress = "summary" if args.no_progress else True
    from transformers.utils import logging as transformers_logging

    # Its one-shard "Writing model shards" bar (saving the base model) is noise among the run's own.
    transformers_logging.disable_progress_bar()
    if config.parallel.engine == "megatron":
        from lorafusion.engines.megatron_engine import train_with_megatron

        return train_with_megatron(config, args.resume, args.stop_after, progress)
    if config.parallel.engine == "deepspeed":
        from lorafusion.engines.deepspeed_engine import train_with_deepspeed

        return train_with_deepspeed(config, args.resume, args.stop_after, progress)
    from lorafusion.runtime.engine_imports import deepspeed_left_unimported
    from lorafusion.runtime.trainer import MultiJobTrainer

    if _runs_on_cpu(args.device):
        from lorafusion.runtime.threads import set_cpu_threads

        set_cpu_threads()
    with deepspeed_left_unimported():
        trainers.append(MultiJobTrainer(config, device=args.device, progress=progress))
        return trainers[-1].train(resume=args.resume, stop_after_microbatches=args.stop_after)


def _runs_on_cpu(device: str | None) -> bool:
    import torch

    try:
        return torch.device(device).type == "cpu" if device else not torch.cuda.is_available()
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None


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
    from lorafusion.engines.liveness import RankStoppedAnswering
    from lorafusion.runtime.config import ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as error:
        print(f"lorafusion train: invalid config {args.config}:\n{error}", file=sys.stderr)
        return 2
    config = dataclasses.replace(config, overwrite=getattr(args, "overwrite", False))
    trainers: list = []  # the single-process trainer, once built: Ctrl-C asks it to stop
    try:
        with warnings.catch_warnings(), stop_gracefully_on_interrupt(trainers):
            warnings.showwarning = _one_line_run_state_warnings(warnings.showwarning)
            result = _run(config, args, trainers)
    except ValueError as error:  # a problem found before training (layout, process count, ...)
        print(f"lorafusion train: {error}", file=sys.stderr)
        return 2
    except RankStoppedAnswering as error:  # parallel.timeout_s: another rank hung or vanished
        print(f"lorafusion train: {error}", file=sys.stderr)
        return EXIT_RANK_STOPPED_ANSWERING
    except KeyboardInterrupt:
        if is_reporting_rank():
            single_process = config.parallel.engine == "none"
            print(interrupted_message(args.config, trainers[-1] if trainers else None, single_process), file=sys.stderr)
        return EXIT_INTERRUPTED
    if trainers and trainers[-1].stop_requested and result.interrupted:
        print(interrupted_message(args.config, trainers[-1]), file=sys.stderr)
        return EXIT_INTERRUPTED
    failed = {name: job.failure for name, job in result.jobs.items() if job.status == "failed"}
    for name, reason in failed.items():
        print(f"lorafusion train: job {name!r} failed: {reason}", file=sys.stderr)
    return 1 if failed else 0
