"""The file system outlives the machine that mounts it: a mount on three node
servers writes files and unmounts (a metadata snapshot goes to the nodes),
its data dir is deleted, `dfsfuse restore` rebuilds one from a node, and a
mount of it shows every file byte for byte. Also: a wrong secret and a data
dir that already holds a file system are refused in one line.
"""

import os
import shutil
import time

from dfstest import (
    KiB,
    NodeServer,
    dfsfuse_cli,
    one_line_error,
    remote_config,
    tree_digest,
    write_file,
    write_secret,
)

from dfsfuse.cluster.snapshots import SNAPSHOT_ID_BASE, snapshot_time_ns

LAYOUT = """
replicas = 2
shard_size = "256KiB"
block_size = "64KiB"
"""


def write_tree(root) -> None:
    (root / "docs" / "deep").mkdir(parents=True)
    write_file(root / "empty", b"")
    write_file(root / "small.txt", b"hello, restored world\n")
    write_file(root / "docs" / "three-shards.bin", os.urandom(600 * KiB))
    write_file(root / "docs" / "deep" / "exact-shard.bin", os.urandom(256 * KiB))
    os.symlink("docs/three-shards.bin", root / "link")
    os.chmod(root / "small.txt", 0o600)


def snapshot_replicas(node_dirs) -> list[str]:
    """The names of the snapshot replica files in the node stores' directories."""
    return [
        path.name
        for node in node_dirs
        for path in (node / "shards").rglob("*")
        if path.is_file() and int(path.name, 16) >= SNAPSHOT_ID_BASE
    ]


def local_nodes_config(nodes, extra: str = "") -> str:
    return LAYOUT + extra + "".join(f'\n[[nodes]]\nname = "disk{i}"\npath = "{nodes / f"disk{i}"}"\n' for i in (1, 2, 3))


def test_a_deleted_data_dir_is_restored_from_a_node(mount_factory, local_tmp):
    secret = write_secret(local_tmp / "servers" / "secret")
    servers = [NodeServer(local_tmp / "servers", f"server{i}", secret) for i in (1, 2, 3)]
    try:
        for server in servers:
            server.start()
        lost = mount_factory.new("lost", config=remote_config(servers, secret, LAYOUT))
        write_tree(lost.mountpoint)
        before = tree_digest(lost.mountpoint)
        lost.stop()  # the snapshot at unmount, then fsck: the snapshot is no orphan
        assert len(snapshot_replicas(server.data for server in servers)) == 3, "the snapshot at unmount is not on every node"
        shutil.rmtree(lost.data_dir)

        new_dir = local_tmp / "restored"
        wrong = write_secret(local_tmp / "wrong-secret", b"not the cluster secret\n")
        refused = dfsfuse_cli("restore", "--node", servers[0].address, "--secret-file", wrong,
                              "--data-dir", new_dir, check=False)
        assert refused.returncode != 0 and "secret" in one_line_error(refused)
        assert not (new_dir / "metadata.db").exists()

        result = dfsfuse_cli("restore", "--node", servers[0].address, "--secret-file", secret, "--data-dir", new_dir)
        assert "restored the metadata snapshot" in result.stdout
        assert "not asked" not in result.stdout, result.stdout  # the other two servers were asked too

        again = dfsfuse_cli("restore", "--node", servers[0].address, "--secret-file", secret,
                            "--data-dir", new_dir, check=False)
        assert again.returncode != 0 and "already holds a file system" in one_line_error(again)

        # The layout alone: the secret is where restore kept it, the nodes are the snapshot's registry.
        restored = mount_factory.new("restored", config=LAYOUT, data_dir=new_dir)
        restored.node_roots = [server.data for server in servers]
        assert tree_digest(restored.mountpoint) == before
        listing = dfsfuse_cli("node", "list", "--data-dir", new_dir, "--config", restored.config_path).stdout
        names = {line.split()[0] for line in listing.splitlines()[1:] if line.strip()}
        assert names == {server.name for server in servers}, listing
        restored.stop()
    finally:
        mount_factory.finish()
        for server in servers:
            server.stop()


def test_restore_from_a_node_store_directory_with_a_disk_missing(mount_factory, local_tmp):
    nodes = local_tmp / "nodes"
    config = local_nodes_config(nodes)
    lost = mount_factory.new("lost", config=config)
    write_tree(lost.mountpoint)
    before = tree_digest(lost.mountpoint)
    lost.stop()
    shutil.rmtree(lost.data_dir)

    new_dir = local_tmp / "restored"
    result = dfsfuse_cli("restore", "--node", nodes / "disk2", "--data-dir", new_dir)
    assert "restored the metadata snapshot" in result.stdout
    # One disk did not come along: the mount must not make an empty store in its place.
    (nodes / "disk1").rename(local_tmp / "disk1-elsewhere")
    restored = mount_factory.new("restored", config=config, data_dir=new_dir)
    assert tree_digest(restored.mountpoint) == before
    assert not (nodes / "disk1").exists()
    restored.stop()


def test_a_periodic_snapshot_outlives_a_crashed_mount(mount_factory, local_tmp):
    nodes = local_tmp / "nodes"
    config = local_nodes_config(nodes, "snapshot_interval = 1\n")
    lost = mount_factory.new("lost", config=config)
    write_tree(lost.mountpoint)
    before = tree_digest(lost.mountpoint)
    written_ns = time.time_ns()
    deadline = time.monotonic() + 30
    while not any(snapshot_time_ns(int(name, 16)) > written_ns for name in snapshot_replicas(nodes.iterdir())):
        assert time.monotonic() < deadline, f"no periodic snapshot within 30 s\n{lost.log_tail()}"
        time.sleep(0.2)
    lost.crash()  # no snapshot at unmount this time
    lost.kill()
    shutil.rmtree(lost.data_dir)

    new_dir = local_tmp / "restored"
    dfsfuse_cli("restore", "--node", nodes / "disk1", "--data-dir", new_dir)
    restored = mount_factory.new("restored", config=config, data_dir=new_dir)
    assert tree_digest(restored.mountpoint) == before
    restored.stop()
