"""Erasure-coded objects through the Replicator, over six LocalStores in
temporary directories (some of which die, fill up or lose files): write,
read from any k fragments, repair, move and sync."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Awaitable, Callable

import pytest
import trio
from test_replicator import DyingStore, FullStore, flip_byte

from dfsfuse.errors import DataError, NoSpace, StoreUnavailable
from dfsfuse.metadata.base import ShardRef
from dfsfuse.shards import erasure, replica, sealing
from dfsfuse.shards.checksum import shard_checksum
from dfsfuse.shards.objects import ObjectCodec
from dfsfuse.shards.placement import place
from dfsfuse.shards.policy import StoragePolicy
from dfsfuse.shards.replicator import Replicator
from dfsfuse.storage.local import LocalStore, replica_name

BLOCK = 4096
NAMES = [f"n{i}" for i in range(7)]
EC = StoragePolicy(erasure=(4, 2))
SIZE = 4 * erasure.MIN_FRAGMENT_BYTES + 12_345  # fragments of a bit over the threshold


class Cluster:
    """Seven stores, the last one a spare (a write uses the first six in its placement)."""

    def __init__(self, tmp_path: pathlib.Path):
        self.tmp_path = tmp_path
        self.stores: dict[str, LocalStore] = {}

    def path(self, name: str, shard_id: int) -> pathlib.Path:
        return self.tmp_path / name / replica_name(shard_id)

    async def open(self, count: int = 6, codec: ObjectCodec | None = None, **types: type[LocalStore]) -> Replicator:
        for name in NAMES[:count]:
            self.stores[name] = await types.get(name, DyingStore).open(name, str(self.tmp_path / name))
            self.stores[name].pack_below = 0  # fragment files, which tests damage on disk
        return Replicator(list(self.stores.values()), 2, BLOCK, codec=codec)

    def lose(self, ref: ShardRef, *slots: int) -> None:
        """Delete the fragment files of these slots behind the stores' backs."""
        for slot in slots:
            self.path(ref.nodes[slot], ref.shard_id).unlink()

    def kill(self, *names: str) -> None:
        for name in names:
            store = self.stores[name]
            assert isinstance(store, DyingStore)
            store.dead = True

    def revive(self, *names: str) -> None:
        for name in names:
            store = self.stores[name]
            assert isinstance(store, DyingStore)
            store.dead = False

    def fragments_verify(self, ref: ShardRef) -> bool:
        try:
            self.assert_fragments_verify(ref)
        except (OSError, replica.ReplicaCorrupt):
            return False
        return True

    def assert_fragments_verify(self, ref: ShardRef) -> None:
        assert ref.encoding is not None
        length = ref.encoding.copy_length
        for slot, name in enumerate(ref.nodes):
            assert name, f"fragment {slot} is on no node: {ref.nodes}"
            file = self.path(name, ref.shard_id).read_bytes()
            split = replica.data_offset(length, BLOCK)
            replica.verify_replica(file[:split], file[split:], ref.encoding.fragment_checksums[slot], length)


def run(tmp_path, body: Callable[[Cluster], Awaitable[None]]) -> None:
    trio.run(body, Cluster(tmp_path))


def shard_placed_first_on(names: list[str], among: list[str]) -> int:
    """A shard id whose placement over `among` starts with `names`, in that order."""
    return next(i for i in range(100_000) if place(i, among)[: len(names)] == names)


def test_write_puts_fragments_on_distinct_nodes_in_placement_order(tmp_path):
    data = os.urandom(SIZE)

    async def body(cluster: Cluster) -> None:
        replicator = await cluster.open()
        ref = await replicator.write(17, data, sync=True, policy=EC)
        encoding = ref.encoding
        assert encoding is not None and (encoding.data_fragments, encoding.parity_fragments) == (4, 2)
        assert ref.nodes == tuple(place(17, NAMES[:6])) and len(set(ref.nodes)) == 6
        assert ref.checksum == shard_checksum(data) and encoding.payload_checksum == shard_checksum(data)
        assert encoding.copy_length == erasure.fragment_length(SIZE, 4)
        cluster.assert_fragments_verify(ref)
        assert await replicator.read(ref, 0, SIZE) == data
        assert await replicator.read(ref, 70_000, 100_000) == data[70_000:170_000]
        assert await replicator.read(ref, SIZE - 5, 100) == data[-5:]

    run(tmp_path, body)


def test_compressed_objects_are_fragmented_after_compression(tmp_path):
    data = os.urandom(SIZE // 2) * 4  # compresses to about half

    async def body(cluster: Cluster) -> None:
        replicator = await cluster.open()
        ref = await replicator.write(5, data, sync=True, policy=StoragePolicy(compression="zstd", erasure=(2, 1)))
        assert ref.encoding is not None and ref.encoding.compression == "zstd" and ref.encoding.erasure_coded
        assert len(ref.nodes) == 3 and ref.encoding.payload_length < len(data)
        assert await replicator.read(ref, 0, len(data)) == data

    run(tmp_path, body)


def test_sealed_payloads_are_fragmented_and_repaired_without_the_key(tmp_path):
    data = (os.urandom(150_000) + b"secret") * 3  # zstd finds the repeats: fragments of 75 KB

    async def body(cluster: Cluster) -> None:
        key = sealing.new_key(b"test passphrase")
        replicator = await cluster.open(codec=ObjectCodec(key))
        ref = await replicator.write(6, data, sync=True, policy=StoragePolicy(compression="zstd", erasure=(2, 2)))
        assert ref.encoding is not None and ref.encoding.sealed and ref.encoding.erasure_coded
        assert not any(b"secret" in cluster.path(name, 6).read_bytes() for name in ref.nodes)
        cluster.lose(ref, 0, 3)
        keyless = Replicator(list(cluster.stores.values()), 2, BLOCK)  # what fsck and scrub run without a key
        assert (await keyless.repair(ref)).repaired == 2
        cluster.assert_fragments_verify(ref)
        with pytest.raises(DataError, match="no key"):
            await keyless.read(ref, 0, 10)
        assert await replicator.read(ref, 0, len(data)) == data

    run(tmp_path, body)


def test_small_objects_get_m_plus_one_replicas(tmp_path):
    data = os.urandom(4 * erasure.MIN_FRAGMENT_BYTES - 100)

    async def body(cluster: Cluster) -> None:
        replicator = await cluster.open()
        ref = await replicator.write(8, data, sync=True, policy=EC)
        assert ref.encoding is None and ref.nodes == tuple(place(8, NAMES[:6])[:3])
        assert await replicator.read(ref, 10, 20) == data[10:30]

    run(tmp_path, body)


def test_reads_need_any_k_fragments_and_queue_the_bad_ones_for_repair(tmp_path):
    data = os.urandom(SIZE)

    async def body(cluster: Cluster) -> None:
        replicator = await cluster.open()
        ref = await replicator.write(21, data, sync=True, policy=EC)
        cluster.lose(ref, 0)  # a data fragment lost
        flip_byte(cluster.path(ref.nodes[2], 21), -10)  # another corrupt
        assert await replicator.read(ref, 0, SIZE) == data
        async with trio.open_nursery() as nursery:
            await nursery.start(replicator.run)
            with trio.fail_after(10):
                while not cluster.fragments_verify(ref):  # both rebuilt in place
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        cluster.kill(ref.nodes[3], ref.nodes[5])  # unreachable nodes are no bad fragments
        assert await replicator.read(ref, 0, SIZE) == data
        cluster.revive(ref.nodes[3], ref.nodes[5])
        cluster.lose(ref, 1, 3, 4)
        with pytest.raises(DataError, match=r"3 good fragments of 6, 4 needed \(3 missing"):
            await replicator.read(ref, 0, 10)
        result = await replicator.repair(ref, relocate=True)
        assert result.unrecoverable and (result.good, result.missing, result.needed) == (3, 3, 4)

    run(tmp_path, body)


def test_repair_rebuilds_missing_and_corrupt_fragments_in_their_slots(tmp_path):
    data = os.urandom(SIZE)

    async def body(cluster: Cluster) -> None:
        replicator = await cluster.open()
        ref = await replicator.write(4, data, sync=True, policy=EC)
        flip_byte(cluster.path(ref.nodes[4], 4), 60)  # in the block table
        cluster.lose(ref, 1)
        result = await replicator.repair(ref)
        assert (result.good, result.missing, result.corrupt, result.repaired) == (4, 1, 1, 2)
        assert result.nodes == ref.nodes and not result.unrecoverable
        cluster.assert_fragments_verify(ref)
        assert (await replicator.repair(ref)).repaired == 0

    run(tmp_path, body)


def test_a_write_with_nodes_down_stores_k_fragments_and_repair_fills_the_slots(tmp_path):
    data = os.urandom(SIZE)
    shard_id = shard_placed_first_on(["n0", "n1"], NAMES[:6])

    async def body(cluster: Cluster) -> None:
        replicator = await cluster.open()
        cluster.kill("n0", "n1")
        ref = await replicator.write(shard_id, data, sync=False, policy=EC)
        assert ref.nodes[:2] == ("", "") and set(ref.nodes[2:]) == set(NAMES[2:6])
        assert await replicator.read(ref, 0, SIZE) == data
        # Its fragments were never synced; fsync finds no node to sync on missing.
        assert await replicator.sync_durably([ref]) == []
        without = await replicator.repair(ref, relocate=True)  # no writable node holds no fragment
        assert without.nodes == ref.nodes and without.repaired == 0
        cluster.revive("n0", "n1")
        result = await replicator.repair(ref, relocate=True)
        assert result.repaired == 2 and sorted(result.nodes[:2]) == ["n0", "n1"]
        repaired = ShardRef(ref.shard_id, ref.length, ref.checksum, result.nodes, encoding=ref.encoding)
        cluster.assert_fragments_verify(repaired)
        assert await replicator.read(repaired, 0, SIZE) == data

    run(tmp_path, body)


def test_a_failing_node_is_replaced_by_the_next_in_the_ranking(tmp_path):
    data = os.urandom(SIZE)
    shard_id = shard_placed_first_on(["n2"], NAMES)

    async def body(cluster: Cluster) -> None:
        replicator = await cluster.open(count=7, n2=FullStore)
        ref = await replicator.write(shard_id, data, sync=True, policy=EC)
        assert "n2" not in ref.nodes and ref.nodes[0] == place(shard_id, NAMES)[6]
        assert ref.nodes[1:] == tuple(place(shard_id, NAMES)[1:6])
        cluster.assert_fragments_verify(ref)

    run(tmp_path, body)


def test_a_write_fails_below_k_fragments_and_leaves_none(tmp_path):
    async def body(cluster: Cluster) -> None:
        replicator = await cluster.open()
        cluster.kill("n0", "n1", "n2")
        with pytest.raises(DataError, match="could store only 3 of 6 fragments \\(4 needed\\)"):
            await replicator.write(30, os.urandom(SIZE), sync=True, policy=EC)
        assert not any(cluster.path(name, 30).exists() for name in NAMES[:6])

    run(tmp_path, body)


def test_a_write_fails_with_no_space_when_too_few_nodes_have_room(tmp_path):
    async def body(cluster: Cluster) -> None:
        replicator = await cluster.open(n0=FullStore, n1=FullStore, n2=FullStore)
        with pytest.raises(NoSpace):
            await replicator.write(31, os.urandom(SIZE), sync=True, policy=EC)

    run(tmp_path, body)


def test_move_to_puts_each_slot_on_its_new_node(tmp_path):
    data = os.urandom(SIZE)

    async def body(cluster: Cluster) -> None:
        replicator = await cluster.open(count=7)
        ref = await replicator.write(12, data, sync=True, policy=StoragePolicy(erasure=(3, 2)))
        spare = next(name for name in NAMES if name not in ref.nodes)
        wanted = (ref.nodes[0], spare, *ref.nodes[2:4], "")
        cluster.lose(ref, 2)  # a source fragment lost: the others do
        assert await replicator.move_to(ref, wanted) == wanted
        moved = ShardRef(ref.shard_id, ref.length, ref.checksum, wanted, encoding=ref.encoding)
        assert await replicator.read(moved, 0, SIZE) == data
        cluster.kill(spare)
        assert await replicator.move_to(ref, wanted) == (*ref.nodes[:4], "")  # slot 1 could not move
        cluster.lose(ref, 0, 1)
        with pytest.raises(DataError, match="2 good fragments, 3 needed"):
            await replicator.move_to(ref, wanted)

    run(tmp_path, body)


def test_sync_durably_rebuilds_fragments_of_a_node_that_died_since_the_write(tmp_path):
    data = os.urandom(SIZE)
    shard_id = shard_placed_first_on(["n0"], NAMES)

    async def body(cluster: Cluster) -> None:
        replicator = await cluster.open(count=7)
        ref = await replicator.write(shard_id, data, sync=False, policy=EC)
        assert ref.nodes[0] == "n0"
        cluster.kill("n0")
        [moved] = await replicator.sync_durably([ref])
        assert moved.nodes[1:] == ref.nodes[1:] and moved.nodes[0] == place(shard_id, NAMES)[6]
        cluster.assert_fragments_verify(moved)
        cluster.kill(*ref.nodes[1:4])
        with pytest.raises(StoreUnavailable, match="too few elsewhere"):
            await replicator.sync_durably([moved])

    run(tmp_path, body)


def test_delete_and_sync_skip_empty_slots(tmp_path):
    async def body(cluster: Cluster) -> None:
        replicator = await cluster.open()
        cluster.kill("n5")
        ref = await replicator.write(40, os.urandom(SIZE), sync=False, policy=EC)
        assert ref.nodes.count("") == 1
        cluster.revive("n5")
        await replicator.sync([ref])
        await replicator.delete(40, ref.nodes)
        assert await replicator.delete_many([(40, ref.nodes)]) == set()
        assert not any(cluster.path(name, 40).exists() for name in NAMES[:6])

    run(tmp_path, body)
