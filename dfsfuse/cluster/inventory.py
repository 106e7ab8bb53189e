"""Listing what is where: the replicas each node store holds, the live shards
the metadata lists, and how many of a shard's copies (replicas, or the
fragments of an erasure-coded object) are present and wanted."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

from dfsfuse.errors import NoData, NotFound
from dfsfuse.metadata.base import (
    ERASURE_XATTR,
    REPLICAS_XATTR,
    MetadataStore,
    ShardRecord,
)
from dfsfuse.shards.copies import listed_nodes
from dfsfuse.shards.policy import parse_erasure
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
    or fragment (by listing, not verified); a node missing from `held`
    counts as holding none, an empty fragment slot is no node."""
    return sum(1 for node in listed_nodes(record.ref.nodes) if record.ref.shard_id in held.get(node, ()))


class ReplicaTargets:
    """How many copies each shard should have: an erasure-coded object its
    k + m fragments; a replicated one its file's user.dfs.replicas, or m + 1
    under user.dfs.ec (an object too small to fragment: fragments.py), else
    the configured R. Remembered per inode, for one pass over the shards."""

    def __init__(self, meta: MetadataStore, default: int):
        self._meta = meta
        self._default = default
        self._known: dict[int, int] = {}

    async def of_record(self, record: ShardRecord) -> int:
        """How many copies a shard should have: its fragments, or the most
        replicas that any file sharing it asks for (snapshots share shards)."""
        encoding = record.ref.encoding
        if encoding is not None and encoding.erasure_coded:
            return encoding.fragments
        return max([await self.of(inode) for inode in record.sharers or (record.inode,)])

    async def of(self, inode: int) -> int:
        if inode not in self._known:
            self._known[inode] = await self._replicas_of(inode)
        return self._known[inode]

    async def _replicas_of(self, inode: int) -> int:
        try:
            erasure = parse_erasure((await self._meta.getxattr(inode, ERASURE_XATTR)).decode())
        except (NoData, NotFound):
            erasure = None
        if erasure is not None:
            return erasure[1] + 1
        try:
            return int(await self._meta.getxattr(inode, REPLICAS_XATTR))
        except (NoData, NotFound):
            return self._default
