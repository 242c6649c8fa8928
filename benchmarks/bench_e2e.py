"""End-to-end multi-job LoRA training throughput: lorafusion (all jobs packed together by the
scheduler, one shared base model, fused multi-adapter layers) vs PEFT training the same jobs one
after another (same model, data order, optimizer steps and microbatch token budget; PEFT batches
are padded as its usual collators pad them).

With --pipeline-stages S (S processes under torchrun), the same jobs also run pipeline-parallel on
the megatron-core engine with lorafusion's schedule and with the Megatron-style (one job at a
time, flush per global batch) and mLoRA-style (round-robin single-job microbatches) schedules,
and each run's measured bubble fraction is compared with the simulator's prediction for the same
schedule (cost model fitted to that run's measured per-microbatch compute times).

On a CPU a tiny Llama and short synthetic samples check the wiring; on GPUs a Llama-shaped model
with random weights (about 1B parameters, bf16) gives the numbers that count.

    python benchmarks/bench_e2e.py [--device cpu|cuda] [--jobs 4] [--steps N] [--pipeline-stages S] [--out-dir DIR]

The packed path's attention time per decoder layer (forward + backward over the run's own
microbatches, random q/k/v of the model's shapes) is measured after the lorafusion run for the
kernel the runtime selects there and for each other kernel usable on the device (per-sample SDPA
on a CPU; torch's varlen_attn and flash-attn's on a GPU where present), against per-sample SDPA in
the same run: columns attention_kernel and attention_ms_per_layer of the lorafusion row, and one
row per kernel in e2e_attention_<device>.csv.

Writes e2e_<device>.csv, e2e_attention_<device>.csv, .machine.json and .png under benchmarks/results/.
"""

from __future__ import annotations

import copy
import csv
import functools
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from harness import RESULTS_DIR, bench_arguments, machine_info, new_figure, print_table, save_figure, write_results
from lorafusion.runtime import attention
from lorafusion.runtime.config import parse_config
from lorafusion.runtime.data import load_jsonl_dataset
from lorafusion.runtime.model import build_base_model
from lorafusion.runtime.tokenizer import load_tokenizer
from lorafusion.runtime.trainer import MultiJobTrainer, lr_lambda, training_order
from lorafusion.scheduler import CostModel, Schedule, simulate

CPU_MODEL = {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 260, "max_position_embeddings": 1024}
GPU_MODEL = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
             "num_key_value_heads": 8, "vocab_size": 32768, "max_position_embeddings": 4096}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_synthetic_jobs(directory: Path, num_jobs: int, mean_length: int, max_length: int, records: int) -> list[Path]:
    """Text datasets with log-normal lengths (as instruction / summarisation data has), one per job."""
    rng = random.Random(0)
    paths = []
    for job in range(num_jobs):
        mean = mean_length * (0.6 + 0.3 * job)  # jobs of different typical lengths
        path = directory / f"job{job}.jsonl"
        with path.open("w") as out:
            for _ in range(records):
                length = max(8, min(max_length - 2, int(rng.lognormvariate(math.log(mean), 0.5))))
                out.write(json.dumps({"text": "".join(rng.choice("abcdefghij ") for _ in range(length))}) + "\n")
        paths.append(path)
    return paths


def build_config(directory: Path, device: torch.device, num_jobs: int, steps: int) -> dict:
    on_gpu = device.type == "cuda"
    max_length = 2048 if on_gpu else 256
    paths = write_synthetic_jobs(directory, num_jobs, 600 if on_gpu else 60, max_length, 64 * steps if on_gpu else 16 * steps)
    return {
        "model": {"architecture": "llama", "config": GPU_MODEL if on_gpu else CPU_MODEL,
                  "dtype": "bfloat16" if on_gpu else "float32", "seed": 0},
        "jobs": [
            {"name": f"job{i}", "data": str(path), "format": "text", "r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
             "target_modules": TARGETS, "lr": 1e-4, "global_batch_size": 16 if on_gpu else 8, "max_steps": steps,
             "max_seq_len": max_length, "seed": i}
            for i, path in enumerate(paths)
        ],
        "scheduler": {"capacity": 8192 if on_gpu else 1024, "solver": "milp", "time_limit_s": 1.0},
        "output_dir": str(directory / "lorafusion"),
        "backend": "auto",
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_lorafusion(config_data: dict, directory: Path, device: torch.device, flex_attention: bool = False) -> dict:
    """The multi-job run's throughput, then its packed attention per layer (packed_attention_times;
    `flex_attention` adds the compiled FlexAttention alternative, whose first call compiles)."""
    trainer = MultiJobTrainer(parse_config(config_data, directory), device=device, progress=False)
    started = time.perf_counter()
    schedule = trainer.plan(resume=False)
    planned = time.perf_counter()
    result = trainer.train(schedule=schedule)
    _sync(device)
    finished = time.perf_counter()
    tokens = sum(job.tokens for job in result.jobs.values())
    assert all(job.status == "finished" for job in result.jobs.values()), result.jobs
    kernels = packed_attention_times(trainer.model, schedule, device, flex_attention)
    chosen = next(row for row in kernels if row["selected"])
    return {"impl": "lorafusion", "tokens": tokens, "seconds": finished - planned, "plan_seconds": planned - started,
            "final_loss": sum(job.final_loss for job in result.jobs.values()) / len(result.jobs),
            "attention_kernel": chosen["kernel"], "attention_ms_per_layer": chosen["ms_per_layer"],
            "attention_kernels": kernels}


ATTENTION_MICROBATCHES = 8  # timed per kernel: the run's first ones
ATTENTION_REPEATS = 3


def packed_attention_times(model: torch.nn.Module, schedule: Schedule, device: torch.device, flex: bool = False) -> list[dict]:
    """Attention time per decoder layer of the packed path, forward + backward, mean over the run's
    first ATTENTION_MICROBATCHES microbatches (median of ATTENTION_REPEATS calls each, after one
    warm-up call), on random q/k/v of the model's shapes and dtype, for every kernel usable here;
    `selected` marks the one the runtime picks. Against per-sample SDPA measured in the same call:
    speedup_vs_per_sample and the largest output difference. FlexAttention has no backward on a
    CPU: there its ms_per_layer is NaN (forward_ms_per_layer measured)."""
    model_config, dtype = model.config, next(model.parameters()).dtype
    heads, kv_heads = model_config.num_attention_heads, model_config.num_key_value_heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    options = attention.AttentionOptions(scaling=head_dim**-0.5, sliding_window=getattr(model_config, "sliding_window", None))
    microbatches = [tuple(s.tokens for s in mb.samples) for mb in schedule.microbatches if mb.samples][:ATTENTION_MICROBATCHES]
    probe = torch.empty(1, heads, 1, head_dim, device=device, dtype=dtype)
    selected = attention.select_kernel(probe, probe[:, :kv_heads], options)
    kernels = ["per_sample"] + [k for k in ("flash_attn", "torch_varlen") if _kernel_usable(k, probe, options)]
    kernels += ["flex"] if flex else []
    totals = {kernel: {"forward": 0.0, "total": 0.0, "first_call": 0.0, "diff": 0.0} for kernel in kernels}
    for lengths in microbatches:
        generator = torch.Generator(device=device).manual_seed(len(lengths))
        leaves = [torch.randn(1, h, sum(lengths), head_dim, device=device, dtype=dtype, generator=generator)
                  for h in (heads, kv_heads, kv_heads)]
        grad_out = torch.randn(1, sum(lengths), heads, head_dim, device=device, dtype=dtype, generator=generator)
        reference = None
        for kernel in kernels:
            attend = (_flex_attend(lengths, options, device) if kernel == "flex" else
                      functools.partial(attention.attend_packed, sample_lengths=lengths, options=options, kernel=kernel))
            backward = kernel != "flex" or device.type == "cuda"
            output, forward, total, first_call = _time_attention(attend, leaves, grad_out, backward, device)
            reference = output if reference is None else reference
            measured = totals[kernel]
            measured["forward"] += forward
            measured["total"] += total
            measured["first_call"] += first_call
            measured["diff"] = max(measured["diff"], (output.float() - reference.float()).abs().max().item())
    rows = []
    for kernel, measured in totals.items():
        rows.append({"kernel": kernel, "selected": kernel == selected, "microbatches": len(microbatches),
                     "tokens_per_microbatch": sum(map(sum, microbatches)) / len(microbatches),
                     "samples_per_microbatch": sum(map(len, microbatches)) / len(microbatches),
                     "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "dtype": str(dtype).removeprefix("torch."),
                     "forward_ms_per_layer": 1e3 * measured["forward"] / len(microbatches),
                     "ms_per_layer": 1e3 * measured["total"] / len(microbatches),
                     "first_call_s": measured["first_call"],
                     "max_abs_diff_vs_per_sample": measured["diff"]})
    for row in rows:
        row["speedup_vs_per_sample"] = rows[0]["ms_per_layer"] / row["ms_per_layer"]
    return rows


def _kernel_usable(kernel: str, probe: torch.Tensor, options) -> bool:
    if probe.device.type != "cuda":
        return False
    available = dict(has_flash_attn=kernel == "flash_attn" and attention._flash_attn_varlen() is not None,
                     has_torch_varlen=kernel == "torch_varlen" and attention._torch_varlen(attention._device_index(probe.device)) is not None)
    return attention.choose_kernel(True, 1, probe.dtype, probe.shape[-1], options, **available) == kernel


def _time_attention(attend, leaves, grad_out, backward: bool, device) -> tuple[torch.Tensor, float, float, float]:
    """(output, forward seconds, forward + backward seconds (NaN without backward), first call's
    seconds): medians of ATTENTION_REPEATS calls after the first."""
    leaves = [leaf.detach().requires_grad_(backward) for leaf in leaves]
    forwards, totals, first_call = [], [], 0.0
    for repeat in range(ATTENTION_REPEATS + 1):
        _sync(device)
        started = time.perf_counter()
        output = attend(*leaves)
        _sync(device)
        forwarded = time.perf_counter()
        if backward:
            output.backward(grad_out)
            _sync(device)
        ended = time.perf_counter()
        if repeat == 0:
            first_call = ended - started
        else:
            forwards.append(forwarded - started)
            totals.append(ended - started if backward else math.nan)
        for leaf in leaves:
            leaf.grad = None
    return output.detach(), float(np.median(forwards)), float(np.median(totals)), first_call


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def _flex_attend(lengths: tuple[int, ...], options, device: torch.device):
    """FlexAttention over the packed sequence with a document mask (causal, within the sample and
    its window) and the softcap as a score_mod: [1, tokens, heads, head_dim], as attend_packed.
    The block mask is built here, once per microbatch (every layer would reuse it)."""
    from torch.nn.attention.flex_attention import create_block_mask

    document = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    window, softcap = options.sliding_window, options.softcap

    def mask_mod(batch, head, query, key):
        keep = (document[query] == document[key]) & (key <= query)
        return keep & (query - key < window) if window else keep

    def softcap_mod(score, batch, head, query, key):
        return softcap * torch.tanh(score / softcap)

    block_mask = create_block_mask(mask_mod, None, None, len(document), len(document), device=device)
    flex = _compiled_flex_attention()

    def attend(query, key, value):
        output = flex(query, key, value, score_mod=softcap_mod if softcap else None, block_mask=block_mask,
                      scale=options.scaling, enable_gqa=query.shape[1] != key.shape[1])
        return output.transpose(1, 2)

    return attend


def _padded_microbatches(lengths: list[int], capacity: int) -> list[list[int]]:
    """Consecutive samples while (count x longest) stays within the token budget, as a padding collator batches."""
    batches, current, longest = [], [], 0
    for i, length in enumerate(lengths):
        if current and max(longest, length) * (len(current) + 1) > capacity:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, length)
    return batches + ([current] if current else [])


def run_peft(config_data: dict, directory: Path, device: torch.device) -> dict:
    """Each job alone through PEFT, one after another, on the same base model weights."""
    import peft

    config = parse_config(config_data, directory)
    tokenizer = load_tokenizer(config.tokenizer)
    base = build_base_model(config.model, device)
    tokens, elapsed, losses = 0, 0.0, []
    for spec in config.jobs:
        samples = load_jsonl_dataset(spec.data, spec.format, tokenizer, spec.max_seq_len)
        order = training_order(len(samples), spec)
        model = peft.get_peft_model(
            base, peft.LoraConfig(r=spec.r, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout, target_modules=spec.target_modules)
        )
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec.lr, weight_decay=spec.weight_decay)
        num_steps = math.ceil(len(order) / spec.global_batch_size)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(spec, num_steps))
        _sync(device)
        started = time.perf_counter()
        for step in range(num_steps):
            batch = [samples[i] for i in order[step * spec.global_batch_size : (step + 1) * spec.global_batch_size]]
            targets = sum(s.num_target_tokens for s in batch)
            step_loss = 0.0
            for indices in _padded_microbatches([len(s.input_ids) for s in batch], config.scheduler.capacity):
                width = max(len(batch[i].input_ids) for i in indices)
                ids = torch.full((len(indices), width), tokenizer.pad_token_id, dtype=torch.long)
                labels = torch.full((len(indices), width), -100, dtype=torch.long)
                mask = torch.zeros((len(indices), width), dtype=torch.long)
                for row, i in enumerate(indices):
                    n = len(batch[i].input_ids)
                    ids[row, :n] = torch.tensor(batch[i].input_ids)
                    labels[row, :n] = torch.tensor(batch[i].labels)
                    mask[row, :n] = 1
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                loss = torch.nn.functional.cross_entropy(
                    logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(device), ignore_index=-100, reduction="sum"
                ) / targets
                loss.backward()
                step_loss += loss.item()
                tokens += sum(len(batch[i].input_ids) for i in indices)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
        _sync(device)
        elapsed += time.perf_counter() - started
        losses.append(step_loss)
        base = model.unload()  # the same frozen base for the next job
    return {"impl": "peft_sequential", "tokens": tokens, "seconds": elapsed, "plan_seconds": 0.0,
            "final_loss": sum(losses) / len(losses)}


def _fitted_cost(stage_stats: list[dict]) -> CostModel:
    """Whole-model forward and backward time as a linear function of tokens, from the per-microbatch
    compute times the stages logged (stage times of the i-th forward summed over stages)."""
    fits = {}
    for kind in ("forward", "backward"):
        per_stage = [[(tokens, seconds) for k, tokens, seconds in stats["compute"] if k == kind] for stats in stage_stats]
        points = [(entries[0][0], sum(seconds for _, seconds in entries)) for entries in zip(*per_stage) if entries[0][0] > 0]
        slope, fixed = np.polyfit([t for t, _ in points], [s for _, s in points], 1)
        fits[kind] = (max(float(fixed), 0.0), max(float(slope), 0.0))
    return CostModel(fits["forward"][0], fits["forward"][1], fits["backward"][0], fits["backward"][1])


def run_pipeline(config_data: dict, directory: Path, engine: str, policy: str, stages: int) -> dict:
    """One torchrun pipeline run; its tokens/s and measured vs simulated bubble fraction."""
    data = copy.deepcopy(config_data)
    data["parallel"] = {"engine": engine, "pipeline_stages": stages}
    data["scheduler"]["policy"] = policy
    output = directory / f"{engine}-{policy}"
    data["output_dir"] = str(output)
    config_path = directory / f"{engine}-{policy}.yaml"
    config_path.write_text(yaml.safe_dump(data))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(stages),
               "-m", "lorafusion.train", str(config_path), "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if done.returncode != 0:
        raise RuntimeError(f"{engine}/{policy} pipeline run failed:\n{done.stderr[-3000:]}")
    stats = [json.loads((output / "pipeline_stats" / f"stage-{s}.json").read_text()) for s in range(stages)]
    wall = max(stage["wall_s"] for stage in stats)
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    schedule = Schedule.from_json_dict(json.loads((output / "schedule.json").read_text()))
    predicted = simulate(schedule.microbatches, stages, _fitted_cost(stats))
    return {
        "impl": f"{engine}:{policy}", "tokens": sum(r["tokens"] for r in records), "seconds": wall, "plan_seconds": 0.0,
        "final_loss": float("nan"), "stages": stages,
        "measured_bubble": 1.0 - sum(stage["busy_s"] for stage in stats) / (stages * wall),
        "simulated_bubble": predicted.bubble_fraction,
    }


def run(
    device: torch.device, num_jobs: int = 4, steps: int | None = None, pipeline_stages: int = 0, out_dir: Path = RESULTS_DIR
) -> list[dict]:
    steps = steps or (20 if device.type == "cuda" else 6)
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        config = build_config(directory, device, num_jobs, steps)
        rows = [run_lorafusion(config, directory, device, flex_attention=True), run_peft(config, directory, device)]
        for policy in ("lorafusion", "megatron", "mlora") if pipeline_stages > 1 else ():
            rows.append(run_pipeline(config, directory, "megatron", policy, pipeline_stages))
    attention_rows = rows[0].pop("attention_kernels")
    for row in rows:
        row["tokens_per_s"] = row["tokens"] / row["seconds"]
        row.setdefault("stages", 1)
        row.setdefault("measured_bubble", float("nan"))
        row.setdefault("simulated_bubble", float("nan"))
        row.setdefault("attention_kernel", "")
        row.setdefault("attention_ms_per_layer", float("nan"))
    for row in rows:
        row["speedup_vs_peft"] = row["tokens_per_s"] / rows[1]["tokens_per_s"]
    info = machine_info(device) | {"jobs": num_jobs, "steps_per_job": steps, "torch_threads": torch.get_num_threads()}
    name = "e2e_" + ("cpu" if device.type == "cpu" else info["gpu"].replace(" ", "_").lower())
    write_results(name, rows, info, out_dir)
    write_results(name.replace("e2e_", "e2e_attention_"), attention_rows, info, out_dir)
    plot(rows, out_dir / f"{name}.png", f"{num_jobs} LoRA jobs, {info.get('gpu', 'CPU')}")
    print_table(rows, ["impl", "stages", "tokens", "seconds", "tokens_per_s", "speedup_vs_peft", "measured_bubble", "simulated_bubble",
                       "attention_ms_per_layer"])
    print_table(attention_rows, ["kernel", "selected", "tokens_per_microbatch", "samples_per_microbatch", "forward_ms_per_layer",
                                 "ms_per_layer", "speedup_vs_per_sample", "first_call_s", "max_abs_diff_vs_per_sample"])
    return rows


def plot(rows: list[dict], path: Path, title: str) -> None:
    fig, ax = new_figure(figsize=(5, 3.5))
    ax.bar([r["impl"] for r in rows], [r["tokens_per_s"] for r in rows])
    ax.tick_params(axis="x", labelrotation=20)
    ax.set_ylabel("training tokens / s")
    ax.set_title(title)
    save_figure(fig, path)


def main(argv=None) -> None:
    parser = bench_arguments(__doc__)
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--pipeline-stages", type=int, default=0, help="also run pipeline-parallel on S processes")
    args = parser.parse_args(argv)
    run(torch.device(args.device), args.jobs, args.steps, args.pipeline_stages, args.out_dir)


def test_e2e_smoke(tmp_path):
    rows = run(torch.device("cpu"), num_jobs=2, steps=2, out_dir=tmp_path)
    lorafusion, peft_rows = rows
    # Same samples trained by both: every token counted once per pass over the data.
    assert lorafusion["tokens"] == peft_rows["tokens"] > 0
    assert all(math.isfinite(r["final_loss"]) for r in rows)
    assert (tmp_path / "e2e_cpu.csv").read_text().startswith("impl,tokens,seconds")
    # The packed path's attention per layer, on the CPU per sample, measured (not a placeholder).
    assert lorafusion["attention_kernel"] == "per_sample" and lorafusion["attention_ms_per_layer"] > 0
    assert math.isnan(peft_rows["attention_ms_per_layer"])
    with (tmp_path / "e2e_attention_cpu.csv").open() as handle:
        kernels = {row["kernel"]: row for row in csv.DictReader(handle)}
    assert sorted(kernels) == ["flex", "per_sample"] and kernels["per_sample"]["selected"] == "True"
    # FlexAttention computes the same attention (document mask), forward only on a CPU.
    assert float(kernels["flex"]["max_abs_diff_vs_per_sample"]) < 1e-4 and float(kernels["flex"]["forward_ms_per_layer"]) > 0
    assert math.isnan(float(kernels["flex"]["ms_per_layer"]))


@pytest.mark.multiprocess
def test_pipeline_rows_measure_and_simulate_the_bubble(tmp_path):
    rows = run(torch.device("cpu"), num_jobs=2, steps=2, pipeline_stages=2, out_dir=tmp_path)
    assert [r["impl"] for r in rows[2:]] == ["megatron:lorafusion", "megatron:megatron", "megatron:mlora"]
    for row in rows[2:]:
        assert row["tokens"] == rows[0]["tokens"]  # every schedule trains every sample once
        assert 0.0 <= row["measured_bubble"] < 1.0 and 0.0 <= row["simulated_bubble"] < 1.0


def test_lorafusion_training_step(benchmark, tmp_path):
    config = build_config(tmp_path, torch.device("cpu"), 2, 1)
    benchmark.pedantic(lambda: run_lorafusion(config, tmp_path, torch.device("cpu")), rounds=1, iterations=1)


if __name__ == "__main__":
    main()
