"""`lorafusion generate`: greedy completion of a prompt by a base model with a trained adapter."""

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
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model directory)")
    parser.add_argument("--max-new-tokens", type=_positive_int, default=32)
    parser.add_argument("--device", default="cpu")


def generate(model, tokenizer, prompt: str, max_new_tokens: int, device="cpu") -> str:
    """Greedy decoding without a KV cache (fine for a quick look at a small model)."""
    import torch

    ids = [tokenizer.bos_token_id] + tokenizer.encode(prompt)
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([ids + new], device=device)).logits[0, -1]
            token = int(logits.argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
    return tokenizer.decode(new)


def model_directory(path: str, flag: str = "--model") -> str:
    """`path` if it is a local Hugging Face model directory; else a ValueError naming `flag`.
    Checked first, so that a typo is not looked up on the Hugging Face Hub."""
    if not Path(path).is_dir():
        from lorafusion.runtime.config import hub_hint

        raise ValueError(f"{flag} {path}: directory not found{hub_hint(path)}")
    if not (Path(path) / "config.json").is_file():
        raise ValueError(f"{flag} {path}: no config.json, not a Hugging Face model directory")
    return path


def run(args: argparse.Namespace) -> int:
    try:
        text = _generate(args)
    except (ValueError, OSError, RuntimeError, KeyError) as error:
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"lorafusion generate: error: {message}", file=sys.stderr)
        return 2
    print(args.prompt + text)
    return 0


def _generate(args: argparse.Namespace) -> str:
    import torch
    import transformers

    from lorafusion.adapters import load_adapter
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
    return generate(model, tokenizer, args.prompt, args.max_new_tokens, device)
