"""A training run's claim on its output_dir (see output_dir.py for the rules): the lock, the marker
with the run id, and --overwrite's removal of an earlier run's outputs, which touches only files
lorafusion wrote."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

from .output_dir import (
    BASE_MODEL_DIR,
    CHECKPOINTS_DIR,
    LOCK_FILE,
    MANIFEST_FILE,
    MARKER_FILE,
    METRICS_FILE,
    PIPELINE_STATS_DIR,
    SCHEDULE_FILE,
    STATUS_FILE,
    TEMP_PREFIX,
    TENSORBOARD_DIR,
    DirectoryLock,
    OutputDirError,
    directory_entries,
    short_listing,
    written_by_lorafusion,
    manifest_files,
    read_json,
    refuse_links,
    write_atomically,
)

# Top-level entries a run may create besides one directory per job.
RUN_ENTRIES = (SCHEDULE_FILE, METRICS_FILE, CHECKPOINTS_DIR, BASE_MODEL_DIR, TENSORBOARD_DIR, PIPELINE_STATS_DIR)


def read_marker(root: Path) -> dict | None:
    path = Path(root) / MARKER_FILE
    if not path.is_file():
        return None
    marker = read_json(path, "run marker")
    if not isinstance(marker.get("run_id"), str) or not isinstance(marker.get("entries"), list):
        raise OutputDirError(f"{path}: damaged run marker: it lacks run_id or entries")
    return marker


def run_id_of(root: Path) -> str | None:
    marker = read_marker(root)
    return marker["run_id"] if marker else None


class RunDirectory:
    """The output_dir of a run, locked for it; `run_id` names the run in its statuses."""

    def __init__(self, root: Path, lock: DirectoryLock, run_id: str) -> None:
        self.root, self.run_id, self._lock = root, run_id, lock

    def release(self) -> None:
        self._lock.release()

    @classmethod
    def claim(cls, root: str | os.PathLike, outputs: list[str], resume: bool, overwrite: bool) -> RunDirectory:
        """Take `root` for a run writing the top-level `outputs`: a new or empty directory; the
        run's own (--resume: same run id); an earlier run's (--overwrite: its outputs are removed
        first); one holding other files (--overwrite: they stay, and none may be in the way)."""
        root = Path(root)
        if resume and overwrite:
            raise OutputDirError("--resume and --overwrite exclude each other: resume a run, or replace it")
        if not os.path.lexists(root / LOCK_FILE):
            # Checked before the lock file is made, so a refused directory gets nothing written into it.
            # Where one exists, a run may hold it: then "in use" is the answer, checked first.
            cls._refuse(root, read_marker(root), directory_entries(root), resume, overwrite)
        root.mkdir(parents=True, exist_ok=True)
        lock = DirectoryLock(root)
        try:
            marker, entries = read_marker(root), directory_entries(root)  # again: another run may have ended meanwhile
            cls._refuse(root, marker, entries, resume, overwrite)
            owned = set(marker["entries"]) if marker else set()
            in_the_way = sorted(name for name in outputs if name in entries and name not in owned)
            if in_the_way:
                raise OutputDirError(
                    f"{root / in_the_way[0]} exists and was not written by lorafusion; lorafusion never replaces "
                    "files it did not write: move it away or choose another output_dir"
                )
            leftovers = [name for name in entries if name.startswith(TEMP_PREFIX)]  # of a killed run
            if marker and resume:
                remove_run_outputs(root, leftovers)
                run_id = marker["run_id"]
            else:
                remove_run_outputs(root, leftovers + (sorted(owned) if marker else []))
                run_id = uuid.uuid4().hex
            kept = sorted(name for name in owned if os.path.lexists(root / name))
            write_atomically(
                root / MARKER_FILE,
                {"tool": "lorafusion", "run_id": run_id, "started": time.time(), "entries": sorted(set(kept) | set(outputs))},
                root=root,
            )
        except BaseException:
            lock.release()
            raise
        return cls(root, lock, run_id)

    @staticmethod
    def _refuse(root: Path, marker: dict | None, entries: list[str], resume: bool, overwrite: bool) -> None:
        others = [name for name in entries if name != MARKER_FILE]
        if marker is None and others:
            if resume:
                raise OutputDirError(
                    f"{root} holds no lorafusion run to resume (no {MARKER_FILE}); start a run in a new or empty output_dir"
                )
            if not overwrite:
                raise OutputDirError(
                    f"{root} is not empty and was not written by lorafusion (it holds {short_listing(others)}); choose a new "
                    "or empty output_dir, or pass --overwrite to write beside those files (they are never deleted or replaced)"
                )
        if marker is not None and not resume and not overwrite:
            if run_finished(root, marker):
                raise OutputDirError(
                    f"{root} holds a finished lorafusion run; pass --overwrite to train again from scratch, replacing its "
                    "outputs (files lorafusion did not write are kept), or choose another output_dir"
                )
            raise OutputDirError(
                f"{root} holds an interrupted lorafusion run; continue it with --resume, or pass --overwrite to replace "
                "its outputs (files lorafusion did not write are kept)"
            )


def run_finished(root: Path, marker: dict) -> bool:
    """Whether every job of the run that `marker` describes has ended (finished or failed): each
    has the status.json the run writes when a job ends, with the run's id."""
    jobs = [name for name in marker["entries"] if name not in RUN_ENTRIES]
    for name in jobs:
        path = root / name / STATUS_FILE
        if (root / name).is_symlink() or path.is_symlink() or not path.is_file():
            return False
        try:
            status = read_json(path, "job status")
        except OutputDirError:
            return False
        if status.get("run_id") != marker["run_id"] or status.get("status") not in ("finished", "failed"):
            return False
    return bool(jobs)


def remove_run_outputs(root: Path, entries: list[str]) -> None:
    """Delete the files lorafusion wrote under the top-level `entries` of `root`, then whichever
    of their directories are left empty. Everything is checked first: a link anywhere stops it
    before anything is deleted."""
    files, directories = [], []
    for entry in entries:
        top = root / entry
        if not os.path.lexists(top):
            continue
        refuse_links(root, top)
        if top.is_file():
            if entry in (SCHEDULE_FILE, METRICS_FILE) or entry.startswith(TEMP_PREFIX):  # by name, lorafusion's
                files.append(top)
            continue
        manifest = (manifest_files(top) or set()) if (top / MANIFEST_FILE).is_file() else set()
        for directory, subdirectories, names in os.walk(top, topdown=False):
            directory = Path(directory)
            for name in subdirectories + names:
                refuse_links(root, directory / name)
            for name in names:
                relative = (directory / name).relative_to(top).as_posix()
                if written_by_lorafusion(entry, relative, manifest):
                    files.append(directory / name)
            directories.append(directory)
    for path in files:
        path.unlink(missing_ok=True)
    for directory in directories:  # deepest first (os.walk bottom-up)
        try:
            directory.rmdir()
        except OSError:
            pass  # something lorafusion did not write is left there


__all__ = ["RUN_ENTRIES", "LOCK_FILE", "RunDirectory", "read_marker", "remove_run_outputs", "run_id_of"]
