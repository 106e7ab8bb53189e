"""The patched pyfuse3 (patches/pyfuse3) hands flock and fcntl locks to the file system.

A tiny one-file pyfuse3 file system defined here (LockFS, built on the one of
onefile_fs.py, which also starts and stops it) runs in a subprocess of its own
(`python test_pyfuse3_locks.py serve MOUNTPOINT CALLS [plain]`), keeps the
locks in memory with dfsfuse.metadata.locks, and writes every lock, flush and
release call it gets to CALLS (JSON lines). It also holds a lock that no
process of this machine holds, as a lock taken on another machine would be:
only a file system that really gets the calls can report it.

The lock calls come from Locker processes (`... locker`), one per POSIX lock
owner, that run real fcntl(F_SETLK/F_SETLKW/F_GETLK) and flock calls on
command, one JSON line in and one out.

With "plain" the file system implements no lock method and keeps the old
flush(fh) and release(fh): the kernel keeps the locks itself, as for every
pyfuse3 file system before the patch.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import select
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from onefile_fs import TIMEOUT, OneFileMount, mounted, operations_class, recorder, run

pytestmark = pytest.mark.mounted

# Held by an owner of another machine: no process here has its pid.
REMOTE_LOCK = (fcntl.F_WRLCK, 1000, 1999)
REMOTE_PID = 0x7FFFFFF0
OFFSET_MAX = 2**63 - 1
MAX_TASKS = 3  # fewer workers than the waiters of test_more_waiters_than_workers


# --------------------------------------------------------------- the file system (subprocess)


def serve(mountpoint: str, calls_path: str, plain: bool) -> None:
    import pyfuse3
    import trio

    from dfsfuse.metadata.locks import POSIX, LockRecord, apply, conflict, release

    record = recorder(calls_path)

    class PlainFS(operations_class()):
        """The one file, "f", with flush and release recorded, as before the patch: without lock owners."""

        async def flush(self, fh):
            record("flush", plain=True)

        async def release(self, fh):
            record("release", plain=True)

    class LockFS(PlainFS):
        """PlainFS with the locks in memory, and flush and release that end them."""

        def __init__(self):
            super().__init__()
            self.locks = [LockRecord(("remote", 1), POSIX, REMOTE_LOCK[0], REMOTE_LOCK[1], REMOTE_LOCK[2],
                                     REMOTE_PID)]
            self.changed = trio.Event()
            # The owners that set POSIX locks through each open file: at its
            # release, those of OFD locks (the open file's own) still hold theirs
            self.posix_owners: dict[int, set[int]] = {}

        def set_locks(self, locks) -> None:
            self.locks = locks
            self.changed.set()
            self.changed = trio.Event()

        async def take(self, request, wait: bool, op: str, **fields) -> None:
            while conflict(self.locks, request) is not None:
                if not wait:
                    record(op, result="conflict", **fields)
                    raise pyfuse3.FUSEError(errno.EAGAIN)
                record(op, result="waiting", **fields)
                try:
                    await self.changed.wait()
                except trio.Cancelled:
                    record(op, result="interrupted", **fields)
                    raise
            others = [r for r in self.locks if r.owner_key != request.owner_key or r.kind != request.kind]
            self.set_locks(others + apply(self.locks, request))
            record(op, result="ok", **fields)

        async def getlk(self, inode, fh, owner, lock_type, start, end, ctx):
            found = conflict(self.locks, LockRecord(owner, POSIX, lock_type, start, end))
            record("getlk", owner=owner, type=lock_type, start=start, end=end)
            if found is None:
                return (fcntl.F_UNLCK, 0, 0, 0)
            return (found.type, found.start, found.end, found.pid)

        async def setlk(self, inode, fh, owner, lock_type, start, end, pid, sleep, ctx):
            self.posix_owners.setdefault(fh, set()).add(owner)
            await self.take(LockRecord(owner, POSIX, lock_type, start, end, pid), sleep, "setlk",
                            owner=owner, type=lock_type, start=start, end=end, pid=pid, sleep=sleep)

        async def flock(self, inode, fh, owner, op, ctx):
            kind = {fcntl.LOCK_SH: fcntl.F_RDLCK, fcntl.LOCK_EX: fcntl.F_WRLCK, fcntl.LOCK_UN: fcntl.F_UNLCK}
            request = LockRecord.flock(owner, kind[op & ~fcntl.LOCK_NB], ctx.pid)
            await self.take(request, not op & fcntl.LOCK_NB, "flock", owner=owner, lock_op=op, pid=ctx.pid)

        async def flush(self, fh, lock_owner=None):
            record("flush", lock_owner=lock_owner)
            self.set_locks(release(self.locks, lock_owner, POSIX))

        async def release(self, fh, flock_owner=None):
            record("release", flock_owner=flock_owner)
            locks = self.locks
            for owner in self.posix_owners.pop(fh, set()) | {flock_owner}:
                locks = release(locks, owner)
            self.set_locks(locks)

    run(PlainFS() if plain else LockFS(), mountpoint, "locktest", 1, MAX_TASKS)


# --------------------------------------------------------------- lock owners (subprocesses)

FLOCK_STRUCT = "hhqqixxxx"  # struct flock on Linux x86_64 / aarch64: type, whence, start, len, pid
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)  # Python < 3.12 does not name it
LOCK_COMMANDS = {"setlk": fcntl.F_SETLK, "setlkw": fcntl.F_SETLKW, "getlk": fcntl.F_GETLK, "ofd_setlk": F_OFD_SETLK}


def locker() -> None:
    """Run lock calls read from stdin as JSON lines; answer each with one JSON line."""
    signal.signal(signal.SIGUSR1, lambda *_: print(json.dumps({"signal": "SIGUSR1"}), flush=True))
    fds: list[int] = []
    for line in sys.stdin:
        cmd, *args = json.loads(line)
        try:
            if cmd == "open":
                fds.append(os.open(args[0], os.O_RDWR))
                reply = {"fd": len(fds) - 1}
            elif cmd in LOCK_COMMANDS:
                fd, lock_type, start, length = args
                command = LOCK_COMMANDS[cmd]
                packed = struct.pack(FLOCK_STRUCT, lock_type, os.SEEK_SET, start, length, 0)
                answer = struct.unpack(FLOCK_STRUCT, fcntl.fcntl(fds[fd], command, packed))
                reply = {"lock": [answer[0], answer[2], answer[3], answer[4]]}
            elif cmd == "flock":
                fcntl.flock(fds[args[0]], args[1])
                reply = {"ok": True}
            elif cmd == "close":
                os.close(fds[args[0]])
                reply = {"ok": True}
            else:
                raise ValueError(cmd)
        except OSError as exc:
            reply = {"errno": exc.errno}
        print(json.dumps(reply), flush=True)


class Locker:
    """One locker process: a POSIX lock owner of its own."""

    def __init__(self, path: Path):
        self.path = path
        self.process = subprocess.Popen([sys.executable, __file__, "locker"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, bufsize=1)

    @property
    def pid(self) -> int:
        return self.process.pid

    def send(self, *cmd) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(cmd) + "\n")
        self.process.stdin.flush()

    def reply(self, timeout: float = TIMEOUT) -> dict | None:
        """The next reply, or None if none came within timeout."""
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.process.stdout.readline()
        assert line, f"locker {self.pid} exited with {self.process.wait()}"
        return json.loads(line)

    def call(self, *cmd) -> dict:
        self.send(*cmd)
        answer = self.reply()
        assert answer is not None, f"no answer to {cmd} within {TIMEOUT}s"
        return answer

    def open(self) -> int:
        return self.call("open", str(self.path))["fd"]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(TIMEOUT)
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


# --------------------------------------------------------------- fixtures and helpers


class LockMount(OneFileMount):
    """The file system of this module (LockFS, or PlainFS if *plain*) and its Locker processes."""

    def __init__(self, base: Path, plain: bool):
        super().__init__(__file__, base, *(["plain"] if plain else []))
        self.lockers: list[Locker] = []

    def locker(self) -> Locker:
        self.lockers.append(Locker(self.file))
        return self.lockers[-1]

    def wait_for_call(self, predicate, what: str) -> dict:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            for call in self.calls():
                if predicate(call):
                    return call
            time.sleep(0.02)
        raise AssertionError(f"the file system got no {what} within {TIMEOUT}s: {self.calls()}")

    def stop(self) -> None:
        try:
            for locker in self.lockers:
                locker.stop()
        finally:
            super().stop()


def _mount(test_root, request, plain: bool):
    import pyfuse3

    if getattr(pyfuse3, "DFSFUSE_LOCKS", 0) < 1:
        pytest.fail(f"pyfuse3 {pyfuse3.__version__} lacks the dfsfuse lock patch: run scripts/install.sh",
                    pytrace=False)
    yield from mounted(LockMount(test_root / "pyfuse3_locks" / request.node.name, plain))


@pytest.fixture
def lockfs(test_root, request):
    """The LockFS of this test, mounted; unmounted (and its exit checked) at the end."""
    yield from _mount(test_root, request, plain=False)


@pytest.fixture
def plainfs(test_root, request):
    yield from _mount(test_root, request, plain=True)


def ok(answer: dict) -> None:
    assert "errno" not in answer, f"failed: {errno.errorcode[answer['errno']]}"


def failed_with(answer: dict, *codes: int) -> None:
    assert answer.get("errno") in codes, f"expected {[errno.errorcode[c] for c in codes]}, got {answer}"


# --------------------------------------------------------------- tests


def test_conflicting_setlk_fails_with_eagain_and_getlk_reports_the_holder(lockfs):
    a, b = lockfs.locker(), lockfs.locker()
    fa, fb = a.open(), b.open()
    ok(a.call("setlk", fa, fcntl.F_WRLCK, 0, 100))
    failed_with(b.call("setlk", fb, fcntl.F_RDLCK, 50, 1), errno.EAGAIN, errno.EACCES)
    assert b.call("getlk", fb, fcntl.F_RDLCK, 50, 0)["lock"] == [fcntl.F_WRLCK, 0, 100, a.pid]
    ok(b.call("setlk", fb, fcntl.F_WRLCK, 100, 10))  # the byte after a's range is free
    assert a.call("getlk", fa, fcntl.F_WRLCK, 0, 100)["lock"][0] == fcntl.F_UNLCK, "an owner's own lock"

    setlks = lockfs.calls("setlk")
    assert {c["pid"] for c in setlks} == {a.pid, b.pid}
    first = setlks[0]
    assert (first["type"], first["start"], first["end"], first["sleep"]) == (fcntl.F_WRLCK, 0, 99, False)
    getlk = lockfs.calls("getlk")[0]
    assert (getlk["start"], getlk["end"]) == (50, OFFSET_MAX), "l_len 0 reaches the end of the file"


def test_a_lock_only_the_file_system_knows_is_reported(lockfs):
    """A lock held elsewhere (another machine) conflicts: the kernel asked the file system."""
    a = lockfs.locker()
    fa = a.open()
    lock_type, start, end = REMOTE_LOCK
    failed_with(a.call("setlk", fa, fcntl.F_RDLCK, 1500, 1), errno.EAGAIN, errno.EACCES)
    # The kernel reports pid 0 for a holder that is no process of this pid namespace
    assert a.call("getlk", fa, fcntl.F_RDLCK, 0, 0)["lock"] == [lock_type, start, end - start + 1, 0]
    ok(a.call("setlk", fa, fcntl.F_WRLCK, 0, 1000))


def test_setlkw_waits_until_the_holder_unlocks(lockfs):
    a, b = lockfs.locker(), lockfs.locker()
    fa, fb = a.open(), b.open()
    ok(a.call("setlk", fa, fcntl.F_WRLCK, 0, 10))
    b.send("setlkw", fb, fcntl.F_WRLCK, 5, 1)
    lockfs.wait_for_call(lambda c: c["op"] == "setlk" and c.get("pid") == b.pid and c["result"] == "waiting",
                         "waiting F_SETLKW")
    assert b.reply(timeout=0.3) is None, "F_SETLKW returned while the lock was held"
    ok(a.call("setlk", fa, fcntl.F_UNLCK, 0, 10))
    answer = b.reply()
    assert answer is not None, "F_SETLKW still waits after the unlock"
    ok(answer)
    failed_with(a.call("setlk", fa, fcntl.F_RDLCK, 5, 1), errno.EAGAIN, errno.EACCES)


def test_closing_any_descriptor_releases_the_owners_posix_locks(lockfs):
    a, b = lockfs.locker(), lockfs.locker()
    first, second = a.open(), a.open()
    fb = b.open()
    ok(a.call("setlk", first, fcntl.F_WRLCK, 0, 100))
    owner = lockfs.calls("setlk")[-1]["owner"]
    failed_with(b.call("setlk", fb, fcntl.F_WRLCK, 0, 1), errno.EAGAIN, errno.EACCES)
    ok(a.call("close", second))  # POSIX: any close of the file by the process ends its locks on it
    assert owner in {c["lock_owner"] for c in lockfs.calls("flush")}, lockfs.calls("flush")
    ok(b.call("setlk", fb, fcntl.F_WRLCK, 0, 1))


def test_release_of_an_open_file_ends_its_ofd_locks(lockfs):
    """The kernel sends no owner with the release for OFD locks (Linux 6.18): the file system
    drops the locks of the owners that locked through the released file."""
    a, b = lockfs.locker(), lockfs.locker()
    first, fb = a.open(), b.open()
    ok(a.call("ofd_setlk", first, fcntl.F_WRLCK, 0, 100))
    failed_with(b.call("ofd_setlk", fb, fcntl.F_RDLCK, 0, 1), errno.EAGAIN)
    ok(a.call("close", first))
    lockfs.wait_for_call(lambda c: c["op"] == "release", "release")
    ok(b.call("ofd_setlk", fb, fcntl.F_RDLCK, 0, 1))


def test_flock_conflicts_across_open_files_and_release_drops_it(lockfs):
    a = lockfs.locker()
    first, second = a.open(), a.open()
    ok(a.call("flock", first, fcntl.LOCK_EX | fcntl.LOCK_NB))
    failed_with(a.call("flock", second, fcntl.LOCK_EX | fcntl.LOCK_NB), errno.EWOULDBLOCK)
    flocks = lockfs.calls("flock")
    owners = {c["owner"] for c in flocks}
    assert len(owners) == 2, f"two open files, two owners: {flocks}"
    holder = flocks[0]["owner"]

    ok(a.call("close", first))  # its last descriptor: the kernel sends RELEASE (asynchronously)
    lockfs.wait_for_call(lambda c: c["op"] == "release" and c["flock_owner"] == holder, "release with flock_owner")
    ok(a.call("flock", second, fcntl.LOCK_EX | fcntl.LOCK_NB))


def test_flock_waits_and_converts(lockfs):
    a, b = lockfs.locker(), lockfs.locker()
    fa, fb = a.open(), b.open()
    ok(a.call("flock", fa, fcntl.LOCK_SH))
    ok(b.call("flock", fb, fcntl.LOCK_SH | fcntl.LOCK_NB))
    b.send("flock", fb, fcntl.LOCK_EX)  # converts b's lock, waits for a's to go
    lockfs.wait_for_call(lambda c: c["op"] == "flock" and c["pid"] == b.pid and c["result"] == "waiting",
                         "waiting flock")
    ok(a.call("flock", fa, fcntl.LOCK_UN))
    answer = b.reply()
    assert answer is not None, "flock(LOCK_EX) still waits after the unlock"
    ok(answer)
    failed_with(a.call("flock", fa, fcntl.LOCK_SH | fcntl.LOCK_NB), errno.EWOULDBLOCK)


def test_a_killed_waiter_is_interrupted_and_leaves_no_lock(lockfs):
    a, b, c = lockfs.locker(), lockfs.locker(), lockfs.locker()
    fa, fb, fc = a.open(), b.open(), c.open()
    ok(a.call("setlk", fa, fcntl.F_WRLCK, 0, 100))
    b.send("setlkw", fb, fcntl.F_WRLCK, 0, 100)
    lockfs.wait_for_call(lambda x: x["op"] == "setlk" and x.get("pid") == b.pid and x["result"] == "waiting",
                         "waiting F_SETLKW")
    b.process.kill()
    # Without interrupts the killed process would wait for the lock in the kernel, unkillable
    assert b.process.wait(TIMEOUT) == -signal.SIGKILL
    lockfs.wait_for_call(lambda x: x["op"] == "setlk" and x.get("pid") == b.pid and x["result"] == "interrupted",
                         "interrupted setlk")
    ok(a.call("setlk", fa, fcntl.F_UNLCK, 0, 0))
    ok(c.call("setlk", fc, fcntl.F_WRLCK, 0, 100))


def test_a_signal_interrupts_a_waiter_and_the_call_goes_on(lockfs):
    """SIGUSR1 with a handler: the request is interrupted (EINTR), Python's handler runs, and
    fcntl is called again (PEP 475); the lock is granted once the holder lets go."""
    a, b = lockfs.locker(), lockfs.locker()
    fa, fb = a.open(), b.open()
    ok(a.call("setlk", fa, fcntl.F_WRLCK, 0, 100))
    b.send("setlkw", fb, fcntl.F_RDLCK, 0, 100)
    waiting = lambda x: x["op"] == "setlk" and x.get("pid") == b.pid and x["result"] == "waiting"
    lockfs.wait_for_call(waiting, "waiting F_SETLKW")
    os.kill(b.pid, signal.SIGUSR1)
    assert b.reply() == {"signal": "SIGUSR1"}
    lockfs.wait_for_call(lambda x: x["op"] == "setlk" and x.get("pid") == b.pid and x["result"] == "interrupted",
                         "interrupted setlk")
    deadline = time.monotonic() + TIMEOUT
    while len([x for x in lockfs.calls() if waiting(x)]) < 2:
        assert time.monotonic() < deadline, f"no second F_SETLKW after the signal: {lockfs.calls()}"
        time.sleep(0.02)
    ok(a.call("setlk", fa, fcntl.F_UNLCK, 0, 0))
    answer = b.reply()
    assert answer is not None, "F_SETLKW still waits after the unlock"
    ok(answer)


def test_more_waiters_than_workers(lockfs):
    """Waiters do not hold the main loop's workers (MAX_TASKS): the unlock still gets through."""
    holder = lockfs.locker()
    fh = holder.open()
    ok(holder.call("setlk", fh, fcntl.F_WRLCK, 0, 100))
    waiters = [lockfs.locker() for _ in range(MAX_TASKS + 3)]
    for waiter in waiters:
        waiter.send("setlkw", waiter.open(), fcntl.F_RDLCK, 0, 100)
    for waiter in waiters:
        lockfs.wait_for_call(lambda x, pid=waiter.pid: x["op"] == "setlk" and x.get("pid") == pid
                             and x["result"] == "waiting", f"waiting F_SETLKW of {waiter.pid}")
    ok(holder.call("setlk", fh, fcntl.F_UNLCK, 0, 0))
    for waiter in waiters:
        answer = waiter.reply()
        assert answer is not None, f"waiter {waiter.pid} still waits after the unlock"
        ok(answer)


def test_without_lock_methods_the_kernel_keeps_locks_as_before(plainfs):
    a, b = plainfs.locker(), plainfs.locker()
    fa, fb = a.open(), b.open()
    ok(a.call("setlk", fa, fcntl.F_WRLCK, 0, 10))
    failed_with(b.call("setlk", fb, fcntl.F_WRLCK, 5, 1), errno.EAGAIN, errno.EACCES)
    assert b.call("getlk", fb, fcntl.F_RDLCK, 0, 0)["lock"] == [fcntl.F_WRLCK, 0, 10, a.pid]
    ok(a.call("setlk", fa, fcntl.F_RDLCK, 1500, 1))  # the file system's own lock is not asked for
    ok(a.call("flock", fa, fcntl.LOCK_EX | fcntl.LOCK_NB))
    failed_with(b.call("flock", fb, fcntl.LOCK_EX | fcntl.LOCK_NB), errno.EWOULDBLOCK)
    ok(a.call("close", fa))
    assert plainfs.calls("flush") and all(c == {"op": "flush", "plain": True} for c in plainfs.calls("flush"))
    assert not any(c["op"] in ("getlk", "setlk", "flock") for c in plainfs.calls())
    plainfs.wait_for_call(lambda c: c["op"] == "release", "release")


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], sys.argv[3], plain=sys.argv[4:] == ["plain"])
    elif sys.argv[1] == "locker":
        locker()
