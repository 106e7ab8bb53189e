"""Making what was written survive a power failure: fsync of a file's data,
fsync of a directory's names (a creation or rename is durable only once the
directory holding it is synced)."""

from __future__ import annotations

import os


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Make a file's data durable."""
    _fsync(path, os.O_RDONLY | os.O_CLOEXEC)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the names in a directory (creations, renames) durable."""
    _fsync(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def _fsync(path: str | os.PathLike[str], flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
