"""`dfsfuse status`: the node stores, usage, and shards short of replicas.

It reads the metadata and lists each node store, so it works whether or not
the file system is mounted (SQLite in WAL mode lets it read beside a mount).
The sessions are the mounts using the file system, wherever they run.
A shard counts as under-replicated when fewer of the stores its metadata
names hold a replica than its file's replica count (user.dfs.replicas, else
R); checksums are `dfsfuse scrub`'s and `dfsfuse fsck`'s job. A node's
metadata snapshots (dfsfuse.cluster.snapshots) are counted apart from its shards.
"""

from __future__ import annotations

import time

import trio

from .cluster.heartbeat import probe
from .cluster.inventory import ReplicaTargets, live_shards, present_copies, replica_ids
from .cluster.registry import describe_address
from .cluster.snapshots import is_snapshot_id
from .config import Config
from .datadir import mount_state, require_file_system
from .errors import DfsError


def status(config: Config) -> int:
    require_file_system(config)
    print(f"data dir {config.data_dir}: {mount_state(config)}")
    return trio.run(_status, config)


async def _status(config: Config) -> int:
    from .runtime import open_components

    async with open_components(config, cached=False) as parts:
        answers = await probe(parts.stores)
        held: dict[str, set[int]] = {}
        for node, store in zip(parts.nodes, parts.stores):
            where = describe_address(node.address)
            info = answers[store.name]
            if info is None:
                print(f"node {store.name} {where}: unreachable: no answer; {node.state}, down")
                continue
            try:
                held[store.name] = await replica_ids(store)
            except DfsError as error:
                print(f"node {store.name} {where}: unreachable: {error}; {node.state}, down")
                continue
            snapshots = sum(1 for shard_id in held[store.name] if is_snapshot_id(shard_id))
            print(
                f"node {store.name} {where}: {info.shards - snapshots} shards, {snapshots} metadata snapshots, "
                f"{info.used} bytes used, {info.free} bytes free; {node.state}, alive"
            )
        usage = await parts.meta.usage()
        under = 0
        targets = ReplicaTargets(parts.meta, config.replicas)
        async for record in live_shards(parts.meta):
            if present_copies(record, held) < await targets.of(record.inode):
                under += 1
        print(f"inodes: {usage.inodes}")
        print(f"logical bytes: {usage.logical_bytes}")
        print(f"stored bytes: {usage.stored_bytes} (x{config.replicas} replicas)")
        print(f"shards: {usage.shards}")
        print(f"under-replicated shards: {under}")
        for session in await parts.meta.list_sessions():
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(session.started_ns / 1e9))
            print(
                f"session {session.id}: {session.host} pid {session.pid} at {session.mountpoint},"
                f" since {started}, last heartbeat {max(0.0, (time.time_ns() - session.heartbeat_ns) / 1e9):.0f} s ago"
            )
    return 0
