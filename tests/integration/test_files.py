"""Regular files on a real mount: open flags, reads and writes at any offset,
truncate, unlink of open files, fsync, large sparse files, name lengths."""

import errno
import os

from dfstest import GiB, KiB, MiB, drop_caches, expect_errno, read_file, write_file

ALSO_REMOTE = True  # also on three node servers (conftest.py)
ALSO_POSTGRES = True  # also with its metadata on PostgreSQL (conftest.py)

# small shards so that offsets cross shard boundaries in every test
MOUNT_CONFIG = """
shard_size = "1MiB"
block_size = "64KiB"
"""


def pattern(size: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed) % 251 for i in range(size))


def test_create_write_read(workdir):
    path = workdir / "f"
    data = os.urandom(3 * MiB + 12345)
    write_file(path, data)
    assert path.stat().st_size == len(data)
    assert read_file(path) == data
    drop_caches()
    assert read_file(path) == data


def test_open_missing_without_creat_is_enoent(workdir):
    expect_errno(errno.ENOENT, os.open, workdir / "nope", os.O_RDONLY)
    expect_errno(errno.ENOENT, os.open, workdir / "nope", os.O_WRONLY)
    expect_errno(errno.ENOENT, os.stat, workdir / "nope")


def test_o_creat_o_excl(workdir):
    path = workdir / "f"
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    os.close(fd)
    expect_errno(errno.EEXIST, os.open, path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    os.symlink("dangling-target", workdir / "link")
    expect_errno(errno.EEXIST, os.open, workdir / "link", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    assert not (workdir / "dangling-target").exists()
    os.mkdir(workdir / "d")
    expect_errno(errno.EEXIST, os.open, workdir / "d", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)


def test_o_creat_without_excl_opens_existing(workdir):
    path = workdir / "f"
    write_file(path, b"keep me")
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        assert os.read(fd, 100) == b"keep me"
    finally:
        os.close(fd)
    assert (path.stat().st_mode & 0o777) == 0o644


def test_o_trunc(workdir):
    path = workdir / "f"
    write_file(path, os.urandom(2 * MiB + 5))
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        assert os.fstat(fd).st_size == 0
        os.write(fd, b"new")
    finally:
        os.close(fd)
    assert read_file(path) == b"new"
    drop_caches()
    assert read_file(path) == b"new"


def test_o_append(workdir):
    path = workdir / "f"
    write_file(path, b"A" * 1000)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, b"tail1")
        os.lseek(fd, 10, os.SEEK_SET)
        os.write(fd, b"tail2")
    finally:
        os.close(fd)
    # a second writer appends after what the first wrote
    fd1 = os.open(path, os.O_WRONLY | os.O_APPEND)
    fd2 = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd1, b"x1")
        os.write(fd2, b"y2")
        os.write(fd1, b"z3")
    finally:
        os.close(fd1)
        os.close(fd2)
    assert read_file(path) == b"A" * 1000 + b"tail1tail2x1y2z3"
    drop_caches()
    assert read_file(path) == b"A" * 1000 + b"tail1tail2x1y2z3"


def test_pwrite_at_offsets_and_gaps(workdir):
    path = workdir / "f"
    expected = bytearray()
    writes = [(0, b"start"), (5 * MiB + 3, b"far"), (MiB - 2, b"ACROSS"), (100, b"mid"), (2 * MiB, pattern(MiB + 7))]
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for offset, data in writes:
            assert os.pwrite(fd, data, offset) == len(data)
            if len(expected) < offset + len(data):
                expected.extend(bytes(offset + len(data) - len(expected)))
            expected[offset : offset + len(data)] = data
        assert os.fstat(fd).st_size == len(expected)
        # read back while the data may still be buffered
        assert os.pread(fd, len(expected) + 10, 0) == bytes(expected)
        assert os.pread(fd, 10, MiB - 4) == bytes(expected[MiB - 4 : MiB + 6])
        assert os.pread(fd, 10, len(expected) + 100) == b""
    finally:
        os.close(fd)
    drop_caches()
    assert read_file(path) == bytes(expected)
    # the gap between writes reads as zeros
    with open(path, "rb") as handle:
        handle.seek(3 * MiB + 7)  # up to the write at 5 MiB + 3
        assert handle.read(2 * MiB - 4) == bytes(2 * MiB - 4)


def test_overwrite_inside_shard_keeps_rest(workdir):
    path = workdir / "f"
    base = bytearray(pattern(3 * MiB))
    write_file(path, bytes(base))
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\xff" * 10, MiB + 500)
        base[MiB + 500 : MiB + 510] = b"\xff" * 10
    finally:
        os.close(fd)
    drop_caches()
    assert read_file(path) == bytes(base)


def test_truncate_grow_and_shrink(workdir):
    path = workdir / "f"
    data = pattern(2 * MiB + 100)
    write_file(path, data)
    os.truncate(path, 3 * MiB)
    assert path.stat().st_size == 3 * MiB
    assert read_file(path) == data + bytes(3 * MiB - len(data))
    os.truncate(path, MiB + 10)  # cut inside the second shard
    assert path.stat().st_size == MiB + 10
    assert read_file(path) == data[: MiB + 10]
    os.truncate(path, 4 * MiB)  # regrow: what was cut must read as zeros
    drop_caches()
    assert read_file(path) == data[: MiB + 10] + bytes(4 * MiB - MiB - 10)
    os.truncate(path, 0)
    assert path.stat().st_size == 0
    assert read_file(path) == b""


def test_ftruncate_with_buffered_writes(workdir):
    path = workdir / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"\x11" * (2 * MiB))
        os.ftruncate(fd, 1000)
        assert os.fstat(fd).st_size == 1000
        os.ftruncate(fd, 3000)
        assert os.pread(fd, 4000, 0) == b"\x11" * 1000 + bytes(2000)
        os.pwrite(fd, b"\x22", 5000)
        assert os.fstat(fd).st_size == 5001
    finally:
        os.close(fd)
    drop_caches()
    assert read_file(path) == b"\x11" * 1000 + bytes(4000) + b"\x22"


def test_truncate_errors(workdir):
    expect_errno(errno.ENOENT, os.truncate, workdir / "missing", 10)
    os.mkdir(workdir / "d")
    expect_errno(errno.EISDIR, os.truncate, workdir / "d", 10)
    write_file(workdir / "f", b"x")
    expect_errno(errno.EINVAL, os.truncate, workdir / "f", -1)
    fd = os.open(workdir / "f", os.O_RDONLY)
    try:
        expect_errno((errno.EINVAL, errno.EBADF), os.ftruncate, fd, 0)
    finally:
        os.close(fd)


def test_unlink_open_file_stays_readable(workdir):
    os.setxattr(workdir, "user.dfs.trash_days", b"0")  # no trash here: the file has no name left
    path = workdir / "f"
    data = os.urandom(2 * MiB + 3)
    write_file(path, data)
    fd = os.open(path, os.O_RDWR)
    try:
        os.unlink(path)
        assert not path.exists()
        expect_errno(errno.ENOENT, os.stat, path)
        assert os.fstat(fd).st_nlink == 0
        assert os.pread(fd, len(data) + 1, 0) == data
        os.pwrite(fd, b"more", len(data))
        assert os.pread(fd, 10, len(data)) == b"more"
        assert "f" not in os.listdir(workdir)
        drop_caches()
        assert os.pread(fd, len(data), 0) == data
        # a new file of the same name is a different file
        write_file(path, b"other")
        assert os.pread(fd, 4, len(data)) == b"more"
        assert read_file(path) == b"other"
    finally:
        os.close(fd)
    assert read_file(path) == b"other"


def test_unlink_errors(workdir):
    expect_errno(errno.ENOENT, os.unlink, workdir / "missing")
    os.mkdir(workdir / "d")
    expect_errno(errno.EISDIR, os.unlink, workdir / "d")
    write_file(workdir / "f", b"")
    expect_errno(errno.ENOTDIR, os.stat, workdir / "f" / "x")
    expect_errno(errno.ENOTDIR, os.open, workdir / "f" / "x", os.O_CREAT | os.O_WRONLY, 0o644)


def test_open_directory_for_writing_is_eisdir(workdir):
    os.mkdir(workdir / "d")
    expect_errno(errno.EISDIR, os.open, workdir / "d", os.O_WRONLY)
    write_file(workdir / "f", b"")
    expect_errno(errno.ENOTDIR, os.open, workdir / "f", os.O_RDONLY | os.O_DIRECTORY)


def test_fsync_fdatasync_and_directory_fsync(workdir):
    path = workdir / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"a" * (MiB + 1))
        os.fsync(fd)
        os.write(fd, b"b" * 100)
        os.fdatasync(fd)
        assert os.fstat(fd).st_size == MiB + 101
    finally:
        os.close(fd)
    dirfd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)
    assert read_file(path) == b"a" * (MiB + 1) + b"b" * 100


def test_sparse_file_takes_little_space(workdir):
    path = workdir / "sparse"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, 100 * MiB)
    finally:
        os.close(fd)
    st = path.stat()
    assert st.st_size == 100 * MiB
    assert st.st_blocks * 512 < 64 * KiB, f"an empty 100 MiB sparse file uses {st.st_blocks} blocks"
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\x01" * MiB, 50 * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    st = path.stat()
    used = st.st_blocks * 512
    assert MiB <= used <= 3 * MiB, f"1 MiB written in a sparse file: st_blocks={st.st_blocks}"
    with open(path, "rb") as handle:
        handle.seek(49 * MiB)
        assert handle.read(MiB) == bytes(MiB)
        assert handle.read(MiB) == b"\x01" * MiB
        assert handle.read(MiB) == bytes(MiB)


def test_blocks_of_a_full_file(workdir):
    path = workdir / "f"
    write_file(path, os.urandom(2 * MiB), fsync=True)
    st = path.stat()
    assert 2 * MiB <= st.st_blocks * 512 <= 2 * MiB + 64 * KiB, f"st_blocks={st.st_blocks} for 2 MiB"
    assert st.st_blksize > 0


def test_file_larger_than_4gib(workdir):
    path = workdir / "big"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"ABCD", 4 * GiB - 2)  # straddles 2**32
        os.pwrite(fd, b"end", 5 * GiB)
        assert os.fstat(fd).st_size == 5 * GiB + 3
        assert os.pread(fd, 4, 4 * GiB - 2) == b"ABCD"
        assert os.pread(fd, 4096, 4 * GiB + 100) == bytes(4096)  # the hole past 4 GiB
        assert os.pread(fd, 10, 5 * GiB) == b"end"
        assert os.pread(fd, 6, 5 * GiB - 3) == b"\0\0\0end"
    finally:
        os.close(fd)
    drop_caches()
    st = path.stat()
    assert st.st_size == 5 * GiB + 3
    assert st.st_blocks * 512 < 8 * MiB, f"a 5 GiB file with 7 bytes written uses {st.st_blocks} blocks"
    with open(path, "rb") as handle:
        handle.seek(4 * GiB - 2)
        assert handle.read(4) == b"ABCD"
        handle.seek(4 * GiB + 3 * MiB)
        assert handle.read(MiB) == bytes(MiB)
        handle.seek(5 * GiB)
        assert handle.read() == b"end"
    os.truncate(path, 4 * GiB + 1)
    with open(path, "rb") as handle:
        handle.seek(4 * GiB - 2)
        assert handle.read() == b"ABC"


def test_name_lengths(workdir):
    ok = "n" * 255
    too_long = "n" * 256
    write_file(workdir / ok, b"ok")
    assert read_file(workdir / ok) == b"ok"
    assert ok in os.listdir(workdir)
    utf8 = "é" * 127 + "x"  # 255 bytes
    assert len(utf8.encode()) == 255
    os.mkdir(workdir / utf8)
    assert utf8 in os.listdir(workdir)
    os.rename(workdir / ok, workdir / utf8 / ok)
    assert read_file(workdir / utf8 / ok) == b"ok"

    expect_errno(errno.ENAMETOOLONG, os.open, workdir / too_long, os.O_CREAT | os.O_WRONLY, 0o644)
    expect_errno(errno.ENAMETOOLONG, os.mkdir, workdir / too_long)
    expect_errno(errno.ENAMETOOLONG, os.symlink, "target", workdir / too_long)
    expect_errno(errno.ENAMETOOLONG, os.link, workdir / utf8 / ok, workdir / too_long)
    expect_errno(errno.ENAMETOOLONG, os.rename, workdir / utf8 / ok, workdir / too_long)
    expect_errno(errno.ENAMETOOLONG, os.mkfifo, workdir / too_long)
    expect_errno((errno.ENAMETOOLONG, errno.ENOENT), os.stat, workdir / too_long)
    assert sorted(os.listdir(workdir)) == [utf8]


def test_unusual_names(workdir):
    names = [b"with space", b"new\nline", b"\xff\xfe not utf-8", b"-dash", b"...", b"x" * 200 + b"\xc3\xa9", b"tab\there"]
    base = os.fsencode(workdir)
    for i, name in enumerate(names):
        write_file(os.path.join(base, name), bytes([i]) * (i + 1))
    assert sorted(os.listdir(base)) == sorted(names)
    for i, name in enumerate(names):
        assert read_file(os.path.join(base, name)) == bytes([i]) * (i + 1)
    for name in names:
        os.unlink(os.path.join(base, name))
    assert os.listdir(base) == []


def test_read_write_many_small_files(workdir):
    contents = {f"file{i:03d}": os.urandom(i * 37) for i in range(200)}
    for name, data in contents.items():
        write_file(workdir / name, data)
    drop_caches()
    for name, data in contents.items():
        assert read_file(workdir / name) == data
    assert sorted(os.listdir(workdir)) == sorted(contents)


def test_the_mount_reads_ahead_one_mebibyte(mount):
    """The kernel sends reads as large as the mount's read-ahead window, which
    the mount raises to 1 MiB (dfsfuse/fuse/readahead.py)."""
    from dfsfuse.fuse.readahead import READ_AHEAD_KB, mount_device

    device = mount_device(os.path.realpath(mount.mountpoint))
    assert device is not None
    with open(f"/sys/class/bdi/{device}/read_ahead_kb") as handle:
        assert int(handle.read()) == READ_AHEAD_KB == 1024
