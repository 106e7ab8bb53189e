"""Commands that act on paths inside a running dfsfuse mount (`dfsfuse
snapshot`, `dfsfuse trash empty`): which mount holds a path, the inode a path names there, and
asking that mount to act over its control socket.

A path is resolved by the kernel, through the mount, so symlinks and ".."
mean what they mean to every other program; st_ino of a file in a dfsfuse
mount is its dfsfuse inode number.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from .cluster import control
from .cluster.commands import TerminalOutput
from .datadir import mount_holding
from .errors import UserError

CONTROL_SOCKET = "control.sock"  # in the data dir (Config.control_socket_path)


@dataclasses.dataclass(frozen=True)
class MountedFileSystem:
    mountpoint: str
    data_dir: Path

    def ask(self, operation: str, arguments: dict[str, Any]) -> int:
        """Run a tree operation in the mount (dfsfuse.cluster.tree); its exit code."""
        socket_path = self.data_dir / CONTROL_SOCKET
        try:
            client = control.connect(socket_path)
        except OSError as error:
            raise UserError(f"cannot ask the mount at {self.mountpoint}: {error.strerror or error}") from None
        if client is None:
            raise UserError(f"the mount at {self.mountpoint} does not answer on {socket_path} (has it been unmounted?)")
        output = TerminalOutput()
        return control.request(client, operation, arguments, output.line, output.progress)


@dataclasses.dataclass(frozen=True)
class MountedPath:
    """A path inside a mount: the mount, and the directory and name it has
    there (the name b"" for the mount point itself)."""

    mount: MountedFileSystem
    directory: str
    name: bytes


def mounted_path(path: str) -> MountedPath:
    """Where `path` is: its directory resolved through the mount (its last
    component is not followed, as rename(2) and unlink(2) do not), or a
    one-line UserError if that is not inside a dfsfuse mount."""
    absolute = os.path.abspath(path)
    directory, name = os.path.split(absolute)
    if name in ("", ".", ".."):  # the root, or a path ending in "." or ".."
        directory, name = os.path.realpath(absolute), ""
    else:
        directory = os.path.realpath(directory)
    within = os.path.join(directory, name) if name else directory
    found = mount_holding(within)
    if found is None:
        raise UserError(f"{path} is not inside a dfsfuse mount (see `mount -t fuse.dfsfuse`)")
    data_dir, mountpoint = found
    if within == mountpoint:
        directory, name = within, ""
    return MountedPath(MountedFileSystem(mountpoint, data_dir), directory, os.fsencode(name))


def inode_of(path: str, follow: bool = False) -> int:
    """The dfsfuse inode `path` names; a one-line UserError if it names nothing."""
    try:
        return (os.stat(path) if follow else os.lstat(path)).st_ino
    except OSError as error:
        raise UserError(f"{path}: {error.strerror}") from None
