"""Compression on the mount: user.dfs.compression per directory (inherited),
the config's default, shards stored smaller and read back in any range,
incompressible data stored plain, overwrites and truncates of compressed
files, a tree mixing plain, zstd and lz4 files, and status's figures.

Small shards (256 KiB) so that files span several and patches happen. The
module runs on local node stores and on node servers (compressed payloads
over the wire).
"""

import errno
import os
import random

from dfstest import (
    KiB,
    MiB,
    drop_caches,
    expect_errno,
    parse_status,
    read_file,
    run,
    stored_bytes,
    write_file,
)

ALSO_REMOTE = True

MOUNT_CONFIG = """
shard_size = "256KiB"
block_size = "16KiB"
trash_days = 0
"""
REPLICAS = 2

TEXT = b"".join(b"%08d: the quick brown fox jumps over the lazy dog\n" % n for n in range(60_000))  # ~3.4 MB


def setfattr(path, name: str, value: str) -> None:
    os.setxattr(path, name, value.encode())


def test_the_policy_is_inherited_and_bad_values_are_refused(workdir):
    setfattr(workdir, "user.dfs.compression", "ZSTD")
    assert os.getxattr(workdir, "user.dfs.compression") == b"zstd"
    (workdir / "sub").mkdir()
    (workdir / "sub" / "file").write_bytes(b"x")
    assert os.getxattr(workdir / "sub", "user.dfs.compression") == b"zstd"
    assert os.getxattr(workdir / "sub" / "file", "user.dfs.compression") == b"zstd"
    expect_errno(errno.EINVAL, os.setxattr, workdir, "user.dfs.compression", b"brotli")
    expect_errno(errno.EINVAL, os.setxattr, workdir, "user.dfs.ec", b"4+2")  # three nodes: 4+2 needs six
    expect_errno(errno.EINVAL, os.setxattr, workdir, "user.dfs.ec", b"2")
    result = run(["setfattr", "-n", "user.dfs.compression", "-v", "gzip", workdir], check=False)
    assert result.returncode != 0 and "Invalid argument" in result.stderr


def test_a_compressible_file_takes_a_fraction_of_the_disk_and_reads_back(mount, workdir):
    setfattr(workdir, "user.dfs.compression", "zstd")
    before = stored_bytes(mount)
    write_file(workdir / "log", TEXT)
    grown = stored_bytes(mount) - before
    assert grown < REPLICAS * len(TEXT) // 5, f"{grown} bytes on the nodes for {len(TEXT)} compressible bytes"
    drop_caches()
    assert read_file(workdir / "log") == TEXT
    rng = random.Random(5)
    with open(workdir / "log", "rb", buffering=0) as handle:
        for _ in range(200):
            offset = rng.randrange(len(TEXT))
            assert os.pread(handle.fileno(), 4096, offset) == TEXT[offset : offset + 4096]
    report = parse_status(mount.status(as_json=True))
    assert report["payload_bytes"] < report["stored_bytes"]
    assert os.stat(workdir / "log").st_size == len(TEXT)


def test_incompressible_data_is_stored_plain_with_no_growth(mount, workdir):
    setfattr(workdir, "user.dfs.compression", "zstd")
    noise = os.urandom(2 * MiB)
    before = stored_bytes(mount)
    write_file(workdir / "noise", noise)
    grown = stored_bytes(mount) - before
    assert REPLICAS * len(noise) <= grown <= REPLICAS * len(noise) * 1.01
    drop_caches()
    assert read_file(workdir / "noise") == noise


def test_overwrites_appends_and_truncates_of_a_compressed_file(workdir):
    setfattr(workdir, "user.dfs.compression", "lz4")
    path = workdir / "edited"
    model = bytearray(TEXT[: 1 * MiB])
    write_file(path, bytes(model))
    rng = random.Random(11)
    fd = os.open(path, os.O_RDWR)
    try:
        for step in range(60):
            choice = rng.random()
            if choice < 0.6:  # small overwrites: patches on compressed shards
                offset = rng.randrange(len(model) + 1)
                data = bytes([65 + step % 26]) * rng.choice((1, 100, 4096, 5000))
                os.pwrite(fd, data, offset)
                model[len(model) : offset + len(data)] = bytes(max(0, offset + len(data) - len(model)))
                model[offset : offset + len(data)] = data
            elif choice < 0.8:
                size = rng.randrange(2 * len(model) + 1)
                os.ftruncate(fd, size)
                model[size:] = b""
                model.extend(bytes(size - len(model)))
            else:
                os.fsync(fd)
                os.close(fd)
                drop_caches()
                assert read_file(path) == model, f"step {step}"
                fd = os.open(path, os.O_RDWR)
    finally:
        os.close(fd)
    drop_caches()
    assert read_file(path) == model


def test_a_tree_of_plain_zstd_and_lz4_files_copies_and_compares(workdir):
    for name, compression in (("plain", None), ("zstd", "zstd"), ("lz4", "lz4")):
        directory = workdir / "src" / name
        directory.mkdir(parents=True)
        if compression:
            setfattr(directory, "user.dfs.compression", compression)
        for n in range(20):
            write_file(directory / f"f{n}", TEXT[n * 1000 : n * 1000 + n * 37 * KiB] + os.urandom(n * 100))
    run(["cp", "-a", workdir / "src", workdir / "copy"])
    drop_caches()
    run(["diff", "-r", workdir / "src", workdir / "copy"])
    assert os.getxattr(workdir / "copy" / "lz4" / "f3", "user.dfs.compression") == b"lz4"


def test_the_configured_default_applies_where_no_directory_says_otherwise(mount_factory):
    fs = mount_factory.new(config=MOUNT_CONFIG + 'compression = "zstd"\n')
    before = stored_bytes(fs)
    write_file(fs.mountpoint / "log", TEXT)
    assert stored_bytes(fs) - before < REPLICAS * len(TEXT) // 5
    off = fs.mountpoint / "off"
    off.mkdir()
    setfattr(off, "user.dfs.compression", "off")
    before = stored_bytes(fs)
    write_file(off / "log", TEXT)
    assert stored_bytes(fs) - before >= REPLICAS * len(TEXT)
    drop_caches()
    assert read_file(fs.mountpoint / "log") == read_file(off / "log") == TEXT
    text = fs.status()
    assert "after compression and encryption" in text and "bytes per logical byte" in text
