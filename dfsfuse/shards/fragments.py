"""Erasure-coded objects on the node stores: k + m fragments in slots.

The Replicator hands an object here when its policy (user.dfs.ec) or its
encoding says it is erasure coded. Its payload is split into k data and m
parity fragments (erasure.py); fragment i is a replica container
(replica.py) of its bytes, stored under the object's shard id on node
ShardRef.nodes[i] and verified against Encoding.fragment_checksums[i]. A
slot holding '' has its fragment on no node yet: repair makes it.

Every fragment of an object is on a different node, so losing a node loses
at most one fragment of each object, and any k fragments give it back:

- write: fragment i goes to the i-th writable node in placement order; a
  node that is unavailable or full is replaced by the next one in the
  ranking that no other fragment took. The write succeeds once k fragments
  are stored (the object is readable); with fewer than k + m it is
  under-protected until a repair fills the empty slots.
- read: the data fragments first (their bytes are the payload), then parity
  for the ones that fail; missing or corrupt ones are queued for repair.
- repair: every listed fragment is verified in full; missing and corrupt
  ones are rebuilt from k good ones and written back on their node, and
  with `relocate` the empty slots and those of unreachable nodes are filled
  on writable nodes holding no fragment of the object.
- copy_to_slots (drain, rebalance): a fragment is rebuilt and put on the
  node a slot is given.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence

import trio

from dfsfuse import metrics
from dfsfuse.errors import DataError, DfsError, NoSpace, ShardMissing, StoreUnavailable
from dfsfuse.metadata.base import ShardRef
from dfsfuse.shards import erasure, replica
from dfsfuse.shards.checksum import shard_checksum
from dfsfuse.shards.copies import RepairResult, hash_work, timed, write_failure
from dfsfuse.shards.encoding import Encoding
from dfsfuse.shards.placement import place
from dfsfuse.storage.base import Buffer, NodeStore

logger = logging.getLogger("dfsfuse.fragments")

Stores = Mapping[str, NodeStore]


@dataclasses.dataclass
class _Check:
    """The state of an object's fragments, slot by slot, as reads found them."""

    good: dict[int, Buffer] = dataclasses.field(default_factory=dict)  # slot -> verified fragment
    missing: list[int] = dataclasses.field(default_factory=list)
    corrupt: list[int] = dataclasses.field(default_factory=list)
    unreachable: list[int] = dataclasses.field(default_factory=list)


class Fragments:
    """Writes, reads, repairs and moves the fragments of erasure-coded objects
    on the stores a Replicator passes in with each call."""

    def __init__(self, block_size: int, queue_repair: Callable[[ShardRef], None]):
        self._block_size = block_size
        self._queue_repair = queue_repair

    # -- writing -----------------------------------------------------------
    async def write(
        self,
        stores: Stores,
        writable: Sequence[str],
        ref: ShardRef,
        payload: Buffer,
        erasure_code: tuple[int, int],
        sync: bool,
    ) -> ShardRef:
        """Store `payload`, the payload of `ref` (whose encoding has no
        fragment fields yet), as k + m fragments; return the ref with its
        encoding and slots. Raises NoSpace or DataError with fewer than k."""
        k, m = erasure_code
        assert ref.encoding is not None
        digests, containers = await hash_work(len(payload), self._containers, payload, k, m)
        encoding = dataclasses.replace(
            ref.encoding, data_fragments=k, parity_fragments=m, fragment_checksums=tuple(digests)
        )
        order = place(ref.shard_id, writable)
        placed, failures = await self._put(
            stores, ref.shard_id, containers, dict(zip(range(k + m), order)), order[k + m :], sync
        )
        slots = [placed.get(slot, "") for slot in range(k + m)]
        stored = [node for node in slots if node]
        if len(stored) < k:
            await self._delete_quietly(stores, ref.shard_id, stored)
            raise write_failure(ref.shard_id, len(stored), k + m, k, "fragments", failures)
        if len(stored) < k + m:
            metrics.UNDER_REPLICATED_WRITES.inc()
            logger.warning("shard %d: stored %d of %d fragments; under-protected until repaired",
                           ref.shard_id, len(stored), k + m)
        return dataclasses.replace(ref, nodes=tuple(slots), encoding=encoding)

    def _containers(self, payload: Buffer, k: int, m: int) -> tuple[list[bytes], dict[int, list[Buffer]]]:
        """(fragment checksums, the replica container of each fragment)."""
        digests: list[bytes] = []
        containers: dict[int, list[Buffer]] = {}
        for number, fragment in enumerate(erasure.split(payload, k, m)):
            digests.append(shard_checksum(fragment))
            containers[number] = replica.encode(fragment, self._block_size, digests[-1])
        return digests, containers

    async def _put(
        self,
        stores: Stores,
        shard_id: int,
        containers: Mapping[int, Sequence[Buffer]],
        preferred: Mapping[int, str],
        spares: Iterable[str],
        sync: bool,
    ) -> tuple[dict[int, str], list[DfsError]]:
        """Put each slot's container on its preferred node, or if that one
        cannot take it (or there is none) on the next of `spares` no other
        slot took. Returns the node that took each slot's fragment (slots no
        node took are left out) and the failures met on the way."""
        remaining = iter(spares)
        slots: dict[int, str] = {}
        failures: list[DfsError] = []

        async def fill(slot: int) -> None:
            # The tasks share `remaining`, so a task whose node fails moves on
            # to a spare that no task has tried yet.
            first = [preferred[slot]] if slot in preferred else []
            for name in itertools.chain(first, remaining):
                store = stores.get(name)
                if store is None:
                    continue
                try:
                    with timed(name, "put"):
                        await store.put(shard_id, containers[slot], sync)
                except (StoreUnavailable, NoSpace) as exc:
                    logger.warning("shard %d: node %r cannot take fragment %d: %s", shard_id, name, slot, exc)
                    metrics.NODE_ERRORS.labels(name, "full" if isinstance(exc, NoSpace) else "unavailable").inc()
                    failures.append(exc)
                else:
                    metrics.NODE_BYTES.labels(name, "put").inc(sum(len(part) for part in containers[slot]))
                    slots[slot] = name
                    return

        async with trio.open_nursery() as nursery:
            for slot in containers:
                nursery.start_soon(fill, slot)
        return slots, failures

    # -- reading -----------------------------------------------------------
    async def read_payload(self, stores: Stores, ref: ShardRef) -> bytes:
        """The object's verified payload from any k good fragments, data
        fragments first; queues a repair if a fragment was missing or corrupt.
        Raises DataError if fewer than k verify."""
        encoding = _encoding(ref)
        k = encoding.data_fragments
        check = _Check()
        candidates = iter(slot for slot in _read_order(ref) if ref.nodes[slot] in stores)

        async def fetch_one() -> None:
            for slot in candidates:
                if await self._check_slot(stores, ref, slot, check):
                    return

        async with trio.open_nursery() as nursery:
            for _ in range(k):
                nursery.start_soon(fetch_one)
        if check.missing or check.corrupt:
            self._queue_repair(ref)
        if len(check.good) < k:
            raise DataError(
                f"shard {ref.shard_id}: {len(check.good)} good fragments of {encoding.fragments}, {k} needed"
                f" ({len(check.missing)} missing, {len(check.corrupt)} corrupt,"
                f" {len(check.unreachable) + ref.nodes.count('')} on no node that answers)"
            )
        try:
            return await hash_work(encoding.payload_length, _join, check.good, encoding)
        except replica.ReplicaCorrupt as error:
            raise DataError(f"shard {ref.shard_id}: {error}") from None

    async def _check_slot(self, stores: Stores, ref: ShardRef, slot: int, check: _Check) -> bool:
        """Read and verify one fragment into `check`; whether it is good."""
        node = ref.nodes[slot]
        try:
            with timed(node, "read"):
                fragment = await self._read_fragment(stores[node], ref, slot)
        except StoreUnavailable as exc:
            logger.warning("shard %d: node %r unavailable for fragment %d: %s", ref.shard_id, node, slot, exc)
            metrics.NODE_ERRORS.labels(node, "unavailable").inc()
            check.unreachable.append(slot)
        except ShardMissing:
            logger.warning("shard %d: fragment %d missing on node %r", ref.shard_id, slot, node)
            metrics.NODE_ERRORS.labels(node, "bad replica").inc()
            check.missing.append(slot)
        except replica.ReplicaCorrupt as exc:
            logger.warning("shard %d: corrupt fragment %d on node %r: %s", ref.shard_id, slot, node, exc)
            metrics.NODE_ERRORS.labels(node, "bad replica").inc()
            check.corrupt.append(slot)
        else:
            metrics.NODE_BYTES.labels(node, "read").inc(len(fragment))
            check.good[slot] = fragment
            return True
        return False

    async def _read_fragment(self, store: NodeStore, ref: ShardRef, slot: int) -> bytes:
        encoding = _encoding(ref)
        length = encoding.copy_length
        split = replica.data_offset(length, self._block_size)
        head, data = await store.read(ref.shard_id, [(0, split), (split, -1)])
        await hash_work(len(data), replica.verify_replica, head, data, encoding.fragment_checksums[slot], length)
        return data

    # -- repair --------------------------------------------------------------
    async def repair(self, stores: Stores, writable: Sequence[str], ref: ShardRef, relocate: bool) -> RepairResult:
        """Verify every fragment in full; rebuild the missing and corrupt ones
        from k good ones and write them back on their nodes (with sync). With
        `relocate`, the empty slots and those whose node is unreachable or not
        configured are filled on writable nodes that hold no fragment of the
        object, in placement order, and so are the in-place rewrites that fail."""
        encoding = _encoding(ref)
        k = encoding.data_fragments
        check = _Check()
        listed = [slot for slot, node in enumerate(ref.nodes) if node]
        async with trio.open_nursery() as nursery:
            for slot in listed:
                if ref.nodes[slot] in stores:
                    nursery.start_soon(self._check_slot, stores, ref, slot, check)
                else:
                    logger.warning("shard %d: node %r of fragment %d is not a configured store",
                                   ref.shard_id, ref.nodes[slot], slot)
                    check.unreachable.append(slot)

        def result(repaired: int, nodes: Sequence[str]) -> RepairResult:
            return RepairResult(
                ref.shard_id, len(check.good), len(check.missing), len(check.corrupt), len(check.unreachable),
                repaired, tuple(nodes), needed=k,
            )

        if len(check.good) < k:
            logger.error("shard %d: unrecoverable, %d of %d fragments verify on %s",
                         ref.shard_id, len(check.good), k, ref.nodes)
            return result(0, ref.nodes)
        in_place = {slot: ref.nodes[slot] for slot in check.missing + check.corrupt}
        remake = list(in_place)
        spares: list[str] = []
        if relocate:
            remake += [slot for slot, node in enumerate(ref.nodes) if not node] + check.unreachable
            spares = [name for name in place(ref.shard_id, writable) if name not in ref.nodes]
        if not remake:
            return result(0, ref.nodes)
        containers = await self._rebuilt(ref, check.good, remake)
        made, _ = await self._put(stores, ref.shard_id, containers, in_place, spares, sync=True)
        nodes = list(ref.nodes)
        for slot in remake:
            if slot in made:
                nodes[slot] = made[slot]
            elif slot in in_place:
                nodes[slot] = ""  # known not to hold a good fragment, and none made
        metrics.REPAIRED_REPLICAS.inc(len(made))
        logger.info("shard %d: rebuilt fragments %s; slots now %s", ref.shard_id, remake, nodes)
        return result(len(made), nodes)

    async def _rebuilt(
        self, ref: ShardRef, good: Mapping[int, Buffer], slots: Sequence[int]
    ) -> dict[int, list[Buffer]]:
        encoding = _encoding(ref)
        return await hash_work(
            encoding.copy_length * (len(slots) + encoding.data_fragments), self._rebuild_containers,
            encoding, good, slots,
        )

    def _rebuild_containers(
        self, encoding: Encoding, good: Mapping[int, Buffer], slots: Sequence[int]
    ) -> dict[int, list[Buffer]]:
        """The replica containers of fragments `slots`, rebuilt from `good`
        and checked against their recorded checksums."""
        rebuilt = erasure.rebuild(good, encoding.data_fragments, encoding.parity_fragments, slots)
        containers: dict[int, list[Buffer]] = {}
        for slot, fragment in rebuilt.items():
            checksum = encoding.fragment_checksums[slot]
            if shard_checksum(fragment) != checksum:
                raise DataError(f"fragment {slot} rebuilt from verified fragments does not match its checksum")
            containers[slot] = replica.encode(fragment, self._block_size, checksum)
        return containers

    # -- moving ------------------------------------------------------------
    async def copy_to_slots(self, stores: Stores, ref: ShardRef, nodes: Sequence[str]) -> tuple[str, ...]:
        """Put fragment i on nodes[i] wherever that differs from ref.nodes[i]
        (and is not ''), rebuilt from k verified fragments, with sync.

        Returns the slots as they are now: nodes[i] where it took the
        fragment, or where it is '', ref.nodes[i] elsewhere. Raises DataError
        if fewer than k fragments verify."""
        changed = [slot for slot, node in enumerate(nodes) if node and node != ref.nodes[slot]]
        now = [new if not new else old for old, new in zip(ref.nodes, nodes)]
        if changed:
            containers = await self._rebuilt(ref, await self._good_fragments(stores, ref), changed)
            made, _ = await self._put(stores, ref.shard_id, containers, {slot: nodes[slot] for slot in changed},
                                      (), sync=True)
            for slot, node in made.items():
                now[slot] = node
        return tuple(now)

    async def _good_fragments(self, stores: Stores, ref: ShardRef) -> dict[int, Buffer]:
        """Any k verified fragments (data ones first)."""
        k = _encoding(ref).data_fragments
        check = _Check()
        for slot in _read_order(ref):
            if len(check.good) == k:
                break
            if ref.nodes[slot] in stores:
                await self._check_slot(stores, ref, slot, check)
        if len(check.good) < k:
            raise DataError(f"shard {ref.shard_id}: {len(check.good)} good fragments, {k} needed to copy one")
        return check.good

    async def _delete_quietly(self, stores: Stores, shard_id: int, nodes: Sequence[str]) -> None:
        """Delete the fragments of a failed write; one left behind is an orphan for fsck."""
        for node in nodes:
            try:
                await stores[node].delete(shard_id)
            except DfsError as error:
                logger.warning("shard %d: could not delete a partial fragment on node %r: %s", shard_id, node, error)


def _encoding(ref: ShardRef) -> Encoding:
    if ref.encoding is None or not ref.encoding.erasure_coded:
        raise ValueError(f"shard {ref.shard_id} is not erasure coded")
    return ref.encoding


def _read_order(ref: ShardRef) -> list[int]:
    """The slots to read, data fragments first (joining them needs no decoding)."""
    return [slot for slot, node in enumerate(ref.nodes) if node]


def _join(fragments: Mapping[int, Buffer], encoding: Encoding) -> bytes:
    """The payload from k verified fragments, checked against its checksum."""
    payload = erasure.join(fragments, encoding.data_fragments, encoding.parity_fragments, encoding.payload_length)
    if shard_checksum(payload) != encoding.payload_checksum:
        raise replica.ReplicaCorrupt("payload joined from verified fragments does not match its checksum")
    return payload
