"""A tiny one-file pyfuse3 file system in a subprocess, for tests of the patched pyfuse3.

test_pyfuse3_locks.py and test_pyfuse3_fallocate.py each define such a file
system, subclassing the one here, and run it in a subprocess of its own with
`python TEST_FILE serve MOUNTPOINT CALLS [ARGS...]`. This module holds what
they share.

In the subprocess:
- `operations_class()`: the base pyfuse3.Operations class, one file, "f"
  (inode FILE_INODE), kept in memory, with flush(fh) and release(fh) as before
  the patches (no lock owners) that do nothing.
- `recorder(CALLS)`: a function that appends a call the file system got to
  CALLS as one JSON line, {"op": ..., **fields}.
- `run(operations, MOUNTPOINT, fsname, *main_args)`: mounts the file system,
  prints "ready" and serves it until it is unmounted.

In the test process:
- `OneFileMount`: starts that subprocess, waits for its "ready" and the mount,
  reads CALLS, and at the end unmounts it and checks its exit; whatever
  happens, a subprocess still running is then unmounted lazily and killed by
  its PID.
- `mounted(fs)`: for fixtures, `yield from mounted(fs)` starts fs, yields it
  and stops it in `finally`.

pyfuse3 and trio are imported only inside the subprocess's functions: the test
process imports this module too.
"""

from __future__ import annotations

import errno
import json
import select
import subprocess
import sys
import time
from pathlib import Path

FILE_INODE = 2
TIMEOUT = 20.0


# --------------------------------------------------------------- the file system (subprocess)


def operations_class() -> type:
    """The base Operations class of the one-file file system (imports pyfuse3: subprocess only)."""
    import pyfuse3

    class OneFileOperations(pyfuse3.Operations):
        """One file, "f", in memory, and flush and release as before the patches: without lock owners."""

        def __init__(self):
            super().__init__()
            self.data = bytearray()
            self.next_fh = 1

        def attrs(self, inode):
            entry = pyfuse3.EntryAttributes()
            entry.st_ino = inode
            entry.st_mode = (0o40755 if inode == pyfuse3.ROOT_INODE else 0o100644)
            entry.st_size = len(self.data) if inode == FILE_INODE else 0
            entry.attr_timeout = entry.entry_timeout = 60
            return entry

        async def lookup(self, parent_inode, name, ctx):
            if parent_inode != pyfuse3.ROOT_INODE or name != b"f":
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self.attrs(FILE_INODE)

        async def getattr(self, inode, ctx):
            return self.attrs(inode)

        async def open(self, inode, flags, ctx):
            self.next_fh += 1
            return pyfuse3.FileInfo(fh=self.next_fh)

        async def read(self, fh, off, size):
            return bytes(self.data[off:off + size])

        async def write(self, fh, off, buf):
            self.data[off:off + len(buf)] = buf
            return len(buf)

        async def flush(self, fh):
            pass

        async def release(self, fh):
            pass

    return OneFileOperations


def recorder(calls_path: str):
    """A function record(op, **fields) that appends {"op": op, **fields} to CALLS as a JSON line."""
    calls = open(calls_path, "a", buffering=1)  # noqa: SIM115 - open while the file system runs

    def record(op: str, **fields) -> None:
        calls.write(json.dumps({"op": op, **fields}) + "\n")

    return record


def run(operations, mountpoint: str, fsname: str, *main_args) -> None:
    """Mount *operations*, print "ready" and serve until unmounted (pyfuse3.main(*main_args))."""
    import pyfuse3
    import trio

    options = set(pyfuse3.default_options) | {f"fsname={fsname}"}
    pyfuse3.init(operations, mountpoint, options)
    print("ready", flush=True)
    try:
        trio.run(pyfuse3.main, *main_args)
    except BaseException:
        pyfuse3.close(unmount=False)
        raise
    pyfuse3.close()


# --------------------------------------------------------------- the mount (test process)


class OneFileMount:
    """The file system of *script* (`python SCRIPT serve MOUNTPOINT CALLS *args`), mounted at base/mnt."""

    def __init__(self, script: str, base: Path, *args: str):
        self.script = script
        self.args = args
        self.base = base
        self.mountpoint = base / "mnt"
        self.calls_path = base / "calls.jsonl"
        self.log_path = base / "fs.log"
        self.mountpoint.mkdir(parents=True)
        self.file = self.mountpoint / "f"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, self.script, "serve", str(self.mountpoint), str(self.calls_path), *self.args],
                stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True)
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], TIMEOUT)
        line = self.process.stdout.readline() if ready else ""
        self.process.stdout.close()
        assert line == "ready\n", f"the file system did not start: {line!r}\n{self.log()}"
        self.file.stat()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def calls(self, op: str | None = None) -> list[dict]:
        """The calls the file system recorded, those of *op* only if given."""
        if not self.calls_path.exists():
            return []
        lines = self.calls_path.read_text().splitlines()
        return [c for c in map(json.loads, lines) if op is None or c["op"] == op]

    def stop(self) -> None:
        """Unmount, and check that the file system exited cleanly; in any case leave no mount or process."""
        if self.process is None:
            return
        try:
            for _ in range(100):
                result = subprocess.run(["fusermount3", "-u", str(self.mountpoint)], capture_output=True, text=True,
                                        check=False)
                if result.returncode == 0 or "busy" not in result.stderr.lower():
                    break
                time.sleep(0.1)
            assert result.returncode == 0, f"unmount failed: {result.stderr}"
            status = self.process.wait(TIMEOUT)
            assert status == 0, f"the file system exited with {status}\n{self.log()}"
            assert "Traceback" not in self.log(), self.log()
        finally:
            if self.process.poll() is None:
                subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], capture_output=True, check=False)
                self.process.kill()
                self.process.wait(TIMEOUT)


def mounted(fs: OneFileMount):
    """Start *fs*, yield it, and stop it however the test ended: a fixture's `yield from mounted(fs)`."""
    try:
        fs.start()
        yield fs
    finally:
        fs.stop()
