"""The contract every NodeStore implementation passes.

Each implementation is reached through a harness: `harness.store()` is an
async context manager yielding a ready store kept in `harness.root` (the
directory that ends up holding the replica files, for the checks that look at
the disk), and it can be entered again to reopen the same store. Add a
harness to HARNESSES to run the whole suite on another implementation.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import random
import resource
import signal
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import trio

from dfsfuse.errors import NoSpace, ShardMissing, StoreUnavailable
from dfsfuse.node.server import NodeServer
from dfsfuse.storage import local
from dfsfuse.storage.base import NodeStore
from dfsfuse.storage.local import LocalStore, replica_name
from dfsfuse.storage.remote import RemoteStore


class LocalHarness:
    def __init__(self, root: pathlib.Path):
        self.root = root

    @contextlib.asynccontextmanager
    async def store(self) -> AsyncIterator[NodeStore]:
        store = await LocalStore.open("store-a", str(self.root))
        try:
            yield store
        finally:
            await store.close()

    def device(self) -> str:
        return str(os.stat(self.root).st_dev)


class RemoteHarness:
    """A real node server over `root`, run in the test's nursery on a free
    loopback port, reached through a RemoteStore."""

    SECRET = b"contract-suite-secret"

    def __init__(self, root: pathlib.Path):
        self.root = root

    @contextlib.asynccontextmanager
    async def store(self) -> AsyncIterator[NodeStore]:
        local = await LocalStore.open("store-a", str(self.root))
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(NodeServer(local, self.SECRET).serve, listeners)
            store = RemoteStore("store-a", "127.0.0.1", port, self.SECRET)
            try:
                yield store
            finally:
                await store.close()
                nursery.cancel_scope.cancel()

    def device(self) -> str:
        return f"127.0.0.1/{os.stat(self.root).st_dev}"


HARNESSES = {"local": LocalHarness, "remote": RemoteHarness}


@pytest.fixture(params=sorted(HARNESSES))
def harness(request, tmp_path):
    return HARNESSES[request.param](tmp_path / "store")


def run_with_store(harness, body: Callable[[NodeStore], Awaitable[None]]) -> None:
    async def main() -> None:
        async with harness.store() as store:
            await body(store)

    trio.run(main)


def test_put_and_read_ranges(harness):
    async def body(store: NodeStore) -> None:
        await store.put(7, [b"hello ", bytearray(b"world"), memoryview(b"!")], sync=True)
        assert await store.read(7, [(0, -1)]) == [b"hello world!"]
        assert await store.read(7, [(6, 5), (0, 5), (11, 1)]) == [b"world", b"hello", b"!"]
        assert await store.read(7, []) == []

    run_with_store(harness, body)


def test_ranges_past_the_end_come_back_short(harness):
    async def body(store: NodeStore) -> None:
        await store.put(7, [b"0123456789"], sync=False)
        assert await store.read(7, [(8, 100), (10, 5), (50, 1), (50, -1), (3, 0)]) == [b"89", b"", b"", b"", b""]

    run_with_store(harness, body)


def test_read_of_absent_shard_is_shard_missing(harness):
    async def body(store: NodeStore) -> None:
        with pytest.raises(ShardMissing):
            await store.read(99, [(0, -1)])

    run_with_store(harness, body)


def test_empty_replica(harness):
    async def body(store: NodeStore) -> None:
        await store.put(1, [], sync=True)
        assert await store.exists(1)
        assert await store.read(1, [(0, -1), (0, 10)]) == [b"", b""]

    run_with_store(harness, body)


def test_large_replica_of_many_parts(harness):
    data = os.urandom(3 << 20)
    parts = [memoryview(data)[start : start + 1500] for start in range(0, len(data), 1500)]  # > IOV_MAX parts

    async def body(store: NodeStore) -> None:
        await store.put(5, parts, sync=False)
        assert await store.read(5, [(0, -1)]) == [data]
        assert await store.read(5, [(1 << 20, 4096)]) == [data[1 << 20 : (1 << 20) + 4096]]

    run_with_store(harness, body)


def test_large_replica_that_is_not_whole_blocks(harness):
    """A replica the size of a real one (header, block table, 4 MiB of data
    and a few bytes), with and without sync: a local store writes most of it
    with O_DIRECT and the tail through the page cache."""
    parts = [os.urandom(52), os.urandom(16 * 65), os.urandom((4 << 20) + 5)]
    data = b"".join(parts)

    async def body(store: NodeStore) -> None:
        await store.put(21, parts, sync=False)
        await store.put(22, parts, sync=True)
        await store.sync([21])
        for shard_id in (21, 22):
            assert await store.read(shard_id, [(0, -1)]) == [data]
            assert await store.read(shard_id, [(len(data) - 9, 100)]) == [data[-9:]]
        assert (await store.stat()).used == 2 * len(data)

    run_with_store(harness, body)


def test_put_replaces_a_replica(harness):
    async def body(store: NodeStore) -> None:
        await store.put(3, [b"first version"], sync=False)
        await store.put(3, [b"second"], sync=True)
        assert await store.read(3, [(0, -1)]) == [b"second"]
        assert await store.list(0, 10) == [3]

    run_with_store(harness, body)


def test_delete_and_exists(harness):
    async def body(store: NodeStore) -> None:
        assert not await store.exists(4)
        await store.put(4, [b"data"], sync=False)
        assert await store.exists(4)
        await store.delete(4)
        assert not await store.exists(4)
        with pytest.raises(ShardMissing):
            await store.read(4, [(0, -1)])
        await store.delete(4)  # absent is fine

    run_with_store(harness, body)


def test_delete_many_removes_each_and_keeps_the_rest(harness):
    async def body(store: NodeStore) -> None:
        for shard_id in (1, 2, 3, 300):
            await store.put(shard_id, [b"x" * shard_id], sync=False)
        before = (await store.stat()).used
        await store.delete_many([300, 1, 77])  # 77 is absent: fine
        assert [await store.exists(shard_id) for shard_id in (1, 2, 3, 300)] == [False, True, True, False]
        assert await store.list(0, 10) == [2, 3]
        assert (await store.stat()).used == before - 301
        await store.delete_many([])

    run_with_store(harness, body)


def test_list_pages_in_id_order(harness):
    rng = random.Random(5)
    ids = {rng.randrange(1, 2**64) for _ in range(300)} | {1, 255, 256, 2**64 - 1}

    async def body(store: NodeStore) -> None:
        for shard_id in ids:
            await store.put(shard_id, [b"x"], sync=False)
        listed: list[int] = []
        after = 0
        while page := await store.list(after, 7):
            assert len(page) <= 7
            listed += page
            after = page[-1]
        assert listed == sorted(ids)
        middle = sorted(ids)[150]
        assert await store.list(middle, 3) == sorted(ids)[151:154]
        assert await store.list(2**64 - 1, 10) == []
        assert await store.list(0, 0) == []
        await store.delete(middle)
        assert middle not in await store.list(0, 1000)

    run_with_store(harness, body)


def test_list_survives_reopening(harness):
    async def main() -> None:
        async with harness.store() as store:
            for shard_id in (10, 300, 2, 70000):
                await store.put(shard_id, [b"abc"], sync=False)
        async with harness.store() as store:
            assert await store.list(0, 100) == [2, 10, 300, 70000]

    trio.run(main)


def test_stat_counts_replicas(harness):
    async def main() -> None:
        async with harness.store() as store:
            empty = await store.stat()
            assert (empty.used, empty.shards) == (0, 0)
            assert 0 <= empty.free <= empty.capacity and empty.capacity > 0
            assert empty.device == harness.device()
            await store.put(1, [b"a" * 100], sync=False)
            await store.put(2, [b"b" * 50, b"c" * 50], sync=False)
            await store.put(3, [b"c" * 10], sync=False)
            await store.put(3, [b"c" * 30], sync=False)  # replaces 10 bytes with 30
            await store.delete(1)
            await store.delete(1)
            stat = await store.stat()
            assert (stat.used, stat.shards) == (130, 2)
        async with harness.store() as store:
            reopened = await store.stat()
            assert (reopened.used, reopened.shards) == (130, 2)

    trio.run(main)


def test_sync_makes_earlier_puts_durable_and_skips_absent(harness):
    async def body(store: NodeStore) -> None:
        for shard_id in range(1, 6):
            await store.put(shard_id, [bytes([shard_id]) * 100], sync=False)
        await store.sync([1, 2, 3, 4, 5, 12345])
        await store.sync([])
        assert await store.read(3, [(0, 3)]) == [b"\3\3\3"]

    run_with_store(harness, body)


def test_no_partial_replica_is_ever_visible(harness):
    """Readers racing a large put see no replica or the whole one."""
    data = os.urandom(8 << 20)
    outcomes = {"missing": 0, "whole": 0}

    async def body(store: NodeStore) -> None:
        done = trio.Event()

        async def reader() -> None:
            while not done.is_set():
                try:
                    (got,) = await store.read(9, [(0, -1)])
                except ShardMissing:
                    outcomes["missing"] += 1
                else:
                    assert got == data
                    outcomes["whole"] += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            nursery.start_soon(reader)
            await store.put(9, [data[: 4 << 20], data[4 << 20 :]], sync=True)
            await store.read(9, [(0, 1)])
            done.set()

    run_with_store(harness, body)
    assert outcomes["missing"] > 0


def test_a_failed_put_leaves_no_file(harness):
    """A write that fails half-way (here: the file size limit) leaves neither
    a replica nor a temporary behind."""
    data = os.urandom(4 << 20)

    async def body(store: NodeStore) -> None:
        old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
        try:
            with pytest.raises(StoreUnavailable):
                await store.put(11, [data], sync=True)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, old_handler)
        assert not await store.exists(11)
        assert await store.list(0, 10) == []
        assert (await store.stat()).shards == 0

    run_with_store(harness, body)
    assert list((harness.root / "tmp").iterdir()) == []


def test_leftover_temporaries_are_removed_on_open(harness):
    async def main() -> None:
        async with harness.store() as store:
            await store.put(1, [b"kept"], sync=True)
        (harness.root / "tmp" / "0000000000000002.deadbeef").write_bytes(b"half a replica")
        async with harness.store() as store:
            assert list((harness.root / "tmp").iterdir()) == []
            assert await store.list(0, 10) == [1]
            assert await store.read(1, [(0, -1)]) == [b"kept"]

    trio.run(main)


# -- LocalStore specifics ---------------------------------------------------


def test_local_layout_on_disk(tmp_path):
    big = os.urandom(local.PACK_BELOW)

    async def main() -> None:
        store = await LocalStore.open("node-1", str(tmp_path))
        await store.put(0x1234ABCD, [big], sync=True)
        await store.put(0x99, [b"small replica"], sync=True)

    trio.run(main)
    assert (tmp_path / "shards" / "cd" / "000000001234abcd").read_bytes() == big
    assert replica_name(0x1234ABCD) == os.path.join("shards", "cd", "000000001234abcd")
    assert not (tmp_path / replica_name(0x99)).exists()
    assert b"small replica" in (tmp_path / "packs" / "0000000001.pack").read_bytes()
    assert (tmp_path / "STORE").read_text() == '{"format": 2, "name": "node-1"}\n'
    assert (tmp_path / "tmp").is_dir()


def test_local_ignores_stray_files(tmp_path):
    async def main() -> None:
        await LocalStore.open("node-1", str(tmp_path))
        (tmp_path / "shards" / "01" / "notes.txt").write_bytes(b"x")
        (tmp_path / "shards" / "02" / "0000000000000001").write_bytes(b"wrong bucket")
        store = await LocalStore.open("node-1", str(tmp_path))
        assert await store.list(0, 10) == []
        assert (await store.stat()).shards == 0

    trio.run(main)


def test_local_refuses_another_stores_directory(tmp_path):
    async def main() -> None:
        await LocalStore.open("node-1", str(tmp_path))
        with pytest.raises(StoreUnavailable, match="belongs to store 'node-1'"):
            await LocalStore.open("node-2", str(tmp_path))

    trio.run(main)


def test_local_store_whose_directory_is_gone(tmp_path):
    async def main() -> None:
        store = await LocalStore.open("node-1", str(tmp_path / "root"))
        await store.put(1, [b"x"], sync=False)
        (tmp_path / "root").rename(tmp_path / "elsewhere")
        with pytest.raises(StoreUnavailable, match="node-1"):
            await store.put(2, [b"y"], sync=True)
        with pytest.raises(ShardMissing):
            await store.read(1, [(0, -1)])
        with pytest.raises(StoreUnavailable):
            await store.stat()

    trio.run(main)


def test_local_recorded_name(tmp_path):
    assert LocalStore.recorded_name(str(tmp_path)) is None
    trio.run(LocalStore.open, "node-1", str(tmp_path))
    assert LocalStore.recorded_name(str(tmp_path)) == "node-1"
    (tmp_path / "STORE").write_text("not json")
    assert LocalStore.recorded_name(str(tmp_path)) is None


# -- LocalStore spools (a node server's put bodies) -----------------------------


def test_local_spool_appended_and_committed_is_a_replica(tmp_path):
    async def main() -> None:
        store = await LocalStore.open("node-1", str(tmp_path))
        spool = await store.open_spool(7)
        for piece in (b"hello ", b"spooled ", b"world"):
            await spool.append(piece)
        assert spool.size == 19
        assert list((tmp_path / "tmp").iterdir()) == []  # the spool file has no name
        await spool.commit(sync=True)
        assert await store.read(7, [(0, -1)]) == [b"hello spooled world"]
        assert (await store.stat()).used == 19
        empty = await store.open_spool(8)
        await empty.commit(sync=False)
        assert await store.read(8, [(0, -1)]) == [b""]
        reopened = await LocalStore.open("node-1", str(tmp_path))
        assert await reopened.read(7, [(0, -1)]) == [b"hello spooled world"]

    trio.run(main)
    assert list((tmp_path / "tmp").iterdir()) == []


def test_local_spool_aborted_leaves_nothing(tmp_path):
    async def main() -> None:
        store = await LocalStore.open("node-1", str(tmp_path))
        spool = await store.open_spool(7)
        await spool.append(b"half a body")
        spool.abort()
        spool.abort()  # again: nothing more to drop
        assert not await store.exists(7)
        assert (await store.stat()).shards == 0

    trio.run(main)
    assert list((tmp_path / "tmp").iterdir()) == []
    assert not (tmp_path / replica_name(7)).exists()


def test_local_spool_failures_are_store_errors(tmp_path, monkeypatch):
    def disk_full(fd: int, parts: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    async def main() -> None:
        store = await LocalStore.open("node-1", str(tmp_path / "root"))
        spool = await store.open_spool(7)
        with monkeypatch.context() as patch:
            patch.setattr(local, "_write_all", disk_full)
            with pytest.raises(NoSpace) as full:
                await spool.append(b"x")
        tmp = tmp_path / "root" / "tmp"
        assert str(full.value) == (
            f"node store 'node-1': receiving shard 0000000000000007: write in {tmp}: No space left on device"
        )
        spool.abort()
        (tmp_path / "root").rename(tmp_path / "elsewhere")
        gone = "receiving shard 0000000000000008: create a spool file in .*root/tmp"
        with pytest.raises(StoreUnavailable, match=gone):
            await store.open_spool(8)

    trio.run(main)
