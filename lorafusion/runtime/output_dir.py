"""What lorafusion may write, replace and delete in the directories it writes to.

A training run's output_dir is lorafusion's once it holds MARKER_FILE, which a run writes when it
takes a new or empty directory (or, with --overwrite, a directory holding other files). The marker
carries the run id (statuses carry it too, so an earlier run's outputs are never taken for this
run's) and the top-level entries lorafusion created there: only files of those entries that
lorafusion writes (RUN_LAYOUT) are ever replaced or deleted, so --overwrite cannot destroy a file
a user put there. While a run goes on, it holds an exclusive flock on LOCK_FILE: a second run on
the same directory stops at once instead of interleaving its files with the first one's.

A model directory (an inline base model, `loram prune --out`, `loram align --out`) lists the files
lorafusion put there in MANIFEST_FILE, written last: the directory is complete exactly when its
manifest is there, and only the files it lists are ever replaced.

No write or delete goes through a symbolic link inside these directories (a link could send a
checkpoint, or a delete, outside them): such a path is refused with its name.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import stat
import tempfile
import time
import weakref
from pathlib import Path

from lorafusion.file_modes import follow_umask

MARKER_FILE = ".lorafusion-run.json"
LOCK_FILE = ".lorafusion.lock"
MANIFEST_FILE = ".lorafusion-files.json"
# Temporary files and staging directories; a name with this prefix is always lorafusion's.
TEMP_PREFIX = ".lorafusion-tmp-"

SCHEDULE_FILE = "schedule.json"
METRICS_FILE = "metrics.jsonl"
STATUS_FILE = "status.json"
CHECKPOINTS_DIR = "checkpoints"
BASE_MODEL_DIR = "base_model"
TENSORBOARD_DIR = "tensorboard"
PIPELINE_STATS_DIR = "pipeline_stats"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")

# Names a job may not take: its adapter directory would be one of these.
RESERVED_NAMES = frozenset(
    {SCHEDULE_FILE, METRICS_FILE, CHECKPOINTS_DIR, BASE_MODEL_DIR, TENSORBOARD_DIR, PIPELINE_STATS_DIR,
     MARKER_FILE, LOCK_FILE, MANIFEST_FILE, STATUS_FILE}
)

_CHECKPOINT_FILE = re.compile(r"[^/]+/step-\d+/stage-\d+-of-\d+\.pt")
_STAGE_STATS_FILE = re.compile(r"stage-\d+\.json")


class OutputDirError(ValueError):
    """An output directory lorafusion may not use as asked; the message names the path."""


def written_by_lorafusion(entry: str, relative: str, manifest: set[str]) -> bool:
    """Whether lorafusion wrote the file at `relative` (posix) inside top-level `entry` of a run."""
    if entry.startswith(TEMP_PREFIX) or any(part.startswith(TEMP_PREFIX) for part in relative.split("/")):
        return True
    if entry == CHECKPOINTS_DIR:
        return bool(_CHECKPOINT_FILE.fullmatch(relative))
    if entry == TENSORBOARD_DIR:
        return "/" not in relative and relative.startswith("events.out.tfevents.")
    if entry == PIPELINE_STATS_DIR:
        return bool(_STAGE_STATS_FILE.fullmatch(relative))
    # base_model/ (its manifest lists its files) and the jobs' adapter directories.
    return "/" not in relative and (relative in manifest or relative in (*ADAPTER_FILES, STATUS_FILE, MANIFEST_FILE))


# ---- links, atomic writes -----------------------------------------------------------------------


def refuse_links(root: Path, path: Path) -> None:
    """Raise OutputDirError if `path`, or a directory between `root` and it, is a symbolic link."""
    current = Path(root)
    for part in Path(path).relative_to(root).parts:
        current = current / part
        try:
            mode = os.lstat(current).st_mode
        except FileNotFoundError:
            return
        if stat.S_ISLNK(mode):
            raise OutputDirError(
                f"{current} is a symbolic link: lorafusion never writes or deletes through a link inside "
                f"{root}; replace it with a real file or directory, or choose another output directory"
            )


def _fsync_directory(directory: Path) -> None:
    # A rename is durable once its directory is synced; not every filesystem allows that.
    try:
        handle = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def write_atomically(path: Path, content: str | bytes | dict, root: Path | None = None) -> None:
    """Write `content` (text, bytes, or a dict as JSON) to a temporary sibling, fsync it, and
    rename it over `path`: readers and a resumed run see the old file or the new one, never a
    half-written one. With `root`, nothing between root and path may be a symbolic link."""
    path = Path(path)
    if root is not None:
        refuse_links(root, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}-", dir=path.parent)
    try:
        follow_umask(handle)
        with os.fdopen(handle, "wb") as out:
            if isinstance(content, dict):
                content = json.dumps(content, indent=1) + "\n"
            out.write(content.encode("utf-8") if isinstance(content, str) else content)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def append_line(path: Path, line: str, root: Path) -> None:
    """Append one line to `path` (created if missing), never through a link."""
    refuse_links(root, path)
    handle = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    with os.fdopen(handle, "a", encoding="utf-8") as out:
        out.write(line)


def read_json(path: Path, what: str) -> dict:
    """A JSON object from `path`; a damaged file raises OutputDirError naming it and the fault."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        fault = "it is empty" if Path(path).stat().st_size == 0 else f"it is not valid JSON ({error})"
        raise OutputDirError(f"{path}: damaged {what}: {fault}") from None
    if not isinstance(data, dict):
        raise OutputDirError(f"{path}: damaged {what}: expected a JSON object, got {type(data).__name__}")
    return data


# ---- the lock -----------------------------------------------------------------------------------


class DirectoryLock:
    """An exclusive flock on `directory`/LOCK_FILE, which records the holder's pid. The kernel
    drops it when the process ends, however it ends, so a killed run never leaves it behind."""

    def __init__(self, directory: Path) -> None:
        path = Path(directory) / LOCK_FILE
        try:
            handle = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as error:
            if error.errno == errno.ELOOP:
                refuse_links(directory, path)
            raise OutputDirError(f"cannot open the lock file {path}: {error.strerror}") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(handle, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(handle)
            raise OutputDirError(
                f"{directory} is in use by another lorafusion process (pid {holder}); "
                "wait for it to end, or choose another output directory"
            ) from None
        os.ftruncate(handle, 0)
        os.pwrite(handle, f"{os.getpid()}\n".encode("ascii"), 0)
        # Closing the descriptor releases the lock: on release(), or when the holder is collected.
        self._close = weakref.finalize(self, os.close, handle)

    def release(self) -> None:
        self._close()

    def __enter__(self) -> DirectoryLock:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


# ---- model directories (manifest) ---------------------------------------------------------------


def _manifest(directory: Path) -> dict | None:
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        return None
    manifest = read_json(path, "manifest")
    files = manifest.get("files")
    if not isinstance(files, list) or not all(isinstance(name, str) for name in files):
        raise OutputDirError(f"{path}: damaged manifest: 'files' is not a list of file names")
    return manifest


def manifest_files(directory: Path) -> set[str] | None:
    """The files lorafusion published in `directory` (or may have, if a publish was cut short),
    or None when it has no manifest."""
    manifest = _manifest(directory)
    return None if manifest is None else set(manifest["files"])


def is_complete(directory: Path) -> bool:
    """Whether `directory` holds a finished publish_files (one cut short reads as incomplete)."""
    try:
        manifest = _manifest(directory)
    except OutputDirError:
        return False
    return (
        manifest is not None
        and manifest.get("complete") is True
        and all((Path(directory) / name).is_file() for name in manifest["files"])
    )


def staging_directory(target: Path) -> Path:
    """A fresh temporary directory inside `target` (same filesystem: the renames are atomic)."""
    target.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=target))


def publish_files(source: Path, target: Path, root: Path | None = None) -> None:
    """Move every file of `source` into `target`, replacing only files lorafusion published there
    before (its manifest) and removing those of them the new set lacks; a file someone else put
    there is never replaced (OutputDirError names it). While the files move, the manifest lists
    the old and new names and reads as incomplete: a kill part-way leaves a directory that is
    never taken for a finished one, and whose files the next publish may still replace."""
    source, target = Path(source), Path(target)
    if root is not None:
        refuse_links(root, target)
    target.mkdir(parents=True, exist_ok=True)
    previous = manifest_files(target) or set()
    names = sorted(entry.name for entry in source.iterdir())
    for name in names:
        if not (source / name).is_file():
            raise OutputDirError(f"{source / name}: only plain files are published, not directories")
        existing = target / name
        if os.path.islink(existing):
            refuse_links(target, existing)
        if existing.exists() and name not in previous:
            raise OutputDirError(
                f"{existing} was not written by lorafusion; it is never replaced: move it away or choose another directory"
            )
    for name in names:
        follow_umask(source / name)
        with open(source / name, "rb") as handle:
            os.fsync(handle.fileno())
    write_atomically(target / MANIFEST_FILE, {"files": sorted(previous | set(names)), "complete": False})
    for name in names:
        os.replace(source / name, target / name)
    for name in sorted(previous - set(names)):
        stale = target / name
        if stale.is_file() and not stale.is_symlink():
            stale.unlink()
    write_atomically(target / MANIFEST_FILE, {"files": names, "complete": True, "written": time.time()})
    for entry in target.iterdir():  # staging left by a killed publish (by name, lorafusion's)
        if entry.name.startswith(TEMP_PREFIX) and entry not in source.parents and entry != source:
            discard(entry)


def discard(path: Path) -> None:
    """Remove a temporary file or staging directory of lorafusion's (a link only as a link)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def short_listing(names: list[str]) -> str:
    shown = ", ".join(names[:4])
    return shown + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def directory_entries(directory: Path) -> list[str]:
    if not directory.exists():
        return []
    if not directory.is_dir():
        raise OutputDirError(f"{directory} exists and is not a directory")
    return sorted(entry.name for entry in directory.iterdir() if entry.name != LOCK_FILE)


def claim_model_directory(target: str | os.PathLike, overwrite: bool, expected: tuple[str, ...] = ()) -> DirectoryLock:
    """Take `target` for a model that publish_files will write there, and lock it: a new or empty
    directory; one lorafusion published into before only with `overwrite`; one holding other
    files only with `overwrite` (they are kept, and never replaced: `expected`, the names the
    model will have, are checked now, so that a long job is not refused at its first save)."""
    target = Path(target)
    if os.path.lexists(target / LOCK_FILE):  # a run may hold it: "in use" is then the answer
        with DirectoryLock(target):
            pass
    entries = directory_entries(target)
    owned = manifest_files(target) or set()
    in_the_way = sorted(name for name in expected if name in entries and name not in owned)
    if in_the_way and overwrite:
        raise OutputDirError(
            f"{target / in_the_way[0]} was not written by lorafusion; it is never replaced: move it away or choose another directory"
        )
    if entries and not overwrite:
        if manifest_files(target) is not None:
            raise OutputDirError(
                f"{target} holds an earlier lorafusion output; pass --overwrite to replace it "
                "(only the files lorafusion wrote there are replaced)"
            )
        raise OutputDirError(
            f"{target} is not empty and was not written by lorafusion (it holds {short_listing(entries)}); choose a new "
            "or empty directory, or pass --overwrite to write beside those files (they are never deleted or replaced)"
        )
    target.mkdir(parents=True, exist_ok=True)
    return DirectoryLock(target)
