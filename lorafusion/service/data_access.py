"""Reading a submitted job's data only from under the server's data roots, at the moment of reading.

A submission's paths are checked before anything reads them (config.data_root_problems), but a
check alone leaves a gap: a file or directory under a root swapped for a symbolic link between the
check and the read would make the service read from wherever the link points. So every data file
the service reads (data, eval_data, and each file of a directory dataset; for samples and for the
digest) is opened by `RootedOpener`: the path resolved, the resolved path (which then holds no
link) opened with O_NOFOLLOW, so a link swapped in as the file itself is refused, and the opened
file's own path (/proc/self/fd, the kernel's name for what was opened, whatever links led there)
checked to lie under a root, so a link swapped in as a directory above it is refused too. Only a
regular file is read (a FIFO swapped in would block the reader).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO

from lorafusion.runtime.data import DataError


class RootedOpener:
    """An `Opener` (lorafusion.runtime.data) of files under `roots` only; DataError otherwise."""

    def __init__(self, roots: tuple[Path, ...]):
        self.roots = roots

    def _under_roots(self, path: Path) -> bool:
        return any(path.is_relative_to(root) for root in self.roots)

    def _outside(self, path: Path, where: Path) -> DataError:
        roots = ", ".join(map(str, self.roots))
        return DataError(path, None, f"resolves to {where} when read, outside the server's data_roots ({roots}); it was changed after it was checked")

    def __call__(self, path: Path) -> BinaryIO:
        resolved = Path(path).resolve()
        if not self._under_roots(resolved):
            raise self._outside(path, resolved)
        try:
            fd = os.open(resolved, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as error:
            if error.errno == errno.ELOOP:  # the resolved path's last part became a link
                raise self._outside(path, Path(os.path.realpath(resolved))) from None
            raise
        try:
            opened = _opened_path(fd, resolved)
            if opened is None or not self._under_roots(opened):
                raise self._outside(path, opened or Path(os.path.realpath(resolved)))
            mode = os.fstat(fd).st_mode
            if stat.S_ISDIR(mode):
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
            if not stat.S_ISREG(mode):
                raise DataError(path, None, "not a regular file")
            os.set_blocking(fd, True)
            return os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise


def _opened_path(fd: int, resolved: Path) -> Path | None:
    """The path of the file open as `fd`, by the kernel's record (Linux); where there is no /proc,
    `resolved` if it still names that very file with no link on the way, else None (unknown)."""
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        pass
    opened, now = os.fstat(fd), os.stat(resolved, follow_symlinks=False)
    if (opened.st_dev, opened.st_ino) == (now.st_dev, now.st_ino) and Path(os.path.realpath(resolved)) == resolved:
        return resolved
    return None
