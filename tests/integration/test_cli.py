"""The command line as a user meets it: the three ways to mount, the default
data dir, --foreground, and every kind of bad input (one clear line on stderr,
a non-zero exit, nothing mounted, nothing left running, nothing lost)."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from dfstest import (
    MOUNT_PY,
    MOUNT_TIMEOUT,
    PYTHON,
    REPO,
    command_env,
    fuse_mounts,
    is_mounted,
    one_line_error,
    read_file,
    run,
    wait_pid,
    write_file,
)


def _mount_cmd(*args):
    return [PYTHON, str(MOUNT_PY), *map(str, args)]


def _assert_refused(result, mountpoint, *, mentions=()):
    line = one_line_error(result)
    assert not is_mounted(mountpoint), f"{mountpoint} is mounted after a refused mount"
    for word in mentions:
        assert word.lower() in line.lower(), f"the error line should mention {word!r}: {line}"
    return line


@pytest.mark.parametrize("entry", ["mount.py", "module", "script"])
def test_mount_entry_points(mount_factory, entry):
    fs = mount_factory.new(entry.replace(".", "_"), start=False)
    if entry == "script":
        assert Path(fs.mount_command("script")[0]).exists(), "the dfsfuse console script is not installed"
    fs.start(entry)
    write_file(fs / "hello", b"hello")
    assert read_file(fs / "hello") == b"hello"
    assert fs.lock_path.read_text().splitlines()[0].strip() == str(fs.pid)
    assert (fs.data_dir / "metadata.db").is_file()
    assert sorted(p.name for p in fs.node_dirs()) == ["node1", "node2", "node3"]


def test_default_data_dir(local_tmp, mount_factory):
    """No --data-dir and no config: state under ~/.local/share/dfsfuse/default."""
    home = local_tmp / "home"
    home.mkdir()
    env = command_env(HOME=str(home))
    env.pop("XDG_DATA_HOME", None)
    data_dir = home / ".local" / "share" / "dfsfuse" / "default"
    fs = mount_factory.new("default", start=False, data_dir=data_dir)
    result = run(_mount_cmd(fs.mountpoint), env=env, check=False, timeout=MOUNT_TIMEOUT)
    fs._adopt_pid()
    assert result.returncode == 0, result.stderr
    assert is_mounted(fs.mountpoint)
    assert (data_dir / "metadata.db").is_file() and (data_dir / "lock").is_file()
    write_file(fs / "f", b"default")
    assert sorted(p.name for p in fs.node_dirs()) == ["node1", "node2", "node3"]
    status = run([PYTHON, "-m", "dfsfuse", "status"], env=env, cwd=REPO).stdout
    assert str(data_dir) in status


def test_foreground(mount_factory, local_tmp):
    fs = mount_factory.new("fg", start=False)
    cmd = [*fs.mount_command(), "--foreground"]
    errfile = open(local_tmp / "stderr", "w+")  # a file, not a pipe: a full pipe would block the daemon
    proc = subprocess.Popen(cmd, cwd=REPO, env=command_env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=errfile, text=True)
    try:
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not is_mounted(fs.mountpoint):
            assert proc.poll() is None, f"--foreground exited early: {(local_tmp / 'stderr').read_text()}"
            assert time.monotonic() < deadline, "--foreground did not mount in time"
            time.sleep(0.05)
        write_file(fs / "f", b"fg" * 100000)
        assert fs.lock_path.read_text().splitlines()[0].strip() == str(proc.pid)
        run(["fusermount3", "-u", fs.mountpoint])
        proc.wait(timeout=60)
        err = (local_tmp / "stderr").read_text()
        assert proc.returncode == 0, f"exit {proc.returncode}\n{err}"
        assert "unmounted cleanly" in err, f"--foreground must log to stderr:\n{err}"
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            run(["fusermount3", "-u", "-z", fs.mountpoint], check=False)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        errfile.close()
    fs.start()
    assert read_file(fs / "f") == b"fg" * 100000


def test_umount_command_also_unmounts_cleanly(mount_factory):
    fs = mount_factory.new("umount")
    write_file(fs / "f", os.urandom(3_000_000))
    pid = fs.pid
    run(["umount", fs.mountpoint])
    assert wait_pid(pid, 60) == 0
    assert "unmounted cleanly" in fs.log_text()
    fs.pid = None
    fs.start()
    assert os.path.getsize(fs / "f") == 3_000_000


def test_missing_mount_point(local_tmp):
    missing = local_tmp / "no" / "such" / "dir"
    result = run(_mount_cmd(missing, "--data-dir", local_tmp / "data"), check=False, timeout=MOUNT_TIMEOUT)
    _assert_refused(result, missing)


def test_mount_point_is_a_file(local_tmp):
    file = local_tmp / "file"
    file.write_text("not a directory")
    result = run(_mount_cmd(file, "--data-dir", local_tmp / "data"), check=False, timeout=MOUNT_TIMEOUT)
    _assert_refused(result, file)
    assert file.read_text() == "not a directory"


@pytest.mark.parametrize(
    "config, mentions",
    [
        ("replicas = [\n", ("toml",)),  # not TOML
        ("replicas = 0\n", ("replicas",)),
        ('shard_size = "lots"\n', ("shard_size",)),
        ("replicas = 5\n", ("replicas",)),  # more than the three node stores
        ("no_such_setting = 1\n", ("no_such_setting",)),
        ('[[nodes]]\nname = "a b"\npath = "x"\n', ("node",)),
        ('compression = "brotli"\n', ("compression", "zstd")),
    ],
    ids=["bad-toml", "zero-replicas", "bad-size", "too-many-replicas", "unknown-key", "bad-node-name",
         "bad-compression"],
)
def test_malformed_config(local_tmp, config, mentions):
    mountpoint = local_tmp / "mnt"
    mountpoint.mkdir()
    cfg = local_tmp / "bad.toml"
    cfg.write_text(config)
    result = run(_mount_cmd(mountpoint, "--data-dir", local_tmp / "data", "--config", cfg),
                 check=False, timeout=MOUNT_TIMEOUT)
    _assert_refused(result, mountpoint, mentions=mentions)


def test_missing_config_file(local_tmp):
    mountpoint = local_tmp / "mnt"
    mountpoint.mkdir()
    result = run(_mount_cmd(mountpoint, "--data-dir", local_tmp / "data", "--config", local_tmp / "none.toml"),
                 check=False, timeout=MOUNT_TIMEOUT)
    _assert_refused(result, mountpoint, mentions=("none.toml",))


def test_unwritable_data_dir(local_tmp):
    mountpoint = local_tmp / "mnt"
    mountpoint.mkdir()
    blocker = local_tmp / "a-file"
    blocker.write_text("x")
    result = run(_mount_cmd(mountpoint, "--data-dir", blocker / "data"), check=False, timeout=MOUNT_TIMEOUT)
    _assert_refused(result, mountpoint)
    # a data dir that is itself a file
    result = run(_mount_cmd(mountpoint, "--data-dir", blocker), check=False, timeout=MOUNT_TIMEOUT)
    _assert_refused(result, mountpoint)
    assert blocker.read_text() == "x"


def test_unknown_mount_option(local_tmp):
    mountpoint = local_tmp / "mnt"
    mountpoint.mkdir()
    result = run(_mount_cmd(mountpoint, "--data-dir", local_tmp / "data", "-o", "no_such_option"),
                 check=False, timeout=MOUNT_TIMEOUT)
    _assert_refused(result, mountpoint, mentions=("no_such_option",))


def test_second_mount_of_the_same_data_dir_is_refused(mount_factory):
    first = mount_factory.new("first")
    write_file(first / "f", b"first mount's data")
    second = mount_factory.new("second", start=False, data_dir=first.data_dir)
    result = run(second.mount_command(), check=False, timeout=MOUNT_TIMEOUT)
    _assert_refused(result, second.mountpoint)
    # also refused on the same mount point
    result = run(first.mount_command(), check=False, timeout=MOUNT_TIMEOUT)
    one_line_error(result)
    assert [mp for mp, _ in fuse_mounts()].count(str(first.mountpoint)) == 1
    # the first mount is unharmed
    assert first.lock_path.read_text().splitlines()[0].strip() == str(first.pid)
    assert read_file(first / "f") == b"first mount's data"
    write_file(first / "g", b"still writable")
    first.remount()
    assert read_file(first / "g") == b"still writable"


def test_status_and_fsck_need_a_file_system(local_tmp):
    empty = local_tmp / "empty-data"
    for command in ("status", "fsck"):
        result = run([PYTHON, "-m", "dfsfuse", command, "--data-dir", empty], check=False, cwd=REPO)
        one_line_error(result)


def test_output_into_a_closed_pipe_is_not_a_traceback(mount_factory):
    mount = mount_factory.new("pipe")
    args = " ".join(f"'{arg}'" for arg in mount._data_args())
    result = run(f"'{PYTHON}' -m dfsfuse status {args} | head -c 1", check=False, cwd=REPO)
    assert result.returncode == 0 and result.stdout == "d"  # "data dir ..."
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr


def test_bad_usage_is_not_a_traceback(local_tmp):
    result = run([PYTHON, str(MOUNT_PY)], check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    result = run([PYTHON, "-m", "dfsfuse", "no-such-command"], check=False, cwd=REPO)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    result = run([PYTHON, "-m", "dfsfuse", "--help"], cwd=REPO)
    assert "mount" in result.stdout and "fsck" in result.stdout and "status" in result.stdout
