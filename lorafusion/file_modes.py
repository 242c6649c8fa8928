"""Modes of the files lorafusion writes. Temporary files and directories (tempfile's mkstemp,
mkdtemp, and safetensors' writer) are private (0600/0700) whatever the umask; what a run publishes
must get the mode any file the user writes gets (0644/0755 under the usual umask 022), so that
a group or a serving process can read the adapters."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def current_umask() -> int:
    try:  # Linux reports it without changing it (os.umask sets while it reads: racy with threads)
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str | os.PathLike | int) -> None:
    """Give a file (0666) or directory (0777) the mode the umask leaves; `path` may be an open
    file descriptor. Links are left alone."""
    mask = current_umask()
    if isinstance(path, int):
        os.fchmod(path, 0o666 & ~mask)
        return
    mode = os.lstat(path).st_mode
    if stat.S_ISLNK(mode):
        return
    os.chmod(path, (0o777 if stat.S_ISDIR(mode) else 0o666) & ~mask)


def follow_umask_tree(directory: str | os.PathLike) -> None:
    """follow_umask on `directory` and everything in it."""
    follow_umask(directory)
    for entry in Path(directory).rglob("*"):
        follow_umask(entry)
