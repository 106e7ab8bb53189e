"""Operations on the mounted tree that `dfsfuse` commands ask of a mount over
its control socket: tree snapshots (`dfsfuse snapshot`) and their removal.

They run in the mount because they go through what only the mount has: its
metadata cache, the file data it holds buffered, and the kernel's caches of
names and attributes, which must forget what changed underneath them. They
take no maintenance turn (they move no replica), so a repair running meanwhile
does not hold them up. Inodes and names come from the command, which found them
with stat(2) through the mount.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Awaitable, Callable

import trio

from dfsfuse.cluster.operations import Cluster, Operation, Output
from dfsfuse.errors import DfsError, UserError
from dfsfuse.metadata.base import ChangeNotice, ProgressReport
from dfsfuse.report import size
from dfsfuse.vfs.filesystem import FileSystem


@dataclasses.dataclass(frozen=True)
class MountedTree:
    """The mount's file system and how to make the kernel forget cached names
    and attributes (the same path other mounts' changes take)."""

    fs: FileSystem
    tell_kernel: Callable[[ChangeNotice], Awaitable[None]]


def _tree(cluster: Cluster) -> MountedTree:
    if cluster.tree is None:
        raise UserError("this operation needs a running mount")  # never asked of a command's own cluster
    return cluster.tree


def _reporter(out: Output, what: str) -> ProgressReport:
    """A ProgressReport that may be called from the engine's transaction thread."""
    token = trio.lowlevel.current_trio_token()
    return lambda done, total: token.run_sync_soon(out.progress, done, total, what)


async def snapshot(cluster: Cluster, out: Output, source: int, parent: int, name: str, readonly: bool) -> int:
    tree = _tree(cluster)
    started = time.monotonic()
    try:
        change = await tree.fs.snapshot_tree(source, parent, os.fsencode(name), readonly, _reporter(out, "entries"))
    except DfsError as error:
        raise UserError(os.strerror(error.errno)) from None
    await tree.tell_kernel(ChangeNotice(inodes=frozenset({parent}), entries=frozenset({(parent, os.fsencode(name))})))
    cluster.quotas_changed()  # the usage of the quotas above it grew
    seconds = time.monotonic() - started
    out.progress(len(change.inodes), len(change.inodes), "entries")
    kind = "read-only snapshot" if readonly else "snapshot"
    out.line(
        f"{kind} of {len(change.inodes)} inodes and {size(change.logical_bytes)} (shared, nothing copied)"
        f" in {seconds:.2f} s"
    )
    return 0


async def snapshot_delete(cluster: Cluster, out: Output, parent: int, name: str) -> int:
    tree = _tree(cluster)
    started = time.monotonic()
    try:
        change = await tree.fs.remove_tree(parent, os.fsencode(name), _reporter(out, "entries"))
    except DfsError as error:
        raise UserError(os.strerror(error.errno)) from None
    await tree.tell_kernel(
        ChangeNotice(inodes=frozenset({parent, *change.inodes}), entries=frozenset({(parent, os.fsencode(name))}))
    )
    cluster.quotas_changed()
    out.progress(len(change.inodes), len(change.inodes), "entries")
    out.line(
        f"removed {len(change.inodes)} inodes in {time.monotonic() - started:.2f} s;"
        " what no other file shares is freed by the garbage collector"
    )
    return 0


# The operations on the mounted tree, by the name the control socket asks for.
TREE_OPERATIONS: dict[str, Operation] = {
    "snapshot": snapshot,
    "snapshot delete": snapshot_delete,
}
