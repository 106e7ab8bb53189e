"""The node stores on disk: replica placement, corrupted and missing replicas
(read around and repaired), fsck, `dfsfuse status`, and no leaked shards.

Each test has a file system of its own with 1 MiB shards, so that every
replica file on disk belongs to what the test wrote.
"""

import errno
import os
import re
import time

import pytest
from dfstest import (
    KiB,
    MiB,
    expect_errno,
    parse_fsck,
    parse_status,
    read_file,
    run,
    write_file,
)

from dfsfuse.cluster.snapshots import is_snapshot_id

CONFIG = """
replicas = 2
trash_days = 0
shard_size = "1MiB"
block_size = "64KiB"
"""


@pytest.fixture
def fs(mount_factory):
    return mount_factory.new("store", config=CONFIG)


def _shard_slices(data: bytes) -> dict[bytes, int]:
    """The data of each full or partial shard -> its index in the file."""
    return {data[i : i + MiB]: i // MiB for i in range(0, len(data), MiB)}


def _replica_data(path, length: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(-length, os.SEEK_END)
        return handle.read()


def _map_shards(fs, data: bytes) -> dict[int, list]:
    """Shard index in the file -> its replica files, found by matching the replica's trailing data."""
    slices = _shard_slices(data)
    by_index: dict[int, list] = {}
    for shard_id, replicas in fs.replica_files().items():
        for replica in replicas:
            for chunk, index in slices.items():
                if replica.stat().st_size >= len(chunk) and _replica_data(replica, len(chunk)) == chunk:
                    by_index.setdefault(index, []).append(replica)
                    break
    return by_index


def _flip_byte(path, from_end: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(-from_end, os.SEEK_END)
        byte = handle.read(1)
        handle.seek(-from_end, os.SEEK_END)
        handle.write(bytes([byte[0] ^ 0xFF]))


def _wait_for(condition, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_replicas_are_placed_on_distinct_nodes(fs):
    data = os.urandom(4 * MiB + 100)
    write_file(fs / "f", data, fsync=True)
    fs.stop()
    shards = fs.held_replicas()
    assert len(shards) == 5, f"expected 5 shards of a 4 MiB + 100 B file, found {sorted(shards)}"
    nodes_used = set()
    for shard_id, replicas in shards.items():
        nodes = {replica.node.name for replica in replicas}
        assert len(replicas) == 2 and len(nodes) == 2, f"shard {shard_id}: replicas {replicas}"
        nodes_used |= nodes
    assert len(nodes_used) == 3, "rendezvous placement should spread five shards over all three nodes"
    slices = _shard_slices(data)
    by_index: dict[int, list] = {}
    for replicas in shards.values():  # the 100 B shard is a record in a pack; the others are files
        for replica in replicas:
            content = replica.read_bytes()
            for chunk, index in slices.items():
                if content.endswith(chunk):
                    by_index.setdefault(index, []).append(replica)
                    break
    assert sorted(by_index) == [0, 1, 2, 3, 4] and all(len(r) == 2 for r in by_index.values()), by_index
    assert [replica.packed for replica in by_index[4]] == [True, True]
    fs.start()
    assert read_file(fs / "f") == data


def _replica_read_first(fs, replicas) -> object:
    """The replica a read of the file meets first, seen by its atime (relatime), or None if unclear."""
    for path in replicas:
        os.utime(path, ns=(0, path.stat().st_mtime_ns))
    fs.start()
    read_file(fs / "f")
    fs.stop(fsck=False)
    touched = [path for path in replicas if path.stat().st_atime_ns != 0]
    return touched[0] if len(touched) == 1 else None


def _damage_read_and_repair(fs, data: bytes, index: int, damage, is_repaired, kind: str) -> None:
    """Damage one replica of shard `index`, read the file, and wait for the replica's repair.

    A read only meets a bad replica that comes first in the shard's placement order.
    The test finds that replica from the atimes a first read leaves; if it cannot tell,
    it damages one replica and, if a read did not meet it (it is not repaired), puts it
    back and damages the other one: now the read must meet it.
    """
    fs.stop(fsck=False)
    replicas = sorted(_map_shards(fs, data)[index])
    assert len(replicas) == 2, replicas
    first = _replica_read_first(fs, replicas)
    if first is not None:
        order = [(first, 30)]
    else:
        order = [(replicas[0], 10), (replicas[1], 30)]
    saved = {path: path.read_bytes() for path in replicas}
    for attempt, (bad, patience) in enumerate(order):
        damage(bad)
        fs.start()
        assert read_file(fs / "f") == data, f"reading around a {kind} replica ({bad}) failed"
        try:
            _wait_for(lambda: is_repaired(bad), f"{kind} replica {bad} to be repaired", timeout=patience)
        except AssertionError:
            fs.stop(fsck=False)
            if is_repaired(bad):
                return
            if attempt == len(order) - 1:
                raise AssertionError(
                    f"a {kind} replica ({bad}) was not repaired after a read that had to meet it"
                    f" (replicas {replicas}, first read {first})"
                ) from None
            bad.write_bytes(saved[bad])  # put it back; damage the other one instead
            continue
        fs.stop(fsck=False)
        for other in replicas:
            if other != bad:
                assert saved[other] == other.read_bytes(), "the good replica changed"
        return


def test_missing_replica_is_read_around_and_repaired(fs):
    data = os.urandom(3 * MiB + 5000)
    write_file(fs / "f", data, fsync=True)
    _damage_read_and_repair(fs, data, 1, lambda path: path.unlink(),
                            lambda path: path.exists() and _replica_data(path, MiB) == data[MiB : 2 * MiB], "missing")
    summary = parse_fsck(fs.fsck())
    assert (summary["checked"], summary["missing"], summary["corrupt"], summary["unrecoverable"]) == (4, 0, 0, 0), summary
    fs.start()
    assert read_file(fs / "f") == data


def test_corrupt_replica_is_read_around_and_repaired(fs):
    data = os.urandom(3 * MiB + 5000)
    write_file(fs / "f", data, fsync=True)
    # a flipped byte inside the last checksum block of shard 0's data
    _damage_read_and_repair(fs, data, 0, lambda path: _flip_byte(path, 1000),
                            lambda path: _replica_data(path, MiB) == data[:MiB], "corrupt")
    # a flipped byte in the first block of shard 2 and a small read of that block only:
    # one replica after the other, so that the read surely meets a bad block once
    replicas = sorted(_map_shards(fs, data)[2])
    for replica in replicas:
        _flip_byte(replica, MiB - 10)
        fs.start()
        fd = os.open(fs / "f", os.O_RDONLY)
        try:
            assert os.pread(fd, 4 * KiB, 2 * MiB) == data[2 * MiB : 2 * MiB + 4 * KiB]
        finally:
            os.close(fd)
        fs.stop(fsck=False)
        if _replica_data(replica, MiB) != data[2 * MiB : 3 * MiB]:
            summary = parse_fsck(fs.fsck())  # not met by the read, or not yet repaired: fsck does it
            assert summary["corrupt"] == 1 and summary["repaired"] == 1, summary
        assert _replica_data(replica, MiB) == data[2 * MiB : 3 * MiB]
    summary = parse_fsck(fs.fsck())
    assert (summary["checked"], summary["missing"], summary["corrupt"], summary["unrecoverable"]) == (4, 0, 0, 0), summary
    fs.start()
    assert read_file(fs / "f") == data


def test_fsck_repairs_and_reports(fs):
    data = os.urandom(2 * MiB + 1)
    write_file(fs / "f", data, fsync=True)
    write_file(fs / "g", b"g" * 1000, fsync=True)
    fs.stop()
    summary = parse_fsck(fs.fsck())
    assert summary == {
        "checked": 4, "missing": 0, "corrupt": 0, "orphan": 0, "repaired": 0, "removed": 0, "unrecoverable": 0,
    }, summary
    by_index = _map_shards(fs, data)
    _flip_byte(by_index[0][0], 5)
    by_index[1][1].unlink()
    # an orphan: a replica file that no metadata refers to
    orphan = fs.data_dir / "nodes" / "node1" / "shards" / "ee" / "7fffffffffffffee"
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(by_index[0][1].read_bytes())
    result = fs.fsck(check=False)
    summary = parse_fsck(result)
    assert result.returncode == 0, result.stdout + result.stderr
    assert summary["checked"] == 4
    assert (summary["missing"], summary["corrupt"], summary["orphan"]) == (1, 1, 1), summary
    assert summary["repaired"] == 2 and summary["removed"] == 1 and summary["unrecoverable"] == 0, summary
    assert not orphan.exists()
    assert by_index[1][1].exists()
    assert _replica_data(by_index[0][0], MiB) == data[:MiB]
    summary = parse_fsck(fs.fsck())  # now all is well
    assert (summary["missing"], summary["corrupt"], summary["orphan"], summary["repaired"]) == (0, 0, 0, 0)
    fs.start()
    assert read_file(fs / "f") == data


def test_no_good_replica_gives_eio_and_fsck_says_unrecoverable(fs):
    data = os.urandom(2 * MiB)
    write_file(fs / "precious-file.bin", data, fsync=True)
    write_file(fs / "fine", b"fine", fsync=True)
    fs.stop()
    by_index = _map_shards(fs, data)
    for replica in by_index[1]:
        _flip_byte(replica, 3)
    result = fs.fsck(check=False)
    summary = parse_fsck(result)
    assert result.returncode == 1, f"fsck must exit 1 with an unrecoverable shard\n{result.stdout}{result.stderr}"
    assert summary["unrecoverable"] == 1 and summary["corrupt"] == 2, summary
    fs.start()
    fd = os.open(fs / "precious-file.bin", os.O_RDONLY)
    try:
        assert os.pread(fd, 1000, 0) == data[:1000]  # the good shard still reads
        expect_errno(errno.EIO, os.pread, fd, 1000, 2 * MiB - 1000)  # the corrupt last block of shard 1
    finally:
        os.close(fd)
    expect_errno(errno.EIO, read_file, fs / "precious-file.bin")  # reading it all meets the bad block
    fd = os.open(fs / "precious-file.bin", os.O_RDONLY)
    try:
        assert os.pread(fd, 1000, MiB) == data[MiB : MiB + 1000]  # the good blocks of the bad shard still read
    finally:
        os.close(fd)
    assert read_file(fs / "fine") == b"fine"
    log = fs.log_text()
    ino = os.stat(fs / "precious-file.bin").st_ino
    assert "precious-file.bin" in log or re.search(rf"\bino(de)?\W{{0,3}}{ino}\b", log), (
        "the log must name the file whose shard is lost"
    )
    os.unlink(fs / "precious-file.bin")  # leaves a consistent file system for the final fsck


def test_status_counts(fs):
    write_file(fs / "a", os.urandom(2 * MiB + 512 * KiB), fsync=True)  # 3 shards
    write_file(fs / "b", os.urandom(MiB), fsync=True)  # 1 shard
    write_file(fs / "empty", b"")  # none
    os.mkdir(fs / "d")
    logical = 2 * MiB + 512 * KiB + MiB
    for when in ("mounted", "unmounted"):
        info = parse_status(fs.status(as_json=True))
        assert info["shards"] == 4, f"{when}: {info}"
        assert info["logical_bytes"] == logical, f"{when}: {info}"
        assert info["under_replicated"] == 0, f"{when}: {info}"
        assert set(info["nodes"]) == {"node1", "node2", "node3"}
        assert sum(node["shards"] for node in info["nodes"].values()) == 8, f"{when}: {info}"
        used = sum(node["bytes"] for node in info["nodes"].values())
        assert 2 * logical <= used <= 2 * logical + 8 * 64 * KiB, f"{when}: {used} bytes used for {logical} x2"
        for name, node in info["nodes"].items():
            assert node["path"] == str(fs.data_dir / "nodes" / name)
        if when == "mounted":
            fs.stop()
    next(iter(fs.replica_files().values()))[0].unlink()
    info = parse_status(fs.status(as_json=True))
    assert info["under_replicated"] == 1 and info["shards"] == 4, info
    fs.start()  # the final fsck repairs it


def test_small_overwrites_are_stored_as_patches_and_survive_a_remount(fs, tmp_path):
    """dd conv=notrunc of a few 4 KiB blocks into a big file stores just those
    pages (small replica files next to the shard's), and the file reads the
    same as a local copy given the same overwrites, before and after a remount."""
    model = tmp_path / "model"
    data = os.urandom(3 * MiB)
    model.write_bytes(data)
    write_file(fs / "big", data, fsync=True)
    whole = set(fs.held_replicas())
    for block in (300, 301, 700):  # pages of shard 1 (1 MiB shards): three closes, three patches
        patch = tmp_path / f"patch{block}"
        patch.write_bytes(os.urandom(4 * KiB))
        for target in (fs / "big", model):
            run(["dd", f"if={patch}", f"of={target}", "bs=4096", f"seek={block}", "conv=notrunc", "status=none"])
    new = {shard: replicas for shard, replicas in fs.held_replicas().items() if shard not in whole}
    assert len(new) == 3, new
    assert set(fs.held_replicas()) >= whole  # the shards stay; the patches go on top
    for replicas in new.values():
        assert len(replicas) == 2 and all(replica.size < 8 * KiB for replica in replicas)
    run(["cmp", fs / "big", model])
    fs.remount()
    run(["cmp", fs / "big", model])


def test_rm_rf_leaves_node_stores_empty(fs):
    root = fs / "stuff"
    os.makedirs(root / "sub" / "deeper")
    write_file(root / "big", os.urandom(5 * MiB + 3))
    write_file(root / "sub" / "small", b"s")
    with open(root / "sparse", "wb") as handle:
        handle.truncate(40 * MiB)
        handle.seek(30 * MiB)
        handle.write(b"x" * 10)
    os.link(root / "big", root / "sub" / "deeper" / "link")
    fd = os.open(root / "overwritten", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for _ in range(5):  # overwrites make new shards; the old ones must go
            os.pwrite(fd, os.urandom(MiB + 10), 0)
            os.fsync(fd)
    finally:
        os.close(fd)
    write_file(root / "truncated", os.urandom(3 * MiB))
    os.truncate(root / "truncated", 10)
    open_fd = os.open(root / "sub" / "small", os.O_RDONLY)
    assert len(fs.replica_files()) > 0
    assert parse_status(fs.status(as_json=True))["shards"] > 0
    run(["rm", "-rf", root])
    assert os.listdir(fs.mountpoint) == []
    assert os.read(open_fd, 10) == b"s"
    os.close(open_fd)
    fs.stop(fsck=False)  # fsck would remove orphans and hide a leak
    leftovers = fs.replica_files()
    assert leftovers == {}, f"replica files left after rm -rf: {leftovers}"
    for node in fs.node_dirs():
        files = [p for p in (node / "shards").rglob("*") if p.is_file()] if (node / "shards").exists() else []
        files = [p for p in files if not is_snapshot_id(int(p.name, 16))]  # the metadata snapshot stays
        assert files == [], f"files left in {node}/shards: {files[:10]}"
    info = parse_status(fs.status(as_json=True))
    assert info["shards"] == 0 and info["logical_bytes"] == 0
    assert all(node["shards"] == 0 for node in info["nodes"].values())
    summary = parse_fsck(fs.fsck())
    assert summary["checked"] == 0 and summary["orphan"] == 0, summary
    fs.start()
