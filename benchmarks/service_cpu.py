"""The real service at tiny size on the CPU, for bench_online.measure_end_to_end (issue 14).

    from bench_online import measure_end_to_end
    from service_cpu import tiny_cpu_service

    with tiny_cpu_service(work_dir) as (submit, finished):
        measured = measure_end_to_end(arrivals, submit, finished, time_scale=..., clock=time.time)

`tiny_cpu_service` starts `lorafusion serve` in this process on a 2-layer Llama (hidden size 32,
the built-in byte tokenizer, CPU) on a free local port, and drives it over its HTTP API: `submit`
turns a scheduler Job into a job whose samples have the Job's token counts (text records of
that many tokens, one epoch, the Job's global batch size) and POSTs it; `finished` reads GET /jobs
and gives each finished job's end in Unix seconds, hence `clock=time.time`. A job's samples train
in its own seeded order, so its global batches hold the same lengths as the Job's only as a
multiset over the job. Figures measured this way are CPU seconds of a toy model, meaningful as
ratios between policies run the same way on the same machine, never as GPU figures.

`admission` is SERVER.yaml's (size_aware or all_live); :func:`one_at_a_time` wraps the pair so
that the service is handed each job only once the one before has finished (FIFO through the same
service, each job trained alone).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from lorafusion.scheduler import Job
from lorafusion.service.client import ServiceClient
from lorafusion.service.config import parse_server_config
from lorafusion.service.server import Service

TINY_MODEL = {
    "architecture": "llama",
    "config": {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 260, "max_position_embeddings": 4096,
    },
    "seed": 0,
}


@contextlib.contextmanager
def tiny_cpu_service(
    work_dir: Path, capacity: int = 2048, window_batches: int = 2, lr: float = 1e-3, admission: str = "size_aware",
    warm_up: bool = True,
) -> Iterator[tuple[Callable[[Job], None], Callable[[], Mapping[str, float]]]]:
    """A running tiny service under `work_dir` (which must be new or empty) and its (submit,
    finished) pair; stopped on leaving the block. With `warm_up` it has trained a one-sample job
    named "warm-up" before the block starts, so that the planner worker's start (seconds: it
    imports lorafusion) and the first passes through the model are not charged to a trace."""
    work_dir = Path(work_dir)
    data_dir = work_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    config = parse_server_config(
        {
            "model": TINY_MODEL,
            "scheduler": {"capacity": capacity, "solver": "greedy"},
            "backend": "torch",
            "checkpoint_every": 0,
            "state_dir": str(work_dir / "state"),
            "data_roots": [str(data_dir)],
            "port": 0,
            "window_batches": window_batches,
            "admission": admission,
        },
        work_dir,
    )
    service = Service.start(config, device="cpu")
    thread = threading.Thread(target=service.train_until_stopped, name="lorafusion-tiny-service", daemon=True)
    thread.start()
    client = ServiceClient(service.url, timeout_s=120)

    def submit(job: Job) -> None:
        if max(job.lengths) > capacity:
            raise ValueError(f"job {job.name!r} has a {max(job.lengths)}-token sample, over capacity {capacity}")
        path = data_dir / f"{job.name}.jsonl"
        # The byte tokenizer adds <bos> and <eos>: a text of n - 2 bytes is a sample of n tokens.
        path.write_text("".join(json.dumps({"text": "ab" * (n // 2) + "a" * (n % 2)}) + "\n" for n in (max(n - 2, 1) for n in job.lengths)))
        client.submit({
            "name": job.name, "data": str(path), "format": "text", "global_batch_size": job.global_batch_size,
            "epochs": 1.0, "max_seq_len": max(job.lengths), "r": 4, "lora_alpha": 8, "lr": lr,
        })

    def finished() -> dict[str, float]:
        return {job["name"]: job["ended_at"] for job in client.jobs() if job["state"] == "finished"}

    try:
        if warm_up:
            submit(Job("warm-up", 1, [16]))
            deadline = time.monotonic() + 300
            while "warm-up" not in finished():
                if time.monotonic() > deadline:
                    raise TimeoutError("the tiny service did not finish its warm-up job in 300 s")
                time.sleep(0.05)
        yield submit, finished
    finally:
        service.trainer.stop_requested.set()
        thread.join(timeout=120)



@contextlib.contextmanager
def one_at_a_time(
    submit: Callable[[Job], None], finished: Callable[[], Mapping[str, float]], poll_s: float = 0.05
) -> Iterator[tuple[Callable[[Job], None], Callable[[], Mapping[str, float]]]]:
    """(submit, finished) for measure_end_to_end that queue the jobs in arrival order and hand the
    service the next one as soon as the one before has finished (a thread watches every `poll_s`)."""
    waiting: list[Job] = []
    handed: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def hand_on() -> None:
        with lock:
            if waiting and (not handed or handed[-1] in finished()):
                job = waiting.pop(0)
                submit(job)
                handed.append(job.name)

    def queue(job: Job) -> None:
        with lock:
            waiting.append(job)
        hand_on()

    def watch() -> None:
        while not stop.wait(poll_s):
            hand_on()

    watcher = threading.Thread(target=watch, name="lorafusion-one-at-a-time", daemon=True)
    watcher.start()
    try:
        yield queue, finished
    finally:
        stop.set()
        watcher.join()
