"""The data directory: its lock (one mount at a time) and where it is mounted."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from .config import Config
from .errors import UserError
from .metadata.engines import metadata_exists


def prepare_data_dir(config: Config) -> None:
    try:
        config.data_dir.mkdir(parents=True, exist_ok=True)
        probe = config.data_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise UserError(f"data dir {config.data_dir} is not usable: {error.strerror or error}") from None


class DataDirLock:
    """An exclusive flock on DATA_DIR/lock holding the mount process's PID."""

    def __init__(self, path: Path):
        self.path = path
        self._fd = -1

    def acquire(self, what: str) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(
                f"data dir {self.path.parent} is in use by dfsfuse process {holder}; {what}"
            ) from None
        self._fd = fd

    def write_pid(self) -> None:
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def require_file_system(config: Config) -> None:
    if not metadata_exists(config.metadata):
        if config.metadata_url is None:
            raise UserError(f"no dfsfuse file system in {config.data_dir} (mount it once, or dfsfuse format)")
        raise UserError(f"no dfsfuse file system in {config.metadata.where} (dfsfuse format --meta URL makes one)")


def mount_state(config: Config) -> str:
    """'not mounted', or 'mounted at PATH (pid N)' from the lock and /proc/mounts."""
    try:
        fd = os.open(config.lock_path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return "not mounted"
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return f"mounted at {mountpoint_of(config) or '?'} (pid {pid})"
        return "not mounted"
    finally:
        os.close(fd)


def mountpoint_of(config: Config) -> str | None:
    """Where the data dir is mounted, if it is."""
    return next((mountpoint for data_dir, mountpoint in dfsfuse_mounts() if data_dir == config.data_dir), None)


def dfsfuse_mounts() -> list[tuple[Path, str]]:
    """(data dir, mount point) of every dfsfuse mount, from /proc/mounts (the
    fsname of a mount is dfsfuse:DATA_DIR)."""
    found = []
    with open("/proc/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) > 1 and fields[0].startswith("dfsfuse:"):
                found.append((Path(_unescape(fields[0].removeprefix("dfsfuse:"))), _unescape(fields[1])))
    return found


def mount_holding(resolved: str) -> tuple[Path, str] | None:
    """(data dir, mount point) of the innermost dfsfuse mount that the
    absolute, resolved path `resolved` lies in (or is the mount point of)."""
    found = [
        (data_dir, mountpoint)
        for data_dir, mountpoint in dfsfuse_mounts()
        if resolved == mountpoint or resolved.startswith(mountpoint.rstrip("/") + "/")
    ]
    return max(found, key=lambda mount: len(mount[1])) if found else None


def _unescape(field: str) -> str:
    """/proc/mounts writes space, tab, newline and backslash as octal escapes."""
    for escaped, plain in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(escaped, plain)
    return field
