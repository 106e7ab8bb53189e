"""Metadata snapshots on three LocalStores: written to every store in the
reserved id range, the newest KEEP_SNAPSHOTS kept, each read back verified."""

from __future__ import annotations

import pathlib

import pytest
import trio

from dfsfuse.cluster.snapshots import (
    KEEP_SNAPSHOTS,
    SnapshotWriter,
    is_snapshot_id,
    read_snapshot,
    snapshot_ids,
)
from dfsfuse.metadata.base import ROOT_INODE
from dfsfuse.metadata.engines import open_dump
from dfsfuse.metadata.sqlite import SqliteMetadata
from dfsfuse.shards import sealing
from dfsfuse.shards.replica import ReplicaCorrupt
from dfsfuse.shards.replicator import Replicator
from dfsfuse.storage.local import LocalStore, replica_name

FILE_MODE = 0o100644


async def open_cluster(root: pathlib.Path) -> tuple[SqliteMetadata, list[LocalStore], Replicator]:
    meta = await SqliteMetadata.open(str(root / "metadata.db"))
    stores = [await LocalStore.open(f"n{i}", str(root / f"n{i}")) for i in (1, 2, 3)]
    for store in stores:
        store.pack_below = 0  # replica files, which a test damages on disk
    return meta, stores, Replicator(stores, 2, 4096)


def test_snapshots_are_replicated_pruned_and_verified(tmp_path):
    async def main() -> None:
        meta, stores, replicator = await open_cluster(tmp_path)
        writer = SnapshotWriter(meta, replicator)
        written = []
        for number in range(KEEP_SNAPSHOTS + 2):
            await meta.create(ROOT_INODE, f"file{number}".encode(), FILE_MODE, 0, 0, 1)
            written.append(await writer.write())
        assert all(is_snapshot_id(snapshot_id) for snapshot_id in written) and written == sorted(written)
        held = {store.name: await snapshot_ids(store) for store in stores}
        kept = sorted({snapshot_id for ids in held.values() for snapshot_id in ids})
        assert kept == written[-KEEP_SNAPSHOTS:]
        newest = written[-1]
        holders = [store for store in stores if newest in held[store.name]]
        assert len(holders) == 3

        async with open_dump(await read_snapshot(holders[0], newest)) as restored:
            names = {entry.name for entry in await restored.readdir(ROOT_INODE, 0, 100)}
            assert names == {f"file{number}".encode() for number in range(KEEP_SNAPSHOTS + 2)}

        path = pathlib.Path(holders[1].root) / replica_name(newest)
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(data)
        with pytest.raises(ReplicaCorrupt):
            await read_snapshot(holders[1], newest)
        await meta.close()

    trio.run(main)



def test_an_encrypted_file_systems_snapshots_are_sealed(tmp_path):
    async def main() -> None:
        meta, stores, replicator = await open_cluster(tmp_path)
        key = sealing.new_key(b"passphrase")
        await meta.create(ROOT_INODE, b"secret-name", FILE_MODE, 0, 0, 1)
        snapshot_id = await SnapshotWriter(meta, replicator, key).write()
        for store in stores:
            assert b"secret-name" not in (pathlib.Path(store.root) / replica_name(snapshot_id)).read_bytes()
        stored = await read_snapshot(stores[0], snapshot_id)  # verified without the key
        assert sealing.is_sealed_snapshot(stored)
        async with open_dump(key.open_snapshot(snapshot_id, stored)) as restored:
            assert [entry.name for entry in await restored.readdir(ROOT_INODE, 0, 100)] == [b"secret-name"]
        await meta.close()

    trio.run(main)
