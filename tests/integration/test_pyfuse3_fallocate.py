"""The patched pyfuse3 (patches/pyfuse3/0002-fallocate.patch) hands fallocate(2) to the file system.

A tiny one-file pyfuse3 file system defined here (AllocFS, built on the one of
onefile_fs.py, which also starts and stops it) runs in a subprocess of its own
(`python test_pyfuse3_fallocate.py serve MOUNTPOINT CALLS [KIND]`).
It keeps its one file, "f", in memory and writes every fallocate call it gets
(mode, offset, length and its answer) to CALLS (JSON lines). A call without
FALLOC_FL_KEEP_SIZE grows the file, FALLOC_FL_PUNCH_HOLE and
FALLOC_FL_ZERO_RANGE zero the range, and a range beyond CAPACITY fails with
ENOSPC.

The calls come from the real tools and system calls: fallocate(1),
os.posix_fallocate, and fallocate(2) through ctypes.

KIND "plain" is a file system without a fallocate method, as every pyfuse3 file
system was before the patch (it records its writes instead); KIND "enosys" has
one that answers ENOSYS, to show what the kernel makes of that.
"""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
from onefile_fs import (
    FILE_INODE,
    TIMEOUT,
    OneFileMount,
    mounted,
    operations_class,
    recorder,
    run,
)

pytestmark = pytest.mark.mounted

CAPACITY = 64 * 1024 * 1024  # the space of AllocFS: an allocation beyond it fails with ENOSPC
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
MiB = 1024 * 1024


# --------------------------------------------------------------- the file system (subprocess)


def serve(mountpoint: str, calls_path: str, kind: str) -> None:
    import pyfuse3

    record = recorder(calls_path)

    class PlainFS(operations_class()):
        """The one file, "f", in memory, with sizes and room (statfs); no fallocate method."""

        def attrs(self, inode):
            entry = super().attrs(inode)
            entry.st_blksize = 4096
            entry.st_blocks = (entry.st_size + 511) // 512
            # Every stat asks the file system: the sizes the tests see are its own
            entry.attr_timeout = 0
            return entry

        async def setattr(self, inode, attr, fields, fh, ctx):
            if fields.update_size:
                self.resize(attr.st_size)
            return self.attrs(inode)

        async def open(self, inode, flags, ctx):
            if flags & os.O_TRUNC:  # libfuse asks the kernel for FUSE_ATOMIC_O_TRUNC
                self.resize(0)
            return await super().open(inode, flags, ctx)

        async def write(self, fh, off, buf):
            if kind == "plain":
                record("write", offset=off, length=len(buf))
            self.resize(max(len(self.data), off))
            return await super().write(fh, off, buf)

        async def statfs(self, ctx):
            stat = pyfuse3.StatvfsData()
            stat.f_bsize = stat.f_frsize = 4096
            stat.f_blocks = CAPACITY // 4096
            stat.f_bfree = stat.f_bavail = (CAPACITY - len(self.data)) // 4096
            stat.f_namemax = 255
            return stat

        def resize(self, size: int) -> None:
            if size < len(self.data):
                del self.data[size:]
            else:
                self.data.extend(bytes(size - len(self.data)))

    class AllocFS(PlainFS):
        async def fallocate(self, inode, fh, mode, offset, length):
            call = {"inode": inode, "mode": mode, "offset": offset, "length": length}
            if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
                record("fallocate", result="EOPNOTSUPP", **call)
                await super().fallocate(inode, fh, mode, offset, length)  # raises EOPNOTSUPP
            end = offset + length
            if not mode & FALLOC_FL_PUNCH_HOLE and end > CAPACITY:
                record("fallocate", result="ENOSPC", **call)
                raise pyfuse3.FUSEError(errno.ENOSPC)
            if not mode & FALLOC_FL_KEEP_SIZE and end > len(self.data):
                self.resize(end)
            if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
                stop = min(end, len(self.data))
                if offset < stop:
                    self.data[offset:stop] = bytes(stop - offset)
            record("fallocate", result="ok", **call)

    class EnosysFS(PlainFS):
        async def fallocate(self, inode, fh, mode, offset, length):
            record("fallocate", result="ENOSYS", inode=inode, mode=mode, offset=offset, length=length)
            raise pyfuse3.FUSEError(errno.ENOSYS)

    run({"alloc": AllocFS, "plain": PlainFS, "enosys": EnosysFS}[kind](), mountpoint, "fallocatetest")


# --------------------------------------------------------------- fixtures and helpers


class AllocMount(OneFileMount):
    """The file system of this module of KIND *kind*; calls() are its fallocate calls unless told."""

    def __init__(self, base: Path, kind: str):
        super().__init__(__file__, base, kind)

    def calls(self, op: str | None = "fallocate") -> list[dict]:
        return super().calls(op)

    def reset(self, data: bytes = b"") -> int:
        """Give the file *data*; the number of fallocate calls so far (for `calls_since`)."""
        self.file.write_bytes(data)
        return len(self.calls())

    def calls_since(self, mark: int) -> list[tuple[int, int, int, str]]:
        return [(c["mode"], c["offset"], c["length"], c["result"]) for c in self.calls()[mark:]]


def _mount(test_root: Path, kind: str):
    import pyfuse3

    if getattr(pyfuse3, "DFSFUSE_PATCHES", 0) < 2:
        pytest.skip(f"pyfuse3 {pyfuse3.__version__} lacks the dfsfuse fallocate patch: run scripts/install.sh")
    yield from mounted(AllocMount(test_root / "pyfuse3_fallocate" / kind, kind))


@pytest.fixture(scope="module")
def allocfs(test_root):
    """AllocFS, mounted for the module; unmounted (and its exit checked) at the end."""
    yield from _mount(test_root, "alloc")


@pytest.fixture(scope="module")
def plainfs(test_root):
    yield from _mount(test_root, "plain")


@pytest.fixture(scope="module")
def enosysfs(test_root):
    yield from _mount(test_root, "enosys")


def fallocate_tool(*args) -> subprocess.CompletedProcess:
    return subprocess.run(["fallocate", *map(str, args)], capture_output=True, text=True, check=False,
                          timeout=TIMEOUT)


def stat_size(path: Path) -> int:
    return int(subprocess.run(["stat", "-c", "%s", str(path)], capture_output=True, text=True, check=True,
                              timeout=TIMEOUT).stdout)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate_call(path: Path, mode: int, offset: int, length: int) -> int:
    """fallocate(2) on *path* opened for writing: 0 or the errno."""
    fd = os.open(path, os.O_RDWR)
    try:
        if _libc.fallocate(fd, mode, offset, length) == 0:
            return 0
        return ctypes.get_errno()
    finally:
        os.close(fd)


# --------------------------------------------------------------- tests


def test_fallocate_tool_grows_the_file(allocfs):
    mark = allocfs.reset()
    result = fallocate_tool("-l", "1M", allocfs.file)
    assert result.returncode == 0, result.stderr
    assert allocfs.calls_since(mark) == [(0, 0, MiB, "ok")]
    assert allocfs.calls()[-1]["inode"] == FILE_INODE
    assert stat_size(allocfs.file) == MiB
    with open(allocfs.file, "rb") as f:
        f.seek(MiB - 10)
        assert f.read() == bytes(10)


def test_posix_fallocate_is_one_call(allocfs):
    mark = allocfs.reset(b"abc")
    fd = os.open(allocfs.file, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 4096, 8192)
        os.posix_fallocate(fd, 0, 100)  # within the file: no change of size
    finally:
        os.close(fd)
    assert allocfs.calls_since(mark) == [(0, 4096, 8192, "ok"), (0, 0, 100, "ok")]
    assert os.stat(allocfs.file).st_size == 4096 + 8192
    assert allocfs.file.read_bytes()[:4] == b"abc\0"

    mark = len(allocfs.calls())
    result = fallocate_tool("--posix", "-o", 100000, "-l", 1000, allocfs.file)
    assert result.returncode == 0, result.stderr
    assert allocfs.calls_since(mark) == [(0, 100000, 1000, "ok")]
    assert stat_size(allocfs.file) == 101000


SIZE = 20000


@pytest.mark.parametrize(("options", "offset", "length", "mode", "size", "zeroed"), [
    (["--keep-size"], SIZE, 10000, FALLOC_FL_KEEP_SIZE, SIZE, None),
    (["--keep-size"], 100, 10000, FALLOC_FL_KEEP_SIZE, SIZE, None),
    (["--punch-hole"], 4096, 4096, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, SIZE, (4096, 8192)),
    (["--punch-hole"], 19000, 4096, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, SIZE, (19000, SIZE)),
    (["--zero-range"], 100, 50, FALLOC_FL_ZERO_RANGE, SIZE, (100, 150)),
    (["--zero-range"], 19990, 100, FALLOC_FL_ZERO_RANGE, 20090, (19990, 20090)),
    (["--zero-range", "--keep-size"], 19990, 100, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, SIZE, (19990, SIZE)),
], ids=["keep-size-beyond-eof", "keep-size-inside", "punch-hole", "punch-hole-to-eof", "zero-range",
        "zero-range-grows", "zero-range-keep-size"])
def test_fallocate_modes_reach_the_file_system(allocfs, options, offset, length, mode, size, zeroed):
    mark = allocfs.reset(b"x" * SIZE)
    result = fallocate_tool(*options, "-o", offset, "-l", length, allocfs.file)
    assert result.returncode == 0, result.stderr
    assert allocfs.calls_since(mark) == [(mode, offset, length, "ok")]
    assert stat_size(allocfs.file) == size
    # The kernel drops its cached pages of a punched or zeroed range: the zeros are read back
    expected = bytearray(b"x" * SIZE + bytes(size - SIZE))
    if zeroed:
        expected[zeroed[0]:zeroed[1]] = bytes(zeroed[1] - zeroed[0])
    assert allocfs.file.read_bytes() == expected


def test_an_errno_of_the_file_system_reaches_the_caller(allocfs):
    mark = allocfs.reset(b"x" * 100)
    result = fallocate_tool("-l", "1G", allocfs.file)
    assert result.returncode != 0
    assert os.strerror(errno.ENOSPC) in result.stderr
    fd = os.open(allocfs.file, os.O_RDWR)
    try:
        with pytest.raises(OSError) as raised:
            os.posix_fallocate(fd, CAPACITY - 10, 20)
        assert raised.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    assert fallocate_call(allocfs.file, FALLOC_FL_KEEP_SIZE, 0, CAPACITY + 1) == errno.ENOSPC
    assert stat_size(allocfs.file) == 100
    # Not ENOSYS: the kernel goes on asking the file system
    assert fallocate_call(allocfs.file, 0, 0, 200) == 0
    assert allocfs.calls_since(mark) == [(0, 0, 1024 * MiB, "ENOSPC"), (0, CAPACITY - 10, 20, "ENOSPC"),
                                         (FALLOC_FL_KEEP_SIZE, 0, CAPACITY + 1, "ENOSPC"), (0, 0, 200, "ok")]
    assert stat_size(allocfs.file) == 200


def test_modes_the_kernel_does_not_pass_on_fail_with_eopnotsupp(allocfs):
    mark = allocfs.reset(b"x" * 3 * 4096)
    for option in ("--collapse-range", "--insert-range"):
        result = fallocate_tool(option, "-o", 4096, "-l", 4096, allocfs.file)
        assert result.returncode != 0
        assert os.strerror(errno.EOPNOTSUPP) in result.stderr
    # Linux 6.18 answers these modes itself; a kernel that passed them on would get EOPNOTSUPP from AllocFS
    assert all(result == "EOPNOTSUPP" for *_, result in allocfs.calls_since(mark)), allocfs.calls_since(mark)
    assert stat_size(allocfs.file) == 3 * 4096


def test_without_a_fallocate_method_the_kernel_answers_eopnotsupp(plainfs):
    plainfs.reset()
    result = fallocate_tool("-l", "1M", plainfs.file)
    assert result.returncode != 0
    assert os.strerror(errno.EOPNOTSUPP) in result.stderr
    for mode in (0, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, FALLOC_FL_ZERO_RANGE):
        assert fallocate_call(plainfs.file, mode, 0, 4096) == errno.EOPNOTSUPP
    assert stat_size(plainfs.file) == 0

    # posix_fallocate(3) still works as before: on EOPNOTSUPP glibc falls back
    # to writing a zero byte into each block of the range (glibc 2.36: one
    # write per 4096 bytes, statfs's f_bsize)
    writes = len(plainfs.calls("write"))
    fd = os.open(plainfs.file, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, 64 * 1024)
    finally:
        os.close(fd)
    assert stat_size(plainfs.file) == 64 * 1024
    assert len(plainfs.calls("write")) - writes >= 1
    assert plainfs.calls() == []


def test_enosys_makes_the_kernel_answer_eopnotsupp_for_the_rest_of_the_mount(enosysfs):
    enosysfs.reset()
    assert fallocate_call(enosysfs.file, 0, 0, 4096) == errno.EOPNOTSUPP
    assert enosysfs.calls_since(0) == [(0, 0, 4096, "ENOSYS")]
    # The kernel remembers the ENOSYS (fc->no_fallocate): no further call reaches the file system
    assert fallocate_call(enosysfs.file, FALLOC_FL_KEEP_SIZE, 0, 4096) == errno.EOPNOTSUPP
    result = fallocate_tool("-l", "1M", enosysfs.file)
    assert result.returncode != 0
    assert os.strerror(errno.EOPNOTSUPP) in result.stderr
    assert enosysfs.calls_since(0) == [(0, 0, 4096, "ENOSYS")]


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], sys.argv[3], sys.argv[4])
