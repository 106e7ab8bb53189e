"""Erasure coding as a file sees it: user.dfs.ec on a directory, fragments
counted by repair and status, moved by drain and rebalance, and a node
holding one of the last k fragments kept from removal."""

from __future__ import annotations

import os

import trio
from fsharness import Harness, KiB, Recorder, replica_path, run

from dfsfuse.cluster.inventory import ReplicaTargets
from dfsfuse.cluster.maintenance import endangered_shards
from dfsfuse.cluster.nodeset import NodeSet
from dfsfuse.cluster.operations import (
    Cluster,
    node_drain,
    node_remove,
    rebalance,
    repair,
    scrub,
)
from dfsfuse.cluster.registry import NodeAccess, local_address, register_config_nodes
from dfsfuse.metadata.base import ERASURE_XATTR, ShardRecord
from dfsfuse.shards import replica
from dfsfuse.shards.placement import place

SHARD = 512 * KiB  # 4 fragments of 128 KiB
TAIL = 1000  # a last shard too small to fragment: 3 replicas


def harness(tmp_path, nodes: int) -> Harness:
    return Harness(tmp_path, nodes=nodes, replicas=2, shard_size=SHARD, write_buffer=4 * SHARD,
                   shard_cache=8 * SHARD)


async def cluster_of(env) -> Cluster:
    await register_config_nodes(env.meta, env.config.nodes)
    nodes = NodeSet(env.meta, NodeAccess.from_config(env.config), env.replicator, env.stores)
    await nodes.refresh()
    return Cluster(env.meta, env.replicator, nodes, env.config.replicas, NodeAccess.from_config(env.config))


async def write_ec_files(env, count: int) -> dict[bytes, bytes]:
    """`count` files of 3 fragmented shards and a small tail under /ec (4+2)."""
    directory = await env.mkdir(b"ec")
    await env.fs.setxattr(directory, ERASURE_XATTR, b"4+2", 0)
    data = {}
    for index in range(count):
        name = b"f%d" % index
        handle, _ = await env.create(name, parent=directory)
        data[name] = os.urandom(3 * SHARD + TAIL)
        await env.fs.write(handle, 0, data[name])
        await env.fs.fsync(handle, False)
        await env.fs.release(handle)
    return data


async def assert_contents(env, data: dict[bytes, bytes]) -> None:
    directory = (await env.fs.lookup(1, b"ec")).inode
    for record in await env.live_shards():
        env.cache.discard(record.ref.shard_id)  # read from the stores
    for name, content in data.items():
        assert await env.contents_of(name, parent=directory) == content


def assert_fragments_verify(env, record: ShardRecord) -> None:
    ref = record.ref
    assert ref.encoding is not None
    length = ref.encoding.copy_length
    for slot, node in enumerate(ref.nodes):
        file = replica_path(env.store[node], ref.shard_id).read_bytes()
        split = replica.data_offset(length, env.config.block_size)
        replica.verify_replica(file[:split], file[split:], ref.encoding.fragment_checksums[slot], length)


def test_fragments_are_counted_repaired_and_scrubbed(tmp_path):
    async def main():
        async with harness(tmp_path, nodes=6).running() as env:
            cluster = await cluster_of(env)
            data = await write_ec_files(env, 2)
            records = await env.live_shards()
            fragmented = [record for record in records if record.ref.encoding is not None]
            assert len(fragmented) == 6 and len(records) == 8
            for record in fragmented:
                assert len(set(record.ref.nodes)) == 6
                assert_fragments_verify(env, record)
            assert all(len(record.ref.nodes) == 3 for record in records if record.ref.encoding is None)
            targets = ReplicaTargets(env.meta, env.config.replicas)
            assert sorted([await targets.of_record(record) for record in records]) == [3, 3] + [6] * 6
            assert await endangered_shards(env.meta, env.stores, targets) == []

            # A fragment file lost behind the store's back, and one damaged.
            lost, damaged = fragmented[0], fragmented[4]
            replica_path(env.store[lost.ref.nodes[1]], lost.ref.shard_id).unlink()
            path = replica_path(env.store[damaged.ref.nodes[5]], damaged.ref.shard_id)
            path.write_bytes(path.read_bytes()[:-1] + b"?")
            short = await endangered_shards(env.meta, env.stores, targets, ask_each=True)
            assert [record.ref.shard_id for record in short] == [lost.ref.shard_id]
            out = Recorder()
            assert await repair(cluster, out) == 0
            assert "repair: 1 under-replicated shards, 1 replicas missing, 0 corrupt; repaired 1" in out.lines[-1]
            assert await scrub(cluster, out) == 0
            assert "1 corrupt; repaired 1, 0 unrecoverable" in out.lines[-1]
            for record in await env.live_shards():
                if record.ref.encoding is not None:
                    assert_fragments_verify(env, record)
            await assert_contents(env, data)

    run(main)


def test_drain_moves_fragments_to_nodes_without_one_and_remove_keeps_the_last_k(tmp_path):
    async def main():
        async with harness(tmp_path, nodes=7).running() as env:
            cluster = await cluster_of(env)
            data = await write_ec_files(env, 3)
            assert await node_drain(cluster, Recorder(), "node1") == 0
            for record in await env.live_shards():
                assert "node1" not in record.ref.nodes
                if record.ref.encoding is not None:
                    assert len(set(record.ref.nodes)) == 6
                    assert_fragments_verify(env, record)
            assert env.replicas_on_disk()["node1"] == []
            await assert_contents(env, data)

            # Two of a shard's fragments lost: node2's, if it holds one, is one of the last four.
            record = next(r for r in await env.live_shards() if r.ref.encoding is not None and "node2" in r.ref.nodes)
            for node in [node for node in record.ref.nodes if node != "node2"][:2]:
                await env.store[node].delete(record.ref.shard_id)
            out = Recorder()
            try:
                await node_remove(cluster, out, "node2")
            except Exception as error:  # noqa: BLE001 - the refusal is the point
                assert "holds the only copy of 1 shards" in str(error), error
            else:
                raise AssertionError(f"node2 was removed: {out.lines}")
            assert await repair(cluster, Recorder()) == 0
            assert await node_remove(cluster, Recorder(), "node1") == 0

    run(main)


def test_rebalance_moves_fragments_onto_a_new_node(tmp_path):
    async def main():
        async with harness(tmp_path, nodes=6).running() as env:
            cluster = await cluster_of(env)
            data = await write_ec_files(env, 4)
            extra = env.config.data_dir / "nodes" / "node7"
            await env.meta.add_node("node7", local_address(extra))
            await cluster.nodes.refresh()
            out = Recorder()
            assert await rebalance(cluster, out) == 0, out.lines
            writable = sorted(env.replicator.writable)
            moved = 0
            for record in await env.live_shards():
                wanted = place(record.ref.shard_id, writable)[: len(record.ref.nodes)]
                assert set(record.ref.nodes) == set(wanted), record
                if record.ref.encoding is not None:
                    moved += "node7" in record.ref.nodes
            assert moved > 0
            await assert_contents(env, data)
            with trio.fail_after(10):
                assert await endangered_shards(env.meta, env.replicator.stores,
                                               ReplicaTargets(env.meta, env.config.replicas)) == []

    run(main)


def test_the_shards_closest_to_loss_are_repaired_first(tmp_path):
    async def main():
        async with harness(tmp_path, nodes=6).running() as env:
            await write_ec_files(env, 1)
            handle, plain_inode = await env.create(b"plain")
            await env.fs.write(handle, 0, os.urandom(SHARD))
            await env.fs.release(handle)
            records = await env.live_shards()
            plain = next(record for record in records if record.inode == plain_inode)
            one_lost, two_lost = [record for record in records if record.ref.encoding is not None][:2]
            for record, count in ((plain, 1), (one_lost, 1), (two_lost, 2)):
                for node in record.ref.nodes[:count]:
                    await env.store[node].delete(record.ref.shard_id)
            targets = ReplicaTargets(env.meta, env.config.replicas)
            short = await endangered_shards(env.meta, env.stores, targets)
            # One replica of two left, and four fragments of six: no copy to spare; five of six: one.
            closest = sorted([plain.ref.shard_id, two_lost.ref.shard_id])
            assert [record.ref.shard_id for record in short] == [*closest, one_lost.ref.shard_id]

    run(main)
