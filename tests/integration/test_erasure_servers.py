"""Erasure coding on a real mount over six real node servers (`dfsfuse node
serve` on loopback, R = 2 for everything else): `setfattr -n user.dfs.ec -v
4+2 DIR`, then two servers SIGKILLed during a large copy, fragment files
lost or damaged behind the servers' backs, and a tree mixing plain,
compressed and erasure-coded files.

Every test reads back byte for byte what it stored, ends with every
fragment in place (counted as files on the servers' disks and by
`dfsfuse status`), and unmounts with the unmount's checks and fsck. Every
server is stopped by its PID when the test ends, whatever happened.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from dfstest import (
    MiB,
    NodeServer,
    copy_with_interruption,
    dfsfuse_cli,
    drop_caches,
    fsync_path,
    parse_fsck,
    parse_status,
    read_file,
    remote_config,
    run,
    wait_until,
    write_file,
    write_secret,
)

BIG = 256 * MiB  # 64 shards of 4 MiB: fragments stored before, during and after the kill
SERVERS = 6


@pytest.fixture
def cluster(mount_factory, tmp_path):
    """(mount, servers): six node servers and a mount on them, R = 2."""
    secret = write_secret(tmp_path / "secret")
    servers = [NodeServer(tmp_path, f"server{index}", secret) for index in range(1, SERVERS + 1)]
    try:
        for server in servers:
            server.start()
        fs = mount_factory.new("ec", config=remote_config(servers, secret, "replicas = 2\n"), start=False)
        fs.node_roots = [server.data for server in servers]
        fs.start()
        yield fs, servers
    finally:
        try:
            for fs in mount_factory.mounts:  # each test stops its mount itself while the servers are up
                fs.kill()
        finally:
            for server in servers:
                server.stop()


def cli(fs, *args):
    return dfsfuse_cli(*args, "--data-dir", fs.data_dir, "--config", fs.config_path)


def status(fs) -> dict:
    return parse_status(fs.status(as_json=True))


def erasure_coded_dir(path: Path, *extra: tuple[str, str]) -> Path:
    path.mkdir()
    run(["setfattr", "-n", "user.dfs.ec", "-v", "4+2", path])
    for name, value in extra:
        run(["setfattr", "-n", name, "-v", value, path])
    return path


def copies_per_shard(fs) -> dict[str, int]:
    """shard id -> how many node servers hold a replica or fragment of it (a file, or a record in a pack)."""
    return {shard: len(held) for shard, held in fs.held_replicas().items()}


@pytest.mark.timeout(300)
def test_two_nodes_killed_during_a_large_copy(cluster, local_tmp):
    fs, servers = cluster
    target = erasure_coded_dir(fs / "ec") / "big.bin"
    source = local_tmp / "big.bin"
    with open(source, "wb") as handle:
        handle.writelines(os.urandom(8 * MiB) for _ in range(BIG // (8 * MiB)))

    victims = [servers[1], servers[4]]
    copy_with_interruption(source, target, lambda: [victim.crash() for victim in victims], "two nodes were killed")
    fsync_path(target)  # fragments on the dead nodes were never synced: their slots empty
    drop_caches()
    run(["cmp", source, target], timeout=120)
    info = status(fs)
    assert info["under_replicated"] > 0, info

    for victim in victims:
        victim.start()

    def repaired() -> bool:
        # The mount writes to a node again once its heartbeat (every 5 s) saw it answer.
        result = cli(fs, "repair")
        assert "0 unrecoverable" in result.stdout, result.stdout
        return status(fs)["under_replicated"] == 0

    wait_until(repaired, "a repair that fills every empty slot", 60)
    drop_caches()
    run(["cmp", source, target], timeout=120)
    copies = copies_per_shard(fs)  # garbage of replaced objects may linger beside the file's shards
    assert sum(count == SERVERS for count in copies.values()) >= BIG // (4 * MiB), copies
    assert_fsck_clean(fs)


def assert_fsck_clean(fs) -> None:
    """Unmount, then fsck: every fragment and replica of every shard there and verified."""
    fs.stop(fsck=False)
    report = parse_fsck(fs.fsck())
    assert (report["missing"], report["corrupt"], report["repaired"], report["unrecoverable"]) == (0, 0, 0, 0), report


@pytest.mark.timeout(300)
def test_a_mixed_tree_and_fragments_lost_or_damaged_behind_the_nodes_backs(cluster):
    fs, _ = cluster
    text = b"".join(b"line %d of a compressible file\n" % i for i in range(200_000))
    files = {
        erasure_coded_dir(fs / "ec") / "random": os.urandom(9 * MiB + 5),
        fs / "ec" / "small": os.urandom(10_000),  # too small to fragment: 3 replicas
        erasure_coded_dir(fs / "ec-zstd", ("user.dfs.compression", "zstd")) / "text": text,
        fs / "plain": os.urandom(5 * MiB),
    }
    (fs / "zstd").mkdir()
    run(["setfattr", "-n", "user.dfs.compression", "-v", "zstd", fs / "zstd"])
    files[fs / "zstd" / "text"] = text
    for path, data in files.items():
        write_file(path, data, fsync=True)
    assert os.getxattr(fs / "ec" / "random", "user.dfs.ec") == b"4+2"  # inherited at create
    copies = copies_per_shard(fs)
    # Fragments, m + 1 replicas of what is too small to fragment, R = 2 elsewhere.
    assert set(copies.values()) == {SERVERS, 3, 2}, copies
    fragmented = sorted(shard for shard, count in copies.items() if count == SERVERS)
    assert status(fs)["under_replicated"] == 0

    fs.remount()  # nothing cached: the reads below go to the node servers
    shard = fragmented[0]
    lost, damaged = [held.path for held in fs.held_replicas()[shard][:2]]  # 1 MiB fragments: files
    kept = {lost: lost.read_bytes(), damaged: damaged.read_bytes()}
    lost.unlink()
    spoiled = bytearray(kept[damaged])
    spoiled[-100] ^= 0x01
    damaged.write_bytes(spoiled)
    drop_caches()
    for path, data in files.items():
        assert hashlib.sha256(read_file(path)).digest() == hashlib.sha256(data).digest(), path

    result = cli(fs, "scrub")  # or the repair the read queued got there first
    assert "0 unrecoverable" in result.stdout, result.stdout
    assert {path: path.read_bytes() for path in kept} == kept, "the fragments were not rebuilt as they were"
    assert copies_per_shard(fs)[shard] == SERVERS
    assert_fsck_clean(fs)
