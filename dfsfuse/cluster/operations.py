"""The cluster operations: node add, drain and remove, rebalance, repair,
scrub, trash empty. Each runs the same way in the mount (asked over the control socket)
and in the `dfsfuse` command itself when nothing is mounted; it reports
through an Output and returns an exit code, or raises UserError to refuse.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

import trio

from dfsfuse.cluster.heartbeat import probe
from dfsfuse.cluster.inventory import ReplicaTargets, live_shards
from dfsfuse.cluster.maintenance import (
    MOVE_BATCH,
    Move,
    MoveTally,
    RepairTally,
    endangered_shards,
    held_replicas,
    move_shards,
    repair_shard,
)
from dfsfuse.cluster.nodeset import NodeSet
from dfsfuse.cluster.registry import NodeAccess, describe_address, open_store
from dfsfuse.config import check_node_name
from dfsfuse.errors import UserError
from dfsfuse.metadata.base import (
    NODE_ACTIVE,
    NODE_DRAINED,
    NODE_DRAINING,
    ROLE_MAINTENANCE,
    MetadataStore,
    NodeRecord,
    ShardRef,
)
from dfsfuse.shards.copies import is_erasure_coded, listed_nodes, needed_copies
from dfsfuse.shards.placement import place
from dfsfuse.shards.replicator import Replicator
from dfsfuse.vfs.filesystem import FileSystem


class Output(Protocol):
    def line(self, text: str) -> None:
        """A line for the person who asked."""

    def progress(self, done: int, total: int, what: str) -> None:
        """`done` of `total` `what` (e.g. "shards moved") are done."""


@dataclasses.dataclass
class Cluster:
    """What an operation works on: the metadata (the mount's cache when
    mounted), the replicator, and the node set that follows the registry."""

    meta: MetadataStore
    replicator: Replicator
    nodes: NodeSet
    replicas: int  # the configured R
    access: NodeAccess  # how to reach a node being added
    # Called after a quota is set or removed (the mount's write path caches them).
    quotas_changed: Callable[[], None] = lambda: None
    fs: FileSystem | None = None  # the mount's POSIX layer (None in a command run without a mount)


Operation = Callable[..., Awaitable[int]]


async def _node(cluster: Cluster, name: str) -> NodeRecord:
    for node in await cluster.meta.nodes():
        if node.name == name:
            return node
    raise UserError(f"there is no node named {name} (see: dfsfuse node list)")


# -- node add / drain / remove -----------------------------------------------------


async def node_add(cluster: Cluster, out: Output, address: str, name: str) -> int:
    """Register an active node at `address` (local:/DIR or HOST:PORT) once it answers."""
    check_node_name(name)
    for node in await cluster.meta.nodes():
        if node.address == address:
            raise UserError(f"{describe_address(address)} is already node {node.name}")
        if node.name == name:
            raise UserError(f"there is already a node named {name}")
    store = await open_store(NodeRecord(name, address, NODE_ACTIVE), cluster.access)
    try:
        answer = (await probe([store]))[name]
    finally:
        await store.close()
    if answer is None:
        raise UserError(f"node {name} at {describe_address(address)} does not answer; not added")
    await cluster.meta.add_node(name, address)
    await cluster.meta.record_node_stat(name, answer.capacity, answer.used, answer.shards, time.time_ns())
    await cluster.nodes.refresh()
    out.line(f"added node {name} at {describe_address(address)}; run `dfsfuse rebalance` to move shards onto it")
    return 0


async def node_drain(cluster: Cluster, out: Output, name: str) -> int:
    """Move every replica off the node, then mark it drained."""
    node = await _node(cluster, name)
    if node.state == NODE_DRAINED:
        out.line(f"node {name} is already drained")
        return 0
    await cluster.meta.set_node_state(name, NODE_DRAINING)
    await cluster.nodes.refresh()  # no new replica goes to it from now on
    targets = ReplicaTargets(cluster.meta, cluster.replicas)
    tally = MoveTally()
    # Writes placed before the refresh may still commit replicas on the node,
    # so look again until a pass finds nothing left to move.
    while moves := await _moves_off(cluster, name, targets):
        await _move_in_batches(cluster, out, moves, tally, "shards moved off " + name)
        if tally.failed:
            break
    for failure in tally.failed:
        out.line(failure)
    if tally.failed:
        out.line(f"node {name} stays draining: {len(tally.failed)} shards could not be moved; run drain again")
        return 1
    await cluster.meta.set_node_state(name, NODE_DRAINED)
    await cluster.nodes.refresh()
    out.line(f"node {name} drained: {tally.moved} shards moved, {tally.copied} replicas copied")
    return 0


async def _moves_off(cluster: Cluster, name: str, targets: ReplicaTargets) -> list[Move]:
    """For each shard with a replica on `name`: the same replicas without it,
    topped up from the writable nodes in placement order. A fragment on
    `name` goes to the first writable node holding no fragment of its
    object (none left: its slot empties, for repair to fill later)."""
    writable = cluster.replicator.writable
    moves = []
    async for record in live_shards(cluster.meta):
        ref = record.ref
        if name not in ref.nodes:
            continue
        free = (candidate for candidate in place(ref.shard_id, writable) if candidate not in ref.nodes)
        if is_erasure_coded(ref):
            moves.append(Move(record, tuple(next(free, "") if node == name else node for node in ref.nodes)))
            continue
        wanted = await targets.of_record(record)
        nodes = list(_without(ref, name))
        for candidate in free:
            if sum(1 for node in nodes if node in writable) >= wanted:
                break
            nodes.append(candidate)
        moves.append(Move(record, tuple(nodes)))
    return moves


def _without(ref: ShardRef, name: str) -> tuple[str, ...]:
    """The shard's nodes without `name` (an erasure-coded object's slot on it empties)."""
    if is_erasure_coded(ref):
        return tuple("" if node == name else node for node in ref.nodes)
    return tuple(node for node in ref.nodes if node != name)


async def node_remove(cluster: Cluster, out: Output, name: str) -> int:
    """Drop the node from the registry, unless it holds the only copy of a
    shard (one of only k fragments of an erasure-coded object).

    Shards that listed it lose that replica or fragment (a drained node
    holds none); `dfsfuse repair` makes them whole again.
    """
    await _node(cluster, name)
    if len(await cluster.meta.nodes()) <= cluster.replicas:
        raise UserError(f"cannot remove node {name}: {cluster.replicas} replicas need as many nodes")
    held = await held_replicas(store for store in cluster.replicator.stores if store.name != name)
    only_here: list[int] = []
    others: list[tuple[int, tuple[str, ...]]] = []
    async for record in live_shards(cluster.meta):
        ref = record.ref
        if name not in ref.nodes:
            continue
        rest = _without(ref, name)
        if sum(1 for node in listed_nodes(rest) if ref.shard_id in held.get(node, ())) >= needed_copies(ref):
            others.append((ref.shard_id, rest))
        else:
            only_here.append(ref.shard_id)
    if only_here:
        raise UserError(
            f"node {name} holds the only copy of {len(only_here)} shards (the first: shard {only_here[0]});"
            f" drain it first: dfsfuse node drain {name}"
        )
    for shard_id, rest in others:
        await cluster.meta.set_shard_nodes(shard_id, rest)
    await cluster.meta.remove_node(name)
    await cluster.meta.sync()
    await cluster.nodes.refresh()
    if others:
        out.line(f"removed node {name}; {len(others)} shards lost a replica: run `dfsfuse repair`")
    else:
        out.line(f"removed node {name}")
    return 0


# -- rebalance, repair, scrub -------------------------------------------------------


async def rebalance(cluster: Cluster, out: Output) -> int:
    """Move the shards whose placement over the writable nodes changed."""
    writable = cluster.replicator.writable
    targets = ReplicaTargets(cluster.meta, cluster.replicas)
    moves: list[Move] = []
    shards = 0
    async for record in live_shards(cluster.meta):
        shards += 1
        wanted = await targets.of_record(record)
        if len(writable) < wanted:
            continue  # cannot be placed in full now; repair will when nodes come back
        nodes = place(record.ref.shard_id, writable)[:wanted]
        if set(nodes) != set(record.ref.nodes):
            moves.append(Move(record, _balanced(record.ref, nodes)))
    tally = MoveTally()
    await _move_in_batches(cluster, out, moves, tally, "shards moved")
    for failure in tally.failed:
        out.line(failure)
    out.line(
        f"rebalance: {tally.moved} of {shards} shards moved ({tally.copied} replicas copied,"
        f" {tally.deleted} deleted), {shards - len(moves)} already in place, {len(tally.failed)} failed"
    )
    return 1 if tally.failed else 0


def _balanced(ref: ShardRef, nodes: list[str]) -> tuple[str, ...]:
    """The node list that puts the shard on `nodes`; for an erasure-coded
    object, its slots with each fragment not on one of `nodes` (or on none)
    given one of `nodes` that holds none."""
    if not is_erasure_coded(ref):
        return tuple(nodes)
    free = iter(node for node in nodes if node not in ref.nodes)
    return tuple(node if node in nodes else next(free) for node in ref.nodes)


async def _move_in_batches(cluster: Cluster, out: Output, moves: list[Move], tally: MoveTally, what: str) -> None:
    for start in range(0, len(moves), MOVE_BATCH):
        await move_shards(cluster.meta, cluster.replicator, moves[start : start + MOVE_BATCH], tally)
        out.progress(min(start + MOVE_BATCH, len(moves)), len(moves), what)


async def repair(cluster: Cluster, out: Output) -> int:
    """Every shard short of its replicas back to them, most-endangered first."""
    targets = ReplicaTargets(cluster.meta, cluster.replicas)
    short = await endangered_shards(cluster.meta, cluster.replicator.stores, targets, ask_each=True)
    tally = RepairTally()
    for done, record in enumerate(short, 1):
        await repair_shard(cluster.meta, cluster.replicator, record, await targets.of_record(record), tally)
        out.progress(done, len(short), "shards repaired")
    for line in tally.lost:
        out.line(line)
    out.line(
        f"repair: {tally.shards} under-replicated shards, {tally.missing} replicas missing, "
        f"{tally.corrupt} corrupt; repaired {tally.repaired}, {tally.unrecoverable} unrecoverable"
    )
    return 1 if tally.unrecoverable else 0


async def scrub(cluster: Cluster, out: Output) -> int:
    """Read and verify every replica of every shard; repair what is bad."""
    targets = ReplicaTargets(cluster.meta, cluster.replicas)
    total = (await cluster.meta.usage()).shards
    tally = RepairTally()
    async for record in live_shards(cluster.meta):
        await repair_shard(cluster.meta, cluster.replicator, record, await targets.of_record(record), tally)
        out.progress(tally.shards, max(total, tally.shards), "shards scrubbed")
    for line in tally.lost:
        out.line(line)
    out.line(
        f"scrub: {tally.shards} shards checked, {tally.missing} replicas missing, "
        f"{tally.corrupt} corrupt; repaired {tally.repaired}, {tally.unrecoverable} unrecoverable"
    )
    return 1 if tally.unrecoverable else 0


MAINTENANCE_WAIT = 600.0  # seconds an operation waits for another process's maintenance to finish
MAINTENANCE_BUSY = (
    f"another mount or command has been repairing or moving replicas for over {MAINTENANCE_WAIT:.0f} s;"
    " try again when it is done (its log says what it does)"
)


@contextlib.asynccontextmanager
async def maintenance_turn(meta: MetadataStore, lock: trio.Lock, wait: float = MAINTENANCE_WAIT) -> AsyncIterator[bool]:
    """This process's turn at maintenance (an operation, a repair pass): the
    mount's `lock`, then ROLE_MAINTENANCE, which one process holds at a time
    however many mounts and commands use the metadata. Yields whether the
    role came within `wait` seconds; it is let go at the end."""
    async with lock:
        held = await meta.try_role(ROLE_MAINTENANCE, wait)
        try:
            yield held
        finally:
            if held:
                with trio.CancelScope(shield=True):
                    await meta.release_role(ROLE_MAINTENANCE)


OPERATIONS: dict[str, Operation] = {
    "node add": node_add,
    "node drain": node_drain,
    "node remove": node_remove,
    "rebalance": rebalance,
    "repair": repair,
    "scrub": scrub,
}
