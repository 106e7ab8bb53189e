"""The mount's background repair: now and then, find the shards short of
replicas (a node gone, a write that met only its quorum) and repair them,
most-endangered first, a few per second so that the application keeps the
bandwidth. It yields to a command asking the mount for an operation. With
many mounts, a pass runs where ROLE_MAINTENANCE can be taken at the time,
so in one place at a time; the others skip theirs."""

from __future__ import annotations

import logging

import trio

from dfsfuse.cluster.inventory import ReplicaTargets
from dfsfuse.cluster.maintenance import RepairTally, endangered_shards, repair_shard
from dfsfuse.cluster.operations import Cluster, maintenance_turn
from dfsfuse.errors import DfsError

log = logging.getLogger("dfsfuse.autorepair")

REPAIR_INTERVAL = 60.0  # seconds between two looks; a node away for less is not worth re-replicating
REPAIR_RATE = 4.0  # shards repaired per second, at most


async def repair_pass(cluster: Cluster, lock: trio.Lock, rate: float = REPAIR_RATE) -> RepairTally:
    """One look for endangered shards and their repair; stops early when an
    operation waits for `lock` (the next pass picks up the rest)."""
    tally = RepairTally()
    async with maintenance_turn(cluster.meta, lock, wait=0) as held:
        if not held:
            return tally  # another process is at it
        targets = ReplicaTargets(cluster.meta, cluster.replicas)
        short = await endangered_shards(cluster.meta, cluster.replicator.stores, targets)
        if short:
            log.info("%d shards are short of replicas; repairing", len(short))
        for record in short:
            if lock.statistics().tasks_waiting:
                log.info("background repair yields to a command after %d shards", tally.shards)
                break
            await repair_shard(cluster.meta, cluster.replicator, record, await targets.of_record(record), tally)
            await trio.sleep(1 / rate)
    if tally.shards:
        log.info("background repair: %d shards, %d replicas repaired, %d unrecoverable",
                 tally.shards, tally.repaired, tally.unrecoverable)
    for line in tally.lost:
        log.error("background repair: %s", line)
    return tally


async def background_repair(
    cluster: Cluster,
    lock: trio.Lock,
    interval: float = REPAIR_INTERVAL,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """A repair pass every `interval` seconds, until cancelled."""
    task_status.started()
    while True:
        await trio.sleep(interval)
        try:
            await repair_pass(cluster, lock)
        except DfsError as error:
            log.warning("background repair pass failed: %s", error)
