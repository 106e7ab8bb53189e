"""Network namespaces as the "machines" of a test: one private subnet, a switch, and a namespace per machine.

`Network()` makes a "switch" namespace dfs<PID>-sw holding a Linux bridge
(`br0`); `network.add("db")` makes the namespace dfs<PID>-db, a veth pair
whose one end (`v-db`) is a port of the bridge and whose other end (`eth0`) is
in the new namespace, with the next address of the subnet on it and loopback
up. Every link is created inside our own namespaces (`ip -n NS link add ...
peer name eth0 netns OTHER`): the host's network namespace gets no interface
or address of ours (one route, below). The subnet is a 10.77.X.0/24 that no route or address
of the host covers more specifically than its default route (`pick_subnet()`),
and the machines have no default route: a process in them reaches the other
machines of the network and its own loopback, nothing else (anything else is
ENETUNREACH at once).

Never connect to a machine's address from the host's namespace: run the
client on a machine instead (`machine.prefix`). The host's own route to our
subnet would be its default one, out of this computer; so that a mistake (a
command run without the prefix) fails here at once instead of sending packets
out, the network adds one thing to the host: a blackhole route for its subnet
(`ip route add blackhole 10.77.X.0/24`; connect() fails with EINVAL), deleted
at close. It adds no interface or address to the host and touches none.

Where bridges are not available (no bridge module) the switch namespace is a
router instead: each machine gets its address as a /32 on `eth0`, with an
on-link route to the subnet via the switch end, which has the subnet's .1 and a
/32 route to each machine, and forwards (its own ip_forward; the host's is not
touched).

Running a command on a machine, and FUSE: `ip netns exec NAME CMD` is NOT used,
because it also unshares the mount namespace (to remount /sys for the network
namespace and to bind /etc/netns/NAME files over /etc), so a FUSE mount made by
a process started with it exists only in that private mount namespace: the test
process (and fusermount3 -u) would not see it. Instead `machine.prefix` is
`nsenter --net=/run/netns/NAME --`, which only setns()es into the network
namespace and execs CMD (no fork: the PID of the Popen is CMD's own): the
process keeps the host's mount namespace, so a mount made by mount.py on a
machine is visible to the test, which drives it with ordinary file operations
and unmounts it with fusermount3 -u as usual. (A preexec setns() in the child
would do the same but runs after subprocess has changed the user, and a user
other than root may not setns(); nsenter as a prefix composes with `setpriv`,
which tests/pgserver.py puts after it.) Unix sockets bound to paths are reached
by path whatever the network namespace, so PostgreSQL's socket still works for
the admin connections of tests/pgserver.py.

Processes: `machine.popen()` tracks what it starts; `network.close()` ends those
by PID (SIGTERM, then SIGKILL), then finds any other process still in one of our
namespaces (by the inode of /proc/PID/ns/net: a namespace of ours holds only
processes we started), ends it by PID and reports it as a leftover: a network
namespace lives on while a process is in it, even after `ip netns del`. Then it
deletes the veth pairs and every namespace it made, checks that `ip netns list`
shows none of them, and raises NetnsLeftovers if anything had been left. It runs
even when the network was only half built.

Names: the namespaces are dfs<PID>-NAME (the PID of the test process, so runs
side by side do not meet; one Network at a time in a process), the interfaces
br0, eth0 and v-NAME, all short of IFNAMSIZ.

Nothing here depends on pytest; the `network` fixture is in tests/conftest.py.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

NETNS_DIR = Path("/run/netns")
SUBNET_PREFIX = "10.77"  # our subnets are 10.77.X.0/24
IFNAMSIZ = 16  # interface names have at most 15 characters
NAME_RE = re.compile(r"[a-z][a-z0-9]{0,3}")  # machine names: short, so every derived name stays short
STOP_GRACE = 10.0  # seconds after SIGTERM before SIGKILL


class NetnsUnavailable(RuntimeError):
    """Network namespaces (or veth pairs) cannot be made here: not root, no iproute2 / nsenter, no kernel support."""


class NetnsError(RuntimeError):
    """A command of ours failed; the message has its output."""


class NetnsLeftovers(AssertionError):
    """Something was still running or still there at teardown (it has been cleaned up)."""


def tag_for_run() -> str:
    """The prefix of every namespace name of this process: dfs<PID>."""
    return f"dfs{os.getpid()}"


def _run(cmd: list[str], *, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False)
    if check and result.returncode != 0:
        raise NetnsError(f"{shlex.join(cmd)} failed (exit {result.returncode}): {result.stderr.strip() or result.stdout.strip()}")
    return result


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run(["ip", *args], check=check)


def namespaces() -> list[str]:
    """Names of all named network namespaces (`ip netns list`)."""
    return [line.split()[0] for line in ip("netns", "list").stdout.splitlines() if line.strip()]


def leftovers(tag: str | None = None) -> list[str]:
    """Namespaces of this process (or of `tag`) that still exist."""
    tag = tag or tag_for_run()
    return [name for name in namespaces() if name.startswith(tag + "-")]


def unavailable() -> str | None:
    """Why network namespaces cannot be used here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool, package in (("ip", "iproute2"), ("nsenter", "util-linux")):
        if shutil.which(tool) is None:
            return f"no {tool} (apt-get install {package}; scripts/install.sh --test)"
    return None


def pick_subnet(seed: int | None = None) -> ipaddress.IPv4Network:
    """A 10.77.X.0/24 that no route (any table) or address of the host overlaps, the default route aside."""
    used: list[ipaddress.IPv4Network] = []
    for line in ip("-4", "route", "show", "table", "all").stdout.splitlines():
        words = line.split()
        if words and words[0] in ("local", "broadcast", "unicast", "multicast", "anycast", "blackhole",
                                  "unreachable", "prohibit", "throw", "nat"):
            words = words[1:]
        if words and words[0] != "default":
            with contextlib.suppress(ValueError):
                used.append(ipaddress.IPv4Network(words[0], strict=False))
    for match in re.finditer(r"\binet (\S+)", ip("-4", "-o", "addr").stdout):
        used.append(ipaddress.IPv4Interface(match[1]).network)
    start = (os.getpid() if seed is None else seed) % 200 + 20  # runs side by side tend to differ
    for step in range(250):
        candidate = ipaddress.IPv4Network(f"{SUBNET_PREFIX}.{(start + step) % 250 + 1}.0/24")
        if not any(candidate.overlaps(net) for net in used):
            return candidate
    raise NetnsUnavailable(f"every {SUBNET_PREFIX}.X.0/24 overlaps a route or address of this host")


def _netns_inode(name: str) -> tuple[int, int] | None:
    try:
        st = os.stat(NETNS_DIR / name)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _pids_in(inodes: set[tuple[int, int]]) -> dict[int, str]:
    """PID -> command line of every process whose network namespace is one of `inodes`."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
            if (st.st_dev, st.st_ino) not in inodes:
                continue
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        found[int(entry)] = cmdline.strip()
    return found


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _end_pid(pid: int, grace: float = STOP_GRACE) -> None:
    """SIGTERM, then SIGKILL after `grace`, of this one PID; reaps it if it is our child."""
    for signum, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signum)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                done, _ = os.waitpid(pid, os.WNOHANG)
                if done == pid:
                    return
            if _state(pid) in (None, "Z", "X"):
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
                return
            time.sleep(0.02)


class Machine:
    """One network namespace of a Network: `name` ("db"), `netns` (dfs<PID>-db), `address` (10.77.X.N)."""

    def __init__(self, network: Network, name: str, netns: str, address: str):
        self.network = network
        self.name = name
        self.netns = netns
        self.address = address
        self.processes: list[subprocess.Popen] = []

    def __repr__(self) -> str:
        return f"Machine({self.name!r}, netns={self.netns!r}, address={self.address!r})"

    @property
    def prefix(self) -> list[str]:
        """Put before a command to run it here (network namespace only; the mount namespace stays the host's)."""
        return ["nsenter", f"--net={NETNS_DIR / self.netns}", "--"]

    def wrap(self, cmd) -> list[str]:
        return [*self.prefix, *map(str, cmd)]

    def run(self, cmd, *, check: bool = True, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
        """subprocess.run of CMD on this machine (output captured as text); NetnsError showing it if check fails."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        result = subprocess.run(self.wrap(cmd), timeout=timeout, check=False, **kwargs)
        if check and result.returncode != 0:
            raise NetnsError(f"on {self.name}: {shlex.join(self.wrap(cmd))} exited {result.returncode}\n"
                             f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}")
        return result

    def popen(self, cmd, **kwargs) -> subprocess.Popen:
        """subprocess.Popen of CMD on this machine; the process is ended by its PID at stop() / network.close()."""
        process = subprocess.Popen(self.wrap(cmd), **kwargs)
        self.processes.append(process)
        return process

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """`ip -n NETNS ARGS` (iproute2 enters the namespace for that one command)."""
        return ip("-n", self.netns, *args, check=check)

    def connect_errno(self, host: str, port: int, timeout: float = 5) -> str:
        """Try a TCP connection from this machine: "connected" or the error's errno name (ECONNREFUSED, ...)."""
        probe = (
            "import errno, socket, sys\n"
            "try:\n"
            f"    socket.create_connection(({host!r}, {int(port)}), timeout={float(timeout)}).close()\n"
            "    print('connected')\n"
            "except socket.timeout:\n"
            "    print('ETIMEDOUT')\n"
            "except OSError as exc:\n"
            "    print(errno.errorcode.get(exc.errno, str(exc)))\n"
        )
        return self.run(["python3", "-c", probe], timeout=timeout + 30).stdout.strip()

    def pids(self) -> dict[int, str]:
        """PID -> command line of every process in this namespace."""
        inode = _netns_inode(self.netns)
        return _pids_in({inode}) if inode else {}

    def stop(self) -> None:
        """End, by PID, the processes popen() started here and that are still running."""
        for process in self.processes:
            if process.poll() is None:
                _end_pid(process.pid)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(1)
        self.processes.clear()


class Network:
    """A switch namespace and machines on one private subnet; see the module docstring.

    with Network() as network:
        db = network.add("db")
        network.add("m1").run(["python3", "-c", f"import socket; socket.create_connection(({db.address!r}, 5432))"])
    """

    def __init__(self, *, tag: str | None = None, subnet: str | None = None, bridge: bool | None = None):
        """bridge: True for a bridge, False for a router, None: a bridge if the kernel has them, else a router."""
        reason = unavailable()
        if reason:
            raise NetnsUnavailable(reason)
        self.tag = tag or tag_for_run()
        self.subnet = ipaddress.IPv4Network(subnet) if subnet else pick_subnet()
        self.prefixlen = self.subnet.prefixlen
        self.machines: dict[str, Machine] = {}
        self._created: list[str] = []  # namespaces, in the order made
        self._links: list[str] = []  # our veth ends in the switch namespace
        self._inodes: set[tuple[int, int]] = set()
        self.closed = False
        self.switch = f"{self.tag}-sw"
        self._blackhole = False
        try:
            stale = leftovers(self.tag)
            if stale:
                raise NetnsError(f"namespaces named like ours already exist ({stale}): another Network of this "
                                 "process not closed yet (one at a time), or left by a killed run with our PID")
            ip("route", "add", "blackhole", str(self.subnet))
            self._blackhole = True
            self._add_namespace(self.switch)
            self.bridge = self._make_switch(bridge)
        except BaseException:
            self.close(check=False)
            raise

    # ------------------------------------------------------------ building

    def _add_namespace(self, name: str) -> None:
        result = ip("netns", "add", name, check=False)
        if result.returncode != 0:
            raise NetnsUnavailable(f"ip netns add {name} failed: {result.stderr.strip()}")
        self._created.append(name)
        inode = _netns_inode(name)
        if inode:
            self._inodes.add(inode)
        ip("-n", name, "link", "set", "lo", "up")

    def _make_switch(self, bridge: bool | None) -> bool:
        if bridge is not False:
            made = ip("-n", self.switch, "link", "add", "br0", "type", "bridge", check=False)
            if made.returncode == 0:
                ip("-n", self.switch, "link", "set", "br0", "up")
                return True
            if bridge:
                raise NetnsUnavailable(f"cannot make a bridge: {made.stderr.strip()} (modprobe bridge)")
        # A router: forwarding in the switch namespace only (/proc/sys/net is per network namespace).
        _run(["nsenter", f"--net={NETNS_DIR / self.switch}", "--", "sh", "-c",
              "echo 1 > /proc/sys/net/ipv4/ip_forward"])
        return False

    @property
    def gateway(self) -> str:
        """The switch's address (router mode only; a bridge has none)."""
        return str(self.subnet.network_address + 1)

    def add(self, name: str) -> Machine:
        """A new machine NAME (1-4 lower-case letters or digits, a letter first) with the next address."""
        assert not self.closed, "this network is closed"
        if not NAME_RE.fullmatch(name):
            raise ValueError(f"machine name {name!r}: 1-4 characters [a-z0-9], a letter first")
        if name in self.machines or name == "sw":
            raise ValueError(f"machine {name!r} exists")
        netns = f"{self.tag}-{name}"
        host_index = 10 + len(self.machines)  # .1 for the switch (router mode), machines from .10
        address = str(self.subnet.network_address + host_index)
        port = f"v-{name}"
        assert len(port) < IFNAMSIZ
        self._add_namespace(netns)
        machine = Machine(self, name, netns, address)
        self.machines[name] = machine
        ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", netns)
        self._links.append(port)
        if self.bridge:
            ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
            machine.ip("addr", "add", f"{address}/{self.prefixlen}", "dev", "eth0")
            machine.ip("link", "set", "eth0", "up")
        else:
            ip("-n", self.switch, "addr", "add", f"{self.gateway}/32", "dev", port)
            ip("-n", self.switch, "link", "set", port, "up")
            ip("-n", self.switch, "route", "add", f"{address}/32", "dev", port)
            machine.ip("addr", "add", f"{address}/32", "dev", "eth0")
            machine.ip("link", "set", "eth0", "up")
            machine.ip("route", "add", str(self.subnet), "via", self.gateway, "dev", "eth0", "onlink")
        return machine

    def __getitem__(self, name: str) -> Machine:
        return self.machines[name]

    # ------------------------------------------------------------ teardown

    def close(self, check: bool = True) -> None:
        """End every process left in our namespaces, delete our links and namespaces; NetnsLeftovers if any was left
        (after cleaning up). Safe to call twice and on a half-built network."""
        if self.closed:
            return
        self.closed = True
        problems: list[str] = []
        for machine in self.machines.values():
            machine.stop()
        for _ in range(3):  # a process may start another while we end it
            left = _pids_in(self._inodes)
            if not left:
                break
            for pid, cmdline in left.items():
                problems.append(f"process {pid} still running in one of our namespaces: {cmdline}")
                _end_pid(pid)
        for port in reversed(self._links):
            ip("-n", self.switch, "link", "del", port, check=False)
        for name in reversed(self._created):
            result = ip("netns", "del", name, check=False)
            if result.returncode != 0:
                problems.append(f"ip netns del {name}: {result.stderr.strip()}")
        if self._blackhole:
            result = ip("route", "del", "blackhole", str(self.subnet), check=False)
            if result.returncode != 0:
                problems.append(f"ip route del blackhole {self.subnet}: {result.stderr.strip()}")
        left = [name for name in leftovers(self.tag) if name in self._created]
        if left:
            problems.append(f"namespaces still there: {left}")
        if _pids_in(self._inodes):
            problems.append(f"processes still in our namespaces: {_pids_in(self._inodes)}")
        if problems and check:
            raise NetnsLeftovers("the network was not clean at teardown:\n" + "\n".join(problems))

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc) -> None:
        self.close(check=exc[0] is None)
