"""Pack files of a local node store (dfsfuse.storage.packs, docs/formats.md
"Pack files"): what a crash, damage or a compaction leaves, seen through
the NodeStore interface after reopening. The NodeStore contract itself runs
over packed replicas in test_node_store_contract.py."""

from __future__ import annotations

import json
import logging
import os
import pathlib

import pytest
import trio

from dfsfuse.storage import local, packs
from dfsfuse.storage.local import LocalStore, replica_name
from dfsfuse.storage.packs import RECORD, dead_log_name, pack_file_name, record_header

KiB = 1024


def replica(shard_id: int, size: int = 2 * KiB) -> bytes:
    """Distinct bytes for each shard id."""
    return shard_id.to_bytes(8, "little") * (size // 8)


def pack_path(root: pathlib.Path, number: int) -> pathlib.Path:
    return root / "packs" / pack_file_name(number)


async def reopened(root: pathlib.Path) -> LocalStore:
    return await LocalStore.open("node-1", str(root))


def append_raw(path: pathlib.Path, shard_id: int, data: bytes) -> None:
    """Append a record to a pack file behind the store's back (its store closed)."""
    with open(path, "ab") as file:
        file.write(record_header(shard_id, len(data)) + data)
        os.fsync(file.fileno())


async def contents(store: LocalStore) -> dict[int, bytes]:
    """Every replica the store lists, read whole."""
    ids = await store.list(0, 1 << 20)
    return {shard_id: (await store.read(shard_id, [(0, -1)]))[0] for shard_id in ids}


def test_small_replicas_share_a_pack_and_large_ones_are_files(tmp_path):
    async def main() -> None:
        store = await reopened(tmp_path)
        for shard_id in range(1, 11):
            await store.put(shard_id, [replica(shard_id)], sync=True)
        await store.put(11, [replica(11, local.PACK_BELOW)], sync=True)
        assert sorted(os.listdir(tmp_path / "packs")) == [pack_file_name(1)]
        assert (tmp_path / replica_name(11)).exists()
        store = await reopened(tmp_path)
        assert await contents(store) == {i: replica(i, local.PACK_BELOW if i == 11 else 2 * KiB) for i in range(1, 12)}

    trio.run(main)


def test_a_store_of_format_1_opens_reads_and_becomes_format_2(tmp_path):
    """A store written before packs: STORE says format 1, every replica a file, no packs/."""
    (tmp_path / "tmp").mkdir()
    (tmp_path / "STORE").write_text('{"format": 1, "name": "node-1"}\n')
    for shard_id in (5, 300):
        path = tmp_path / replica_name(shard_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(replica(shard_id))

    async def main() -> None:
        store = await reopened(tmp_path)
        assert await contents(store) == {5: replica(5), 300: replica(300)}
        await store.put(5, [replica(5)], sync=True)  # repair rewrites it: now in a pack
        await store.put(6, [replica(6)], sync=True)
        assert not (tmp_path / replica_name(5)).exists()
        assert await contents(await reopened(tmp_path)) == {5: replica(5), 6: replica(6), 300: replica(300)}

    trio.run(main)
    assert json.loads((tmp_path / "STORE").read_text()) == {"format": 2, "name": "node-1"}


def test_a_replica_file_also_in_a_pack_is_removed_at_open(tmp_path):
    """A crash between appending the new record and unlinking the old file
    leaves both: the record is the later write."""

    async def main() -> None:
        store = await reopened(tmp_path)
        store.pack_below = 0  # a replica file, as before packs
        await store.put(5, [b"old, perhaps damaged"], sync=True)
        await store.close()
        store = await reopened(tmp_path)
        await store.put(6, [b"another"], sync=True)
        await store.close()
        append_raw(pack_path(tmp_path, 1), 5, b"rewritten")  # and no unlink of the file after it
        store = await reopened(tmp_path)
        assert await contents(store) == {5: b"rewritten", 6: b"another"}
        assert not (tmp_path / replica_name(5)).exists()

    trio.run(main)


def test_a_torn_tail_is_cut_off(tmp_path, caplog):
    async def main() -> None:
        store = await reopened(tmp_path)
        for shard_id in (1, 2):
            await store.put(shard_id, [replica(shard_id)], sync=True)
        path = pack_path(tmp_path, 1)
        whole = path.stat().st_size
        for torn in (record_header(3, 1000) + b"only part of it", record_header(3, 1000)[:10]):
            with open(path, "ab") as file:
                file.write(torn)
            store = await reopened(tmp_path)
            assert path.stat().st_size == whole
            assert await contents(store) == {1: replica(1), 2: replica(2)}
        await store.put(3, [replica(3)], sync=True)  # appended where the torn record was
        assert await contents(await reopened(tmp_path)) == {1: replica(1), 2: replica(2), 3: replica(3)}

    with caplog.at_level(logging.INFO, logger="dfsfuse.storage.packs"):
        trio.run(main)
    assert "torn tail" in caplog.text


def test_a_damaged_record_header_keeps_what_is_before_it(tmp_path, caplog):
    """The store opens and warns; the records after the damage count as
    missing here (repair restores them from other replicas), and the pack
    takes no more records: new ones go to a new pack."""

    async def main() -> None:
        store = await reopened(tmp_path)
        for shard_id in (1, 2, 3):
            await store.put(shard_id, [replica(shard_id)], sync=True)
        path = pack_path(tmp_path, 1)
        second = packs.PACK_HEADER.size + RECORD.size + len(replica(1))
        with open(path, "r+b") as file:
            file.seek(second + 12)
            file.write(b"\xff\xff")  # inside the shard id: the header's crc no longer matches
        store = await reopened(tmp_path)
        assert await contents(store) == {1: replica(1)}
        await store.put(2, [replica(2)], sync=True)
        assert pack_path(tmp_path, 2).exists()
        assert await contents(await reopened(tmp_path)) == {1: replica(1), 2: replica(2)}

    with caplog.at_level(logging.WARNING, logger="dfsfuse.storage.packs"):
        trio.run(main)
    assert "damaged record header" in caplog.text


def test_a_pack_of_another_version_is_left_alone(tmp_path, caplog):
    async def main() -> None:
        store = await reopened(tmp_path)
        await store.put(1, [replica(1)], sync=True)
        with open(pack_path(tmp_path, 1), "r+b") as file:
            file.seek(8)
            file.write((99).to_bytes(4, "little"))
        store = await reopened(tmp_path)
        assert await contents(store) == {}
        await store.put(2, [replica(2)], sync=True)
        await store.delete_many([2])
        assert pack_path(tmp_path, 1).exists()

    with caplog.at_level(logging.WARNING, logger="dfsfuse.storage.packs"):
        trio.run(main)
    assert "not a pack of version 1" in caplog.text


def test_deleted_replicas_stay_deleted_after_reopening(tmp_path):
    async def main() -> None:
        store = await reopened(tmp_path)
        for shard_id in range(1, 6):
            await store.put(shard_id, [replica(shard_id)], sync=False)
        await store.delete(2)
        await store.delete_many([4, 5, 99])
        await store.put(5, [replica(5)], sync=False)  # put again into the same pack after its delete
        await store.sync([1, 3, 5])
        store = await reopened(tmp_path)
        assert await contents(store) == {1: replica(1), 3: replica(3), 5: replica(5)}
        assert (await store.stat()).used == 3 * len(replica(1))

    trio.run(main)


def test_a_put_replaces_the_record_and_the_later_record_wins(tmp_path):
    async def main() -> None:
        store = await reopened(tmp_path)
        await store.put(7, [b"first"], sync=True)
        await store.put(7, [b"second, longer"], sync=True)
        assert await store.read(7, [(0, -1)]) == [b"second, longer"]
        assert (await store.stat()).used == len(b"second, longer")
        os.unlink(tmp_path / "packs" / dead_log_name(1))  # as if a crash lost the kill of the first
        store = await reopened(tmp_path)
        assert await contents(store) == {7: b"second, longer"}
        assert (await store.stat()).used == len(b"second, longer")

    trio.run(main)


def pack_bytes(root: pathlib.Path) -> int:
    return sum(path.stat().st_size for path in (root / "packs").iterdir())


@pytest.fixture
def small_packs(monkeypatch):
    """Packs sealed at 16 KiB, so a few records fill one."""
    monkeypatch.setattr(local, "PACK_LIMIT", 16 * KiB)


def test_compaction_reclaims_the_space_of_deleted_replicas(tmp_path, small_packs, caplog):
    ids = range(1, 81)
    kept = [shard_id for shard_id in ids if shard_id % 5 == 0]

    async def main() -> None:
        store = await reopened(tmp_path)
        for shard_id in ids:
            await store.put(shard_id, [replica(shard_id)], sync=False)
        full = pack_bytes(tmp_path)
        count = len(os.listdir(tmp_path / "packs"))
        reads_done = 0

        async def reader() -> None:  # reads go on during compaction
            nonlocal reads_done
            for shard_id in kept * 3:
                assert await store.read(shard_id, [(0, -1)]) == [replica(shard_id)]
                reads_done += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await store.delete_many([shard_id for shard_id in ids if shard_id not in kept])
        assert reads_done == 3 * len(kept)
        assert pack_bytes(tmp_path) < full / 3
        assert len([name for name in os.listdir(tmp_path / "packs") if name.endswith(".pack")]) < count
        assert await contents(store) == {shard_id: replica(shard_id) for shard_id in kept}
        assert await contents(await reopened(tmp_path)) == {shard_id: replica(shard_id) for shard_id in kept}

    with caplog.at_level(logging.INFO, logger="dfsfuse.storage"):
        trio.run(main)
    assert "compacted pack" in caplog.text


def test_compaction_cut_short_by_a_crash_loses_and_resurrects_nothing(tmp_path, small_packs):
    """Compaction's steps done by hand, stopping after each: the live records
    copied to the active pack (and synced) but the old pack not removed; then
    the old pack removed but not its dead log."""

    async def main() -> None:
        store = await reopened(tmp_path)
        for shard_id in range(1, 7):  # 6 x (2 KiB + header): pack 1 holds them all
            await store.put(shard_id, [replica(shard_id)], sync=True)
        await store.delete_many([1, 2, 3, 4])  # not compacted: pack 1 is still the active one
        assert sorted(os.listdir(tmp_path / "packs")) == [dead_log_name(1), pack_file_name(1)]
        for shard_id in range(7, 14):  # pack 1 fills up with 7 and 8 and is sealed; pack 2 is active
            await store.put(shard_id, [replica(shard_id)], sync=True)
        assert pack_path(tmp_path, 1).stat().st_size == packs.PACK_HEADER.size + 8 * (RECORD.size + 2 * KiB)
        live = {shard_id: replica(shard_id) for shard_id in range(5, 14)}
        await store.close()
        for shard_id in (5, 6, 7, 8):
            append_raw(pack_path(tmp_path, 2), shard_id, replica(shard_id))
        # Crash: both copies of 5 and 6 are there; 1..4 stay dead in pack 1.
        store = await reopened(tmp_path)
        assert await contents(store) == live
        # Crash: pack 1 is gone, its dead log not yet.
        os.unlink(pack_path(tmp_path, 1))
        store = await reopened(tmp_path)
        assert await contents(store) == live
        assert dead_log_name(1) not in os.listdir(tmp_path / "packs")

    trio.run(main)


def test_a_replica_deleted_or_replaced_during_compaction(tmp_path, small_packs):
    """Deletes and puts that land while compaction copies: the copy of a
    deleted record is logged dead durably before the old pack goes, and a
    replacement is not undone by the copy of the record it replaced."""

    async def main() -> None:
        store = await reopened(tmp_path)
        for shard_id in range(1, 15):
            await store.put(shard_id, [replica(shard_id)], sync=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.delete_many, [1, 2, 3, 4, 5])
            await trio.sleep(0)
            nursery.start_soon(store.delete, 6)
            nursery.start_soon(store.put, 7, [b"replaced"], True)
        await store.compact()
        expected = {shard_id: replica(shard_id) for shard_id in range(8, 15)} | {7: b"replaced"}
        assert await contents(store) == expected
        assert await contents(await reopened(tmp_path)) == expected

    trio.run(main)


def test_a_store_opened_beside_its_user_changes_nothing_and_writes_files(tmp_path):
    """What `status` beside a mount, or a second mount sharing the metadata,
    opens: a torn tail (perhaps an append under way) and temporaries stay,
    packed replicas read, its own replicas go to files that the store's
    user reads too, and its deletes compact nothing."""
    root = tmp_path / "store"

    async def main() -> None:
        owner = await LocalStore.open("node-1", str(root))
        await owner.put(1, [replica(1)], sync=True)
        tail = b"DFPR" + bytes(10)  # a record header being written
        with open(pack_path(root, 1), "ab") as file:
            file.write(tail)
        (root / "tmp" / "in-flight").write_bytes(b"a write under way")
        size = pack_path(root, 1).stat().st_size

        beside = await LocalStore.open("node-1", str(root), exclusive=False)
        assert pack_path(root, 1).stat().st_size == size and (root / "tmp" / "in-flight").exists()
        assert await beside.read(1, [(0, -1)]) == [replica(1)]
        await beside.put(2, [replica(2)], sync=True)
        assert (root / replica_name(2)).read_bytes() == replica(2)
        assert await owner.read(2, [(0, -1)]) == [replica(2)]
        await beside.delete_many([1])
        assert pack_path(root, 1).exists()
        await beside.close()
        await owner.close()

    trio.run(main)
