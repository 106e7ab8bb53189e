"""Symlinks, hard links, FIFOs, sockets and device nodes on a real mount."""

import errno
import os
import socket
import stat
import threading

from dfstest import drop_caches, expect_errno, read_file, write_file

ALSO_REMOTE = True  # also on three node servers (conftest.py)


def test_symlink(workdir):
    write_file(workdir / "target", b"through the link")
    os.symlink("target", workdir / "link")
    st = (workdir / "link").lstat()
    assert stat.S_ISLNK(st.st_mode)
    assert st.st_size == len("target")
    assert os.readlink(workdir / "link") == "target"
    assert read_file(workdir / "link") == b"through the link"
    assert (workdir / "link").stat().st_ino == (workdir / "target").stat().st_ino
    expect_errno(errno.EEXIST, os.symlink, "x", workdir / "link")
    expect_errno(errno.ELOOP, os.open, workdir / "link", os.O_RDONLY | os.O_NOFOLLOW)
    expect_errno(errno.EINVAL, os.readlink, workdir / "target")


def test_symlink_dangling_absolute_long_and_loops(workdir):
    os.symlink("does/not/exist", workdir / "dangling")
    expect_errno(errno.ENOENT, os.stat, workdir / "dangling")
    assert os.readlink(workdir / "dangling") == "does/not/exist"
    os.symlink(str(workdir / "abs-target"), workdir / "abs")
    write_file(workdir / "abs-target", b"abs")
    assert read_file(workdir / "abs") == b"abs"
    long_target = "/".join(["d" * 200] * 20)[:4000]
    os.symlink(long_target, workdir / "long")
    assert os.readlink(workdir / "long") == long_target
    os.symlink("loop2", workdir / "loop1")
    os.symlink("loop1", workdir / "loop2")
    expect_errno(errno.ELOOP, os.stat, workdir / "loop1")
    os.mkdir(workdir / "real")
    os.symlink("real", workdir / "dirlink")
    write_file(workdir / "dirlink" / "f", b"via dir link")
    assert read_file(workdir / "real" / "f") == b"via dir link"
    drop_caches()
    assert os.readlink(workdir / "long") == long_target
    os.unlink(workdir / "dirlink")  # removes the link, not the directory
    assert (workdir / "real" / "f").exists()


def test_hard_links_and_nlink(workdir):
    a, b = workdir / "a", workdir / "b"
    write_file(a, b"shared")
    assert a.stat().st_nlink == 1
    os.link(a, b)
    assert a.stat().st_nlink == 2 and b.stat().st_nlink == 2
    assert a.stat().st_ino == b.stat().st_ino
    os.mkdir(workdir / "sub")
    os.link(b, workdir / "sub" / "c")
    assert a.stat().st_nlink == 3
    fd = os.open(b, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b" and changed")
    finally:
        os.close(fd)
    assert read_file(a) == b"shared and changed"
    assert read_file(workdir / "sub" / "c") == b"shared and changed"
    ctime_before = a.stat().st_ctime_ns
    os.unlink(a)
    assert b.stat().st_nlink == 2
    assert b.stat().st_ctime_ns >= ctime_before
    os.unlink(b)
    assert (workdir / "sub" / "c").stat().st_nlink == 1
    drop_caches()
    assert read_file(workdir / "sub" / "c") == b"shared and changed"
    expect_errno(errno.EEXIST, os.link, workdir / "sub" / "c", workdir / "sub" / "c")
    expect_errno(errno.ENOENT, os.link, workdir / "missing", workdir / "x")
    expect_errno(errno.EPERM, os.link, workdir / "sub", workdir / "dirlink")


def test_hard_link_to_symlink(workdir):
    os.symlink("somewhere", workdir / "sym")
    os.link(workdir / "sym", workdir / "sym2", follow_symlinks=False)
    assert os.readlink(workdir / "sym2") == "somewhere"
    assert (workdir / "sym").lstat().st_nlink == 2


def test_fifo(workdir):
    path = workdir / "fifo"
    os.mkfifo(path, 0o640)
    st = path.lstat()
    assert stat.S_ISFIFO(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o640 & ~_umask()
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        writer = os.open(path, os.O_WRONLY)
        try:
            os.write(writer, b"through the pipe")
        finally:
            os.close(writer)
        assert os.read(reader, 100) == b"through the pipe"
    finally:
        os.close(reader)
    expect_errno(errno.EEXIST, os.mkfifo, path)


def test_unix_socket(workdir, monkeypatch):
    monkeypatch.chdir(workdir)  # sun_path is short: bind by a relative name
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind("sock")
        server.listen(1)
        st = (workdir / "sock").lstat()
        assert stat.S_ISSOCK(st.st_mode)
        received = []

        def serve():
            conn, _ = server.accept()
            with conn:
                received.append(conn.recv(100))
                conn.sendall(b"pong")

        thread = threading.Thread(target=serve)
        thread.start()
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            client.settimeout(10)
            client.connect("sock")
            client.sendall(b"ping")
            assert client.recv(100) == b"pong"
        finally:
            client.close()
        thread.join(10)
        assert received == [b"ping"]
    finally:
        server.close()
    os.unlink(workdir / "sock")
    assert os.listdir(workdir) == []


def test_device_nodes(workdir):
    char_dev = workdir / "null-like"
    block_dev = workdir / "block"
    os.mknod(char_dev, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    os.mknod(block_dev, stat.S_IFBLK | 0o600, os.makedev(7, 200))
    st = char_dev.lstat()
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    st = block_dev.lstat()
    assert stat.S_ISBLK(st.st_mode) and st.st_rdev == os.makedev(7, 200)
    drop_caches()
    assert char_dev.lstat().st_rdev == os.makedev(1, 3)
    os.mknod(workdir / "regular", stat.S_IFREG | 0o644)
    assert stat.S_ISREG((workdir / "regular").lstat().st_mode)
    assert read_file(workdir / "regular") == b""
    expect_errno(errno.EEXIST, os.mknod, char_dev, stat.S_IFCHR | 0o600, os.makedev(1, 3))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
