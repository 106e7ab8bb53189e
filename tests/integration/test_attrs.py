"""Attributes on a real mount: chmod, chown, utimens and the ctime/mtime/atime
rules, umask, extended attributes, statfs."""

import errno
import os
import stat
import subprocess
import time

from dfstest import drop_caches, expect_errno, read_file, run, write_file

ALSO_REMOTE = True  # also on three node servers (conftest.py)
ALSO_POSTGRES = True  # also with its metadata on PostgreSQL (conftest.py)

PAST = 1_000_000_000 * 10**9  # 2001-09-09, in ns
SLACK = 50_000_000  # 50 ms: a timestamp taken by the file system may lag the test's clock a little


def tick() -> int:
    """Let the clock move on (so that a new timestamp is distinguishable), return now in ns."""
    start = time.time_ns()
    while time.time_ns() < start + 20_000_000:
        time.sleep(0.005)
    return time.time_ns()


def test_chmod(workdir):
    path = workdir / "f"
    write_file(path, b"x")
    before = path.stat()
    now = tick()
    for mode in (0o600, 0o755, 0o4755, 0o2750, 0o1777, 0o000):
        os.chmod(path, mode)
        assert stat.S_IMODE(path.stat().st_mode) == mode
    st = path.stat()
    assert stat.S_ISREG(st.st_mode)
    assert st.st_ctime_ns >= now - SLACK, "chmod must update ctime"
    assert st.st_mtime_ns == before.st_mtime_ns, "chmod must not change mtime"
    os.chmod(path, 0o644)
    drop_caches()
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    os.mkdir(workdir / "d", 0o700)
    os.chmod(workdir / "d", 0o3775)
    assert stat.S_IMODE((workdir / "d").stat().st_mode) == 0o3775


def test_chown(workdir):
    path = workdir / "f"
    write_file(path, b"x")
    now = tick()
    os.chown(path, 1234, 5678)
    st = path.stat()
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    assert st.st_ctime_ns >= now - SLACK
    os.chown(path, -1, 42)
    st = path.stat()
    assert (st.st_uid, st.st_gid) == (1234, 42)
    os.symlink("f", workdir / "l")
    os.lchown(workdir / "l", 777, 888)
    assert ((workdir / "l").lstat().st_uid, (workdir / "l").lstat().st_gid) == (777, 888)
    assert path.stat().st_uid == 1234
    os.chown(path, 0, 0)


def test_chown_clears_setuid_and_setgid(workdir):
    path = workdir / "f"
    write_file(path, b"#!/bin/sh\n")
    os.chmod(path, 0o6755)
    os.chown(path, 1000, 1000)
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode & (stat.S_ISUID | stat.S_ISGID) == 0, f"mode {oct(mode)} after chown"
    assert mode & 0o777 == 0o755
    # a directory keeps its setgid bit
    os.mkdir(workdir / "d")
    os.chmod(workdir / "d", 0o2775)
    os.chown(workdir / "d", 1000, 1000)
    assert stat.S_IMODE((workdir / "d").stat().st_mode) & stat.S_ISGID


def test_utime_explicit_and_now(workdir):
    path = workdir / "f"
    write_file(path, b"x")
    os.utime(path, ns=(PAST + 123456789, PAST + 987654321))
    st = path.stat()
    assert st.st_atime_ns == PAST + 123456789
    assert st.st_mtime_ns == PAST + 987654321
    drop_caches()
    st = path.stat()
    assert (st.st_atime_ns, st.st_mtime_ns) == (PAST + 123456789, PAST + 987654321)
    now = tick()
    os.utime(path)
    st = path.stat()
    assert st.st_mtime_ns >= now - SLACK and st.st_atime_ns >= now - SLACK
    assert st.st_ctime_ns >= now - SLACK
    # past 2038
    os.utime(path, ns=(4_000_000_000 * 10**9, 4_000_000_001 * 10**9))
    st = path.stat()
    assert (st.st_atime_ns, st.st_mtime_ns) == (4_000_000_000 * 10**9, 4_000_000_001 * 10**9)


def test_utime_before_1970(workdir):
    path = workdir / "f"
    write_file(path, b"x")
    os.utime(path, ns=(-10**17, -(10**17) - 5))
    st = path.stat()
    assert (st.st_atime_ns, st.st_mtime_ns) == (-10**17, -(10**17) - 5)


def test_utime_omit_one_of_the_two(workdir):
    path = workdir / "f"
    write_file(path, b"x")
    os.utime(path, ns=(PAST, PAST))
    run(["touch", "-m", "-d", "@2000000000", path])  # mtime only: atime is UTIME_OMIT
    st = path.stat()
    assert st.st_mtime_ns == 2_000_000_000 * 10**9 and st.st_atime_ns == PAST
    run(["touch", "-a", "-d", "@1500000000", path])
    st = path.stat()
    assert st.st_atime_ns == 1_500_000_000 * 10**9 and st.st_mtime_ns == 2_000_000_000 * 10**9


def test_write_updates_mtime_and_ctime(workdir):
    path = workdir / "f"
    write_file(path, b"x")
    os.utime(path, ns=(PAST, PAST))
    ctime_before = path.stat().st_ctime_ns
    now = tick()
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, b"y", 5)
    finally:
        os.close(fd)
    st = path.stat()
    assert st.st_mtime_ns >= now - SLACK, "write must update mtime"
    assert st.st_ctime_ns >= now - SLACK and st.st_ctime_ns > ctime_before, "write must update ctime"
    assert st.st_atime_ns == PAST, "write must not update atime"
    drop_caches()
    assert path.stat().st_mtime_ns == st.st_mtime_ns


def test_truncate_updates_mtime_and_ctime(workdir):
    path = workdir / "f"
    write_file(path, b"x" * 100)
    os.utime(path, ns=(PAST, PAST))
    now = tick()
    os.truncate(path, 10)
    st = path.stat()
    assert st.st_mtime_ns >= now - SLACK and st.st_ctime_ns >= now - SLACK
    os.utime(path, ns=(PAST, PAST))
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)  # O_TRUNC counts too
    os.close(fd)
    assert path.stat().st_mtime_ns >= now - SLACK


def test_read_changes_neither_mtime_nor_ctime(workdir):
    """Reads leave mtime and ctime alone (atime follows noatime rules: docs/operations.md)."""
    path = workdir / "f"
    write_file(path, b"read me")
    os.utime(path, ns=(PAST, PAST + 10**9))
    before = path.stat()
    tick()
    drop_caches()
    assert read_file(path) == b"read me"
    st = path.stat()
    assert st.st_mtime_ns == PAST + 10**9 and st.st_ctime_ns == before.st_ctime_ns
    assert st.st_atime_ns in (PAST, before.st_atime_ns) or st.st_atime_ns > PAST + 10**9


def test_link_and_rename_update_ctime(workdir):
    path = workdir / "f"
    write_file(path, b"x")
    os.utime(path, ns=(PAST, PAST))
    c0 = path.stat().st_ctime_ns
    tick()
    os.link(path, workdir / "g")
    c1 = path.stat().st_ctime_ns
    assert c1 > c0, "link must update ctime"
    assert path.stat().st_mtime_ns == PAST
    tick()
    os.rename(workdir / "g", workdir / "h")
    assert (workdir / "h").stat().st_ctime_ns >= c1
    assert (workdir / "h").stat().st_mtime_ns == PAST


def test_umask_applies_to_new_files(workdir):
    old = os.umask(0o027)
    try:
        fd = os.open(workdir / "f", os.O_CREAT | os.O_WRONLY, 0o666)
        os.close(fd)
        os.mkdir(workdir / "d", 0o777)
        os.mkfifo(workdir / "p", 0o666)
        os.umask(0)
        fd = os.open(workdir / "g", os.O_CREAT | os.O_WRONLY, 0o666)
        os.close(fd)
    finally:
        os.umask(old)
    assert stat.S_IMODE((workdir / "f").stat().st_mode) == 0o640
    assert stat.S_IMODE((workdir / "d").stat().st_mode) == 0o750
    assert stat.S_IMODE((workdir / "p").lstat().st_mode) == 0o640
    assert stat.S_IMODE((workdir / "g").stat().st_mode) == 0o666
    st = (workdir / "f").stat()
    assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())


def test_xattrs(workdir):
    path = workdir / "f"
    write_file(path, b"x")
    assert os.listxattr(path) == []
    expect_errno(errno.ENODATA, os.getxattr, path, "user.missing")
    expect_errno(errno.ENODATA, os.removexattr, path, "user.missing")
    os.setxattr(path, "user.one", b"1")
    os.setxattr(path, "user.two", b"\x00binary\xff" * 100)
    os.setxattr(path, "user.empty", b"")
    assert sorted(os.listxattr(path)) == ["user.empty", "user.one", "user.two"]
    assert os.getxattr(path, "user.one") == b"1"
    assert os.getxattr(path, "user.two") == b"\x00binary\xff" * 100
    assert os.getxattr(path, "user.empty") == b""
    expect_errno(errno.EEXIST, os.setxattr, path, "user.one", b"x", os.XATTR_CREATE)
    expect_errno(errno.ENODATA, os.setxattr, path, "user.new", b"x", os.XATTR_REPLACE)
    os.setxattr(path, "user.one", b"replaced", os.XATTR_REPLACE)
    assert os.getxattr(path, "user.one") == b"replaced"
    big = os.urandom(60 * 1024)
    os.setxattr(path, "user.big", big)
    assert os.getxattr(path, "user.big") == big
    os.removexattr(path, "user.two")
    expect_errno(errno.ENODATA, os.getxattr, path, "user.two")
    assert sorted(os.listxattr(path)) == ["user.big", "user.empty", "user.one"]
    drop_caches()
    assert os.getxattr(path, "user.one") == b"replaced"
    # directories too, and the attr command line tools
    os.mkdir(workdir / "d")
    run(["setfattr", "-n", "user.color", "-v", "blue", workdir / "d"])
    out = run(["getfattr", "--absolute-names", "-d", workdir / "d"]).stdout
    assert 'user.color="blue"' in out
    assert os.getxattr(workdir / "d", "user.color") == b"blue"
    result = run(["getfattr", "-n", "user.nope", workdir / "d"], check=False)
    assert result.returncode != 0 and "No such attribute" in result.stderr
    # xattrs follow the inode through rename and hard links
    os.rename(path, workdir / "renamed")
    os.link(workdir / "renamed", workdir / "hard")
    assert os.getxattr(workdir / "hard", "user.one") == b"replaced"


def test_statfs_reports_real_capacity(workdir, mount):
    vfs = os.statvfs(workdir)
    assert vfs.f_bsize > 0 and vfs.f_frsize > 0
    total = vfs.f_blocks * vfs.f_frsize
    free = vfs.f_bavail * vfs.f_frsize
    assert total > 0 and free > 0, f"statfs: {vfs}"
    assert vfs.f_namemax >= 255
    disk = os.statvfs(mount.data_dir)
    disk_total = disk.f_blocks * disk.f_frsize
    assert disk_total / 8 <= total <= disk_total * 4, f"capacity {total} is not the node stores' ({disk_total})"
    disk_free = disk.f_bavail * disk.f_frsize
    assert disk_free / 8 <= free <= disk_free * 4, f"free space {free} is not the node stores' ({disk_free})"
    assert vfs.f_bavail <= vfs.f_bfree <= vfs.f_blocks


def test_df_works(workdir):
    out = subprocess.run(["df", "-P", workdir], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    fields = out.stdout.splitlines()[1].split()
    assert int(fields[1]) > 0
