"""Multi-job LoRA training in one process: several adapters on one frozen base model, their samples
packed together into the scheduler's microbatches.

Each job has its own data order, optimizer and LR schedule. A microbatch's loss is, per job, the sum
of its tokens' cross-entropy divided by the number of target tokens in that job's whole global batch,
so when the global batch's last microbatch is done the job's gradient is that of its mean token loss
over the global batch, exactly as if it had trained alone; then (and only then) the job steps.

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

import contextlib
import hashlib
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorafusion.adapters import adapter_key, write_adapter_directory
from lorafusion.apply import apply_multi_lora, get_multi_lora_configs, multi_lora_modules
from lorafusion.config import LoRAConfig
from lorafusion.modules import multi_lora_batch
from lorafusion.scheduler import Job, Schedule, megatron_order, mlora_order, plan_schedule

from .config import MAX_SAMPLES_PER_JOB, JobSpec, TrainConfig
from .data import DataError, Sample, load_jsonl_dataset
from .model import build_base_model
from .output_dir import (
    BASE_MODEL_DIR,
    CHECKPOINTS_DIR,
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
from .packing import PackedMicrobatch, pack_samples, padding_sample, per_token_loss
from .progress import Progress, shows_summary
from .run_directory import RUN_ENTRIES, RunDirectory, run_id_of
from .run_report import add_job_report, check_eval_data, job_rows, warn_truncated
from .run_state import read_metrics, read_status, status_record, warn
from .tokenizer import load_tokenizer


@dataclass
class JobRun:
    """One job's data order, optimizer and progress."""

    spec: JobSpec
    samples: list[Sample] = field(default_factory=list)
    order: list[int] = field(default_factory=list)  # dataset indices in training order
    num_steps: int = 0
    target_tokens: list[int] = field(default_factory=list)  # per global batch
    remaining: list[int] = field(default_factory=list)  # per global batch: samples not trained yet
    optimizer: torch.optim.Optimizer | None = None
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    step: int = 0
    status: str = "running"  # "running" | "finished" | "failed"
    failure: str | None = None
    batch_loss: float = 0.0
    # This global batch's loss so far, summed on the device: read back once, at the job's step.
    pending_loss: torch.Tensor | None = None
    batch_tokens: int = 0
    tokens_seen: int = 0
    last_loss: float = math.nan
    published: bool = False  # its adapter and finished status are in output_dir (this run's)

    @property
    def name(self) -> str:
        return self.spec.name

    named_parameters: dict[str, torch.nn.Parameter] = field(default_factory=dict)  # by PEFT key, this stage's


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


@dataclass
class TrainResult:
    jobs: dict[str, JobSummary]
    microbatches_run: int
    elapsed_s: float
    interrupted: bool = False
    # Trained by this process; after a resume the jobs' `tokens` also count the earlier processes'.
    tokens_this_process: int = 0
    resumed: bool = False


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every value is finite, read back from the device once rather than once per tensor."""
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def _tensorboard_writer(log_dir: Path):
    """A TensorBoard SummaryWriter when the tensorboard package is installed (optional), else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(log_dir))


def _check_attention_window(model_config, jobs) -> None:
    """The packed attention is causal over each whole sample; a model with sliding-window attention
    would compute something else for samples longer than its window, so those are refused."""
    window = getattr(model_config, "sliding_window", None)
    if not window or not getattr(model_config, "use_sliding_window", True):
        return
    too_long = [f"{spec.name} (max_seq_len={spec.max_seq_len})" for spec in jobs if spec.max_seq_len > window]
    if too_long:
        raise ValueError(
            f"the model uses sliding-window attention (sliding_window={window}), which the packed attention "
            f"does not apply: set max_seq_len <= {window} for {', '.join(too_long)}"
        )


def training_order(num_samples: int, spec: JobSpec) -> list[int]:
    """Dataset indices in the order the job trains on them: one seeded permutation per epoch,
    as many epochs as max_steps or epochs need."""
    if spec.max_steps is not None:
        total = spec.max_steps * spec.global_batch_size
    else:
        total = math.ceil((spec.epochs if spec.epochs is not None else 1.0) * num_samples)
        if total > MAX_SAMPLES_PER_JOB:
            raise ValueError(
                f"epochs={spec.epochs:g} over {num_samples:,} records is {total:,} samples, "
                f"more than {MAX_SAMPLES_PER_JOB:,}: lower epochs"
            )
    order: list[int] = []
    epoch = 0
    while len(order) < total:
        generator = torch.Generator().manual_seed(spec.seed * 1_000_003 + epoch)
        order += torch.randperm(num_samples, generator=generator).tolist()
        epoch += 1
    return order[:total]


def lr_lambda(spec: JobSpec, num_steps: int):
    """Multiplier of the job's lr at each step: linear warm-up, then constant, linear or cosine decay to 0."""

    def multiplier(step: int) -> float:
        if step < spec.warmup_steps:
            return (step + 1) / (spec.warmup_steps + 1)
        if spec.lr_schedule == "constant":
            return 1.0
        progress = (step - spec.warmup_steps) / max(1, num_steps - spec.warmup_steps)
        if spec.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return multiplier


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


class MultiJobTrainer:
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
        self.tokenizer = load_tokenizer(config.tokenizer)
        self.jobs: dict[str, JobRun] = {}
        for spec in config.jobs:
            job = JobRun(spec)
            try:
                job.samples = load_jsonl_dataset(spec.data, spec.format, self.tokenizer, spec.max_seq_len)
            except DataError as error:
                job.status, job.failure = "failed", str(error)
            self.jobs[spec.name] = job
        if all(job.status == "failed" for job in self.jobs.values()):
            raise self._no_job_can_train()
        self.model = build_base_model(config.model, self.device)
        if self.tokenizer.vocab_size > self.model.config.vocab_size:
            raise ValueError(
                f"the tokenizer has {self.tokenizer.vocab_size} tokens but the model's vocab_size is "
                f"{self.model.config.vocab_size}: set model.config.vocab_size >= {self.tokenizer.vocab_size}"
            )
        _check_attention_window(self.model.config, config.jobs)
        base_path = config.model.path or str(self.output_dir / "base_model")
        lora_configs = {
            spec.name: LoRAConfig(
                r=spec.r,
                lora_alpha=spec.lora_alpha,
                lora_dropout=spec.lora_dropout,
                use_rslora=spec.use_rslora,
                target_modules=spec.target_modules,
                task_type="CAUSAL_LM",
                base_model_name_or_path=base_path,
                backend=config.backend,
            )
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
            self._prepare(job)

    # ---- pipeline stage (a single process is stage 0 of 1) --------------------------------------

    stage_index = 0
    num_stages = 1
    # A single process has every stage's weights when a job finishes; a pipeline publishes after
    # all stages have written their last checkpoint.
    publishes_when_finished = True

    @property
    def is_last_stage(self) -> bool:
        return self.stage_index == self.num_stages - 1

    @property
    def is_reporter(self) -> bool:
        """The one process that logs, shows progress and writes statuses: the last stage (of the
        first data-parallel replica), where the losses are."""
        return self.is_last_stage

    @property
    def planning_stages(self) -> int:
        """Pipeline positions between a job's dependent microbatches (see the scheduler)."""
        return self.config.parallel.pipeline_stages

    def setup_stage(self) -> None:
        """Pipeline engines cut the model here, after the adapters are on (so names and initial
        values do not depend on the stage layout)."""

    def owned_lora_modules(self) -> dict:
        """The MultiLoRALinear layers this process trains, by full module name."""
        return multi_lora_modules(self.model)

    def _prepare(self, job: JobRun) -> None:
        if job.status == "failed":
            return
        spec = job.spec
        try:
            job.order = training_order(len(job.samples), spec)
        except ValueError as error:
            job.status, job.failure = "failed", str(error)
            return
        job.num_steps = math.ceil(len(job.order) / spec.global_batch_size)
        job.target_tokens, job.remaining = [], []
        for g in range(job.num_steps):
            batch = job.order[g * spec.global_batch_size : (g + 1) * spec.global_batch_size]
            job.target_tokens.append(sum(job.samples[i].num_target_tokens for i in batch))
            job.remaining.append(len(batch))
        job.named_parameters = {
            adapter_key(module_name, matrix): getattr(layer, matrix)[job.name]
            for module_name, layer in self.owned_lora_modules().items()
            if job.name in layer.adapters
            for matrix in ("lora_A", "lora_B")
        }
        # A job may target no layer of this pipeline stage: it then has nothing to step here.
        job.optimizer = torch.optim.AdamW(
            list(job.named_parameters.values()) or [torch.nn.Parameter(torch.zeros(0))],
            lr=spec.lr,
            weight_decay=spec.weight_decay,
        )
        job.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(job.optimizer, lr_lambda(spec, job.num_steps))

    # ---- planning -------------------------------------------------------------------------------

    def _fingerprint(self) -> dict:
        """What a run's checkpoints depend on ("jobs": each job's data and settings; a resumed run
        must match it) and what only its schedule depends on (the scheduler settings and the
        pipeline layout; a resumed run with other ones plans again)."""
        return {
            "jobs": {
                name: {"data": _file_digest(Path(job.spec.data)), "spec": {k: str(v) for k, v in vars(job.spec).items()}}
                for name, job in self.jobs.items()
            },
            "scheduler": {k: str(v) for k, v in vars(self.config.scheduler).items() if k != "time_limit_s"},
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
            if changed:
                raise ValueError(
                    f"{path} was planned for other jobs or data than this config describes (jobs {changed} differ); "
                    "resume with the original jobs and data, or start a new output_dir"
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
        spec, stages = self.config.scheduler, self.planning_stages
        if spec.policy == "lorafusion":
            schedule = plan_schedule(
                scheduler_jobs,
                stages=stages,
                capacity=spec.capacity,
                pad_multiple=spec.pad_multiple,
                time_limit_s=spec.time_limit_s,
                use_milp=spec.solver == "milp",
            )
        else:
            baseline_order = megatron_order if spec.policy == "megatron" else mlora_order
            microbatches = baseline_order(scheduler_jobs, stages, spec.capacity)
            schedule = Schedule(stages=stages, capacity=spec.capacity, pad_multiple=1, microbatches=microbatches)
        if save:
            write_atomically(path, schedule.to_json_dict() | {"fingerprint": fingerprint}, root=self.output_dir)
        return schedule

    def _no_job_can_train(self) -> ValueError:
        reasons = "; ".join(f"job {name!r}: {job.failure}" for name, job in self.jobs.items())
        return ValueError(f"no job can train: {reasons}")

    # ---- checkpoints ----------------------------------------------------------------------------

    def _checkpoint_dir(self, job: JobRun) -> Path:
        return self.output_dir / CHECKPOINTS_DIR / job.name

    @property
    def _stage_file_name(self) -> str:
        return f"stage-{self.stage_index}-of-{self.num_stages}.pt"

    def _stage_file(self, job: JobRun, step: int) -> Path:
        return self._checkpoint_dir(job) / f"step-{step}" / self._stage_file_name

    def save_checkpoint(self, job: JobRun) -> None:
        """This stage's adapter weights, AdamW state (both keyed by PEFT parameter name), LR schedule
        and position, written to a temporary file that then replaces the target, so a kill never
        leaves a half-written one. Keeps this stage's previous checkpoint, which is the complete
        one while other stages are still writing this step."""
        target = self._stage_file(job, job.step)
        optimizer_state = {
            key: {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in job.optimizer.state[param].items()}
            for key, param in job.named_parameters.items()
            if param in job.optimizer.state
        }
        state = {
            "step": job.step,
            "tokens_seen": job.tokens_seen,
            "last_loss": job.last_loss,
            "parameters": {key: param.detach().cpu().clone() for key, param in job.named_parameters.items()},
            "optimizer": optimizer_state,
            "lr_scheduler": job.lr_scheduler.state_dict(),
        }
        buffer = io.BytesIO()
        torch.save(state, buffer)
        write_atomically(target, buffer.getvalue(), root=self.output_dir)
        own_steps = sorted(self._steps_with_file(job, own_only=True))
        for old in own_steps[:-2]:
            self._stage_file(job, old).unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # still holds another stage's file: that stage removes it
                self._stage_file(job, old).parent.rmdir()

    def _steps_with_file(self, job: JobRun, own_only: bool = False) -> list[int]:
        steps = []
        for directory in self._checkpoint_dir(job).glob("step-*"):
            if own_only and not (directory / self._stage_file_name).exists():
                continue
            steps.append(int(directory.name.removeprefix("step-")))
        return steps

    def complete_checkpoints(self, job: JobRun):
        """The stage files of each of the job's steps that every stage of the run that wrote it
        finished (any stage count), newest first."""
        for step in sorted(self._steps_with_file(job), reverse=True):
            files = sorted((self._checkpoint_dir(job) / f"step-{step}").glob("stage-*-of-*.pt"))
            if not files:
                continue
            stages = int(files[0].stem.rsplit("-of-", 1)[1])
            if len({f.name for f in files if f.stem.endswith(f"-of-{stages}")}) == stages:
                yield [f for f in files if f.stem.endswith(f"-of-{stages}")]

    def latest_complete_checkpoint(self, job: JobRun) -> list[Path]:
        """The stage files of the job's newest complete step, or [] if there is none."""
        return next(self.complete_checkpoints(job), [])

    def _load_newest_intact(self, job: JobRun) -> tuple[list[Path], dict] | None:
        """The newest complete checkpoint that loads; a damaged one (a truncated file, say) is
        passed over for the one before it, with a warning."""
        for files in self.complete_checkpoints(job):
            try:
                return files, self._load_stage_files(files)
            except Exception as error:  # noqa: BLE001 - whatever torch.load makes of a damaged file
                warn(f"checkpoint {files[0].parent} of job {job.name!r} is damaged ({type(error).__name__}: "
                     f"{str(error)[:200]}); falling back to the previous complete checkpoint")
        return None

    @staticmethod
    def _load_stage_files(files: list[Path]) -> dict:
        """The stage files of one checkpoint step merged: parameters and AdamW state by key."""
        merged: dict = {"parameters": {}, "optimizer": {}}
        for path in files:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or not {"parameters", "optimizer", "step"} <= state.keys():
                raise ValueError(f"{path} is not a checkpoint stage file")
            merged["parameters"].update(state["parameters"])
            merged["optimizer"].update(state["optimizer"])
            for key in ("step", "tokens_seen", "last_loss", "lr_scheduler"):
                merged[key] = state[key]
        return merged

    def _restore(self, job: JobRun) -> None:
        """A job failed in this run stays failed, one whose adapter this run published stays
        finished; every other job continues from its newest intact complete checkpoint (finished
        only if that is its last step: a kill can come between a job's last step and its
        checkpoint, or between its adapter and its status)."""
        status = read_status(self.output_dir / job.name / STATUS_FILE, self.run_id)
        if status is not None and status["status"] == "failed":
            job.status, job.failure = "failed", status.get("failure")
            return
        if status is not None and status["step"] == job.num_steps:
            job.status, job.published, job.step = "finished", True, status["step"]
            job.tokens_seen = status["tokens_seen"]
            job.last_loss = math.nan if status.get("last_loss") is None else float(status["last_loss"])
            job.remaining = [0] * job.num_steps
            return
        loaded = self._load_newest_intact(job)
        if loaded is None:
            return
        files, state = loaded
        missing = sorted(set(job.named_parameters) - set(state["parameters"]))
        if missing:
            raise ValueError(f"checkpoint {files[0].parent} of job {job.name!r} lacks {missing[:5]}")
        with torch.no_grad():
            for key, param in job.named_parameters.items():
                param.copy_(state["parameters"][key])
                if key in state["optimizer"]:
                    job.optimizer.state[param] = {
                        k: v.to(param.device) if torch.is_tensor(v) and v.dim() > 0 else v
                        for k, v in state["optimizer"][key].items()
                    }
        job.lr_scheduler.load_state_dict(state["lr_scheduler"])
        for group, lr in zip(job.optimizer.param_groups, job.lr_scheduler.get_last_lr()):
            group["lr"] = lr
        job.step, job.tokens_seen, job.last_loss = state["step"], state["tokens_seen"], state["last_loss"]
        for g in range(job.step):
            job.remaining[g] = 0
        if job.step == job.num_steps:
            job.status = "finished"

    def publish_adapter(self, job: JobRun) -> Path:
        """Write the job's final adapter (PEFT format) to output_dir/<job>, assembled from the
        stage files of its last step."""
        files = self.latest_complete_checkpoint(job)
        state = self._load_stage_files(files)
        if state["step"] != job.num_steps:
            raise RuntimeError(f"job {job.name!r}: the newest complete checkpoint is step {state['step']}, not the last step")
        config = get_multi_lora_configs(self.model)[job.name]
        target = self.output_dir / job.name
        refuse_links(self.output_dir, target)
        staging = staging_directory(target)
        try:
            write_adapter_directory(state["parameters"], config.to_peft_dict(), staging / "adapter")
            publish_files(staging / "adapter", target, root=self.output_dir)
        finally:
            discard(staging)
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
        check_eval_data(self)
        if self.is_reporter:
            warn_truncated(self)
        schedule = self.prepare_run(resume, schedule)
        self._schedule = schedule
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
        self._progress = Progress(self.progress if self.is_reporter else False, running)
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
                self._save_inline_base_model(keep_complete=resume)
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

    def live_refs(self, microbatch) -> list:
        """The microbatch's samples still to train: of known, running jobs, in global batches not
        already done (after a resume)."""
        return [
            ref
            for ref in microbatch.samples
            if ref.job in self.jobs
            and self.jobs[ref.job].status == "running"
            and self.jobs[ref.job].remaining[ref.global_batch] > 0
        ]

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

    def pack(self, position: int, refs: list) -> PackedMicrobatch:
        """The samples of microbatch `position`, packed, with a placeholder for each of its samples
        not in `refs`. Its dropout seed depends only on the run and the position (each layer mixes
        in its own offset), and every sample keeps its rows, so the single process, every pipeline
        engine and a resumed run draw the same masks: the RNG state a checkpoint would otherwise
        have to keep."""
        trained = set(refs)
        entries = [
            (ref.job, self.jobs[ref.job].samples[self.jobs[ref.job].order[ref.index]])
            if ref in trained
            else (None, padding_sample(ref.tokens))
            for ref in self._schedule.microbatches[position].samples
        ]
        seed = (self.config.model.seed * 1_000_003 + position) % (2**31 - 1)
        return pack_samples(entries, self.device, dropout_seed=seed)

    def _run_microbatch(self, position: int, refs: list) -> None:
        # Every operation is per token or per sample (packed attention, per-segment adapters), so a
        # job's non-finite values stay in its own rows and gradients: it fails at its step, and the
        # others' losses go on. Nothing is read back here: a read per microbatch would make the host
        # wait for the device's queue to drain before it could queue the next microbatch.
        losses = self._forward(position, refs)
        sum(losses.values()).backward()
        for name, loss in losses.items():
            job = self.jobs[name]
            loss = loss.detach()
            job.pending_loss = loss if job.pending_loss is None else job.pending_loss + loss
        self.count_trained([ref for ref in refs if self.jobs[ref.job].status == "running"])

    def _read_back_loss(self, job: JobRun, global_batch: int) -> None:
        """Add the loss summed on the device to batch_loss (one read per job step); a non-finite one
        fails the job, as its gradients and its metrics would be meaningless."""
        if job.pending_loss is None:
            return
        loss, job.pending_loss = float(job.pending_loss), None
        if not math.isfinite(loss):
            self._fail(job, f"non-finite loss ({loss}) in global batch {global_batch}")
            return
        job.batch_loss += loss

    def count_trained(self, refs: list) -> None:
        """Book the samples as trained (their gradients are in); step each job whose global batch
        this completes."""
        for ref in refs:
            job = self.jobs[ref.job]
            job.batch_tokens += ref.tokens
            job.tokens_seen += ref.tokens
            job.remaining[ref.global_batch] -= 1
            if job.remaining[ref.global_batch] == 0:
                self._step(job, ref.global_batch)

    def _forward(self, position: int, refs: list) -> dict[str, torch.Tensor]:
        """Each job's share of the microbatch loss (token cross-entropy sum / its global batch's target tokens)."""
        packed = self.pack(position, refs)
        with multi_lora_batch(self.model, packed.lora_batch):
            logits = self.model(**packed.model_inputs()).logits
        return self._job_losses(packed, per_token_loss(logits, packed.labels), refs)

    def _job_losses(self, packed: PackedMicrobatch, token_losses: torch.Tensor, refs: list) -> dict[str, torch.Tensor]:
        names = list(dict.fromkeys(packed.jobs))
        job_of_sample = torch.tensor([names.index(j) for j in packed.jobs], device=token_losses.device)
        sums = token_losses.new_zeros(len(names)).index_add(0, job_of_sample[packed.sample_of_token], token_losses)
        batch_of_job = {ref.job: ref.global_batch for ref in refs}
        return {
            name: sums[i] / self.jobs[name].target_tokens[batch_of_job[name]]
            for i, name in enumerate(names)
            if name is not None  # placeholders carry no loss
        }

    def _fail(self, job: JobRun, reason: str) -> None:
        job.status, job.failure = "failed", reason
        job.optimizer.zero_grad(set_to_none=True)
        self._write_status(job)

    def _write_status(self, job: JobRun) -> None:
        if not self.is_reporter:
            return
        write_atomically(self.output_dir / job.name / STATUS_FILE, status_record(self.run_id, job), root=self.output_dir)

    def reduce_gradients(self, job: JobRun) -> None:
        """Data-parallel engines sum the job's gradients (and its loss) over replicas here."""

    def _step(self, job: JobRun, global_batch: int) -> None:
        self._read_back_loss(job, global_batch)
        self.reduce_gradients(job)  # first: data-parallel replicas all take part, and may report a failure
        if job.status == "failed":  # a pipeline still carries a failed job's samples; it never steps again
            job.optimizer.zero_grad(set_to_none=True)
            return
        if global_batch != job.step:
            raise RuntimeError(f"job {job.name!r}: global batch {global_batch} completed before batch {job.step} (schedule out of order)")
        params = list(job.named_parameters.values())
        if not _all_finite([p.grad for p in params if p.grad is not None]):
            self._fail(job, f"non-finite gradient at step {job.step + 1}")
            return
        job.optimizer.step()
        job.lr_scheduler.step()
        job.optimizer.zero_grad(set_to_none=True)
        if not _all_finite(params):
            self._fail(job, f"non-finite parameters after step {job.step + 1}")
            return
        job.step += 1
        job.last_loss = job.batch_loss
        if self.is_reporter:
            self._log_step(job)
        job.batch_loss, job.batch_tokens = 0.0, 0
        every = self.config.checkpoint_every
        if job.step == job.num_steps:
            job.status = "finished"
            self.save_checkpoint(job)
            if self.publishes_when_finished:
                self.publish_adapter(job)
        elif every and job.step % every == 0:
            self.save_checkpoint(job)

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
        append_line(self.output_dir / METRICS_FILE, json.dumps(record) + "\n", root=self.output_dir)
        if self._tensorboard is not None:
            for key in ("loss", "lr", "tokens_per_s"):
                self._tensorboard.add_scalar(f"{job.name}/{key}", record[key], job.step)
        self._progress.step(job.name, job.step, job.num_steps, job.last_loss, record["tokens_per_s"])

    # ---- reporting ------------------------------------------------------------------------------

    def _save_inline_base_model(self, keep_complete: bool) -> None:
        """An inline model exists only as a seed: save it, so PEFT and `lorafusion generate` can
        load the trained adapters onto the same weights. It is published whole (see
        publish_files): a resumed run keeps a complete one and saves again one a kill cut short."""
        target = self.output_dir / BASE_MODEL_DIR
        if keep_complete and is_complete(target):
            return
        refuse_links(self.output_dir, target)
        staging = staging_directory(target)
        try:
            build_base_model(self.config.model, "cpu").save_pretrained(staging)
            self.tokenizer.save_pretrained(staging)
            publish_files(staging, target, root=self.output_dir)
        finally:
            discard(staging)

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
