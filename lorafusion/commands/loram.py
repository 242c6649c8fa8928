"""`lorafusion loram prune|align|recover|report`: LoRAM, train on a pruned model and recover the
adapter for the original model (see lorafusion.loram)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _keep_layers(text: str) -> list[int] | None:
    """'default' -> None (first and last layer); 'none' -> []; '0,1,-1' -> [0, 1, -1]."""
    if text == "default":
        return None
    if text == "none":
        return []
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--keep-layers must be 'default', 'none' or comma-separated integers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="loram_command", required=True, metavar="ACTION")

    prune = actions.add_parser("prune", help="structurally prune a local Llama/Qwen2/Mistral checkpoint")
    prune.add_argument("--model", required=True, help="original model directory (Hugging Face checkpoint)")
    prune.add_argument("--out", required=True, help="directory for the pruned model and prune_map.json (new or empty, or see --overwrite)")
    prune.add_argument("--overwrite", action="store_true", help="write into a non-empty --out: replaces what lorafusion wrote there before and writes beside other files; files lorafusion did not write are never deleted or replaced")
    prune.add_argument("--ratio", type=float, required=True, help="fraction of MLP channels and KV heads removed per pruned layer, in [0, 1)")
    prune.add_argument("--method", default="random", choices=("random", "magnitude", "activation"))
    prune.add_argument("--keep-layers", type=_keep_layers, default=None, metavar="LIST",
                       help="layers left unpruned: 'default' (first and last), 'none', or e.g. '0,1,-1'")
    prune.add_argument("--seed", type=int, default=0)
    prune.add_argument("--calibration", default=None, help="JSONL text corpus for --method activation")
    prune.add_argument("--calibration-samples", type=int, default=32)
    prune.add_argument("--max-seq-len", type=int, default=256, help="calibration samples are truncated to this")
    prune.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's, else bytes)")

    align = actions.add_parser("align", help="full-parameter continued pre-training of a pruned model on a text corpus")
    align.add_argument("--model", required=True, help="pruned model directory")
    align.add_argument("--data", required=True, help='JSONL corpus of {"text": ...} records')
    align.add_argument("--out", required=True, help="directory for the aligned model, new or empty (or see --overwrite); "
                       "its files are replaced at each checkpoint")
    align.add_argument("--overwrite", action="store_true", help="write into a non-empty --out: replaces what lorafusion wrote there before and writes beside other files; files lorafusion did not write are never deleted or replaced")
    align.add_argument("--steps", type=int, required=True)
    align.add_argument("--lr", type=float, default=1e-5)
    align.add_argument("--weight-decay", type=float, default=0.0)
    align.add_argument("--tokens-per-step", type=int, default=4096)
    align.add_argument("--max-seq-len", type=int, default=512)
    align.add_argument("--checkpoint-every", type=int, default=100)
    align.add_argument("--tokenizer", default=None)
    align.add_argument("--seed", type=int, default=0)
    align.add_argument("--device", default="cpu")

    recover = actions.add_parser("recover", help="expand an adapter trained on the pruned model to the original model")
    recover.add_argument("--adapter", required=True, help="adapter directory trained on the pruned model (PEFT format)")
    recover.add_argument("--prune-map", required=True, help="prune_map.json, or the pruned model directory")
    recover.add_argument("--out", required=True, help="directory for the recovered adapter")
    recover.add_argument("--base-model", default=None, help="base_model_name_or_path for the recovered adapter's config")

    report = actions.add_parser("report", help="parameters and bytes: original vs pruned vs pruned + NF4")
    report.add_argument("--model", required=True, help="pruned model directory")


def _print_report(report: dict[str, float]) -> None:
    for kind in ("original", "pruned"):
        print(f"{kind:>9}: {report[f'{kind}_parameters'] / 1e6:10.3f} M parameters, {report[f'{kind}_bytes'] / 2**20:10.2f} MiB bf16, "
              f"{report[f'{kind}_nf4_bytes'] / 2**20:10.2f} MiB with NF4 decoder linears")
    print(f"parameter reduction {report['parameter_reduction']:.2f}x; storage reduction (original bf16 / pruned NF4) "
          f"{report['storage_reduction']:.2f}x")


def _prune(args: argparse.Namespace) -> int:
    from lorafusion.models import PRUNE_MAP_FILE
    from lorafusion.runtime.output_dir import claim_model_directory

    # Before any work, so that a refusal comes at once.
    with claim_model_directory(args.out, args.overwrite, expected=("config.json", PRUNE_MAP_FILE)):
        return _prune_into(Path(args.out), args)


def _prune_into(out: Path, args: argparse.Namespace) -> int:
    import torch
    import transformers

    from lorafusion.loram import loram_memory_report, prune, save_pruned_model
    from lorafusion.runtime.data import load_jsonl_dataset
    from lorafusion.runtime.output_dir import discard, publish_files, staging_directory
    from lorafusion.runtime.tokenizer import load_tokenizer

    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True).eval()
    try:
        tokenizer = load_tokenizer(args.tokenizer or args.model)
    except ValueError:
        if args.tokenizer:
            raise
        tokenizer = load_tokenizer(None)
    calibration = None
    if args.calibration:
        samples = load_jsonl_dataset(args.calibration, "text", tokenizer, args.max_seq_len)[: args.calibration_samples]
        calibration = [torch.tensor([sample.input_ids]) for sample in samples]
    pruned, prune_map = prune(model, args.ratio, args.method, args.keep_layers, args.seed, calibration)
    staging = staging_directory(out)
    try:
        save_pruned_model(pruned, prune_map, staging)
        tokenizer.save_pretrained(staging)
        publish_files(staging, out)
    finally:
        discard(staging)
    print(f"pruned model written to {args.out}")
    _print_report(loram_memory_report(model.config, prune_map))
    return 0


def _align(args: argparse.Namespace) -> int:
    from lorafusion.loram.align import align

    align(
        args.model, args.data, args.out, args.steps, lr=args.lr, weight_decay=args.weight_decay,
        tokens_per_step=args.tokens_per_step, max_seq_len=args.max_seq_len, tokenizer=args.tokenizer,
        checkpoint_every=args.checkpoint_every, seed=args.seed, device=args.device, overwrite=args.overwrite,
        log=lambda step, loss: print(f"step {step}: loss {loss:.4f}", flush=True),
    )
    print(f"aligned model written to {args.out}")
    return 0


def _recover(args: argparse.Namespace) -> int:
    from lorafusion.loram import recover

    recover(args.adapter, args.prune_map, args.out, base_model_name_or_path=args.base_model)
    print(f"recovered adapter written to {args.out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    import transformers

    from lorafusion.loram import PruneMap, loram_memory_report

    config = transformers.AutoConfig.from_pretrained(args.model, local_files_only=True)
    _print_report(loram_memory_report(config, PruneMap.load(args.model)))
    return 0


def run(args: argparse.Namespace) -> int:
    from lorafusion.commands.generate import model_directory

    actions = {"prune": _prune, "align": _align, "recover": _recover, "report": _report}
    try:
        if args.loram_command in ("prune", "align", "report"):
            model_directory(args.model)
        return actions[args.loram_command](args)
    except (ValueError, FileNotFoundError, TypeError) as error:
        print(f"lorafusion loram {args.loram_command}: {error}", file=sys.stderr)
        return 2
