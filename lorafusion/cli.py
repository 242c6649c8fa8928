"""The `lorafusion` command line: one sub-command per module in lorafusion.commands."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module under lorafusion.commands, one-line help). Modules are imported only when their
# sub-command runs, so `lorafusion plan` never imports torch's CUDA bits or the kernels.
SUBCOMMANDS = {
    "train": ("train", "fine-tune several LoRA adapters together on one base model"),
    "generate": ("generate", "complete a prompt with a base model and a trained adapter"),
    "plan": ("plan", "schedule several LoRA jobs into token-capped microbatches"),
    "loram": ("loram", "LoRAM: prune a model, align it, recover adapters trained on it for the original"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorafusion", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(f"lorafusion.commands.{module_name}")
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
