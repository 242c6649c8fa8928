"""`lorafusion generate`: greedy completions of prompts by a base model with a trained adapter, one
per line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="base model directory (a run's output_dir/base_model for inline models)")
    parser.add_argument("--adapter", default=None, help="adapter directory (PEFT format); omit for the base model alone")
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    prompts.add_argument("--prompts", metavar="FILE.jsonl", help='a JSONL file of {"prompt": ...} records')
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model directory)")
    parser.add_argument("--max-new-tokens", type=_positive_int, default=32)
    parser.add_argument("--device", default="cpu")


def model_directory(path: str, flag: str = "--model") -> str:
    """`path` if it is a local Hugging Face model directory; else a ValueError naming `flag`.
    Checked first, so that a typo is not looked up on the Hugging Face Hub."""
    if not Path(path).is_dir():
        from lorafusion.runtime.config_schema import hub_hint

        raise ValueError(f"{flag} {path}: directory not found{hub_hint(path)}")
    if not (Path(path) / "config.json").is_file():
        raise ValueError(f"{flag} {path}: no config.json, not a Hugging Face model directory")
    return path


def run(args: argparse.Namespace) -> int:
    try:
        prompts = args.prompt or [r.prompt for r in _read_prompts(args.prompts)]
        model, tokenizer, device = load_model(args)
        from lorafusion.runtime.evaluation import greedy_completions, model_forward

        completions = greedy_completions(model_forward(model), tokenizer, prompts, args.max_new_tokens, device)
    except (ValueError, OSError, RuntimeError, KeyError) as error:
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"lorafusion generate: error: {message}", file=sys.stderr)
        return 2
    for completion in completions:
        # One line per prompt, whatever the completion holds.
        print(completion.replace("\\", "\\\\").replace("\n", "\\n"))
    return 0


def _read_prompts(path: str):
    from lorafusion.runtime.evaluation import read_prompt_file

    return read_prompt_file(path, need_completion=False)


def load_model(args: argparse.Namespace):
    """(model in eval mode with the adapter loaded, tokenizer, device) from --model, --adapter,
    --tokenizer and --device, each checked first so that a mistake gets a one-line answer."""
    import torch
    import transformers

    from lorafusion.adapter_loading import load_adapter
    from lorafusion.runtime.tokenizer import load_tokenizer

    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device {args.device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    model_directory(args.model)
    if args.adapter is not None and not (Path(args.adapter) / "adapter_config.json").is_file():
        raise ValueError(f"--adapter {args.adapter}: no adapter_config.json, not a PEFT adapter directory")
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True).to(device).eval()
    if args.adapter:
        load_adapter(model, args.adapter)
    return model, tokenizer, device
