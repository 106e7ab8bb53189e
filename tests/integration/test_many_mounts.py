"""Two mounts of one file system, its metadata in PostgreSQL: each sees the
other's work (pushed to its metadata cache and its kernel), a file closed on
one and opened on the other shows every byte, an unlinked file keeps its data
while the other mount holds it open, and a mount that dies or stops is
reclaimed after the session timeout, fenced if it comes back.

The two mounts run on this machine, each with a data dir of its own (as on
two machines: --data-dir holds only a mount's own state); the node stores are
the first mount's local directories, which the node registry names.
test_netns.py runs mounts on machines of their own.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import sqlite3
import struct
import subprocess
import threading
import time

import pytest
from conftest import two_postgres_mounts
from dfstest import (
    PYTHON,
    MiB,
    dfsfuse_cli,
    expect_errno,
    is_mounted,
    parse_status,
    read_file,
    run,
    write_file,
)

pytestmark = pytest.mark.mounted

SESSION_TIMEOUT = 10  # seconds: short, yet past the fsync stalls of a 2-core machine where another test writes GiBs
VISIBLE_WITHIN = 1.0  # seconds: what the issue asks for a change made on another mount


@pytest.fixture(scope="module")
def pair(postgres_server, test_root):
    """Mounts A and B of one file system on the session's PostgreSQL server."""
    metadata = f"session_timeout = {SESSION_TIMEOUT}\n"
    with two_postgres_mounts(postgres_server, test_root, "many_mounts", "trash_days = 0\n", metadata) as mounts:
        yield mounts


def eventually(check, within: float = VISIBLE_WITHIN, what: str = "the change") -> float:
    """Seconds until check() holds; fails if it does not within `within`."""
    started = time.monotonic()
    while True:
        try:
            if check():
                return time.monotonic() - started
        except OSError:
            pass
        if time.monotonic() - started > within:
            raise AssertionError(f"{what} not visible after {within} s")
        time.sleep(0.01)


def test_names_made_renamed_and_removed_on_one_mount_show_on_the_other_within_a_second(pair):
    a, b = pair
    (a / "names").mkdir()
    eventually(lambda: (b / "names").is_dir(), what="a new directory")
    (b / "names" / "seen").write_text("x")  # B's kernel and cache now hold the directory
    assert sorted(os.listdir(b / "names")) == ["seen"]
    os.stat(b / "names" / "seen")
    expect_errno(errno.ENOENT, os.stat, b / "names" / "new")

    write_file(a / "names" / "new", b"made on A")
    eventually(lambda: (b / "names" / "new").exists(), what="a new file")
    os.rename(a / "names" / "new", a / "names" / "renamed")
    eventually(lambda: not (b / "names" / "new").exists() and (b / "names" / "renamed").exists(), what="a rename")
    assert read_file(b / "names" / "renamed") == b"made on A"
    os.unlink(a / "names" / "seen")
    eventually(lambda: sorted(os.listdir(b / "names")) == ["renamed"], what="an unlink in a listing")
    os.chmod(a / "names" / "renamed", 0o600)
    eventually(lambda: os.stat(b / "names" / "renamed").st_mode & 0o777 == 0o600, what="a chmod")
    os.setxattr(a / "names" / "renamed", "user.tag", b"blue")
    eventually(lambda: os.getxattr(b / "names" / "renamed", "user.tag") == b"blue", what="an xattr")


def test_a_file_closed_on_one_mount_reads_whole_on_the_other(pair):
    a, b = pair
    (a / "c2o").mkdir()
    path_a, path_b = a / "c2o" / "file", b / "c2o" / "file"
    for round_ in range(20):
        data = os.urandom(1000 + round_ * 37_000)  # grows and changes every round
        writer, reader = (path_a, path_b) if round_ % 2 == 0 else (path_b, path_a)
        write_file(writer, data)  # closed: from here on every open elsewhere sees it all
        assert read_file(reader) == data, f"round {round_}"
        assert os.stat(reader).st_size == len(data)


def test_small_overwrites_from_both_mounts_apply_in_the_order_they_were_made(pair):
    """Overwriting a page in place stores a patch; patches of the two mounts
    interleave on one shard and must apply in the order they were committed
    (each mount takes shard ids in batches, so a later patch may carry the
    smaller id)."""
    a, b = pair
    (a / "patches").mkdir()
    model = bytearray(os.urandom(64 * 1024))
    write_file(a / "patches" / "file", bytes(model))
    for round_ in range(12):
        writer, reader = (a, b) if round_ % 2 == 0 else (b, a)
        page = os.urandom(4096)
        offset = 4096 * (round_ % 3)  # the same few pages, again and again
        with open(writer / "patches" / "file", "r+b") as file:
            file.seek(offset)
            file.write(page)
        model[offset : offset + 4096] = page
        assert read_file(reader / "patches" / "file") == model, f"round {round_}"
        assert read_file(writer / "patches" / "file") == model, f"round {round_}"


def test_a_file_unlinked_on_b_keeps_its_data_while_open_on_a(pair):
    a, b = pair
    (a / "unlinked").mkdir()
    data = os.urandom(9 * MiB)
    write_file(a / "unlinked" / "held", data, fsync=True)
    shards_before = _shard_count(a)
    fd = os.open(a / "unlinked" / "held", os.O_RDONLY)
    try:
        eventually(lambda: (b / "unlinked" / "held").exists(), what="the file")
        os.unlink(b / "unlinked" / "held")
        eventually(lambda: not (a / "unlinked" / "held").exists(), what="the unlink")
        time.sleep(6.5)  # past a garbage sweep (shards/garbage.py SWEEP_INTERVAL) on whichever mount holds it
        assert os.pread(fd, len(data) + 1, 0) == data
    finally:
        os.close(fd)
    deadline = time.monotonic() + 20
    while _shard_count(a) >= shards_before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _shard_count(a) < shards_before, "the file's shards were not collected after its last close"


def fusermount_u_lazy(mountpoint) -> None:
    run(["fusermount3", "-u", "-z", mountpoint])


def _session_pids(mount) -> set[int]:
    """The PIDs of the mounts `dfsfuse status` lists as sessions."""
    return {session["pid"] for session in parse_status(mount.status(as_json=True))["sessions"]}


def _shard_count(mount) -> int:
    return parse_status(mount.status(as_json=True))["shards"]


def test_lookups_on_b_while_a_renames_and_deletes_in_the_same_directory_never_hang(pair):
    a, b = pair
    (a / "hammer").mkdir()
    stop = threading.Event()
    errors: list[BaseException] = []
    looked = [0]

    def hammer() -> None:
        try:
            while not stop.is_set():
                for index in range(20):
                    for name in (f"f{index}", f"g{index}"):
                        try:
                            os.stat(b / "hammer" / name)
                        except FileNotFoundError:
                            pass
                        looked[0] += 1
                os.listdir(b / "hammer")
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for index in range(20):
                write_file(a / "hammer" / f"f{index}", b"x")
            for index in range(20):
                os.rename(a / "hammer" / f"f{index}", a / "hammer" / f"g{index}")
            for index in range(20):
                os.unlink(a / "hammer" / f"g{index}")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads), "lookups on B hang"
    assert not errors, errors
    assert looked[0] > 100
    write_file(a / "hammer" / "last", b"y")
    eventually(lambda: os.listdir(b / "hammer") == ["last"], what="the final listing")


def test_both_mounts_at_once_leave_a_consistent_tree(pair):
    a, b = pair
    for mount in (a, b):
        (mount / f"busy-{mount.data_dir.parent.name}").mkdir()
    (a / "shared").mkdir()
    eventually(lambda: (b / "shared").is_dir() and (b / "busy-a0").is_dir(), what="the directories")
    errors: list[BaseException] = []

    def work(mount, other_name: str) -> None:
        own = mount.data_dir.parent.name
        try:
            with open(mount / f"busy-{own}" / "log", "ab") as log:
                for index in range(150):
                    log.write(f"{own} {index}\n".encode())
                    write_file(mount / "shared" / f"{own}-{index}", own.encode())
                    if index % 5 == 0:
                        try:
                            os.rename(mount / "shared" / f"{own}-{index}", mount / f"busy-{other_name}" / f"{own}-{index}")
                        except FileNotFoundError:
                            pass
        except BaseException as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=work, args=(a, "b1")), threading.Thread(target=work, args=(b, "a0"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    eventually(lambda: sorted(os.listdir(a / "shared")) == sorted(os.listdir(b / "shared")), within=2, what="one listing")
    assert len(os.listdir(a / "shared")) == 2 * 120
    for own in ("a0", "b1"):
        lines = read_file(b / f"busy-{own}" / "log").decode().splitlines()
        assert lines == [f"{own} {index}" for index in range(150)]
    inodes = {os.stat(a / "shared" / name).st_ino for name in os.listdir(a / "shared")}
    assert len(inodes) == 240  # no inode handed out twice


def test_a_killed_mount_is_reclaimed_and_mounts_again_cleanly(pair, test_root):
    a, b = pair
    (b / "killed").mkdir()
    write_file(b / "killed" / "kept", b"fsynced before the kill", fsync=True)
    write_file(b / "killed" / "held", os.urandom(5 * MiB), fsync=True)
    fd = os.open(b / "killed" / "held", os.O_RDONLY)  # B dies holding it open ...
    eventually(lambda: (a / "killed" / "held").exists(), what="the file")
    os.unlink(a / "killed" / "held")  # ... after A unlinked it: its data waits for B
    shards = _shard_count(a)
    killed = b.pid
    b.crash()  # SIGKILL: the mount point is left dead
    with contextlib.suppress(OSError):
        os.close(fd)
    (a / "killed" / "after").write_text("A keeps working")
    eventually(lambda: killed not in _session_pids(a), within=SESSION_TIMEOUT * 5, what="the reclaim")
    assert "reclaimed stale session" in a.log_text()
    eventually(lambda: _shard_count(a) < shards, within=15, what="the collection of the file B held open")
    fusermount_u_lazy(b.mountpoint)
    b.start()
    assert (b / "killed" / "after").read_text() == "A keeps working"
    assert (b / "killed" / "kept").read_bytes() == b"fsynced before the kill"
    elsewhere = test_root / "many_mounts" / "elsewhere"
    elsewhere.mkdir()
    refused = dfsfuse_cli("fsck", "--data-dir", elsewhere, "--config", a.config_path, check=False)
    assert refused.returncode != 0 and "fsck runs only when none does" in refused.stderr


def test_a_stopped_mount_that_comes_back_after_it_was_reclaimed_is_fenced(pair):
    a, b = pair
    (a / "fenced").mkdir()
    eventually(lambda: (b / "fenced").is_dir(), what="the directory")
    os.kill(b.pid, signal.SIGSTOP)
    try:
        eventually(lambda: b.pid not in _session_pids(a), within=SESSION_TIMEOUT * 5, what="the reclaim")
    finally:
        os.kill(b.pid, signal.SIGCONT)
    eventually(lambda: "was reclaimed as stale" in b.log_text(), within=SESSION_TIMEOUT, what="the fence")
    expect_errno(errno.EIO, os.listdir, b / "fenced")
    b.stop(fsck=False)  # an unmount still works
    assert not is_mounted(b.mountpoint)
    b.start()
    assert os.listdir(b / "fenced") == []


HOLD_LOCKS = r"""
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.flock(fd, fcntl.LOCK_EX)
fcntl.lockf(fd, fcntl.LOCK_EX, 10, 0)
print("held", flush=True)
sys.stdin.readline()
"""

WAIT_FOR_LOCK = r"""
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
print("waiting", flush=True)
fcntl.lockf(fd, fcntl.LOCK_EX, 10, 0)
print("got", time.monotonic(), flush=True)
"""


def test_flock_and_fcntl_locks_taken_on_one_mount_hold_on_the_other(pair):
    a, b = pair
    (a / "locks").mkdir()
    write_file(a / "locks" / "file", b"x" * 100)
    eventually(lambda: (b / "locks" / "file").exists(), what="the file")
    holder = subprocess.Popen([PYTHON, "-c", HOLD_LOCKS, a / "locks" / "file"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    waiter = None
    try:
        assert holder.stdout.readline().strip() == "held"
        fd = os.open(b / "locks" / "file", os.O_RDWR)
        try:
            expect_errno(errno.EWOULDBLOCK, fcntl.flock, fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            expect_errno((errno.EAGAIN, errno.EACCES), fcntl.lockf, fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, 5)
            probe = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0)
            answer = struct.unpack("hhqqi", fcntl.fcntl(fd, fcntl.F_GETLK, probe))
            assert answer[0] == fcntl.F_WRLCK and (answer[2], answer[3]) == (0, 10)  # the holder on A
            fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 10, 20)  # past the holder's range: no conflict
        finally:
            os.close(fd)
        waiter = subprocess.Popen([PYTHON, "-c", WAIT_FOR_LOCK, b / "locks" / "file"], stdout=subprocess.PIPE, text=True)
        assert waiter.stdout.readline().strip() == "waiting"
        time.sleep(0.5)
        assert waiter.poll() is None  # F_SETLKW on B waits for the holder on A
        released = time.monotonic()
        holder.stdin.write("\n")
        holder.stdin.flush()
        got = float(waiter.stdout.readline().split()[1])
        assert got - released < 2.0
        assert waiter.wait(10) == 0 and holder.wait(10) == 0
    finally:
        for process in (holder, waiter):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()


SQLITE_WRITER = r"""
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], timeout=120)
for n in range(int(sys.argv[3])):
    with db:
        db.execute("INSERT INTO rows (who, n, pad) VALUES (?, ?, randomblob(3000))", (sys.argv[2], n))
        db.execute("UPDATE counter SET total = total + 1")
db.close()
"""


def _run_sqlite_writers(a, b, name: str, per_writer: int) -> list[sqlite3.Connection]:
    """One SQLite writer process on each mount, on one database; the database
    opened from each mount afterwards."""
    (a / name).mkdir()
    db = sqlite3.connect(a / name / "shared.db")
    db.executescript(
        "PRAGMA journal_mode=DELETE; CREATE TABLE rows (who TEXT, n INTEGER, pad BLOB);"
        " CREATE TABLE counter (total INTEGER); INSERT INTO counter VALUES (0);"
    )
    db.close()
    eventually(lambda: (b / name / "shared.db").exists(), what="the database")
    writers = [
        subprocess.Popen([PYTHON, "-c", SQLITE_WRITER, mount / name / "shared.db", who, str(per_writer)],
                         stderr=subprocess.PIPE, text=True)
        for mount, who in ((a, "a"), (b, "b"))
    ]
    for writer in writers:
        assert writer.wait(240) == 0, writer.stderr.read()
    return [sqlite3.connect(mount / name / "shared.db", timeout=60) for mount in (a, b)]


def test_sqlite_writers_on_both_mounts_lose_no_transaction(pair):
    """SQLite's own locking (fcntl byte-range locks) over both mounts: no
    writer fails, no corruption, every committed transaction there. (It lost
    one now and then while patches of a page applied in shard-id order: each
    mount takes its ids in batches. Rollback journal: SQLite's WAL needs
    shared memory, which no network file system gives.)"""
    a, b = pair
    for db in _run_sqlite_writers(a, b, "sqlite", 60):
        try:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            rows, total = db.execute("SELECT (SELECT COUNT(*) FROM rows), total FROM counter").fetchone()
            assert rows == total == 120
        finally:
            db.close()


def test_a_file_deleted_on_one_mount_is_in_the_trash_of_the_other(pair):
    """The pair runs with trash_days = 0; a directory of this test asks for the trash."""
    a, b = pair
    (a / "kept").mkdir()
    os.setxattr(a / "kept", "user.dfs.trash_days", b"1")
    expect_errno(errno.ENOENT, os.stat, a / ".trash")  # no trash yet: cached as absent
    write_file(a / "kept" / "file", b"deleted on B")
    eventually(lambda: (b / "kept" / "file").exists(), what="the file")
    assert os.listdir(a / "kept") == ["file"]  # A's cache holds the listing

    def trash_files(mount) -> list:
        return [item for hour in (mount / ".trash").iterdir() for item in hour.iterdir()]

    os.unlink(b / "kept" / "file")
    eventually(lambda: [read_file(item) for item in trash_files(a)] == [b"deleted on B"], what="the file in the trash")
    eventually(lambda: os.listdir(a / "kept") == [], what="the unlink")
    [entry] = trash_files(a)
    os.rename(entry, a / "kept" / "back")
    eventually(lambda: read_file(b / "kept" / "back") == b"deleted on B", what="the restore")
    eventually(lambda: trash_files(b) == [], what="the restored file gone from the trash")
