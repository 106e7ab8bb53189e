"""The file system on several "machines": PostgreSQL, two node servers and the
mount each in a network namespace of its own (tests/netns.py), on a private
subnet, so that nothing works only because everything shares loopback.

    db   PostgreSQL, listening on db's address only (scram password from the subnet)
    n1   dfsfuse node serve --listen n1:0
    n2   dfsfuse node serve --listen n2:0
    m1   dfsfuse format --meta URL, then mount.py MNT --meta URL (config: the node servers by address)

Everything runs through `machine.prefix` (nsenter --net), which keeps this
process's mount namespace: the mount made on m1 is driven from here with
ordinary file operations and unmounted with fusermount3 -u. One network, one
PostgreSQL and one pair of node servers serve the whole module.

To add a machine that mounts the same file system: `cluster.mount("m2")`
(a fixture of its own, module scope, like `m1` below).
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import netns
import pgserver
import psycopg
import pytest
from dfstest import (
    MiB,
    Mount,
    NodeServer,
    dfsfuse_cli,
    drop_caches,
    one_line_error,
    parse_status,
    read_file,
    remote_config,
    write_file,
    write_secret,
)

pytestmark = pytest.mark.mounted

DATABASE = "netns"
SHARD = 1 * MiB


class MachineMount(Mount):
    """A Mount whose mount command, fsck and status run on `machine`."""

    def __init__(self, machine: netns.Machine, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.machine = machine
        self.command_prefix = machine.prefix


@dataclass
class Cluster:
    """The module's machines and servers; `mount(name)` puts a mount of the file system on a new machine."""

    network: netns.Network
    base: Path
    postgres: pgserver.PostgresServer
    servers: list[NodeServer]
    secret: Path
    password_file: Path
    mounts: list[MachineMount] = field(default_factory=list)
    formatted: bool = False

    @property
    def url(self) -> str:
        return self.postgres.url(DATABASE)

    @property
    def meta_args(self) -> list[str]:
        return ["--meta", self.url, "--meta-password-file", str(self.password_file)]

    def config(self) -> str:
        return remote_config(self.servers, self.secret, f'replicas = 2\nshard_size = "{SHARD}"\n')

    def mount(self, name: str) -> MachineMount:
        """A new machine NAME and a mount there (the first one formats the database first, from that machine)."""
        machine = self.network.add(name)
        where = self.base / name
        where.mkdir(parents=True)
        where.chmod(0o755)
        mount = MachineMount(machine, where / "mnt", where / "data", config=self.config())
        mount.extra_args = self.meta_args
        mount.node_roots = [server.data for server in self.servers]
        self.mounts.append(mount)
        if not self.formatted:
            made = dfsfuse_cli("format", *mount._data_args(), prefix=machine.prefix).stdout
            assert f"made a file system in {self.url}" in made, made
            self.formatted = True
        mount.start()
        return mount


@pytest.fixture(scope="module")
def cluster(network, test_root):
    base = test_root / "netns"
    base.mkdir()
    base.chmod(0o755)  # the server runs as the user postgres
    db, n1, n2 = network.add("db"), network.add("n1"), network.add("n2")
    postgres = pgserver.PostgresServer(base / "pg", host=db.address, clients=[str(network.subnet)],
                                       command_prefix=db.prefix)
    secret = write_secret(base / "servers" / "secret")
    servers = [NodeServer(base / "servers", machine.name, secret, host=machine.address, command_prefix=machine.prefix)
               for machine in (n1, n2)]
    password_file = base / "pgpassword"
    cluster = Cluster(network, base, postgres, servers, secret, password_file)
    try:
        postgres.start()
        postgres.create_database(DATABASE)  # over the Unix socket: a path, reached from any namespace
        password_file.write_text(postgres.password + "\n")
        password_file.chmod(0o600)
        for server in servers:
            server.start()
        yield cluster
    finally:
        try:
            errors = []
            for index, mount in reversed(list(enumerate(cluster.mounts))):
                try:
                    # Unmount, daemon exit 0, clean log; the last one also runs fsck --meta URL
                    # on its machine (fsck runs only when no mount uses the file system).
                    mount.stop(fsck=index == 0)
                except BaseException as exc:  # noqa: BLE001 - stop all, report all
                    errors.append(str(exc))
                finally:
                    mount.kill()
            assert not errors, "\n\n".join(errors)
        finally:
            for server in servers:
                server.stop()
            postgres.stop(immediate=True)


@pytest.fixture(scope="module")
def m1(cluster):
    return cluster.mount("m1")


@pytest.fixture(scope="module")
def m2(cluster, m1):
    return cluster.mount("m2")  # m1 formatted the database; m2 only mounts it


def _tcp_table(pid: int) -> list[tuple[str, int, str, int, str, int]]:
    """(local address, port, remote address, port, state, socket inode) of every TCP socket
    in PID's network namespace (/proc/PID/net/tcp is the table of that namespace)."""
    rows = []
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        ends = []
        for end in fields[1:3]:
            address, port = end.split(":")
            ends += [socket.inet_ntoa(struct.pack("<I", int(address, 16))), int(port, 16)]
        rows.append((*ends, {"01": "ESTABLISHED", "0A": "LISTEN"}.get(fields[3], fields[3]), int(fields[9])))
    return rows


def _socket_inodes(pid: int) -> set[int]:
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(int(target[8:-1]))
    return found


def _listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of the TCP sockets PID listens on, as its own namespace's table has them."""
    mine = _socket_inodes(pid)
    return {(local, port) for local, port, _, _, state, inode in _tcp_table(pid) if state == "LISTEN" and inode in mine}


def test_a_file_written_on_m1_reads_back_and_lands_on_both_node_servers(m1):
    data = os.urandom(3 * SHARD + 4097)
    write_file(m1 / "file", data, fsync=True)
    drop_caches()
    assert read_file(m1 / "file") == data
    replicas = m1.held_replicas()
    assert len(replicas) >= 4, replicas  # 4 shards
    assert all(len(copies) == 2 for copies in replicas.values()), replicas  # replicas = 2
    for server in m1.node_roots:
        assert any(copy.node == server for copies in replicas.values() for copy in copies), server


def test_status_from_m1_sees_both_node_servers_at_their_addresses(cluster, m1):
    (m1 / "status-file").write_bytes(b"x" * 1000)
    os.sync()
    text = m1.status(as_json=True)  # dfsfuse status --data-dir D --config C --meta URL --meta-password-file F --json, on m1
    info = parse_status(text)
    assert set(info["nodes"]) == {"n1", "n2"}, text
    for server in cluster.servers:
        assert server.address in info["nodes"][server.name]["path"], text
    assert info["under_replicated"] == 0, text


def test_the_daemon_is_on_m1_and_talks_to_the_other_machines(cluster, m1):
    machine = m1.machine
    assert os.stat(f"/proc/{m1.pid}/ns/net").st_ino == os.stat(netns.NETNS_DIR / machine.netns).st_ino
    assert m1.pid in machine.pids()
    (m1 / "talk").write_bytes(b"y" * (SHARD + 1))
    os.sync()
    mine = _socket_inodes(m1.pid)
    connections = [row for row in _tcp_table(m1.pid) if row[4] == "ESTABLISHED" and row[5] in mine]
    peers = {(remote, port) for local, _, remote, port, _, _ in connections if local == machine.address}
    assert (cluster.postgres.host, cluster.postgres.port) in peers, connections
    for server in cluster.servers:
        assert (server.host, server.port) in peers, connections
    assert not any(ipaddress.ip_address(row[0]).is_loopback for row in connections), connections


def test_nothing_rides_on_a_shared_loopback(cluster, m1):
    """Each server listens on its own machine's address only, in its own namespace's table, not in the
    host's; m1's loopback has none of them, m1 has no route but the subnet, and PostgreSQL's port on
    loopback is not our database. (We never connect from the host to the subnet: the host's only route
    there is its default one, out of this computer.)"""
    machine = m1.machine
    servers = [(cluster.postgres.pid, cluster.postgres.host, cluster.postgres.port)]
    servers += [(server.pid, server.host, server.port) for server in cluster.servers]
    host_table = {row[5] for row in _tcp_table(os.getpid())}
    for pid, address, port in servers:
        assert _listening(pid) == {(address, port)}, (pid, address, port)
        assert not _socket_inodes(pid) & host_table, f"a socket of {pid} is in the host's namespace"
        assert machine.connect_errno("127.0.0.1", port) == "ECONNREFUSED", port
    routes = machine.ip("-4", "route").stdout
    assert "default" not in routes and str(cluster.network.subnet) in routes, routes
    loopback_url = cluster.url.replace(cluster.postgres.host, "127.0.0.1")
    with pytest.raises(psycopg.OperationalError):  # refused (or, by chance, some other server's port)
        psycopg.connect(loopback_url, password=cluster.postgres.password, connect_timeout=5).close()
    # The command line on m1, pointed at loopback instead of db, cannot reach the database.
    line = one_line_error(dfsfuse_cli("status", "--data-dir", m1.data_dir, "--config", m1.config_path,
                                      "--meta", loopback_url, "--meta-password-file", cluster.password_file,
                                      prefix=machine.prefix, check=False))
    assert "cannot reach PostgreSQL" in line, line


def test_two_machines_mount_one_file_system_and_see_each_others_work(m1, m2):
    write_file(m1 / "from-m1", b"written on m1\n" * 1000, fsync=True)
    assert read_file(m2 / "from-m1") == b"written on m1\n" * 1000  # close-to-open, across machines
    os.rename(m1 / "from-m1", m1 / "renamed-on-m1")
    deadline = time.monotonic() + 1.0  # pushed to m2's caches within a second
    while (m2 / "from-m1").exists() or not (m2 / "renamed-on-m1").exists():
        assert time.monotonic() < deadline, "m1's rename is not visible on m2 after 1 s"
        time.sleep(0.01)
    write_file(m2 / "from-m2", b"written on m2")
    assert read_file(m1 / "from-m2") == b"written on m2"
    assert m2.pid in m2.machine.pids()


def test_node_commands_from_a_machine_without_a_mount_change_the_mounted_file_system(cluster, m1):
    """An operator's machine with no mount (only the URL, the password file and the cluster
    secret) adds a node server on a machine of its own, drains it and removes it while m1 is
    mounted: m1 learns of the node without a remount and stores new data on it, the drain
    moves that data off it, and m1 reads every byte back afterwards."""
    ops = cluster.network.add("ops")
    where = cluster.base / "ops"
    where.mkdir()
    config = where / "config.toml"
    config.write_text(f'secret_file = "{cluster.secret}"\n')
    n3 = cluster.network.add("n3")
    server = NodeServer(cluster.base / "servers", "n3", cluster.secret, host=n3.address, command_prefix=n3.prefix)
    cluster.servers.append(server)  # stopped with the others at the end of the module
    server.start()

    def on_ops(*args: str) -> str:
        return dfsfuse_cli(*args, "--data-dir", where / "data", "--config", config, *cluster.meta_args,
                           prefix=ops.prefix).stdout

    # A config that names another shard size than the file system's is refused in one line;
    # one that names none takes the file system's.
    config.write_text(f'secret_file = "{cluster.secret}"\nshard_size = "4MiB"\n')
    refused = one_line_error(dfsfuse_cli("node", "list", "--data-dir", where / "data", "--config", config,
                                         *cluster.meta_args, prefix=ops.prefix, check=False))
    assert f"made with shard_size {SHARD}" in refused, refused
    config.write_text(f'secret_file = "{cluster.secret}"\n')

    on_ops("node", "add", server.address, "--name", "n3")
    listed = {line.split()[0]: line.split() for line in on_ops("node", "list").splitlines()[1:]}
    assert set(listed) == {"n1", "n2", "n3"} and listed["n3"][1:3] == ["active", "yes"], listed

    # m1 follows the registry (every few seconds): new shards land on n3 too.
    deadline = time.monotonic() + 30
    files: dict[str, bytes] = {}
    while not _replica_files(server):
        assert time.monotonic() < deadline, "m1 stored nothing on the node added from ops"
        name = f"after-add-{len(files)}"
        files[name] = os.urandom(2 * SHARD + 99)
        write_file(m1 / name, files[name], fsync=True)
        time.sleep(0.5)

    drained = on_ops("node", "drain", "n3")
    assert re.search(r"node n3 drained: [1-9]\d* shards moved", drained), drained
    assert not _replica_files(server), "n3 still holds replicas after its drain"
    assert on_ops("node", "remove", "n3").strip() == "removed node n3"
    assert "n3" not in parse_status(m1.status(as_json=True))["nodes"]
    drop_caches()
    for name, data in files.items():
        assert read_file(m1 / name) == data, name


def _replica_files(server: NodeServer) -> list[Path]:
    """The replica files in a node server's store (ROOT/shards/XX/ID, docs/formats.md)."""
    shards = server.data / "shards"
    return [path for path in shards.rglob("*") if path.is_file()] if shards.exists() else []
