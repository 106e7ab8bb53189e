"""`dfsfuse snapshot SRC DST [--readonly]` and `dfsfuse snapshot --delete DST`:
copy-on-write snapshots of a directory tree (or of one file), made and
removed by the mount that holds them (dfsfuse.cluster.tree).

A snapshot copies names and attributes only; the shards, immutable, are
shared, so it takes time in proportion to the entries, not the bytes.
"""

from __future__ import annotations

import os

from .errors import UserError
from .mounted import inode_of, mounted_path


def snapshot(source: str, destination: str, readonly: bool) -> int:
    src, dst = mounted_path(source), mounted_path(destination)
    if not dst.name:
        raise UserError(f"{destination} is a mount point: name a new directory inside the file system")
    if src.mount != dst.mount:
        raise UserError(f"{source} and {destination} are in different file systems; a snapshot stays in its own")
    source_inode = inode_of(source)
    if os.path.lexists(destination):
        raise UserError(f"{destination} exists; a snapshot makes a new name")
    source_path = os.path.realpath(source)
    if (dst.directory + "/").startswith(source_path.rstrip("/") + "/") and os.path.isdir(source_path):
        raise UserError(f"cannot snapshot {source} into itself ({destination})")
    arguments = {
        "source": source_inode, "parent": inode_of(dst.directory, follow=True),
        "name": os.fsdecode(dst.name), "readonly": readonly,
    }
    try:
        return dst.mount.ask("snapshot", arguments)
    except UserError as error:
        raise UserError(f"cannot snapshot {source} as {destination}: {error}", error.exit_code) from None


def delete_snapshot(path: str) -> int:
    """Remove a snapshot (or any tree), read-only or not, at once and for good
    (not through the trash): what no other file shares is freed."""
    where = mounted_path(path)
    if not where.name:
        raise UserError(f"{path} is a mount point; name the snapshot to delete")
    inode_of(path)  # a one-line error if it names nothing
    arguments = {"parent": inode_of(where.directory, follow=True), "name": os.fsdecode(where.name)}
    try:
        return where.mount.ask("snapshot delete", arguments)
    except UserError as error:
        raise UserError(f"cannot delete {path}: {error}", error.exit_code) from None
