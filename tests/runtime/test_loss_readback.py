"""The trainer reads its losses back from the device once per job step, never per microbatch: a read
per microbatch would make the host wait for the device before it could queue the next one."""

from __future__ import annotations

import json

from host_sync import HostSyncCounter

from lorafusion.runtime.trainer import MultiJobTrainer
from training_fixtures import make_config


def test_microbatches_read_nothing_back_and_steps_log_the_summed_loss(tmp_path):
    config = make_config(tmp_path, jobs=("add", "rev"), add=dict(lora_dropout=0.1))
    trainer = MultiJobTrainer(config, progress=False)
    outside_steps, step_losses = [], {}
    microbatches_since_step, microbatches_per_step = {}, []
    run_microbatch, step = trainer._run_microbatch, trainer._step

    def counted_microbatch(position, refs):
        for name in {ref.job for ref in refs}:
            microbatches_since_step[name] = microbatches_since_step.get(name, 0) + 1
        with HostSyncCounter(trainer.device) as counter:
            trainer._counter = counter
            run_microbatch(position, refs)
        outside_steps.extend(counter.events)

    def step_not_counted(job, global_batch):
        # Reads at a job's step are what is allowed: set them aside.
        counter, before = trainer._counter, len(trainer._counter.events)
        pending = None if job.pending_loss is None else float(job.pending_loss)
        step(job, global_batch)
        step_losses.setdefault(job.name, []).append(pending)
        microbatches_per_step.append(microbatches_since_step.pop(job.name))
        del counter.events[before:]

    trainer._run_microbatch, trainer._step = counted_microbatch, step_not_counted
    result = trainer.train()

    assert all(job.status == "finished" for job in result.jobs.values())
    assert outside_steps == [], "\n".join(sorted(set(outside_steps)))
    # Steps over several microbatches: their losses were summed on the device, and read once.
    assert max(microbatches_per_step) > 1
    logged = [json.loads(line) for line in (config.output_dir / "metrics.jsonl").read_text().splitlines()]
    for name, losses in step_losses.items():
        assert [r["loss"] for r in logged if r["job"] == name] == losses
