"""Job checkpoints under a run's directory, which the run has claimed and locks (run_directory.py):

    checkpoints/<job>/step-<k>/stage-<s>-of-<S>.pt

Each file is one pipeline stage's share of the job's state (job_state.JobRun.state_dict), written
atomically; a step is complete when all S stage files exist, and restores onto any number of
stages (a single process is stage 0 of 1). Each stage keeps its previous step's file, which is
the complete one while other stages are still writing the newest."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path

import torch

from lorafusion.adapters import write_adapter_directory

from .eval_loss import published_parameters
from .job_state import JobRun
from .output_dir import CHECKPOINTS_DIR, discard, publish_files, refuse_links, staging_directory, write_atomically
from .run_state import warn


class CheckpointStore:
    """The checkpoints of one stage of a run rooted at `root`."""

    def __init__(self, root: Path, stage_index: int = 0, num_stages: int = 1):
        self.root = Path(root)
        self.stage_index = stage_index
        self.num_stages = num_stages

    def job_dir(self, name: str) -> Path:
        return self.root / CHECKPOINTS_DIR / name

    @property
    def stage_file_name(self) -> str:
        return f"stage-{self.stage_index}-of-{self.num_stages}.pt"

    def stage_file(self, name: str, step: int) -> Path:
        return self.job_dir(name) / f"step-{step}" / self.stage_file_name

    def save(self, job: JobRun) -> None:
        """This stage's share of the job's state at its current step, written to a temporary file
        that then replaces the target, so a kill never leaves a half-written one. Keeps this
        stage's previous checkpoint."""
        buffer = io.BytesIO()
        torch.save(job.state_dict(), buffer)
        write_atomically(self.stage_file(job.name, job.step), buffer.getvalue(), root=self.root)
        own_steps = sorted(self.steps_with_file(job.name, own_only=True))
        for old in own_steps[:-2]:
            self.stage_file(job.name, old).unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # still holds another stage's file: that stage removes it
                self.stage_file(job.name, old).parent.rmdir()

    def steps_with_file(self, name: str, own_only: bool = False) -> list[int]:
        steps = []
        for directory in self.job_dir(name).glob("step-*"):
            if own_only and not (directory / self.stage_file_name).exists():
                continue
            steps.append(int(directory.name.removeprefix("step-")))
        return steps

    def complete_checkpoints(self, name: str) -> Iterator[list[Path]]:
        """The stage files of each of the job's steps that every stage of the run that wrote it
        finished (any stage count), newest first."""
        for step in sorted(self.steps_with_file(name), reverse=True):
            files = sorted((self.job_dir(name) / f"step-{step}").glob("stage-*-of-*.pt"))
            if not files:
                continue
            stages = int(files[0].stem.rsplit("-of-", 1)[1])
            if len({f.name for f in files if f.stem.endswith(f"-of-{stages}")}) == stages:
                yield [f for f in files if f.stem.endswith(f"-of-{stages}")]

    def latest_complete(self, name: str) -> list[Path]:
        """The stage files of the job's newest complete step, or [] if there is none."""
        return next(self.complete_checkpoints(name), [])

    def load_newest_intact(self, name: str) -> tuple[list[Path], dict] | None:
        """The newest complete checkpoint that loads; a damaged one (a truncated file, say) is
        passed over for the one before it, with a warning."""
        for files in self.complete_checkpoints(name):
            try:
                return files, load_stage_files(files)
            except Exception as error:  # noqa: BLE001 - whatever torch.load makes of a damaged file
                warn(f"checkpoint {files[0].parent} of job {name!r} is damaged ({type(error).__name__}: "
                     f"{str(error)[:200]}); falling back to the previous complete checkpoint")
        return None

    def restore(self, job: JobRun) -> bool:
        """Continue `job` from its newest intact complete checkpoint; False if it has none."""
        loaded = self.load_newest_intact(job.name)
        if loaded is None:
            return False
        files, state = loaded
        missing = sorted(set(job.named_parameters) - set(state["parameters"]))
        if missing:
            raise ValueError(f"checkpoint {files[0].parent} of job {job.name!r} lacks {missing[:5]}")
        job.load_state_dict(state)
        return True

    def publish_adapter(self, job: JobRun, peft_config: dict, target: Path) -> None:
        """Write the job's final adapter (PEFT format) to `target`, assembled from the stage files
        of its last step (its step at an early stop), and published whole (see
        output_dir.publish_files). Under early stopping it is the adapter of the job's best eval."""
        state = load_stage_files(self.latest_complete(job.name))
        if state["step"] != job.step:
            raise RuntimeError(f"job {job.name!r}: the newest complete checkpoint is step {state['step']}, not the last step {job.step}")
        refuse_links(self.root, target)
        staging = staging_directory(target)
        try:
            write_adapter_directory(published_parameters(state), peft_config, staging / "adapter")
            publish_files(staging / "adapter", target, root=self.root)
        finally:
            discard(staging)


def load_stage_files(files: list[Path]) -> dict:
    """The stage files of one checkpoint step merged: parameters and AdamW state by key."""
    if not files:
        raise FileNotFoundError("no complete checkpoint")
    merged: dict = {"parameters": {}, "optimizer": {}, "evaluation": None}
    for path in files:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not {"parameters", "optimizer", "step"} <= state.keys():
            raise ValueError(f"{path} is not a checkpoint stage file")
        merged["parameters"].update(state["parameters"])
        merged["optimizer"].update(state["optimizer"])
        for key in ("step", "tokens_seen", "last_loss", "lr_scheduler"):
            merged[key] = state[key]
        merged["evaluation"] = _merged_evaluation(merged["evaluation"], state.get("evaluation"))
    return merged


def _merged_evaluation(merged: dict | None, stage: dict | None) -> dict | None:
    """The eval state of a job over its stage files: every stage records the same evals, and
    keeps the best eval's adapter of its own layers."""
    if merged is None or stage is None:
        return stage if merged is None else merged
    if merged["best_parameters"] is None or stage["best_parameters"] is None:
        return stage
    return {**stage, "best_parameters": {**merged["best_parameters"], **stage["best_parameters"]}}
