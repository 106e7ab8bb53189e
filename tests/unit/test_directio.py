"""Writing files with O_DIRECT: whole blocks direct, the tail through the page cache."""

from __future__ import annotations

import fcntl
import itertools
import os

import pytest

from dfsfuse.storage.directio import ALIGN, CHUNK, supports_direct_io, write_direct


def _open_for_direct_write(path) -> int:
    direct = os.O_DIRECT if supports_direct_io(str(path.parent)) else 0
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | direct, 0o644)


def test_the_probe_leaves_nothing_behind(tmp_path):
    assert supports_direct_io(str(tmp_path)) in (True, False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "size",
    [0, 1, ALIGN - 1, ALIGN, ALIGN + 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 1076, 4 * CHUNK + 52 + 64 * 16],
)
def test_write_direct_writes_exactly_the_parts(tmp_path, size):
    data = os.urandom(size)
    # Uneven parts that straddle chunk and block boundaries, of every buffer type.
    cuts = sorted({0, size, min(size, 52), min(size, 1076), size // 3, size // 2 + 7})
    pieces = [data[start:end] for start, end in itertools.pairwise(cuts)]
    parts = [bytearray(piece) if i % 3 == 1 else memoryview(piece) if i % 3 == 2 else piece
             for i, piece in enumerate(pieces)]
    path = tmp_path / "replica"
    fd = _open_for_direct_write(path)
    try:
        assert write_direct(fd, parts) == size
        os.fsync(fd)
    finally:
        os.close(fd)
    assert path.read_bytes() == data


def test_o_direct_stays_on_for_whole_blocks_only(tmp_path):
    if not supports_direct_io(str(tmp_path)):
        return  # nothing to switch off: the data went through the page cache
    for name, size, still_direct in (("whole", 2 * CHUNK + ALIGN, True), ("tail", CHUNK + 10, False)):
        fd = _open_for_direct_write(tmp_path / name)
        try:
            write_direct(fd, [os.urandom(size)])
            assert bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT) == still_direct
        finally:
            os.close(fd)


def test_a_directory_that_cannot_be_written_takes_no_direct_io(tmp_path):
    assert not supports_direct_io(str(tmp_path / "absent"))
