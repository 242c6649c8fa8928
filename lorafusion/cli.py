"""The `lorafusion` command line: one sub-command per module in lorafusion.commands."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module under lorafusion.commands, one-line help). Only the module of the sub-command on
# the command line is imported (its imports reach torch, scipy, transformers: seconds), so
# `lorafusion --help` and a mistyped command answer at once.
SUBCOMMANDS = {
    "train": ("train", "fine-tune several LoRA adapters together on one base model"),
    "generate": ("generate", "complete a prompt with a base model and a trained adapter"),
    "eval": ("eval", "exact-match accuracy of an adapter's completions on a JSONL of prompt/completion pairs"),
    "plan": ("plan", "schedule several LoRA jobs into token-capped microbatches"),
    "loram": ("loram", "LoRAM: prune a model, align it, recover adapters trained on it for the original"),
    "serve": ("serve", "run the fine-tuning service: jobs submitted, cancelled and finished while it trains"),
    "submit": ("submit", "send a job to a running `lorafusion serve`"),
    "jobs": ("jobs", "list the jobs of a running `lorafusion serve`: state, step, loss, tokens/s, ETA"),
    "cancel": ("cancel", "cancel a job of a running `lorafusion serve`"),
    "logs": ("logs", "show a job's log lines from a running `lorafusion serve`"),
}


def _chosen_command(argv: list[str]) -> str | None:
    """The sub-command named on the command line: the first argument that is not an option (the
    top-level parser has no option taking a value)."""
    for argument in argv:
        if argument == "--":
            return None
        if not argument.startswith("-"):
            return argument if argument in SUBCOMMANDS else None
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser, with the arguments of the sub-command chosen in `argv` (every sub-command's when
    `argv` is None)."""
    chosen = None if argv is None else _chosen_command(argv)
    parser = argparse.ArgumentParser(
        prog="lorafusion", description="Fast LoRA fine-tuning: several adapters trained together on one base model."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if argv is None or name == chosen:
            module = importlib.import_module(f"lorafusion.commands.{module_name}")
            module.add_arguments(sub)
            sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
