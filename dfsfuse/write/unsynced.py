"""Replicas stored without fsync, remembered so that an fsync can sync them.

A flush at close stores replicas without fsync (that would make every small
file cost two disk flushes). An fsync of the file, even through another
handle opened later, must make them durable, so they are remembered per
inode until then. Past UNSYNCED_LIMIT remembered in all, they are synced in
the background and forgotten, which bounds the memory this takes.
"""

from __future__ import annotations

import logging

import trio

from dfsfuse.errors import DfsError
from dfsfuse.metadata.base import ShardRef
from dfsfuse.shards.replicator import Replicator

log = logging.getLogger("dfsfuse.unsynced")

UNSYNCED_LIMIT = 65536


class UnsyncedReplicas:
    def __init__(self, replicator: Replicator, nursery: trio.Nursery, limit: int = UNSYNCED_LIMIT):
        self._replicator = replicator
        self._nursery = nursery  # where background syncs run
        self._limit = limit
        self._by_inode: dict[int, dict[int, ShardRef]] = {}
        self._count = 0

    def remember(self, inode: int, ref: ShardRef) -> None:
        self._by_inode.setdefault(inode, {})[ref.shard_id] = ref
        self._count += 1
        if self._count > self._limit:
            everything = [ref for refs in self._by_inode.values() for ref in refs.values()]
            self._by_inode.clear()
            self._count = 0
            self._nursery.start_soon(self._sync_quietly, everything)

    def of(self, inode: int) -> list[ShardRef]:
        """The replicas of `inode` stored without fsync."""
        return list(self._by_inode.get(inode, {}).values())

    def forget(self, inode: int, shard_ids: list[int] | None = None) -> None:
        """Forget the given shards of `inode` (all of them if None)."""
        refs = self._by_inode.get(inode)
        if refs is None:
            return
        for shard_id in list(refs) if shard_ids is None else shard_ids:
            if refs.pop(shard_id, None) is not None:
                self._count -= 1
        if not refs:
            del self._by_inode[inode]

    async def _sync_quietly(self, refs: list[ShardRef]) -> None:
        try:
            await self._replicator.sync(refs)
        except DfsError as error:
            log.warning("background sync of %d replicas failed: %s", len(refs), error)
