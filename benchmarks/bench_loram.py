"""LoRAM: LoRA training on the original model vs LoRAM on the pruned model vs QLoRAM (pruned + NF4).

1. Training: one step (forward, backward, AdamW on the adapters) of a LoRA adapter (r 8, all seven
   projections) on a Llama-shaped model with random weights: the original model, the model pruned
   with `lorafusion.loram.prune` (random structured pruning, first and last layers kept), and the
   pruned model with every decoder linear in NF4. Median step time, tokens/s, model bytes
   (parameters + buffers as stored) and, on a GPU, peak allocated memory.
2. Parameter storage (`loram_memory_report`, from shapes on the meta device): original bf16 vs
   pruned bf16 vs pruned NF4, and the reduction factor, for the benchmarked model and for
   LLaMA-3.1-70B's shapes (the paper reports 15.81x for QLoRAM-Stru there).

On a GPU: a 16-layer, hidden-2048 Llama in bf16, 4096 tokens per step. On the CPU: a 4-layer,
hidden-256 Llama in fp32, 256 tokens, one thread, so the script is exercised; CPU times say
nothing about GPUs.

    python benchmarks/bench_loram.py [--device cpu|cuda] [--out-dir DIR]

Writes loram_train_<device>.csv and loram_storage_<device>.csv (+ .machine.json) under
benchmarks/results/.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import transformers
from torch.nn import functional as F

from harness import RESULTS_DIR, bench_arguments, machine_info, print_table, time_ms, write_results
from lorafusion import LoRAConfig, apply_lora
from lorafusion.loram import loram_memory_report, make_prune_map, prune

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPU_MODEL = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=32000)
CPU_MODEL = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, vocab_size=1024)
LLAMA_3_1_70B = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
RATIOS = (0.65, 0.85)
VARIANTS = ("lora_original", "loram_pruned", "qloram_pruned_nf4")


def llama_config(shape: dict) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(**shape, max_position_embeddings=8192, attn_implementation="sdpa")


def build_variant(shape: dict, variant: str, ratio: float, dtype: torch.dtype, device: torch.device):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config(shape)).to(dtype)
    if variant != "lora_original":
        model, _ = prune(model, ratio, method="random")
    config = LoRAConfig(r=8, lora_alpha=16, target_modules=PROJECTIONS)
    quantize = "nf4" if variant == "qloram_pruned_nf4" else None
    apply_lora(model, config, quantize=quantize, quantize_other_linears=quantize is not None)
    return model.to(device).train()


def model_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def measure_training(shape: dict, variant: str, ratio: float, tokens: int, dtype: torch.dtype, device: torch.device) -> dict:
    model = build_variant(shape, variant, ratio, dtype, device)
    adapters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(adapters, lr=1e-4)
    input_ids = torch.randint(0, shape["vocab_size"], (1, tokens), generator=torch.Generator().manual_seed(1)).to(device)

    def step():
        logits = model(input_ids=input_ids).logits
        loss = F.cross_entropy(logits[0, :-1].float(), input_ids[0, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        step()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_mb = math.nan  # no allocator statistics on the CPU
    ms = time_ms(step, device, repetitions=3)
    row = {
        "variant": variant,
        "ratio": 0.0 if variant == "lora_original" else ratio,
        "tokens": tokens,
        "step_ms": ms,
        "tokens_per_s": tokens / (ms / 1e3),
        "model_mb": model_bytes(model) / 2**20,
        "trainable_params": sum(p.numel() for p in adapters),
        "peak_mem_mb": peak_mb,
    }
    return row


def storage_rows(name: str, shape: dict, ratios=RATIOS) -> list[dict]:
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(llama_config(shape))
    rows = []
    for ratio in ratios:
        report = loram_memory_report(model.config, make_prune_map(model, ratio, method="random"))
        rows.append({
            "model": name,
            "ratio": ratio,
            "original_params_m": report["original_parameters"] / 1e6,
            "pruned_params_m": report["pruned_parameters"] / 1e6,
            "original_bf16_mb": report["original_bytes"] / 2**20,
            "pruned_bf16_mb": report["pruned_bytes"] / 2**20,
            "pruned_nf4_mb": report["pruned_nf4_bytes"] / 2**20,
            "parameter_reduction": report["parameter_reduction"],
            "storage_reduction": report["storage_reduction"],
        })
    return rows


def _device_name(device: torch.device) -> str:
    return "gpu" if device.type == "cuda" else "cpu"


def run(device: torch.device, shape: dict | None = None, tokens: int | None = None, ratio: float = RATIOS[0],
        out_dir: Path = RESULTS_DIR, include_70b: bool = True):
    on_gpu = device.type == "cuda"
    shape = shape or (GPU_MODEL if on_gpu else CPU_MODEL)
    tokens = tokens or (4096 if on_gpu else 256)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    info = machine_info(device)
    suffix = _device_name(device)

    train_rows = [measure_training(shape, variant, ratio, tokens, dtype, device) for variant in VARIANTS]
    write_results(f"loram_train_{suffix}", train_rows, info, out_dir)
    print_table(train_rows, ["variant", "ratio", "tokens", "step_ms", "tokens_per_s", "model_mb", "trainable_params", "peak_mem_mb"])

    storage = storage_rows("benchmarked", shape) + (storage_rows("llama-3.1-70b-shapes", LLAMA_3_1_70B) if include_70b else [])
    write_results(f"loram_storage_{suffix}", storage, info, out_dir)
    print_table(storage, ["model", "ratio", "original_params_m", "pruned_params_m", "original_bf16_mb", "pruned_nf4_mb",
                          "parameter_reduction", "storage_reduction"])
    print(f"results: {out_dir}/loram_*_{suffix}.csv")
    return train_rows, storage


def main(argv=None) -> None:
    parser = bench_arguments(__doc__)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # steadier medians on a shared machine; recorded in the machine info
    run(device, out_dir=args.out_dir)


# pytest-benchmark suite (`pytest benchmarks --benchmark-only`): tiny shapes on the CPU.
_CPU = torch.device("cpu")
_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=128)


def _train_step(variant: str):
    model = build_variant(_TINY, variant, 0.5, torch.float32, _CPU)
    input_ids = torch.randint(0, 128, (1, 32))
    return lambda: model(input_ids=input_ids).logits.sum().backward()


def test_train_step_lora_original(benchmark):
    benchmark(_train_step("lora_original"))


def test_train_step_loram_pruned(benchmark):
    benchmark(_train_step("loram_pruned"))


def test_train_step_qloram_pruned_nf4(benchmark):
    benchmark(_train_step("qloram_pruned_nf4"))


def test_script_writes_results(tmp_path):
    train_rows, storage = run(_CPU, shape=_TINY, tokens=16, ratio=0.5, out_dir=tmp_path, include_70b=False)
    by_variant = {row["variant"]: row for row in train_rows}
    assert by_variant["lora_original"]["model_mb"] > by_variant["loram_pruned"]["model_mb"] > by_variant["qloram_pruned_nf4"]["model_mb"]
    assert all(math.isfinite(row["tokens_per_s"]) and row["tokens_per_s"] > 0 for row in train_rows)
    assert all(row["storage_reduction"] > row["parameter_reduction"] > 1 for row in storage)
    assert (tmp_path / "loram_train_cpu.csv").read_text().startswith("variant,ratio,tokens")
    assert (tmp_path / "loram_storage_cpu.csv").exists()


if __name__ == "__main__":
    main()
