"""Metadata snapshots kept on the node stores, so the file system outlives
the machine that mounts it.

Until the metadata lives in a shared engine it lives with the mount. The
mount therefore stores a dump of the whole metadata (MetadataStore.snapshot,
engine-neutral: dfsfuse.metadata.dump) on the node stores, every `snapshot_interval` seconds and at unmount, and
`dfsfuse restore` (dfsfuse.restore) rebuilds a data dir from the newest one.

A snapshot is stored like a shard, through the Replicator, in the replica
file format (docs/formats.md), whose header and block checksums let a
restore verify it without anything else; but on every writable node, not R
of them, because `dfsfuse restore` is given one node, whichever survived,
and metadata is small next to the data it describes. The write succeeds
once W nodes hold it.

Snapshots take shard ids from the range no shard can have: every metadata
engine keeps shard ids as signed 64-bit integers, so shard ids stay below
2**63, while node stores take any unsigned 64-bit id. A snapshot's id is
SNAPSHOT_ID_BASE (2**63) plus the snapshot's time in milliseconds, so the
newest snapshot has the highest id. The newest KEEP_SNAPSHOTS are kept;
older ones are deleted from every store after each new one is written.

On an encrypted file system the dump is sealed under the file system's key
in an envelope that carries the keyring (dfsfuse.shards.sealing), so the
node servers never see the metadata either, and `dfsfuse restore
--key-file` opens it without any other metadata. The replica checksums
cover the sealed bytes: verifying a snapshot needs no key.

Snapshot replicas are not shards of any file: fsck does not count them as
orphans, and drain, rebalance and repair, which walk the metadata's shards,
leave them where they are; the next snapshot is placed on the nodes writable
then, and the deletion of old snapshots reaches every registered node, so a
drained node stops holding snapshots once KEEP_SNAPSHOTS newer ones exist.
"""

from __future__ import annotations

import logging
import time

import trio

from dfsfuse.cluster.inventory import listed_ids
from dfsfuse.errors import DfsError
from dfsfuse.metadata.base import MetadataStore
from dfsfuse.shards import replica
from dfsfuse.shards.policy import StoragePolicy
from dfsfuse.shards.replicator import Replicator
from dfsfuse.shards.sealing import FileSystemKey
from dfsfuse.storage.base import NodeStore

log = logging.getLogger("dfsfuse.snapshots")

SNAPSHOT_ID_BASE = 2**63  # ids at or above are snapshots; shard ids (signed 64-bit in the metadata) stay below
KEEP_SNAPSHOTS = 3
SNAPSHOT_TIMEOUT = 120.0  # seconds the snapshot at unmount may take before the unmount gives up on it


def is_snapshot_id(shard_id: int) -> bool:
    return shard_id >= SNAPSHOT_ID_BASE


def snapshot_time_ns(snapshot_id: int) -> int:
    """When the snapshot was taken (nanoseconds since the epoch)."""
    return (snapshot_id - SNAPSHOT_ID_BASE) * 1_000_000


async def snapshot_ids(store: NodeStore) -> list[int]:
    """The snapshot ids the store holds, oldest first."""
    return await listed_ids(store, after=SNAPSHOT_ID_BASE - 1)


async def read_snapshot(store: NodeStore, snapshot_id: int) -> bytes:
    """The metadata dump in the store's replica of the snapshot, verified
    against the replica's own header and block checksums.

    Raises replica.ReplicaCorrupt if it does not verify, ShardMissing if the
    store has no such replica.
    """
    (whole,) = await store.read(snapshot_id, [(0, -1)])
    header = replica.decode_header(whole)
    split = replica.data_offset(header.length, header.block_size)
    view = memoryview(whole)
    replica.verify_replica(view[:split], view[split:], header.checksum, header.length)
    return whole[split:]


class SnapshotWriter:
    """Writes metadata snapshots through the mount's Replicator and prunes
    old ones; with `key` (an encrypted file system), each is sealed first."""

    def __init__(self, meta: MetadataStore, replicator: Replicator, key: FileSystemKey | None = None):
        self._meta = meta
        self._replicator = replicator
        self._key = key
        self._last_id = 0

    async def write(self) -> int:
        """Store a snapshot of the metadata now, then delete all but the
        newest KEEP_SNAPSHOTS; the new snapshot's id. DfsError if the
        snapshot could not be stored on W nodes."""
        dump = await self._meta.snapshot()
        snapshot_id = max(SNAPSHOT_ID_BASE + time.time_ns() // 1_000_000, self._last_id + 1)
        if self._key is not None:
            dump = await trio.to_thread.run_sync(self._key.seal_snapshot, snapshot_id, dump)
        everywhere = len(self._replicator.writable)
        ref = await self._replicator.write(
            snapshot_id, dump, sync=True, policy=StoragePolicy(replicas=everywhere), raw=True
        )
        self._last_id = snapshot_id
        log.info("metadata snapshot %d (%d bytes) stored on %s", snapshot_id, len(dump), ", ".join(ref.nodes))
        await self._prune()
        return snapshot_id

    async def _prune(self) -> None:
        held: dict[str, list[int]] = {}
        for store in self._replicator.stores:
            try:
                held[store.name] = await snapshot_ids(store)
            except DfsError as error:
                log.warning("node %s: cannot list snapshots to prune them: %s", store.name, error)
        newest = sorted({snapshot_id for ids in held.values() for snapshot_id in ids})[-KEEP_SNAPSHOTS:]
        stores = {store.name: store for store in self._replicator.stores}
        for name, ids in held.items():
            for snapshot_id in ids:
                if snapshot_id not in newest:
                    try:
                        await stores[name].delete(snapshot_id)
                    except DfsError as error:
                        log.warning("node %s: old snapshot %d not deleted: %s", name, snapshot_id, error)

    async def run(self, interval: float, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write a snapshot every `interval` seconds; a failed one is logged
        and the next is tried on time."""
        task_status.started()
        while True:
            await trio.sleep(interval)
            try:
                await self.write()
            except DfsError as error:
                log.warning("metadata snapshot failed (the next one is due in %g s): %s", interval, error)

    async def write_at_unmount(self) -> None:
        """The last snapshot, after every file's data is committed; logged, never raised."""
        with trio.move_on_after(SNAPSHOT_TIMEOUT) as scope:
            try:
                await self.write()
            except DfsError as error:
                log.warning("metadata snapshot at unmount failed: %s", error)
        if scope.cancelled_caught:
            log.warning("metadata snapshot at unmount took more than %g s; given up", SNAPSHOT_TIMEOUT)
