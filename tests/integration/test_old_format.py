"""A file system written before issue 11 (schema 6, plain replicas) mounts,
reads back exactly, and takes compressed files next to its old ones.

fixtures/format-before-issue-11.tar.xz is the data dir (SQLite metadata,
three local node stores) that the code of commit 4abc37d made: a multi-shard
file, a patched file, a sparse file, a hard link, a symlink, xattrs, a
directory with user.dfs.replicas 3 and a read-only snapshot; the .json next
to it is their tree_digest as that code read them. The node registry names
the stores by absolute path, so the data dir is unpacked where it was made
(one test at a time, by a lock).
"""

import errno
import fcntl
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest
from dfstest import drop_caches, expect_errno, read_file, tree_digest, write_file

FIXTURES = Path(__file__).parent / "fixtures"
WHERE = Path("/tmp/dfsfuse-format-v1-fixture")


@pytest.fixture
def old_file_system(mount_factory):
    with open(f"{WHERE}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        shutil.rmtree(WHERE, ignore_errors=True)
        WHERE.mkdir()
        try:
            with tarfile.open(FIXTURES / "format-before-issue-11.tar.xz") as archive:
                archive.extractall(WHERE, filter="data")
            config = (WHERE / "config.toml").read_text()
            yield mount_factory, config
            mount_factory.finish()  # unmount (and fsck) before the data dir goes
        finally:
            shutil.rmtree(WHERE, ignore_errors=True)


def _digest(root: Path) -> dict:
    return json.loads(json.dumps(tree_digest(root)))  # tuples as lists, as the fixture has them


def test_an_old_file_system_mounts_reads_and_mixes_with_new_encodings(old_file_system):
    factory, config = old_file_system
    fs = factory.new("old", config=config, data_dir=WHERE / "data")
    expected = json.loads((FIXTURES / "format-before-issue-11.json").read_text())
    assert _digest(fs.mountpoint) == expected
    assert os.getxattr(fs / "docs" / "small.txt", "user.note") == b"kept"
    assert os.getxattr(fs / "three", "user.dfs.replicas") == b"3"
    expect_errno(errno.EROFS, write_file, fs / "docs-snapshot" / "small.txt", b"no")

    # New files, compressed, beside the old plain ones; an old file patched again.
    (fs / "new").mkdir()
    os.setxattr(fs / "new", "user.dfs.compression", b"zstd")
    old_text = read_file(fs / "docs" / "multi-shard.txt")
    write_file(fs / "new" / "copy.txt", old_text)
    fd = os.open(fs / "docs" / "patched.txt", os.O_RDWR)
    try:
        os.pwrite(fd, b"Z" * 5000, 100_000)
    finally:
        os.close(fd)
    patched = read_file(fs / "docs" / "patched.txt")
    assert patched[100_000:105_000] == b"Z" * 5000

    fs.stop()  # with fsck: every old and new object verifies
    fs.start()
    drop_caches()
    assert read_file(fs / "new" / "copy.txt") == old_text
    assert read_file(fs / "docs" / "patched.txt") == patched
    after = _digest(fs.mountpoint / "docs-snapshot")
    assert after == {path[len("docs-snapshot/"):]: value for path, value in expected.items()
                     if path.startswith("docs-snapshot/")}
