"""Replication as a file sees it: the write quorum W, per-directory replica
counts (user.dfs.replicas) inherited by what is created inside, and a node
set that follows the registry."""

from __future__ import annotations

import errno
import os

import pytest
import trio
from fsharness import SHARD, Harness, Recorder, run, wait_until

from dfsfuse.cluster.autorepair import repair_pass
from dfsfuse.cluster.nodeset import NodeSet
from dfsfuse.cluster.operations import Cluster, node_remove
from dfsfuse.cluster.registry import NodeAccess, local_address, register_config_nodes
from dfsfuse.errors import DfsError, StoreUnavailable
from dfsfuse.metadata.base import NODE_DRAINING, REPLICAS_XATTR


def test_a_write_succeeds_with_w_replicas_and_fails_below_w(tmp_path):
    harness = Harness(tmp_path, nodes=3, replicas=3, write_quorum=2)

    async def main():
        async with harness.running() as env:
            env.store["node3"].put_error = StoreUnavailable("node3 is down")
            handle, _ = await env.create(b"under-replicated")
            data = os.urandom(2 * SHARD + 100)
            await env.fs.write(handle, 0, data)
            await env.fs.fsync(handle, False)  # two of three replicas are enough
            await env.fs.release(handle)
            assert await env.contents_of(b"under-replicated") == data
            shards = await env.live_shards()
            assert len(shards) == 3 and all(set(r.ref.nodes) == {"node1", "node2"} for r in shards)

            env.store["node2"].put_error = StoreUnavailable("node2 is down")
            handle, _ = await env.create(b"lost")
            await env.fs.write(handle, 0, os.urandom(SHARD + 1))
            with pytest.raises(DfsError) as excinfo:
                await env.fs.fsync(handle, False)
            assert excinfo.value.errno == errno.EIO
            env.store["node2"].put_error = env.store["node3"].put_error = None
            await env.fs.fsync(handle, False)
            await env.fs.release(handle)

    run(main)


def test_a_directory_replica_count_is_inherited_by_new_files_and_subdirectories(tmp_path):
    harness = Harness(tmp_path, nodes=3, replicas=2)

    async def main():
        async with harness.running() as env:
            fs = env.fs
            three = await env.mkdir(b"three")
            await fs.setxattr(three, REPLICAS_XATTR, b"3", 0)
            one = await env.mkdir(b"one")
            await fs.setxattr(one, REPLICAS_XATTR, b" 1\n", 0)
            assert await fs.getxattr(one, REPLICAS_XATTR) == b"1"
            nested = await env.mkdir(b"nested", parent=three)
            assert await fs.getxattr(nested, REPLICAS_XATTR) == b"3"

            expected = {}
            for parent, name, count in ((three, b"a", 3), (nested, b"b", 3), (one, b"c", 1), (1, b"d", 2)):
                handle, inode = await env.create(name, parent=parent)
                await fs.write(handle, 0, os.urandom(SHARD + 10))
                await fs.fsync(handle, False)
                await fs.release(handle)
                expected[inode] = count
            for record in await env.live_shards():
                assert len(record.ref.nodes) == expected[record.inode], record

            for bad in (b"0", b"4", b"two", b"", b"-1"):
                with pytest.raises(DfsError) as excinfo:
                    await fs.setxattr(three, REPLICAS_XATTR, bad, 0)
                assert excinfo.value.errno == errno.EINVAL

    run(main)


def test_a_file_reopened_keeps_its_replica_count(tmp_path):
    harness = Harness(tmp_path, nodes=3, replicas=2)

    async def main():
        async with harness.running() as env:
            directory = await env.mkdir(b"d")
            await env.fs.setxattr(directory, REPLICAS_XATTR, b"1", 0)
            handle, inode = await env.create(b"f", parent=directory)
            await env.fs.release(handle)
        async with harness.running() as env:
            handle = await env.fs.open(inode, os.O_RDWR)
            await env.fs.write(handle, 0, os.urandom(100))
            await env.fs.fsync(handle, False)
            await env.fs.release(handle)
            [record] = await env.live_shards()
            assert len(record.ref.nodes) == 1

    run(main)


def test_the_node_set_follows_the_registry(tmp_path):
    harness = Harness(tmp_path, nodes=3, replicas=2)
    extra = tmp_path / "node4"

    async def main():
        async with harness.running() as env:
            await register_config_nodes(env.meta, env.config.nodes)
            nodes = NodeSet(env.meta, NodeAccess.from_config(env.config), env.replicator, env.stores)
            await nodes.refresh()
            assert sorted(env.replicator.writable) == ["node1", "node2", "node3"]
            assert all(node.last_seen_ns > 0 for node in await env.meta.nodes())

            await env.meta.add_node("node4", local_address(extra))
            await env.meta.set_node_state("node1", NODE_DRAINING)
            await nodes.refresh()
            assert sorted(env.replicator.writable) == ["node2", "node3", "node4"]
            data = {}
            for index in range(12):
                name = b"f%d" % index
                handle, inode = await env.create(name)
                data[name] = os.urandom(100 + index)
                await env.fs.write(handle, 0, data[name])
                await env.fs.fsync(handle, False)
                await env.fs.release(handle)
            placed = {node for record in await env.live_shards() for node in record.ref.nodes}
            assert "node1" not in placed and "node4" in placed
            for name, content in data.items():
                assert await env.contents_of(name) == content

            (tmp_path / "a-file").write_bytes(b"")
            await env.meta.add_node("node5", local_address(tmp_path / "a-file" / "node5"))
            await env.meta.remove_node("node4")
            await nodes.refresh()  # node5 cannot be opened: stood in for as down, retried next time
            assert sorted(store.name for store in env.replicator.stores) == ["node1", "node2", "node3", "node5"]
            assert sorted(env.replicator.writable) == ["node2", "node3"]

    run(main)



def test_background_repair_remakes_replicas_of_a_removed_node_and_yields_to_commands(tmp_path):
    harness = Harness(tmp_path, nodes=3, replicas=2)

    async def main():
        async with harness.running() as env:
            await register_config_nodes(env.meta, env.config.nodes)
            nodes = NodeSet(env.meta, NodeAccess.from_config(env.config), env.replicator, env.stores)
            await nodes.refresh()
            cluster = Cluster(env.meta, env.replicator, nodes, env.config.replicas, NodeAccess.from_config(env.config))
            data = {}
            for index in range(12):
                name = b"f%d" % index
                handle, _ = await env.create(name)
                data[name] = os.urandom(SHARD // 2 + index)
                await env.fs.write(handle, 0, data[name])
                await env.fs.release(handle)
            short = [record for record in await env.live_shards() if "node3" in record.ref.nodes]
            assert len(short) >= 2

            # node3 dies and is removed: its shards are one replica short.
            assert await node_remove(cluster, Recorder(), "node3") == 0
            lock = trio.Lock()
            results = []

            async def slow_pass():
                results.append(await repair_pass(cluster, lock, rate=20))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(slow_pass)
                await wait_until(lock.locked)
                async with lock:  # a command arrives: the pass stops after the shard in hand (if any)
                    pass
            assert results[0].shards < len(short)

            rest = await repair_pass(cluster, lock, rate=1000)
            assert results[0].shards + rest.shards == len(short) and rest.unrecoverable == 0
            for record in await env.live_shards():
                assert len(record.ref.nodes) == 2 and "node3" not in record.ref.nodes, record
            for name, content in data.items():
                assert await env.contents_of(name) == content
            assert (await repair_pass(cluster, lock, rate=1000)).shards == 0

    run(main)
