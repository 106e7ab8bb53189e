"""Seal a shard's bytes, replicate them, and hand back the reference to commit.

The flusher is the one place that turns data into a stored shard: it takes a
fresh shard id (ids are never reused: the metadata engine hands them out in
batches, persisted before use) and asks the replicator to store every replica.
Only then may the caller commit the returned ShardRef to the metadata, so
metadata never points at a shard that was not stored.
"""

from __future__ import annotations

import trio

from ..metadata.base import MetadataStore, ShardRef
from ..shards.replicator import Replicator

ID_BATCH = 256


class Flusher:
    def __init__(self, meta: MetadataStore, replicator: Replicator, parallel_stores: int = 4):
        self._meta = meta
        self._replicator = replicator
        self._ids: range = range(0)
        self._id_lock = trio.Lock()
        self._limiter = trio.CapacityLimiter(parallel_stores)

    async def store(self, data: bytes | bytearray | memoryview, sync: bool, replicas: int | None = None) -> ShardRef:
        """Store `data` as a new shard on `replicas` (default R) node stores;
        raises DataError/NoSpace."""
        shard_id = await self._next_id()
        async with self._limiter:
            return await self._replicator.write(shard_id, data, sync, replicas)

    async def _next_id(self) -> int:
        async with self._id_lock:
            if not self._ids:
                self._ids = await self._meta.allocate_shard_ids(ID_BATCH)
            shard_id = self._ids[0]
            self._ids = self._ids[1:]
            return shard_id
