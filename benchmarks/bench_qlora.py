"""QLoRA: NF4 dequantization bandwidth, and the NF4 fused LoRA layer vs PEFT LoRA on bitsandbytes.

1. Dequantization of an NF4 weight (double quantization, block 64) to the compute dtype: ours
   (Triton on a GPU, the torch backend on the CPU) and bitsandbytes' `dequantize_4bit`, in GB/s
   (bytes read + bytes written) and as a fraction of a plain device copy measured in the same run.
2. Forward+backward of one LoRA layer over an NF4 base: FusedLoRALinear.from_linear(quantize="nf4")
   vs PEFT's LoRA layer on `bitsandbytes.nn.Linear4bit`, plus the fused layer on a 16-bit base
   for reference; median times, peak memory (GPU), base-weight bytes per parameter.

On a GPU: tokens 8192, hidden 4096 and 8192, r 16, bf16. On the CPU: small shapes in fp32, so the
script is exercised; those numbers say nothing about GPU performance.

    python benchmarks/bench_qlora.py [--device cpu|cuda] [--out-dir DIR]

Writes qlora_dequant_<device>.csv and qlora_layer_<device>.csv (+ .machine.json) under
benchmarks/results/.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from harness import RESULTS_DIR, bench_arguments, machine_info, peak_memory_mb, print_table, time_ms, write_results
from lorafusion.modules import FusedLoRALinear
from lorafusion.qlora import nf4_to_bnb, quantize_nf4

GPU_LAYER_SHAPES = [(8192, 4096, 16), (8192, 8192, 16)]
CPU_LAYER_SHAPES = [(256, 256, 16)]
GPU_DEQUANT_SHAPES = [(4096, 4096), (8192, 8192), (8192, 28672)]
CPU_DEQUANT_SHAPES = [(512, 512)]
DROPOUT = 0.1


def _device_name(device: torch.device, info: dict) -> str:
    return "cpu" if device.type == "cpu" else info["gpu"].replace(" ", "_").lower()


def bitsandbytes_missing() -> str | None:
    """Why bitsandbytes cannot be used here (None when it can): it is optional on GPU machines."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as error:  # ImportError, or a broken native library
        return f"bitsandbytes unavailable ({type(error).__name__}: {error})"
    return None


def measure_dequantization(shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> dict:
    """Ours and a plain copy, and bitsandbytes' dequantize_4bit when it is installed (else NaN)."""
    weight = quantize_nf4(torch.randn(shape, device=device, dtype=dtype), blocksize=64, double_quant=True)
    out = torch.empty(shape, device=device, dtype=dtype)
    source = torch.empty_like(out)
    backend = "triton" if device.type == "cuda" else "torch"
    stored = weight.nbytes()
    moved = stored + out.numel() * out.element_size()
    copy_ms = time_ms(lambda: out.copy_(source), device)
    ours_ms = time_ms(lambda: weight.dequantize(out=out, backend=backend), device)
    if bitsandbytes_missing() is None:
        import bitsandbytes.functional as bnbf

        packed, quant_state = nf4_to_bnb(weight)
        bnb_ms = time_ms(lambda: bnbf.dequantize_4bit(packed, quant_state), device)
    else:
        bnb_ms = math.nan
    copy_gbs = 2 * out.numel() * out.element_size() / copy_ms / 1e6
    ours_gbs, bnb_gbs = moved / ours_ms / 1e6, moved / bnb_ms / 1e6
    return {
        "out_features": shape[0],
        "in_features": shape[1],
        "dtype": str(dtype).removeprefix("torch."),
        "ours_backend": backend,
        "ours_ms": ours_ms,
        "bnb_ms": bnb_ms,
        "copy_ms": copy_ms,
        "ours_gbs": ours_gbs,
        "bnb_gbs": bnb_gbs,
        "copy_gbs": copy_gbs,
        "ours_of_copy": ours_gbs / copy_gbs,
        "bnb_of_copy": bnb_gbs / copy_gbs,
        "bytes_per_param": stored / weight.numel(),
    }


class _Holder(nn.Module):
    """A one-layer model for get_peft_model, which wraps modules by name."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        self.is_loaded_in_4bit = True  # as transformers marks 4-bit models: PEFT then uses its bnb layer

    def forward(self, x):
        return self.layer(x)


def build_layers(tokens: int, hidden: int, rank: int, dtype: torch.dtype, device: torch.device) -> dict:
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    linear = nn.Linear(hidden, hidden, bias=False, device=device, dtype=dtype).requires_grad_(False)
    linear4bit = bnb.nn.Linear4bit(
        hidden, hidden, bias=False, compute_dtype=dtype, compress_statistics=True, quant_type="nf4"
    )
    linear4bit.load_state_dict(linear.state_dict())
    linear4bit = linear4bit.to(device)
    peft_model = get_peft_model(
        _Holder(linear4bit), LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=DROPOUT, target_modules=["layer"])
    )
    peft_layer = peft_model.base_model.model.layer
    peft_layer.lora_A.to(dtype)  # PEFT keeps adapters in fp32 by default; compare in the compute dtype
    peft_layer.lora_B.to(dtype)
    nn.init.normal_(peft_layer.lora_B["default"].weight, std=0.02)
    fused_nf4 = FusedLoRALinear.from_linear(linear4bit, r=rank, lora_alpha=2 * rank, lora_dropout=DROPOUT)
    fused_16bit = FusedLoRALinear.from_linear(linear, r=rank, lora_alpha=2 * rank, lora_dropout=DROPOUT)
    for layer in (fused_nf4, fused_16bit):
        nn.init.normal_(layer.lora_B, std=0.02)
    return {
        "peft_bnb_nf4": peft_model,
        "fused_nf4": fused_nf4.to(device),
        "fused_16bit_base": fused_16bit,
    }


def base_bytes_per_parameter(layer: nn.Module, numel: int) -> float:
    if isinstance(layer, FusedLoRALinear):
        weight = layer.weight
        return (weight.nbytes() if layer.quantized else weight.numel() * weight.element_size()) / numel
    stored = [t for name, t in layer.state_dict().items() if "lora_" not in name]
    return sum(t.numel() * t.element_size() for t in stored) / numel


def measure_layer(tokens: int, hidden: int, rank: int, dtype: torch.dtype, device: torch.device) -> list[dict]:
    rows = []
    for name, layer in build_layers(tokens, hidden, rank, dtype, device).items():
        layer.train()
        x = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(tokens, hidden, device=device, dtype=dtype)
        trainable = [x, *(p for p in layer.parameters() if p.requires_grad)]
        fwd_bwd = time_ms(lambda: layer(x).backward(dy), device, grad_to_none=trainable)
        peak_mb = peak_memory_mb(lambda: layer(x).backward(dy), device)
        rows.append(
            {
                "tokens": tokens,
                "hidden": hidden,
                "r": rank,
                "dtype": str(dtype).removeprefix("torch."),
                "impl": name,
                "fwd_bwd_ms": fwd_bwd,
                "peak_mem_mb": peak_mb,
                "base_bytes_per_param": base_bytes_per_parameter(layer, hidden * hidden),
            }
        )
    peft_ms = next(r["fwd_bwd_ms"] for r in rows if r["impl"] == "peft_bnb_nf4")
    for row in rows:
        row["speedup_vs_peft_bnb"] = peft_ms / row["fwd_bwd_ms"]
    return rows


def run(device: torch.device, layer_shapes=None, dequant_shapes=None, out_dir: Path = RESULTS_DIR):
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    layer_shapes = layer_shapes or (GPU_LAYER_SHAPES if on_gpu else CPU_LAYER_SHAPES)
    dequant_shapes = dequant_shapes or (GPU_DEQUANT_SHAPES if on_gpu else CPU_DEQUANT_SHAPES)
    info = machine_info(device)
    suffix = _device_name(device, info)

    dequant_rows = [measure_dequantization(shape, dtype, device) for shape in dequant_shapes]
    write_results(f"qlora_dequant_{suffix}", dequant_rows, info, out_dir)
    print_table(dequant_rows, ["out_features", "in_features", "ours_gbs", "bnb_gbs", "copy_gbs", "ours_of_copy", "bnb_of_copy"])

    layer_rows = [row for shape in layer_shapes for row in measure_layer(*shape, dtype, device)]
    write_results(f"qlora_layer_{suffix}", layer_rows, info, out_dir)
    print_table(layer_rows, ["hidden", "r", "impl", "fwd_bwd_ms", "speedup_vs_peft_bnb", "peak_mem_mb", "base_bytes_per_param"])
    print(f"results: {out_dir}/qlora_*_{suffix}.csv")
    return dequant_rows, layer_rows


def main(argv=None) -> None:
    parser = bench_arguments(__doc__)
    args = parser.parse_args(argv)
    run(torch.device(args.device), out_dir=args.out_dir)


# pytest-benchmark suite (`pytest benchmarks --benchmark-only`): tiny shapes on the CPU.
_CPU = torch.device("cpu")


def test_dequantize_nf4_torch_backend(benchmark):
    weight = quantize_nf4(torch.randn(256, 256))
    benchmark(lambda: weight.dequantize(backend="torch"))


def test_dequantize_nf4_bitsandbytes(benchmark):
    import bitsandbytes.functional as bnbf

    packed, quant_state = nf4_to_bnb(quantize_nf4(torch.randn(256, 256)))
    benchmark(lambda: bnbf.dequantize_4bit(packed, quant_state))


def _fwd_bwd(name: str):
    layer = build_layers(64, 128, 8, torch.float32, _CPU)[name]
    x = torch.randn(64, 128, requires_grad=True)
    dy = torch.randn(64, 128)
    return lambda: layer(x).backward(dy)


def test_fwd_bwd_fused_nf4(benchmark):
    benchmark(_fwd_bwd("fused_nf4"))


def test_fwd_bwd_peft_bnb_nf4(benchmark):
    benchmark(_fwd_bwd("peft_bnb_nf4"))


def test_script_writes_results(tmp_path):
    dequant_rows, layer_rows = run(_CPU, layer_shapes=[(32, 64, 4)], dequant_shapes=[(64, 64)], out_dir=tmp_path)
    assert all(math.isfinite(r["ours_gbs"]) and r["ours_gbs"] > 0 for r in dequant_rows)
    assert {r["impl"] for r in layer_rows} == {"peft_bnb_nf4", "fused_nf4", "fused_16bit_base"}
    nf4 = next(r for r in layer_rows if r["impl"] == "fused_nf4")
    assert nf4["base_bytes_per_param"] < 1.0 and math.isfinite(nf4["fwd_bwd_ms"])  # tables weigh at 64 x 64
    assert (tmp_path / "qlora_layer_cpu.csv").read_text().startswith("tokens,hidden,r")
    assert (tmp_path / "qlora_dequant_cpu.csv").exists()


if __name__ == "__main__":
    main()
