"""`dfsfuse fsck`: reconcile the metadata with the node stores, and repair.

It runs only while the file system is not mounted, anywhere (it takes the
data dir's lock, and refuses while the metadata lists a live session; it
reclaims the sessions of mounts that died), and in this order, each step
safe to interrupt and run again:
1. inodes left with no name by a crash are deleted (their shards become garbage),
   and every directory quota's usage is counted again from the tree: one
   that differs from what is recorded is reported and corrected;
2. garbage shards have their replicas deleted;
3. every live shard's replicas are read in full and verified; missing or
   corrupt ones are rewritten from a good replica (and re-placed when their
   store cannot take them), and the metadata records where they now are;
4. replica files that no metadata refers to (orphans, e.g. from a crash between
   storing a shard and committing it) are deleted; metadata snapshots
   (dfsfuse.cluster.snapshots) are not orphans and are left alone.
"""

from __future__ import annotations

import dataclasses

import trio

from .cluster.commands import TerminalOutput
from .cluster.inventory import SHARD_PAGE, ReplicaTargets, live_shards, replica_ids
from .cluster.maintenance import RepairTally, repair_shard
from .cluster.quotas import directory_path
from .cluster.snapshots import is_snapshot_id
from .config import Config
from .datadir import DataDirLock, mountpoint_of, prepare_data_dir, require_file_system
from .errors import DfsError, UserError
from .metadata.base import MetadataStore
from .runtime import open_components


@dataclasses.dataclass
class FsckReport:
    shards: int = 0
    missing: int = 0
    corrupt: int = 0
    orphans: int = 0
    repaired: int = 0
    orphans_removed: int = 0
    unrecoverable: int = 0
    deleted_inodes: int = 0
    quotas_corrected: int = 0

    def summary(self) -> str:
        return (
            f"fsck: {self.shards} shards checked, {self.missing} replicas missing, {self.corrupt} corrupt, "
            f"{self.orphans} orphan; repaired {self.repaired}, removed {self.orphans_removed} orphans, "
            f"{self.unrecoverable} unrecoverable"
        )


def fsck(config: Config) -> int:
    require_file_system(config)
    prepare_data_dir(config)  # with --meta, a machine's first command may make it
    lock = DataDirLock(config.lock_path)
    where = mountpoint_of(config)
    lock.acquire(f"it is mounted{' at ' + where if where else ''}; unmount it first")
    try:
        report = trio.run(_fsck, config)
    finally:
        lock.release()
    print(report.summary())
    return 1 if report.unrecoverable else 0


async def _fsck(config: Config) -> FsckReport:
    report = FsckReport()
    async with open_components(config, cached=False) as parts:
        meta, replicator = parts.meta, parts.replicator
        await _reclaim_sessions(meta, config.session_timeout)
        orphans = await meta.orphan_inodes()
        await meta.delete_inodes(orphans)
        report.deleted_inodes += len(orphans)
        if report.deleted_inodes:
            print(f"deleted {report.deleted_inodes} inodes that had no name left")
        report.quotas_corrected = await _correct_quotas(meta)

        garbage_ids: set[int] = set()
        while batch := [g for g in await meta.garbage(SHARD_PAGE) if g[0] not in garbage_ids]:
            done = []
            for shard_id, nodes in batch:
                try:
                    await replicator.delete(shard_id, nodes)
                    done.append(shard_id)
                except DfsError as error:
                    print(f"garbage shard {shard_id}: {error}")
                    garbage_ids.add(shard_id)
            await meta.forget_garbage(done)

        live: set[int] = set()
        tally = RepairTally()
        targets = ReplicaTargets(meta, config.replicas)
        output = TerminalOutput()
        total = (await meta.usage()).shards
        async for record in live_shards(meta):
            live.add(record.ref.shard_id)
            await repair_shard(meta, replicator, record, await targets.of_record(record), tally)
            output.progress(tally.shards, max(total, tally.shards), "shards verified")
        if tally.shards < total:  # fewer than counted (deleted meanwhile): end the bar all the same
            output.progress(tally.shards, tally.shards, "shards verified")
        report.shards, report.missing, report.corrupt = tally.shards, tally.missing, tally.corrupt
        report.repaired, report.unrecoverable = tally.repaired, tally.unrecoverable
        for line in tally.lost:
            print(line)

        for store in parts.stores:
            try:
                held = await replica_ids(store)
            except DfsError as error:
                print(f"node {store.name}: cannot list replicas: {error}")
                continue
            for shard_id in sorted(held - live - garbage_ids):
                if is_snapshot_id(shard_id):
                    continue
                report.orphans += 1
                try:
                    await store.delete(shard_id)
                    report.orphans_removed += 1
                except DfsError as error:
                    print(f"node {store.name}: orphan shard {shard_id} not removed: {error}")
        await meta.sync()
    return report


async def _correct_quotas(meta: MetadataStore) -> int:
    """Record every quota's usage as counted from the tree; how many differed."""
    wrong = await meta.check_quotas(repair=True)
    for recorded, counted in wrong:
        print(
            f"quota of {await directory_path(meta, recorded.directory)} (inode {recorded.directory}):"
            f" recorded {recorded.used_bytes} bytes, {recorded.used_inodes} inodes;"
            f" counted {counted.used_bytes} bytes, {counted.used_inodes} inodes: corrected"
        )
    return len(wrong)


async def _reclaim_sessions(meta: MetadataStore, timeout: float) -> None:
    """Reclaim the sessions of mounts that died; a UserError if a mount is
    running anywhere, since replicas it stored but has not committed yet
    would look like orphans. (With the embedded engine the data dir's lock
    already keeps mounts away: any session left is a dead one's.)"""
    for stale in await meta.reap_sessions(int(timeout * 1e9) if meta.shared else 0):
        print(f"reclaimed session {stale.id} of {stale.host} pid {stale.pid}, a mount that stopped heartbeating")
    live = await meta.list_sessions()
    if live:
        where = ", ".join(f"{s.host} pid {s.pid} at {s.mountpoint}" for s in live[:3])
        raise UserError(f"{len(live)} mount(s) use this file system ({where}); fsck runs only when none does: unmount them first")
