"""The replicator over three LocalStores in temporary directories."""

from __future__ import annotations

import logging
import os
import pathlib
import random
from collections.abc import Awaitable, Callable, Sequence

import pytest
import trio

from dfsfuse.errors import DataError, NoSpace, StoreUnavailable
from dfsfuse.metadata.base import ShardRef
from dfsfuse.shards import replica
from dfsfuse.shards.checksum import shard_checksum
from dfsfuse.shards.placement import place
from dfsfuse.shards.policy import StoragePolicy
from dfsfuse.shards.replicator import RepairResult, Replicator
from dfsfuse.storage.base import Buffer
from dfsfuse.storage.local import LocalStore, replica_name

BLOCK = 4096
NAMES = ["n0", "n1", "n2"]


class FullStore(LocalStore):
    """A store whose disk is full."""

    async def put(self, shard_id: int, parts: Sequence[Buffer], sync: bool) -> None:
        raise NoSpace(f"node store {self.name!r}: no space left")


class DownStore(LocalStore):
    """A store that cannot be reached."""

    async def put(self, shard_id: int, parts: Sequence[Buffer], sync: bool) -> None:
        raise StoreUnavailable(f"node store {self.name!r}: connection refused")

    async def delete(self, shard_id: int) -> None:
        raise StoreUnavailable(f"node store {self.name!r}: connection refused")


class RecordingStore(LocalStore):
    """Remembers the ranges of every read."""

    def __init__(self, name: str, root: str, *, exclusive: bool = True):
        super().__init__(name, root, exclusive=exclusive)
        self.reads: list[list[tuple[int, int]]] = []

    async def read(self, shard_id: int, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        self.reads.append(list(ranges))
        return await super().read(shard_id, ranges)


class ObservedReplicator(Replicator):
    """Reports each repair, so a test can wait for the background worker."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.results_send, self.results = trio.open_memory_channel[RepairResult](100)

    async def repair(self, ref: ShardRef, *, relocate: bool = False) -> RepairResult:
        result = await super().repair(ref, relocate=relocate)
        self.results_send.send_nowait(result)
        return result


class Cluster:
    def __init__(self, tmp_path: pathlib.Path, store_types: dict[str, type[LocalStore]] | None = None):
        self.tmp_path = tmp_path
        self.store_types = store_types or {}
        self.stores: dict[str, LocalStore] = {}

    def root(self, name: str) -> pathlib.Path:
        return self.tmp_path / name

    def replica_path(self, name: str, shard_id: int) -> pathlib.Path:
        return self.root(name) / replica_name(shard_id)

    async def open(self, replicas: int = 2, block_size: int = BLOCK, **kwargs) -> ObservedReplicator:
        for name in NAMES:
            store_type = self.store_types.get(name, LocalStore)
            self.stores[name] = await store_type.open(name, str(self.root(name)))
            self.stores[name].pack_below = 0  # replica files, which tests damage on disk
        return ObservedReplicator(list(self.stores.values()), replicas, block_size, **kwargs)

    def assert_replica_verifies(self, name: str, ref: ShardRef, block_size: int = BLOCK) -> None:
        file = self.replica_path(name, ref.shard_id).read_bytes()
        split = replica.data_offset(ref.length, block_size)
        replica.verify_replica(file[:split], file[split:], ref.checksum, ref.length)


def run(tmp_path, body: Callable[[Cluster], Awaitable[None]], **store_types: type[LocalStore]) -> None:
    trio.run(body, Cluster(tmp_path, store_types))


def flip_byte(path: pathlib.Path, position: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0x40
    path.write_bytes(data)


def test_write_then_read_round_trip(tmp_path):
    data = os.urandom(100_000)

    async def body(cluster: Cluster) -> None:
        replicator = await cluster.open()
        ref = await replicator.write(17, data, sync=True)
        assert ref == ShardRef(17, len(data), shard_checksum(data), tuple(place(17, NAMES)[:2]))
        for name in ref.nodes:
            cluster.assert_replica_verifies(name, ref)
        assert await replicator.read(ref, 0, len(data)) == data
        rng = random.Random(1)
        for _ in range(300):
            offset = rng.randrange(len(data))
            length = rng.randrange(1, 20_000)
            assert await replicator.read(ref, offset, length) == data[offset : offset + length]
        assert await replicator.read(ref, len(data) - 10, 1000) == data[-10:]
        assert await replicator.read(ref, len(data), 10) == b""
        assert await replicator.read(ref, 5, 0) == b""

    run(tmp_path, body)


def test_empty_and_large_shards(tmp_path):
    large = os.urandom(3 << 20)  # large enough to hash in a worker thread

    async def body(cluster: Cluster) -> None:
        replicator = await cluster.open(replicas=3, block_size=replica.DEFAULT_BLOCK_SIZE)
        empty = await replicator.write(1, b"", sync=False)
        assert empty.length == 0 and len(empty.nodes) == 3
        assert await replicator.read(empty, 0, 10) == b""
        ref = await replicator.write(2, memoryview(large), sync=False)
        await replicator.sync([empty, ref])
        assert await replicator.read(ref, 0, len(large)) == large
        assert await replicator.read(ref, 1_000_000, 200_000) == large[1_000_000:1_200_000]
        result = await replicator.repair(ref)
        assert (result.good, result.repaired, result.nodes) == (3, 0, ref.nodes)

    run(tmp_path, body)


def test_partial_read_fetches_only_the_blocks_it_needs(tmp_path):
    data = os.urandom(100_000)

    async def body(cluster: Cluster) -> None:
        replicator = await cluster.open()
        ref = await replicator.write(5, data, sync=False)
        first = cluster.stores[ref.nodes[0]]
        assert isinstance(first, RecordingStore)
        first.reads.clear()
        assert await replicator.read(ref, 5000, 4000) == data[5000:9000]  # blocks 1 and 2
        data_start = replica.data_offset(len(data), BLOCK)
        assert first.reads == [[(replica.HEADER_SIZE + 16, 32), (data_start + BLOCK, 2 * BLOCK)]]

    run(tmp_path, body, **{name: RecordingStore for name in NAMES})


def damage_data_byte(path: pathlib.Path, ref: ShardRef) -> None:
    flip_byte(path, replica.data_offset(ref.length, BLOCK) + ref.length // 2)


def damage_header_byte(path: pathlib.Path, ref: ShardRef) -> None:
    flip_byte(path, 22)  # inside the stored shard checksum


def truncate(path: pathlib.Path, ref: ShardRef) -> None:
    os.truncate(path, path.stat().st_size - 1000)


def delete(path: pathlib.Path, ref: ShardRef) -> None:
    path.unlink()


@pytest.mark.parametrize(
    "damage, whole_read",
    [(damage_data_byte, False), (damage_header_byte, True), (truncate, False), (delete, False)],
)
def test_bad_replica_is_skipped_and_repaired(tmp_path, caplog, damage, whole_read):
    """A partial read verifies only the blocks it reads, so a damaged header
    is found by a whole-shard read (and by repair)."""
    data = os.urandom(50_000)

    async def body(cluster: Cluster) -> None:
        replicator = await cluster.open()
        async with trio.open_nursery() as nursery:
            await nursery.start(replicator.run)
            ref = await replicator.write(42, data, sync=True)
            bad_node, good_node = ref.nodes
            bad_path = cluster.replica_path(bad_node, ref.shard_id)
            good_replica = cluster.replica_path(good_node, ref.shard_id).read_bytes()
            damage(bad_path, ref)
            if whole_read:
                assert await replicator.read(ref, 0, len(data)) == data
            else:
                assert await replicator.read(ref, 19_000, 31_000) == data[19_000:]
            with trio.fail_after(5):
                result = await replicator.results.receive()
            assert result.good == 1 and result.repaired == 1 and result.nodes == ref.nodes
            assert bad_path.read_bytes() == good_replica
            cluster.assert_replica_verifies(bad_node, ref)
            nursery.cancel_scope.cancel()
        assert f"shard 42: bad replica on node '{bad_node}'" in caplog.text

    with caplog.at_level(logging.WARNING, logger="dfsfuse.replicator"):
        run(tmp_path, body)


def test_no_good_replica_is_a_data_error(tmp_path):
    data = os.urandom(20_000)

    async def body(cluster: Cluster) -> None:
        replicator = await cluster.open()
        ref = await replicator.write(77, data, sync=False)
        damage_data_byte(cluster.replica_path(ref.nodes[0], 77), ref)
        cluster.replica_path(ref.nodes[1], 77).unlink()
        with pytest.raises(DataError, match="shard 77"):
            await replicator.read(ref, 0, len(data))
        result = await replicator.repair(ref)
        assert result.unrecoverable
        assert (result.corrupt, result.missing, result.repaired, result.nodes) == (1, 1, 0, ())

    run(tmp_path, body)


def shard_placed_first_on(name: str) -> int:
    return next(shard_id for shard_id in range(1000) if place(shard_id, NAMES)[0] == name)


def test_write_replaces_a_store_whose_directory_is_gone(tmp_path):
    shard_id = shard_placed_first_on("n1")

    async def body(cluster: Cluster) -> None:
        replicator = await cluster.open()
        cluster.root("n1").rename(tmp_path / "n1-gone")
        ref = await replicator.write(shard_id, b"payload" * 1000, sync=True)
        assert ref.nodes == tuple(name for name in place(shard_id, NAMES) if name != "n1")
        assert await replicator.read(ref, 0, 7000) == b"payload" * 1000

    run(tmp_path, body)


def test_write_replaces_a_full_store(tmp_path):
    shard_id = shard_placed_first_on("n0")

    async def body(cluster: Cluster) -> None:
        replicator = await cluster.open()
        ref = await replicator.write(shard_id, b"data", sync=False)
        assert ref.nodes == tuple(name for name in place(shard_id, NAMES) if name != "n0")

    run(tmp_path, body, n0=FullStore)


def test_write_fails_with_no_space_when_too_few_stores_have_room(tmp_path):
    async def body(cluster: Cluster) -> None:
        replicator = await cluster.open()
        with pytest.raises(NoSpace, match="only 1 of 2"):
            await replicator.write(9, b"data", sync=False)
        assert not cluster.replica_path("n2", 9).exists()  # the partial replica is gone
        assert await cluster.stores["n2"].list(0, 10) == []

    run(tmp_path, body, n0=FullStore, n1=FullStore)


def test_write_fails_with_data_error_when_stores_are_down(tmp_path):
    async def body(cluster: Cluster) -> None:
        replicator = await cluster.open()
        with pytest.raises(DataError, match="shard 9: could store only 1 of 2"):
            await replicator.write(9, b"data", sync=False)
        assert not cluster.replica_path("n2", 9).exists()

    run(tmp_path, body, n0=FullStore, n1=DownStore)


def test_repair_counts_and_relocates(tmp_path):
    shard_id = shard_placed_first_on("n0")
    data = os.urandom(30_000)

    async def body(cluster: Cluster) -> None:
        replicator = await cluster.open()
        ref = await replicator.write(shard_id, data, sync=True)
        spare = next(name for name in NAMES if name not in ref.nodes)

        damage_data_byte(cluster.replica_path(ref.nodes[1], shard_id), ref)
        result = await replicator.repair(ref)
        assert (result.good, result.corrupt, result.missing, result.repaired) == (1, 1, 0, 1)
        cluster.assert_replica_verifies(ref.nodes[1], ref)

        # n0 goes away for good: only a relocating repair restores two replicas.
        cluster.root("n0").rename(tmp_path / "n0-gone")
        in_place = await replicator.repair(ref)
        assert (in_place.good, in_place.missing, in_place.repaired, in_place.nodes) == (1, 1, 0, ref.nodes[1:])
        relocated = await replicator.repair(ref, relocate=True)
        assert relocated.repaired == 1
        assert relocated.nodes == (ref.nodes[1], spare)
        cluster.assert_replica_verifies(spare, ref)

    run(tmp_path, body)


def test_delete_removes_replicas_and_reports_unreachable_stores(tmp_path):
    async def body(cluster: Cluster) -> None:
        replicator = await cluster.open(replicas=1)
        ref = await replicator.write(3, b"data", sync=False)
        (node,) = ref.nodes
        await replicator.delete(3, ["n1", "n2"])
        await replicator.delete(3, ["n1", "n2"])  # absent is fine
        assert not cluster.replica_path(node, 3).exists()
        with pytest.raises(StoreUnavailable, match="n0"):
            await replicator.delete(3, ["n0", "n1"])
        await replicator.delete(3, ["gone"])  # a node removed from the cluster took its replicas with it

    run(tmp_path, body, n0=DownStore)


def test_sync_reports_unknown_stores(tmp_path):
    async def body(cluster: Cluster) -> None:
        replicator = await cluster.open()
        ref = await replicator.write(3, b"data", sync=False)
        await replicator.sync([ref])
        with pytest.raises(StoreUnavailable, match="gone"):
            await replicator.sync([ShardRef(3, 4, ref.checksum, ("gone",))])

    run(tmp_path, body)


def test_full_repair_queue_drops_requests(tmp_path, caplog):
    async def body(cluster: Cluster) -> None:
        replicator = await cluster.open(repair_queue_size=1)  # no worker running
        refs = [await replicator.write(shard_id, b"x" * 10_000, sync=False) for shard_id in (1, 2)]
        for ref in refs:
            cluster.replica_path(ref.nodes[0], ref.shard_id).unlink()
            assert await replicator.read(ref, 0, 100) == b"x" * 100
            assert await replicator.read(ref, 0, 100) == b"x" * 100  # shard 1 is queued once

    with caplog.at_level(logging.WARNING, logger="dfsfuse.replicator"):
        run(tmp_path, body)
    dropped = [record for record in caplog.records if "repair queue full" in record.getMessage()]
    assert [record.getMessage().split(":")[0] for record in dropped] == ["shard 2", "shard 2"]


def test_constructor_checks_its_arguments(tmp_path):
    async def body(cluster: Cluster) -> None:
        await cluster.open()
        stores = list(cluster.stores.values())
        with pytest.raises(ValueError):
            Replicator(stores, 4)
        with pytest.raises(ValueError):
            Replicator(stores, 0)
        with pytest.raises(ValueError):
            Replicator(stores + stores[:1], 2)

    run(tmp_path, body)


# -- write quorum, per-write replicas, a changing node set, copies ------------------


def test_a_write_succeeds_with_the_write_quorum_and_fails_below_it(tmp_path):
    data = os.urandom(20_000)
    shard_id = 3
    first = place(shard_id, NAMES)[0]

    async def body(cluster: Cluster) -> None:
        replicator = await cluster.open(replicas=3, write_quorum=2)
        ref = await replicator.write(shard_id, data, sync=True)
        assert sorted(ref.nodes) == sorted(set(NAMES) - {first})  # the down store was skipped
        assert await replicator.read(ref, 0, len(data)) == data

        strict = await cluster.open(replicas=3)  # W = R = 3
        with pytest.raises(DataError, match="3 needed"):
            await strict.write(shard_id + 1, data, sync=True)
        assert not any(cluster.replica_path(name, shard_id + 1).exists() for name in NAMES)

    run(tmp_path, body, **{first: DownStore})


def test_write_quorum_must_fit_the_replicas(tmp_path):
    async def body(cluster: Cluster) -> None:
        for quorum in (0, 3):
            with pytest.raises(ValueError):
                await cluster.open(replicas=2, write_quorum=quorum)

    run(tmp_path, body)


def test_a_write_can_ask_for_its_own_replica_count(tmp_path):
    async def body(cluster: Cluster) -> None:
        replicator = await cluster.open(replicas=2)
        assert len((await replicator.write(1, b"x" * 100, sync=True, policy=StoragePolicy(replicas=3))).nodes) == 3
        assert len((await replicator.write(2, b"x" * 100, sync=True, policy=StoragePolicy(replicas=1))).nodes) == 1

    run(tmp_path, body)


def test_new_replicas_go_only_to_writable_stores_and_reads_use_any(tmp_path):
    data = os.urandom(10_000)

    async def body(cluster: Cluster) -> None:
        replicator = await cluster.open(replicas=2)
        old = await replicator.write(1, data, sync=True)
        retired = old.nodes[0]
        replicator.update_nodes(list(cluster.stores.values()), [n for n in NAMES if n != retired])
        assert retired not in replicator.writable
        for shard_id in range(2, 12):
            assert retired not in (await replicator.write(shard_id, data, sync=True)).nodes
        assert await replicator.read(old, 0, len(data)) == data

        # A replica on a store that takes no new ones does not count towards R.
        result = await replicator.repair(old, relocate=True)
        assert result.nodes[: len(old.nodes)] == old.nodes and len(result.nodes) == 3
        assert sum(1 for node in result.nodes if node != retired) == 2

    run(tmp_path, body)


def test_copy_puts_a_verified_replica_on_the_targets(tmp_path):
    data = os.urandom(30_000)

    async def body(cluster: Cluster) -> None:
        replicator = await cluster.open(replicas=1)
        ref = await replicator.write(9, data, sync=True)
        others = [name for name in NAMES if name not in ref.nodes]
        assert await replicator.copy(ref, others) == others
        for name in others:
            cluster.assert_replica_verifies(name, ref)
        damage_data_byte(cluster.replica_path(ref.nodes[0], 9), ref)
        with pytest.raises(DataError):
            await replicator.copy(ref, others)

    run(tmp_path, body)


class DyingStore(LocalStore):
    """A store that takes replicas until `dead` is set, then cannot be reached at all."""

    dead = False

    def _check(self) -> None:
        if self.dead:
            raise StoreUnavailable(f"node store {self.name!r}: connection refused")

    async def put(self, shard_id: int, parts: Sequence[Buffer], sync: bool) -> None:
        self._check()
        await super().put(shard_id, parts, sync)

    async def read(self, shard_id: int, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        self._check()
        return await super().read(shard_id, ranges)

    async def sync(self, shard_ids: Sequence[int]) -> None:
        self._check()
        await super().sync(shard_ids)


@pytest.mark.parametrize("dying", [1, 2])
def test_sync_durably_remakes_replicas_of_a_node_that_died_since_the_write(tmp_path, dying):
    """fsync after a node died: its unsynced replicas are made again, synced, on
    the next writable node; with too few nodes left, StoreUnavailable."""
    shard_id = next(i for i in range(1000) if place(i, NAMES)[:2] == ["n0", "n1"])

    async def body(cluster: Cluster) -> None:
        for name in NAMES:
            cluster.stores[name] = await (DyingStore if name in NAMES[:dying] else LocalStore).open(
                name, str(cluster.root(name)))
            cluster.stores[name].pack_below = 0  # replica files, which the test looks at on disk
        replicator = Replicator(list(cluster.stores.values()), 2, BLOCK)
        data = os.urandom(3 * BLOCK + 5)
        ref = await replicator.write(shard_id, data, sync=False)
        assert set(ref.nodes) == {"n0", "n1"}
        for name in NAMES[:dying]:
            cluster.stores[name].dead = True
        if dying == 2:
            with pytest.raises(StoreUnavailable, match="too few elsewhere"):
                await replicator.sync_durably([ref])
            return
        [moved] = await replicator.sync_durably([ref])
        assert moved.shard_id == shard_id and set(moved.nodes) == {"n1", "n2"}
        cluster.assert_replica_verifies("n2", moved)
        assert await replicator.read(moved, 0, len(data)) == data

    run(tmp_path, body)
