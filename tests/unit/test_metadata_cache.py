"""CachedMetadata: what it answers from memory, and that it stays right.

The engine is a real SqliteMetadata that counts the reads the cache passes
on to it. Correctness is checked against fresh reads of that same engine,
which always has the truth.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import random
import stat
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from dfsfuse.errors import DfsError, NoData, NotFound, StoreUnavailable
from dfsfuse.metadata.base import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    REPLICAS_XATTR,
    ROOT_INODE,
    XATTR_CREATE,
    XATTR_REPLACE,
    AttrChanges,
    DirEntry,
    EntryChange,
    InodeAttrs,
    MetadataStore,
    ShardLayers,
    ShardRef,
)
from dfsfuse.metadata.cache import CachedMetadata
from dfsfuse.metadata.sqlite import SqliteMetadata

FILE = stat.S_IFREG | 0o644
DIRECTORY = stat.S_IFDIR | 0o755


class CountingSqlite(SqliteMetadata):
    """SqliteMetadata counting the calls of each read that a cache should absorb,
    and of create (the one call that creating a name should cost)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: collections.Counter[str] = collections.Counter()

    async def getattr(self, inode: int) -> InodeAttrs:
        self.calls["getattr"] += 1
        return await super().getattr(inode)

    async def lookup(self, parent: int, name: bytes) -> InodeAttrs:
        self.calls["lookup"] += 1
        return await super().lookup(parent, name)

    async def create(self, *args, **kwargs) -> EntryChange:
        self.calls["create"] += 1
        return await super().create(*args, **kwargs)

    async def readdir(self, parent: int, after: int, limit: int) -> list[DirEntry]:
        self.calls["readdir"] += 1
        return await super().readdir(parent, after, limit)

    async def getxattr(self, inode: int, name: bytes) -> bytes:
        self.calls["getxattr"] += 1
        return await super().getxattr(inode, name)

    async def listxattr(self, inode: int) -> list[bytes]:
        self.calls["listxattr"] += 1
        return await super().listxattr(inode)

    async def shard_map(self, inode: int) -> dict[int, ShardLayers]:
        self.calls["shard_map"] += 1
        return await super().shard_map(inode)


class HeldReplies(SqliteMetadata):
    """SqliteMetadata whose read replies can be held back after the read is done,
    as a slow network reply can be, and which tells when a change reaches it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.release: trio.Event | None = None  # while set up, replies wait for it
        self.holding = trio.Event()  # a reply is being held back
        self.changing = trio.Event()  # a change has reached the engine

    async def _reply(self, result):
        if self.release is not None:
            self.holding.set()
            await self.release.wait()
        return result

    async def getattr(self, inode: int) -> InodeAttrs:
        return await self._reply(await super().getattr(inode))

    async def lookup(self, parent: int, name: bytes) -> InodeAttrs:
        return await self._reply(await super().lookup(parent, name))

    async def readdir(self, parent: int, after: int, limit: int) -> list[DirEntry]:
        return await self._reply(await super().readdir(parent, after, limit))

    async def create(self, *args, **kwargs) -> EntryChange:
        self.changing.set()
        return await super().create(*args, **kwargs)

    async def unlink(self, *args, **kwargs) -> EntryChange:
        self.changing.set()
        return await super().unlink(*args, **kwargs)

    async def setattr(self, *args, **kwargs) -> InodeAttrs:
        self.changing.set()
        return await super().setattr(*args, **kwargs)


class FailsAfterCommit(SqliteMetadata):
    """SqliteMetadata whose creates commit and then report a failure, as a
    networked engine's may when the reply is lost."""

    async def create(self, *args, **kwargs) -> EntryChange:
        await super().create(*args, **kwargs)
        raise StoreUnavailable("the reply was lost")


@contextlib.asynccontextmanager
async def cached(
    tmp_path, max_entries: int = 200_000, engine_class: type[SqliteMetadata] = CountingSqlite
) -> AsyncIterator[tuple[CachedMetadata, SqliteMetadata]]:
    engine = await engine_class.open(str(tmp_path / "metadata.db"))
    cache = CachedMetadata(engine, max_entries)
    try:
        yield cache, engine
    finally:
        await cache.close()


async def list_all(store: MetadataStore, directory: int, limit: int = 100) -> list[DirEntry]:
    entries: list[DirEntry] = []
    after = 0
    while page := await store.readdir(directory, after, limit):
        entries += page
        after = page[-1].offset
    return entries


def ref(shard_id: int, length: int = 1000) -> ShardRef:
    return ShardRef(shard_id, length, shard_id.to_bytes(16, "little"), ("a", "b"))


def test_repeated_reads_come_from_memory(tmp_path):
    async def main() -> None:
        async with cached(tmp_path) as (cache, engine):
            directory = (await cache.create(ROOT_INODE, b"dir", DIRECTORY, 0, 0, 1)).attrs
            file = (await cache.create(directory.inode, b"file", FILE, 0, 0, 2)).attrs
            await cache.commit_shards(file.inode, {0: ref(1)}, 1000)
            await cache.setxattr(file.inode, b"user.k", b"v", 0, 3)
            engine.calls.clear()
            for _ in range(3):
                assert (await cache.lookup(ROOT_INODE, b"dir")).inode == directory.inode
                assert (await cache.lookup(directory.inode, b"..")).inode == ROOT_INODE
                assert (await cache.lookup(directory.inode, b"file")).size == 1000
                with pytest.raises(NotFound):
                    await cache.lookup(directory.inode, b"absent")
                assert (await cache.getattr(file.inode)).size == 1000
                assert (await cache.getattr(directory.inode)).nlink == 2
                assert [entry.name for entry in await list_all(cache, directory.inode)] == [b"file"]
                with pytest.raises(NoData):
                    await cache.getxattr(file.inode, b"security.capability")
                assert await cache.getxattr(file.inode, b"user.k") == b"v"
                assert await cache.listxattr(file.inode) == [b"user.k"]
                assert await cache.shard_map(file.inode) == {0: (ref(1),)}
            # Only the first round reaches the engine, and only for what the
            # changes above did not tell the cache. The listing of "dir" is
            # complete since its mkdir, so it answers for "file" and "absent";
            # "file" had no xattrs and no shards when it was made, and the
            # cache saw it get user.k and its shard.
            assert engine.calls == {"lookup": 1}  # ".."

    trio.run(main)


def test_the_xattrs_of_a_new_inode_come_from_memory(tmp_path):
    """What create gave the new inode (an inherited replica count) is every
    xattr it has: the cache answers for all of them without the engine."""

    async def main() -> None:
        async with cached(tmp_path) as (cache, engine):
            directory = (await cache.create(ROOT_INODE, b"dir", DIRECTORY, 0, 0, 1)).attrs
            await cache.setxattr(directory.inode, REPLICAS_XATTR, b"1", 0, 2)
            engine.calls.clear()
            for kind in (FILE, DIRECTORY):
                inode = (await cache.create(directory.inode, b"%o" % kind, kind, 0, 0, 3)).attrs.inode
                assert await cache.getxattr(inode, REPLICAS_XATTR) == b"1"
                assert await cache.listxattr(inode) == [REPLICAS_XATTR]
                with pytest.raises(NoData):
                    await cache.getxattr(inode, b"security.capability")
            assert engine.calls == {"create": 2}

    trio.run(main)


def test_a_shard_map_is_the_cache_s_own_and_never_changes_once_handed_out(tmp_path):
    """No copy per call (the POSIX layer reads it on every read); a change of
    the file's shards puts a new mapping in place instead of changing the one
    a caller may be holding across an await."""

    async def main() -> None:
        async with cached(tmp_path) as (cache, engine):
            file = (await cache.create(ROOT_INODE, b"file", FILE, 0, 0, 1)).attrs
            await cache.commit_shards(file.inode, {0: ref(1)}, 1000)
            held = await cache.shard_map(file.inode)
            assert await cache.shard_map(file.inode) is held
            await cache.commit_shards(file.inode, {1: ref(2)}, 2000)
            await cache.set_shard_nodes(1, ("c",))
            assert held == {0: (ref(1),)}
            current = await cache.shard_map(file.inode)
            assert current == {0: (dataclasses.replace(ref(1), nodes=("c",)),), 1: (ref(2),)}
            assert await cache.shard_map(file.inode) is current
            assert engine.calls["shard_map"] == 0
        async with cached(tmp_path) as (cache, engine):  # a miss: the engine's answer is kept and returned
            first = await cache.shard_map(file.inode)
            assert await cache.shard_map(file.inode) is first
            assert engine.calls["shard_map"] == 1

    trio.run(main)


def test_one_listing_of_names_answers_for_every_absent_xattr(tmp_path):
    """Inodes the cache did not make (an earlier mount's): the first getxattr
    lists the names, after which absent names cost no engine call, as for the
    security.selinux that `ls -l` asks of every entry."""

    async def main() -> None:
        async with cached(tmp_path) as (cache, engine):
            plain = (await cache.create(ROOT_INODE, b"plain", FILE, 0, 0, 1)).attrs
            tagged = (await cache.create(ROOT_INODE, b"tagged", FILE, 0, 0, 1)).attrs
            await cache.setxattr(tagged.inode, b"user.k", b"v", 0, 2)
        async with cached(tmp_path) as (cache, engine):
            for _ in range(3):
                for name in (b"security.selinux", b"security.capability", b"user.other"):
                    for inode in (plain.inode, tagged.inode):
                        with pytest.raises(NoData):
                            await cache.getxattr(inode, name)
                assert await cache.getxattr(tagged.inode, b"user.k") == b"v"
                assert await cache.listxattr(plain.inode) == []
            assert engine.calls == {"listxattr": 2, "getxattr": 1}
            with pytest.raises(NotFound):
                await cache.getxattr(12345, b"security.selinux")

    trio.run(main)


def test_a_resumed_listing_comes_from_memory(tmp_path):
    async def main() -> None:
        async with cached(tmp_path) as (cache, engine):
            for i in range(250):
                await cache.create(ROOT_INODE, b"%03d" % i, FILE, 0, 0, 1)
            full = await list_all(cache, ROOT_INODE, limit=100)
            engine.calls.clear()
            rng = random.Random(3)
            for position in rng.sample(range(250), 40):
                limit = rng.randrange(1, 300)
                page = await cache.readdir(ROOT_INODE, full[position].offset, limit)
                assert page == full[position + 1 :][:limit]
            assert await cache.readdir(ROOT_INODE, 0, 10) == full[:10]
            assert engine.calls["readdir"] == 0

    trio.run(main)


def test_creating_a_name_costs_one_engine_call(tmp_path):
    """What FileSystem.create_node does after the kernel's lookup of the new name:
    with the directory made through the cache, only the create reaches the engine."""

    async def main() -> None:
        async with cached(tmp_path) as (cache, engine):
            directory = (await cache.create(ROOT_INODE, b"dir", DIRECTORY, 0, 0, 1)).attrs
            await cache.getattr(directory.inode)
            engine.calls.clear()
            for i in range(100):
                name = b"f%03d" % i
                with pytest.raises(NotFound):
                    await cache.lookup(directory.inode, name)
                parent = await cache.getattr(directory.inode)
                assert parent.mtime_ns == i + 1  # the time of the create before (or of the mkdir)
                created = (await cache.create(directory.inode, name, FILE, 0, 0, i + 2)).attrs
                with pytest.raises(NoData):  # the kernel's question before the first write
                    await cache.getxattr(created.inode, b"security.capability")
            assert engine.calls == {"create": 100}
            listing = await list_all(cache, directory.inode)
            assert engine.calls == {"create": 100}
            assert listing == await list_all(engine, directory.inode)
            assert await cache.getattr(directory.inode) == await engine.getattr(directory.inode)

    trio.run(main)


def test_a_complete_listing_follows_every_change(tmp_path):
    """A listing read to its end stays complete through every kind of change:
    it is served, and absent names are answered, without the engine."""

    async def main() -> None:
        async with cached(tmp_path) as (cache, engine):
            elsewhere = (await engine.create(ROOT_INODE, b"elsewhere", DIRECTORY, 0, 0, 1)).attrs
            # Made first, so it has a lower offset than anything in "dir".
            early = (await engine.create(elsewhere.inode, b"early", FILE, 0, 0, 1)).attrs
            directory = (await engine.create(ROOT_INODE, b"dir", DIRECTORY, 0, 0, 1)).attrs
            for name in (b"a", b"b", b"c"):
                await engine.create(directory.inode, name, FILE, 0, 0, 1)
            await engine.create(directory.inode, b"sub", DIRECTORY, 0, 0, 1)
            await list_all(cache, directory.inode, limit=2)
            await cache.getattr(directory.inode)
            d = directory.inode
            changes = [
                lambda: cache.create(d, b"new", FILE, 0, 0, 2),
                lambda: cache.create(d, b"newdir", DIRECTORY, 0, 0, 2),
                lambda: cache.link(early.inode, d, b"hard", 3),
                lambda: cache.unlink(d, b"b", 4),
                lambda: cache.rename(d, b"a", d, b"renamed", 0, 5),
                lambda: cache.rename(elsewhere.inode, b"early", d, b"moved-in", 0, 6),  # lands first
                lambda: cache.rename(d, b"c", elsewhere.inode, b"moved-out", 0, 7),
                lambda: cache.rename(d, b"renamed", d, b"new", 0, 8),  # replaces "new"
                lambda: cache.rename(d, b"sub", elsewhere.inode, b"moved-out", RENAME_EXCHANGE, 9),
                lambda: cache.rmdir(d, b"newdir", 10),
            ]
            names = [b"a", b"b", b"c", b"absent", b"new", b"newdir", b"renamed", b"sub"]
            for change in changes:
                await change()
                listing = await list_all(engine, d)
                lookups = [await outcome_of(engine.lookup(d, name)) for name in names]
                attrs = await engine.getattr(d)
                engine.calls.clear()
                assert await list_all(cache, d, limit=3) == listing
                assert [await outcome_of(cache.lookup(d, name)) for name in names] == lookups
                assert await cache.getattr(d) == attrs
                assert engine.calls == {}
            assert [entry.name for entry in await list_all(cache, d)][:1] == [b"moved-in"]

    trio.run(main)


def test_a_partial_listing_takes_in_only_what_it_covers(tmp_path):
    async def main() -> None:
        async with cached(tmp_path) as (cache, engine):
            early = (await engine.create(ROOT_INODE, b"early", FILE, 0, 0, 1)).attrs
            directory = (await engine.create(ROOT_INODE, b"dir", DIRECTORY, 0, 0, 1)).attrs
            d = directory.inode
            for i in range(10):
                await engine.create(d, b"%d" % i, FILE, 0, 0, 1)
            assert len(await cache.readdir(d, 0, 4)) == 4
            await cache.rename(ROOT_INODE, b"early", d, b"early", 0, 2)  # within what is held
            await cache.unlink(d, b"2", 3)
            await cache.create(d, b"late", FILE, 0, 0, 4)  # past it
            for entry in await list_all(engine, d):
                assert await cache.readdir(d, entry.offset, 1) == await engine.readdir(d, entry.offset, 1)
            page = await engine.readdir(d, 0, 4)
            engine.calls.clear()
            assert await cache.readdir(d, 0, 4) == page
            assert (await cache.lookup(d, b"early")).inode == early.inode
            assert engine.calls == {}
            assert await list_all(cache, d, limit=3) == await list_all(engine, d)

    trio.run(main)


@pytest.mark.parametrize("flags", [0, RENAME_EXCHANGE])
def test_rename_refreshes_the_inodes_it_moves(tmp_path, flags):
    async def main() -> None:
        async with cached(tmp_path) as (cache, engine):
            # Made behind the cache's back, then held by attrs records only, so
            # the cache has to find out which inodes the names stand for.
            one = (await engine.create(ROOT_INODE, b"one", FILE, 0, 0, 1)).attrs
            two = (await engine.create(ROOT_INODE, b"two", DIRECTORY, 0, 0, 1)).attrs
            for inode in (one.inode, two.inode):
                await cache.setattr(inode, AttrChanges(uid=3), 2)
            await cache.rename(ROOT_INODE, b"one", ROOT_INODE, b"two" if flags else b"three", flags, 3)
            for inode in (one.inode, two.inode):
                assert await cache.getattr(inode) == await engine.getattr(inode)

    trio.run(main)


def test_a_listing_resumed_past_what_the_cache_has_seen(tmp_path):
    async def main() -> None:
        async with cached(tmp_path) as (cache, engine):
            for i in range(10):
                await engine.create(ROOT_INODE, b"%d" % i, FILE, 0, 0, 1)
            full = await list_all(engine, ROOT_INODE)
            assert await cache.readdir(ROOT_INODE, 0, 3) == full[:3]
            assert await cache.readdir(ROOT_INODE, full[6].offset, 2) == full[7:9]
            assert await list_all(cache, ROOT_INODE, limit=3) == full
            assert await list_all(cache, ROOT_INODE, limit=4) == full

    trio.run(main)


def test_a_listing_of_20000_entries_is_paged_and_kept(tmp_path):
    count = 20_000  # 21 pages; tests/integration/test_bigdir.py lists 100,000 through a mount

    async def main() -> None:
        async with cached(tmp_path) as (cache, engine):
            # Filled through the engine, before the cache is used: quicker, and
            # the cache then meets a directory it has never seen.
            directory = (await engine.create(ROOT_INODE, b"huge", DIRECTORY, 0, 0, 1)).attrs

            async def make(first: int) -> None:
                for i in range(first, count, 8):
                    await engine.create(directory.inode, b"entry-%06d" % i, FILE, 0, 0, 1)

            async with trio.open_nursery() as nursery:
                for first in range(8):
                    nursery.start_soon(make, first)
            first_listing = await list_all(cache, directory.inode, limit=1000)
            assert len(first_listing) == count
            assert engine.calls["readdir"] == count // 1000 + 1
            engine.calls.clear()
            assert await list_all(cache, directory.inode, limit=1000) == first_listing
            assert engine.calls["readdir"] == 0
            assert cache.cached_entries <= 2 * count

    trio.run(main)


def test_memory_stays_within_max_entries(tmp_path):
    async def main() -> None:
        async with cached(tmp_path, max_entries=50) as (cache, engine):
            inodes = [(await cache.create(ROOT_INODE, b"f%d" % i, FILE, 0, 0, 1)).attrs.inode for i in range(200)]
            assert cache.cached_entries <= 50
            for inode in inodes:
                await cache.getattr(inode)
                assert cache.cached_entries <= 50
            engine.calls.clear()
            await cache.getattr(inodes[0])  # long evicted
            assert engine.calls["getattr"] == 1
            await cache.getattr(inodes[0])
            assert engine.calls["getattr"] == 1
            # A listing larger than the whole cache still works, from the engine.
            assert len(await list_all(cache, ROOT_INODE)) == 200
            assert len(await list_all(cache, ROOT_INODE)) == 200
            assert cache.cached_entries <= 50

    trio.run(main)


def test_a_change_with_unknown_outcome_empties_the_cache(tmp_path):
    async def main() -> None:
        async with cached(tmp_path, engine_class=FailsAfterCommit) as (cache, _):
            assert await list_all(cache, ROOT_INODE) == []
            with pytest.raises(NotFound):
                await cache.lookup(ROOT_INODE, b"new")
            with pytest.raises(StoreUnavailable):
                await cache.create(ROOT_INODE, b"new", FILE, 0, 0, 1)
            assert cache.cached_entries == 0
            assert [entry.name for entry in await list_all(cache, ROOT_INODE)] == [b"new"]
            assert (await cache.lookup(ROOT_INODE, b"new")).nlink == 1

    trio.run(main)


# -- a random workload, checked against the engine ---------------------------------

NAMES = [b"a", b"b", b"c", b"d", b"e"]
XATTR_NAMES = [b"user.x", b"user.y", b"security.capability", REPLICAS_XATTR]  # the last one is inherited


class Workload:
    """Random changes through the cache, interleaved with reads through it."""

    def __init__(self, cache: CachedMetadata, engine: SqliteMetadata, rng: random.Random):
        self.cache = cache
        self.engine = engine
        self.rng = rng
        self.inodes = {ROOT_INODE}
        self.directories = {ROOT_INODE}
        self.offsets_seen: dict[int, list[int]] = collections.defaultdict(list)  # directory -> offsets listed
        self.clock = 1

    def now(self) -> int:
        self.clock += 1
        return self.clock

    async def step(self) -> None:
        operation = self.rng.choice(
            [
                self.create,
                self.create,
                self.mkdir,
                self.link,
                self.unlink,
                self.rmdir,
                self.rename,
                self.rename,
                self.setattr,
                self.commit_shards,
                self.set_shard_nodes,
                self.xattr,
                self.delete_orphan,
                self.read_through_cache,
                self.read_through_cache,
            ]
        )
        try:
            await operation()
        except DfsError:
            pass  # refusals (Exists, NotEmpty, ...) are part of the workload

    def directory(self) -> int:
        return self.rng.choice(sorted(self.directories))

    def inode(self) -> int:
        return self.rng.choice(sorted(self.inodes))

    def name(self) -> bytes:
        return self.rng.choice(NAMES)

    async def create(self) -> None:
        change = await self.cache.create(self.directory(), self.name(), FILE, 0, 0, self.now())
        self.inodes.add(change.attrs.inode)

    async def mkdir(self) -> None:
        change = await self.cache.create(self.directory(), self.name(), DIRECTORY, 0, 0, self.now())
        self.inodes.add(change.attrs.inode)
        self.directories.add(change.attrs.inode)

    async def link(self) -> None:
        await self.cache.link(self.inode(), self.directory(), self.name(), self.now())

    async def unlink(self) -> None:
        await self.cache.unlink(self.directory(), self.name(), self.now())

    async def rmdir(self) -> None:
        await self.cache.rmdir(self.directory(), self.name(), self.now())

    async def rename(self) -> None:
        flags = self.rng.choice([0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE])
        await self.cache.rename(self.directory(), self.name(), self.directory(), self.name(), flags, self.now())

    async def setattr(self) -> None:
        changes = AttrChanges(mode=self.rng.choice([None, 0o600, 0o755]), uid=self.rng.choice([None, 5]))
        await self.cache.setattr(self.inode(), changes, self.now())

    async def commit_shards(self) -> None:
        inode = self.inode()
        indexes = self.rng.sample(range(6), self.rng.randrange(0, 3))
        ids = await self.cache.allocate_shard_ids(len(indexes))
        shards = {index: ref(shard_id, self.rng.randrange(1, 5000)) for index, shard_id in zip(indexes, ids)}
        drop_from = self.rng.choice([None, None, 0, 3])
        mtime = self.rng.choice([None, self.now()])
        changes = None if mtime is None else self.rng.choice([None, AttrChanges(mode=self.rng.randrange(0o1000))])
        await self.cache.commit_shards(
            inode, shards, self.rng.randrange(0, 30000), drop_from, mtime, mtime, changes=changes
        )

    async def set_shard_nodes(self) -> None:
        records = await self.engine.shards(0, 1000)
        if records:
            record = self.rng.choice(records)
            await self.cache.set_shard_nodes(record.ref.shard_id, (self.rng.choice(["p", "q"]), "r"))

    async def xattr(self) -> None:
        inode, name = self.inode(), self.rng.choice(XATTR_NAMES)
        if self.rng.random() < 0.3:
            await self.cache.removexattr(inode, name, self.now())
        else:
            flags = self.rng.choice([0, 0, XATTR_CREATE, XATTR_REPLACE])
            await self.cache.setxattr(inode, name, b"%d" % self.now(), flags, self.now())

    async def delete_orphan(self) -> None:
        orphans = await self.cache.orphan_inodes()
        if orphans:
            await self.cache.delete_inodes(self.rng.sample(orphans, self.rng.randint(1, len(orphans))))

    async def read_through_cache(self) -> None:
        """Fill the cache in the ways the kernel does, partial listings included."""
        directory = self.directory()
        with contextlib.suppress(DfsError):
            await self.cache.lookup(directory, self.rng.choice(NAMES + [b".."]))
        offsets_seen = self.offsets_seen[directory]
        # Start a listing, or resume one where an earlier one left off, maybe
        # past the part of the directory the cache has seen so far.
        for after in (0, self.rng.choice(offsets_seen or [0])):
            with contextlib.suppress(DfsError):
                page = await self.cache.readdir(directory, after, self.rng.randrange(1, 4))
                offsets_seen += [entry.offset for entry in page]
        inode = self.inode()
        for read in (self.cache.getattr(inode), self.cache.listxattr(inode), self.cache.shard_map(inode)):
            with contextlib.suppress(DfsError):
                await read
        with contextlib.suppress(DfsError):
            await self.cache.getxattr(inode, self.rng.choice(XATTR_NAMES))


async def outcome_of(call) -> object:
    """What a call returns, or the type of the error it raises."""
    try:
        return await call
    except DfsError as error:
        return type(error)


async def check_cache_agrees(cache: CachedMetadata, engine: SqliteMetadata, workload: Workload) -> None:
    """Every listing, lookup and attrs; the xattrs and shard maps of a few inodes.

    Listings and lookups come first: reading attrs through the cache would
    refresh the attrs they show."""
    for directory in sorted(workload.directories):
        limit = workload.rng.randrange(1, 5)
        cached_listing = await outcome_of(list_all(cache, directory, limit))
        assert cached_listing == await outcome_of(list_all(engine, directory)), directory
        for name in NAMES + [b"..", b"."]:
            cached_lookup = await outcome_of(cache.lookup(directory, name))
            assert cached_lookup == await outcome_of(engine.lookup(directory, name)), (directory, name)
    for inode in sorted(workload.inodes):
        assert await outcome_of(cache.getattr(inode)) == await outcome_of(engine.getattr(inode)), inode
    for inode in workload.rng.sample(sorted(workload.inodes), min(3, len(workload.inodes))):
        assert await outcome_of(cache.shard_map(inode)) == await outcome_of(engine.shard_map(inode)), inode
        cached_names = await outcome_of(cache.listxattr(inode))
        engine_names = await outcome_of(engine.listxattr(inode))
        if isinstance(cached_names, list):
            cached_names.sort()
        assert cached_names == engine_names, inode
        for name in XATTR_NAMES:
            cached_value = await outcome_of(cache.getxattr(inode, name))
            assert cached_value == await outcome_of(engine.getxattr(inode, name)), (inode, name)


@pytest.mark.parametrize("seed, max_entries", [(1, 200_000), (2, 200_000), (3, 40), (4, 7)])
def test_cache_agrees_with_engine_after_random_changes(tmp_path, seed, max_entries):
    async def main() -> None:
        async with cached(tmp_path, max_entries) as (cache, engine):
            workload = Workload(cache, engine, random.Random(seed))
            for _ in range(200):
                await workload.step()
                await check_cache_agrees(cache, engine, workload)
                assert cache.cached_entries <= max_entries

    trio.run(main)


@pytest.mark.parametrize("seed", range(5, 10))
def test_partial_listings_agree_with_engine_after_random_changes(tmp_path, seed):
    """Checking reads every listing to its end, and a listing then stays
    complete. So here a fresh cache takes over between checks, as at a new
    mount, and its listings are read in part while the changes go on."""

    async def main() -> None:
        async with cached(tmp_path) as (_, engine):
            workload = Workload(CachedMetadata(engine), engine, random.Random(seed))
            for step in range(1, 401):
                if step % 40 == 20:
                    workload.cache = CachedMetadata(engine)
                await workload.step()
                if step % 40 == 0:
                    await check_cache_agrees(workload.cache, engine, workload)

    trio.run(main)


def test_cache_agrees_with_engine_after_concurrent_changes(tmp_path):
    async def main() -> None:
        async with cached(tmp_path) as (cache, engine):
            workloads = [Workload(cache, engine, random.Random(seed)) for seed in range(6)]
            for workload in workloads[1:]:
                workload.inodes = workloads[0].inodes
                workload.directories = workloads[0].directories
            for _ in range(10):
                async with trio.open_nursery() as nursery:
                    for workload in workloads:
                        for _ in range(5):
                            nursery.start_soon(workload.step)
                await check_cache_agrees(cache, engine, workloads[0])

    trio.run(main)


@pytest.mark.parametrize("race", ["getattr-setattr", "lookup-unlink", "readdir-create"])
def test_a_read_overtaken_by_a_change_stores_nothing_stale(tmp_path, race):
    """A read misses, the engine reads, and its reply is slow; a change of the
    same thing comes in meanwhile. The cache must end up with the change."""

    async def main() -> None:
        async with cached(tmp_path, engine_class=HeldReplies) as (cache, engine):
            assert isinstance(engine, HeldReplies)
            directory = (await engine.create(ROOT_INODE, b"dir", DIRECTORY, 0, 0, 1)).attrs
            file = (await engine.create(ROOT_INODE, b"file", FILE, 0, 0, 1)).attrs
            read, change, check = {
                "getattr-setattr": (
                    lambda: cache.getattr(file.inode),
                    lambda: cache.setattr(file.inode, AttrChanges(mode=0o600), 2),
                    lambda: cache.getattr(file.inode),
                ),
                "lookup-unlink": (
                    lambda: cache.lookup(ROOT_INODE, b"file"),
                    lambda: cache.unlink(ROOT_INODE, b"file", 2),
                    lambda: outcome_of(cache.lookup(ROOT_INODE, b"file")),
                ),
                "readdir-create": (
                    lambda: cache.readdir(directory.inode, 0, 100),
                    lambda: cache.create(directory.inode, b"new", FILE, 0, 0, 2),
                    lambda: list_all(cache, directory.inode),
                ),
            }[race]
            expected = {
                "getattr-setattr": lambda: engine.getattr(file.inode),
                "lookup-unlink": lambda: outcome_of(engine.lookup(ROOT_INODE, b"file")),
                "readdir-create": lambda: list_all(engine, directory.inode),
            }[race]
            changed = trio.Event()

            async def make_change() -> None:
                await change()
                changed.set()

            engine.release, engine.changing = trio.Event(), trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                await engine.holding.wait()
                nursery.start_soon(make_change)
                await trio.testing.wait_all_tasks_blocked()
                if engine.changing.is_set():  # the cache let the change pass the read
                    await changed.wait()
                engine.release.set()
            engine.release = None
            assert await check() == await expected()

    trio.run(main)
