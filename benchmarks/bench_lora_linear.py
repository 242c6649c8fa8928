"""FusedLoRALinear vs PEFT's LoRA Linear vs the frozen base linear alone.

Forward, backward and forward+backward median times, peak memory (GPU) and the bytes each layer
saves for backward (activations only, parameters excluded), per shape. On a GPU: tokens=8192,
hidden in {4096, 5120, 8192}, r in {16, 64}, bf16, dropout 0.1, and the single-Triton-GEMM forward
variant beside the default cuBLAS one, and the CUDA extension backend when it builds. On the CPU: small shapes, fp32, torch backend, so that the
script itself is exercised.

    python benchmarks/bench_lora_linear.py [--device cpu|cuda] [--out-dir DIR]

Writes lora_linear_<device>.csv, .machine.json and .png under benchmarks/results/.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from harness import (
    RESULTS_DIR,
    bench_arguments,
    machine_info,
    new_figure,
    peak_memory_mb,
    print_table,
    save_figure,
    time_ms,
    write_results,
)
from lorafusion.kernels import fused_lora_linear
from lorafusion.kernels.cuda_backend import cuda_extension_builds
from lorafusion.modules import FusedLoRALinear

GPU_SHAPES = [(8192, hidden, r) for hidden in (4096, 5120, 8192) for r in (16, 64)]
CPU_SHAPES = [(512, 256, 16), (512, 384, 64)]
DROPOUT = 0.1


@dataclass
class Case:
    tokens: int
    hidden: int
    rank: int
    dtype: torch.dtype
    device: torch.device


def _peft_layer(base: torch.nn.Linear, rank: int) -> torch.nn.Module:
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=DROPOUT)
    layer = PeftLoraLinear(base, "default", config, r=rank, lora_alpha=2 * rank, lora_dropout=DROPOUT)
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
    return layer.to(device=base.weight.device, dtype=base.weight.dtype)


def build_layers(case: Case, cuda_backend: bool = True) -> dict[str, torch.nn.Module]:
    """The layers under test, all over one frozen base weight. `cuda_backend`: also the CUDA
    extension backend where it builds (a first build compiles csrc/ with nvcc, minutes)."""
    base = torch.nn.Linear(case.hidden, case.hidden, bias=False, device=case.device, dtype=case.dtype)
    base.weight.requires_grad_(False)
    fused = FusedLoRALinear.from_linear(base, r=case.rank, lora_alpha=2 * case.rank, lora_dropout=DROPOUT)
    torch.nn.init.normal_(fused.lora_B, std=0.02)
    layers = {"base": base, "peft": _peft_layer(base, case.rank), "fused": fused}
    if case.device.type == "cuda":
        layers["fused_triton_gemm"] = _TritonGemmForward(fused)
        if cuda_backend and cuda_extension_builds():
            layers["fused_cuda"] = _CudaBackendForward(fused)
    return layers


class _TritonGemmForward(torch.nn.Module):
    """The fused layer with its forward as one Triton GEMM (Y written once) instead of cuBLAS + addmm."""

    def __init__(self, fused: FusedLoRALinear):
        super().__init__()
        self.fused = fused

    def forward(self, x):
        f = self.fused
        return fused_lora_linear(
            x, f.weight, f.bias, f.lora_A, f.lora_B, f.scaling, DROPOUT, backend="triton", forward_impl="triton_gemm"
        )


class _CudaBackendForward(torch.nn.Module):
    """The fused layer on the CUDA C++ extension backend (csrc/) instead of the Triton kernels."""

    def __init__(self, fused: FusedLoRALinear):
        super().__init__()
        self.fused = fused

    def forward(self, x):
        f = self.fused
        return fused_lora_linear(x, f.weight, f.bias, f.lora_A, f.lora_B, f.scaling, DROPOUT, backend="cuda")


def saved_activation_bytes(layer: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct non-parameter tensors autograd keeps for backward, the input included."""
    parameter_ptrs = {p.data_ptr() for p in layer.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        if tensor.data_ptr() not in parameter_ptrs:
            saved[tensor.data_ptr()] = max(saved.get(tensor.data_ptr(), 0), tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return sum(saved.values())


def measure(case: Case, name: str, layer: torch.nn.Module) -> dict:
    layer.train()
    x = torch.randn(case.tokens, case.hidden, device=case.device, dtype=case.dtype, requires_grad=True)
    dy = torch.randn(case.tokens, case.hidden, device=case.device, dtype=case.dtype)
    trainable = [x, *(p for p in layer.parameters() if p.requires_grad)]

    fwd = time_ms(lambda: layer(x), case.device)
    retained = layer(x)
    bwd = time_ms(lambda: retained.backward(dy, retain_graph=True), case.device, grad_to_none=trainable)
    retained = None  # frees the retained graph before the peak-memory run
    fwd_bwd = time_ms(lambda: layer(x).backward(dy), case.device, grad_to_none=trainable)
    peak_mb = peak_memory_mb(lambda: layer(x).backward(dy), case.device)
    return {
        "tokens": case.tokens,
        "hidden": case.hidden,
        "r": case.rank,
        "dtype": str(case.dtype).removeprefix("torch."),
        "impl": name,
        "fwd_ms": fwd,
        "bwd_ms": bwd,
        "fwd_bwd_ms": fwd_bwd,
        "peak_mem_mb": peak_mb,
        "saved_mb": saved_activation_bytes(layer, x) / 2**20,
    }


def add_ratios(rows: list[dict]) -> None:
    """fwd_bwd relative to the frozen base linear and PEFT's speedup factor, per shape (same run)."""
    by_shape: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        by_shape.setdefault((row["tokens"], row["hidden"], row["r"]), {})[row["impl"]] = row
    for impls in by_shape.values():
        for row in impls.values():
            row["x_base"] = row["fwd_bwd_ms"] / impls["base"]["fwd_bwd_ms"]
            row["speedup_vs_peft"] = impls["peft"]["fwd_bwd_ms"] / row["fwd_bwd_ms"]


def plot(rows: list[dict], path: Path, title: str) -> None:
    shapes = sorted({(r["hidden"], r["r"]) for r in rows})
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    width = 0.8 / len(impls)
    fig, ax = new_figure(figsize=(max(6, 1.6 * len(shapes)), 4))
    for i, impl in enumerate(impls):
        values = [next(r["x_base"] for r in rows if r["impl"] == impl and (r["hidden"], r["r"]) == s) for s in shapes]
        ax.bar([j + i * width for j in range(len(shapes))], values, width, label=impl)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + width * (len(impls) - 1) / 2 for j in range(len(shapes))])
    ax.set_xticklabels([f"h={h}\nr={r}" for h, r in shapes])
    ax.set_ylabel("forward+backward time / frozen base linear")
    ax.set_title(title)
    ax.legend()
    save_figure(fig, path)


def run(device: torch.device, shapes=None, out_dir: Path = RESULTS_DIR) -> list[dict]:
    if shapes is None:
        shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for tokens, hidden, rank in shapes:
        case = Case(tokens, hidden, rank, dtype, device)
        for name, layer in build_layers(case).items():
            rows.append(measure(case, name, layer))
    add_ratios(rows)
    info = machine_info(device)
    name = "lora_linear_" + ("cpu" if device.type == "cpu" else info["gpu"].replace(" ", "_").lower())
    write_results(name, rows, info, out_dir)
    plot(rows, out_dir / f"{name}.png", f"LoRA linear, {info.get('gpu', 'CPU')}, {rows[0]['dtype']}, p={DROPOUT}")
    print_table(rows, ["hidden", "r", "impl", "fwd_ms", "bwd_ms", "fwd_bwd_ms", "x_base", "speedup_vs_peft", "saved_mb", "peak_mem_mb"])
    print(f"results: {out_dir / name}.csv")
    return rows


def main(argv=None) -> None:
    parser = bench_arguments(__doc__)
    args = parser.parse_args(argv)
    run(torch.device(args.device), out_dir=args.out_dir)


# pytest-benchmark suite (`pytest benchmarks --benchmark-only`): small shapes on whatever device is present.
_SMOKE = Case(256, 128, 16, torch.float32, torch.device("cpu"))


def _fwd_bwd(layer, case=_SMOKE):
    x = torch.randn(case.tokens, case.hidden, requires_grad=True)
    dy = torch.randn(case.tokens, case.hidden)
    return lambda: layer(x).backward(dy)


def test_fwd_bwd_base(benchmark):
    benchmark(_fwd_bwd(build_layers(_SMOKE)["base"]))


def test_fwd_bwd_peft(benchmark):
    benchmark(_fwd_bwd(build_layers(_SMOKE)["peft"]))


def test_fwd_bwd_fused(benchmark):
    benchmark(_fwd_bwd(build_layers(_SMOKE)["fused"]))


def test_script_writes_results(tmp_path):
    rows = run(torch.device("cpu"), shapes=[(64, 32, 4)], out_dir=tmp_path)
    assert {r["impl"] for r in rows} == {"base", "peft", "fused"}
    assert all(math.isfinite(r["fwd_bwd_ms"]) and r["fwd_bwd_ms"] > 0 for r in rows)
    fused, peft = (next(r for r in rows if r["impl"] == name) for name in ("fused", "peft"))
    assert fused["saved_mb"] < peft["saved_mb"]  # no dropped copy of x kept with dropout on
    assert (tmp_path / "lora_linear_cpu.csv").read_text().startswith("tokens,hidden,r")
    assert (tmp_path / "lora_linear_cpu.png").stat().st_size > 0


if __name__ == "__main__":
    main()
