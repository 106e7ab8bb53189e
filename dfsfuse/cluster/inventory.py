"""Listing what is where: the replicas each node store holds, the live shards
the metadata lists, and how many of a shard's replicas are present."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

from dfsfuse.errors import NoData, NotFound
from dfsfuse.metadata.base import REPLICAS_XATTR, MetadataStore, ShardRecord
from dfsfuse.storage.base import NodeStore

LIST_PAGE = 10_000
SHARD_PAGE = 10_000


async def listed_ids(store: NodeStore, after: int = -1) -> list[int]:
    """Every id the store holds above `after`, ascending, read page by page."""
    ids: list[int] = []
    while True:
        page = await store.list(after, LIST_PAGE)
        ids.extend(page)
        if len(page) < LIST_PAGE:
            return ids
        after = page[-1]


async def replica_ids(store: NodeStore) -> set[int]:
    """Every shard id the store holds."""
    return set(await listed_ids(store))


async def live_shards(meta: MetadataStore) -> AsyncIterator[ShardRecord]:
    """Every live shard, by shard id, read page by page."""
    after = -1
    while True:
        page = await meta.shards(after, SHARD_PAGE)
        for record in page:
            yield record
        if len(page) < SHARD_PAGE:
            return
        after = page[-1].ref.shard_id


def present_copies(record: ShardRecord, held: Mapping[str, set[int]]) -> int:
    """How many of the nodes the metadata names for the shard hold a replica
    (by listing, not verified); a node missing from `held` counts as holding none."""
    return sum(1 for node in dict.fromkeys(record.ref.nodes) if record.ref.shard_id in held.get(node, ()))


class ReplicaTargets:
    """How many replicas each inode's shards should have: its user.dfs.replicas,
    else the configured R. Remembered per inode, for one pass over the shards."""

    def __init__(self, meta: MetadataStore, default: int):
        self._meta = meta
        self._default = default
        self._known: dict[int, int] = {}

    async def of_record(self, record: ShardRecord) -> int:
        """How many replicas a shard should have: the most that any file
        sharing it asks for (snapshots share shards)."""
        return max([await self.of(inode) for inode in record.sharers or (record.inode,)])

    async def of(self, inode: int) -> int:
        if inode not in self._known:
            try:
                self._known[inode] = int(await self._meta.getxattr(inode, REPLICAS_XATTR))
            except (NoData, NotFound):
                self._known[inode] = self._default
        return self._known[inode]
