"""FileSystem and FileContents in-process, over real metadata and real stores.

The tier between the unit tests (one module each) and the mounted tests: the
POSIX layer with its write buffers, flusher, shard cache, replicator, SQLite
metadata behind its cache, and local node stores, without the kernel. Shards
are 64 KiB and the write buffer holds a few of them (fsharness.py), so the
files here span many shards and the memory budget evicts all the time.

Tests named test_bug_* reproduce defects found in review (races between
truncate and flushes, lost errors, ordering against power loss); they keep
those defects from coming back.
"""

from __future__ import annotations

import collections
import errno
import os
import random
import stat

import pytest
import trio
import trio.testing
from fsharness import ME, ROOT, SHARD, Harness, KiB, replica_path, run, wait_until

from dfsfuse.errors import DfsError, NoSpace, StoreUnavailable
from dfsfuse.layout import PAGE_SIZE
from dfsfuse.metadata.base import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    XATTR_CREATE,
    XATTR_REPLACE,
    AttrChanges,
)
from dfsfuse.vfs.filesystem import Caller
from dfsfuse.vfs.reader import READ_AHEAD_SHARDS
from dfsfuse.write.file_writer import MAX_PATCHES

pytestmark = pytest.mark.timeout(60)


def errno_of(excinfo) -> int:
    return excinfo.value.errno


# ---------------------------------------------------------------------------
# A seeded random workload against a bytearray model
# ---------------------------------------------------------------------------

MAX_EXTENT = 12 * SHARD


class ModelFile:
    """One file under test: its model bytes, its handles, a log of recent ops."""

    def __init__(self, name: bytes, inode: int, handle: int):
        self.name = name
        self.inode = inode
        self.handles = [handle]
        self.model = bytearray()
        self.log: collections.deque[str] = collections.deque(maxlen=25)

    def where(self, step: int) -> str:
        return f"{self.name!r} at step {step}; recent ops:\n  " + "\n  ".join(self.log)


def pick_write(rng: random.Random, size: int) -> tuple[int, int]:
    kind = rng.random()
    if kind < 0.45:  # in or near the data
        offset = rng.randrange(0, size + SHARD)
    elif kind < 0.75:  # around a shard boundary
        offset = max(0, rng.randrange(1, 11) * SHARD + rng.randrange(-300, 300))
    else:  # anywhere: often past the end, leaving a hole
        offset = rng.randrange(0, MAX_EXTENT)
    length = rng.choice(
        [rng.randrange(1, 4 * KiB), rng.randrange(1, 70 * KiB), rng.randrange(SHARD, 3 * SHARD), SHARD]
    )
    if length == SHARD and rng.random() < 0.5:
        offset -= offset % SHARD  # exactly one whole shard
    length = max(1, min(length, MAX_EXTENT - offset))
    return offset, length


async def run_random_ops(
    env, rng: random.Random, files: list[ModelFile], steps: int, settle_before_truncate: bool
) -> None:
    fs = env.fs
    for step in range(steps):
        f = rng.choice(files)
        model = f.model
        handle = rng.choice(f.handles)
        op = rng.choices(
            ["write", "read", "truncate", "flush", "fsync", "reopen", "open O_TRUNC"], [34, 34, 8, 6, 3, 5, 1]
        )[0]
        if op == "write":
            offset, length = pick_write(rng, len(model))
            data = rng.randbytes(length)
            f.log.append(f"write({offset}, {length})")
            assert await fs.write(handle, offset, data) == length
            if offset > len(model):
                model.extend(bytes(offset - len(model)))
            model[offset : offset + length] = data
        elif op == "read":
            if rng.random() < 0.1:
                f.log.append("read whole file")
                got = await env.read_all(handle, len(model) + 10)
                assert got == bytes(model), f"whole-file read differs: {f.where(step)}"
                continue
            offset = rng.randrange(0, len(model) + 2 * KiB)
            size = rng.choice([rng.randrange(1, 8 * KiB), rng.randrange(1, 3 * SHARD)])
            f.log.append(f"read({offset}, {size})")
            got = await fs.read(handle, offset, size)
            expected = bytes(model[offset : offset + size])
            if got != expected:
                same = min(len(got), len(expected))
                first = next((i for i in range(same) if got[i] != expected[i]), same)
                raise AssertionError(
                    f"read({offset}, {size}) differs from the model at file offset {offset + first} "
                    f"(got {len(got)} bytes, expected {len(expected)}): {f.where(step)}"
                )
        elif op == "truncate":
            new_size = rng.choice([rng.randrange(0, len(model) + 1), rng.randrange(0, MAX_EXTENT)])
            f.log.append(f"truncate({new_size}) from {len(model)}")
            if settle_before_truncate:
                # Let flushes that writes started get going first; see
                # test_bug_truncate_while_a_flush_takes_the_tail_buffer.
                await trio.testing.wait_all_tasks_blocked()
            await fs.setattr(f.inode, AttrChanges(), new_size)
            if new_size < len(model):
                del model[new_size:]
            else:
                model.extend(bytes(new_size - len(model)))
        elif op == "flush":
            f.log.append("flush")
            await fs.flush(handle)
        elif op == "fsync":
            f.log.append("fsync")
            await fs.fsync(handle, False)
        elif op == "open O_TRUNC":
            f.log.append("open O_TRUNC")
            if settle_before_truncate:
                await trio.testing.wait_all_tasks_blocked()
            f.handles.append(await fs.open(f.inode, os.O_WRONLY | os.O_TRUNC))
            del model[:]
            if len(f.handles) > 2:
                await fs.release(f.handles.pop(0))
        else:
            f.log.append("reopen")
            await fs.flush(handle)  # close() = flush + release
            await fs.release(handle)
            f.handles.remove(handle)
            f.handles.append(await fs.open(f.inode, os.O_RDWR))
            if len(f.handles) < 2 and rng.random() < 0.3:
                f.handles.append(await fs.open(f.inode, os.O_RDWR))
        attrs = await fs.getattr(f.inode)
        assert attrs.size == len(model), f"size {attrs.size} != {len(model)}: {f.where(step)}"


def random_workload(harness: Harness, seed: int, steps: int, settle_before_truncate: bool) -> None:
    rng = random.Random(seed)
    files: list[ModelFile] = []

    async def main():
        async with harness.running() as env:
            for name in (b"alpha", b"beta"):
                handle, inode = await env.create(name)
                files.append(ModelFile(name, inode, handle))
            await run_random_ops(env, rng, files, steps, settle_before_truncate)
            for f in files:
                for handle in f.handles:
                    await env.fs.flush(handle)
                    await env.fs.release(handle)
            for f in files:
                assert await env.contents_of(f.name) == bytes(f.model)
            assert env.budget.used == 0
        async with harness.running() as env:
            assert await env.garbage_rows() == []
            await env.check_stores_match_metadata()
            for f in files:
                assert (await env.fs.getattr(f.inode)).size == len(f.model)
                assert await env.contents_of(f.name) == bytes(f.model), f"{f.name!r} differs after a restart"

    run(main)


def test_random_operations_match_a_model_and_survive_a_restart(harness):
    random_workload(harness, seed=20240611, steps=2000, settle_before_truncate=True)


def test_random_small_overwrites_through_patches_match_a_model(tmp_path):
    """Small writes over a big file, with a write buffer so small that
    evictions flush a few pages at a time: many patches, compactions, reads
    of every size across them; the same bytes after a restart."""
    harness = Harness(tmp_path, write_buffer=2 * SHARD)
    rng = random.Random(20261125)
    model = bytearray(rng.randbytes(5 * SHARD + 1234))

    async def main():
        async with harness.running() as env:
            fs = env.fs
            handle, inode = await env.create(b"f")
            await fs.write(handle, 0, bytes(model))
            await fs.fsync(handle, False)
            for step in range(1500):
                op = rng.choices(["write", "read", "flush", "truncate"], [55, 35, 9, 1])[0]
                if op == "write":
                    offset = rng.randrange(0, len(model) + 100)
                    data = rng.randbytes(rng.choice([1, rng.randrange(1, 3000), 4096, rng.randrange(1, 20000)]))
                    await fs.write(handle, offset, data)
                    model.extend(bytes(max(0, offset - len(model))))
                    model[offset : offset + len(data)] = data
                elif op == "read":
                    offset, size = rng.randrange(0, len(model)), rng.randrange(1, 3 * SHARD)
                    assert await fs.read(handle, offset, size) == model[offset : offset + size], step
                elif op == "flush":
                    await fs.flush(handle)
                else:
                    new_size = rng.randrange(len(model) // 2, len(model))
                    await fs.setattr(inode, AttrChanges(), new_size)
                    del model[new_size:]
            await fs.flush(handle)
            patches = [record for record in await env.live_shards() if record.ref.is_patch]
            assert patches, "no write was stored as a patch"
            await fs.release(handle)
            assert await env.contents_of(b"f") == bytes(model)
        async with harness.running() as env:
            assert await env.contents_of(b"f") == bytes(model)
            await env.check_stores_match_metadata()

    run(main)


def test_bug_random_operations_with_truncate_right_after_writes(harness):
    """The workload above as an application runs it: ftruncate right after a
    write that filled a shard. Fails within a few hundred steps today."""
    random_workload(harness, seed=7, steps=1500, settle_before_truncate=False)


# ---------------------------------------------------------------------------
# Truncate racing with flushes (BUG 1)
# ---------------------------------------------------------------------------


def test_bug_truncate_right_after_a_write_that_fills_a_shard(harness):
    """write() ending at a shard's end starts a background flush of that shard;
    an ftruncate into that shard right after races with it. Depending on trio's
    (randomised) scheduling, truncate fails with KeyError, or the flush commits
    the whole old shard after truncate's commit and the cut bytes come back
    when the file grows again."""

    async def main():
        async with harness.running() as env:
            fs = env.fs
            for trial in range(20):
                handle, inode = await env.create(b"t%d" % trial)
                data = os.urandom(SHARD)
                await fs.write(handle, 0, data)  # fills shard 0: flushed in the background
                await fs.setattr(inode, AttrChanges(), 100)
                await fs.setattr(inode, AttrChanges(), SHARD)
                got = await fs.read(handle, 0, SHARD)
                assert got == data[:100] + bytes(SHARD - 100), f"trial {trial}: bytes cut by truncate came back"
                await fs.release(handle)

    run(main)


def test_bug_setattr_of_an_open_file_is_not_undone_by_a_shard_commit(harness):
    """Deterministic (found by the tar round trip on remote nodes): tar sets
    the mtime of a file while it is open and a full shard is still being
    stored, then its owner and mode. The shard's commit must not take the
    times from before the mtime was set and land after it; the next setattr
    would then hand the old mtime back to the open file, and close commit it."""

    async def main():
        async with harness.running() as env:
            fs = env.fs
            handle, inode = await env.create(b"f")
            stored = trio.Event()
            for store in env.stores:
                store.put_gate = stored
            await fs.write(handle, 0, os.urandom(SHARD))  # a full shard: stored in the background
            await wait_until(lambda: sum(s.puts_waiting for s in env.stores) == 2)
            answered = env.engine.setattr_gate = trio.Event()
            wanted = 1_000_000_000 * 10**9
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fs.setattr, inode, AttrChanges(mtime_ns=wanted), None)
                await wait_until(lambda: env.engine.setattrs_waiting == 1)  # committed, not yet answered
                stored.set()
                await wait_until(lambda: env.replica_count() == 2)
                await trio.testing.wait_all_tasks_blocked(cushion=0.05)  # the shard's commit waits its turn
                answered.set()
            env.engine.setattr_gate = None
            await fs.setattr(inode, AttrChanges(mode=0o600), None)
            await fs.flush(handle)
            await fs.release(handle)
            assert (await env.engine.getattr(inode)).mtime_ns == wanted

    run(main)


def test_bug_truncate_while_a_flush_takes_the_tail_buffer(harness):
    """Deterministic: truncate is storing the cut tail of a dirty shard when a
    flush (close of another handle) takes that same dirty buffer."""

    async def main():
        async with harness.running() as env:
            fs = env.fs
            handle, inode = await env.create(b"f")
            other = await fs.open(inode, os.O_RDWR)
            data = os.urandom(30 * KiB)
            await fs.write(handle, 0, data)  # a dirty, partial shard 0
            gate = trio.Event()
            for store in env.stores:
                store.put_gate = gate
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fs.setattr, inode, AttrChanges(), 10)
                await wait_until(lambda: sum(s.puts_waiting for s in env.stores) == 2)  # truncate's tail shard
                nursery.start_soon(fs.flush, other)  # waits for the truncate to finish
                await trio.testing.wait_all_tasks_blocked()
                gate.set()
            assert await fs.read(handle, 0, SHARD) == data[:10]

    run(main)


# ---------------------------------------------------------------------------
# Memory pressure
# ---------------------------------------------------------------------------


def test_writes_under_memory_pressure_keep_working_and_stay_bounded(tmp_path):
    """Three writers on a write buffer of two shards: every write completes, the
    budget never holds more than its limit plus what each writer adds in one
    write (its bytes and the two partial shards it may load), and it is back
    to zero once everything is flushed."""
    harness = Harness(tmp_path, write_buffer=2 * SHARD)
    rng = random.Random(5)
    max_write = 3 * SHARD
    writers = 3
    peak = 0

    async def main():
        async with harness.running() as env:
            fs, budget = env.fs, env.budget
            limit = budget.max_bytes
            bound = limit + writers * (max_write + 2 * SHARD)
            models = {}

            async def writer(name: bytes) -> None:
                handle, inode = await env.create(name)
                model = models[name] = bytearray()
                for _ in range(120):
                    offset = rng.randrange(0, 10 * SHARD)
                    data = rng.randbytes(rng.choice([rng.randrange(1, 8 * KiB), rng.randrange(1, max_write)]))
                    await fs.write(handle, offset, data)
                    if offset > len(model):
                        model.extend(bytes(offset - len(model)))
                    model[offset : offset + len(data)] = data
                    if rng.random() < 0.2:
                        at = rng.randrange(0, len(model))
                        assert await fs.read(handle, at, 5000) == bytes(model[at : at + 5000])
                await fs.flush(handle)
                await fs.release(handle)

            async def sampler() -> None:
                nonlocal peak
                while True:
                    peak = max(peak, budget.used)
                    await trio.lowlevel.checkpoint()

            with trio.fail_after(30):
                async with trio.open_nursery() as outer:
                    outer.start_soon(sampler)
                    async with trio.open_nursery() as nursery:
                        for i in range(writers):
                            nursery.start_soon(writer, b"w%d" % i)
                    outer.cancel_scope.cancel()
            assert peak > limit  # the budget was really under pressure
            assert peak <= bound, f"budget held {peak} bytes, more than {bound}"
            assert budget.used == 0
            for name, model in models.items():
                assert await env.contents_of(name) == bytes(model)
        async with harness.running() as env:
            for name, model in models.items():
                assert await env.contents_of(name) == bytes(model)

    run(main)


# ---------------------------------------------------------------------------
# Holes, deletion, garbage
# ---------------------------------------------------------------------------


def test_holes_read_as_zeros_and_store_nothing(harness):
    async def main():
        async with harness.running() as env:
            fs = env.fs
            handle, inode = await env.create(b"sparse")
            await fs.write(handle, 10 * SHARD + 5, b"0123456789")
            await fs.fsync(handle, False)
            live = await env.live_shards()
            assert [(r.inode, r.index, r.ref.length) for r in live] == [(inode, 10, 15)]
            assert env.replica_count() == harness.config.replicas
            attrs = await fs.getattr(inode)
            assert attrs.size == 10 * SHARD + 15
            assert attrs.blocks == 1  # 15 bytes stored, once
            await fs.setattr(inode, AttrChanges(), 30 * SHARD)  # grow: one more hole
            await fs.fsync(handle, False)
            assert len(await env.live_shards()) == 1 and env.replica_count() == harness.config.replicas
            expected = bytes(10 * SHARD + 5) + b"0123456789" + bytes(20 * SHARD - 15)
            assert await env.read_all(handle, 30 * SHARD) == expected
            assert await fs.read(handle, 3 * SHARD - 7, 2 * SHARD) == bytes(2 * SHARD)  # across holes
            assert await fs.read(handle, 10 * SHARD, 64) == bytes(5) + b"0123456789" + bytes(49)
            assert await fs.read(handle, 30 * SHARD, 10) == b""
            await fs.release(handle)
        async with harness.running() as env:
            assert await env.contents_of(b"sparse") == expected
            assert env.replica_count() == harness.config.replicas

    run(main)


def test_deleting_everything_leaves_every_store_empty(harness):
    """Files, hard links, renames over files, directories: once every name is
    gone, every handle released and every kernel reference forgotten, the
    stores hold nothing and the garbage list is empty."""

    async def main():
        async with harness.running() as env:
            fs = env.fs
            refs: collections.Counter[int] = collections.Counter()
            directory = await env.mkdir(b"d")
            refs[directory] += 1
            handles = []
            for i in range(6):
                parent = directory if i % 2 else ROOT
                handle, inode = await env.create(b"f%d" % i, parent)
                refs[inode] += 1
                await fs.write(handle, i * 1000, os.urandom(SHARD + 5000 * i))
                handles.append(handle)
            for handle in handles[:3]:
                await fs.fsync(handle, False)
            f0 = (await fs.lookup(ROOT, b"f0")).inode
            refs[f0] += 1
            await fs.link(f0, directory, b"f0-link")
            refs[f0] += 1
            await fs.rename(ROOT, b"f2", directory, b"f1", 0)  # replaces d/f1, which is still open
            for handle in handles:
                await fs.flush(handle)
                await fs.release(handle)
            assert env.replica_count() > 0
            await fs.unlink(ROOT, b"f0")
            await fs.unlink(directory, b"f0-link")
            for name in (b"f1", b"f3", b"f5"):
                await fs.unlink(directory, name)
            await fs.unlink(ROOT, b"f4")
            await fs.rmdir(ROOT, b"d")
            for inode, count in refs.items():
                await fs.forget(inode, count)
            await env.wait_for_garbage_collection()
            assert env.replica_count() == 0
        async with harness.running() as env:
            assert env.replicas_on_disk() == {store.name: [] for store in env.stores}
            assert await env.garbage_rows() == []
            usage = await env.meta.usage()
            assert (usage.inodes, usage.shards, usage.stored_bytes) == (1, 0, 0)
            assert await env.fs.readdir(ROOT, 0, 100) == []

    run(main, autojump=True)


def test_a_burst_of_deletes_is_collected_in_one_round(harness):
    """rm of many small files: the collector waits for the burst to end, then
    deletes the inodes in one transaction and every replica after one
    metadata sync, not one of each per file."""
    files = 100

    async def main():
        async with harness.running() as env:
            fs = env.fs
            for i in range(files):
                handle, _ = await env.create(b"f%d" % i)
                await fs.write(handle, 0, os.urandom(4 * KiB))
                await fs.flush(handle)
                await fs.release(handle)
            await env.wait_for_garbage_collection()
            assert env.replica_count() == files * harness.config.replicas
            first_delete = len(env.events)
            for i in range(files):
                inode = (await fs.lookup(ROOT, b"f%d" % i)).inode
                await fs.unlink(ROOT, b"f%d" % i)
                await fs.forget(inode, 2)  # the create's reference and the lookup's
            await env.wait_for_garbage_collection()
            assert env.replica_count() == 0
            events = env.events[first_delete:]
            transactions = [event for event in events if event[0] == "delete inodes"]
            assert sum(count for _, count in transactions) == files
            assert len(transactions) <= 3, f"{len(transactions)} transactions to delete {files} inodes"
            syncs = events.count(("sync", 0))
            assert 1 <= syncs <= 3, f"{syncs} metadata syncs to collect {files} deleted files"

    run(main)


def test_unlinked_open_file_stays_readable_until_released_and_forgotten(harness):
    async def main():
        async with harness.running() as env:
            fs = env.fs
            handle, inode = await env.create(b"doomed")  # one kernel reference
            data = os.urandom(3 * SHARD + 123)
            await fs.write(handle, 0, data)
            await fs.fsync(handle, False)
            await fs.unlink(ROOT, b"doomed")
            with pytest.raises(DfsError) as excinfo:
                await fs.lookup(ROOT, b"doomed")
            assert errno_of(excinfo) == errno.ENOENT
            assert await env.read_all(handle, len(data)) == data
            await fs.write(handle, len(data), b"more")  # still writable, too
            assert await fs.read(handle, len(data), 10) == b"more"
            assert (await fs.getattr(inode)).nlink == 0
            await fs.release(handle)
            assert any(r.inode == inode for r in await env.live_shards())  # the kernel still holds it
            await fs.forget(inode, 1)
            await env.wait_for_garbage_collection()
            assert await env.live_shards() == []
            assert env.replica_count() == 0
            with pytest.raises(DfsError) as excinfo:
                await fs.getattr(inode)
            assert errno_of(excinfo) == errno.ENOENT

    run(main, autojump=True)


def test_file_unlinked_while_open_when_the_mount_died_is_deleted_next_time(harness):
    async def main():
        async with harness.running(shutdown=False) as env:  # the mount process dies
            handle, inode = await env.create(b"doomed")
            await env.fs.write(handle, 0, os.urandom(2 * SHARD))
            await env.fs.fsync(handle, False)
            await env.fs.unlink(ROOT, b"doomed")
            assert env.replica_count() == 2 * harness.config.replicas
        async with harness.running() as env:
            assert await env.meta.orphan_inodes() == []
            await env.wait_for_garbage_collection()
            assert env.replica_count() == 0

    run(main, autojump=True)


def test_small_overwrites_stack_patches_until_a_new_shard_collects_them(harness):
    """A small overwrite stores only the pages it changed, as a patch on top
    of the shard; after MAX_PATCHES patches the next flush writes a whole new
    shard and the old objects are collected. Ids never go backwards."""
    async def main():
        seen: list[int] = []
        data = bytearray(os.urandom(SHARD))
        async with harness.running() as env:
            fs = env.fs
            handle, inode = await env.create(b"f")
            await fs.write(handle, 0, bytes(data))
            await fs.fsync(handle, False)
            for round_ in range(MAX_PATCHES):
                offset = round_ * 5000  # page round_ * 5000 // 4096
                await fs.write(handle, offset, b"x" * 50)
                data[offset : offset + 50] = b"x" * 50
                await fs.fsync(handle, False)
                records = await env.live_shards()
                assert [record.ref.is_patch for record in records] == [False] + [True] * (round_ + 1)
                assert records[-1].ref.length == PAGE_SIZE
                assert await env.contents_of(b"f") == bytes(data)
            seen += [record.ref.shard_id for record in records]
            await fs.write(handle, 3, b"z")
            data[3:4] = b"z"
            await fs.fsync(handle, False)
            (record,) = await env.live_shards()  # compacted into one whole shard
            assert not record.ref.is_patch and record.ref.length == SHARD
            seen.append(record.ref.shard_id)
            await env.wait_for_garbage_collection()
            on_disk = env.replicas_on_disk()
            assert sorted(i for ids in on_disk.values() for i in ids) == [seen[-1]] * harness.config.replicas
            await fs.release(handle)
        async with harness.running() as env:  # ids stay fresh across a restart
            handle = await env.fs.open(inode, os.O_RDWR)
            await env.fs.write(handle, 7, b"y")
            data[7:8] = b"y"
            await env.fs.fsync(handle, False)
            seen.append((await env.live_shards())[-1].ref.shard_id)
            await env.fs.release(handle)
            assert await env.contents_of(b"f") == bytes(data)
            await env.check_stores_match_metadata()
        assert seen == sorted(set(seen)), f"shard ids reused or going backwards: {seen}"

    run(main, autojump=True)


def test_a_sequential_reader_gets_several_shards_read_ahead(tmp_path):
    harness = Harness(tmp_path, shard_cache=16 * SHARD)

    async def main():
        async with harness.running() as env:
            fs = env.fs
            handle, inode = await env.create(b"big")
            data = os.urandom(10 * SHARD)
            await fs.write(handle, 0, data)
            await fs.release(handle)
            tops = {record.index: record.ref.shard_id for record in await env.live_shards()}
            cache = env.cache
            def cached() -> list[int]:
                return [index for index in range(10) if cache.is_cached_or_fetching(tops[index])]

            async def settled() -> list[int]:
                await trio.sleep(0.2)  # the fetches started by the read have started and ended
                return cached()

            handle = await fs.open(inode, os.O_RDONLY)
            assert await fs.read(handle, 5 * SHARD, 4 * KiB) == data[5 * SHARD : 5 * SHARD + 4 * KiB]  # small
            assert await settled() == []
            assert await fs.read(handle, 0, 2 * SHARD) == data[: 2 * SHARD]  # large, not sequential: one ahead
            assert await settled() == [0, 1, 2]
            assert await fs.read(handle, 2 * SHARD, 4 * KiB) == data[2 * SHARD : 2 * SHARD + 4 * KiB]  # sequential
            assert await settled() == list(range(3 + READ_AHEAD_SHARDS))
            await fs.read(handle, 2 * SHARD + 4 * KiB, SHARD)  # a cache hit still moves the window on
            assert await settled() == list(range(4 + READ_AHEAD_SHARDS))
            await fs.release(handle)

    run(main)


def test_closing_a_new_small_file_is_one_metadata_commit(harness):
    """The commit that points the file at its shard also records its size and
    times; close must not commit them a second time."""
    async def main():
        async with harness.running() as env:
            handle, inode = await env.create(b"small")
            await env.fs.write(handle, 0, os.urandom(4 * KiB))
            env.events.clear()
            await env.fs.flush(handle)
            assert env.events.count(("commit", inode)) == 1, env.events
            await env.fs.release(handle)
            assert await env.contents_of(b"small") != b""

    run(main)


def test_an_overwrite_of_most_of_a_shard_writes_a_new_shard(harness):
    async def main():
        async with harness.running() as env:
            fs = env.fs
            handle, _ = await env.create(b"f")
            data = bytearray(os.urandom(SHARD + 100))
            await fs.write(handle, 0, bytes(data))
            await fs.fsync(handle, False)
            first = [record.ref.shard_id for record in await env.live_shards()]
            await fs.write(handle, 10, b"q" * (SHARD // 2))  # more than a quarter: no patch
            data[10 : 10 + SHARD // 2] = b"q" * (SHARD // 2)
            await fs.fsync(handle, False)
            by_index = {record.index: record.ref for record in await env.live_shards()}
            assert not by_index[0].is_patch and by_index[0].shard_id > max(first)
            assert by_index[1].shard_id in first
            await fs.release(handle)
            assert await env.contents_of(b"f") == bytes(data)

    run(main)


# ---------------------------------------------------------------------------
# Store failures
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("surface", ["flush", "fsync"])
@pytest.mark.parametrize(
    ("fault", "expected_errno"),
    [(StoreUnavailable("node2 is down"), errno.EIO), (NoSpace("node2 is full"), errno.ENOSPC)],
    ids=["unavailable", "full"],
)
def test_store_error_in_a_background_flush_is_reported_and_the_data_kept(tmp_path, surface, fault, expected_errno):
    harness = Harness(tmp_path, nodes=2, replicas=2)  # no third store to fall back on

    async def main():
        async with harness.running() as env:
            fs = env.fs
            surface_call = (lambda h: fs.flush(h)) if surface == "flush" else (lambda h: fs.fsync(h, False))
            handle, inode = await env.create(b"f")
            data = os.urandom(2 * SHARD + 5000)
            env.store["node2"].put_error = fault
            await fs.write(handle, 0, data)  # two full shards: flushed in the background, and failing
            await wait_until(lambda: env.store["node2"].failed_puts >= 2)
            for _ in range(2):  # reported, and again while the store still fails
                with pytest.raises(DfsError) as excinfo:
                    await surface_call(handle)
                assert errno_of(excinfo) == expected_errno
                assert await env.read_all(handle, len(data)) == data  # kept in memory
            assert await env.live_shards() == []
            env.store["node2"].put_error = None
            await surface_call(handle)  # stored now, and nothing left to report
            await surface_call(handle)
            assert await env.read_all(handle, len(data)) == data
            await fs.release(handle)
            await env.check_stores_match_metadata()
        async with harness.running() as env:
            assert await env.contents_of(b"f") == data
            await env.check_stores_match_metadata()

    run(main)


def test_bug_writers_hang_when_the_store_keeps_failing_under_memory_pressure(tmp_path):
    """With the write buffer full of shards that cannot be stored, a writer should
    get the error (EIO), not wait forever for room that never comes."""
    harness = Harness(tmp_path, nodes=2, replicas=2, write_buffer=2 * SHARD)

    async def main():
        async with harness.running() as env:
            handle, _ = await env.create(b"f")
            env.store["node2"].put_error = StoreUnavailable("node2 is down")
            with trio.fail_after(2):
                with pytest.raises(DfsError):
                    for index in range(8):
                        await env.fs.write(handle, index * SHARD, os.urandom(SHARD))
            env.store["node2"].put_error = None
            await env.fs.release(handle)

    run(main)


def test_bug_failed_truncate_leaves_the_file_as_it_was(tmp_path):
    harness = Harness(tmp_path, nodes=2, replicas=2)

    async def main():
        async with harness.running() as env:
            fs = env.fs
            handle, inode = await env.create(b"f")
            model = bytearray(os.urandom(3 * SHARD))
            await fs.write(handle, 0, bytes(model))
            await fs.fsync(handle, False)
            for index in (1, 2):  # partial overwrites: dirty buffers on top of stored shards
                offset = index * SHARD + 1000
                patch = os.urandom(2000)
                await fs.write(handle, offset, patch)
                model[offset : offset + len(patch)] = patch
            env.store["node2"].put_error = StoreUnavailable("node2 is down")
            with pytest.raises(DfsError):
                await fs.setattr(inode, AttrChanges(), SHARD + 100)
            assert (await fs.getattr(inode)).size == len(model)
            assert await env.read_all(handle, len(model)) == bytes(model), "a failed truncate changed the data"

    run(main)


# ---------------------------------------------------------------------------
# Corruption and repair
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("read_style", ["whole", "small"])
def test_corrupt_replica_is_read_around_and_repaired(harness, read_style):
    async def main():
        data = os.urandom(3 * SHARD - 999)
        async with harness.running() as env:
            handle, inode = await env.create(b"f")
            await env.fs.write(handle, 0, data)
            await env.fs.fsync(handle, False)
            await env.fs.release(handle)
            record = next(r for r in await env.live_shards() if r.index == 2)
        ref = record.ref
        bad, good = (env.store[ref.nodes[0]], env.store[ref.nodes[1]])
        good_bytes = replica_path(good, ref.shard_id).read_bytes()
        damaged = bytearray(good_bytes)
        damaged[-3] ^= 0x40  # in the last data block
        replica_path(bad, ref.shard_id).write_bytes(bytes(damaged))
        async with harness.running() as env:  # a new FileSystem: nothing cached
            handle = await env.fs.open(inode, os.O_RDONLY)
            if read_style == "whole":
                assert await env.read_all(handle, len(data)) == data
            else:
                at = 2 * SHARD + ref.length - 100
                assert await env.fs.read(handle, at, 50) == data[at : at + 50]
            await wait_until(lambda: replica_path(env.store[bad.name], ref.shard_id).read_bytes() == good_bytes)
            await env.fs.release(handle)
            await env.check_stores_match_metadata()

    run(main)


# ---------------------------------------------------------------------------
# Durability (BUG 4)
# ---------------------------------------------------------------------------


async def assert_durable(env, inode: int) -> None:
    for record in await env.live_shards():
        if record.inode == inode:
            for node in record.ref.nodes:
                assert record.ref.shard_id in env.store[node].durable, (
                    f"fsync returned, but the replica of shard {record.ref.shard_id} (index {record.index}) "
                    f"on {node} was never synced"
                )


@pytest.mark.parametrize("how", ["close and reopen", "truncate while closed"])
def test_bug_fsync_syncs_replicas_written_before_the_file_was_reopened(harness, how):
    """`sync FILE` (coreutils) opens a file and fsyncs it: data written and
    closed earlier must be durable when it returns."""

    async def main():
        async with harness.running() as env:
            fs = env.fs
            handle, inode = await env.create(b"f")
            await fs.write(handle, 0, os.urandom(2 * SHARD + 300))
            if how == "truncate while closed":
                await fs.fsync(handle, False)  # all durable so far
            await fs.flush(handle)
            await fs.release(handle)  # (close and reopen: stored, not synced)
            if how == "truncate while closed":
                await fs.setattr(inode, AttrChanges(), SHARD + 100)  # stores a cut shard, not synced
            handle = await fs.open(inode, os.O_RDONLY)
            await fs.fsync(handle, False)
            await assert_durable(env, inode)
            await fs.release(handle)

    run(main)


def test_fsync_syncs_shards_flushed_in_the_background(harness):
    async def main():
        async with harness.running() as env:
            fs = env.fs
            handle, inode = await env.create(b"f")
            await fs.write(handle, 0, os.urandom(3 * SHARD))  # three background flushes, unsynced
            await fs.write(handle, 3 * SHARD, b"tail")  # dirty: stored by fsync, synced
            await fs.fsync(handle, False)
            await assert_durable(env, inode)
            await fs.release(handle)

    run(main)


def test_bug_fsync_forgets_shards_flushed_while_it_was_syncing(harness):
    async def main():
        async with harness.running() as env:
            fs = env.fs
            handle, inode = await env.create(b"f")
            other = await fs.open(inode, os.O_RDWR)
            await fs.write(handle, 0, os.urandom(SHARD))
            await fs.flush(handle)  # shard 0 stored, unsynced
            gate = trio.Event()
            for store in env.stores:
                store.sync_gate = gate
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fs.fsync, handle, False)
                await wait_until(lambda: sum(s.syncs_waiting for s in env.stores) > 0)
                await fs.write(other, SHARD, os.urandom(SHARD))  # shard 1: a background flush
                with trio.fail_after(5):
                    while len([r for r in await env.live_shards() if r.inode == inode]) < 2:
                        await trio.sleep(0.002)
                gate.set()
            for store in env.stores:
                store.sync_gate = None
            await fs.fsync(handle, False)  # must sync shard 1 now
            await assert_durable(env, inode)
            await fs.release(handle)
            await fs.release(other)

    run(main)


# ---------------------------------------------------------------------------
# Closed-file truncate racing with open (BUG 6)
# ---------------------------------------------------------------------------


def test_bug_open_during_truncate_of_a_closed_file_sees_the_old_file(harness):
    async def main():
        async with harness.running() as env:
            fs = env.fs
            handle, inode = await env.create(b"f")
            data = os.urandom(2 * SHARD)
            await fs.write(handle, 0, data)
            await fs.release(handle)
            gate = trio.Event()
            for store in env.stores:
                store.put_gate = gate
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fs.setattr, inode, AttrChanges(), 10)  # truncate(path, 10)
                await wait_until(lambda: sum(s.puts_waiting for s in env.stores) > 0)
                handle = await fs.open(inode, os.O_RDWR)  # open(path) meanwhile
                gate.set()
            for store in env.stores:
                store.put_gate = None
            assert (await fs.getattr(inode)).size == 10
            assert await fs.read(handle, 0, 2 * SHARD) == data[:10]
            await fs.write(handle, 0, b"x")
            await fs.release(handle)
            assert await env.contents_of(b"f") == b"x" + data[1:10]

    run(main)


def test_shutdown_stores_what_is_still_buffered(harness):
    async def main():
        data = os.urandom(2 * SHARD + 777)
        async with harness.running() as env:
            handle, _ = await env.create(b"f")
            await env.fs.write(handle, 0, data)  # neither flushed nor released
        async with harness.running() as env:
            assert await env.contents_of(b"f") == data
            await env.check_stores_match_metadata()

    run(main)


# ---------------------------------------------------------------------------
# Concurrency on one file
# ---------------------------------------------------------------------------


def test_concurrent_writers_readers_and_flushes_on_one_file(harness):
    chunk, chunks, writers = 7000, 80, 4  # chunks cross shard boundaries; 8.5 shards in all
    rng = random.Random(11)
    expected = bytearray(rng.randbytes(chunk * chunks))

    async def main():
        async with harness.running() as env:
            fs = env.fs
            handle, inode = await env.create(b"shared")
            done: set[int] = set()
            writing = True

            async def writer(k: int) -> None:
                mine = list(range(k, chunks, writers))
                rng.shuffle(mine)
                own = await fs.open(inode, os.O_RDWR)
                for c in mine:
                    await fs.write(own, c * chunk, bytes(expected[c * chunk : (c + 1) * chunk]))
                    done.add(c)
                    if rng.random() < 0.3:
                        await trio.sleep(0)
                await fs.flush(own)
                await fs.release(own)

            async def flusher() -> None:
                own = await fs.open(inode, os.O_RDWR)
                while writing:
                    if rng.random() < 0.3:
                        await fs.fsync(own, False)
                    else:
                        await fs.flush(own)
                    await trio.sleep(0)
                await fs.release(own)

            async def reader() -> None:
                own = await fs.open(inode, os.O_RDONLY)
                while writing:
                    if done:
                        c = rng.choice(sorted(done))
                        got = await fs.read(own, c * chunk, chunk)
                        assert got == expected[c * chunk : (c + 1) * chunk], f"chunk {c} differs while written"
                    await trio.sleep(0)
                await fs.release(own)

            with trio.fail_after(20):
                async with trio.open_nursery() as background:
                    background.start_soon(flusher)
                    background.start_soon(reader)
                    async with trio.open_nursery() as nursery:
                        for k in range(writers):
                            nursery.start_soon(writer, k)
                    writing = False
            assert await env.read_all(handle, len(expected) + 1) == expected
            await fs.release(handle)
        async with harness.running() as env:
            assert await env.contents_of(b"shared") == expected
            await env.check_stores_match_metadata()

    run(main)


def test_reads_racing_overwrites_and_garbage_collection_never_fail(tmp_path):
    """Whole shards are rewritten (each with one byte value) and committed over
    and over, and the collector deletes the old ones, while readers read: every
    read succeeds and shows, per shard, one whole version."""
    harness = Harness(tmp_path, shard_cache=SHARD)  # a tiny cache: reads go to the stores
    shards = 4

    async def main():
        async with harness.running() as env:
            fs = env.fs
            handle, inode = await env.create(b"f")
            await fs.write(handle, 0, bytes([1]) * (shards * SHARD))
            await fs.fsync(handle, False)
            writing = True
            rng = random.Random(3)
            reads = 0

            async def writer() -> None:
                for round_ in range(60):
                    index = rng.randrange(shards)
                    await fs.write(handle, index * SHARD, bytes([round_ % 250 + 2]) * SHARD)
                    if rng.random() < 0.5:
                        await fs.fsync(handle, False)

            async def reader(seed: int) -> None:
                nonlocal reads
                own = await fs.open(inode, os.O_RDONLY)
                local = random.Random(seed)
                while writing:
                    offset = local.randrange(shards * SHARD)
                    size = local.choice([local.randrange(1, 5000), local.randrange(1, 2 * SHARD)])
                    got = await fs.read(own, offset, size)
                    assert len(got) == min(size, shards * SHARD - offset)
                    position = offset
                    while position < offset + len(got):
                        end = min((position // SHARD + 1) * SHARD, offset + len(got))
                        piece = got[position - offset : end - offset]
                        assert piece == piece[:1] * len(piece), f"a mixed shard at {position}"
                        position = end
                    reads += 1
                    await trio.sleep(0)  # a read served from memory need not yield
                await fs.release(own)

            with trio.fail_after(20):
                async with trio.open_nursery() as nursery:
                    for seed in range(3):
                        nursery.start_soon(reader, seed)
                    await writer()
                    await fs.fsync(handle, False)
                    await env.wait_for_garbage_collection()
                    writing = False
            assert reads > 100
            await fs.release(handle)
            await env.check_stores_match_metadata()

    run(main)


# ---------------------------------------------------------------------------
# The namespace
# ---------------------------------------------------------------------------


async def expect_errno(expected: int, call, *args) -> None:
    with pytest.raises(DfsError) as excinfo:
        await call(*args)
    assert errno_of(excinfo) == expected, f"{call.__name__}{args}: {excinfo.value!r}"


def test_names_create_link_unlink_rename_rmdir(harness):
    async def main():
        async with harness.running() as env:
            fs = env.fs
            handle, f = await env.create(b"f")
            await fs.release(handle)
            await expect_errno(errno.EEXIST, env.create, b"f")
            d = await env.mkdir(b"d")
            assert (await fs.getattr(ROOT)).nlink == 3
            assert (await fs.lookup(ROOT, b"f")).inode == f
            assert (await fs.lookup(d, b"..")).inode == ROOT
            assert (await fs.getattr_of_parent(d)).inode == ROOT

            assert (await fs.link(f, d, b"g")).nlink == 2
            await expect_errno(errno.EPERM, fs.link, d, ROOT, b"d2")
            await expect_errno(errno.EEXIST, fs.link, f, ROOT, b"d")
            await expect_errno(errno.EISDIR, fs.unlink, ROOT, b"d")
            await expect_errno(errno.ENOTDIR, fs.rmdir, ROOT, b"f")
            await expect_errno(errno.ENOTEMPTY, fs.rmdir, ROOT, b"d")
            await expect_errno(errno.EINVAL, fs.rmdir, d, b".")
            await expect_errno(errno.ENOENT, fs.unlink, ROOT, b"nothing")

            await fs.rename(d, b"g", d, b"h", 0)
            await expect_errno(errno.ENOENT, fs.lookup, d, b"g")
            assert (await fs.lookup(d, b"h")).inode == f
            await expect_errno(errno.EEXIST, fs.rename, ROOT, b"f", d, b"h", RENAME_NOREPLACE)
            sub = await env.mkdir(b"sub", d)
            await expect_errno(errno.EINVAL, fs.rename, ROOT, b"d", sub, b"loop", 0)
            handle, other = await env.create(b"other", d)
            await fs.release(handle)
            await fs.rename(ROOT, b"f", d, b"other", RENAME_EXCHANGE)
            assert (await fs.lookup(ROOT, b"f")).inode == other
            assert (await fs.lookup(d, b"other")).inode == f

            link = await fs.create_node(ROOT, b"ln", stat.S_IFLNK | 0o777, ME, target=b"d/h")
            assert await fs.readlink(link.inode) == b"d/h"
            assert (await fs.getattr(link.inode)).size == 3
            await expect_errno(errno.EINVAL, fs.readlink, f)
            await expect_errno(errno.EISDIR, fs.open, d, os.O_RDONLY)
            await expect_errno(errno.EBADF, fs.read, 12345, 0, 10)

            await fs.rmdir(d, b"sub")
            for name in (b"h", b"other"):
                await fs.unlink(d, name)
            await fs.rmdir(ROOT, b"d")
            assert (await fs.getattr(ROOT)).nlink == 2
            names = sorted(entry.name for entry in await fs.readdir(ROOT, 0, 100))
            assert names == [b"f", b"ln"]
            stats = await fs.statfs()
            assert stats.blocks > 0 and stats.files_free > 0 and stats.name_max == 255

    run(main)


def test_readdir_pages_through_3000_entries(harness):
    count = 3000

    async def main():
        async with harness.running() as env:
            fs = env.fs
            d = await env.mkdir(b"big")
            names = [b"entry-%05d" % i for i in range(count)]
            for name in names:
                await fs.create_node(d, name, stat.S_IFREG | 0o644, ME)

            async def listing(limit: int) -> list:
                entries, after = [], 0
                while page := await fs.readdir(d, after, limit):
                    assert len(page) <= limit
                    entries += page
                    after = page[-1].offset
                return entries

            for limit in (1000, 333, 7):
                entries = await listing(limit)
                assert [e.name for e in entries] == names
                offsets = [e.offset for e in entries]
                assert offsets == sorted(set(offsets)) and offsets[0] > 0

            # Removing entries during a listing: nothing else is skipped or repeated.
            seen: list[bytes] = []
            page = await fs.readdir(d, 0, 500)
            seen += [e.name for e in page]
            removed = set(names[100:110] + names[499:500] + names[1000:1020])
            for name in removed:
                await fs.unlink(d, name)
            after = page[-1].offset  # the entry at `after` itself was just removed
            while page := await fs.readdir(d, after, 500):
                seen += [e.name for e in page]
                after = page[-1].offset
            assert len(seen) == len(set(seen)), "an entry was listed twice"
            assert set(names) - removed <= set(seen), "an entry was skipped"
            assert not (set(seen[500:]) & removed)
            await expect_errno(errno.ENOTDIR, fs.readdir, (await fs.lookup(d, names[0])).inode, 0, 10)

    run(main)


def test_setgid_directory_passes_its_group_on(harness):
    user = Caller(uid=1000, gid=1000)
    member = Caller(uid=1001, gid=4242)
    root = Caller(uid=0, gid=0)

    async def main():
        async with harness.running() as env:
            fs = env.fs
            shared = await env.mkdir(b"shared", mode=0o2777, caller=root)
            await fs.setattr(shared, AttrChanges(gid=4242, mode=0o2777), None)
            plain = await fs.create_node(ROOT, b"plain", stat.S_IFREG | 0o644, user)
            assert plain.gid == 1000

            f = await fs.create_node(shared, b"f", stat.S_IFREG | 0o2755, user)
            assert f.gid == 4242 and not f.mode & stat.S_ISGID  # not in the group: setgid dropped
            g = await fs.create_node(shared, b"g", stat.S_IFREG | 0o2755, member)
            assert g.gid == 4242 and g.mode & stat.S_ISGID
            r = await fs.create_node(shared, b"r", stat.S_IFREG | 0o2755, root)
            assert r.gid == 4242 and r.mode & stat.S_ISGID
            sub = await fs.create_node(shared, b"sub", stat.S_IFDIR | 0o755, user)
            assert sub.gid == 4242 and sub.mode & stat.S_ISGID  # and passes it on again
            handle, created = await fs.create(sub.inode, b"c", 0o644, os.O_RDWR, user)
            assert created.gid == 4242
            assert created.uid == 1000
            await fs.release(handle)

    run(main)


def test_umask_applies_to_new_inodes_except_symlinks(harness):
    caller = Caller(uid=os.getuid(), gid=os.getgid(), umask=0o027)

    async def main():
        async with harness.running() as env:
            fs = env.fs
            f = await fs.create_node(ROOT, b"f", stat.S_IFREG | 0o666, caller)
            assert stat.S_IMODE(f.mode) == 0o640 and stat.S_ISREG(f.mode)
            d = await fs.create_node(ROOT, b"d", stat.S_IFDIR | 0o777, caller)
            assert stat.S_IMODE(d.mode) == 0o750 and stat.S_ISDIR(d.mode)
            ln = await fs.create_node(ROOT, b"ln", stat.S_IFLNK | 0o777, caller, target=b"f")
            assert stat.S_IMODE(ln.mode) == 0o777
            handle, c = await fs.create(ROOT, b"c", 0o666, os.O_RDWR, caller)
            assert stat.S_IMODE(c.mode) == 0o640
            await fs.release(handle)
            assert stat.S_IMODE((await fs.getattr(c.inode)).mode) == 0o640

    run(main)


def test_names_longer_than_255_bytes_are_refused(harness):
    long, longest = b"n" * 256, b"n" * 255

    async def main():
        async with harness.running() as env:
            fs = env.fs
            handle, f = await env.create(b"f")
            await fs.release(handle)
            d = await env.mkdir(b"d")
            too_long = errno.ENAMETOOLONG
            await expect_errno(too_long, fs.lookup, ROOT, long)
            await expect_errno(too_long, fs.create, ROOT, long, 0o644, os.O_RDWR, ME)
            await expect_errno(too_long, fs.create_node, ROOT, long, stat.S_IFDIR | 0o755, ME)
            await expect_errno(too_long, fs.link, f, ROOT, long)
            await expect_errno(too_long, fs.rename, ROOT, b"f", ROOT, long, 0)
            await expect_errno(too_long, fs.rename, ROOT, long, ROOT, b"g", 0)
            await expect_errno(too_long, fs.unlink, ROOT, long)
            await expect_errno(too_long, fs.rmdir, ROOT, long)
            await fs.rename(ROOT, b"f", d, longest, 0)
            assert (await fs.lookup(d, longest)).inode == f
            assert [e.name for e in await fs.readdir(d, 0, 10)] == [longest]

    run(main)


def test_extended_attributes(harness):
    async def main():
        async with harness.running() as env:
            fs = env.fs
            handle, f = await env.create(b"f")
            await fs.release(handle)
            await expect_errno(errno.ENODATA, fs.getxattr, f, b"user.a")
            await expect_errno(errno.ENODATA, fs.getxattr, f, b"security.capability")
            await fs.setxattr(f, b"user.a", b"1", 0)
            await fs.setxattr(f, b"user.b", b"", 0)
            assert await fs.getxattr(f, b"user.a") == b"1"
            assert await fs.getxattr(f, b"user.b") == b""
            await expect_errno(errno.EEXIST, fs.setxattr, f, b"user.a", b"2", XATTR_CREATE)
            await expect_errno(errno.ENODATA, fs.setxattr, f, b"user.c", b"2", XATTR_REPLACE)
            await fs.setxattr(f, b"user.a", b"2", XATTR_REPLACE)
            assert sorted(await fs.listxattr(f)) == [b"user.a", b"user.b"]
            await fs.removexattr(f, b"user.b")
            await expect_errno(errno.ENODATA, fs.removexattr, f, b"user.b")
            for call, args in (
                (fs.getxattr, (f, b"system.posix_acl_access")),
                (fs.setxattr, (f, b"system.posix_acl_access", b"x", 0)),
                (fs.removexattr, (f, b"system.posix_acl_default")),
            ):
                await expect_errno(errno.EOPNOTSUPP, call, *args)
            await expect_errno(errno.EINVAL, fs.getxattr, f, b"")
            await expect_errno(errno.ERANGE, fs.getxattr, f, b"user." + b"x" * 251)
        async with harness.running() as env:
            assert await env.fs.listxattr(f) == [b"user.a"]
            assert await env.fs.getxattr(f, b"user.a") == b"2"

    run(main)


def test_open_files_show_their_buffered_size_everywhere(harness):
    async def main():
        async with harness.running() as env:
            fs = env.fs
            handle, f = await env.create(b"f")
            await fs.write(handle, 0, b"x" * 100)  # buffered, not committed
            assert (await env.meta.getattr(f)).size == 0
            assert (await fs.getattr(f)).size == 100
            assert (await fs.lookup(ROOT, b"f")).size == 100
            (entry,) = await fs.readdir(ROOT, 0, 10)
            assert entry.attrs.size == 100
            before = (await fs.getattr(f)).mtime_ns
            await fs.setattr(f, AttrChanges(mtime_ns=123_000_000_000), None)  # touch -m -d
            assert (await fs.getattr(f)).mtime_ns == 123_000_000_000 != before
            await fs.flush(handle)
            committed = await env.meta.getattr(f)
            assert (committed.size, committed.mtime_ns) == (100, 123_000_000_000)
            await fs.release(handle)

    run(main)


def test_rename_over_an_open_file_keeps_it_readable_until_released(harness):
    async def main():
        async with harness.running() as env:
            fs = env.fs
            a_data, b_data = os.urandom(SHARD + 10), os.urandom(2 * SHARD + 10)
            ha, a = await env.create(b"a")
            await fs.write(ha, 0, a_data)
            await fs.release(ha)
            hb, b = await env.create(b"b")
            await fs.write(hb, 0, b_data)
            await fs.flush(hb)
            await fs.rename(ROOT, b"a", ROOT, b"b", 0)
            assert (await fs.lookup(ROOT, b"b")).inode == a
            await fs.forget(a, 1)
            assert await env.read_all(hb, len(b_data)) == b_data
            await fs.release(hb)
            await fs.forget(b, 1)
            await env.wait_for_garbage_collection()
            assert {r.inode for r in await env.live_shards()} == {a}
            assert env.replica_count() == 2 * harness.config.replicas
            assert await env.contents_of(b"b") == a_data

    run(main, autojump=True)


def test_bug_concurrent_flushes_both_report_a_store_failure(tmp_path):
    """Two handles are closed at the same time while the store fails: the data
    is not stored, so neither close() may succeed."""
    harness = Harness(tmp_path, nodes=2, replicas=2)

    async def main():
        async with harness.running() as env:
            fs = env.fs
            handle, inode = await env.create(b"f")
            other = await fs.open(inode, os.O_RDWR)
            await fs.write(handle, 0, os.urandom(1000))
            gate = trio.Event()
            env.store["node2"].put_gate = gate
            env.store["node2"].put_error = StoreUnavailable("node2 is down")
            outcomes = {}

            async def close(name: str, h: int) -> None:
                try:
                    await fs.flush(h)
                except DfsError as error:
                    outcomes[name] = error.errno
                else:
                    outcomes[name] = 0

            async with trio.open_nursery() as nursery:
                nursery.start_soon(close, "first", handle)
                await wait_until(lambda: env.store["node2"].puts_waiting == 1)
                nursery.start_soon(close, "second", other)
                await trio.testing.wait_all_tasks_blocked()
                gate.set()
            assert await env.live_shards() == []  # nothing was stored
            assert outcomes == {"first": errno.EIO, "second": errno.EIO}

    run(main)


def traceback_length(error: BaseException) -> int:
    count, tb = 0, error.__traceback__
    while tb is not None:
        count, tb = count + 1, tb.tb_next
    return count


def test_bug_repeated_write_errors_do_not_pile_up(tmp_path):
    """An application that keeps writing while a store is down gets EIO each
    time; each failure must not keep the frames (and data) of all the
    earlier ones alive."""
    harness = Harness(tmp_path, nodes=2, replicas=2)

    async def main():
        async with harness.running() as env:
            fs = env.fs
            handle, _ = await env.create(b"f")
            env.store["node2"].put_error = StoreUnavailable("node2 is down")
            await fs.write(handle, 0, os.urandom(SHARD))  # a background flush that fails

            async def failing_write() -> DfsError | None:
                try:
                    await fs.write(handle, SHARD, b"x" * 100)
                except DfsError as error:
                    return error
                return None

            with trio.fail_after(5):
                while await failing_write() is None:
                    await trio.sleep(0.002)
            errors = [await failing_write() for _ in range(50)]
            assert all(error is not None and error.errno == errno.EIO for error in errors)
            assert traceback_length(errors[-1]) < 20, f"{traceback_length(errors[-1])} frames held by one error"
            env.store["node2"].put_error = None
            await fs.flush(handle)  # the store is back: the kept data is stored now
            assert await fs.read(handle, 0, 10) != bytes(10)
            await fs.release(handle)

    run(main)


def test_bug_replaced_replicas_are_deleted_only_once_the_replacement_is_durable(harness):
    """SQLite with synchronous=NORMAL may lose its last transactions in a power
    failure. If the old shard's replicas are already deleted then, the rolled
    back metadata points at nothing: data that was fsync'd is lost. The
    collector must make the metadata durable (meta.sync) before it deletes."""

    async def main():
        async with harness.running() as env:
            fs = env.fs
            handle, inode = await env.create(b"f")
            await fs.write(handle, 0, os.urandom(SHARD))
            await fs.fsync(handle, False)  # durable: data and metadata
            (old,) = await env.live_shards()
            await fs.write(handle, 10, b"new" * (SHARD // 6))  # too much for a patch: a whole new shard
            await fs.flush(handle)  # close(): the old shard becomes garbage, nothing synced
            await env.wait_for_garbage_collection()
            deleted = env.events.index(("delete replica", old.ref.shard_id))
            committed = max(i for i, event in enumerate(env.events[:deleted]) if event == ("commit", inode))
            assert ("sync", 0) in env.events[committed:deleted], (
                f"shard {old.ref.shard_id} deleted before the commit replacing it was made durable: "
                f"{env.events[committed : deleted + 1]}"
            )
            await fs.release(handle)

    run(main, autojump=True)


def test_open_with_o_trunc_empties_the_file(harness):
    async def main():
        async with harness.running() as env:
            fs = env.fs
            handle, inode = await env.create(b"f")
            await fs.write(handle, 0, os.urandom(2 * SHARD + 5))
            await fs.fsync(handle, False)
            reader = await fs.open(inode, os.O_RDONLY)  # another handle, open across the truncate
            await fs.release(handle)
            handle = await fs.open(inode, os.O_WRONLY | os.O_TRUNC)
            assert (await fs.getattr(inode)).size == 0
            assert await fs.read(reader, 0, 100) == b""
            await fs.write(handle, 0, b"new")
            await fs.release(handle)
            await fs.release(reader)
            await env.wait_for_garbage_collection()
            assert await env.contents_of(b"f") == b"new"
            assert env.replica_count() == harness.config.replicas
        async with harness.running() as env:
            assert await env.contents_of(b"f") == b"new"
            await env.check_stores_match_metadata()

    run(main, autojump=True)
