"""Ownership and permission checks with other users on a real mount (-o allow_other).

Other users are played by forked children that drop to another uid/gid (we
run as root); the kernel checks permissions (default_permissions) against the
attributes the file system reports, so wrong attributes show up here.
"""

import errno
import os
import stat

import pytest
from dfstest import as_user, expect_errno, read_file, user_errno, write_file

ALSO_REMOTE = True  # also on three node servers (conftest.py)

MOUNT_OPTIONS = ["allow_other"]

ALICE = (12345, 12345)
BOB = (23456, 23456)


@pytest.fixture(autouse=True)
def _root_only():
    assert os.geteuid() == 0, "these tests play other users and must run as root"


def _create(path, data=b"", mode=0o644):
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    st = os.stat(path)
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


def _append(path, data):
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _stat_mode(path):
    return os.stat(path).st_mode


def test_new_files_take_callers_uid_gid_and_umask(workdir):
    os.chmod(workdir, 0o777)
    uid, gid, mode = as_user(*ALICE, _create, workdir / "alice-file", b"a", 0o666, umask=0o022)
    assert (uid, gid, mode) == (*ALICE, 0o644)
    st = (workdir / "alice-file").stat()
    assert (st.st_uid, st.st_gid) == ALICE
    as_user(*ALICE, os.mkdir, workdir / "alice-dir", 0o777, umask=0o077)
    st = (workdir / "alice-dir").stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (*ALICE, 0o700)
    as_user(*ALICE, os.symlink, "alice-file", workdir / "alice-link")
    st = (workdir / "alice-link").lstat()
    assert (st.st_uid, st.st_gid) == ALICE
    # supplementary groups don't matter; the primary gid is taken
    as_user(BOB[0], 999, _create, workdir / "bob-file", b"", 0o600, groups=(ALICE[1],))
    st = (workdir / "bob-file").stat()
    assert (st.st_uid, st.st_gid) == (BOB[0], 999)


def test_permission_denied_for_others(workdir):
    private = workdir / "private"
    write_file(private, b"secret")
    os.chmod(private, 0o600)
    readable = workdir / "readable"
    write_file(readable, b"public")
    os.chmod(readable, 0o644)
    closed_dir = workdir / "closed"
    os.mkdir(closed_dir, 0o700)
    write_file(closed_dir / "inside", b"x")

    assert user_errno(*ALICE, read_file, private) == errno.EACCES
    assert as_user(*ALICE, read_file, readable) == b"public"
    assert user_errno(*ALICE, _append, readable, b"no") == errno.EACCES
    assert user_errno(*ALICE, _create, workdir / "new") == errno.EACCES  # dir is 755 root
    assert user_errno(*ALICE, os.unlink, readable) == errno.EACCES
    assert user_errno(*ALICE, os.rename, readable, workdir / "moved") == errno.EACCES
    assert user_errno(*ALICE, os.mkdir, workdir / "d") == errno.EACCES
    assert user_errno(*ALICE, os.listdir, closed_dir) == errno.EACCES
    assert user_errno(*ALICE, _stat_mode, closed_dir / "inside") == errno.EACCES
    assert user_errno(*ALICE, os.chmod, readable, 0o777) == errno.EPERM
    assert user_errno(*ALICE, os.chown, readable, ALICE[0], ALICE[1]) == errno.EPERM
    assert user_errno(*ALICE, os.utime, readable, (1, 1)) == errno.EPERM
    assert user_errno(*ALICE, os.setxattr, readable, "user.x", b"1") in (errno.EACCES, errno.EPERM)
    assert read_file(readable) == b"public" and read_file(private) == b"secret"
    assert sorted(os.listdir(workdir)) == ["closed", "private", "readable"]

    # group permissions
    os.chown(private, 0, ALICE[1])
    os.chmod(private, 0o640)
    assert as_user(*ALICE, read_file, private) == b"secret"
    assert user_errno(*BOB, read_file, private) == errno.EACCES
    assert as_user(*BOB, read_file, private, groups=(ALICE[1],)) == b"secret"
    # owner permissions apply even when "other" would allow more
    os.chown(readable, ALICE[0], 0)
    os.chmod(readable, 0o044)
    assert user_errno(*ALICE, read_file, readable) == errno.EACCES
    assert as_user(*BOB, read_file, readable) == b"public"


def test_owner_may_chmod_and_utime(workdir):
    os.chmod(workdir, 0o777)
    as_user(*ALICE, _create, workdir / "mine", b"x", 0o600)
    as_user(*ALICE, os.chmod, workdir / "mine", 0o640)
    assert stat.S_IMODE((workdir / "mine").stat().st_mode) == 0o640
    as_user(*ALICE, os.utime, workdir / "mine", (5, 6))
    assert (workdir / "mine").stat().st_mtime == 6
    # utime(now) needs only write access, not ownership
    write_file(workdir / "shared", b"")
    os.chmod(workdir / "shared", 0o666)
    os.utime(workdir / "shared", (1, 1))
    as_user(*BOB, os.utime, workdir / "shared", None)
    assert (workdir / "shared").stat().st_mtime > 1
    # a non-member cannot give a file to a group
    assert user_errno(*ALICE, os.chown, workdir / "mine", -1, BOB[1]) == errno.EPERM
    as_user(*ALICE, os.chown, workdir / "mine", -1, 4242, groups=(4242,))
    assert (workdir / "mine").stat().st_gid == 4242


def test_setgid_directory_passes_group_on(workdir):
    shared = workdir / "shared"
    os.mkdir(shared)
    os.chown(shared, 0, 7777)
    os.chmod(shared, 0o2777)
    as_user(*ALICE, _create, shared / "file", b"", 0o644)
    st = (shared / "file").stat()
    assert (st.st_uid, st.st_gid) == (ALICE[0], 7777)
    as_user(*ALICE, os.mkdir, shared / "sub", 0o777, umask=0)
    st = (shared / "sub").stat()
    assert (st.st_uid, st.st_gid) == (ALICE[0], 7777)
    assert st.st_mode & stat.S_ISGID, "a subdirectory of a setgid directory must be setgid too"
    as_user(*BOB, _create, shared / "sub" / "deeper", b"", 0o644)
    assert (shared / "sub" / "deeper").stat().st_gid == 7777


def test_sticky_directory(workdir):
    tmp = workdir / "tmp"
    os.mkdir(tmp)
    os.chmod(tmp, 0o1777)
    as_user(*ALICE, _create, tmp / "alice", b"A", 0o666, umask=0)
    as_user(*BOB, _create, tmp / "bob", b"B", 0o666, umask=0)
    assert user_errno(*BOB, os.unlink, tmp / "alice") == errno.EPERM
    assert user_errno(*BOB, os.rename, tmp / "alice", tmp / "stolen") == errno.EPERM
    assert user_errno(*BOB, os.rename, tmp / "bob", tmp / "alice") == errno.EPERM  # replacing Alice's
    assert as_user(*BOB, read_file, tmp / "alice") == b"A"  # reading is fine
    as_user(*BOB, _append, tmp / "alice", b"b")  # and so is writing (mode 666)
    assert read_file(tmp / "alice") == b"Ab"
    as_user(*ALICE, os.rename, tmp / "alice", tmp / "alice2")
    as_user(*ALICE, os.unlink, tmp / "alice2")
    os.unlink(tmp / "bob")  # root may
    assert os.listdir(tmp) == []
    # without the sticky bit Bob may delete Alice's file
    os.chmod(tmp, 0o777)
    as_user(*ALICE, _create, tmp / "alice", b"A", 0o600)
    as_user(*BOB, os.unlink, tmp / "alice")
    assert os.listdir(tmp) == []


def test_setuid_cleared_on_write_by_other_user(workdir):
    path = workdir / "prog"
    write_file(path, b"#!/bin/sh\n")
    os.chmod(path, 0o6777)  # setuid, setgid, group-executable, world-writable
    write_file(workdir / "root-writes", b"")
    os.chmod(workdir / "root-writes", 0o4777)
    _append(workdir / "root-writes", b"root keeps it")  # root (CAP_FSETID) keeps the bits
    assert (workdir / "root-writes").stat().st_mode & stat.S_ISUID
    as_user(*ALICE, _append, path, b"echo changed\n")
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode & (stat.S_ISUID | stat.S_ISGID) == 0, f"mode {oct(mode)} after a write by another user"
    assert mode & 0o777 == 0o777
    assert read_file(path) == b"#!/bin/sh\necho changed\n"
    os.chmod(path, 0o4777)
    as_user(*ALICE, os.truncate, path, 3)
    assert path.stat().st_mode & stat.S_ISUID == 0, "truncate by another user must clear setuid"


def test_chmod_setgid_needs_group_membership(workdir):
    os.chmod(workdir, 0o777)
    uid, gid, mode = as_user(*ALICE, _create, workdir / "f", b"", 0o2755)
    assert (uid, gid, mode) == (*ALICE, 0o2755)
    # the owner keeps S_ISGID on chmod while in the file's group, and loses it when not
    as_user(*ALICE, os.chmod, workdir / "f", 0o2755)
    assert (workdir / "f").stat().st_mode & stat.S_ISGID
    os.chown(workdir / "f", ALICE[0], 4321)
    as_user(*ALICE, os.chmod, workdir / "f", 0o2755)
    assert not (workdir / "f").stat().st_mode & stat.S_ISGID


def test_other_users_cannot_reach_a_mount_without_allow_other(mount_factory):
    plain = mount_factory.new("plain")  # no -o allow_other
    os.chmod(plain.mountpoint, 0o755)
    write_file(plain.mountpoint / "f", b"root only")
    assert user_errno(*ALICE, os.listdir, plain.mountpoint) == errno.EACCES
    assert user_errno(*ALICE, read_file, plain.mountpoint / "f") == errno.EACCES
    assert read_file(plain.mountpoint / "f") == b"root only"
    os.unlink(plain.mountpoint / "f")


def test_read_only_mount(mount_factory):
    fs = mount_factory.new("ro")
    write_file(fs.mountpoint / "f", b"kept")
    os.mkdir(fs.mountpoint / "d")
    fs.stop()
    fs.options = ["ro"]
    fs.start()
    assert read_file(fs.mountpoint / "f") == b"kept"
    expect_errno(errno.EROFS, os.open, fs.mountpoint / "f", os.O_WRONLY)
    expect_errno(errno.EROFS, os.open, fs.mountpoint / "new", os.O_CREAT | os.O_WRONLY, 0o644)
    expect_errno(errno.EROFS, os.mkdir, fs.mountpoint / "d2")
    expect_errno(errno.EROFS, os.unlink, fs.mountpoint / "f")
    expect_errno(errno.EROFS, os.rmdir, fs.mountpoint / "d")
    expect_errno(errno.EROFS, os.chmod, fs.mountpoint / "f", 0o600)
    expect_errno(errno.EROFS, os.setxattr, fs.mountpoint / "f", "user.x", b"1")
    fs.stop()
    fs.options = []
    fs.start()
    assert read_file(fs.mountpoint / "f") == b"kept"
