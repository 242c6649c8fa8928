"""Multi-adapter LoRA layer: fused MultiLoRALinear vs an mLoRA-style loop vs k separate PEFT layers.

One packed microbatch of `tokens` tokens split evenly among k adapters. Implementations:
  fused  MultiLoRALinear: base GEMM once, every adapter's LoRA path in the fused multi-adapter kernels
  mlora  base GEMM once, then per adapter dropout / matmul / scale / index_add in torch (mLoRA's batching)
  peft   k PEFT LoRA layers over the shared base, each on its own adapter's tokens (k base GEMMs)
Forward+backward median time. On a GPU: k in {1, 2, 4, 8}, r 16 (and mixed ranks 8..64), tokens
8192, hidden 4096 and 8192, bf16, dropout 0.1. On the CPU: small shapes, fp32, torch backend.

    python benchmarks/bench_multi_lora.py [--device cpu|cuda] [--out-dir DIR]

Writes multi_lora_<device>.csv, .machine.json and .png under benchmarks/results/.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from harness import (
    RESULTS_DIR,
    bench_arguments,
    machine_info,
    new_figure,
    print_table,
    save_figure,
    time_ms,
    write_results,
)
from lorafusion.modules import MultiLoRABatch, MultiLoRALinear

DROPOUT = 0.1
ADAPTER_COUNTS = (1, 2, 4, 8)
RANK_SETS = {"r16": lambda k: [16] * k, "mixed": lambda k: [(8, 16, 32, 64)[i % 4] for i in range(k)]}


class MLoRAStyleLayer(nn.Module):
    """mLoRA's batching: the base GEMM once, then a torch loop over adapters with index_add."""

    def __init__(self, base: nn.Linear, multi: MultiLoRALinear):
        super().__init__()
        self.base = base
        self.multi = multi  # same adapter parameters as the fused layer
        self.dropout = nn.Dropout(DROPOUT)

    def forward(self, x: torch.Tensor, batch: MultiLoRABatch) -> torch.Tensor:
        y = self.base(x)
        start = 0
        for name, length in zip(batch.adapter_names, batch.lengths):
            index = torch.arange(start, start + length, device=x.device)
            settings = self.multi.adapters[name]
            lora = self.dropout(x.index_select(0, index)) @ self.multi.lora_A[name].t() @ self.multi.lora_B[name].t()
            y = y.index_add(0, index, lora * settings.scaling)
            start += length
        return y


class SeparatePeftLayers(nn.Module):
    """One PEFT LoRA layer per adapter over the shared base, each run on its own tokens."""

    def __init__(self, base: nn.Linear, ranks: list[int]):
        super().__init__()
        from peft import LoraConfig
        from peft.tuners.lora.layer import Linear as PeftLoraLinear

        self.layers = nn.ModuleDict()
        for i, r in enumerate(ranks):
            config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=DROPOUT)
            layer = PeftLoraLinear(base, "default", config, r=r, lora_alpha=2 * r, lora_dropout=DROPOUT)
            nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
            self.layers[f"job{i}"] = layer.to(base.weight.dtype)

    def forward(self, x: torch.Tensor, batch: MultiLoRABatch) -> torch.Tensor:
        outputs, start = [], 0
        for name, length in zip(batch.adapter_names, batch.lengths):
            outputs.append(self.layers[name](x[start : start + length]))
            start += length
        return torch.cat(outputs)


def build(tokens: int, hidden: int, ranks: list[int], dtype: torch.dtype, device: torch.device):
    base = nn.Linear(hidden, hidden, bias=False, device=device, dtype=dtype).requires_grad_(False)
    fused = MultiLoRALinear(base)
    for i, r in enumerate(ranks):
        fused.add_adapter(f"job{i}", r=r, lora_alpha=2 * r, lora_dropout=DROPOUT)
        nn.init.normal_(fused.lora_B[f"job{i}"], std=0.02)
    share = tokens // len(ranks)
    lengths = [share] * (len(ranks) - 1) + [tokens - share * (len(ranks) - 1)]
    batch = MultiLoRABatch([f"job{i}" for i in range(len(ranks))], lengths)
    layers = {"fused": fused, "mlora": MLoRAStyleLayer(base, fused), "peft": SeparatePeftLayers(base, ranks).to(device)}
    return layers, batch


def measure(layer: nn.Module, batch: MultiLoRABatch, tokens: int, hidden: int, dtype, device) -> float:
    layer.train()
    x = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(tokens, hidden, device=device, dtype=dtype)
    trainable = [x, *(p for p in layer.parameters() if p.requires_grad)]
    return time_ms(lambda: layer(x, batch).backward(dy), device, grad_to_none=trainable)


def run(device: torch.device, tokens: int | None = None, hiddens=None, counts=ADAPTER_COUNTS, out_dir: Path = RESULTS_DIR):
    on_gpu = device.type == "cuda"
    tokens = tokens or (8192 if on_gpu else 512)
    hiddens = hiddens or ((4096, 8192) if on_gpu else (128, 256))
    dtype = torch.bfloat16 if on_gpu else torch.float32
    rows = []
    for hidden in hiddens:
        for rank_set, make_ranks in RANK_SETS.items():
            for k in counts:
                layers, batch = build(tokens, hidden, make_ranks(k), dtype, device)
                times = {name: measure(layer, batch, tokens, hidden, dtype, device) for name, layer in layers.items()}
                for name, ms in times.items():
                    rows.append({
                        "tokens": tokens, "hidden": hidden, "ranks": rank_set, "k": k, "impl": name,
                        "fwd_bwd_ms": ms, "tokens_per_s": tokens / ms * 1e3,
                        "speedup_vs_mlora": times["mlora"] / ms, "speedup_vs_peft": times["peft"] / ms,
                    })
    for row in rows:  # cost relative to the same implementation with one adapter, same total tokens
        single = next(r for r in rows if (r["hidden"], r["ranks"], r["impl"], r["k"]) == (row["hidden"], row["ranks"], row["impl"], 1))
        row["x_one_adapter"] = row["fwd_bwd_ms"] / single["fwd_bwd_ms"]
    info = machine_info(device)
    name = "multi_lora_" + ("cpu" if not on_gpu else info["gpu"].replace(" ", "_").lower())
    write_results(name, rows, info, out_dir)
    plot(rows, out_dir / f"{name}.png", f"multi-adapter LoRA layer, {info.get('gpu', 'CPU')}, {tokens} tokens")
    print_table(rows, ["hidden", "ranks", "k", "impl", "fwd_bwd_ms", "x_one_adapter", "speedup_vs_mlora", "speedup_vs_peft"])
    print(f"results: {out_dir / name}.csv")
    return rows


def plot(rows: list[dict], path: Path, title: str) -> None:
    panels = sorted({(r["hidden"], r["ranks"]) for r in rows})
    fig, axes = new_figure(1, len(panels), figsize=(4 * len(panels), 3.5), squeeze=False)
    for ax, (hidden, rank_set) in zip(axes[0], panels):
        for impl in dict.fromkeys(r["impl"] for r in rows):
            points = [(r["k"], r["fwd_bwd_ms"]) for r in rows if (r["hidden"], r["ranks"], r["impl"]) == (hidden, rank_set, impl)]
            ax.plot(*zip(*points), marker="o", label=impl)
        ax.set_title(f"hidden {hidden}, ranks {rank_set}")
        ax.set_xlabel("adapters in the batch")
        ax.set_ylabel("forward+backward ms")
        ax.set_xscale("log", base=2)
    axes[0][0].legend()
    fig.suptitle(title)
    save_figure(fig, path)


def main(argv=None) -> None:
    parser = bench_arguments(__doc__)
    args = parser.parse_args(argv)
    run(torch.device(args.device), out_dir=args.out_dir)


# pytest-benchmark suite: 4 adapters, small shapes, CPU.
def _fwd_bwd(impl: str):
    layers, batch = build(256, 64, [4, 8, 16, 8], torch.float32, torch.device("cpu"))
    x = torch.randn(256, 64, requires_grad=True)
    dy = torch.randn(256, 64)
    return lambda: layers[impl](x, batch).backward(dy)


def test_multi_fused(benchmark):
    benchmark(_fwd_bwd("fused"))


def test_multi_mlora(benchmark):
    benchmark(_fwd_bwd("mlora"))


def test_multi_peft(benchmark):
    benchmark(_fwd_bwd("peft"))


def test_script_writes_results(tmp_path):
    rows = run(torch.device("cpu"), tokens=64, hiddens=(32,), counts=(1, 2), out_dir=tmp_path)
    assert {r["impl"] for r in rows} == {"fused", "mlora", "peft"} and len(rows) == 3 * 2 * 2
    assert all(r["fwd_bwd_ms"] > 0 for r in rows)
    assert (tmp_path / "multi_lora_cpu.csv").read_text().startswith("tokens,hidden,ranks,k,impl")
    assert (tmp_path / "multi_lora_cpu.png").stat().st_size > 0


def test_mlora_baseline_computes_the_same_layer():
    layers, batch = build(40, 16, [2, 4], torch.float32, torch.device("cpu"))
    x = torch.randn(40, 16)
    for layer in layers.values():
        layer.eval()
    torch.testing.assert_close(layers["mlora"](x, batch), layers["fused"](x, batch))


if __name__ == "__main__":
    main()
