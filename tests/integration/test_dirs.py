"""Directories and rename on a real mount: mkdir/rmdir, readdir, st_nlink of
directories, rename in all its forms including RENAME_NOREPLACE and RENAME_EXCHANGE."""

import errno
import os
import stat

from dfstest import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    drop_caches,
    expect_errno,
    read_file,
    renameat2,
    write_file,
)

ALSO_REMOTE = True  # also on three node servers (conftest.py)
ALSO_POSTGRES = True  # also with its metadata on PostgreSQL (conftest.py)


def test_mkdir_rmdir(workdir):
    d = workdir / "d"
    os.mkdir(d, 0o755)
    st = d.lstat()
    assert stat.S_ISDIR(st.st_mode)
    assert os.listdir(d) == []
    expect_errno(errno.EEXIST, os.mkdir, d)
    write_file(d / "f", b"x")
    expect_errno((errno.ENOTEMPTY, errno.EEXIST), os.rmdir, d)
    os.mkdir(d / "sub")
    os.unlink(d / "f")
    expect_errno((errno.ENOTEMPTY, errno.EEXIST), os.rmdir, d)
    os.rmdir(d / "sub")
    os.rmdir(d)
    assert not d.exists()
    expect_errno(errno.ENOENT, os.rmdir, d)
    write_file(workdir / "file", b"")
    expect_errno(errno.ENOTDIR, os.rmdir, workdir / "file")
    expect_errno(errno.ENOENT, os.mkdir, workdir / "missing" / "d")
    expect_errno(errno.ENOTDIR, os.mkdir, workdir / "file" / "d")
    expect_errno(errno.EINVAL, os.rmdir, os.path.join(str(workdir), "."))


def test_directory_nlink(workdir):
    d = workdir / "d"
    os.mkdir(d)
    assert d.stat().st_nlink == 2
    os.mkdir(d / "a")
    os.mkdir(d / "b")
    write_file(d / "f", b"")
    assert d.stat().st_nlink == 4
    assert (d / "a").stat().st_nlink == 2
    os.rename(d / "a", workdir / "a")  # moving a subdirectory out changes both parents
    assert d.stat().st_nlink == 3
    os.rmdir(d / "b")
    assert d.stat().st_nlink == 2
    os.rmdir(workdir / "a")


def test_readdir_lists_everything_with_types(workdir):
    os.mkdir(workdir / "dir")
    write_file(workdir / "file", b"x")
    os.symlink("file", workdir / "link")
    os.mkfifo(workdir / "fifo")
    entries = {entry.name: entry for entry in os.scandir(workdir)}
    assert sorted(entries) == ["dir", "fifo", "file", "link"]
    assert entries["dir"].is_dir(follow_symlinks=False)
    assert entries["file"].is_file(follow_symlinks=False)
    assert entries["link"].is_symlink()
    assert stat.S_ISFIFO(entries["fifo"].stat(follow_symlinks=False).st_mode)
    for name, entry in entries.items():
        assert entry.inode() == (workdir / name).lstat().st_ino


def test_readdir_while_deleting(workdir):
    names = {f"entry-{i:05d}" for i in range(1500)}  # more than one READDIR_PAGE
    for name in names:
        os.close(os.open(workdir / name, os.O_CREAT | os.O_WRONLY, 0o644))
    seen = []
    with os.scandir(workdir) as it:
        for entry in it:  # delete as we go: the listing must neither skip nor repeat entries
            seen.append(entry.name)
            os.unlink(entry.path)
    assert len(seen) == len(set(seen)), "readdir returned an entry twice"
    assert set(seen) == names
    assert os.listdir(workdir) == []


def test_rename_file(workdir):
    write_file(workdir / "a", b"content a")
    ino = (workdir / "a").stat().st_ino
    os.rename(workdir / "a", workdir / "b")
    assert not (workdir / "a").exists()
    assert read_file(workdir / "b") == b"content a"
    assert (workdir / "b").stat().st_ino == ino
    expect_errno(errno.ENOENT, os.rename, workdir / "a", workdir / "c")


def test_rename_replaces_file(workdir):
    os.setxattr(workdir, "user.dfs.trash_days", b"0")  # no trash here: the replaced file has no name left
    write_file(workdir / "a", b"new")
    write_file(workdir / "b", b"old old old")
    fd = os.open(workdir / "b", os.O_RDONLY)  # the replaced file stays readable while open
    try:
        os.rename(workdir / "a", workdir / "b")
        assert read_file(workdir / "b") == b"new"
        assert sorted(os.listdir(workdir)) == ["b"]
        assert os.pread(fd, 100, 0) == b"old old old"
        assert os.fstat(fd).st_nlink == 0
    finally:
        os.close(fd)
    drop_caches()
    assert read_file(workdir / "b") == b"new"


def test_rename_replaces_empty_directory(workdir):
    os.mkdir(workdir / "src")
    write_file(workdir / "src" / "inside", b"moved")
    os.mkdir(workdir / "dst")
    os.rename(workdir / "src", workdir / "dst")
    assert read_file(workdir / "dst" / "inside") == b"moved"
    assert sorted(os.listdir(workdir)) == ["dst"]


def test_rename_onto_nonempty_directory(workdir):
    os.mkdir(workdir / "src")
    os.mkdir(workdir / "dst")
    write_file(workdir / "dst" / "keep", b"k")
    expect_errno((errno.ENOTEMPTY, errno.EEXIST), os.rename, workdir / "src", workdir / "dst")
    assert read_file(workdir / "dst" / "keep") == b"k"
    assert (workdir / "src").is_dir()


def test_rename_type_mismatches(workdir):
    os.mkdir(workdir / "dir")
    write_file(workdir / "file", b"f")
    expect_errno(errno.EISDIR, os.rename, workdir / "file", workdir / "dir")
    expect_errno(errno.ENOTDIR, os.rename, workdir / "dir", workdir / "file")
    os.mkdir(workdir / "dir" / "sub")
    expect_errno(errno.EINVAL, os.rename, workdir / "dir", workdir / "dir" / "sub" / "x")
    assert (workdir / "dir" / "sub").is_dir() and read_file(workdir / "file") == b"f"


def test_rename_into_other_directories(workdir):
    os.makedirs(workdir / "a" / "deep")
    os.mkdir(workdir / "b")
    write_file(workdir / "a" / "deep" / "f", b"payload")
    os.rename(workdir / "a" / "deep" / "f", workdir / "b" / "g")
    assert read_file(workdir / "b" / "g") == b"payload"
    assert os.listdir(workdir / "a" / "deep") == []
    os.rename(workdir / "a" / "deep", workdir / "b" / "moved")  # a directory with its contents
    write_file(workdir / "b" / "moved" / "h", b"h")
    os.rename(workdir / "b", workdir / "a" / "b2")
    assert read_file(workdir / "a" / "b2" / "moved" / "h") == b"h"
    assert read_file(workdir / "a" / "b2" / "g") == b"payload"
    assert sorted(os.listdir(workdir / "a")) == ["b2"]
    assert os.stat(workdir / "a" / "b2" / "moved" / "..").st_ino == (workdir / "a" / "b2").stat().st_ino


def test_rename_hard_links_of_one_file_is_a_no_op(workdir):
    write_file(workdir / "a", b"same")
    os.link(workdir / "a", workdir / "b")
    os.rename(workdir / "a", workdir / "b")
    assert sorted(os.listdir(workdir)) == ["a", "b"]
    assert (workdir / "b").stat().st_nlink == 2


def test_rename_noreplace(workdir):
    write_file(workdir / "a", b"A")
    write_file(workdir / "b", b"B")
    expect_errno(errno.EEXIST, renameat2, workdir / "a", workdir / "b", RENAME_NOREPLACE)
    assert read_file(workdir / "a") == b"A" and read_file(workdir / "b") == b"B"
    renameat2(workdir / "a", workdir / "c", RENAME_NOREPLACE)
    assert sorted(os.listdir(workdir)) == ["b", "c"]
    assert read_file(workdir / "c") == b"A"


def test_rename_exchange(workdir):
    write_file(workdir / "a", b"A")
    os.mkdir(workdir / "d")
    write_file(workdir / "d" / "inner", b"I")
    ino_a, ino_d = (workdir / "a").stat().st_ino, (workdir / "d").stat().st_ino
    renameat2(workdir / "a", workdir / "d", RENAME_EXCHANGE)
    assert (workdir / "a").is_dir() and read_file(workdir / "a" / "inner") == b"I"
    assert read_file(workdir / "d") == b"A"
    assert (workdir / "a").stat().st_ino == ino_d and (workdir / "d").stat().st_ino == ino_a
    # across directories
    os.mkdir(workdir / "other")
    write_file(workdir / "other" / "x", b"X")
    renameat2(workdir / "d", workdir / "other" / "x", RENAME_EXCHANGE)
    assert read_file(workdir / "d") == b"X" and read_file(workdir / "other" / "x") == b"A"
    expect_errno(errno.ENOENT, renameat2, workdir / "d", workdir / "missing", RENAME_EXCHANGE)
    assert read_file(workdir / "d") == b"X"


def test_directory_mtime_changes_with_entries(workdir):
    d = workdir / "d"
    os.mkdir(d)
    past = 1_000_000_000 * 10**9
    for op in (
        lambda: write_file(d / "f", b""),
        lambda: os.rename(d / "f", d / "g"),
        lambda: os.unlink(d / "g"),
        lambda: os.mkdir(d / "s"),
        lambda: os.rmdir(d / "s"),
    ):
        os.utime(d, ns=(past, past))
        op()
        st = d.stat()
        assert st.st_mtime_ns > past and st.st_ctime_ns > past, "directory times not updated by a change"


def test_deep_tree(workdir):
    path = workdir
    for level in range(40):
        path = path / f"level{level}"
        os.mkdir(path)
    write_file(path / "leaf", b"deep")
    drop_caches()
    assert read_file(path / "leaf") == b"deep"
    count = sum(len(dirs) for _, dirs, _ in os.walk(workdir))
    assert count == 40
