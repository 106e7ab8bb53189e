"""Moving and repairing replicas: the shard-level steps fsck and the cluster
operations (repair, scrub, rebalance, drain) share.

Repairing finds the shards short of replicas cheaply (by listing every node
store, without reading replicas) or verifies every replica (scrub, fsck),
and records where a shard's replicas are after Replicator.repair.

Moving follows the crash protocol of the rest of the file system: data
first, metadata second, deletes last. The new replicas are stored (with
sync), the shard's new node list is committed, the metadata is made durable
(one sync per batch), and only then are the old replicas deleted. A crash
before the commit leaves orphans for fsck; after it, stray old replicas.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence

import trio

from dfsfuse.cluster.inventory import (
    ReplicaTargets,
    live_shards,
    present_copies,
    replica_ids,
)
from dfsfuse.errors import DataError, DfsError, NotFound
from dfsfuse.metadata.base import MetadataStore, ShardRecord
from dfsfuse.shards.copies import needed_copies
from dfsfuse.shards.replicator import Replicator
from dfsfuse.storage.base import NodeStore

log = logging.getLogger("dfsfuse.maintenance")

MOVE_BATCH = 64  # shards moved per metadata sync


@dataclasses.dataclass
class RepairTally:
    shards: int = 0  # shards checked
    missing: int = 0  # replicas found missing
    corrupt: int = 0  # replicas found corrupt
    repaired: int = 0  # replicas rewritten or made elsewhere
    lost: list[str] = dataclasses.field(default_factory=list)  # shards with no good replica left

    @property
    def unrecoverable(self) -> int:
        return len(self.lost)


async def repair_shard(
    meta: MetadataStore, replicator: Replicator, record: ShardRecord, replicas: int, tally: RepairTally
) -> None:
    """Verify and repair one shard's replicas (`replicas` of them on writable
    nodes) and record where they are now.

    A shard deleted meanwhile (NotFound at the record) is left alone: its
    replicas are garbage now, and any replica made for it an orphan for fsck.
    """
    ref = record.ref
    tally.shards += 1
    result = await replicator.repair(ref, relocate=True, replicas=replicas)
    tally.missing += result.missing
    tally.corrupt += result.corrupt
    tally.repaired += result.repaired
    if result.unrecoverable:
        what = "no good replica" if result.needed == 1 else f"{result.good} good fragments, {result.needed} needed"
        tally.lost.append(f"inode {record.inode} shard {ref.shard_id} (index {record.index}): {what}")
    elif result.nodes != ref.nodes:
        try:
            await meta.set_shard_nodes(ref.shard_id, result.nodes)
        except NotFound:
            pass


async def held_replicas(stores: Iterable[NodeStore]) -> dict[str, set[int]]:
    """The shard ids each store holds; a store that cannot be listed is left out."""
    held: dict[str, set[int]] = {}
    for store in stores:
        try:
            held[store.name] = await replica_ids(store)
        except DfsError as error:
            log.warning("node %s: cannot list replicas: %s", store.name, error)
    return held


async def endangered_shards(
    meta: MetadataStore, stores: Iterable[NodeStore], targets: ReplicaTargets, *, ask_each: bool = False
) -> list[ShardRecord]:
    """The shards fewer of whose listed nodes hold a replica (a fragment)
    than their target, those closest to loss first (fewest copies beyond the
    ones needed: 1 replica, k fragments); a store that cannot be reached holds nothing.

    Presence comes from each store's listing, or with `ask_each` from asking
    the store about every replica (slower, but it notices files lost behind
    a store's back, which its listing does not).
    """
    by_name = {store.name: store for store in stores}
    held = {} if ask_each else await held_replicas(by_name.values())
    short: list[tuple[int, ShardRecord]] = []
    async for record in live_shards(meta):
        if ask_each:
            copies = await _replicas_present(by_name, record)
        else:
            copies = present_copies(record, held)
        if copies < await targets.of_record(record):
            short.append((copies - needed_copies(record.ref), record))
    short.sort(key=lambda item: (item[0], item[1].ref.shard_id))
    return [record for _, record in short]


async def _replicas_present(stores: dict[str, NodeStore], record: ShardRecord) -> int:
    present = 0

    async def ask(store: NodeStore) -> None:
        nonlocal present
        try:
            found = await store.exists(record.ref.shard_id)
        except DfsError:
            return
        present += found  # after the await: `present += await ...` would read it before

    async with trio.open_nursery() as nursery:
        for node in dict.fromkeys(record.ref.nodes):
            if node in stores:
                nursery.start_soon(ask, stores[node])
    return present


@dataclasses.dataclass(frozen=True)
class Move:
    """Give a shard the replica set `nodes` (which may share nodes with the
    current one), or an erasure-coded object the fragment slots `nodes`."""

    record: ShardRecord
    nodes: tuple[str, ...]


@dataclasses.dataclass
class MoveTally:
    moved: int = 0  # shards whose replica set is now the wanted one
    copied: int = 0  # replicas made
    deleted: int = 0  # old replicas deleted
    failed: list[str] = dataclasses.field(default_factory=list)  # shards that could not be moved, and why


async def move_shards(meta: MetadataStore, replicator: Replicator, moves: Sequence[Move], tally: MoveTally) -> None:
    """Give each shard its new replica set (fragment slots): copy, commit,
    sync, then delete the old copies no longer listed."""
    retired: list[tuple[int, list[str]]] = []
    for move in moves:
        ref = move.record.ref
        targets = [node for node in move.nodes if node and node not in ref.nodes]
        try:
            nodes = await replicator.move_to(ref, move.nodes)
        except DataError as error:
            tally.failed.append(f"shard {ref.shard_id}: {error}")
            continue
        took = [node for node in targets if node in nodes]
        tally.copied += len(took)
        if len(took) < len(targets):
            tally.failed.append(f"shard {ref.shard_id}: could not copy to {sorted(set(targets) - set(took))}")
            if not took:
                continue
            # Keep what was made: the shard is better off with them listed.
        if not await _set_nodes(meta, ref.shard_id, nodes):
            retired.append((ref.shard_id, took))  # deleted meanwhile: what we copied is an orphan
            continue
        if nodes == move.nodes:
            tally.moved += 1
        retired.append((ref.shard_id, [node for node in ref.nodes if node and node not in nodes]))
    if not retired:
        return
    await meta.sync()  # the new node lists are durable before any old replica goes
    for shard_id, old in retired:
        try:
            await replicator.delete(shard_id, old)
            tally.deleted += len(old)
        except DfsError as error:
            log.warning("shard %d: old replicas not deleted (fsck will): %s", shard_id, error)


async def _set_nodes(meta: MetadataStore, shard_id: int, nodes: tuple[str, ...]) -> bool:
    """Record the shard's nodes; False if the shard is no longer live."""
    try:
        await meta.set_shard_nodes(shard_id, nodes)
    except NotFound:
        return False
    return True
