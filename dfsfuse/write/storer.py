"""Seal an object's bytes, replicate them, and hand back the reference to commit.

The storer is the one place that turns data into a stored object (a whole
shard or a patch): it takes a fresh shard id (ids are never reused: the
metadata engine hands them out in batches, persisted before use) and asks the
replicator to store every replica. Only then may the caller commit the
returned ShardRef to the metadata, so metadata never points at a shard that
was not stored; if the commit is refused, `discard` deletes the replicas.
"""

from __future__ import annotations

import logging

import trio

from ..errors import DfsError
from ..metadata.base import MetadataStore, ShardRef
from ..shards.policy import StoragePolicy
from ..shards.replicator import Replicator

log = logging.getLogger("dfsfuse.storer")

ID_BATCH = 256
PARALLEL_STORES = 4  # objects being replicated at once, across all files


class ShardStorer:
    def __init__(self, meta: MetadataStore, replicator: Replicator, parallel_stores: int = PARALLEL_STORES):
        self._meta = meta
        self._replicator = replicator
        self._ids: range = range(0)
        self._id_lock = trio.Lock()
        self._limiter = trio.CapacityLimiter(parallel_stores)

    async def store(
        self, data: bytes | bytearray | memoryview, sync: bool, policy: StoragePolicy = StoragePolicy()
    ) -> ShardRef:
        """Store `data` as a new object as `policy` says; raises DataError/NoSpace."""
        shard_id = await self._next_id()
        async with self._limiter:
            return await self._replicator.write(shard_id, data, sync, policy)

    async def discard(self, ref: ShardRef) -> None:
        """Delete the replicas of an object no commit points at; fsck deletes
        them later if this fails."""
        try:
            await self._replicator.delete(ref.shard_id, ref.nodes)
        except DfsError as error:
            log.warning("shard %d: could not delete uncommitted replicas (fsck will): %s", ref.shard_id, error)

    async def _next_id(self) -> int:
        async with self._id_lock:
            if not self._ids:
                self._ids = await self._meta.allocate_shard_ids(ID_BATCH)
            shard_id = self._ids[0]
            self._ids = self._ids[1:]
            return shard_id
