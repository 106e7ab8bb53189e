"""Node management on real mounts: node add + rebalance, drain + remove,
remove refused while a node holds an only copy, repair after replicas are
lost on disk, scrub of a corrupt replica, `node list`, and per-directory
replica counts (user.dfs.replicas). The commands run while mounted (through
the mount's control socket) and, for repair, while not mounted.

Each test has a file system of its own with 256 KiB shards, so that every
replica file on disk belongs to what the test wrote. Added nodes live under
DATA_DIR/nodes/ too, so that Mount.replica_files sees them.
"""

import hashlib
import os
import random
import re
import select
import stat
import subprocess
import threading

import pytest
from dfstest import (
    PYTHON,
    REPO,
    KiB,
    command_env,
    dfsfuse_cli,
    drop_caches,
    one_line_error,
    parse_status,
    read_file,
    run,
    write_file,
)

from dfsfuse.cluster import control
from dfsfuse.errors import UserError
from dfsfuse.shards.placement import place

CONFIG = """
replicas = 2
shard_size = "256KiB"
block_size = "64KiB"
"""
REBALANCE_LINE = re.compile(
    r"rebalance: (\d+) of (\d+) shards moved \((\d+) replicas copied, (\d+) deleted\),"
    r" (\d+) already in place, (\d+) failed"
)


@pytest.fixture
def fs(mount_factory):
    return mount_factory.new("nodes", config=CONFIG)


def cli(fs, *args, check=True):
    return dfsfuse_cli(*args, "--data-dir", fs.data_dir, "--config", fs.config_path, check=check)


def write_files(root, count: int, seed: int = 0) -> dict[str, str]:
    """Files of assorted sizes (most span several shards); name -> sha256."""
    rng = random.Random(seed)
    digests = {}
    for index in range(count):
        data = rng.randbytes(rng.randrange(1, 700 * KiB))
        write_file(root / f"f{index}", data)
        digests[f"f{index}"] = hashlib.sha256(data).hexdigest()
    return digests


def assert_files(root, digests: dict[str, str]) -> None:
    drop_caches()
    for name, digest in digests.items():
        assert hashlib.sha256(read_file(root / name)).hexdigest() == digest, name


def placement(fs) -> dict[int, set[str]]:
    """Shard id -> the nodes whose directories hold a replica of it."""
    return {int(shard, 16): {held.node.name for held in replicas} for shard, replicas in fs.held_replicas().items()}


def node_rows(fs) -> dict[str, dict[str, str]]:
    lines = cli(fs, "node", "list").stdout.splitlines()
    header = lines[0].split()
    assert header == ["NAME", "STATE", "ALIVE", "ADDRESS", "CAPACITY", "USED", "SHARDS", "LAST", "SEEN"], lines[0]
    rows = {}
    for line in lines[1:]:
        name, state, alive, address, capacity, used, shards, seen = line.split(maxsplit=7)
        rows[name] = {"state": state, "alive": alive, "address": address, "capacity": capacity,
                      "used": used, "shards": shards, "seen": seen}
    return rows


def test_node_add_then_rebalance_moves_only_the_shards_whose_placement_changed(fs):
    digests = write_files(fs.mountpoint, 30)
    os.sync()
    before = placement(fs)
    assert set().union(*before.values()) == {"node1", "node2", "node3"}

    new_node = fs.data_dir / "nodes" / "node4"
    new_node.mkdir()
    assert "added node node4" in cli(fs, "node", "add", new_node).stdout
    assert node_rows(fs)["node4"]["state"] == "active"

    # Reads and writes go on while the shards move.
    stop = threading.Event()
    errors: list[BaseException] = []

    def keep_working() -> None:
        try:
            round_ = 0
            while not stop.is_set():
                for name, digest in list(digests.items())[:5]:
                    assert hashlib.sha256(read_file(fs / name)).hexdigest() == digest, name
                data = os.urandom(300 * KiB + round_)
                write_file(fs / "during", data)
                assert read_file(fs / "during") == data
                round_ += 1
        except BaseException as error:  # noqa: BLE001 - reported by the test thread
            errors.append(error)

    worker = threading.Thread(target=keep_working)
    worker.start()
    try:
        result = cli(fs, "rebalance")
    finally:
        stop.set()
        worker.join(60)
    assert not errors, errors
    os.unlink(fs / "during")

    match = REBALANCE_LINE.search(result.stdout)
    assert match, result.stdout
    moved, total, copied, deleted, in_place, failed = map(int, match.groups())
    nodes = ["node1", "node2", "node3", "node4"]
    expected_moves = {shard for shard, held in before.items() if set(place(shard, nodes)[:2]) != held}
    assert failed == 0 and total >= len(before)
    assert moved >= len(expected_moves) > 0  # and the "during" file's shards, if placed elsewhere meanwhile
    assert copied == deleted
    after = placement(fs)
    for shard, held in before.items():
        assert after[shard] == set(place(shard, nodes)[:2]), shard
        if shard not in expected_moves:
            assert after[shard] == held, f"shard {shard} moved although its placement did not change"
    assert any("node4" in held for held in after.values())
    assert_files(fs.mountpoint, digests)
    again = REBALANCE_LINE.search(cli(fs, "rebalance").stdout)
    assert again and int(again.group(1)) == 0


def test_drain_then_remove(fs):
    digests = write_files(fs.mountpoint, 20, seed=1)
    os.sync()
    assert any("node1" in held for held in placement(fs).values())

    result = cli(fs, "node", "drain", "node1")
    assert "node node1 drained" in result.stdout
    assert not any("node1" in held for held in placement(fs).values()), "node1 still holds replicas"
    assert node_rows(fs)["node1"]["state"] == "drained"
    assert_files(fs.mountpoint, digests)
    write_file(fs / "after-drain", os.urandom(600 * KiB))
    os.sync()
    assert not any("node1" in held for held in placement(fs).values()), "a new replica went to a drained node"

    assert "removed node node1" in cli(fs, "node", "remove", "node1").stdout
    assert "node1" not in node_rows(fs)
    info = parse_status(fs.status(as_json=True))
    assert set(info["nodes"]) == {"node2", "node3"} and info["under_replicated"] == 0, info
    assert_files(fs.mountpoint, digests)
    fs.remount()  # the registry keeps node1 removed
    assert "node1" not in node_rows(fs)
    assert_files(fs.mountpoint, digests)


def test_remove_is_refused_while_a_node_holds_the_only_copy(mount_factory):
    fs = mount_factory.new("only", config=CONFIG.replace("replicas = 2", "replicas = 1"))
    digests = write_files(fs.mountpoint, 10, seed=2)
    os.sync()
    holder = next(iter(placement(fs).values())).pop()
    line = one_line_error(cli(fs, "node", "remove", holder, check=False))
    assert "only copy" in line and "drain" in line, line
    assert holder in node_rows(fs)
    assert "unknown-node" in one_line_error(cli(fs, "node", "remove", "unknown-node", check=False))
    assert_files(fs.mountpoint, digests)


@pytest.mark.parametrize("mounted", [True, False], ids=["mounted", "unmounted"])
def test_repair_brings_back_replicas_lost_on_disk(fs, mounted):
    digests = write_files(fs.mountpoint, 20, seed=3)
    os.sync()
    lost = [path for paths in fs.replica_files().values() for path in paths if "node2" in path.parts]
    assert lost
    if not mounted:
        fs.stop()
    for path in lost:
        path.unlink()
    assert parse_status(fs.status(as_json=True))["under_replicated"] == len(lost)

    result = cli(fs, "repair")
    assert f"repair: {len(lost)} under-replicated shards" in result.stdout, result.stdout
    assert "0 unrecoverable" in result.stdout
    assert parse_status(fs.status(as_json=True))["under_replicated"] == 0
    assert all(len(held) == 2 for held in placement(fs).values())
    if not mounted:
        fs.start()
    assert_files(fs.mountpoint, digests)


def test_scrub_repairs_a_corrupt_replica(fs):
    digests = write_files(fs.mountpoint, 8, seed=4)
    os.sync()
    victim = next(iter(fs.replica_files().values()))[0]
    with open(victim, "r+b") as handle:
        handle.seek(-100, os.SEEK_END)
        byte = handle.read(1)
        handle.seek(-100, os.SEEK_END)
        handle.write(bytes([byte[0] ^ 0xFF]))
    result = cli(fs, "scrub")
    assert re.search(r"scrub: \d+ shards checked, 0 replicas missing, 1 corrupt; repaired 1, 0 unrecoverable",
                     result.stdout), result.stdout
    assert "1 corrupt" not in cli(fs, "scrub").stdout
    assert_files(fs.mountpoint, digests)


def test_node_list_shows_state_usage_and_who_answers(fs):
    write_files(fs.mountpoint, 5, seed=5)
    os.sync()
    rows = node_rows(fs)
    assert set(rows) == {"node1", "node2", "node3"}
    for name, row in rows.items():
        assert row["state"] == "active" and row["alive"] == "yes", row
        assert row["address"] == str(fs.data_dir / "nodes" / name)
        assert int(row["capacity"]) > 0 and row["seen"].endswith("s ago"), row
    assert sum(int(row["shards"]) for row in rows.values()) == sum(len(p) for p in fs.held_replicas().values())

    # The disk of node3 "goes away": a file where its directory was.
    gone = fs.data_dir / "nodes" / "node3"
    gone.rename(gone.with_name("node3-away"))
    gone.write_bytes(b"")
    try:
        row = node_rows(fs)["node3"]
        assert row["alive"] == "no" and row["seen"].endswith("s ago"), row  # seen by the mount before
        node3 = parse_status(fs.status(as_json=True))["nodes"]["node3"]
        assert not node3["alive"] and node3["error"], node3
        assert re.search(r"^node3 +active +no ", fs.status(), re.MULTILINE)
    finally:
        gone.unlink()
        gone.with_name("node3-away").rename(gone)
    assert node_rows(fs)["node3"]["alive"] == "yes"
    assert re.search(r"^node1 +active +yes .* \d+ +\d+$", fs.status(), re.MULTILINE)


def test_the_control_socket_is_private_and_refuses_bad_requests(fs):
    socket_path = fs.data_dir / "control.sock"
    assert stat.S_IMODE(os.stat(socket_path).st_mode) == 0o600
    client = control.connect(socket_path)
    assert client is not None
    with pytest.raises(UserError, match="bad control request"):
        control.request(client, "format the disk", {}, print, lambda *_: None)
    client = control.connect(socket_path)
    with pytest.raises(UserError, match="bad control request"):
        control.request(client, "repair", {"unexpected": 1}, print, lambda *_: None)
    assert "repair: 0 under-replicated shards" in cli(fs, "repair").stdout  # still serving
    fs.stop()
    assert not socket_path.exists()
    fs.start()


def test_a_directory_replica_count_applies_to_new_files(fs):
    three, one = fs / "three", fs / "one"
    os.mkdir(three)
    os.mkdir(one)
    run(["setfattr", "-n", "user.dfs.replicas", "-v", "3", three])
    run(["setfattr", "-n", "user.dfs.replicas", "-v", "1", one])
    os.mkdir(three / "sub")
    assert run(["getfattr", "--only-values", "-n", "user.dfs.replicas", three / "sub"]).stdout == "3"
    for bad in ("0", "4", "many"):
        result = run(["setfattr", "-n", "user.dfs.replicas", "-v", bad, three], check=False)
        assert result.returncode != 0 and "Invalid argument" in result.stderr, result.stderr

    before = set(fs.held_replicas())
    write_file(three / "sub" / "a", os.urandom(600 * KiB), fsync=True)  # 3 shards
    in_three = {shard: paths for shard, paths in fs.held_replicas().items() if shard not in before}
    assert len(in_three) == 3 and all(len(paths) == 3 for paths in in_three.values()), in_three

    before = set(fs.held_replicas())
    write_file(one / "b", os.urandom(300 * KiB), fsync=True)  # 2 shards
    in_one = {shard: paths for shard, paths in fs.held_replicas().items() if shard not in before}
    assert len(in_one) == 2 and all(len(paths) == 1 for paths in in_one.values()), in_one
    assert parse_status(fs.status(as_json=True))["under_replicated"] == 0


class NodeServer:
    """A `dfsfuse node serve` on a loopback port chosen at run time."""

    def __init__(self, base, name: str, secret_file):
        self.name = name
        self.data = base / name
        self.log = base / f"{name}.log"
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [PYTHON, "-m", "dfsfuse", "node", "serve", "--data", self.data, "--listen", "127.0.0.1:0",
                 "--secret-file", secret_file, "--name", name],
                stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, cwd=REPO, env=command_env(),
            )
        ready, _, _ = select.select([self.process.stdout], [], [], 15)
        line = self.process.stdout.readline().decode() if ready else ""
        match = re.fullmatch(r"listening on (127\.0\.0\.1:\d+)\n", line)
        if not match:
            self.stop()
            raise AssertionError(f"node server {name} did not start: {line!r}\n{self.log.read_text()}")
        self.address = match[1]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stdout.close()


def test_node_servers_added_and_rebalanced_onto(mount_factory, local_tmp):
    fs = mount_factory.new("remote", config=CONFIG, start=False)
    fs.data_dir.mkdir(parents=True, exist_ok=True)
    secret = fs.data_dir / "secret"  # the default secret_file
    secret.write_bytes(b"nodes-test-secret\n")
    secret.chmod(0o600)
    servers = []
    try:
        servers = [NodeServer(local_tmp, name, secret) for name in ("remote1", "remote2")]
        fs.start()
        digests = write_files(fs.mountpoint, 20, seed=6)
        for server in servers:
            assert f"added node {server.name}" in cli(fs, "node", "add", server.address, "--name", server.name).stdout
        match = REBALANCE_LINE.search(cli(fs, "rebalance").stdout)
        assert match and int(match.group(1)) > 0 and int(match.group(6)) == 0, match
        rows = node_rows(fs)
        for server in servers:
            assert rows[server.name]["alive"] == "yes" and rows[server.name]["address"] == server.address
            assert int(rows[server.name]["shards"]) > 0, rows
        assert_files(fs.mountpoint, digests)
        assert parse_status(fs.status(as_json=True))["under_replicated"] == 0
        fs.stop()  # fsck included, with the servers still up
    finally:
        fs.kill()
        for server in servers:
            server.stop()
