"""`lorafusion eval`: exact-match accuracy of an adapter's greedy completions on a JSONL file of
{"prompt": ..., "completion": ...} records."""

from __future__ import annotations

import argparse
import sys

from lorafusion.commands.generate import _positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", metavar="FILE.jsonl", help='{"prompt": ..., "completion": ...} records')
    parser.add_argument("--model", required=True, help="base model directory (a run's output_dir/base_model for inline models)")
    parser.add_argument("--adapter", default=None, help="adapter directory (PEFT format); omit for the base model alone")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model directory)")
    parser.add_argument("--max-new-tokens", type=_positive_int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--show-errors", type=int, default=3, metavar="N", help="print the first N wrong completions (default 3)")


def run(args: argparse.Namespace) -> int:
    from lorafusion.commands.generate import load_model
    from lorafusion.runtime.evaluation import exact_match, greedy_completions, model_forward, read_prompt_file

    try:
        records = read_prompt_file(args.data, need_completion=True)
        model, tokenizer, device = load_model(args)
        completions = greedy_completions(
            model_forward(model), tokenizer, [r.prompt for r in records], args.max_new_tokens, device
        )
    except (ValueError, OSError, RuntimeError, KeyError) as error:
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"lorafusion eval: error: {message}", file=sys.stderr)
        return 2
    expected = [r.completion for r in records]
    wrong = [(r, c) for r, c in zip(records, completions) if c != r.completion]
    for record, completion in wrong[: max(args.show_errors, 0)]:
        print(f"line {record.line}: {record.prompt!r} -> {completion!r}, expected {record.completion!r}")
    right = len(records) - len(wrong)
    print(f"exact match: {right}/{len(records)} = {exact_match(completions, expected):.1%}")
    return 0
