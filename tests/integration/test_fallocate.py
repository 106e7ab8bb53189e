"""fallocate(2) on the mount: allocation (mode 0, KEEP_SIZE), punched holes
that free shards, zeroed ranges, ENOSPC, the modes that are refused, and a
seeded random sequence that mixes every mode with writes, truncates, mmap and
reopening, checked against a model in memory.

Small shards (64 KiB, 16 KiB checksum blocks) so that ranges cross shard
boundaries all the time.
"""

import ctypes
import errno
import mmap
import os
import random
import re
import time

import pytest
from dfstest import (
    KiB,
    MiB,
    drop_caches,
    expect_errno,
    read_file,
    run,
    stored_bytes,
    wait_until,
)

ALSO_POSTGRES = True  # also with its metadata on PostgreSQL (conftest.py)

MOUNT_CONFIG = """
shard_size = "64KiB"
block_size = "16KiB"
"""
SHARD = 64 * KiB

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_ZERO_RANGE = 0x10
FALLOC_FL_INSERT_RANGE = 0x20

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def test_fallocate_command_makes_a_file_of_that_size_that_reads_as_zeros(workdir):
    path = workdir / "preallocated"
    run(["fallocate", "-l", "10M", path])
    st = os.stat(path)
    assert st.st_size == 10 * MiB
    assert st.st_blocks == 0  # a hole: no shard was written (glibc's fallback would have written zeros)
    assert read_file(path) == bytes(10 * MiB)
    with open(path, "r+b") as handle:  # the space can be written
        handle.seek(5 * MiB)
        handle.write(b"x" * 100)
    assert read_file(path)[5 * MiB - 1 : 5 * MiB + 101] == b"\0" + b"x" * 100 + b"\0"


def test_posix_fallocate_and_keep_size(workdir):
    path = workdir / "posix"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"head")
        os.posix_fallocate(fd, 0, 3 * SHARD + 5)
        assert os.fstat(fd).st_size == 3 * SHARD + 5
        fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, 20 * SHARD)  # past the end, size kept
        assert os.fstat(fd).st_size == 3 * SHARD + 5
        fallocate(fd, 0, SHARD, SHARD)  # inside the file: nothing changes
        assert os.fstat(fd).st_size == 3 * SHARD + 5
    finally:
        os.close(fd)
    assert read_file(path) == b"head" + bytes(3 * SHARD + 1)
    # The command line tool's keep-size option on an existing file.
    run(["fallocate", "--keep-size", "-o", "0", "-l", "1M", path])
    assert os.stat(path).st_size == 3 * SHARD + 5


def test_a_punched_hole_reads_as_zeros_and_frees_the_shards_it_covers(workdir, mount):
    path = workdir / "punched"
    data = bytearray(os.urandom(10 * SHARD + 1000))
    path.write_bytes(data)
    os.sync()
    before_blocks = os.stat(path).st_blocks
    stored_before = stored_bytes(mount)
    # From the middle of shard 1 to the middle of shard 8: shards 2..7 go whole.
    start, length = SHARD + SHARD // 2, 7 * SHARD
    run(["fallocate", "--punch-hole", "-o", str(start), "-l", str(length), path])
    data[start : start + length] = bytes(length)
    assert os.stat(path).st_size == len(data)
    drop_caches()
    assert read_file(path) == data
    freed = (before_blocks - os.stat(path).st_blocks) * 512
    assert freed >= 6 * SHARD, f"punching {length} bytes freed {freed}"
    # The replicas of the shards it covered are collected.
    wait_until(lambda: stored_before - stored_bytes(mount) >= 6 * SHARD, "the punched shards to leave the stores")
    # A punch past the end changes nothing, and the tail of the file can be punched to its end.
    run(["fallocate", "--punch-hole", "-o", str(len(data) + 10), "-l", "4096", path])
    run(["fallocate", "--punch-hole", "-o", str(9 * SHARD), "-l", str(2 * SHARD), path])
    data[9 * SHARD :] = bytes(len(data) - 9 * SHARD)
    drop_caches()
    assert read_file(path) == data


def test_zero_range_zeroes_and_may_grow_the_file(workdir):
    path = workdir / "zeroed"
    data = bytearray(os.urandom(3 * SHARD))
    path.write_bytes(data)
    run(["fallocate", "--zero-range", "-o", "1000", "-l", "5000", path])
    data[1000:6000] = bytes(5000)
    assert read_file(path) == data
    run(["fallocate", "--zero-range", "-o", str(2 * SHARD), "-l", str(3 * SHARD), path])  # grows
    data[2 * SHARD :] = bytes(SHARD)
    data += bytes(2 * SHARD)
    assert os.stat(path).st_size == 5 * SHARD
    drop_caches()
    assert read_file(path) == data
    run(["fallocate", "--zero-range", "--keep-size", "-o", str(4 * SHARD), "-l", str(4 * SHARD), path])
    assert os.stat(path).st_size == 5 * SHARD


def test_allocating_more_than_the_free_space_is_enospc_and_changes_nothing(workdir):
    path = workdir / "too-big"
    path.write_bytes(b"small")
    result = run(["fallocate", "-l", "100T", path], check=False)
    assert result.returncode != 0 and "No space left on device" in result.stderr, result.stderr
    assert os.stat(path).st_size == 5
    fd = os.open(path, os.O_RDWR)
    try:
        assert expect_errno(errno.ENOSPC, os.posix_fallocate, fd, 0, 100 * 2**40)
        assert expect_errno(errno.ENOSPC, fallocate, fd, FALLOC_FL_KEEP_SIZE, 0, 100 * 2**40)
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 100 * 2**40)  # frees: never ENOSPC
    finally:
        os.close(fd)
    assert read_file(path) == bytes(5)


def test_a_punch_over_a_huge_sparse_file_costs_what_the_file_holds(workdir):
    path = workdir / "sparse"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"start", 0)
        os.pwrite(fd, b"far", 2**50)
        os.ftruncate(fd, 2**62)
        started = time.monotonic()
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 2, 2**62 - 2)
        fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 0, 2**62)
        assert time.monotonic() - started < 10, "a punch visited every shard index of the range"
        assert os.fstat(fd).st_size == 2**62
        assert os.pread(fd, 5, 0) == bytes(5) and os.pread(fd, 3, 2**50) == bytes(3)
    finally:
        os.close(fd)


def test_collapse_and_insert_range_are_not_supported(workdir):
    path = workdir / "shifts"
    path.write_bytes(os.urandom(4 * SHARD))
    fd = os.open(path, os.O_RDWR)
    try:
        for mode in (FALLOC_FL_COLLAPSE_RANGE, FALLOC_FL_INSERT_RANGE):
            assert expect_errno(errno.EOPNOTSUPP, fallocate, fd, mode, SHARD, SHARD)
        assert expect_errno(errno.EOPNOTSUPP, fallocate, fd, FALLOC_FL_PUNCH_HOLE, 0, SHARD)  # needs KEEP_SIZE
    finally:
        os.close(fd)
    result = run(["fallocate", "--collapse-range", "-o", str(SHARD), "-l", str(SHARD), path], check=False)
    assert result.returncode != 0 and re.search(r"Operation not supported", result.stderr), result.stderr


MAX_SIZE = 24 * SHARD
MODES = (0, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, FALLOC_FL_ZERO_RANGE,
         FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE)


def _apply_fallocate(model: bytearray, mode: int, offset: int, length: int) -> None:
    """What fallocate(2) does to a file's bytes, as Linux defines it."""
    end = offset + length
    if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
        stop = min(end, len(model))
        if offset < stop:
            model[offset:stop] = bytes(stop - offset)
    if not mode & FALLOC_FL_KEEP_SIZE and end > len(model):
        model.extend(bytes(end - len(model)))


@pytest.mark.parametrize("seed", [1, 2])
def test_random_fallocate_mix_matches_a_model(workdir, seed):
    rng = random.Random(seed)
    path = workdir / f"random-{seed}.bin"
    model = bytearray()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    history: list[str] = []
    try:
        for step in range(1500):
            roll = rng.random()
            if roll < 0.30:
                offset = rng.randrange(0, MAX_SIZE)
                length = min(rng.choice((1, 4096, rng.randrange(1, 3 * SHARD))), MAX_SIZE - offset) or 1
                mode = rng.choice(MODES)
                op = f"fallocate(mode={mode:#x}, {offset}, {length})"
                fallocate(fd, mode, offset, length)
                _apply_fallocate(model, mode, offset, length)
            elif roll < 0.55:
                offset = rng.randrange(0, MAX_SIZE - 1)
                data = rng.randbytes(min(rng.choice((1, 4096, rng.randrange(1, 2 * SHARD))), MAX_SIZE - offset))
                op = f"pwrite({len(data)} at {offset})"
                os.pwrite(fd, data, offset)
                if offset > len(model):
                    model.extend(bytes(offset - len(model)))
                model[offset : offset + len(data)] = data
            elif roll < 0.63:
                new_size = rng.randrange(0, MAX_SIZE)
                op = f"ftruncate({new_size})"
                os.ftruncate(fd, new_size)
                del model[new_size:]
                model.extend(bytes(new_size - len(model)))
            elif roll < 0.73 and model:
                offset = rng.randrange(0, len(model))
                data = rng.randbytes(min(rng.randrange(1, SHARD), len(model) - offset))
                op = f"mmap write({len(data)} at {offset})"
                with mmap.mmap(fd, len(model)) as mapped:
                    mapped[offset : offset + len(data)] = data
                    if rng.random() < 0.5:
                        mapped.flush()
                model[offset : offset + len(data)] = data
            elif roll < 0.80:
                op = "close and reopen" + (" after dropping caches" if roll < 0.74 else "")
                os.close(fd)
                fd = -1
                if roll < 0.74:
                    drop_caches()
                fd = os.open(path, os.O_RDWR)
            else:
                offset = rng.randrange(0, len(model) + SHARD)
                length = rng.randrange(1, 3 * SHARD)
                op = f"pread({length} at {offset})"
                got = os.pread(fd, length, offset)
                assert got == bytes(model[offset : offset + length]), f"step {step}: {op} differs; {history[-8:]}"
            history.append(op)
            assert os.fstat(fd).st_size == len(model), f"step {step}: size after {op}; {history[-8:]}"
    finally:
        if fd >= 0:
            os.close(fd)
    drop_caches()
    assert read_file(path) == model
