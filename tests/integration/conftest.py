"""Fixtures for tests on a real mount.

- `mount`: one file system per test module, mounted with mount.py in a
  subprocess; a module may set MOUNT_CONFIG (TOML text) and MOUNT_OPTIONS
  (a list of -o options). Unmounted in order at the end of the module, with the
  daemon's exit, its log and `dfsfuse fsck` checked. A module that sets
  ALSO_REMOTE = True runs twice: on local node stores, and on three node
  servers (`dfsfuse node serve` on loopback ports) started for the module.
- `workdir`: a fresh directory on the module's mount for each test.
- `mount_factory`: file systems of a test's own (new data dirs, restarts, crashes).

The session makes itself a child subreaper so that mount daemons, once they
detach, are our children: we see their exit status, and at the end of the session
we check that no process we started and no FUSE mount under our temp dir remains.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import dfstest
import pytest

PR_SET_CHILD_SUBREAPER = 36
_mounts_by_item: dict[str, list[dfstest.Mount]] = {}


def _fuse_usable() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if shutil.which("fusermount3") is None:
        return "no fusermount3 (apt-get install fuse3)"
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as exc:
        return f"/dev/fuse cannot be opened: {exc}"
    return None


def pytest_configure(config):
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:  # pragma: no cover
        raise RuntimeError(f"prctl(PR_SET_CHILD_SUBREAPER) failed: {os.strerror(ctypes.get_errno())}")


def pytest_collection_modifyitems(config, items):
    reason = _fuse_usable()
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.mounted)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


def _children() -> list[tuple[int, str, str]]:
    """(pid, state, command line) of every child of this process."""
    me = str(os.getpid())
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                after = handle.read().rsplit(")", 1)[1].split()
            state, ppid = after[0], after[1]
            if ppid != me:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                cmdline = handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, IndexError):
            continue
        found.append((int(entry), state, cmdline))
    return found


def _reap_zombies() -> None:
    for pid, state, _ in _children():
        if state == "Z":
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass


@pytest.fixture(scope="session", autouse=True)
def test_root():
    """A private temp dir (mode 755 so other users in tests can reach mounts) and a final leak check.

    It is made under $DFSFUSE_TEST_TMPDIR if set (.ci/run sets it, to clean up after a killed run
    without touching anybody else's mounts), else under /tmp.
    """
    parent = os.environ.get("DFSFUSE_TEST_TMPDIR") or "/tmp"
    root = Path(tempfile.mkdtemp(prefix="dfsfuse-it-", dir=parent))
    root.chmod(0o755)
    dfstest.set_session_env(XDG_DATA_HOME=str(root / "xdg"), GIT_CONFIG_GLOBAL="/dev/null")
    yield root

    problems = []
    _reap_zombies()
    for mountpoint, fstype in dfstest.fuse_mounts():
        if mountpoint == str(root) or mountpoint.startswith(str(root) + "/"):
            problems.append(f"{fstype} still mounted at {mountpoint}")
            dfstest.run(["fusermount3", "-u", "-z", mountpoint], check=False)
    # The session's PostgreSQL server (tests/conftest.py) may outlive this fixture; its own stops it.
    pgserver = sys.modules.get("pgserver")
    postgres = pgserver.running_pids() if pgserver else frozenset()
    for pid, state, cmdline in _children():
        if state != "Z" and pid not in postgres:
            problems.append(f"process {pid} still running: {cmdline}")
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
    _reap_zombies()
    # Network namespaces of this run (tests/netns.py) that a module's `network` fixture did not delete.
    netns = sys.modules.get("netns")
    for name in netns.leftovers() if netns else ():
        problems.append(f"network namespace {name} still there")
        netns.ip("netns", "del", name, check=False)
    if not problems:
        shutil.rmtree(root, ignore_errors=True)
    assert not problems, "the tests left things behind:\n" + "\n".join(problems)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:60]


class MountFactory:
    """Creates mounts under one directory and stops them all, in reverse order, at the end."""

    def __init__(self, base: Path, item_key: str):
        self.base = base
        self.item_key = item_key
        self.mounts: list[dfstest.Mount] = []

    def new(self, name: str = "fs", *, config: str | None = None, options=None, start: bool = True,
            data_dir: Path | None = None) -> dfstest.Mount:
        index = len(self.mounts)
        where = self.base / f"{name}{index}"
        where.mkdir(parents=True, exist_ok=True)
        where.chmod(0o755)
        mount = dfstest.Mount(where / "mnt", data_dir or where / "data", config=config, options=options)
        self.mounts.append(mount)
        _mounts_by_item.setdefault(self.item_key, []).append(mount)
        if start:
            mount.start()
        return mount

    def finish(self) -> None:
        errors = []
        for mount in reversed(self.mounts):
            try:
                mount.stop(check=True)
            except BaseException as exc:  # noqa: BLE001 - stop all, report all
                errors.append(str(exc))
            finally:
                mount.kill()
        self.mounts.clear()
        if errors:
            raise AssertionError("\n\n".join(errors))


def pytest_generate_tests(metafunc):
    if "mount" not in metafunc.fixturenames:
        return
    kinds = ["local"]
    if getattr(metafunc.module, "ALSO_REMOTE", False):
        kinds.append("remote")
    if getattr(metafunc.module, "ALSO_POSTGRES", False):
        kinds.append("postgresql")
    if len(kinds) > 1:
        metafunc.parametrize("mount", kinds, indirect=True, scope="module")


@contextlib.contextmanager
def two_postgres_mounts(
    server, test_root: Path, name: str, config: str, metadata: str = ""
) -> Iterator[tuple[dfstest.Mount, dfstest.Mount]]:
    """Mounts A and B of one file system whose metadata is database `name`
    on the test run's PostgreSQL server (`metadata`: more settings of its
    [metadata] section): formatted, both mounted; at the end
    B and A are unmounted (fsck once neither runs), killed if they would not
    go, and the database dropped."""
    base = test_root / name
    base.mkdir(parents=True, exist_ok=True)
    server.create_database(name)
    config = postgres_config(server, name, base / "pgpassword", config) + metadata
    factory = MountFactory(base, name)
    a = factory.new("a", config=config, start=False)
    b = factory.new("b", config=config, start=False)
    try:
        dfstest.dfsfuse_cli("format", "--data-dir", a.data_dir, "--config", a.config_path)
        a.start()
        b.start()
        yield a, b
        b.stop(fsck=False)  # fsck runs once no mount uses the file system
        a.stop()
    finally:
        for mount in (b, a):
            mount.kill()
        factory.mounts.clear()
        server.drop_database(name)


def postgres_config(server, database: str, password_file: Path, config: str | None) -> str:
    """`config` with its metadata in `database` on the test run's PostgreSQL
    server, the password in a file of its own (never on a command line)."""
    password_file.write_text(server.password + "\n")
    password_file.chmod(0o600)
    return (config or "") + f'\n[metadata]\nurl = "{server.url(database)}"\npassword_file = "{password_file}"\n'


@pytest.fixture(scope="module")
def mount(request, test_root):
    """The module's file system (MOUNT_CONFIG / MOUNT_OPTIONS of the module apply).

    With the "remote" parameter (ALSO_REMOTE modules) its nodes are three node
    servers, stopped after the unmount and its fsck. With "postgresql"
    (ALSO_POSTGRES modules) its metadata is a database of its own on the
    session's PostgreSQL server, made by `dfsfuse format` and dropped after.
    """
    kind = getattr(request, "param", "local")
    base = test_root / _safe(request.module.__name__.rsplit(".", 1)[-1])
    if kind != "local":
        base = base.with_name(base.name + "-" + kind)
    config = getattr(request.module, "MOUNT_CONFIG", None)
    with module_file_system(request, base, kind, config, getattr(request.module, "MOUNT_OPTIONS", None)) as mount:
        yield mount


@contextlib.contextmanager
def module_file_system(
    request, base: Path, kind: str, config: str | None, options: list[str] | None, format_args: tuple[str, ...] = ()
) -> Iterator[dfstest.Mount]:
    """A mounted file system in `base` for a module fixture, of `kind` (see
    `mount`); formatted with `dfsfuse format FORMAT_ARGS` first when they are
    given or the metadata is PostgreSQL's; all of it stopped and removed at the end."""
    factory = MountFactory(base, request.node.nodeid)
    servers: list[dfstest.NodeServer] = []
    database = None
    try:
        if kind == "postgresql":
            server = request.getfixturevalue("postgres_server")
            database = _safe(request.module.__name__.rsplit(".", 1)[-1]).lower()
            server.create_database(database)
            base.mkdir(parents=True, exist_ok=True)
            config = postgres_config(server, database, base / "pgpassword", config)
        if kind == "remote":
            secret = dfstest.write_secret(base / "servers" / "secret")
            for name in ("server1", "server2", "server3"):
                servers.append(dfstest.NodeServer(base / "servers", name, secret))
                servers[-1].start()
            config = dfstest.remote_config(servers, secret, config or "")
        mount = factory.new("module", config=config, options=options, start=False)
        if servers:
            mount.node_roots = [server.data for server in servers]
        if database is not None or format_args:
            dfstest.dfsfuse_cli("format", *format_args, *mount._data_args())
        mount.start()
        yield mount
    finally:
        try:
            factory.finish()
        finally:
            for node_server in servers:
                node_server.stop()
            if database is not None:
                request.getfixturevalue("postgres_server").drop_database(database)


@pytest.fixture
def workdir(request, mount):
    """A fresh directory for this test on the module's mount."""
    _mounts_by_item.setdefault(request.node.nodeid, []).append(mount)
    path = mount.mountpoint / _safe(request.node.name)
    path.mkdir()
    return path


@pytest.fixture
def mount_factory(request, test_root):
    """Mounts of this test's own; all are unmounted (and checked) when the test ends."""
    module = _safe(request.module.__name__.rsplit(".", 1)[-1])
    factory = MountFactory(test_root / module / _safe(request.node.name), request.node.nodeid)
    try:
        yield factory
    finally:
        factory.finish()


@pytest.fixture
def local_tmp(tmp_path):
    """A directory on the local disk (for reference copies)."""
    return tmp_path


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for mount in _mounts_by_item.get(item.nodeid, []):
            report.sections.append((f"dfsfuse log ({mount.data_dir})", mount.log_tail(80)))
    if report.when == "teardown":
        _mounts_by_item.pop(item.nodeid, None)
