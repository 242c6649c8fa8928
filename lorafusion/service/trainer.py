"""The service's driver of the training loop: jobs join and leave between planning windows.

One thread (`run`) does all training: at each window's start it admits the jobs accepted since
(putting their adapters on the model, or restoring them from their checkpoints after a restart),
chooses which of them the window trains (admission.py: SERVER.yaml's `admission`), takes the
window's plan (planned in the background during the previous window) and trains it, carrying out
cancel requests between microbatches. A job is `running` in the store from the first window that
trains it, `queued` until then. Each job trains as if alone: its own data order, global batches,
loss normalisation, optimizer and LR schedule (job_state.py), whatever trains beside it; and the
windows hand it its global batches in order.

Files under the state directory (besides store.py's database):
    checkpoints/<job>/step-<k>/stage-0-of-1.pt   the job's checkpoints (checkpoints.py)
    adapters/<job>/                              a finished job's adapter, PEFT format
    base_model/                                  an inline base model, saved once (unquantized)

With model.quantize: nf4 the base model is quantized once at start, as `lorafusion train`
quantizes it (every linear but the output layer, in NF4 with double quantization, blocks of 64);
the quantization is a function of the weights alone, so a restart quantizes to the same bytes.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lorafusion.apply import quantize_linears
from lorafusion.config import LoRAConfig
from lorafusion.runtime.checkpoints import CheckpointStore
from lorafusion.runtime.config import ConfigError, JobSpec
from lorafusion.runtime.data import DataError, Sample
from lorafusion.runtime.eval_loss import JobEvaluation, job_data_digest, job_samples
from lorafusion.runtime.job_state import JobRun, job_lora_config, training_order
from lorafusion.runtime.model import build_base_model
from lorafusion.runtime.tokenizer import load_tokenizer
from lorafusion.runtime.trainer import save_inline_base_model
from lorafusion.runtime.training_loop import TrainingLoop

from .adapters import add_adapter, remove_adapter, target_problems
from .admission import WindowAdmission
from .config import ServerConfig, data_root_problems, parse_job
from .data_access import RootedOpener
from .store import DuplicateJob, JobStore
from .windows import WindowPlanner, following_window, window_of

ADAPTERS_DIR = "adapters"


class SubmissionError(Exception):
    """A submitted job that cannot train here: (key, reason) problems, and the HTTP status."""

    def __init__(self, problems: list[tuple[str, str]], status: int = 400):
        self.problems, self.status = problems, status
        super().__init__("; ".join(f"{key}: {reason}" for key, reason in problems))


@dataclass(frozen=True)
class CheckedJob:
    """A submission that passed every check: its spec, its training and held-out samples (eval_data
    or eval_fraction's share), and the digest of its data."""

    spec: JobSpec
    samples: list[Sample]
    eval_samples: list[Sample]
    digest: str


class ServiceTrainer(TrainingLoop):
    """The base model, the live jobs and their windows; submissions are checked here too (see the
    module docstring)."""

    def __init__(self, server: ServerConfig, store: JobStore, device: str | None = None):
        training = server.training
        self.server, self.store = server, store
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        base_settings = _check_same_base(server, store)
        self.tokenizer = load_tokenizer(training.tokenizer)
        self.model = build_base_model(training.model, self.device)
        if self.tokenizer.vocab_size > self.model.config.vocab_size:
            raise ValueError(
                f"the tokenizer has {self.tokenizer.vocab_size} tokens but the model's vocab_size is "
                f"{self.model.config.vocab_size}: set model.config.vocab_size >= {self.tokenizer.vocab_size}"
            )
        if training.model.quantize is not None:  # before any adapter: jobs' adapters go on the NF4 layers
            quantize_linears(self.model, training.backend)
        store.record_base(base_settings)  # loaded: from now on its jobs' checkpoints and base_model/ need it
        self.base_model_path = training.model.path or str(server.state_dir / "base_model")
        if training.model.path is None:
            save_inline_base_model(training.model, self.tokenizer, server.state_dir, keep_complete=True)
        self.checkpoints = CheckpointStore(server.state_dir)
        self.open_data = RootedOpener(server.data_roots)  # every read of a job's data: under the roots only
        self.checkpoint_every = training.checkpoint_every
        self.jobs: dict[str, JobRun] = {}
        self.lora_configs: dict[str, LoRAConfig] = {}
        self._started_at: dict[str, tuple[float, int]] = {}  # time and tokens_seen at its first window here
        # By submit, for admission: (the entry, its check). A refused duplicate may have replaced the
        # accepted entry's meanwhile, so admission takes one only if it is the stored entry.
        self._validated: dict[str, tuple[object, CheckedJob]] = {}
        self._validated_lock = threading.Lock()
        self._model_lock = threading.Lock()  # the model's layers change when an adapter goes on
        self._wake = threading.Event()  # a job was submitted or a cancel requested
        self.stop_requested = threading.Event()
        self._planner = WindowPlanner(training.scheduler)
        self.admission = WindowAdmission(
            server.admission, training.scheduler.capacity, server.window_batches, server.max_wait_windows,
            waited=store.windows_waited(),
        )
        # As `lorafusion train` seeds it: a job's dropout masks equal those of training it alone.
        self.dropout_seed_base = training.model.seed

    # ---- submissions (HTTP threads) ---------------------------------------------------------------

    def lora_config(self, spec: JobSpec) -> LoRAConfig:
        return job_lora_config(spec, self.base_model_path, self.server.training.backend)

    def submit(self, entry: object) -> dict:
        """Check a submitted job as far as it can be checked without training it, then record it
        (queued, committed) and wake the trainer. Raises SubmissionError; changes nothing then."""
        checked = self.validate(entry)
        name = checked.spec.name
        validated = (entry, checked)
        with self._validated_lock:
            self._validated[name] = validated
        try:
            record = self.store.add(name, entry, checked.digest)
        except DuplicateJob:
            with self._validated_lock:
                if self._validated.get(name) is validated:
                    del self._validated[name]
            raise SubmissionError([("name", f"a job named {name!r} was already submitted")], status=409) from None
        self._wake.set()
        return record

    def validate(self, entry: object, new_name: bool = True) -> CheckedJob:
        """The job's spec, samples and data digest, or SubmissionError with every problem found: its
        config (403 for data or eval_data outside data_roots, checked before anything reads the
        path), its name (`new_name`: 409 if taken), its targets and rank against the base model, its
        data and eval_data (read through self.open_data: a path changed into a link out of the roots
        since it was checked is refused when it is read)."""
        outside = data_root_problems(entry, self.server.data_roots)
        if outside:  # (or not a mapping at all: a bad request, not a forbidden path)
            raise SubmissionError(outside, status=403 if isinstance(entry, dict) else 400)
        try:
            spec = parse_job(entry, self.server)
        except ConfigError as error:
            raise SubmissionError(error.problems) from None
        if new_name and self.store.exists(spec.name):
            raise SubmissionError([("name", f"a job named {spec.name!r} was already submitted")], status=409)
        problems = []
        with self._model_lock:
            problems += target_problems(self.model, self.lora_config(spec), self.server.training.model.quantize is not None)
        samples = eval_samples = []
        try:
            samples, eval_samples = job_samples(spec, self.tokenizer, self.open_data)
            training_order(len(samples), spec)
            digest = job_data_digest(spec, self.open_data)
        except DataError as error:
            problems.append((_data_key(spec, error.path), str(error)))
        except ValueError as error:
            problems.append(("data", str(error)))
        except OSError as error:  # unreadable (permissions, a directory where a file was expected, ...)
            key = _data_key(spec, error.filename)
            problems.append((key, f"cannot read {getattr(spec, key)}: {error.strerror or error}"))
        capacity = self.server.training.scheduler.capacity
        for key, read in (("data", samples), ("eval_data", eval_samples)):
            too_long = [s.record for s in read if len(s.input_ids) > capacity]
            if too_long:
                where = "" if key == "data" else f" of eval_data {spec.eval_data}"
                problems.append(("max_seq_len", f"records {too_long[:5]}{where} are longer than scheduler.capacity={capacity} tokens"))
        if problems:
            raise SubmissionError(problems)
        return CheckedJob(spec, samples, eval_samples, digest)

    def request_cancel(self, name: str) -> None:
        self.store.request_cancel(name)
        self._wake.set()

    # ---- the training thread --------------------------------------------------------------------

    def run(self) -> None:
        """Train until stop_requested: windows of the live jobs, idling while there are none."""
        try:
            while not self.stop_requested.is_set():
                self._admit_and_cancel()
                candidates = window_of(self.jobs, self.server.window_batches)
                if not candidates:
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                window = self.admission.choose(candidates, self.jobs)
                if self.admission.record(candidates, window):
                    self.store.set_windows_waited(self.admission.waited)
                self._train_window(window)
            self._checkpoint_running()
        finally:
            self.close()

    def close(self) -> None:
        """End the planner's worker process."""
        self._planner.close()

    def _checkpoint_running(self) -> None:
        """On a stop (SIGTERM, Ctrl-C): every running job's state at its last step, so the next start
        redoes nothing but the global batch each was in."""
        for job in self.jobs.values():
            if job.status == "running" and job.step > 0 and job.step not in self.checkpoints.steps_with_file(job.name):
                self.checkpoints.save(job)

    def _train_window(self, window) -> None:
        """Train the window's plan; whenever the jobs change meanwhile (an arrival, a cancel, a
        failure), the next window is planned again in the background at once."""
        self.schedule = self._planner.plan(window)
        self._planner.plan_ahead(self._following(window))
        for w in window:
            self._start(self.jobs[w.name])
        stopped = self._stopped_in(window)
        for position, microbatch in enumerate(self.schedule.microbatches):
            if self.stop_requested.is_set():
                return
            changed = self._wake.is_set()
            if changed:
                self._admit_and_cancel()
            refs = self.live_refs(microbatch)
            if refs:
                self._run_microbatch(position, refs)
            now_stopped = self._stopped_in(window)
            if changed or now_stopped != stopped:
                stopped = now_stopped
                self._planner.plan_ahead(self._following(window))
        self._retire_ended()

    def _following(self, window) -> tuple:
        """The window expected after `window`, if its jobs train it through: admission chooses
        among the running jobs as they will be then (the wait counts are those after `window`)."""
        return self.admission.choose(following_window(self.jobs, self.server.window_batches, window), self.jobs)

    def _start(self, job: JobRun) -> None:
        """The job's first window in this process: it is running."""
        if job.name in self._started_at:
            return
        self._started_at[job.name] = (time.perf_counter(), job.tokens_seen)
        self.store.started(job.name, job.num_steps, job.step)
        self.store.log(job.name, f"training: {job.num_steps} steps of {job.spec.global_batch_size} samples")

    def _stopped_in(self, window) -> int:
        """How many of the window's jobs have stopped (failed, cancelled, stopped early) before its end."""
        return sum(
            self.jobs[w.name].status in ("failed", "cancelled") or self.jobs[w.name].stopped_early
            for w in window if w.name in self.jobs
        )

    def _admit_and_cancel(self) -> None:
        self._wake.clear()
        for name, entry, digest, cancel in self.store.pending():
            if name not in self.jobs:
                if cancel:  # never trained in this process: its checkpoint, if any, stays as it is
                    self._end(name, "cancelled")
                    continue
                self._admit(name, entry, digest)
            elif cancel and self.jobs[name].status == "running":
                self._cancel(self.jobs[name])
        self._retire_ended()

    def _admit(self, name: str, entry: dict, digest: str) -> None:
        """Put the job's adapter on the model and prepare it; after a restart, continue it from its
        newest checkpoint. A job whose data changed since it was accepted fails."""
        with self._validated_lock:
            submitted, checked = self._validated.pop(name, (None, None))
        try:
            checked = checked if submitted == entry else self._revalidate(entry, digest)
        except SubmissionError as error:
            self._end(name, "failed", str(error))
            return
        spec = checked.spec
        job = JobRun(spec, samples=checked.samples)
        if checked.eval_samples:  # scored as `lorafusion train` scores them (eval_loss.py)
            job.evaluation = JobEvaluation(spec, checked.eval_samples, self.server.training.scheduler.capacity)
        config = self.lora_config(spec)
        with self._model_lock:
            add_adapter(self.model, name, config, spec.seed)
        self.lora_configs[name] = config
        self.prepare_job(job)
        self.jobs[name] = job
        if job.status == "failed":
            self._end(name, "failed", job.failure)
            return
        if self.checkpoints.restore(job):
            self.store.log(name, f"resumed from its checkpoint at step {job.step}/{job.num_steps}")
        if job.status == "finished":  # killed between its last checkpoint and its adapter
            self.publish_adapter(job)

    def _revalidate(self, entry: dict, digest: str) -> CheckedJob:
        """An accepted job's check, its data read again after a restart: each of data and eval_data
        that changed since it was accepted is named (job_data_digest joins their digests with '+')."""
        checked = self.validate(entry, new_name=False)
        spec = checked.spec
        before, now = digest.split("+"), checked.digest.split("+")
        changed = [
            (key, f"{getattr(spec, key)} changed since the job was accepted")
            for index, key in enumerate(("data", "eval_data")[: len(now)])
            if index >= len(before) or before[index] != now[index]
        ]
        if changed:
            raise SubmissionError(changed)
        return checked

    def _cancel(self, job: JobRun) -> None:
        """Stop the job where it is: its checkpoint at its last completed step, loadable as any."""
        job.status = "cancelled"
        job.pending_loss, job.batch_loss, job.batch_tokens = None, 0.0, 0
        job.optimizer.zero_grad(set_to_none=True)
        self.checkpoints.save(job)
        self._end(job.name, "cancelled")

    def _end(self, name: str, state: str, failure: str | None = None, adapter_dir: str | None = None) -> None:
        self.store.ended(name, state, failure, adapter_dir)
        self.store.log(name, f"{state}" + (f": {failure}" if failure else "") + (f"; adapter in {adapter_dir}" if adapter_dir else ""))

    def _retire_ended(self) -> None:
        """Take ended jobs' adapters off the model: their memory goes."""
        for name in [name for name, job in self.jobs.items() if job.status != "running"]:
            del self.jobs[name]
            self.lora_configs.pop(name, None)
            self._started_at.pop(name, None)
            self.admission.forget(name)
            with self._model_lock:
                remove_adapter(self.model, name)

    # ---- training-loop hooks --------------------------------------------------------------------

    def _log_step(self, job: JobRun) -> None:
        started, tokens = self._started_at[job.name]
        elapsed = time.perf_counter() - started
        rate = (job.tokens_seen - tokens) / elapsed if elapsed > 0 else 0.0
        evaluated = job.step_eval_loss
        lr = job.lr_scheduler.get_last_lr()[0]
        self.store.progress(job.name, job.step, job.batch_loss, job.tokens_seen, rate, job.batch_tokens, lr, evaluated)
        eval_part = "" if evaluated is None else f" eval_loss {evaluated:.6f}"
        self.store.log(job.name, f"step {job.step}/{job.num_steps} loss {job.batch_loss:.4f}{eval_part} tokens {job.batch_tokens} tokens/s {rate:.0f}")
        if job.stopped_early:
            self.store.log(job.name, f"stopped early at step {job.step}: no better eval loss in {job.evaluation.patience} evals")

    def _write_status(self, job: JobRun) -> None:
        if job.status == "failed":
            self._end(job.name, "failed", job.failure)

    def publish_adapter(self, job: JobRun) -> Path:
        target = self.server.state_dir / ADAPTERS_DIR / job.name
        self.checkpoints.publish_adapter(job, self.lora_configs[job.name].to_peft_dict(), target)
        evaluation = job.evaluation
        if evaluation is not None and evaluation.patience is not None:  # early stopping publishes its best eval's
            self.store.log(job.name, f"the adapter is that of its best eval: step {evaluation.best_step}, eval_loss {evaluation.best_loss:.6f}")
        self._end(job.name, "finished", adapter_dir=str(target))
        return target


def _check_same_base(server: ServerConfig, store: JobStore) -> dict[str, str]:
    """A restart must serve the base its state directory's jobs were trained on: their checkpoints
    (and an inline base_model/, kept as saved) would not fit another one. Raises ValueError naming
    each changed key; returns the settings to record once the base is loaded."""
    training = server.training
    settings = {
        f"model.{key}": json.dumps(value, sort_keys=True, default=str)
        for key, value in vars(training.model).items() if key != "gradient_checkpointing"  # how activations are kept
    }
    settings["tokenizer"] = json.dumps(training.tokenizer, default=str)
    recorded = store.recorded_base()
    changed = [f"{key} is {value} but was {recorded[key]}" for key, value in settings.items() if recorded.get(key, value) != value]
    if changed:
        raise ValueError(
            f"{server.state_dir} was served with another base model ({'; '.join(changed)}): its jobs' checkpoints "
            "are of that one; serve it with those settings, or choose another state_dir"
        )
    return settings


def _data_key(spec: JobSpec, path) -> str:
    """The job key a read problem belongs to: eval_data if `path` is (or lies in) it, else data."""
    if spec.eval_data is not None and path is not None and Path(path).is_relative_to(spec.eval_data):
        return "eval_data"
    return "data"
