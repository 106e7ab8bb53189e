"""Replicated, verified shard I/O over a set of node stores.

A write encodes a shard once (dfsfuse.shards.replica) and stores the same
buffers on R stores chosen by rendezvous hashing, in parallel. A read fetches
only the blocks it needs (and their checksums) from the first replica that
verifies, failing over to the next; replicas found missing or corrupt on the
way are queued for the background repair worker, which rewrites them from a
verified copy.

The set of stores can change while the replicator runs (update_nodes): reads
use any store a ShardRef names, while new replicas go only to the stores
marked writable (active and answering). A write succeeds once W (the write
quorum) of its R replicas are stored; the shard is then under-replicated
until a repair (dfsfuse repair, or the mount's background repair) adds the
rest.

An erasure-coded object (user.dfs.ec, or an encoding with fragments) is
handed to Fragments (fragments.py) by write, read, repair, move_to and
sync_durably: k + m fragments on distinct stores, any k of which give it
back. Delete, sync and garbage work on its nodes like on replicas, skipping
empty fragment slots.

A store that cannot be reached is not a bad replica: reads skip it but do not
queue a repair, because during an outage every read of its shards would
otherwise trigger a full repair that cannot succeed. fsck calls repair() with
relocate=True to move replicas off stores that stay away.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Sequence

import trio

from dfsfuse import metrics
from dfsfuse.errors import DataError, DfsError, NoSpace, ShardMissing, StoreUnavailable
from dfsfuse.metadata.base import ShardRef
from dfsfuse.shards import erasure, replica
from dfsfuse.shards.copies import (
    RepairResult,
    hash_work,
    is_erasure_coded,
    listed_nodes,
    needed_copies,
    timed,
    write_failure,
)
from dfsfuse.shards.encoding import Encoding, copy_length
from dfsfuse.shards.fragments import Fragments
from dfsfuse.shards.objects import ObjectCodec
from dfsfuse.shards.placement import place
from dfsfuse.shards.policy import StoragePolicy
from dfsfuse.storage.base import Buffer, NodeStore

logger = logging.getLogger("dfsfuse.replicator")

DEFAULT_REPAIR_QUEUE_SIZE = 1000


class Replicator:
    """Puts, reads, repairs, deletes and syncs the replicas of shards."""

    def __init__(
        self,
        stores: Sequence[NodeStore],
        replicas: int,
        block_size: int = replica.DEFAULT_BLOCK_SIZE,
        *,
        write_quorum: int | None = None,
        repair_queue_size: int = DEFAULT_REPAIR_QUEUE_SIZE,
        codec: ObjectCodec | None = None,
    ):
        if not 1 <= replicas <= len(stores):
            raise ValueError(f"cannot keep {replicas} replicas on {len(stores)} stores")
        write_quorum = replicas if write_quorum is None else write_quorum
        if not 1 <= write_quorum <= replicas:
            raise ValueError(f"write quorum {write_quorum} must be between 1 and {replicas}")
        if block_size <= 0:
            raise ValueError(f"block size {block_size} must be positive")
        self._stores: dict[str, NodeStore] = {}
        self._writable: list[str] = []
        self.update_nodes(stores, [store.name for store in stores])
        self._replicas = replicas
        self._write_quorum = write_quorum
        self._block_size = block_size
        self.codec = codec or ObjectCodec()
        self._repair_send, self._repair_receive = trio.open_memory_channel[ShardRef](repair_queue_size)
        self._repair_pending: set[int] = set()
        self._fragments = Fragments(block_size, self._queue_repair)

    def update_nodes(self, stores: Sequence[NodeStore], writable: Sequence[str]) -> None:
        """Read from `stores` from now on, and put new replicas only on the
        stores named in `writable`."""
        names = [store.name for store in stores]
        if len(set(names)) != len(names):
            raise ValueError(f"store names must be unique: {names}")
        self._stores = {store.name: store for store in stores}
        self._writable = [name for name in dict.fromkeys(writable) if name in self._stores]

    @property
    def stores(self) -> list[NodeStore]:
        """Every store reads may use."""
        return list(self._stores.values())

    @property
    def writable(self) -> list[str]:
        """The stores new replicas may go to."""
        return list(self._writable)

    async def capacity(self) -> tuple[int, int]:
        """(capacity, free) bytes of the disks under the stores, each disk
        counted once however many stores share it; a store that does not
        answer is left out (and logged)."""
        by_device: dict[str, tuple[int, int]] = {}
        for store in self._stores.values():
            try:
                info = await store.stat()
            except DfsError as error:
                logger.warning("node store %s does not report its capacity: %s", store.name, error)
                continue
            by_device[info.device or store.name] = (info.capacity, info.free)
        return sum(c for c, _ in by_device.values()), sum(f for _, f in by_device.values())

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The repair worker: repairs shards that reads found bad, one at a time.

        Start it with `await nursery.start(replicator.run)`; it runs until the
        nursery is cancelled.
        """
        task_status.started()
        async for ref in self._repair_receive:
            try:
                result = await self.repair(ref)
            finally:
                self._repair_pending.discard(ref.shard_id)
            logger.info("shard %d: repair done: %s", ref.shard_id, result)

    # -- writing -----------------------------------------------------------
    async def write(
        self, shard_id: int, data: Buffer, sync: bool, policy: StoragePolicy = StoragePolicy(), *, raw: bool = False
    ) -> ShardRef:
        """Store `data` as the object `shard_id` as `policy` says (compressed,
        and sealed when the file system has a key, unless `raw`) on
        `policy.replicas` (default R) stores, or erasure coded with
        `policy.erasure` (fragments.py; an object too small to be worth
        fragmenting gets m + 1 replicas), and return where it is.

        Writable stores are tried in placement order: one that is unavailable
        or full is replaced by the next. If fewer than the write quorum
        (W, at most the replica count) can be made, the ones made are deleted and
        NoSpace (every failure was NoSpace) or DataError is raised; between W
        and the replica count the write succeeds with the shard under-replicated.
        """
        wanted = policy.replicas or self._replicas
        view = memoryview(data).cast("B")
        checksum, encoding, payload = await hash_work(
            len(view), self._encode, shard_id, view, "" if raw else policy.compression, raw
        )
        if policy.erasure is not None and not raw:
            k, m = policy.erasure
            if erasure.worth_fragmenting(len(payload), k):
                if encoding is None:  # nothing changed the bytes: the payload is the plain bytes
                    encoding = Encoding(len(payload), checksum)
                ref = ShardRef(shard_id, len(view), checksum, (), encoding=encoding)
                return await self._fragments.write(self._stores, self._writable, ref, payload, (k, m), sync)
            wanted = m + 1  # too small to fragment: replicas that survive as many losses
        quorum = min(self._write_quorum, wanted)
        parts = replica.encode(payload, self._block_size, checksum if encoding is None else encoding.payload_checksum)
        order = place(shard_id, self._writable)
        placed, failures = await self._put_to_first_available(shard_id, parts, order, wanted, sync)
        if len(placed) < quorum:
            await self._delete_quietly(shard_id, placed)
            raise write_failure(shard_id, len(placed), wanted, quorum, "replicas", failures)
        if len(placed) < wanted:
            metrics.UNDER_REPLICATED_WRITES.inc()
            logger.warning("shard %d: stored %d of %d replicas; under-replicated until repaired",
                           shard_id, len(placed), wanted)
        return ShardRef(
            shard_id, len(view), checksum, tuple(name for name in order if name in placed), encoding=encoding
        )

    def _encode(
        self, shard_id: int, data: memoryview, compression: str, raw: bool
    ) -> tuple[bytes, Encoding | None, Buffer]:
        if raw:
            return ObjectCodec().encode(shard_id, data, "")
        return self.codec.encode(shard_id, data, compression)

    async def _put_to_first_available(
        self, shard_id: int, parts: Sequence[Buffer], candidates: Sequence[str], count: int, sync: bool
    ) -> tuple[list[str], list[DfsError]]:
        """Put the replica on `count` of `candidates`, preferring earlier ones.

        Returns the stores that took it and the failures met on the way.
        """
        remaining = iter(candidates)
        placed: list[str] = []
        failures: list[DfsError] = []

        async def fill_one_slot() -> None:
            # The tasks share `remaining`, so a task whose store fails moves on
            # to the next store that no task has tried yet.
            for name in remaining:
                try:
                    with timed(name, "put"):
                        await self._stores[name].put(shard_id, parts, sync)
                except (StoreUnavailable, NoSpace) as exc:
                    logger.warning("shard %d: node %r cannot take a replica: %s", shard_id, name, exc)
                    metrics.NODE_ERRORS.labels(name, "full" if isinstance(exc, NoSpace) else "unavailable").inc()
                    failures.append(exc)
                else:
                    metrics.NODE_BYTES.labels(name, "put").inc(sum(len(part) for part in parts))
                    placed.append(name)
                    return

        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(fill_one_slot)
        return placed, failures

    # -- reading -----------------------------------------------------------
    async def read(self, ref: ShardRef, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) of the shard, cut short at its end.

        Reads only the blocks the range touches from the first replica in
        ref.nodes that verifies; a whole-shard read also checks ref.checksum.
        An encoded object (compressed, sealed, erasure coded) is read whole
        (from any k fragments), verified, decoded and checked against
        ref.checksum, then cut to the range. Raises DataError if no replica
        (fewer than k fragments) is good.
        """
        if offset < 0 or length < 0:
            raise ValueError(f"invalid range ({offset}, {length})")
        length = min(length, ref.length - offset)
        if length <= 0:
            return b""
        if is_erasure_coded(ref):
            return (await self._read_erasure_coded(ref))[offset : offset + length]
        whole = offset == 0 and length == ref.length
        failures: list[str] = []
        found_bad_replica = False
        for node in ref.nodes:
            store = self._stores.get(node)
            if store is None:
                logger.warning("shard %d: node %r is not a configured store; skipping it", ref.shard_id, node)
                failures.append(f"{node}: not a configured store")
                continue
            try:
                with timed(node, "read"):
                    if ref.encoding is not None:
                        data = (await self._read_decoded(store, ref))[offset : offset + length]
                    elif whole:
                        data = await self._read_whole(store, ref)
                    else:
                        data = await self._read_range(store, ref, offset, length)
            except StoreUnavailable as exc:
                logger.warning("shard %d: node %r unavailable, trying the next replica: %s", ref.shard_id, node, exc)
                metrics.NODE_ERRORS.labels(node, "unavailable").inc()
                failures.append(f"{node}: {exc}")
            except (ShardMissing, replica.ReplicaCorrupt) as exc:
                logger.warning("shard %d: bad replica on node %r, trying the next one: %s", ref.shard_id, node, exc)
                metrics.NODE_ERRORS.labels(node, "bad replica").inc()
                failures.append(f"{node}: {exc}")
                found_bad_replica = True
            else:
                metrics.NODE_BYTES.labels(node, "read").inc(len(data))
                if found_bad_replica:
                    self._queue_repair(ref)
                return data
        raise DataError(f"shard {ref.shard_id}: no good replica: " + "; ".join(failures))

    async def _read_whole(self, store: NodeStore, ref: ShardRef) -> bytes:
        head, data = await self._read_replica(store, ref)
        await self._verify(ref, head, data)
        return data

    async def _read_decoded(self, store: NodeStore, ref: ShardRef) -> bytes:
        """The plain bytes of an encoded object from one store's replica."""
        payload = await self._read_whole(store, ref)
        return await hash_work(max(len(payload), ref.length), self.codec.decode, ref, payload)

    async def _read_erasure_coded(self, ref: ShardRef) -> bytes:
        """The plain bytes of an erasure-coded object, from any k fragments."""
        payload = await self._fragments.read_payload(self._stores, ref)
        try:
            return await hash_work(max(len(payload), ref.length), self.codec.decode, ref, payload)
        except replica.ReplicaCorrupt as error:
            raise DataError(f"shard {ref.shard_id}: {error}") from None

    async def _verify(self, ref: ShardRef, head: Buffer, data: Buffer) -> None:
        """Check a whole replica (header and table, data) of the object against its ref."""
        encoding = ref.encoding
        checksum = ref.checksum if encoding is None else encoding.payload_checksum
        await hash_work(
            len(data), replica.verify_replica, head, data, checksum, copy_length(ref.length, encoding)
        )

    async def _read_range(self, store: NodeStore, ref: ShardRef, offset: int, length: int) -> bytes:
        window = replica.block_window(ref.length, self._block_size, offset, length)
        table_entries, blocks = await store.read(ref.shard_id, [window.table_range, window.data_range])
        await hash_work(len(blocks), replica.verify_blocks, window, table_entries, blocks)
        start = offset - window.data_start
        if start == 0 and length == len(blocks):
            return blocks
        return blocks[start : start + length]

    async def _read_replica(self, store: NodeStore, ref: ShardRef) -> tuple[bytes, bytes]:
        """The whole replica as (header and block table, data), unverified."""
        split = replica.data_offset(copy_length(ref.length, ref.encoding), self._block_size)
        head, data = await store.read(ref.shard_id, [(0, split), (split, -1)])
        return head, data

    def _queue_repair(self, ref: ShardRef) -> None:
        if ref.shard_id in self._repair_pending:
            return
        try:
            self._repair_send.send_nowait(ref)
        except trio.WouldBlock:
            logger.warning("shard %d: repair queue full, not queued (fsck or scrub will find it)", ref.shard_id)
        else:
            self._repair_pending.add(ref.shard_id)

    # -- repair --------------------------------------------------------------
    async def repair(self, ref: ShardRef, *, relocate: bool = False, replicas: int | None = None) -> RepairResult:
        """Verify every replica in full and rewrite the missing or corrupt ones.

        Bad replicas are rewritten in place from a verified one, with sync.
        With `relocate`, while fewer than `replicas` (default R) verified
        replicas are on writable stores (others are unavailable, full, not
        configured, or being drained), more are made on the next writable
        stores in placement order; the caller records the result's `nodes`.
        An erasure-coded object's fragments are repaired by Fragments.repair
        (its `replicas` are its k + m fragments).
        """
        if is_erasure_coded(ref):
            return await self._fragments.repair(self._stores, self._writable, ref, relocate)
        good: list[str] = []
        missing: list[str] = []
        corrupt: list[str] = []
        unreachable: list[str] = []
        good_replica: list[Buffer] = []

        async def check(node: str) -> None:
            store = self._stores.get(node)
            if store is None:
                logger.warning("shard %d: node %r is not a configured store", ref.shard_id, node)
                unreachable.append(node)
                return
            try:
                head, data = await self._read_replica(store, ref)
                await self._verify(ref, head, data)
            except ShardMissing:
                logger.warning("shard %d: replica missing on node %r", ref.shard_id, node)
                missing.append(node)
            except replica.ReplicaCorrupt as exc:
                logger.warning("shard %d: corrupt replica on node %r: %s", ref.shard_id, node, exc)
                corrupt.append(node)
            except StoreUnavailable as exc:
                logger.warning("shard %d: node %r unavailable: %s", ref.shard_id, node, exc)
                unreachable.append(node)
            else:
                good.append(node)
                if not good_replica:
                    good_replica.extend((head, data))

        async with trio.open_nursery() as nursery:
            for node in dict.fromkeys(ref.nodes):
                nursery.start_soon(check, node)

        if not good_replica:
            logger.error("shard %d: unrecoverable, no replica verifies on %s", ref.shard_id, ref.nodes)
            return RepairResult(ref.shard_id, 0, len(missing), len(corrupt), len(unreachable), 0, ())

        rewritten: list[str] = []

        async def rewrite(node: str) -> None:
            try:
                await self._stores[node].put(ref.shard_id, good_replica, sync=True)
            except (StoreUnavailable, NoSpace) as exc:
                logger.warning("shard %d: could not rewrite the replica on node %r: %s", ref.shard_id, node, exc)
            else:
                logger.info("shard %d: rewrote the replica on node %r", ref.shard_id, node)
                rewritten.append(node)

        async with trio.open_nursery() as nursery:
            for node in missing + corrupt:
                nursery.start_soon(rewrite, node)

        holders = set(good) | set(rewritten)
        nodes = tuple(node for node in ref.nodes if node in holders)
        relocated: list[str] = []
        wanted = replicas or self._replicas
        on_writable = sum(1 for node in nodes if node in self._writable)
        if relocate and on_writable < wanted:
            candidates = [name for name in place(ref.shard_id, self._writable) if name not in ref.nodes]
            relocated, _ = await self._put_to_first_available(
                ref.shard_id, good_replica, candidates, wanted - on_writable, sync=True
            )
            nodes += tuple(name for name in candidates if name in relocated)
            logger.info("shard %d: new replicas on %s", ref.shard_id, relocated)
        metrics.REPAIRED_REPLICAS.inc(len(rewritten) + len(relocated))
        return RepairResult(
            ref.shard_id,
            good=len(good),
            missing=len(missing),
            corrupt=len(corrupt),
            unreachable=len(unreachable),
            repaired=len(rewritten) + len(relocated),
            nodes=nodes,
        )

    # -- moving ------------------------------------------------------------
    async def copy(self, ref: ShardRef, targets: Sequence[str]) -> list[str]:
        """Put a verified replica of the shard on each of `targets`, with sync.

        Returns the targets that took it (a target that is unavailable or full
        is left out). Raises DataError if no replica ref.nodes names verifies.
        """
        source: list[Buffer] = []
        for node in ref.nodes:
            store = self._stores.get(node)
            if store is None:
                continue
            try:
                head, data = await self._read_replica(store, ref)
                await self._verify(ref, head, data)
            except (StoreUnavailable, ShardMissing, replica.ReplicaCorrupt) as exc:
                logger.warning("shard %d: cannot copy from node %r: %s", ref.shard_id, node, exc)
                continue
            source = [head, data]
            break
        if not source:
            raise DataError(f"shard {ref.shard_id}: no good replica to copy from {ref.nodes}")
        failures = await self._on_each_store(targets, lambda store: store.put(ref.shard_id, source, sync=True))
        for node, error in failures.items():
            logger.warning("shard %d: could not copy to node %r: %s", ref.shard_id, node, error)
        return [name for name in dict.fromkeys(targets) if name not in failures]

    async def move_to(self, ref: ShardRef, nodes: Sequence[str]) -> tuple[str, ...]:
        """Make the copies `nodes` names and ref.nodes does not (a replica
        set, or an erasure-coded object's slots), from verified ones, with sync.

        Returns where the object is now: `nodes` if every copy was made, else
        ref.nodes with the copies that were (slot by slot for fragments).
        Raises DataError if there is nothing good to copy from.
        """
        if is_erasure_coded(ref):
            return await self._fragments.copy_to_slots(self._stores, ref, nodes)
        targets = [node for node in nodes if node not in ref.nodes]
        took = await self.copy(ref, targets) if targets else []
        return tuple(nodes) if len(took) == len(targets) else ref.nodes + tuple(took)

    # -- deleting and syncing ----------------------------------------------
    async def delete(self, shard_id: int, nodes: Sequence[str]) -> None:
        """Delete the replicas on `nodes`; absent ones are fine, and so are
        nodes no longer in the set (removed from the cluster, replicas and all).

        Tries every store, then raises StoreUnavailable naming those that failed.
        """
        known = [node for node in nodes if node in self._stores]
        failures = await self._on_each_store(known, lambda store: store.delete(shard_id))
        if failures:
            raise StoreUnavailable(f"shard {shard_id}: could not delete replicas: " + _describe(failures))

    async def delete_many(self, garbage: Sequence[tuple[int, Sequence[str]]]) -> set[int]:
        """Delete the replicas of many shards, given as (shard id, nodes), with
        one call per store; returns the ids whose replicas may not all be gone
        (a store failed: try again later). Nodes no longer in the set are skipped."""
        by_node: dict[str, list[int]] = collections.defaultdict(list)
        for shard_id, nodes in garbage:
            for node in nodes:
                if node in self._stores:
                    by_node[node].append(shard_id)
        failures = await self._on_each_store(list(by_node), lambda store: store.delete_many(by_node[store.name]))
        for node, error in failures.items():
            logger.warning("could not delete %d replicas on %s yet: %s", len(by_node[node]), node, error)
        return {shard_id for node in failures for shard_id in by_node[node]}

    async def sync(self, refs: Sequence[ShardRef]) -> None:
        """Make replicas written with sync=False durable, one call per store.

        Tries every store, then raises StoreUnavailable naming those that failed.
        """
        failures = await self._sync_stores(refs)
        if failures:
            raise StoreUnavailable("could not sync replicas: " + _describe(failures))

    async def sync_durably(self, refs: Sequence[ShardRef]) -> list[ShardRef]:
        """Like sync, for fsync: a replica that cannot be synced (its node died
        since the write) is made again from a verified replica, with sync, on
        the next writable node in placement order; a fragment is rebuilt from
        k others into its slot on such a node.

        Returns the refs whose nodes changed (the caller records them). Raises
        StoreUnavailable if a shard is left with fewer than the write quorum
        of durable replicas (k durable fragments).
        """
        failures = await self._sync_stores(refs)
        if not failures:
            return []
        changed: list[ShardRef] = []
        short: list[str] = []
        for ref in refs:
            if not any(node in failures for node in ref.nodes):
                continue
            if is_erasure_coded(ref):  # a fragment not synced is one more to rebuild
                kept = tuple("" if node in failures else node for node in ref.nodes)
                needed = needed_copies(ref)
            else:
                kept = tuple(node for node in ref.nodes if node not in failures)
                needed = min(self._write_quorum, len(ref.nodes))
            result = await self.repair(dataclasses.replace(ref, nodes=kept), relocate=True, replicas=len(ref.nodes))
            durable = listed_nodes(result.nodes)
            if result.unrecoverable or len(durable) < needed:
                short.append(f"shard {ref.shard_id}: {len(durable)} durable copies on {durable}")
                continue
            logger.warning("shard %d: replicas not synced on %s; durable on %s now",
                           ref.shard_id, [node for node in ref.nodes if node in failures], list(result.nodes))
            changed.append(dataclasses.replace(ref, nodes=result.nodes))
        if short:
            raise StoreUnavailable(
                "could not sync replicas: " + _describe(failures) + "; too few elsewhere: " + "; ".join(short)
            )
        return changed

    async def _sync_stores(self, refs: Sequence[ShardRef]) -> dict[str, str]:
        """Sync the copies of `refs`, one call per store; what went wrong, by store."""
        by_node: dict[str, list[int]] = collections.defaultdict(list)
        for ref in refs:
            for node in listed_nodes(ref.nodes):
                by_node[node].append(ref.shard_id)
        return await self._on_each_store(list(by_node), lambda store: store.sync(by_node[store.name]))

    async def _delete_quietly(self, shard_id: int, nodes: Sequence[str]) -> None:
        """Delete replicas of a failed write; one left behind is an orphan for fsck."""
        for node, error in (await self._on_each_store(nodes, lambda store: store.delete(shard_id))).items():
            logger.warning("shard %d: could not delete a partial replica on node %r: %s", shard_id, node, error)

    async def _on_each_store(
        self, nodes: Sequence[str], operation: Callable[[NodeStore], Awaitable[None]]
    ) -> dict[str, str]:
        """Run `operation(store)` on the stores named `nodes` in parallel;
        returns what went wrong, by store name."""
        failures: dict[str, str] = {}

        async def run_on(node: str) -> None:
            store = self._stores.get(node)
            if store is None:
                failures[node] = "not a configured store"
                return
            try:
                await operation(store)
            except (StoreUnavailable, NoSpace) as exc:
                failures[node] = str(exc)

        async with trio.open_nursery() as nursery:
            for node in dict.fromkeys(nodes):
                nursery.start_soon(run_on, node)
        return failures


def _describe(failures: dict[str, str]) -> str:
    return "; ".join(f"{node}: {error}" for node, error in failures.items())
