"""`dfsfuse trash list|restore|empty`: the trash for scripts.

`list` and `restore` work through the mount with ordinary file operations,
so anyone who can read the trash can use them: the trash is MOUNT/.trash,
its hour directories hold the files, and each file's xattrs say where it was
and when it was deleted and expires (dfsfuse/metadata/trash.py). A symlink
carries no user xattrs through the kernel, so its original path is read
from its name. `restore` moves a file out of the trash with
RENAME_NOREPLACE: it never overwrites. `empty` asks the mount over its
control socket (files in the trash cannot be unlinked through the mount),
with a progress bar in a terminal.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from .datadir import mount_holding
from .errors import UserError
from .metadata.trash import (
    ELLIPSIS,
    PATH_SEPARATOR,
    TRASH_DELETED_XATTR,
    TRASH_EXPIRES_XATTR,
    TRASH_NAME,
    TRASH_PATH_XATTR,
    hour_start_ns,
)
from .mounted import MountedFileSystem
from .report import size, table

RENAME_NOREPLACE = 1  # linux/fs.h


def mount_of(path: str) -> tuple[Path, str]:
    """(data dir, mount point) of the dfsfuse mount that `path` is in."""
    found = mount_holding(os.path.realpath(path))
    if found is None:
        raise UserError(f"{path} is not in a dfsfuse mount (see `mount -t fuse.dfsfuse`)")
    return found


def entries(mountpoint: str) -> list[dict[str, Any]]:
    """The files in the trash of the mount at `mountpoint`, oldest deletion first."""
    trash = os.path.join(mountpoint, os.fsdecode(TRASH_NAME))
    try:
        hours = sorted(os.listdir(trash))
    except FileNotFoundError:
        return []  # nothing was ever deleted
    found = []
    for hour in hours:
        with os.scandir(os.path.join(trash, hour)) as files:
            for item in files:
                info = item.stat(follow_symlinks=False)
                found.append({
                    "name": f"{hour}/{item.name}",
                    "path": _xattr(item.path, TRASH_PATH_XATTR) or _path_from_name(item.name),
                    "deleted_ns": int(_xattr(item.path, TRASH_DELETED_XATTR) or 0),
                    "expires_ns": int(_xattr(item.path, TRASH_EXPIRES_XATTR) or _hour_end_ns(hour)),
                    "size": info.st_size,
                })
    return sorted(found, key=lambda entry: (entry["deleted_ns"], entry["name"]))


def _xattr(path: str, name: bytes) -> str | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False).decode(errors="surrogateescape")
    except OSError:  # ENODATA, and what the kernel says of user xattrs of a symlink
        return None


def _path_from_name(name: str) -> str:
    """The original path as the entry's name shows it (cut in front if it begins with "…")."""
    shown = name.rpartition("~")[0] or name
    return "/" + shown.replace(os.fsdecode(PATH_SEPARATOR), "/")


def _hour_end_ns(hour: str) -> int:
    start = hour_start_ns(hour.encode())
    return 0 if start is None else start + 3600 * 10**9


def list_trash(path: str, as_json: bool, out: TextIO = sys.stdout) -> int:
    """`dfsfuse trash list [PATH]`: what the trash holds; below PATH only, if
    PATH is a directory of the mount other than its root."""
    _, mountpoint = mount_of(path)
    inside = "/" + os.path.relpath(os.path.realpath(path), mountpoint)
    found = entries(mountpoint)
    if inside not in ("/.", "/" + os.fsdecode(TRASH_NAME)) and not inside.startswith("/" + os.fsdecode(TRASH_NAME) + "/"):
        found = [entry for entry in found if entry["path"] == inside or entry["path"].startswith(inside + "/")]
    if as_json:
        out.write(json.dumps(found, indent=2) + "\n")
        return 0
    rows = [[_when(entry["deleted_ns"]), _when(entry["expires_ns"]), size(entry["size"]), entry["path"], entry["name"]]
            for entry in found]
    out.write("\n".join(table(["DELETED", "EXPIRES", "SIZE", "ORIGINAL PATH", "NAME IN .trash"], rows)) + "\n")
    out.write(f"{len(found)} files, {size(sum(entry['size'] for entry in found))}\n")
    return 0


def _when(ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ns / 1e9)) if ns else "?"


def restore(what: str, to: str | None, out: TextIO = sys.stdout) -> int:
    """`dfsfuse trash restore WHAT [--to DEST]`: WHAT is a file in MOUNT/.trash,
    or the original path of a file in the trash (the newest deleted, if it
    was deleted more than once). DEST (default: the original path) must not
    exist; a directory DEST receives the file under its original name."""
    _, mountpoint = mount_of(what)
    trash = os.path.join(mountpoint, os.fsdecode(TRASH_NAME))
    absolute = os.path.abspath(what)
    if absolute.startswith(trash + "/"):
        name = os.path.relpath(absolute, trash)
        entry = next((entry for entry in entries(mountpoint) if entry["name"] == name), None)
        if entry is None:
            raise UserError(f"{what} is not a file in the trash (see: dfsfuse trash list)")
    else:
        original = "/" + os.path.relpath(os.path.realpath(absolute), mountpoint)
        matches = [entry for entry in entries(mountpoint) if entry["path"] == original]
        if not matches:
            raise UserError(f"nothing in the trash was at {original} (see: dfsfuse trash list {mountpoint})")
        entry = matches[-1]
    source = os.path.join(trash, entry["name"])
    destination = _destination(mountpoint, entry["path"], to)
    try:
        os.makedirs(os.path.dirname(destination), exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot make the directory {os.path.dirname(destination)}: {error.strerror}") from None
    try:
        _rename_noreplace(source, destination)
    except FileExistsError:
        raise UserError(f"{destination} exists: not overwritten (restore --to another path)") from None
    except OSError as error:
        raise UserError(f"cannot restore {source} to {destination}: {error.strerror}") from None
    out.write(f"restored {destination}\n")
    return 0


def _destination(mountpoint: str, original: str, to: str | None) -> str:
    if to is None:
        if original.startswith("/" + os.fsdecode(ELLIPSIS)):
            raise UserError(f"the original path of this file is not known in full ({original}): give --to")
        return os.path.join(mountpoint, original.lstrip("/"))
    if os.path.isdir(to):
        return os.path.join(to, os.path.basename(original))
    return to


def _rename_noreplace(source: str, destination: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd = -100
    if libc.renameat2(at_fdcwd, os.fsencode(source), at_fdcwd, os.fsencode(destination), RENAME_NOREPLACE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), destination)


def empty(path: str, older_than_days: float) -> int:
    """`dfsfuse trash empty [PATH] [--older-than DAYS]`, run by the mount."""
    data_dir, mountpoint = mount_of(path)
    return MountedFileSystem(mountpoint, data_dir).ask("trash empty", {"older_than_days": older_than_days})

