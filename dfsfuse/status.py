"""`dfsfuse status`: the node stores, usage, and shards short of replicas.

It reads the metadata and lists each node store, so it works whether or not
the file system is mounted (SQLite in WAL mode lets it read beside a mount).
A shard counts as under-replicated when fewer than R of the stores its
metadata names hold a replica; checksums are `dfsfuse fsck`'s job.
"""

from __future__ import annotations

import trio

from .config import Config
from .datadir import mount_state, require_file_system
from .errors import DfsError
from .metadata.base import MetadataStore
from .storage.base import NodeStore

LIST_PAGE = 10_000
SHARD_PAGE = 10_000


def status(config: Config) -> int:
    require_file_system(config)
    print(f"data dir {config.data_dir}: {mount_state(config)}")
    return trio.run(_status, config)


async def replica_ids(store: NodeStore) -> set[int]:
    """Every shard id the store holds, read page by page."""
    ids: set[int] = set()
    after = -1
    while True:
        page = await store.list(after, LIST_PAGE)
        ids.update(page)
        if len(page) < LIST_PAGE:
            return ids
        after = page[-1]


async def _status(config: Config) -> int:
    from .runtime import open_components

    async with open_components(config, cached=False) as parts:
        held: dict[str, set[int]] = {}
        for store in parts.stores:
            try:
                info = await store.stat()
                held[store.name] = await replica_ids(store)
            except DfsError as error:
                print(f"node {store.name} {_where(config, store.name)}: unreachable: {error}")
                continue
            print(
                f"node {store.name} {_where(config, store.name)}: {info.shards} shards, "
                f"{info.used} bytes used, {info.free} bytes free"
            )
        usage = await parts.meta.usage()
        under = await _under_replicated(parts.meta, held, config.replicas)
        print(f"inodes: {usage.inodes}")
        print(f"logical bytes: {usage.logical_bytes}")
        print(f"stored bytes: {usage.stored_bytes} (x{config.replicas} replicas)")
        print(f"shards: {usage.shards}")
        print(f"under-replicated shards: {under}")
    return 0


def _where(config: Config, name: str) -> str:
    return next(str(node.path) for node in config.nodes if node.name == name)


async def _under_replicated(meta: MetadataStore, held: dict[str, set[int]], replicas: int) -> int:
    count = 0
    after = -1
    while True:
        page = await meta.shards(after, SHARD_PAGE)
        for record in page:
            copies = sum(1 for node in record.ref.nodes if record.ref.shard_id in held.get(node, ()))
            if copies < replicas:
                count += 1
        if len(page) < SHARD_PAGE:
            return count
        after = page[-1].ref.shard_id
