"""`lorafusion serve SERVER.yaml`: the fine-tuning service (see lorafusion.service)."""

from __future__ import annotations

import argparse
import signal
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="SERVER.yaml", help="model/tokenizer/scheduler sections as in a training "
                        "config, plus state_dir, data_roots, host, port, token (see the README's Service section)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def run(args: argparse.Namespace) -> int:
    from lorafusion.runtime.config import ConfigError
    from lorafusion.service.config import load_server_config

    try:
        server_config = load_server_config(args.config)
    except ConfigError as error:
        print(f"lorafusion serve: invalid config {args.config}:\n{error}", file=sys.stderr)
        return 2
    import torch
    from transformers.utils import logging as transformers_logging

    from lorafusion.runtime.threads import set_cpu_threads
    from lorafusion.service.server import Service

    try:
        device = torch.device(args.device) if args.device else None
    except RuntimeError:
        print(f"lorafusion serve: --device {args.device!r} is not a torch device (e.g. cpu, cuda, cuda:1)", file=sys.stderr)
        return 2
    if (device.type if device else "cuda" if torch.cuda.is_available() else "cpu") == "cpu":
        set_cpu_threads()  # as lorafusion train: the cores the load leaves free, unless OMP_NUM_THREADS says
    transformers_logging.disable_progress_bar()  # its "Writing model shards" bar, saving an inline base model
    try:
        service = Service.start(server_config, device=args.device)
    except (ValueError, OSError) as error:  # the state directory in use or refused, the port taken, ...
        print(f"lorafusion serve: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C while the base model loads: Service.start let everything go
        print("lorafusion serve: interrupted while starting; accepted jobs continue at the next start", file=sys.stderr)
        return 130
    def stop(signum, frame) -> None:
        """The first SIGINT/SIGTERM stops between two microbatches, checkpointing the running jobs;
        a second one at once, as a kill -9 would (every accepted job continues from its last checkpoint)."""
        if service.trainer.stop_requested.is_set():
            raise KeyboardInterrupt
        service.trainer.stop_requested.set()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    print(f"lorafusion serve: listening on {service.url} (state in {server_config.state_dir})", flush=True)
    try:
        service.train_until_stopped()
    except KeyboardInterrupt:
        print("lorafusion serve: stopped at once by a second signal; accepted jobs continue from their last "
              "checkpoints at the next start", file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("lorafusion serve: stopped; accepted jobs continue from their checkpoints at the next start", flush=True)
    return 0
