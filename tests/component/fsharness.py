"""An in-process FileSystem for component tests: no FUSE, no mocks.

The layers under test run on the real parts below them: SqliteMetadata behind
CachedMetadata in a temporary data directory, real LocalStores (one directory
each) and a Replicator. Shards are small (64 KiB, 4 KiB checksum blocks) and
the write buffer holds only a few shards, so ordinary test files span many
shards and writers meet the memory budget's backpressure all the time.

`FaultyStore` is a LocalStore with faults injected on demand (failing or
paused puts and syncs) and a record of what was made durable; a fault
injector around a real store, not a mock. `ObservedSqlite` is the real
engine noting, in order with the stores' deletes, its commits and syncs.

Usage, inside `trio.run`:

    harness = Harness(tmp_path)
    async with harness.running() as env:      # runs the replicator and fs.run
        fh, inode = await env.create(b"f")
        ...
    # on a normal exit fs.shutdown() ran and everything is closed
    async with harness.running() as env:      # a NEW FileSystem on the same dirs
        ...
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import stat
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import trio
import trio.testing

from dfsfuse.config import Config, NodeSpec
from dfsfuse.errors import DfsError
from dfsfuse.metadata.base import ROOT_INODE, MetadataStore
from dfsfuse.metadata.cache import CachedMetadata
from dfsfuse.metadata.sqlite import SqliteMetadata
from dfsfuse.runtime import running_file_system
from dfsfuse.shards import replica
from dfsfuse.shards.cache import ShardCache
from dfsfuse.shards.garbage import GarbageCollector
from dfsfuse.shards.replicator import Replicator
from dfsfuse.storage.base import Buffer
from dfsfuse.storage.local import SHARDS_DIR, LocalStore, replica_name
from dfsfuse.vfs.filesystem import Caller, FileSystem
from dfsfuse.write.buffer import WriteBudget

KiB = 1024
SHARD = 64 * KiB
BLOCK = 4 * KiB
ROOT = ROOT_INODE
ME = Caller(uid=os.getuid(), gid=os.getgid(), umask=0o022)


# On the autojump clock, time jumps once the loop was idle this long (real
# seconds): not at once, or the loop would spin through jumps while worker
# threads do the I/O it waits for.
AUTOJUMP_IDLE = 0.001


def run(async_fn, *args, autojump: bool = False) -> None:
    """trio.run, raising the one exception inside a nursery's ExceptionGroup
    as itself, so that failures read plainly and pytest.raises/xfail(raises=)
    see the real type.

    With `autojump`, on trio's autojump clock: whenever every task waits,
    time jumps to the next timer, so a test that waits for a timeout-driven
    behaviour (the garbage collector's quiet period and retry delay) does
    not sleep through it."""
    clock = trio.testing.MockClock(autojump_threshold=AUTOJUMP_IDLE) if autojump else None
    try:
        trio.run(async_fn, *args, clock=clock)
    except BaseExceptionGroup as group:
        leaves = list(_leaves(group))
        if len(leaves) == 1:
            raise leaves[0] from None
        raise


def _on_autojump_clock() -> bool:
    return isinstance(trio.lowlevel.current_clock(), trio.testing.MockClock)


def deadline(seconds: float) -> contextlib.AbstractContextManager[object]:
    """A deadline for a wait: fail_after on the real clock. On the autojump
    clock there is none (pytest-timeout bounds the test): time jumps there
    while worker threads do real I/O, so a deadline would pass early."""
    return contextlib.nullcontext() if _on_autojump_clock() else trio.fail_after(seconds)


async def poll_pause() -> None:
    """The pause between two looks at a condition that has no signal: short
    on the real clock; on the autojump clock a longer one costs nothing and
    lets each jump cover more time."""
    await trio.sleep(0.05 if _on_autojump_clock() else 0.002)


def _leaves(group: BaseExceptionGroup):
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


async def wait_at_gate(owner: object, gate: trio.Event | None, counter: str) -> None:
    """Wait for `gate`, if one is set, counting the waiters in owner.<counter>."""
    if gate is None:
        return
    setattr(owner, counter, getattr(owner, counter) + 1)
    try:
        await gate.wait()
    finally:
        setattr(owner, counter, getattr(owner, counter) - 1)


class FaultyStore(LocalStore):
    """A LocalStore whose puts can be made to fail or to wait, on demand.

    - `put_error`: while set, every put raises it (after the gate, if any).
    - `put_gate`: while set, every put waits for the event first; `puts_waiting`
      counts the puts waiting at it.
    - `sync_gate`, `syncs_waiting`: the same for sync().
    - `durable`: shard ids whose replica here was put with sync=True or synced
      by sync() since its last put (what fsync must have made durable).

    Every replica is a file (no packs), so that tests can find and damage
    replicas on disk; packs have tests of their own (tests/unit/test_packs.py,
    tests/integration/test_packs.py).
    """

    pack_below = 0

    def __init__(self, name: str, root: str, *, exclusive: bool = True):
        super().__init__(name, root, exclusive=exclusive)
        self.put_error: DfsError | None = None
        self.put_gate: trio.Event | None = None
        self.sync_gate: trio.Event | None = None
        self.puts_waiting = 0
        self.syncs_waiting = 0
        self.failed_puts = 0
        self.durable: set[int] = set()
        self.events: list[tuple[str, int]] | None = None  # shared with ObservedSqlite, if set

    async def put(self, shard_id: int, parts: Sequence[Buffer], sync: bool) -> None:
        await wait_at_gate(self, self.put_gate, "puts_waiting")
        if self.put_error is not None:
            self.failed_puts += 1
            raise self.put_error
        await super().put(shard_id, parts, sync)
        if sync:
            self.durable.add(shard_id)
        else:
            self.durable.discard(shard_id)

    async def sync(self, shard_ids: Sequence[int]) -> None:
        await wait_at_gate(self, self.sync_gate, "syncs_waiting")
        await super().sync(shard_ids)
        held = set(replica_files(self))
        self.durable.update(shard_id for shard_id in shard_ids if shard_id in held)

    async def delete(self, shard_id: int) -> None:
        await super().delete(shard_id)
        self._deleted([shard_id])

    async def delete_many(self, shard_ids) -> None:
        await super().delete_many(shard_ids)
        self._deleted(shard_ids)

    def _deleted(self, shard_ids) -> None:
        self.durable.difference_update(shard_ids)
        if self.events is not None:
            self.events.extend(("delete replica", shard_id) for shard_id in shard_ids)


class ObservedSqlite(SqliteMetadata):
    """The real SQLite engine, noting in `events` (in order) each transaction
    that makes shards garbage and each sync that makes transactions durable.

    `setattr_gate`: while set, a setattr waits for the event after its
    transaction committed, as a caller that has not yet heard back;
    `setattrs_waiting` counts those waiting. `commit_gate` and
    `commits_waiting` do the same for commit_shards of the inodes in
    `gated_commits`.
    """

    events: list[tuple[str, int]]
    setattr_gate: trio.Event | None = None
    setattrs_waiting = 0
    commit_gate: trio.Event | None = None
    gated_commits: frozenset[int] = frozenset()
    commits_waiting = 0

    async def setattr(self, inode, changes, now_ns):
        attrs = await super().setattr(inode, changes, now_ns)
        await wait_at_gate(self, self.setattr_gate, "setattrs_waiting")
        return attrs

    async def commit_shards(self, inode, shards, size, drop_from=None, mtime_ns=None, ctime_ns=None, *, changes=None,
                            holes=()):
        attrs = await super().commit_shards(inode, shards, size, drop_from, mtime_ns, ctime_ns, changes=changes,
                                            holes=holes)
        self.events.append(("commit", inode))
        if inode in self.gated_commits:
            await wait_at_gate(self, self.commit_gate, "commits_waiting")
        return attrs

    async def delete_inodes(self, inodes) -> None:
        await super().delete_inodes(inodes)
        self.events.append(("delete inodes", len(inodes)))

    async def sync(self) -> None:
        await super().sync()
        self.events.append(("sync", 0))


async def wait_until(predicate, timeout: float = 10) -> None:
    """Poll a condition that some background task will make true, under a deadline.

    For outcomes with no completion signal to wait on (a put reaching a gate,
    the garbage collector's or the repair worker's work).
    """
    with deadline(timeout):
        while not predicate():
            await poll_pause()


def replica_files(store: LocalStore) -> list[int]:
    """The shard ids of the replica files on the store's disk (not its index)."""
    ids = []
    shards_dir = os.path.join(store.root, SHARDS_DIR)
    for bucket in os.listdir(shards_dir):
        for name in os.listdir(os.path.join(shards_dir, bucket)):
            ids.append(int(name, 16))
    return sorted(ids)


def replica_path(store: LocalStore, shard_id: int) -> Path:
    return Path(store.root) / replica_name(shard_id)


def make_config(
    root: Path,
    *,
    nodes: int = 3,
    replicas: int = 2,
    write_quorum: int | None = None,
    shard_size: int = SHARD,
    block_size: int = BLOCK,
    write_buffer: int = 4 * SHARD,
    shard_cache: int = 8 * SHARD,
) -> Config:
    return Config(
        data_dir=root,
        nodes=tuple(NodeSpec(f"node{i}", root / "nodes" / f"node{i}") for i in range(1, nodes + 1)),
        replicas=replicas,
        write_quorum=replicas if write_quorum is None else write_quorum,
        shard_size=shard_size,
        block_size=block_size,
        shard_cache_bytes=shard_cache,
        write_buffer_bytes=write_buffer,
        metadata_entries=1000,
        trash_days=0.0,  # deletes are immediate here; the trash has tests of its own
    )


@dataclasses.dataclass
class Env:
    """One running FileSystem and the parts under it."""

    fs: FileSystem
    meta: MetadataStore
    stores: list[FaultyStore]
    replicator: Replicator
    config: Config
    events: list[tuple[str, int]]  # see ObservedSqlite and FaultyStore.delete
    budget: WriteBudget
    cache: ShardCache
    garbage: GarbageCollector
    engine: ObservedSqlite  # under `meta`, the cache

    @property
    def store(self) -> dict[str, FaultyStore]:
        return {store.name: store for store in self.stores}

    # -- files ------------------------------------------------------------
    async def create(self, name: bytes, parent: int = ROOT, mode: int = 0o644, caller: Caller = ME) -> tuple[int, int]:
        """Create and open a file: (handle, inode). Holds one kernel reference."""
        handle, attrs = await self.fs.create(parent, name, mode, os.O_RDWR, caller)
        return handle, attrs.inode

    async def mkdir(self, name: bytes, parent: int = ROOT, mode: int = 0o755, caller: Caller = ME) -> int:
        return (await self.fs.create_node(parent, name, stat.S_IFDIR | mode, caller)).inode

    async def read_all(self, handle: int, size: int, chunk: int = 128 * KiB) -> bytes:
        parts = []
        for offset in range(0, size, chunk):
            parts.append(await self.fs.read(handle, offset, min(chunk, size - offset)))
        return b"".join(parts)

    async def contents_of(self, name: bytes, parent: int = ROOT) -> bytes:
        """The whole file, opened and released by name (its lookup reference is forgotten)."""
        attrs = await self.fs.lookup(parent, name)
        handle = await self.fs.open(attrs.inode, os.O_RDONLY)
        try:
            return await self.read_all(handle, (await self.fs.getattr(attrs.inode)).size)
        finally:
            await self.fs.release(handle)
            await self.fs.forget(attrs.inode, 1)

    # -- what is stored -----------------------------------------------------
    def replicas_on_disk(self) -> dict[str, list[int]]:
        return {store.name: replica_files(store) for store in self.stores}

    def replica_count(self) -> int:
        return sum(len(ids) for ids in self.replicas_on_disk().values())

    async def live_shards(self):
        records, after = [], 0
        while page := await self.meta.shards(after, 1000):
            records += page
            after = page[-1].ref.shard_id
        return records

    async def garbage_rows(self) -> list[tuple[int, tuple[str, ...]]]:
        return await self.meta.garbage(100_000)

    async def wait_for_garbage_collection(self, timeout: float = 10) -> None:
        """Until the background collector deleted the unreferenced inodes and
        emptied the garbage list.

        The collector has no completion signal, so this polls the metadata,
        the observable outcome, under a deadline.
        """
        with deadline(timeout):
            while self.garbage.pending or await self.garbage_rows():
                await poll_pause()

    async def check_stores_match_metadata(self, allow_garbage: bool = False) -> None:
        """The fsck oracle: every live shard has a replica, which verifies, on each
        store its metadata names; no replica file exists that nothing refers to."""
        live = await self.live_shards()
        garbage = {shard_id for shard_id, _ in await self.garbage_rows()}
        on_disk = self.replicas_on_disk()
        expected: dict[str, set[int]] = {store.name: set() for store in self.stores}
        for record in live:
            ref = record.ref
            assert len(ref.nodes) == self.config.replicas, record
            for node in ref.nodes:
                expected[node].add(ref.shard_id)
                data = replica_path(self.store[node], ref.shard_id).read_bytes()
                split = replica.data_offset(ref.length, self.config.block_size)
                replica.verify_replica(data[:split], data[split:], ref.checksum, ref.length)
        for name, ids in on_disk.items():
            extra = set(ids) - expected[name]
            if allow_garbage:
                extra -= garbage
            assert not extra, f"{name}: replica files nothing refers to: {sorted(extra)}"
            missing = expected[name] - set(ids)
            assert not missing, f"{name}: live shards without their replica: {sorted(missing)}"


class Recorder:
    """An Output that keeps what an operation reports."""

    def __init__(self):
        self.lines: list[str] = []

    def line(self, text: str) -> None:
        self.lines.append(text)

    def progress(self, done: int, total: int, what: str) -> None:
        pass


class Harness:
    """A data directory; `running()` builds a FileSystem over it, each time anew."""

    def __init__(self, root: Path, **config_options):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.config = make_config(self.root, **config_options)

    @contextlib.asynccontextmanager
    async def running(self, *, shutdown: bool = True) -> AsyncIterator[Env]:
        """A running FileSystem; on a normal exit `fs.shutdown()` runs first.

        With shutdown=False the file system just stops, as when the mount
        process dies: nothing is flushed, nothing deleted.
        """
        config = self.config
        engine = await ObservedSqlite.open(str(config.metadata_path))
        engine.events = events = []
        meta = CachedMetadata(engine, config.metadata_entries)
        stores: list[FaultyStore] = []
        try:
            for node in config.nodes:
                stores.append(await FaultyStore.open(node.name, str(node.path)))
                stores[-1].events = events
            replicator = Replicator(stores, config.replicas, config.block_size, write_quorum=config.write_quorum)
            async with trio.open_nursery() as nursery:
                await nursery.start(replicator.run)
                async with running_file_system(meta, replicator, config) as parts:
                    fs = parts.fs
                    yield Env(
                        fs, meta, stores, replicator, config, events, parts.budget, parts.cache, parts.garbage, engine
                    )
                    if shutdown:
                        for store in stores:  # faults are for the test body, not the shutdown
                            store.put_error = store.put_gate = store.sync_gate = None
                        await fs.shutdown()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                for store in stores:
                    await store.close()
                await meta.close()
