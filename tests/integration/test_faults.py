"""Failures survived, nothing lost: a mount whose three nodes are real node
servers (`dfsfuse node serve` on loopback ports chosen at run time, R = 2),
and the servers die (SIGKILL), freeze (SIGSTOP), fill up (a small tmpfs as
their --data dir) or go away until fewer than W answer.

Every test checks, byte for byte, that what the application was told is
stored reads back, and ends with the unmount's checks and `dfsfuse fsck`.
Every server is stopped by its PID when the test ends, whatever happened
(NodeServer.stop continues a frozen one first), and every tmpfs unmounted.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
from dfstest import (
    KiB,
    MiB,
    NodeServer,
    copy_with_interruption,
    dfsfuse_cli,
    drop_caches,
    fsync_path,
    parse_status,
    read_file,
    remote_config,
    run,
    write_file,
    write_secret,
)

# The 1 GB copy: 256 shards of 4 MiB, so the node dies with shards
# stored before, during and after the kill (about 20 s on a 2-core machine).
BIG = 1024 * MiB
OPERATION_BOUND = 20.0  # seconds an operation may take while a node is frozen (its timeout is 10 s)


@pytest.fixture
def cluster(mount_factory, tmp_path):
    """cluster(config=..., sizes=...) -> (mount, servers): three node servers and a mount on them.

    `sizes`: for each server, None or the size of a tmpfs mounted as its --data dir.
    """
    servers: list[NodeServer] = []
    tmpfs: list[Path] = []

    def make(config: str = "replicas = 2\n", sizes: tuple[str | None, ...] = (None, None, None)):
        secret = write_secret(tmp_path / "secret")
        for index, size in enumerate(sizes, 1):
            server = NodeServer(tmp_path, f"server{index}", secret)
            if size is not None:
                server.data.mkdir()
                run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", server.data])
                tmpfs.append(server.data)
            servers.append(server)
            server.start()
        fs = mount_factory.new("faults", config=remote_config(servers, secret, config), start=False)
        fs.node_roots = [server.data for server in servers]
        fs.start()
        return fs, servers

    try:
        yield make
    finally:
        try:
            # The mount is unmounted and checked first (mount_factory's teardown
            # runs after this one), so servers stopped here must not be needed
            # any more: each test stops its mount itself while they are up.
            for fs in mount_factory.mounts:
                fs.kill()
        finally:
            for server in servers:
                server.stop()
            for path in tmpfs:
                run(["umount", "-l", path], check=False)


def digest(path) -> str:
    return hashlib.sha256(read_file(path)).hexdigest()


def write_files(root: Path, count: int, size: int, seed: int) -> dict[Path, str]:
    """`count` files of `size` random bytes, fsynced; path -> sha256."""
    written = {}
    for index in range(count):
        data = os.urandom(size)
        path = root / f"s{seed}-{index}"
        write_file(path, data, fsync=True)
        written[path] = hashlib.sha256(data).hexdigest()
    return written


def assert_files(written: dict[Path, str]) -> None:
    drop_caches()
    for path, expected in written.items():
        assert digest(path) == expected, f"{path} does not read back as written"


def status(fs) -> dict:
    return parse_status(fs.status(as_json=True))


def cli(fs, *args, check=True):
    return dfsfuse_cli(*args, "--data-dir", fs.data_dir, "--config", fs.config_path, check=check)


def make_big_source(path: Path) -> None:
    with open(path, "wb") as handle:
        handle.writelines(os.urandom(8 * MiB) for _ in range(BIG // (8 * MiB)))


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.05)


def store_error(path: Path, data: bytes) -> int:
    """Write, fsync and close `data`; the errno of the first step that fails, 0 if none does."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError as error:
            return error.errno
    finally:
        try:
            os.close(fd)
        except OSError as error:
            return error.errno
    return 0


@pytest.mark.timeout(300)
def test_sigkill_of_a_node_during_a_large_copy(cluster, local_tmp):
    fs, servers = cluster()
    # One shard each, fsynced: some of them surely have a replica on the victim.
    before = write_files(fs.mountpoint, 10, 3 * MiB + 1234, seed=1)
    source = local_tmp / "big.bin"
    make_big_source(source)
    target = fs / "big.bin"

    victim = servers[1]
    copy_with_interruption(source, target, victim.crash, "a node was killed")
    # The copy's replicas stored on the victim before it died were never
    # synced: fsync makes them again on the live nodes (and succeeds).
    fsync_path(target)

    drop_caches()
    run(["cmp", source, target], timeout=120)
    assert_files(before)
    info = status(fs)
    assert info["under_replicated"] > 0, info
    assert not parse_status(fs.status(as_json=True))["nodes"][victim.name]["alive"]
    assert re.search(rf"^  {victim.name}: unreachable: ", fs.status(), re.MULTILINE)  # said under the table

    # Left dead, its replicas are re-made on the two nodes that answer.
    result = cli(fs, "repair")
    assert re.search(r"repair: [1-9]\d* under-replicated shards", result.stdout), result.stdout
    assert "0 unrecoverable" in result.stdout, result.stdout
    assert status(fs)["under_replicated"] == 0
    drop_caches()
    run(["cmp", source, target], timeout=120)
    assert_files(before)

    # It comes back: its stale replicas are orphans that fsck (at the unmount) removes.
    victim.start()
    wait_for(lambda: "yes" in _alive(fs, victim.name), 30, f"{victim.name} to be seen again")
    os.unlink(target)
    fs.stop()


def _alive(fs, name: str) -> str:
    for line in cli(fs, "node", "list").stdout.splitlines()[1:]:
        fields = line.split()
        if fields[0] == name:
            return fields[2]
    return ""


@pytest.mark.timeout(300)
def test_sigstop_of_a_node_during_reads_and_writes(cluster):
    fs, servers = cluster()
    before = write_files(fs.mountpoint, 8, 2 * MiB + 77, seed=2)
    frozen = servers[0]
    written: dict[Path, str] = {}
    durations: list[tuple[str, float]] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for round_ in range(4):
                for path, expected in before.items():
                    started = time.monotonic()
                    assert digest(path) == expected, path
                    durations.append((f"read {path.name}", time.monotonic() - started))
                data = os.urandom(3 * MiB + round_)
                path = fs / f"during-{round_}"
                started = time.monotonic()
                write_file(path, data, fsync=True)
                durations.append((f"write {path.name}", time.monotonic() - started))
                written[path] = hashlib.sha256(data).hexdigest()
                drop_caches()
        except BaseException as error:  # noqa: BLE001 - reported by the test thread
            errors.append(error)

    drop_caches()
    frozen.signal(signal.SIGSTOP)
    try:
        worker = threading.Thread(target=work)
        worker.start()
        worker.join(240)
        assert not worker.is_alive(), "reads and writes hang while a node is frozen"
    finally:
        frozen.signal(signal.SIGCONT)
    assert not errors, errors
    slow = [(what, seconds) for what, seconds in durations if seconds > OPERATION_BOUND]
    assert not slow, f"operations slower than {OPERATION_BOUND}s while a node was frozen: {slow}"
    assert_files(before)
    assert_files(written)
    fs.stop()


@pytest.mark.timeout(300)
def test_a_full_node_then_a_full_cluster(cluster):
    # server3 has room for about 8 shards of 1 MiB; the others for about 24 each.
    fs, servers = cluster('replicas = 2\nshard_size = "1MiB"\n', sizes=("24m", "24m", "8m"))
    small = servers[2]

    # 16 MiB of files = 32 MiB of replicas: more than server3 holds, so it fills
    # up and the writes go on on the other two.
    first = write_files(fs.mountpoint, 8, 2 * MiB, seed=3)
    assert_files(first)
    assert os.statvfs(small.data).f_bavail * os.statvfs(small.data).f_frsize < 2 * MiB, "server3 is not full"

    # Now fill everything: the application gets ENOSPC, at write, fsync or close.
    more: dict[Path, str] = {}
    failure = 0
    for index in range(40):
        data = os.urandom(1 * MiB)
        path = fs / f"fill-{index}"
        failure = store_error(path, data)
        if failure:
            os.unlink(path)
            break
        more[path] = hashlib.sha256(data).hexdigest()
    assert failure == errno.ENOSPC, f"filling the cluster ended with {errno.errorcode.get(failure, failure)}"

    # Nothing stored before is damaged, and freeing space makes room again.
    assert_files(first)
    assert_files(more)
    for path in list(first)[:4]:
        os.unlink(path)
        del first[path]
    wait_for(lambda: store_error(fs / "after", b"x" * (512 * KiB)) == 0, 60, "room after deleting files")
    first[fs / "after"] = hashlib.sha256(b"x" * (512 * KiB)).hexdigest()
    assert_files(first)
    assert_files(more)
    fs.stop()


@pytest.mark.timeout(300)
def test_writes_fail_with_eio_when_fewer_than_w_nodes_answer(cluster):
    fs, servers = cluster('replicas = 2\nwrite_quorum = 2\nshard_size = "1MiB"\n')
    before = write_files(fs.mountpoint, 3, 3 * MiB, seed=4)
    servers[0].crash()
    servers[1].crash()
    for size in (100 * KiB, 5 * MiB):  # a part of one shard, and several shards
        path = fs / f"lost-{size}"
        assert store_error(path, os.urandom(size)) == errno.EIO, f"a {size}-byte write did not fail with EIO"
        os.unlink(path)

    servers[0].start()
    servers[1].start()
    data = os.urandom(3 * MiB)
    wait_for(lambda: store_error(fs / "after", data) == 0, 60, "writes to work again")
    assert digest(fs / "after") == hashlib.sha256(data).hexdigest()
    assert_files(before)
    fs.stop()
