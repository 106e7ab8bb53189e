"""Operations on the mounted tree that `dfsfuse` commands ask of a mount over
its control socket: tree snapshots (`dfsfuse snapshot`), their removal, and
emptying the trash (`dfsfuse trash empty`).

They run in the mount because they go through what only the mount has: its
metadata cache, the file data it holds buffered, and the kernel's caches of
names and attributes, which must forget what changed underneath them
(FileSystem tells the kernel). They take no maintenance turn (they move no
replica), so a repair running meanwhile does not hold them up. Inodes and
names come from the command, which found them with stat(2) through the mount.
"""

from __future__ import annotations

import os
import time

import trio

from dfsfuse.cluster.operations import Cluster, Operation, Output
from dfsfuse.errors import DfsError, UserError
from dfsfuse.metadata.base import ProgressReport
from dfsfuse.metadata.trash import DAY_NS
from dfsfuse.report import size
from dfsfuse.vfs.filesystem import FileSystem
from dfsfuse.vfs.trash import purge


def _mounted(cluster: Cluster, what: str) -> FileSystem:
    if cluster.fs is None:
        raise UserError(f"{what} runs in the mount: mount the file system first")
    return cluster.fs


def _reporter(out: Output, what: str) -> ProgressReport:
    """A ProgressReport that may be called from the engine's transaction thread."""
    token = trio.lowlevel.current_trio_token()
    return lambda done, total: token.run_sync_soon(out.progress, done, total, what)


async def snapshot(cluster: Cluster, out: Output, source: int, parent: int, name: str, readonly: bool) -> int:
    fs = _mounted(cluster, "snapshot")
    started = time.monotonic()
    try:
        change = await fs.snapshot_tree(source, parent, os.fsencode(name), readonly, _reporter(out, "entries"))
    except DfsError as error:
        raise UserError(os.strerror(error.errno)) from None
    cluster.quotas_changed()  # the usage of the quotas above it grew
    out.progress(len(change.inodes), len(change.inodes), "entries")
    kind = "read-only snapshot" if readonly else "snapshot"
    out.line(
        f"{kind} of {len(change.inodes)} inodes and {size(change.logical_bytes)} (shared, nothing copied)"
        f" in {time.monotonic() - started:.2f} s"
    )
    return 0


async def snapshot_delete(cluster: Cluster, out: Output, parent: int, name: str) -> int:
    fs = _mounted(cluster, "snapshot --delete")
    started = time.monotonic()
    try:
        change = await fs.remove_tree(parent, os.fsencode(name), _reporter(out, "entries"))
    except DfsError as error:
        raise UserError(os.strerror(error.errno)) from None
    cluster.quotas_changed()
    out.progress(len(change.inodes), len(change.inodes), "entries")
    out.line(
        f"removed {len(change.inodes)} inodes in {time.monotonic() - started:.2f} s;"
        " what no other file shares is freed by the garbage collector"
    )
    return 0


async def trash_empty(cluster: Cluster, out: Output, older_than_days: float = 0.0) -> int:
    """Remove from the trash for good the files deleted over `older_than_days` ago (all with 0)."""
    fs = _mounted(cluster, "trash empty")
    if not 0 <= older_than_days <= 36500:
        raise UserError("--older-than must be a number of days from 0 to 36500")
    cutoff_ns = time.time_ns() - int(older_than_days * DAY_NS)
    doomed = [entry for entry in await cluster.meta.trash_entries() if entry.deleted_ns <= cutoff_ns]
    what = "files removed from the trash"
    await purge(fs, doomed, lambda done, total: out.progress(done, total, what))
    out.line(f"trash: {len(doomed)} files ({size(sum(entry.size for entry in doomed))}) removed for good")
    return 0


# The operations on the mounted tree, by the name the control socket asks for.
TREE_OPERATIONS: dict[str, Operation] = {
    "snapshot": snapshot,
    "snapshot delete": snapshot_delete,
    "trash empty": trash_empty,
}
