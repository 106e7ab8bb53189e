"""Crash safety: kill -9 of the file system process after fsync, and recovery
of the dead (ENOTCONN) mount it leaves behind."""

import contextlib
import errno
import os

import pytest
from dfstest import (
    MiB,
    NodeServer,
    dfsfuse_cli,
    fuse_mounts,
    is_mounted,
    parse_fsck,
    read_file,
    remote_config,
    run,
    write_secret,
)

CONFIG = """
shard_size = "1MiB"
"""


def _write_fsynced(path, data):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsck_is_clean(fs):
    result = fs.fsck(check=False)
    summary = parse_fsck(result)
    assert result.returncode == 0 and summary["unrecoverable"] == 0, f"fsck after the crash: {result.stdout}{result.stderr}"


@contextlib.contextmanager
def node_config(kind, base):
    """The mount's config: local node stores, or three node servers (stopped after)."""
    if kind == "local":
        yield CONFIG
        return
    secret = write_secret(base / "secret")
    servers = [NodeServer(base, f"server{i}", secret) for i in (1, 2, 3)]
    try:
        for server in servers:
            server.start()
        yield remote_config(servers, secret, CONFIG)
    finally:
        for server in servers:
            server.stop()


@pytest.mark.parametrize("kind", ["local", "remote"])
def test_kill_9_after_fsync_keeps_data(mount_factory, tmp_path, kind):
    with node_config(kind, tmp_path) as config:
        _kill_9_after_fsync_keeps_data(mount_factory, config)


def _kill_9_after_fsync_keeps_data(mount_factory, config):
    fs = mount_factory.new("crash", config=config)
    durable = os.urandom(5 * MiB + 17)
    _write_fsynced(fs / "durable.bin", durable)
    os.mkdir(fs / "dir")
    _write_fsynced(fs / "dir" / "small", b"small and fsynced")
    # an fsynced file that is then overwritten in part and fsynced again
    _write_fsynced(fs / "changed.bin", b"\x01" * (3 * MiB))
    fd = os.open(fs / "changed.bin", os.O_WRONLY)
    try:
        os.pwrite(fd, b"\x02" * MiB, MiB)
        os.fsync(fd)
        os.pwrite(fd, b"\x03" * 100, 0)  # not fsynced: may or may not survive
    finally:
        os.close(fd)
    # data still being written when the process dies
    pending = os.open(fs / "pending.bin", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(pending, os.urandom(3 * MiB))

    fs.crash()
    try:
        os.close(pending)  # the descriptor is closed even if the dead mount reports an error
    except OSError:
        pass
    expect_enotconn(fs.mountpoint)
    run(["fusermount3", "-u", "-z", fs.mountpoint])
    assert not is_mounted(fs.mountpoint)

    fs.start()  # no fsck first: the file system must come back by itself
    assert read_file(fs / "durable.bin") == durable
    assert read_file(fs / "dir" / "small") == b"small and fsynced"
    changed = read_file(fs / "changed.bin")
    assert len(changed) == 3 * MiB
    assert changed[100:MiB] == b"\x01" * (MiB - 100)
    assert changed[MiB : 2 * MiB] == b"\x02" * MiB
    assert changed[2 * MiB :] == b"\x01" * MiB
    assert changed[:100] in (b"\x01" * 100, b"\x03" * 100)
    size = os.stat(fs / "pending.bin").st_size  # exists (created before the crash) and is readable
    assert len(read_file(fs / "pending.bin")) == size
    fs.stop(fsck=False)
    _fsck_is_clean(fs)  # stored-but-uncommitted shards may be orphans: fsck cleans them up
    fs.start()
    assert read_file(fs / "durable.bin") == durable
    fs.stop()


def expect_enotconn(mountpoint):
    try:
        os.stat(mountpoint)
    except OSError as exc:
        assert exc.errno == errno.ENOTCONN, f"stat of a dead mount gave {exc}"
    else:
        raise AssertionError("the mount point still answers after kill -9")


def test_mount_over_a_dead_mount(mount_factory):
    """mount.py on a mount point left dead by a crash cleans it up, or says what to do."""
    fs = mount_factory.new("stale", config=CONFIG)
    _write_fsynced(fs / "before-crash", b"still here")
    fs.crash()
    expect_enotconn(fs.mountpoint)
    assert is_mounted(fs.mountpoint)

    fs.log_offset = fs.log_path.stat().st_size
    result = run(fs.mount_command(), check=False, timeout=60)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in result.stderr, f"unclear failure:\n{result.stderr}"
        assert "fusermount" in lines[0] or "umount" in lines[0], f"does not say what to do: {lines[0]}"
        run(["fusermount3", "-u", "-z", fs.mountpoint])
        fs.start()
    else:
        fs._adopt_pid()
        assert fs.pid is not None and is_mounted(fs.mountpoint)
    assert read_file(fs / "before-crash") == b"still here"
    assert sum(1 for mp, _ in fuse_mounts() if mp == str(fs.mountpoint)) == 1, (
        "the dead mount is still stacked under the new one"
    )


def test_fsck_refuses_while_mounted(mount_factory):
    fs = mount_factory.new("busy", config=CONFIG)
    result = dfsfuse_cli("fsck", "--data-dir", fs.data_dir, "--config", fs.config_path, check=False)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
