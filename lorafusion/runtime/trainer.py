"""Offline multi-job LoRA training (`lorafusion train`): every job of a config known at the start,
planned into one schedule and trained by the training loop (training_loop.py; each job's state in
job_state.py, its checkpoints in checkpoints.py) in one process, or one per pipeline stage
(lorafusion.engines subclass MultiJobTrainer).

Files under output_dir:
    schedule.json                the planned microbatches (reused on --resume, so the plan is identical)
    base_model/                  the base model and tokenizer, for an inline model config
    metrics.jsonl                one record per job optimizer step
    checkpoints/<job>/step-<k>/  stage-<s>-of-<S>.pt: that pipeline stage's adapter weights and AdamW
                                 state keyed by PEFT parameter name, LR schedule and position; a step
                                 is complete when all S stage files exist, and restores onto any
                                 number of stages (a single process is stage 0 of 1)
    <job>/                       the final adapter (PEFT format) and status.json (finished or failed)
    .lorafusion-run.json         the run id and what the run wrote (see output_dir.py: the run owns
    .lorafusion.lock             the directory, holds this lock while it runs, and never deletes or
                                 replaces a file it did not write)
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lorafusion.adapters import read_adapter_weights
from lorafusion.apply import apply_multi_lora
from lorafusion.lora_state import get_multi_lora_configs
from lorafusion.scheduler import Job, Schedule

from .checkpoints import CheckpointStore
from .config import TrainConfig
from .data import DataError
from .eval_loss import JobEvaluation, job_data_digest, job_samples
from .job_state import JobRun, job_lora_config, lr_lambda, training_order
from .model import build_base_model
from .output_dir import (
    BASE_MODEL_DIR,
    METRICS_FILE,
    SCHEDULE_FILE,
    STATUS_FILE,
    TENSORBOARD_DIR,
    OutputDirError,
    append_line,
    discard,
    is_complete,
    publish_files,
    read_json,
    refuse_links,
    staging_directory,
    write_atomically,
)
from .planning import plan_microbatches
from .progress import Progress, shows_summary
from .run_directory import RUN_ENTRIES, RunDirectory, run_id_of
from .evaluation import adapter_forward
from .run_report import add_job_report, eval_accuracy, job_rows, warn_truncated
from .run_state import read_metrics, read_status, status_record, warn
from .tokenizer import load_tokenizer
from .training_loop import TrainingLoop

__all__ = [
    "JobRun", "JobSummary", "MultiJobTrainer", "TrainResult", "lr_lambda", "print_summary",
    "save_inline_base_model", "training_order",
]


@dataclass
class JobSummary:
    status: str
    steps: int
    num_steps: int
    final_loss: float
    tokens: int
    failure: str | None
    adapter_dir: Path | None
    # Filled at the end of the run by run_report.add_job_report.
    first_loss: float = math.nan
    truncated: int = 0
    tokens_per_s: float = 0.0
    eval_accuracy: float | None = None
    eval_loss: float | None = None  # of the published adapter (see run_report.published_eval_losses)


@dataclass
class TrainResult:
    jobs: dict[str, JobSummary]
    microbatches_run: int
    elapsed_s: float
    interrupted: bool = False
    # Trained by this process; after a resume the jobs' `tokens` also count the earlier processes'.
    tokens_this_process: int = 0
    resumed: bool = False


def _tensorboard_writer(log_dir: Path):
    """A TensorBoard SummaryWriter when the tensorboard package is installed (optional), else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(log_dir))


def save_inline_base_model(model_spec, tokenizer, root: Path, keep_complete: bool) -> Path:
    """An inline model exists only as a seed: save it to root/base_model, so PEFT and `lorafusion
    generate` can load the trained adapters onto the same weights. It is published whole (see
    publish_files): a resumed run keeps a complete one and saves again one a kill cut short."""
    target = root / BASE_MODEL_DIR
    if keep_complete and is_complete(target):
        return target
    refuse_links(root, target)
    staging = staging_directory(target)
    try:
        build_base_model(model_spec, "cpu").save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        publish_files(staging, target, root=root)
    finally:
        discard(staging)
    return target


# How a job's dropout masks are drawn (TrainingLoop.pack: named by sample); recorded in the resume
# fingerprint of jobs with dropout, so that a run checkpointed with masks drawn otherwise (by
# microbatch row, before) is not silently continued with other masks.
DROPOUT_MASKS = "named-by-sample"


def _stable_text(value) -> str:
    """A setting as the fingerprint records it: mappings (an inline model config, a job's columns)
    with their keys sorted, so the same settings written in another key order (YAML dumpers sort
    them) are the same run."""
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


class MultiJobTrainer(TrainingLoop):
    """Trains every job of `config` together; see the module docstring for the outputs."""

    def __init__(self, config: TrainConfig, device: torch.device | str | None = None, progress: bool = True):
        self.config = config
        self.run_directory: RunDirectory | None = None  # claimed by the process that sets up the run
        self._run_id: str | None = None
        self._progress, self._tensorboard = Progress(False, {}), None
        self._tokens_at_start: dict[str, int] = {}
        self._resumed = False
        # Set (by a signal handler, say) to stop before the next microbatch, as stop_after does.
        self.stop_requested = False
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.progress = progress
        self.output_dir = Path(config.output_dir)
        self.checkpoints = CheckpointStore(self.output_dir, self.stage_index, self.num_stages)
        self.checkpoint_every = config.checkpoint_every
        self.dropout_seed_base = config.model.seed
        self.tokenizer = load_tokenizer(config.tokenizer)
        self.jobs: dict[str, JobRun] = {}
        for spec in config.jobs:
            job = JobRun(spec)
            try:
                job.samples, eval_samples = job_samples(spec, self.tokenizer)
            except DataError as error:
                job.status, job.failure = "failed", str(error)
            else:
                if eval_samples:
                    job.evaluation = JobEvaluation(spec, eval_samples, config.scheduler.capacity)
            self.jobs[spec.name] = job
        if all(job.status == "failed" for job in self.jobs.values()):
            raise self._no_job_can_train()
        self.model = build_base_model(config.model, self.device)
        if self.tokenizer.vocab_size > self.model.config.vocab_size:
            raise ValueError(
                f"the tokenizer has {self.tokenizer.vocab_size} tokens but the model's vocab_size is "
                f"{self.model.config.vocab_size}: set model.config.vocab_size >= {self.tokenizer.vocab_size}"
            )
        base_path = config.model.path or str(self.output_dir / "base_model")
        lora_configs = {
            spec.name: job_lora_config(spec, base_path, config.backend)
            for spec in config.jobs
        }
        apply_multi_lora(
            self.model,
            lora_configs,
            init_seeds={spec.name: spec.seed for spec in config.jobs},
            quantize=config.model.quantize,
            quantize_other_linears=config.model.quantize is not None,
        )
        self.setup_stage()
        for job in self.jobs.values():
            self.prepare_job(job)

    @property
    def planning_stages(self) -> int:
        """Pipeline positions between a job's dependent microbatches (see the scheduler)."""
        return self.config.parallel.pipeline_stages

    # ---- planning -------------------------------------------------------------------------------

    def _fingerprint(self) -> dict:
        """What a run's checkpoints depend on ("jobs": each job's data and settings; a resumed run
        must match it) and what only its schedule depends on (the scheduler settings and the
        pipeline layout; a resumed run with other ones plans again)."""
        return {
            "jobs": {
                name: {
                    "data": job_data_digest(job.spec),
                    "spec": {k: _stable_text(v) for k, v in vars(job.spec).items()},
                    **({"dropout_masks": DROPOUT_MASKS} if job.spec.lora_dropout > 0 else {}),
                }
                for name, job in self.jobs.items()
            },
            # What the samples and the checkpoints' adapters were made with (all but how activations are kept).
            "base": {
                **{f"model.{k}": _stable_text(v) for k, v in vars(self.config.model).items() if k != "gradient_checkpointing"},
                "tokenizer": str(self.config.tokenizer),
            },
            "scheduler": {k: _stable_text(v) for k, v in vars(self.config.scheduler).items() if k != "time_limit_s"},
            "planning_stages": self.planning_stages,
        }

    def plan(self, resume: bool, save: bool = False) -> Schedule:
        """The run's schedule: planned (and saved with `save`, by the run that owns output_dir),
        or on --resume the saved one when the scheduler settings and pipeline layout are unchanged. With another layout it is planned again: a
        job's step depends only on its global batch, not on how the batch is cut into
        microbatches, and checkpoints restore onto any stage count."""
        path = self.output_dir / SCHEDULE_FILE
        fingerprint = self._fingerprint()
        saved = None
        if resume and path.is_file():
            try:
                saved = read_json(path, "schedule")
            except OutputDirError as error:
                warn(f"{error}; planning the schedule again (checkpoints restore onto any schedule)")
        if saved is not None:
            saved_jobs = saved.get("fingerprint", {}).get("jobs", {})
            changed = sorted(name for name in set(saved_jobs) | set(fingerprint["jobs"]) if saved_jobs.get(name) != fingerprint["jobs"].get(name))
            masks_only = [
                name for name in changed
                if {**saved_jobs.get(name, {}), "dropout_masks": None} == {**fingerprint["jobs"].get(name, {}), "dropout_masks": None}
            ]
            if masks_only:
                raise ValueError(
                    f"{path}: jobs {masks_only} were trained with dropout masks drawn by microbatch row (an earlier "
                    "lorafusion); this one names them by sample, so resuming would match neither run: finish the run "
                    "with the lorafusion that started it, or start a new output_dir"
                )
            if changed:
                raise ValueError(
                    f"{path} was planned for other jobs or data than this config describes (jobs {changed} differ); "
                    "resume with the original jobs and data, or start a new output_dir"
                )
            saved_base = saved.get("fingerprint", {}).get("base")
            if saved_base is not None and saved_base != fingerprint["base"]:
                changed = sorted(key for key in set(saved_base) | set(fingerprint["base"]) if saved_base.get(key) != fingerprint["base"].get(key))
                raise ValueError(
                    f"{path} was planned for another base model or tokenizer ({', '.join(changed)} "
                    f"{'differs' if len(changed) == 1 else 'differ'}); resume with the original model and tokenizer, or start a new output_dir"
                )
            if saved.get("fingerprint") == fingerprint:
                try:
                    return Schedule.from_json_dict(saved)
                except (KeyError, TypeError, ValueError) as error:
                    warn(f"{path}: damaged schedule ({error!r}); planning the schedule again")
        scheduler_jobs = [
            Job(name, job.spec.global_batch_size, [len(job.samples[i].input_ids) for i in job.order])
            for name, job in self.jobs.items()
            if job.status == "running"
        ]
        if not scheduler_jobs:
            raise self._no_job_can_train()
        schedule = plan_microbatches(scheduler_jobs, self.config.scheduler, self.planning_stages)
        if save:
            write_atomically(path, schedule.to_json_dict() | {"fingerprint": fingerprint}, root=self.output_dir)
        return schedule

    def _no_job_can_train(self) -> ValueError:
        reasons = "; ".join(f"job {name!r}: {job.failure}" for name, job in self.jobs.items())
        return ValueError(f"no job can train: {reasons}")

    # ---- checkpoints ----------------------------------------------------------------------------

    def latest_complete_checkpoint(self, job: JobRun) -> list[Path]:
        """The stage files of the job's newest complete step, or [] if there is none."""
        return self.checkpoints.latest_complete(job.name)

    def _restore(self, job: JobRun) -> None:
        """A job failed in this run stays failed, one whose adapter this run published stays
        finished; every other job continues from its newest intact complete checkpoint (finished
        only if that is its last step: a kill can come between a job's last step and its
        checkpoint, or between its adapter and its status)."""
        status = read_status(self.output_dir / job.name / STATUS_FILE, self.run_id)
        if status is not None and status["status"] == "failed":
            job.status, job.failure = "failed", status.get("failure")
            return
        if status is not None and (status["step"] == job.num_steps or status.get("stopped_early")):
            job.status, job.published, job.step = "finished", True, status["step"]
            job.tokens_seen = status["tokens_seen"]
            job.last_loss = math.nan if status.get("last_loss") is None else float(status["last_loss"])
            job.remaining = [0] * job.num_steps
            # Into the model: the closing summary scores (eval_data accuracy) what was published, not an untrained adapter.
            job.load_adapter(read_adapter_weights(self.output_dir / job.name))
            return
        self.checkpoints.restore(job)

    def publish_adapter(self, job: JobRun) -> Path:
        """Write the job's final adapter (PEFT format) to output_dir/<job>, assembled from the
        stage files of its last step."""
        config = get_multi_lora_configs(self.model)[job.name]
        target = self.output_dir / job.name
        self.checkpoints.publish_adapter(job, config.to_peft_dict(), target)
        # Only now, with this run's id, is the adapter this run's as far as a resumed run is concerned.
        self._write_status(job)
        job.published = True
        return target

    def _truncate_metrics(self) -> None:
        """Drop records of steps a resumed run will redo (after each job's last checkpoint)."""
        path = self.output_dir / METRICS_FILE
        if not path.is_file():
            return
        records = read_metrics(path)
        kept = [
            r for r in records
            if r["job"] in self.jobs and (self.jobs[r["job"]].status == "failed" or r["step"] <= self.jobs[r["job"]].step)
        ]
        write_atomically(path, "".join(json.dumps(r) + "\n" for r in kept), root=self.output_dir)

    # ---- training -------------------------------------------------------------------------------

    def train(
        self, resume: bool = False, stop_after_microbatches: int | None = None, schedule: Schedule | None = None
    ) -> TrainResult:
        """Run every job to its end. `stop_after_microbatches` stops early without final outputs,
        as a killed run would (for tests and for trying a config briefly). `schedule` replaces the
        planned one (samples of jobs this trainer does not have are skipped): e.g. to train one
        job alone on exactly the microbatches it had in a multi-job run."""
        run = 0
        try:
            schedule = self.begin(resume, schedule)
            for position, microbatch in enumerate(schedule.microbatches):
                refs = self.live_refs(microbatch)
                if not refs:
                    continue
                self._run_microbatch(position, refs)
                run += 1
                if (stop_after_microbatches is not None and run >= stop_after_microbatches) or self.stop_requested:
                    return self._result(run, interrupted=True)
            return self.finish(run)
        finally:
            self._close_progress()
            self.release_output_dir()

    def begin(self, resume: bool, schedule: Schedule | None = None) -> Schedule:
        """Set up the run's files, plan (or reload) the schedule, restore checkpoints on --resume."""
        self._started = time.perf_counter()
        if self.is_reporter:
            warn_truncated(self)
        schedule = self.prepare_run(resume, schedule)
        self.schedule = schedule
        for job in self.jobs.values():
            if job.status == "failed":
                self._write_status(job)
        if resume:
            for job in self.jobs.values():
                if job.status == "running":
                    self._restore(job)
                if job.status == "finished" and not job.published and self.publishes_when_finished and self.is_reporter:
                    self.publish_adapter(job)
            if self.is_reporter:
                self._truncate_metrics()
        self._tokens_at_start = {name: job.tokens_seen for name, job in self.jobs.items()}
        self._resumed = resume
        running = {name: (job.step, job.num_steps) for name, job in self.jobs.items() if job.status == "running"}
        self._progress = Progress(self.progress if self.is_reporter else False, running, self.config.log_every)
        self._tensorboard = None
        if self.is_reporter:
            refuse_links(self.output_dir, self.output_dir / TENSORBOARD_DIR)
            self._tensorboard = _tensorboard_writer(self.output_dir / TENSORBOARD_DIR)
        return schedule

    def prepare_run(self, resume: bool, schedule: Schedule | None) -> Schedule:
        """Claim output_dir for the run (see output_dir.py: a fresh run needs a new or empty one, or
        --overwrite, which replaces only an earlier run's outputs), then the run-level files (base
        model, schedule.json) and the schedule."""
        self.run_directory = RunDirectory.claim(
            self.output_dir, [*RUN_ENTRIES, *self.jobs], resume=resume, overwrite=self.config.overwrite
        )
        self._run_id = self.run_directory.run_id
        try:
            if self.config.model.path is None:
                save_inline_base_model(self.config.model, self.tokenizer, self.output_dir, keep_complete=resume)
            return schedule or self.plan(resume, save=True)
        except BaseException:
            self.release_output_dir()
            raise

    @property
    def run_id(self) -> str:
        """The run's id, from its marker on processes other than the one that claimed output_dir."""
        if self._run_id is None:
            self._run_id = run_id_of(self.output_dir)
        return self._run_id

    def release_output_dir(self) -> None:
        """Let another run use output_dir: at the end of the run (the lock also goes when the
        process ends, however it ends)."""
        if self.run_directory is not None:
            self.run_directory.release()

    def finish(self, microbatches_run: int) -> TrainResult:
        self.release_output_dir()
        self._progress.close()  # before the summary, which would otherwise print between the bars
        result = self._result(microbatches_run)
        if self.is_reporter:
            add_job_report(self, result)
        if shows_summary(self.progress) and self.is_reporter:
            print_summary(result)
        return result

    def _close_progress(self) -> None:
        self._progress.close()
        if self._tensorboard is not None:
            self._tensorboard.close()

    def _write_status(self, job: JobRun) -> None:
        if not self.is_reporter:
            return
        write_atomically(self.output_dir / job.name / STATUS_FILE, status_record(self.run_id, job), root=self.output_dir)

    def _log_step(self, job: JobRun) -> None:
        """One metrics.jsonl record and a progress-bar tick for a job's optimizer step."""
        elapsed = time.perf_counter() - self._started
        record = {
            "job": job.name,
            "step": job.step,
            "loss": job.batch_loss,
            "tokens": job.batch_tokens,
            "lr": job.lr_scheduler.get_last_lr()[0],
            "tokens_per_s": (job.tokens_seen - self._tokens_at_start.get(job.name, 0)) / elapsed if elapsed > 0 else 0.0,
            "elapsed_s": elapsed,
        }
        if job.step_eval_loss is not None:
            record["eval_loss"] = job.step_eval_loss
        append_line(self.output_dir / METRICS_FILE, json.dumps(record) + "\n", root=self.output_dir)
        if self._tensorboard is not None:
            for key in ("loss", "lr", "tokens_per_s", "eval_loss"):
                if key in record:
                    self._tensorboard.add_scalar(f"{job.name}/{key}", record[key], job.step)
        self._progress.step(job.name, job.step, job.num_steps, job.last_loss, record["tokens_per_s"], job.step_eval_loss)

    # ---- reporting ------------------------------------------------------------------------------

    def adapter_forward(self, name: str):
        """The forward of the model under job `name`'s adapter (evaluation.Forward)."""
        return adapter_forward(self.model, name)

    def exact_match_accuracy(self, name: str) -> float:
        """The closing summary's exact-match accuracy of a finished job (run_report.eval_accuracy)."""
        return eval_accuracy(self, name)

    def _result(self, microbatches: int, interrupted: bool = False) -> TrainResult:
        summaries = {
            name: JobSummary(
                status=job.status,
                steps=job.step,
                num_steps=job.num_steps,
                final_loss=job.last_loss,
                tokens=job.tokens_seen,
                failure=job.failure,
                adapter_dir=self.output_dir / name if job.status == "finished" else None,
            )
            for name, job in self.jobs.items()
        }
        tokens_this_process = sum(job.tokens_seen - self._tokens_at_start.get(name, 0) for name, job in self.jobs.items())
        return TrainResult(
            summaries, microbatches, time.perf_counter() - self._started, interrupted, tokens_this_process, self._resumed
        )


def print_summary(result: TrainResult) -> None:
    print("\n".join(job_rows(result)))
    ran = result.tokens_this_process
    line = f"{result.microbatches_run} microbatches, {ran} tokens in {result.elapsed_s:.1f} s ({ran / max(result.elapsed_s, 1e-9):.0f} tokens/s)"
    if result.resumed:  # the throughput is this process's; the jobs' token counts are the whole run's
        line = f"this process (resumed): {line}; whole run: {sum(job.tokens for job in result.jobs.values())} tokens"
    print(line)
