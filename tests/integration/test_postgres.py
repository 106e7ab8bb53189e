"""A file system whose metadata lives in PostgreSQL, driven from the command
line: `dfsfuse format --meta URL`, `mount.py MNT --meta URL`, DFSFUSE_META,
the password in a file and never on a command line, and the one-line errors
of a database that is unreachable or holds no file system. (The POSIX and
tool suites also run on PostgreSQL: their modules set ALSO_POSTGRES.)"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest
from dfstest import (
    PYTHON,
    REPO,
    command_env,
    dfsfuse_cli,
    is_mounted,
    one_line_error,
    parse_status,
    run,
)

import dfsfuse.cli


@pytest.fixture
def database(postgres_server, tmp_path):
    """(URL without the password, password file) of a fresh database."""
    name = "cli_" + os.urandom(4).hex()
    postgres_server.create_database(name)
    password_file = tmp_path / "pgpassword"
    password_file.write_text(postgres_server.password + "\n")
    password_file.chmod(0o600)
    yield postgres_server.url(name), password_file
    postgres_server.drop_database(name)


def test_format_then_mount_from_the_url_and_a_password_file(database, mount_factory, postgres_server):
    url, password_file = database
    meta = ["--meta", url, "--meta-password-file", str(password_file)]
    first = mount_factory.new("pg", start=False)
    first.extra_args = meta

    refused = one_line_error(run(first.mount_command(), check=False, cwd=REPO))
    assert "holds no dfsfuse file system" in refused and "dfsfuse format --meta URL" in refused
    assert not is_mounted(first.mountpoint)

    made = dfsfuse_cli("format", *meta, "--data-dir", first.data_dir, "--replicas", "3").stdout
    assert f"made a file system in {url}" in made
    again = one_line_error(dfsfuse_cli("format", *meta, "--data-dir", first.data_dir, check=False))
    assert "already holds a dfsfuse file system" in again

    first.start()
    assert postgres_server.password not in Path(f"/proc/{first.pid}/cmdline").read_text()
    (first / "dir").mkdir()
    (first / "dir" / "file").write_bytes(b"in postgres\n" * 1000)
    second = mount_factory.new("pg-elsewhere", start=False)  # as if on another machine
    second.extra_args = meta
    second.start()
    assert (second / "dir" / "file").read_bytes() == b"in postgres\n" * 1000
    sessions = parse_status(first.status(as_json=True))["sessions"]
    assert {"host": socket.gethostname(), "pid": second.pid, "mountpoint": str(second.mountpoint)}.items() <= next(
        session for session in sessions if session["pid"] == second.pid).items(), sessions
    second.stop(fsck=False)  # fsck runs when no mount uses the file system
    assert os.getxattr(first / "dir" / "file", "user.dfs.replicas") == b"3"  # from format --replicas
    first.remount()
    assert (first / "dir" / "file").read_bytes() == b"in postgres\n" * 1000
    assert parse_status(first.status(as_json=True))["inodes"] == 3
    assert "files: 3 inodes" in first.status()
    first.stop()  # also runs fsck with the same --meta: it must be clean


def test_dfsfuse_meta_in_the_environment_stands_for_the_flag(database, tmp_path):
    url, password_file = database
    env = command_env(DFSFUSE_META=url)
    data_dir = tmp_path / "data"
    run([PYTHON, "-m", "dfsfuse", "format", "--meta-password-file", password_file, "--data-dir", data_dir],
        env=env, cwd=REPO)
    listed = run([PYTHON, "-m", "dfsfuse", "node", "list", "--meta-password-file", password_file,
                  "--data-dir", data_dir], env=env, cwd=REPO).stdout
    assert "node1" in listed
    assert not (data_dir / "metadata.db").exists()  # the metadata is in the database, not the data dir


def test_an_unreachable_database_is_one_line_and_nothing_is_mounted(mount_factory):
    mount = mount_factory.new("nowhere", start=False)
    mount.extra_args = ["--meta", "postgresql://dfsfuse:topsecret@127.0.0.1:9/nothing"]
    line = one_line_error(run(mount.mount_command(), check=False, cwd=REPO))
    assert "cannot reach PostgreSQL at postgresql://dfsfuse:***@127.0.0.1:9/nothing" in line
    assert "topsecret" not in line
    assert not is_mounted(mount.mountpoint)


def test_a_readable_password_file_is_refused(database, tmp_path):
    url, password_file = database
    password_file.chmod(0o644)
    line = one_line_error(dfsfuse_cli("format", "--meta", url, "--meta-password-file", password_file,
                                      "--data-dir", tmp_path / "data", check=False))
    assert "must not be readable by others" in line


def test_format_without_meta_makes_the_embedded_file_system(tmp_path):
    data_dir = tmp_path / "data"
    assert "made a file system in" in dfsfuse_cli("format", "--data-dir", data_dir).stdout
    assert (data_dir / "metadata.db").is_file()
    line = one_line_error(dfsfuse_cli("format", "--data-dir", data_dir, check=False))
    assert "already holds a dfsfuse file system" in line
    assert dfsfuse.cli.META_ENVIRONMENT == "DFSFUSE_META"


def test_a_restart_of_postgresql_stalls_the_mount_and_loses_nothing(database, mount_factory, postgres_server):
    """pg_ctl restart in the middle of a workload: the applications see no
    error, and what was fsynced before the restart is there after it."""
    url, password_file = database
    mount = mount_factory.new("pg-restart", start=False)
    mount.extra_args = ["--meta", url, "--meta-password-file", str(password_file)]
    dfsfuse_cli("format", *mount._data_args())
    mount.start()
    (mount / "before").write_bytes(b"durable\n")
    with open(mount / "before", "rb+") as handle:
        os.fsync(handle.fileno())
    errors: list[BaseException] = []
    done = threading.Event()

    def workload() -> None:
        index = 0
        while not done.is_set():
            try:
                (mount / f"file{index}").write_bytes(b"%d\n" % index)
                os.rename(mount / f"file{index}", mount / f"renamed{index}")
            except OSError as error:
                errors.append(error)
                return
            index += 1

    writer = threading.Thread(target=workload)
    writer.start()
    try:
        time.sleep(0.5)
        postgres_server.restart()
        time.sleep(1.5)
    finally:
        done.set()
        writer.join(timeout=120)
    assert not writer.is_alive(), "the workload hangs after the restart"
    assert errors == []
    written = sorted(os.listdir(mount.mountpoint))
    assert "before" in written and len(written) > 2
    mount.remount()
    assert (mount / "before").read_bytes() == b"durable\n"
    assert sorted(os.listdir(mount.mountpoint)) == written
