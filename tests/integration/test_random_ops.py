"""A seeded random sequence of writes, truncates and reads on the mount, run
side by side on a local file; every read and the final contents must agree.

Small shards (64 KiB, 16 KiB checksum blocks) so that the operations cross
shard and block boundaries all the time.
"""

import os
import random

import pytest
from dfstest import KiB, MiB, drop_caches, read_file

ALSO_REMOTE = True  # also on three node servers (conftest.py)
ALSO_POSTGRES = True  # also with its metadata on PostgreSQL (conftest.py)

MOUNT_CONFIG = """
shard_size = "64KiB"
block_size = "16KiB"
"""

MAX_SIZE = 3 * MiB


class Pair:
    """The same file on the mount and on the local disk, each with one descriptor."""

    def __init__(self, mounted, local):
        self.paths = (mounted, local)
        self.fds = [-1, -1]
        self.open()

    def open(self, flags=os.O_RDWR | os.O_CREAT):
        self.fds = [os.open(path, flags, 0o644) for path in self.paths]

    def close(self):
        for fd in self.fds:
            if fd >= 0:
                os.close(fd)
        self.fds = [-1, -1]

    def both(self, func, *args):
        return [func(fd, *args) for fd in self.fds]


def _check_equal(results, step, op):
    mounted, local = results
    if mounted != local:
        detail = ""
        if isinstance(mounted, bytes) and isinstance(local, bytes):
            first = next((i for i, (a, b) in enumerate(zip(mounted, local)) if a != b), min(len(mounted), len(local)))
            detail = f" (lengths {len(mounted)} vs {len(local)}, first difference at byte {first})"
        else:
            detail = f" ({mounted!r} vs {local!r})"
        pytest.fail(f"step {step}: {op} gave different results on the mount and locally{detail}")


@pytest.mark.parametrize("seed", [1, 2])
def test_random_sequence_matches_local_file(workdir, local_tmp, mount, seed):
    rng = random.Random(seed)
    pair = Pair(workdir / "random.bin", local_tmp / "random.bin")
    history = []
    try:
        for step in range(2500):
            size = os.fstat(pair.fds[1]).st_size
            roll = rng.random()
            if roll < 0.45:
                offset = rng.randrange(0, MAX_SIZE)
                length = rng.choice((1, 7, 4096, rng.randrange(1, 200 * KiB)))
                length = min(length, MAX_SIZE - offset) or 1
                data = rng.randbytes(length)
                op = f"pwrite({length} bytes at {offset})"
                _check_equal(pair.both(os.pwrite, data, offset), step, op)
            elif roll < 0.55:
                new_size = rng.choice((0, rng.randrange(0, MAX_SIZE), size + rng.randrange(-70 * KiB, 70 * KiB)))
                new_size = max(0, min(new_size, MAX_SIZE))
                op = f"ftruncate({new_size})"
                pair.both(os.ftruncate, new_size)
            elif roll < 0.90:
                offset = rng.randrange(0, max(size + 100 * KiB, 1))
                length = rng.randrange(1, 300 * KiB)
                op = f"pread({length} at {offset})"
                _check_equal(pair.both(os.pread, length, offset), step, op)
            elif roll < 0.94:
                op = "fsync"
                pair.both(os.fsync)
            elif roll < 0.98:
                op = "close and reopen"
                pair.close()
                pair.open(os.O_RDWR)
            else:
                op = "drop caches"
                drop_caches()
            history.append(op)
            if step % 100 == 0:
                _check_equal([os.fstat(fd).st_size for fd in pair.fds], step, f"size after {op}")
        _check_equal([os.fstat(fd).st_size for fd in pair.fds], "end", "size")
    finally:
        pair.close()
    expected = read_file(local_tmp / "random.bin")
    drop_caches()
    assert read_file(workdir / "random.bin") == expected, "final contents differ"
    mount.remount()
    got = read_file(workdir / "random.bin")
    assert len(got) == len(expected)
    assert got == expected, "contents differ after a remount"


def test_interleaved_writers_on_two_files(workdir, local_tmp):
    """Two files written alternately in small pieces through several descriptors each."""
    rng = random.Random(7)
    names = ("a", "b")
    mounted = {n: [os.open(workdir / n, os.O_RDWR | os.O_CREAT, 0o644) for _ in range(2)] for n in names}
    local = {n: bytearray() for n in names}
    try:
        for _ in range(1500):
            name = rng.choice(names)
            fd = rng.choice(mounted[name])
            offset = rng.randrange(0, 600 * KiB)
            data = rng.randbytes(rng.randrange(1, 20 * KiB))
            os.pwrite(fd, data, offset)
            buf = local[name]
            if len(buf) < offset + len(data):
                buf.extend(bytes(offset + len(data) - len(buf)))
            buf[offset : offset + len(data)] = data
            if rng.random() < 0.1:
                other = rng.choice(mounted[name])
                check_off = rng.randrange(0, len(buf))
                assert os.pread(other, 5000, check_off) == bytes(buf[check_off : check_off + 5000])
    finally:
        for fds in mounted.values():
            for fd in fds:
                os.close(fd)
    drop_caches()
    for name in names:
        assert read_file(workdir / name) == bytes(local[name])
