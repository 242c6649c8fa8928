"""`lorafusion generate`: greedy completion of a prompt by a base model with a trained adapter."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="base model directory (a run's output_dir/base_model for inline models)")
    parser.add_argument("--adapter", default=None, help="adapter directory (PEFT format); omit for the base model alone")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model directory)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
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


def run(args: argparse.Namespace) -> int:
    import transformers

    from lorafusion.adapters import load_adapter
    from lorafusion.runtime.tokenizer import load_tokenizer

    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True).to(args.device).eval()
    if args.adapter:
        load_adapter(model, args.adapter)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    print(args.prompt + generate(model, tokenizer, args.prompt, args.max_new_tokens, args.device))
    return 0
