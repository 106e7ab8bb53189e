"""A real PostgreSQL server for tests, in a directory of the caller's.

`PostgresServer(base).start()` runs Debian's server binaries (the newest
/usr/lib/postgresql/<major>/bin; `scripts/install.sh --test` installs them):
`initdb` into BASE/data, then `pg_ctl start -w`. The server listens on
127.0.0.1 at a free port and on a Unix socket in BASE/socket; its log is
BASE/server.log. Durability is the real thing: fsync, synchronous_commit and
full_page_writes stay on (only initdb's own final sync of the fresh cluster is
skipped, `--no-sync`, which costs a few seconds and matters only if the
machine itself crashes during the run).

Who runs it: PostgreSQL refuses to run as root. Run as root (as the test suite
is), the server runs as the system user `postgres`, which Debian's
postgresql-common package creates: BASE/data, BASE/socket and BASE/server.log
are owned by it, and BASE and its parents must be searchable by it (mode 755,
like the suite's temp dirs). Run as any other user, the server runs as that
user.

Roles:
- `postgres`, the superuser (ADMIN): trusted on the Unix socket only, no
  password, never over TCP. `admin_url()` / `admin_connect()` use it.
- `dfsfuse` (`user`), a plain login role that owns every database made by
  `create_database()`. With a password (the default: `password` is a random
  hex string) it must authenticate with scram-sha-256, over TCP and over the
  socket alike; with `password=None` it is trusted.

`url(db)` is `postgresql://dfsfuse@127.0.0.1:PORT/db` (no password in it:
give it by a password file, `write_passfile()`, or `url(db, password=True)`
embeds it); `socket_url(db)` the same over the Unix socket.

On another "machine" (tests/netns.py): `host=` is the one address it listens
on (and the host of `url()`), `clients=` the networks pg_hba.conf lets the role
log in from over TCP (default: `host`/32 only), and `command_prefix=` a command
that every initdb / pg_ctl runs through, e.g. `nsenter --net=/run/netns/NAME --`;
the prefix runs as the caller, and the switch to the server's user comes after
it (`setpriv`), since entering a namespace takes root. The Unix socket and the
admin connections over it work from anywhere on the file system, whatever the
network namespace.

`stop()` ends the server by the postmaster PID in BASE/data/postmaster.pid
(SIGINT, PostgreSQL's fast shutdown; SIGKILL of it and its children after
STOP_TIMEOUT), never by name. `kill()` is a crash (SIGKILL); `start()` after it
runs crash recovery. `restart()` is `pg_ctl restart -m fast`.

Nothing here depends on pytest; tests/conftest.py has the fixtures.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import secrets
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar
from urllib.parse import quote

import psycopg
from psycopg import sql

HOST = "127.0.0.1"
ADMIN = "postgres"
SERVER_OS_USER = "postgres"  # the user the server runs as when we are root
SOCKET_PATH_MAX = 107  # sun_path holds 108 bytes with the terminating NUL

# Postmaster PIDs of the servers this process started and has not stopped yet.
_running: set[int] = set()


def running_pids() -> frozenset[int]:
    """PIDs of the postmasters started by this process and still to be stopped by their owner."""
    return frozenset(_running)


class PostgresNotInstalled(RuntimeError):
    """No PostgreSQL server binaries (or no user to run them as) on this machine."""


class PostgresServerError(RuntimeError):
    """The server could not be set up, started or stopped; the message holds its log."""


def find_binaries() -> tuple[Path, int]:
    """(bin directory, major version) of the newest installed server; PostgresNotInstalled if none."""
    found: list[tuple[int, Path]] = []
    for name in glob.glob("/usr/lib/postgresql/*/bin"):
        bin_dir = Path(name)
        tools = ("initdb", "pg_ctl", "postgres")
        if bin_dir.parent.name.isdigit() and all(os.access(bin_dir / tool, os.X_OK) for tool in tools):
            found.append((int(bin_dir.parent.name), bin_dir))
    if not found:
        raise PostgresNotInstalled(
            "no PostgreSQL server in /usr/lib/postgresql/*/bin (initdb, pg_ctl, postgres): "
            "run scripts/install.sh --test (Debian package postgresql)")
    newest, newest_dir = max(found)
    return newest_dir, newest


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _proc_state(pid: int) -> str | None:
    """The state letter of a process (Z for a zombie), None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _gone(pid: int) -> bool:
    """Whether a process has exited; reaps it if it is our child (we may be a subreaper)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return True
    except ChildProcessError:
        pass
    return _proc_state(pid) in (None, "Z")


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not _gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    if handle.read().rsplit(")", 1)[1].split()[1] == str(pid):
                        found.append(int(entry))
            except (OSError, IndexError):
                continue
    return found


def _pgpass_field(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:")


class PostgresServer:
    """One PostgreSQL cluster in BASE (data, socket, server.log); see the module docstring."""

    START_TIMEOUT = 30  # seconds for pg_ctl start / restart
    STOP_TIMEOUT = 30  # seconds for a fast shutdown before SIGKILL
    # Settings of every start (written to data/dfsfuse-test.conf); `settings` adds or overrides.
    DEFAULT_SETTINGS: ClassVar[dict[str, str]] = {
        "fsync": "on",
        "synchronous_commit": "on",
        "full_page_writes": "on",
        "max_connections": "200",
        "unix_socket_permissions": "0777",
        "log_min_messages": "warning",
        "log_line_prefix": "%m [%p] %q%u@%d ",
    }

    def __init__(self, base: Path | str, *, user: str = "dfsfuse", password: str | None | bool = True,
                 settings: dict[str, str] | None = None, host: str = HOST, clients: Sequence[str] | None = None,
                 command_prefix: Sequence[str] = ()):
        """password: True for a random one, a string for that one, None (or False) for none (trust).

        host: the address to listen on; clients: networks (CIDR) allowed over TCP, default host/32;
        command_prefix: run initdb and pg_ctl through it (see the module docstring).
        """
        self.base = Path(base).resolve()
        self.data_dir = self.base / "data"
        self.socket_dir = self.base / "socket"
        self.log_path = self.base / "server.log"
        self.host = host
        self.clients = list(clients) if clients is not None else [f"{host}/32"]
        self.command_prefix = list(command_prefix)
        self.port = 0  # chosen at the first start, kept by later ones
        self.user = user
        self.password: str | None = secrets.token_hex(16) if password is True else (password or None)
        self.admin = ADMIN
        self.settings = {**self.DEFAULT_SETTINGS, **(settings or {})}
        self.bin_dir, self.major = find_binaries()
        if os.geteuid() == 0:
            try:
                entry = pwd.getpwnam(SERVER_OS_USER)
            except KeyError:
                raise PostgresNotInstalled(
                    f"no system user {SERVER_OS_USER!r} to run PostgreSQL as (root may not): "
                    "Debian's postgresql package creates it; run scripts/install.sh --test") from None
            self._uid, self._gid = entry.pw_uid, entry.pw_gid
        else:
            self._uid, self._gid = os.geteuid(), os.getegid()
        self.os_user = pwd.getpwuid(self._uid).pw_name
        self._pid: int | None = None

    # ------------------------------------------------------------ addresses

    def url(self, database: str, *, password: bool = False) -> str:
        """postgresql://USER@127.0.0.1:PORT/DATABASE (with the password in it if asked and there is one)."""
        return f"postgresql://{self._userinfo(password)}@{self.host}:{self.port}/{quote(database, safe='')}"

    def socket_url(self, database: str, *, password: bool = False) -> str:
        """The same role and database over the Unix socket (host= the socket directory)."""
        return (f"postgresql://{self._userinfo(password)}@/{quote(database, safe='')}"
                f"?host={quote(str(self.socket_dir), safe='')}&port={self.port}")

    def admin_url(self, database: str = "postgres") -> str:
        """The superuser over the Unix socket (trusted, no password)."""
        return (f"postgresql://{self.admin}@/{quote(database, safe='')}"
                f"?host={quote(str(self.socket_dir), safe='')}&port={self.port}")

    def _userinfo(self, password: bool) -> str:
        if password and self.password is not None:
            return f"{quote(self.user, safe='')}:{quote(self.password, safe='')}"
        return quote(self.user, safe="")

    def write_passfile(self, path: Path | str, *, password: str | None = None) -> Path:
        """A libpq password file (PGPASSFILE / passfile=) for USER on this server, TCP and socket; mode 0600.

        Each line is HOST:PORT:DATABASE:USER:PASSWORD (`:` and `\\` escaped with `\\`); for a
        socket connection HOST is the socket directory. libpq ignores a file readable by group or others.
        """
        secret = password if password is not None else self.password
        assert secret is not None, "this server's role has no password"
        lines = [":".join(_pgpass_field(field) for field in (host, str(self.port), "*", self.user, secret))
                 for host in (self.host, str(self.socket_dir))]
        path = Path(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write("\n".join(lines) + "\n")
        return path

    # ------------------------------------------------------------ databases

    @contextlib.contextmanager
    def admin_connect(self, database: str = "postgres"):
        """A superuser connection (autocommit) over the socket; closed at the end of the with block."""
        with psycopg.connect(self.admin_url(database), autocommit=True, connect_timeout=10) as conn:
            yield conn

    def create_database(self, name: str) -> str:
        """A new empty database owned by USER; returns url(name)."""
        with self.admin_connect() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name), sql.Identifier(self.user)))
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop it if it exists, ending any session still connected to it."""
        with self.admin_connect() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    # ------------------------------------------------------------ life cycle

    @property
    def pid(self) -> int | None:
        """The postmaster's PID, from data/postmaster.pid (None if there is none)."""
        try:
            first = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
        except OSError:
            return None
        return int(first) if first.strip().isdigit() else None

    def running(self) -> bool:
        return self._pid is not None and not _gone(self._pid)

    def start(self) -> PostgresServer:
        """initdb at the first start, then pg_ctl start -w; again after stop() or kill() (crash recovery)."""
        assert not self.running(), f"the server in {self.data_dir} is running"
        first = not (self.data_dir / "PG_VERSION").exists()
        if first:
            self._initdb()
        if not self.port:
            self.port = free_port()
        for attempt in range(3):
            self._write_config()
            result = self._pg_ctl("start")
            if result.returncode == 0:
                break
            in_use = "already in use" in self.log_tail(20)
            if not in_use or attempt == 2 or not first:
                raise PostgresServerError(self._failure("pg_ctl start", result))
            self.port = free_port()  # another process took the port between our probe and the bind
        self._adopt_pid()
        self._ensure_role()
        return self

    def restart(self) -> PostgresServer:
        """pg_ctl restart -w -m fast: a clean shutdown and a new postmaster on the same port and socket."""
        assert self.running(), f"the server in {self.data_dir} is not running"
        old = self._pid
        result = self._pg_ctl("restart", "-m", "fast")
        if result.returncode != 0:
            raise PostgresServerError(self._failure("pg_ctl restart", result))
        if old is not None and not _wait_gone(old, self.STOP_TIMEOUT):
            raise PostgresServerError(f"the old postmaster {old} did not exit after pg_ctl restart\n{self.log_tail()}")
        _running.discard(old)
        self._adopt_pid()
        return self

    def stop(self, timeout: float | None = None, *, immediate: bool = False) -> None:
        """Fast shutdown (SIGINT) of the postmaster by its PID; SIGKILL after the timeout. No-op if not running.

        `immediate`: SIGQUIT, PostgreSQL's immediate shutdown, which skips the shutdown checkpoint (seconds
        of writing and fsync after a test session's hundreds of databases): for a server whose data
        directory is deleted next; one that starts again recovers from its WAL.
        """
        pid = self.pid or self._pid
        if pid is None or not self._is_our_postmaster(pid):
            self._forget()
            return
        signum = signal.SIGQUIT if immediate else signal.SIGINT
        os.kill(pid, signum)
        if not _wait_gone(pid, self.STOP_TIMEOUT if timeout is None else timeout):
            self._kill_tree(pid)
            self._forget()
            raise PostgresServerError(f"postmaster {pid} ignored {signum.name}; killed\n{self.log_tail()}")
        self._forget()

    def kill(self) -> None:
        """A crash: SIGKILL the postmaster and its children (backends); the next start() recovers from the WAL."""
        pid = self.pid or self._pid
        if pid is not None and self._is_our_postmaster(pid):
            self._kill_tree(pid)
            # A dead postmaster may stay a zombie for a while under an init that is slow to reap,
            # and the next postmaster would take that PID for a live one: drop its lock files.
            for lock in (self.data_dir / "postmaster.pid", self.socket_dir / f".s.PGSQL.{self.port}.lock"):
                with contextlib.suppress(OSError, ValueError):
                    if int(lock.read_text().split("\n", 1)[0]) == pid:
                        lock.unlink()
        self._forget()

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    # ------------------------------------------------------------ internals

    def _as_server_user(self) -> dict:
        if self._uid == os.geteuid():
            return {}
        return {"user": self._uid, "group": self._gid, "extra_groups": []}

    def _run(self, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC",
               "HOME": str(self.base)}
        switch = self._as_server_user()
        if self.command_prefix:
            # The prefix (entering a namespace) needs our privileges: change user after it, not before.
            if switch:
                cmd = ("setpriv", f"--reuid={self._uid}", f"--regid={self._gid}", "--clear-groups", "--", *cmd)
                switch = {}
            cmd = (*self.command_prefix, *cmd)
        return subprocess.run(cmd, check=False, cwd=self.base, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=timeout, **switch)

    def _failure(self, what: str, result: subprocess.CompletedProcess) -> str:
        return (f"{what} failed (exit {result.returncode}): {shlex.join(map(str, result.args))}\n"
                f"{result.stdout}{result.stderr}--- {self.log_path} ---\n{self.log_tail()}")

    def _initdb(self) -> None:
        sock_len = len(str(self.socket_dir)) + len("/.s.PGSQL.65535")
        if sock_len > SOCKET_PATH_MAX:
            raise PostgresServerError(f"socket path under {self.socket_dir} too long ({sock_len} > {SOCKET_PATH_MAX})")
        if not self.base.exists():
            self.base.mkdir(parents=True)
            self.base.chmod(0o755)
        if self._uid != os.geteuid():
            for parent in (self.base, *self.base.parents):
                if not parent.stat().st_mode & 0o001:
                    raise PostgresServerError(f"{parent} is not searchable by {self.os_user}, who runs the server")
        for path, mode in ((self.data_dir, 0o700), (self.socket_dir, 0o755)):
            path.mkdir(mode=mode)
            os.chown(path, self._uid, self._gid)
        self.log_path.touch(0o644)
        os.chown(self.log_path, self._uid, self._gid)
        result = self._run(str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-U", self.admin,
                           "--auth-local=trust", "--auth-host=reject", "--encoding=UTF8", "--locale=C",
                           "--no-sync", "--no-instructions")
        if result.returncode != 0:
            raise PostgresServerError(self._failure("initdb", result))
        with open(self.data_dir / "postgresql.conf", "a") as conf:
            conf.write("\ninclude_if_exists = 'dfsfuse-test.conf'\n")
        role_method = "scram-sha-256" if self.password is not None else "trust"
        hba = self.data_dir / "pg_hba.conf"
        hba.write_text(
            "# Written by tests/pgserver.py. TYPE DATABASE USER ADDRESS METHOD\n"
            f"local all {self.admin} trust\n"
            f"local all {self.user} {role_method}\n"
            + "".join(f"host all {self.user} {network} {role_method}\n" for network in self.clients))
        os.chown(hba, self._uid, self._gid)

    def _ensure_role(self) -> None:
        with self.admin_connect() as conn:
            if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (self.user,)).fetchone():
                return
            password: sql.Composable = sql.SQL("")
            if self.password is not None:
                password = sql.SQL("PASSWORD {}").format(sql.Literal(self.password))
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN {}").format(sql.Identifier(self.user), password))

    def _write_config(self) -> None:
        settings = {**self.settings, "listen_addresses": self.host, "port": str(self.port),
                    "unix_socket_directories": str(self.socket_dir)}
        text = "".join("{} = '{}'\n".format(key, value.replace("'", "''")) for key, value in settings.items())
        path = self.data_dir / "dfsfuse-test.conf"
        path.write_text("# Written by tests/pgserver.py at every start.\n" + text)
        os.chown(path, self._uid, self._gid)

    def _pg_ctl(self, action: str, *args: str) -> subprocess.CompletedProcess:
        return self._run(str(self.bin_dir / "pg_ctl"), action, "-w", "-t", str(self.START_TIMEOUT), "-D",
                         str(self.data_dir), "-l", str(self.log_path), *args, timeout=self.START_TIMEOUT + 30)

    def _adopt_pid(self) -> None:
        pid = self.pid
        if pid is None or not self._is_our_postmaster(pid):
            raise PostgresServerError(f"no running postmaster in {self.data_dir}/postmaster.pid\n{self.log_tail()}")
        self._pid = pid
        _running.add(pid)

    def _forget(self) -> None:
        if self._pid is not None:
            _running.discard(self._pid)
        self._pid = None

    def _is_our_postmaster(self, pid: int) -> bool:
        """A live process running this installation's postgres binary on this data directory."""
        if _gone(pid):
            return False
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return (re.sub(r" \(deleted\)$", "", exe) == str(self.bin_dir / "postgres")
                and str(self.data_dir).encode() in cmdline)

    def _kill_tree(self, pid: int) -> None:
        children = _children(pid)
        for target in (pid, *children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(target, signal.SIGKILL)
        for target in (pid, *children):
            _wait_gone(target, 10)
