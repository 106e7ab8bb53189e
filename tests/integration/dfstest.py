"""Helpers for the integration tests: real mounts in a subprocess.

A `Mount` runs `python mount.py MOUNTPOINT --data-dir DIR` (daemon mode: the
command returns once the mount is ready), reads the daemon's PID from
DATA_DIR/lock and, on `stop()`, unmounts in order: `fusermount3 -u`, wait for
the daemon to exit 0, check its log ("unmounted cleanly", no "Traceback"),
then run `dfsfuse fsck` as an oracle. `kill()` always leaves nothing behind:
lazy unmount, SIGTERM then SIGKILL of that PID only.

The test session makes itself a child subreaper (see conftest.py), so the
daemon, once it detaches from mount.py, becomes our child: we reap it with
waitpid and see its real exit status, and anything left running at the end
of the session shows up as one of our children.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MOUNT_PY = REPO / "mount.py"
PYTHON = sys.executable

MOUNT_TIMEOUT = 60  # seconds for mount.py to report ready (or fail)
EXIT_TIMEOUT = 60  # seconds for the daemon to drain and exit after unmount
CLI_TIMEOUT = 120  # seconds for status / fsck

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


# --------------------------------------------------------------- commands


class CommandFailed(AssertionError):
    pass


def describe(result: subprocess.CompletedProcess) -> str:
    cmd = result.args if isinstance(result.args, str) else shlex.join(map(str, result.args))
    return (
        f"command: {cmd}\nexit status: {result.returncode}\n"
        f"--- stdout ---\n{_text(result.stdout)[-8000:]}\n--- stderr ---\n{_text(result.stderr)[-8000:]}"
    )


def _text(data) -> str:
    if data is None:
        return ""
    if isinstance(data, bytes):
        return data.decode("utf-8", "replace")
    return data


def run(cmd, *, check=True, timeout=120, cwd=None, env=None, input=None, text=True) -> subprocess.CompletedProcess:
    """Run a command, capture its output; with check, fail showing all of it."""
    try:
        result = subprocess.run(
            [str(c) for c in cmd] if not isinstance(cmd, str) else cmd,
            shell=isinstance(cmd, str),
            cwd=cwd,
            env=env if env is not None else command_env(),
            input=input,
            capture_output=True,
            text=text,
            timeout=timeout,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise CommandFailed(
            f"command timed out after {timeout}s: {cmd}\n--- stdout ---\n{_text(exc.stdout)[-4000:]}"
            f"\n--- stderr ---\n{_text(exc.stderr)[-4000:]}"
        ) from None
    if check and result.returncode != 0:
        raise CommandFailed(describe(result))
    return result


_ENV: dict[str, str] = {}


def command_env(**extra: str) -> dict[str, str]:
    """The environment for every command: no user config, a private XDG dir, git that stays in the foreground."""
    env = dict(os.environ)
    env.update(_ENV)
    env.update(
        {
            "LC_ALL": "C.UTF-8",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_AUTHOR_NAME": "Test",
            "GIT_AUTHOR_EMAIL": "test@example.invalid",
            "GIT_COMMITTER_NAME": "Test",
            "GIT_COMMITTER_EMAIL": "test@example.invalid",
            # git gc --auto would otherwise detach into the background and keep the mount busy
            "GIT_CONFIG_COUNT": "3",
            "GIT_CONFIG_KEY_0": "gc.autoDetach",
            "GIT_CONFIG_VALUE_0": "false",
            "GIT_CONFIG_KEY_1": "maintenance.autoDetach",
            "GIT_CONFIG_VALUE_1": "false",
            "GIT_CONFIG_KEY_2": "safe.directory",
            "GIT_CONFIG_VALUE_2": "*",
        }
    )
    env.update(extra)
    return env


def set_session_env(**values: str) -> None:
    _ENV.update(values)


def dfsfuse_cli(*args, check=True, timeout=CLI_TIMEOUT, prefix=()) -> subprocess.CompletedProcess:
    """`python -m dfsfuse ARGS...`, through `prefix` if given (e.g. a netns.Machine's, to run it there)."""
    return run([*prefix, PYTHON, "-m", "dfsfuse", *args], check=check, timeout=timeout, cwd=REPO)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """Assert a clean user error: non-zero exit, one line on stderr, no traceback; return that line."""
    info = describe(result)
    assert result.returncode != 0, f"expected a non-zero exit\n{info}"
    stderr = _text(result.stderr)
    assert "Traceback" not in stderr and "Traceback" not in _text(result.stdout), f"a traceback instead of an error line\n{info}"
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected exactly one line on stderr, got {len(lines)}\n{info}"
    return lines[0]


# --------------------------------------------------------------- mounts and processes


def fuse_mounts() -> list[tuple[str, str]]:
    """(mount point, fs type) of every FUSE mount, from /proc/mounts."""
    mounts = []
    with open("/proc/mounts") as handle:
        for line in handle:
            fields = line.split()
            if len(fields) >= 3 and fields[2].startswith("fuse"):
                mounts.append((_unescape(fields[1]), fields[2]))
    return mounts


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def is_mounted(path: os.PathLike | str) -> bool:
    path = os.path.abspath(path)
    return any(mp == path for mp, _ in fuse_mounts())


def pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_pid(pid: int, timeout: float) -> int | None:
    """Wait for PID to exit; its exit status if it is our child (we are a subreaper), else -1; None on timeout."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                return os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            if not pid_alive(pid):
                return -1
        if time.monotonic() > deadline:
            return None
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def holders(path: Path) -> list[str]:
    """Processes with a cwd, root or open file under PATH (why an unmount says busy)."""
    prefix = str(path)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        base = f"/proc/{entry}"
        try:
            links = [os.readlink(f"{base}/cwd")]
            links += [os.readlink(f"{base}/fd/{fd}") for fd in os.listdir(f"{base}/fd")]
            if any(link == prefix or link.startswith(prefix + "/") for link in links):
                with open(f"{base}/cmdline", "rb") as handle:
                    cmdline = handle.read().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{entry}: {cmdline}")
        except OSError:
            continue
    own = [f"{fd} -> {os.readlink(f'/proc/self/fd/{fd}')}" for fd in os.listdir("/proc/self/fd") if _points_under(fd, prefix)]
    if own:
        found.append(f"this test process: {own}")
    return found


def _points_under(fd: str, prefix: str) -> bool:
    try:
        link = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return False
    return link == prefix or link.startswith(prefix + "/")


def fusermount_u(mountpoint: Path, timeout: float = 20) -> subprocess.CompletedProcess:
    """`fusermount3 -u`, retried for a while if the mount is busy (a process just closing a file)."""
    deadline = time.monotonic() + timeout
    while True:
        result = run(["fusermount3", "-u", mountpoint], check=False, timeout=30)
        if result.returncode == 0 or "busy" not in result.stderr.lower() or time.monotonic() > deadline:
            return result
        time.sleep(0.1)


class Mount:
    """One mounted dfsfuse file system, started as a user would start it."""

    def __init__(self, mountpoint: Path, data_dir: Path, *, config: str | None = None, options: list[str] | None = None):
        self.mountpoint = Path(mountpoint)
        self.data_dir = Path(data_dir)
        self.options = list(options or [])
        self.config_path: Path | None = None
        if config is not None:
            self.config_path = self.data_dir.parent / f"{self.data_dir.name}.toml"
            self.config_path.write_text(config)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.pid: int | None = None
        self.log_offset = 0  # where this run's part of the log starts
        self.node_roots: list[Path] | None = None  # the data dirs of node servers, if the nodes are remote
        self.extra_args: list[str] = []  # for the mount and every command (--meta URL, ...)
        # The mount command and every command line tool run through this (a netns.Machine's prefix
        # runs them on that "machine"); the unmount (fusermount3) and the checks need none.
        self.command_prefix: list[str] = []

    # paths -----------------------------------------------------------------
    @property
    def log_path(self) -> Path:
        return self.data_dir / "dfsfuse.log"

    @property
    def lock_path(self) -> Path:
        return self.data_dir / "lock"

    def node_dirs(self) -> list[Path]:
        if self.node_roots is not None:
            return list(self.node_roots)
        return sorted((self.data_dir / "nodes").iterdir())

    def __truediv__(self, other) -> Path:
        return self.mountpoint / other

    # logs ------------------------------------------------------------------
    def log_text(self, whole: bool = False) -> str:
        try:
            data = self.log_path.read_bytes()
        except FileNotFoundError:
            return "(no log file)"
        return data[0 if whole else self.log_offset :].decode("utf-8", "replace")

    def log_tail(self, lines: int = 150) -> str:
        text = self.log_text(whole=True).splitlines()
        return f"--- last {min(lines, len(text))} lines of {self.log_path} ---\n" + "\n".join(text[-lines:])

    # life cycle ------------------------------------------------------------
    def mount_command(self, entry: str = "mount.py") -> list[str]:
        if entry == "mount.py":
            cmd = [PYTHON, str(MOUNT_PY)]
        elif entry == "module":
            cmd = [PYTHON, "-m", "dfsfuse", "mount"]
        elif entry == "script":
            cmd = [str(Path(PYTHON).with_name("dfsfuse")), "mount"]
        else:
            raise ValueError(entry)
        cmd += [str(self.mountpoint), "--data-dir", str(self.data_dir)]
        if self.config_path is not None:
            cmd += ["--config", str(self.config_path)]
        if self.options:
            cmd += ["-o", ",".join(self.options)]
        return cmd + self.extra_args

    def start(self, entry: str = "mount.py") -> None:
        assert not is_mounted(self.mountpoint), f"{self.mountpoint} is already mounted"
        self.log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        result = run([*self.command_prefix, *self.mount_command(entry)], check=False, timeout=MOUNT_TIMEOUT, cwd=REPO)
        if result.returncode != 0:
            self._adopt_pid()
            raise CommandFailed(f"mount failed\n{describe(result)}\n{self.log_tail()}")
        self._adopt_pid()
        assert self.pid is not None, f"mount.py returned 0 but {self.lock_path} holds no PID\n{self.log_tail()}"
        assert pid_alive(self.pid), f"daemon PID {self.pid} from {self.lock_path} is not running\n{self.log_tail()}"
        assert is_mounted(self.mountpoint), f"mount.py returned 0 but {self.mountpoint} is not in /proc/mounts\n{self.log_tail()}"
        os.stat(self.mountpoint)  # answers

    def _adopt_pid(self) -> None:
        try:
            first = self.lock_path.read_text().splitlines()[0].strip()
            pid = int(first)
        except (OSError, IndexError, ValueError):
            return
        if pid_alive(pid):
            self.pid = pid

    def stop(self, check: bool = True, fsck: bool = True) -> None:
        """Unmount in order and check that the daemon drained and exited 0; then fsck."""
        if self.pid is None and not is_mounted(self.mountpoint):
            return
        try:
            result = fusermount_u(self.mountpoint)
            if result.returncode != 0:
                raise CommandFailed(
                    f"unmount failed\n{describe(result)}\nholders: {holders(self.mountpoint)}\n{self.log_tail()}"
                )
            if self.pid is not None:
                status = wait_pid(self.pid, EXIT_TIMEOUT)
                pid, self.pid = self.pid, None
                if status is None:
                    self.pid = pid
                    raise AssertionError(f"daemon {pid} still running {EXIT_TIMEOUT}s after unmount\n{self.log_tail()}")
                if check and status not in (0, -1):
                    raise AssertionError(f"daemon {pid} exited with status {status} after unmount\n{self.log_tail()}")
            if check:
                log = self.log_text()
                assert "unmounted cleanly" in log, f"the log does not say 'unmounted cleanly'\n{self.log_tail()}"
                assert "Traceback" not in log, f"a traceback in the log\n{self.log_tail()}"
            if fsck:
                result = self.fsck(check=False)
                assert result.returncode == 0, f"fsck after unmount reported a problem\n{describe(result)}\n{self.log_tail()}"
        finally:
            self.kill()

    def kill(self) -> None:
        """Leave nothing behind, whatever state we are in: lazy unmount, SIGTERM, SIGKILL (our PID only)."""
        if is_mounted(self.mountpoint):
            run(["fusermount3", "-u", "-z", self.mountpoint], check=False, timeout=30)
        if self.pid is not None:
            pid, self.pid = self.pid, None
            for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
                if wait_pid(pid, grace) is not None:
                    break

    def crash(self) -> None:
        """kill -9 the daemon and reap it; the mount point is left dead (ENOTCONN)."""
        assert self.pid is not None
        os.kill(self.pid, signal.SIGKILL)
        status = wait_pid(self.pid, 20)
        assert status is not None, f"daemon {self.pid} survived SIGKILL"
        self.pid = None

    def remount(self) -> None:
        self.stop()
        self.start()

    # command line tools -------------------------------------------------------
    def _data_args(self) -> list:
        args = ["--data-dir", self.data_dir]
        if self.config_path is not None:
            args += ["--config", self.config_path]
        return args + self.extra_args

    def fsck(self, check: bool = True) -> subprocess.CompletedProcess:
        return dfsfuse_cli("fsck", *self._data_args(), check=check, prefix=self.command_prefix)

    def status(self, as_json: bool = False) -> str:
        """What `dfsfuse status` prints (with `as_json`, its --json: see parse_status)."""
        return dfsfuse_cli("status", *self._data_args(), *(["--json"] if as_json else []),
                           prefix=self.command_prefix).stdout

    # node stores ----------------------------------------------------------------
    def replica_files(self) -> dict[str, list[Path]]:
        """shard id (16 hex digits) -> replica files on every node store
        (metadata snapshots, ids from 2**63 up, are not shards: left out)."""
        shards: dict[str, list[Path]] = {}
        for node in self.node_dirs():
            root = node / "shards"
            if not root.is_dir():
                continue
            for sub in root.iterdir():
                if not sub.is_dir():
                    continue
                for replica in sub.iterdir():
                    if re.fullmatch(r"[0-7][0-9a-f]{15}", replica.name):
                        assert sub.name == replica.name[-2:], f"replica {replica} in the wrong directory"
                        shards.setdefault(replica.name, []).append(replica)
        return shards

    def held_replicas(self) -> dict[str, list[HeldReplica]]:
        """shard id (16 hex digits) -> every replica the node stores hold of
        it, as its own file or as a record in a pack (read without changing
        anything: the stores may be open); metadata snapshots left out."""
        held: dict[str, list[HeldReplica]] = {}
        packed_by_node = {node: _packed_records(node) for node in self.node_dirs()}
        for node, packed in packed_by_node.items():
            for shard, replica in packed.items():
                held.setdefault(f"{shard:016x}", []).append(replica)
        for shard, files in self.replica_files().items():
            for file in files:
                if int(shard, 16) not in packed_by_node.get(file.parents[2], {}):
                    held.setdefault(shard, []).append(HeldReplica(file.parents[2], file.stat().st_size, file, 0))
        return held


@dataclasses.dataclass(frozen=True)
class HeldReplica:
    node: Path  # the root of the node store that holds it
    size: int  # bytes of the replica
    path: Path  # its own file, or the pack holding it
    offset: int  # where it starts in `path`

    @property
    def packed(self) -> bool:
        return self.path.suffix == ".pack"

    def read_bytes(self) -> bytes:
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            return handle.read(self.size)


def _packed_records(node: Path) -> dict[int, HeldReplica]:
    """Shard id -> the live record of it in a node store's packs
    (docs/formats.md "Pack files"), read only: the later record of an id
    wins, records named in their pack's dead log are dead, scanning a pack
    stops at a damaged or torn record."""
    from dfsfuse.storage import packs

    directory = node / "packs"
    live: dict[int, HeldReplica] = {}
    if not directory.is_dir():
        return live
    for path in sorted(directory.glob("*.pack")):
        data = path.read_bytes()
        dead_path = path.with_suffix(".dead")
        dead_bytes = dead_path.read_bytes() if dead_path.exists() else b""
        dead = set(packs.DEAD_ENTRY.iter_unpack(dead_bytes[: len(dead_bytes) - len(dead_bytes) % packs.DEAD_ENTRY.size]))
        offset = packs.PACK_HEADER.size
        while offset + packs.RECORD.size <= len(data):
            magic, _, shard, length = packs.RECORD.unpack_from(data, offset)
            if magic != packs.RECORD_MAGIC or offset + packs.RECORD.size + length > len(data):
                break
            if (shard, offset) not in dead and shard < 2**63:
                live[shard] = HeldReplica(node, length, path, offset + packs.RECORD.size)
            offset += packs.RECORD.size + length
    return live


# --------------------------------------------------------------- node servers


class NodeServer:
    """`python -m dfsfuse node serve` on a loopback port chosen at its first start.

    Its store is in BASE/NAME (the same layout as a local node store), its log in
    BASE/NAME.log. A restart listens on the same port. `stop()` ends it by its PID
    whatever state it is in (SIGCONT, SIGTERM, then SIGKILL).

    On another "machine" (tests/netns.py): `host` is the address it listens on
    and `command_prefix` the command it runs through (`machine.prefix`, which
    enters the namespace and execs the server: the PID stays the server's).
    """

    START_TIMEOUT = 20.0

    def __init__(self, base: Path, name: str, secret_file: Path, *extra_args: str, host: str = "127.0.0.1",
                 command_prefix: list[str] | tuple[str, ...] = ()):
        self.name = name
        self.data = Path(base) / name
        self.log_path = Path(base) / f"{name}.log"
        self.secret_file = secret_file
        self.extra_args = extra_args
        self.host = host
        self.command_prefix = list(command_prefix)
        self.process: subprocess.Popen | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> NodeServer:
        import select

        assert self.process is None or self.process.poll() is not None, f"{self.name} is running"
        cmd = [*self.command_prefix, PYTHON, "-m", "dfsfuse", "node", "serve", "--data", str(self.data), "--listen",
               f"{self.host}:{self.port}", "--secret-file", str(self.secret_file), "--name", self.name,
               *self.extra_args]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                                            cwd=REPO, env=command_env())
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], self.START_TIMEOUT)
        line = self.process.stdout.readline().decode() if ready else ""
        self.process.stdout.close()
        match = re.fullmatch(rf"listening on {re.escape(self.host)}:(\d+)\n", line)
        if not match:
            self.stop()
            raise AssertionError(f"node server {self.name} did not start: {line!r}\n{self.log_tail()}")
        self.port = int(match[1])
        return self

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, signum: int) -> None:
        assert self.running(), f"node server {self.name} is not running\n{self.log_tail()}"
        os.kill(self.pid, signum)

    def crash(self) -> None:
        """SIGKILL, and reap it."""
        self.signal(signal.SIGKILL)
        assert self.process is not None
        self.process.wait(20)

    def stop(self) -> None:
        if not self.running():
            return
        assert self.process is not None
        for signum, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGCONT)
                os.kill(self.pid, signum)
            try:
                self.process.wait(grace)
                return
            except subprocess.TimeoutExpired:
                continue

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return f"(no log {self.log_path})"
        return f"--- last lines of {self.log_path} ---\n" + "\n".join(text[-lines:])


def write_secret(path: Path, secret: bytes = b"dfsfuse-integration-test-secret\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(secret)
    path.chmod(0o600)
    return path


def remote_config(servers: list[NodeServer], secret_file: Path, extra: str = "") -> str:
    """Config text: `extra` (top-level settings), the secret, and one [[nodes]] per server."""
    text = f'secret_file = "{secret_file}"\n' + (extra or "").strip() + "\n"
    for server in servers:
        text += f'\n[[nodes]]\nname = "{server.name}"\naddress = "{server.address}"\n'
    return text


# --------------------------------------------------------------- acting as another user


def as_user(uid: int, gid: int, func, *args, groups: tuple[int, ...] = (), umask: int | None = None):
    """Run func(*args) in a forked child with the given ids; return its result or re-raise its OSError.

    The child sends back ("ok", value) or ("err", errno, message) through a pipe.
    """
    import pickle

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(read_end)
            try:
                os.setgroups(list(groups))
                os.setresgid(gid, gid, gid)
                os.setresuid(uid, uid, uid)
                if umask is not None:
                    os.umask(umask)
                reply = ("ok", func(*args))
            except OSError as exc:
                reply = ("err", exc.errno, str(exc))
            except BaseException as exc:  # noqa: BLE001 - report everything to the parent
                reply = ("exc", f"{type(exc).__name__}: {exc}")
            os.write(write_end, pickle.dumps(reply))
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as handle:
        data = handle.read()
    _, status = os.waitpid(pid, 0)
    assert data, f"child as uid {uid} died (status {status})"
    reply = pickle.loads(data)
    if reply[0] == "ok":
        return reply[1]
    if reply[0] == "err":
        raise OSError(reply[1], f"as uid {uid}: {reply[2]}")
    raise AssertionError(f"child as uid {uid} failed: {reply[1]}")


def user_errno(uid: int, gid: int, func, *args, **kwargs) -> int:
    """The errno func(*args) fails with as that user, or 0 if it succeeds."""
    try:
        as_user(uid, gid, func, *args, **kwargs)
    except OSError as exc:
        return exc.errno
    return 0


# --------------------------------------------------------------- files


def write_file(path, data: bytes, *, fsync: bool = False) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def read_file(path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def tree_digest(root: Path, mtime_unit: int = 1) -> dict[str, tuple]:
    """Relative path -> (type, mode, size, mtime // mtime_unit, sha256) or (link, target) for everything under root."""
    result: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            st = path.lstat()
            if path.is_symlink():
                result[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                result[rel] = ("dir", oct(st.st_mode))
            elif path.is_file():
                result[rel] = ("file", oct(st.st_mode), st.st_size, st.st_mtime_ns // mtime_unit, sha256_file(path))
            else:
                result[rel] = ("other", oct(st.st_mode))
    return result


def drop_caches() -> None:
    """Drop the kernel's clean page cache so the next read really asks the file system.

    No sync() first: it would wait on every file system of the machine, hung ones included.
    """
    with open("/proc/sys/vm/drop_caches", "w") as handle:
        handle.write("3\n")


def expect_errno(expected, func, *args, **kwargs) -> OSError:
    """Call func and assert it fails with one of the expected errnos."""
    if isinstance(expected, int):
        expected = (expected,)
    names = "/".join(errno.errorcode.get(e, str(e)) for e in expected)
    try:
        func(*args, **kwargs)
    except OSError as exc:
        assert exc.errno in expected, (
            f"{getattr(func, '__name__', func)}{args!r} failed with {errno.errorcode.get(exc.errno, exc.errno)}"
            f" ({exc}), expected {names}"
        )
        return exc
    raise AssertionError(f"{getattr(func, '__name__', func)}{args!r} succeeded, expected {names}")


# --------------------------------------------------------------- renameat2

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_libc = ctypes.CDLL(None, use_errno=True)


def renameat2(old, new, flags: int) -> None:
    old_b, new_b = os.fsencode(old), os.fsencode(new)
    func = getattr(_libc, "renameat2", None)
    if func is not None:
        func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        res = func(_AT_FDCWD, old_b, _AT_FDCWD, new_b, flags)
    else:  # pragma: no cover - glibc < 2.28
        assert os.uname().machine == "x86_64"
        res = _libc.syscall(316, _AT_FDCWD, old_b, _AT_FDCWD, new_b, flags)
    if res != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(old))


# --------------------------------------------------------------- status output


def stored_bytes(mount: Mount) -> int:
    """Bytes of replicas on the node stores, as `dfsfuse status` reports them."""
    return sum(node["bytes"] for node in parse_status(mount.status(as_json=True))["nodes"].values())


def wait_until(condition, what: str, timeout: float = 15.0) -> None:
    """Poll `condition` until it holds; fail saying `what` did not happen in `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def copy_with_interruption(source: Path, target: Path, interrupt, what: str) -> None:
    """`cp source target`, calling `interrupt()` once a third of it is copied;
    fails saying `what` happened if cp does not succeed."""
    size = os.stat(source).st_size
    copy = subprocess.Popen(["cp", source, target], stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: target.exists() and target.stat().st_size >= size // 3, "a third of the copy", 120)
        interrupt()
        _, stderr = copy.communicate(timeout=180)
    finally:
        if copy.poll() is None:
            copy.kill()
            copy.wait()
    assert copy.returncode == 0, f"cp failed after {what}: {stderr}"


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def parse_status(text: str) -> dict:
    """The figures of `dfsfuse status --json`, with each node by name: {"path": its address,
    "shards", "bytes" (used; 0 when unreachable), "alive", "error"}."""
    report = json.loads(text)
    nodes = {
        node["name"]: {"path": node["address"], "shards": node["shards"] or 0, "bytes": node["used"] or 0,
                       "alive": node["alive"], "error": node["error"]}
        for node in report["nodes"]
    }
    return {**report, "nodes": nodes}


FSCK_LINE = re.compile(
    r"fsck: (\d+) shards checked, (\d+) replicas missing, (\d+) corrupt, (\d+) orphan; "
    r"repaired (\d+), removed (\d+) orphans, (\d+) unrecoverable"
)


def parse_fsck(result: subprocess.CompletedProcess) -> dict:
    match = None
    for stream in (result.stdout, result.stderr):
        lines = [line for line in _text(stream).splitlines() if line.strip()]
        if lines:
            match = match or FSCK_LINE.fullmatch(lines[-1].strip())
    assert match, f"fsck's last line is not the summary\n{describe(result)}"
    keys = ("checked", "missing", "corrupt", "orphan", "repaired", "removed", "unrecoverable")
    return dict(zip(keys, map(int, match.groups())))
