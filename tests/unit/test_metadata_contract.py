"""The contract every MetadataStore implementation passes.

Each implementation is reached through a harness: `harness.store()` is an
async context manager yielding a ready store, and entering it again reopens
the same metadata (for persistence). Add a harness to HARNESSES to run the
whole suite on another engine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import pathlib
import random
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from fcntl import F_RDLCK, F_UNLCK, F_WRLCK

import pytest
import trio

from dfsfuse.errors import (
    CrossDevice,
    Exists,
    InvalidArgument,
    IsADirectory,
    NameTooLong,
    NoData,
    NotADirectory,
    NotEmpty,
    NotFound,
    NotPermitted,
    QuotaExceeded,
    SessionLost,
    UserError,
)
from dfsfuse.layout import PAGE_SIZE
from dfsfuse.metadata import dump as dump_format
from dfsfuse.metadata.base import (
    COMPRESSION_XATTR,
    ERASURE_XATTR,
    NAME_MAX,
    NODE_ACTIVE,
    NODE_DRAINED,
    NODE_DRAINING,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    REPLICAS_XATTR,
    ROOT_INODE,
    SETTLE_NS,
    XATTR_CREATE,
    XATTR_REPLACE,
    AttrChanges,
    DirEntry,
    InodeAttrs,
    MetadataStore,
    NodeRecord,
    QuotaRecord,
    RenameChange,
    ShardRecord,
    ShardRef,
    TrashEntry,
    UsageCounts,
    check_name,
)
from dfsfuse.metadata.cache import CachedMetadata
from dfsfuse.metadata.engines import (
    ENGINE_NAMES,
    MetadataSettings,
    load_dump,
    metadata_exists,
    open_dump,
    open_engine,
)
from dfsfuse.metadata.locks import FLOCK, OFFSET_MAX, POSIX, LockRecord
from dfsfuse.metadata.postgres import PostgresMetadata
from dfsfuse.metadata.sqlite import SqliteMetadata
from dfsfuse.metadata.trash import (
    DAY_NS,
    TRASH_DAYS_XATTR,
    TRASH_DELETED_XATTR,
    TRASH_EXPIRES_XATTR,
    TRASH_NAME,
    TRASH_PATH_XATTR,
    entry_name,
    hour_name,
)
from dfsfuse.shards.encoding import Encoding

FILE = stat.S_IFREG | 0o644
DIRECTORY = stat.S_IFDIR | 0o755
SYMLINK = stat.S_IFLNK | 0o777


class Harness:
    """One engine's metadata, each `store()` opening it anew (persistence);
    `cached` puts the metadata cache over the engine."""

    def __init__(self, open_engine: Callable[[], Awaitable[MetadataStore]], cached: bool = False):
        self._open = open_engine
        self._cached = cached

    @contextlib.asynccontextmanager
    async def store(self) -> AsyncIterator[MetadataStore]:
        store = await self._open()
        if self._cached:
            store = CachedMetadata(store)
        try:
            yield store
        finally:
            await store.close()


def sqlite_harness(root: pathlib.Path, cached: bool = False) -> Harness:
    return Harness(lambda: SqliteMetadata.open(str(root / "metadata.db")), cached)


def postgres_harness(url: str, cached: bool = False) -> Harness:
    """A database of its own on the test run's PostgreSQL server (tests/conftest.py)."""
    return Harness(lambda: PostgresMetadata.open(url), cached)


HARNESSES = ("sqlite", "cached-sqlite", "postgresql", "cached-postgresql")


@pytest.fixture(params=HARNESSES)
def harness(request, tmp_path):
    cached = request.param.startswith("cached-")
    if request.param.endswith("postgresql"):
        return postgres_harness(request.getfixturevalue("postgres_url"), cached)
    return sqlite_harness(tmp_path, cached)


def run_with_store(harness, body: Callable[[MetadataStore], Awaitable[None]]) -> None:
    async def main() -> None:
        async with harness.store() as store:
            await body(store)

    trio.run(main)


_clock = itertools.count(1_700_000_000_000_000_000, 1_000_000)


def now() -> int:
    """A fresh timestamp, later than every one before."""
    return next(_clock)


async def mkfile(store: MetadataStore, parent: int, name: bytes) -> InodeAttrs:
    return (await store.create(parent, name, FILE, 1000, 1000, now())).attrs


async def mkdir(store: MetadataStore, parent: int, name: bytes) -> InodeAttrs:
    return (await store.create(parent, name, DIRECTORY, 1000, 1000, now())).attrs


async def list_all(store: MetadataStore, directory: int, limit: int = 100) -> list[DirEntry]:
    entries: list[DirEntry] = []
    after = 0
    while page := await store.readdir(directory, after, limit):
        assert len(page) <= limit
        entries += page
        after = page[-1].offset
    return entries


async def names_in(store: MetadataStore, directory: int) -> set[bytes]:
    return {entry.name for entry in await list_all(store, directory)}


async def check_nlinks(store: MetadataStore) -> None:
    """Walk the tree from the root, and the trash's: every nlink must match
    the names and subdirectories found, and every directory's ".." its parent."""
    names_of: dict[int, int] = {}
    subdirectories: dict[int, int] = {}
    pending = [ROOT_INODE]
    with contextlib.suppress(NotFound):
        pending.append((await store.lookup(ROOT_INODE, TRASH_NAME)).inode)  # in no listing of the root
    while pending:
        directory = pending.pop()
        subdirectories[directory] = 0
        for entry in await list_all(store, directory):
            if stat.S_ISDIR(entry.attrs.mode):
                subdirectories[directory] += 1
                assert (await store.lookup(entry.attrs.inode, b"..")).inode == directory
                pending.append(entry.attrs.inode)
            else:
                names_of[entry.attrs.inode] = names_of.get(entry.attrs.inode, 0) + 1
    for directory, count in subdirectories.items():
        assert (await store.getattr(directory)).nlink == 2 + count, directory
    for inode, count in names_of.items():
        assert (await store.getattr(inode)).nlink == count, inode


def ref(shard_id: int, length: int = 1000, nodes: tuple[str, ...] = ("a", "b")) -> ShardRef:
    return ShardRef(shard_id, length, shard_id.to_bytes(16, "little"), nodes)


def patch(shard_id: int, pages: tuple[int, ...]) -> ShardRef:
    return ShardRef(shard_id, len(pages) * PAGE_SIZE, shard_id.to_bytes(16, "little"), ("a", "b"), pages)


# -- inodes and names ---------------------------------------------------------


def test_root_directory_exists(harness):
    async def body(store: MetadataStore) -> None:
        root = await store.getattr(ROOT_INODE)
        assert root.inode == ROOT_INODE
        assert root.mode == stat.S_IFDIR | 0o755
        assert root.nlink == 2
        assert (root.uid, root.gid) == (os.getuid(), os.getgid())
        assert await store.readdir(ROOT_INODE, 0, 10) == []
        assert await store.lookup(ROOT_INODE, b".") == root
        assert await store.lookup(ROOT_INODE, b"..") == root

    run_with_store(harness, body)


def test_getattr_of_missing_inode_is_not_found(harness):
    async def body(store: MetadataStore) -> None:
        with pytest.raises(NotFound):
            await store.getattr(12345)

    run_with_store(harness, body)


def test_create_file(harness):
    async def body(store: MetadataStore) -> None:
        t = now()
        change = await store.create(ROOT_INODE, b"file", FILE, 1000, 1001, t)
        attrs = change.attrs
        assert attrs == InodeAttrs(attrs.inode, FILE, 1, 1000, 1001, 0, 0, 0, t, t, t, b"")
        assert attrs.inode != ROOT_INODE
        assert await store.getattr(attrs.inode) == attrs
        assert await store.lookup(ROOT_INODE, b"file") == attrs
        root = await store.getattr(ROOT_INODE)
        assert (root.mtime_ns, root.ctime_ns, root.nlink) == (t, t, 2)
        assert change.parent == root
        assert await list_all(store, ROOT_INODE) == [DirEntry(b"file", attrs, change.offset)]

    run_with_store(harness, body)


def test_create_every_kind(harness):
    async def body(store: MetadataStore) -> None:
        directory = await mkdir(store, ROOT_INODE, b"dir")
        assert directory.nlink == 2 and stat.S_ISDIR(directory.mode)
        assert (await store.getattr(ROOT_INODE)).nlink == 3
        link = (await store.create(directory.inode, b"link", SYMLINK, 0, 0, now(), target=b"../somewhere")).attrs
        assert (link.target, link.size, link.nlink) == (b"../somewhere", 12, 1)
        assert (await store.getattr(link.inode)).target == b"../somewhere"
        device = (await store.create(directory.inode, b"dev", stat.S_IFCHR | 0o600, 0, 0, now(), rdev=0x0501)).attrs
        assert device.rdev == 0x0501 and stat.S_ISCHR(device.mode)
        fifo = (await store.create(directory.inode, b"fifo", stat.S_IFIFO | 0o600, 0, 0, now())).attrs
        assert stat.S_ISFIFO((await store.getattr(fifo.inode)).mode)
        assert await names_in(store, directory.inode) == {b"link", b"dev", b"fifo"}
        assert (await store.getattr(directory.inode)).nlink == 2
        await check_nlinks(store)

    run_with_store(harness, body)


def test_a_new_file_or_directory_inherits_the_replica_count(harness):
    """In the create call itself, and only REPLICAS_XATTR, and only for regular
    files and directories."""

    async def body(store: MetadataStore) -> None:
        plain = await mkdir(store, ROOT_INODE, b"plain")
        three = await mkdir(store, ROOT_INODE, b"three")
        await store.setxattr(three.inode, REPLICAS_XATTR, b"3", 0, now())
        await store.setxattr(three.inode, b"user.other", b"not inherited", 0, now())
        for kind in (FILE, DIRECTORY):
            change = await store.create(plain.inode, b"%o" % kind, kind, 0, 0, now())
            assert change.xattrs == {}
            assert await store.listxattr(change.attrs.inode) == []
            change = await store.create(three.inode, b"%o" % kind, kind, 0, 0, now())
            assert change.xattrs == {REPLICAS_XATTR: b"3"}
            assert await store.listxattr(change.attrs.inode) == [REPLICAS_XATTR]
            assert await store.getxattr(change.attrs.inode, REPLICAS_XATTR) == b"3"
        subdirectory = await store.lookup(three.inode, b"%o" % DIRECTORY)
        assert (await store.create(subdirectory.inode, b"deeper", FILE, 0, 0, now())).xattrs == {REPLICAS_XATTR: b"3"}
        others = {
            b"link": dict(mode=SYMLINK, target=b"x"),
            b"fifo": dict(mode=stat.S_IFIFO | 0o600),
            b"device": dict(mode=stat.S_IFCHR | 0o600, rdev=0x0501),
        }
        for name, arguments in others.items():
            mode = arguments.pop("mode")
            change = await store.create(three.inode, name, mode, 0, 0, now(), **arguments)
            assert change.xattrs == {}
            assert await store.listxattr(change.attrs.inode) == []
        with pytest.raises(Exists):  # a refused create gives nothing to anybody
            await store.create(three.inode, b"link", FILE, 0, 0, now())
        assert await store.listxattr((await store.lookup(three.inode, b"link")).inode) == []

    run_with_store(harness, body)


def test_inode_numbers_are_not_reused(harness):
    async def body(store: MetadataStore) -> None:
        first = await mkfile(store, ROOT_INODE, b"a")
        await store.unlink(ROOT_INODE, b"a", now())
        await store.delete_inodes([first.inode])
        second = await mkfile(store, ROOT_INODE, b"a")
        assert second.inode != first.inode

    run_with_store(harness, body)


def test_create_errors(harness):
    async def body(store: MetadataStore) -> None:
        file = await mkfile(store, ROOT_INODE, b"file")
        with pytest.raises(Exists):
            await mkfile(store, ROOT_INODE, b"file")
        with pytest.raises(Exists):
            await mkdir(store, ROOT_INODE, b"file")
        with pytest.raises(NotFound):
            await mkfile(store, 9999, b"x")
        with pytest.raises(NotADirectory):
            await mkfile(store, file.inode, b"x")
        for bad_name in (b"", b".", b"..", b"a/b", b"a\0b"):
            with pytest.raises(InvalidArgument):
                await mkfile(store, ROOT_INODE, bad_name)
        with pytest.raises(NameTooLong):
            await mkfile(store, ROOT_INODE, b"n" * 256)
        await mkfile(store, ROOT_INODE, b"n" * 255)
        assert await names_in(store, ROOT_INODE) == {b"file", b"n" * 255}

    run_with_store(harness, body)


def test_check_name_is_the_rule_the_engine_keeps(harness):
    """The POSIX layer checks names with check_name before it asks; the engine
    refuses exactly those names with the same errors."""

    async def body(store: MetadataStore) -> None:
        for bad_name in (b"", b".", b"..", b"a/b", b"a\0b", b"n" * (NAME_MAX + 1)):
            with pytest.raises((InvalidArgument, NameTooLong)) as by_check:
                check_name(bad_name)
            with pytest.raises(type(by_check.value)):
                await mkfile(store, ROOT_INODE, bad_name)
        for good_name in (b"n" * NAME_MAX, b"...", b".hidden", "caf\u00e9".encode()):
            check_name(good_name)
            await mkfile(store, ROOT_INODE, good_name)

    run_with_store(harness, body)


def test_lookup(harness):
    async def body(store: MetadataStore) -> None:
        a = await mkdir(store, ROOT_INODE, b"a")
        b = await mkdir(store, a.inode, b"b")
        file = await mkfile(store, b.inode, b"file")
        assert (await store.lookup(b.inode, b"file")).inode == file.inode
        assert (await store.lookup(b.inode, b"..")).inode == a.inode
        assert (await store.lookup(b.inode, b".")).inode == b.inode
        assert (await store.lookup(a.inode, b"..")).inode == ROOT_INODE
        with pytest.raises(NotFound):
            await store.lookup(b.inode, b"missing")
        with pytest.raises(NotFound):
            await store.lookup(b.inode, b"missing")  # twice: a remembered absence is still NotFound
        with pytest.raises(NotADirectory):
            await store.lookup(file.inode, b"x")
        with pytest.raises(NotFound):
            await store.lookup(9999, b"x")

    run_with_store(harness, body)


def test_a_new_entry_comes_last_in_its_listing(harness):
    async def body(store: MetadataStore) -> None:
        directory = await mkdir(store, ROOT_INODE, b"d")
        elsewhere = await mkfile(store, ROOT_INODE, b"elsewhere")
        offsets = [(await store.create(directory.inode, name, FILE, 0, 0, now())).offset for name in (b"a", b"b")]
        await store.unlink(directory.inode, b"b", now())  # the last one goes; its offset is not reused
        offsets.append((await store.link(elsewhere.inode, directory.inode, b"linked", now())).offset)
        offsets.append((await store.create(directory.inode, b"b", FILE, 0, 0, now())).offset)
        assert offsets == sorted(set(offsets))
        listed = [entry.offset for entry in await list_all(store, directory.inode)]
        assert listed == [offsets[0], offsets[2], offsets[3]]

    run_with_store(harness, body)


def test_names_are_bytes_not_text(harness):
    async def body(store: MetadataStore) -> None:
        name = "caf\u00e9".encode() + b"\xff"
        attrs = await mkfile(store, ROOT_INODE, name)
        assert (await store.lookup(ROOT_INODE, name)).inode == attrs.inode
        assert [entry.name for entry in await list_all(store, ROOT_INODE)] == [name]

    run_with_store(harness, body)


def test_hard_links(harness):
    async def body(store: MetadataStore) -> None:
        a = await mkdir(store, ROOT_INODE, b"a")
        file = await mkfile(store, ROOT_INODE, b"file")
        t = now()
        change = await store.link(file.inode, a.inode, b"again", t)
        linked = change.attrs
        assert (linked.inode, linked.nlink, linked.ctime_ns) == (file.inode, 2, t)
        assert (await store.lookup(a.inode, b"again")) == linked
        assert (await store.getattr(file.inode)) == linked
        parent = await store.getattr(a.inode)
        assert (parent.mtime_ns, parent.ctime_ns) == (t, t)
        assert change.parent == parent
        assert await list_all(store, a.inode) == [DirEntry(b"again", linked, change.offset)]
        with pytest.raises(Exists):
            await store.link(file.inode, a.inode, b"again", now())
        with pytest.raises(NotPermitted):
            await store.link(a.inode, ROOT_INODE, b"dirlink", now())
        with pytest.raises(NotFound):
            await store.link(9999, ROOT_INODE, b"x", now())
        with pytest.raises(NotADirectory):
            await store.link(file.inode, file.inode, b"x", now())
        await check_nlinks(store)
        assert (await store.unlink(ROOT_INODE, b"file", now())).attrs.nlink == 1
        assert (await store.lookup(a.inode, b"again")).nlink == 1
        assert (await store.unlink(a.inode, b"again", now())).attrs.nlink == 0
        with pytest.raises(NotFound):  # as linkat(2): no new name for an inode with none left
            await store.link(file.inode, ROOT_INODE, b"back", now())
        await check_nlinks(store)

    run_with_store(harness, body)


def test_unlink(harness):
    async def body(store: MetadataStore) -> None:
        a = await mkdir(store, ROOT_INODE, b"a")
        file = await mkfile(store, a.inode, b"file")
        [listed] = await list_all(store, a.inode)
        t = now()
        change = await store.unlink(a.inode, b"file", t)
        after = change.attrs
        assert (after.inode, after.nlink, after.ctime_ns) == (file.inode, 0, t)
        parent = await store.getattr(a.inode)
        assert (parent.mtime_ns, parent.ctime_ns, parent.nlink) == (t, t, 2)
        assert (change.parent, change.offset) == (parent, listed.offset)
        with pytest.raises(NotFound):
            await store.lookup(a.inode, b"file")
        assert await store.getattr(file.inode) == after  # still there while open
        assert await store.orphan_inodes() == [file.inode]
        assert await list_all(store, a.inode) == []
        with pytest.raises(NotFound):
            await store.unlink(a.inode, b"file", now())
        with pytest.raises(IsADirectory):
            await store.unlink(ROOT_INODE, b"a", now())
        other = await mkfile(store, ROOT_INODE, b"other")
        with pytest.raises(NotADirectory):
            await store.unlink(other.inode, b"x", now())
        with pytest.raises(NotFound):
            await store.unlink(9999, b"x", now())

    run_with_store(harness, body)


def test_rmdir(harness):
    async def body(store: MetadataStore) -> None:
        a = await mkdir(store, ROOT_INODE, b"a")
        b = await mkdir(store, a.inode, b"b")
        await mkfile(store, b.inode, b"file")
        assert (await store.getattr(a.inode)).nlink == 3
        with pytest.raises(NotEmpty):
            await store.rmdir(a.inode, b"b", now())
        with pytest.raises(NotADirectory):
            await store.rmdir(b.inode, b"file", now())
        with pytest.raises(NotFound):
            await store.rmdir(a.inode, b"missing", now())
        await store.unlink(b.inode, b"file", now())
        assert (await store.lookup(b.inode, b"..")).inode == a.inode
        [listed] = await list_all(store, a.inode)
        t = now()
        change = await store.rmdir(a.inode, b"b", t)
        removed = change.attrs
        assert (removed.inode, removed.nlink, removed.ctime_ns) == (b.inode, 0, t)
        parent = await store.getattr(a.inode)
        assert (parent.nlink, parent.mtime_ns, parent.ctime_ns) == (2, t, t)
        assert (change.parent, change.offset) == (parent, listed.offset)
        with pytest.raises(NotFound):
            await store.lookup(a.inode, b"b")
        # The removed directory may still be open: it lists as empty, takes no new names.
        assert await store.readdir(b.inode, 0, 10) == []
        for name in (b"file", b".."):
            with pytest.raises(NotFound):
                await store.lookup(b.inode, name)
        with pytest.raises(NotFound):
            await mkfile(store, b.inode, b"new")
        assert b.inode in await store.orphan_inodes()
        await store.delete_inodes([b.inode])
        with pytest.raises(NotFound):
            await store.getattr(b.inode)
        await check_nlinks(store)

    run_with_store(harness, body)


def test_setattr(harness):
    async def body(store: MetadataStore) -> None:
        file = await mkfile(store, ROOT_INODE, b"file")
        t = now()
        changes = AttrChanges(mode=0o4751, uid=7, gid=8, atime_ns=11, mtime_ns=12)
        changed = await store.setattr(file.inode, changes, t)
        assert changed == InodeAttrs(file.inode, stat.S_IFREG | 0o4751, 1, 7, 8, 0, 0, 0, 11, 12, t, b"")
        assert await store.getattr(file.inode) == changed
        t = now()
        # The file type cannot change; bits outside 0o7777 are ignored.
        same = await store.setattr(file.inode, AttrChanges(mode=stat.S_IFDIR | 0o600), t)
        assert same.mode == stat.S_IFREG | 0o600 and same.ctime_ns == t and same.uid == 7
        assert (await store.lookup(ROOT_INODE, b"file")) == same
        assert [entry.attrs for entry in await list_all(store, ROOT_INODE)] == [same]
        with pytest.raises(NotFound):
            await store.setattr(9999, AttrChanges(uid=1), now())

    run_with_store(harness, body)


# -- rename ---------------------------------------------------------------------


def test_rename_a_file_within_and_across_directories(harness):
    async def body(store: MetadataStore) -> None:
        a = await mkdir(store, ROOT_INODE, b"a")
        b = await mkdir(store, ROOT_INODE, b"b")
        file = await mkfile(store, a.inode, b"one")
        [before] = await list_all(store, a.inode)
        t = now()
        change = await store.rename(a.inode, b"one", a.inode, b"two", 0, t)
        assert await names_in(store, a.inode) == {b"two"}
        moved = await store.lookup(a.inode, b"two")
        assert (moved.inode, moved.ctime_ns) == (file.inode, t)
        assert (await store.getattr(a.inode)).mtime_ns == t
        assert change == RenameChange(moved, None, None, (await store.getattr(a.inode),), before.offset)
        t = now()
        change = await store.rename(a.inode, b"two", b.inode, b"three", 0, t)
        assert await names_in(store, a.inode) == set()
        assert (await store.lookup(b.inode, b"three")).inode == file.inode
        assert (await store.getattr(file.inode)).ctime_ns == t
        for directory in (a, b):
            attrs = await store.getattr(directory.inode)
            assert (attrs.mtime_ns, attrs.ctime_ns) == (t, t)
        parents = (await store.getattr(a.inode), await store.getattr(b.inode))
        moved = await store.getattr(file.inode)
        assert change == RenameChange(moved, None, None, parents, before.offset)  # the entry keeps its offset
        assert await list_all(store, b.inode) == [DirEntry(b"three", moved, before.offset)]
        with pytest.raises(NotFound):
            await store.lookup(a.inode, b"two")
        await check_nlinks(store)

    run_with_store(harness, body)


def test_rename_a_directory_moves_its_parent_link(harness):
    async def body(store: MetadataStore) -> None:
        a = await mkdir(store, ROOT_INODE, b"a")
        b = await mkdir(store, ROOT_INODE, b"b")
        sub = await mkdir(store, a.inode, b"sub")
        await mkfile(store, sub.inode, b"inside")
        assert (await store.lookup(sub.inode, b"..")).inode == a.inode
        change = await store.rename(a.inode, b"sub", b.inode, b"moved", 0, now())
        assert (await store.getattr(a.inode)).nlink == 2
        assert (await store.getattr(b.inode)).nlink == 3
        assert change is not None
        assert change.parents == (await store.getattr(a.inode), await store.getattr(b.inode))
        assert change.moved == await store.getattr(sub.inode)
        assert (await store.lookup(sub.inode, b"..")).inode == b.inode
        assert await names_in(store, sub.inode) == {b"inside"}
        await check_nlinks(store)

    run_with_store(harness, body)


def test_rename_replaces_a_file(harness):
    async def body(store: MetadataStore) -> None:
        source = await mkfile(store, ROOT_INODE, b"source")
        victim = await mkfile(store, ROOT_INODE, b"victim")
        source_offset = (await list_all(store, ROOT_INODE))[0].offset
        t = now()
        change = await store.rename(ROOT_INODE, b"source", ROOT_INODE, b"victim", 0, t)
        assert change is not None and change.replaced is not None and change.exchanged is None
        replaced = change.replaced
        assert (replaced.inode, replaced.nlink, replaced.ctime_ns) == (victim.inode, 0, t)
        assert await store.getattr(victim.inode) == replaced
        assert (await store.lookup(ROOT_INODE, b"victim")).inode == source.inode
        assert await list_all(store, ROOT_INODE) == [DirEntry(b"victim", change.moved, source_offset)]
        assert change.offset == source_offset
        assert change.parents == (await store.getattr(ROOT_INODE),)
        assert await store.orphan_inodes() == [victim.inode]
        # A victim with another name keeps it.
        linked = await mkfile(store, ROOT_INODE, b"linked")
        await store.link(linked.inode, ROOT_INODE, b"other-name", now())
        change = await store.rename(ROOT_INODE, b"victim", ROOT_INODE, b"linked", 0, now())
        assert change is not None and change.replaced is not None
        assert (change.replaced.inode, change.replaced.nlink) == (linked.inode, 1)
        await check_nlinks(store)

    run_with_store(harness, body)


# -- the trash ------------------------------------------------------------------


async def trash_listing(store: MetadataStore) -> dict[bytes, list[bytes]]:
    """Hour directory name -> the names in it."""
    trash = await store.lookup(ROOT_INODE, TRASH_NAME)
    return {hour.name: [entry.name for entry in await list_all(store, hour.attrs.inode)]
            for hour in await list_all(store, trash.inode)}


def test_unlink_with_the_trash_moves_the_last_name_into_it(harness):
    async def body(store: MetadataStore) -> None:
        with pytest.raises(NotFound):
            await store.lookup(ROOT_INODE, TRASH_NAME)  # made by the first deletion
        a = await mkdir(store, ROOT_INODE, b"a")
        file = await mkfile(store, a.inode, b"file")
        t = now()
        change = await store.unlink(a.inode, b"file", t, trash_days=1)
        assert change.trash is not None
        assert (change.attrs.inode, change.attrs.nlink, change.attrs.in_trash) == (file.inode, 1, True)
        with pytest.raises(NotFound):
            await store.lookup(a.inode, b"file")
        name = entry_name(b"/a/file", file.inode)
        assert name == b"a\xe2\x88\x95file~%d" % file.inode
        assert await trash_listing(store) == {hour_name(t + DAY_NS): [name]}
        assert TRASH_NAME not in await names_in(store, ROOT_INODE)
        trash = await store.lookup(ROOT_INODE, TRASH_NAME)
        assert trash.in_trash and (await store.lookup(trash.inode, b"..")).inode == ROOT_INODE
        assert await store.getxattr(file.inode, TRASH_PATH_XATTR) == b"/a/file"
        assert await store.getxattr(file.inode, TRASH_DELETED_XATTR) == b"%d" % t
        assert await store.getxattr(file.inode, TRASH_EXPIRES_XATTR) == b"%d" % (t + DAY_NS)
        assert await store.orphan_inodes() == []
        hour = await store.lookup(trash.inode, hour_name(t + DAY_NS))
        assert await store.trash_entries() == [
            TrashEntry(hour.inode, hour_name(t + DAY_NS), name, file.inode, 0, 0, b"/a/file", t, t + DAY_NS)
        ]
        await check_nlinks(store)

        # Not its last name, or no trash: removed as ever.
        linked = await mkfile(store, a.inode, b"linked")
        await store.link(linked.inode, ROOT_INODE, b"other", now())
        assert (await store.unlink(a.inode, b"linked", now(), trash_days=1)).trash is None
        plain = await mkfile(store, a.inode, b"plain")
        change = await store.unlink(a.inode, b"plain", now(), trash_days=0)
        assert (change.trash, change.attrs.nlink) == (None, 0)
        assert await store.orphan_inodes() == [plain.inode]
        await check_nlinks(store)

    run_with_store(harness, body)


def test_a_directory_trash_days_wins_over_the_configured_one(harness):
    async def body(store: MetadataStore) -> None:
        off = await mkdir(store, ROOT_INODE, b"off")
        await store.setxattr(off.inode, TRASH_DAYS_XATTR, b"0", 0, now())
        below = await mkdir(store, off.inode, b"below")
        gone = await mkfile(store, below.inode, b"gone")
        assert (await store.unlink(below.inode, b"gone", now(), trash_days=1)).attrs.nlink == 0
        kept = await mkdir(store, ROOT_INODE, b"kept")
        await store.setxattr(kept.inode, TRASH_DAYS_XATTR, b"2.5", 0, now())
        file = await mkfile(store, kept.inode, b"file")
        t = now()
        change = await store.unlink(kept.inode, b"file", t, trash_days=0)
        assert change.attrs.nlink == 1
        expires = t + int(2.5 * DAY_NS)
        assert await store.getxattr(file.inode, TRASH_EXPIRES_XATTR) == b"%d" % expires
        assert await trash_listing(store) == {hour_name(expires): [entry_name(b"/kept/file", file.inode)]}
        assert await store.orphan_inodes() == [gone.inode]

    run_with_store(harness, body)


def test_the_trash_is_read_only(harness):
    async def body(store: MetadataStore) -> None:
        file = await mkfile(store, ROOT_INODE, b"file")
        await store.unlink(ROOT_INODE, b"file", now(), trash_days=1)
        trash = await store.lookup(ROOT_INODE, TRASH_NAME)
        [hour] = await list_all(store, trash.inode)
        [entry] = await list_all(store, hour.attrs.inode)
        for directory in (trash.inode, hour.attrs.inode):
            with pytest.raises(NotPermitted):
                await store.create(directory, b"new", FILE, 0, 0, now())
            with pytest.raises(NotPermitted):
                await mkdir(store, directory, b"newdir")
        other = await mkfile(store, ROOT_INODE, b"other")
        with pytest.raises(NotPermitted):
            await store.link(other.inode, hour.attrs.inode, b"link", now())
        with pytest.raises(NotPermitted):
            await store.link(file.inode, ROOT_INODE, b"second-name", now())
        with pytest.raises(NotPermitted):
            await store.rename(ROOT_INODE, b"other", hour.attrs.inode, b"moved-in", 0, now())
        with pytest.raises(NotPermitted):
            await store.unlink(hour.attrs.inode, entry.name, now(), trash_days=1)
        with pytest.raises(NotPermitted):
            await store.rmdir(trash.inode, hour.name, now())
        with pytest.raises(NotPermitted):
            await store.rename(trash.inode, hour.name, ROOT_INODE, b"hour", 0, now())  # only files come out
        with pytest.raises(NotPermitted):
            await store.rename(hour.attrs.inode, entry.name, ROOT_INODE, b"other", RENAME_EXCHANGE, now())
        for make in (lambda: mkfile(store, ROOT_INODE, TRASH_NAME), lambda: mkdir(store, ROOT_INODE, TRASH_NAME),
                     lambda: store.link(other.inode, ROOT_INODE, TRASH_NAME, now()),
                     lambda: store.rename(ROOT_INODE, b"other", ROOT_INODE, TRASH_NAME, 0, now())):
            with pytest.raises(Exists):
                await make()
        assert [e.name for e in await list_all(store, hour.attrs.inode)] == [entry.name]
        await check_nlinks(store)

    run_with_store(harness, body)


def test_rename_over_a_file_puts_the_old_one_in_the_trash(harness):
    async def body(store: MetadataStore) -> None:
        source = await mkfile(store, ROOT_INODE, b"new")
        victim = await mkfile(store, ROOT_INODE, b"old")
        change = await store.rename(ROOT_INODE, b"new", ROOT_INODE, b"old", 0, now(), trash_days=1)
        assert change is not None and change.replaced is not None and change.trash is not None
        assert (change.replaced.inode, change.replaced.nlink, change.replaced.in_trash) == (victim.inode, 1, True)
        assert (await store.lookup(ROOT_INODE, b"old")).inode == source.inode
        assert list((await trash_listing(store)).values()) == [[entry_name(b"/old", victim.inode)]]
        assert await store.orphan_inodes() == []
        await check_nlinks(store)

    run_with_store(harness, body)


def test_moving_a_file_out_of_the_trash_restores_it(harness):
    async def body(store: MetadataStore) -> None:
        d = await mkdir(store, ROOT_INODE, b"d")
        file = await mkfile(store, d.inode, b"file")
        await store.unlink(d.inode, b"file", now(), trash_days=1)
        [entry] = await store.trash_entries()
        change = await store.rename(entry.hour_dir, entry.name, ROOT_INODE, b"back", 0, now(), trash_days=1)
        assert change is not None and change.trash is not None
        assert (change.moved.inode, change.moved.nlink, change.moved.in_trash) == (file.inode, 1, False)
        assert await store.listxattr(file.inode) == []
        assert await store.trash_entries() == []
        assert (await store.lookup(ROOT_INODE, b"back")).inode == file.inode
        await check_nlinks(store)
        # Restored over a file: that one goes into the trash in its place.
        await store.unlink(ROOT_INODE, b"back", now(), trash_days=1)
        [entry] = await store.trash_entries()
        other = await mkfile(store, ROOT_INODE, b"other")
        change = await store.rename(entry.hour_dir, entry.name, ROOT_INODE, b"other", 0, now(), trash_days=1)
        assert change is not None and change.trash is not None and change.replaced is not None
        assert {file.inode, other.inode, entry.hour_dir} <= change.trash.inodes
        assert [e.inode for e in await store.trash_entries()] == [other.inode]
        assert await store.getxattr(other.inode, TRASH_PATH_XATTR) == b"/other"
        assert await store.listxattr(file.inode) == []
        assert (await store.lookup(ROOT_INODE, b"other")).inode == file.inode
        await check_nlinks(store)
        [entry] = await store.trash_entries()
        await store.rename(entry.hour_dir, entry.name, ROOT_INODE, b"back", 0, now())
        # The hour directory left empty goes with the next purge.
        purge = await store.purge_trash([])
        assert [attrs.inode for attrs in purge.unlinked] == [entry.hour_dir]
        assert await trash_listing(store) == {}
        await check_nlinks(store)

    run_with_store(harness, body)


def test_purge_trash_removes_files_for_good(harness):
    async def body(store: MetadataStore) -> None:
        first = await mkfile(store, ROOT_INODE, b"first")
        second = await mkfile(store, ROOT_INODE, b"second")
        await store.commit_shards(first.inode, {0: ref((await store.allocate_shard_ids(1)).start, 1234)}, 1234)
        for name in (b"first", b"second"):
            await store.unlink(ROOT_INODE, name, now(), trash_days=1)
        entries = await store.trash_entries()
        assert [(entry.inode, entry.size, entry.stored_bytes) for entry in entries] == [
            (first.inode, 1234, 1234), (second.inode, 0, 0)]
        assert await store.trash_entries(expiring_before_ns=now()) == []  # they expire tomorrow
        purge = await store.purge_trash([(entries[0].hour_dir, entries[0].name), (entries[0].hour_dir, b"gone")])
        assert [(attrs.inode, attrs.nlink) for attrs in purge.unlinked] == [(first.inode, 0)]
        assert await store.orphan_inodes() == [first.inode]
        assert [entry.inode for entry in await store.trash_entries()] == [second.inode]
        purge = await store.purge_trash([(entries[1].hour_dir, entries[1].name)])
        assert [(attrs.inode, attrs.nlink) for attrs in purge.unlinked] == [(second.inode, 0), (entries[1].hour_dir, 0)]
        assert await trash_listing(store) == {}
        await store.delete_inodes(await store.orphan_inodes())
        assert await store.orphan_inodes() == []
        await check_nlinks(store)

    run_with_store(harness, body)


def test_rename_replaces_an_empty_directory(harness):
    async def body(store: MetadataStore) -> None:
        a = await mkdir(store, ROOT_INODE, b"a")
        b = await mkdir(store, ROOT_INODE, b"b")
        moving = await mkdir(store, a.inode, b"moving")
        victim = await mkdir(store, b.inode, b"victim")
        change = await store.rename(a.inode, b"moving", b.inode, b"victim", 0, now())
        assert change is not None and change.replaced is not None
        assert (change.replaced.inode, change.replaced.nlink) == (victim.inode, 0)
        assert change.parents == (await store.getattr(a.inode), await store.getattr(b.inode))
        assert (await store.lookup(b.inode, b"victim")).inode == moving.inode
        assert (await store.getattr(a.inode)).nlink == 2
        assert (await store.getattr(b.inode)).nlink == 3
        # The same within one directory.
        other = await mkdir(store, b.inode, b"other")
        change = await store.rename(b.inode, b"victim", b.inode, b"other", 0, now())
        assert change is not None and change.replaced is not None and change.replaced.inode == other.inode
        assert (await store.getattr(b.inode)).nlink == 3
        await check_nlinks(store)

    run_with_store(harness, body)


def test_rename_type_and_emptiness_errors(harness):
    async def body(store: MetadataStore) -> None:
        directory = await mkdir(store, ROOT_INODE, b"dir")
        full = await mkdir(store, ROOT_INODE, b"full")
        content = await mkfile(store, full.inode, b"content")
        await mkfile(store, ROOT_INODE, b"file")
        with pytest.raises(NotEmpty):
            await store.rename(ROOT_INODE, b"dir", ROOT_INODE, b"full", 0, now())
        with pytest.raises(NotADirectory):
            await store.rename(ROOT_INODE, b"dir", ROOT_INODE, b"file", 0, now())
        with pytest.raises(IsADirectory):
            await store.rename(ROOT_INODE, b"file", ROOT_INODE, b"dir", 0, now())
        with pytest.raises(NotFound):
            await store.rename(ROOT_INODE, b"missing", ROOT_INODE, b"x", 0, now())
        with pytest.raises(NotFound):
            await store.rename(ROOT_INODE, b"file", 9999, b"x", 0, now())
        with pytest.raises(NotADirectory):
            await store.rename(ROOT_INODE, b"dir", content.inode, b"x", 0, now())
        with pytest.raises(InvalidArgument):
            await store.rename(ROOT_INODE, b"file", ROOT_INODE, b"x", RENAME_NOREPLACE | RENAME_EXCHANGE, now())
        with pytest.raises(InvalidArgument):
            await store.rename(ROOT_INODE, b"file", ROOT_INODE, b"bad/name", 0, now())
        assert await names_in(store, ROOT_INODE) == {b"dir", b"full", b"file"}
        assert await names_in(store, directory.inode) == set()
        await check_nlinks(store)

    run_with_store(harness, body)


def test_rename_into_own_subtree_is_invalid(harness):
    async def body(store: MetadataStore) -> None:
        a = await mkdir(store, ROOT_INODE, b"a")
        b = await mkdir(store, a.inode, b"b")
        c = await mkdir(store, b.inode, b"c")
        with pytest.raises(InvalidArgument):
            await store.rename(ROOT_INODE, b"a", c.inode, b"a", 0, now())
        with pytest.raises(InvalidArgument):
            await store.rename(ROOT_INODE, b"a", a.inode, b"self", 0, now())
        await mkfile(store, c.inode, b"x")
        with pytest.raises(InvalidArgument):  # exchange would put "a" below itself
            await store.rename(c.inode, b"x", ROOT_INODE, b"a", RENAME_EXCHANGE, now())
        # Moving up out of its own parent is fine.
        await store.rename(b.inode, b"c", ROOT_INODE, b"c", 0, now())
        assert (await store.lookup(c.inode, b"..")).inode == ROOT_INODE
        await check_nlinks(store)

    run_with_store(harness, body)


def test_rename_onto_the_same_inode_does_nothing(harness):
    async def body(store: MetadataStore) -> None:
        file = await mkfile(store, ROOT_INODE, b"one")
        await store.link(file.inode, ROOT_INODE, b"two", now())
        before = await store.getattr(file.inode)
        assert await store.rename(ROOT_INODE, b"one", ROOT_INODE, b"one", 0, now()) is None
        assert await store.rename(ROOT_INODE, b"one", ROOT_INODE, b"two", 0, now()) is None
        assert await names_in(store, ROOT_INODE) == {b"one", b"two"}
        assert await store.getattr(file.inode) == before
        await check_nlinks(store)

    run_with_store(harness, body)


def test_rename_noreplace(harness):
    async def body(store: MetadataStore) -> None:
        await mkfile(store, ROOT_INODE, b"one")
        await mkfile(store, ROOT_INODE, b"two")
        with pytest.raises(Exists):
            await store.rename(ROOT_INODE, b"one", ROOT_INODE, b"two", RENAME_NOREPLACE, now())
        change = await store.rename(ROOT_INODE, b"one", ROOT_INODE, b"three", RENAME_NOREPLACE, now())
        assert change is not None and change.replaced is None
        assert await names_in(store, ROOT_INODE) == {b"two", b"three"}

    run_with_store(harness, body)


def test_rename_exchange(harness):
    async def body(store: MetadataStore) -> None:
        a = await mkdir(store, ROOT_INODE, b"a")
        b = await mkdir(store, ROOT_INODE, b"b")
        file = await mkfile(store, a.inode, b"file")
        directory = await mkdir(store, b.inode, b"dir")
        await mkfile(store, directory.inode, b"inside")
        await check_nlinks(store)  # reads everything, so a cache holds it all
        [file_entry], [directory_entry] = await list_all(store, a.inode), await list_all(store, b.inode)
        t = now()
        change = await store.rename(a.inode, b"file", b.inode, b"dir", RENAME_EXCHANGE, t)
        for inode in (file.inode, directory.inode):
            assert (await store.getattr(inode)).ctime_ns == t
        assert change == RenameChange(
            moved=await store.getattr(file.inode),
            exchanged=await store.getattr(directory.inode),
            replaced=None,
            parents=(await store.getattr(a.inode), await store.getattr(b.inode)),
            offset=directory_entry.offset,
        )
        # Both entries keep their offsets; the inodes they name swap.
        assert await list_all(store, a.inode) == [DirEntry(b"file", change.exchanged, file_entry.offset)]
        assert await list_all(store, b.inode) == [DirEntry(b"dir", change.moved, directory_entry.offset)]
        assert (await store.lookup(a.inode, b"file")).inode == directory.inode
        assert (await store.lookup(b.inode, b"dir")).inode == file.inode
        assert (await store.lookup(directory.inode, b"..")).inode == a.inode
        assert (await store.getattr(a.inode)).nlink == 3
        assert (await store.getattr(b.inode)).nlink == 2
        await check_nlinks(store)
        # Two files in one directory.
        await mkfile(store, ROOT_INODE, b"x")
        await mkfile(store, ROOT_INODE, b"y")
        x, y = await store.lookup(ROOT_INODE, b"x"), await store.lookup(ROOT_INODE, b"y")
        await store.rename(ROOT_INODE, b"x", ROOT_INODE, b"y", RENAME_EXCHANGE, now())
        assert (await store.lookup(ROOT_INODE, b"x")).inode == y.inode
        assert (await store.lookup(ROOT_INODE, b"y")).inode == x.inode
        with pytest.raises(NotFound):
            await store.rename(ROOT_INODE, b"x", ROOT_INODE, b"absent", RENAME_EXCHANGE, now())
        await check_nlinks(store)

    run_with_store(harness, body)


# -- readdir ---------------------------------------------------------------------


def test_readdir_pages_resume_at_any_offset(harness):
    names = [b"entry-%04d" % i for i in range(1200)]

    async def body(store: MetadataStore) -> None:
        directory = await mkdir(store, ROOT_INODE, b"big")
        await mkfile(store, ROOT_INODE, b"elsewhere")
        for name in names:
            await mkfile(store, directory.inode, name)
        full = await list_all(store, directory.inode, limit=1000)
        assert sorted(entry.name for entry in full) == names
        offsets = [entry.offset for entry in full]
        assert offsets == sorted(set(offsets)) and offsets[0] > 0
        for limit in (1, 7, 1200, 5000):
            assert await list_all(store, directory.inode, limit) == full
        rng = random.Random(1)
        for position in rng.sample(range(len(full)), 30):
            page = await store.readdir(directory.inode, full[position].offset, 5)
            assert page == full[position + 1 : position + 6]
        for entry in rng.sample(full, 10):
            assert entry.attrs == await store.getattr(entry.attrs.inode)
        assert await store.readdir(directory.inode, full[-1].offset, 10) == []
        assert await store.readdir(directory.inode, 0, 0) == []

    run_with_store(harness, body)


def test_readdir_while_entries_come_and_go(harness):
    names = [b"f%04d" % i for i in range(1200)]

    async def body(store: MetadataStore) -> None:
        directory = await mkdir(store, ROOT_INODE, b"d")
        for name in names:
            await mkfile(store, directory.inode, name)
        await list_all(store, directory.inode)  # a complete listing first, for caches
        seen: list[bytes] = []
        after = 0
        for _ in range(3):
            page = await store.readdir(directory.inode, after, 100)
            seen += [entry.name for entry in page]
            after = page[-1].offset
        rng = random.Random(2)
        removed = set(rng.sample(names, 400))  # some listed already, most not yet
        for name in removed:
            await store.unlink(directory.inode, name, now())
        added = {b"new-%03d" % i for i in range(50)}
        for name in added:
            await mkfile(store, directory.inode, name)
        while page := await store.readdir(directory.inode, after, 100):
            seen += [entry.name for entry in page]
            after = page[-1].offset
        assert len(seen) == len(set(seen)), "an entry was listed twice"
        kept = set(names) - removed
        assert kept <= set(seen), "an entry that stayed was skipped"
        assert set(seen) <= set(names) | added
        assert await names_in(store, directory.inode) == kept | added

    run_with_store(harness, body)


def test_readdir_errors(harness):
    async def body(store: MetadataStore) -> None:
        file = await mkfile(store, ROOT_INODE, b"file")
        with pytest.raises(NotADirectory):
            await store.readdir(file.inode, 0, 10)
        with pytest.raises(NotFound):
            await store.readdir(9999, 0, 10)

    run_with_store(harness, body)


# -- shards and garbage --------------------------------------------------------------


def test_commit_shards_replaces_drops_and_collects(harness):
    async def body(store: MetadataStore) -> None:
        file = await mkfile(store, ROOT_INODE, b"file")
        assert await store.shard_map(file.inode) == {}
        first = await store.commit_shards(file.inode, {0: ref(1, 4096), 1: ref(2, 4096), 3: ref(3, 100)}, 12388)
        assert (first.size, first.blocks) == (12388, 17)  # ceil(8292 / 512): holes take no space
        assert await store.getattr(file.inode) == first
        assert await store.shard_map(file.inode) == {0: (ref(1, 4096),), 1: (ref(2, 4096),), 3: (ref(3, 100),)}
        assert await store.garbage(10) == []
        t = now()
        second = await store.commit_shards(file.inode, {1: ref(4, 10)}, 12388, mtime_ns=t, ctime_ns=t + 1)
        assert (second.mtime_ns, second.ctime_ns, second.blocks) == (t, t + 1, 9)
        assert await store.shard_map(file.inode) == {0: (ref(1, 4096),), 1: (ref(4, 10),), 3: (ref(3, 100),)}
        assert await store.garbage(10) == [(2, ("a", "b"))]
        # Truncate to one shard, then write a new second one.
        third = await store.commit_shards(file.inode, {1: ref(5, 50)}, 4146, drop_from=1)
        assert (third.size, third.blocks, third.mtime_ns) == (4146, 9, t)
        assert await store.shard_map(file.inode) == {0: (ref(1, 4096),), 1: (ref(5, 50),)}
        assert [shard_id for shard_id, _ in await store.garbage(10)] == [2, 3, 4]
        assert await store.garbage(2) == [(2, ("a", "b")), (3, ("a", "b"))]
        # Committing a shard again where it already is changes nothing.
        await store.commit_shards(file.inode, {1: ref(5, 50)}, 4146)
        assert [shard_id for shard_id, _ in await store.garbage(10)] == [2, 3, 4]
        empty = await store.commit_shards(file.inode, {}, 0, drop_from=0)
        assert (empty.size, empty.blocks) == (0, 0)
        assert await store.shard_map(file.inode) == {}
        assert [shard_id for shard_id, _ in await store.garbage(10)] == [1, 2, 3, 4, 5]
        await store.forget_garbage([2, 4, 99])
        assert [shard_id for shard_id, _ in await store.garbage(10)] == [1, 3, 5]

    run_with_store(harness, body)


def test_patches_stack_on_a_shard_until_a_whole_shard_replaces_them(harness):
    async def body(store: MetadataStore) -> None:
        file = await mkfile(store, ROOT_INODE, b"file")
        await store.commit_shards(file.inode, {0: ref(1, 8192), 1: ref(2, 100)}, 4096 * 10)
        await store.commit_shards(file.inode, {0: patch(3, (0, 5))}, 4096 * 10)
        await store.commit_shards(file.inode, {0: patch(4, (5, 6, 7))}, 4096 * 10)
        await store.commit_shards(file.inode, {2: patch(5, (9,))}, 4096 * 10 + 100)
        assert await store.shard_map(file.inode) == {
            0: (ref(1, 8192), patch(3, (0, 5)), patch(4, (5, 6, 7))),
            1: (ref(2, 100),),
            2: (patch(5, (9,)),),
        }
        assert await store.garbage(10) == []
        assert [record.ref for record in await store.shards(2, 10)] == [patch(3, (0, 5)), patch(4, (5, 6, 7)), patch(5, (9,))]
        assert (await store.getattr(file.inode)).blocks == (8192 + 100 + 6 * 4096 + 511) // 512  # patches count as stored
        # A whole shard replaces the shard and its patches; drop_from takes patches too.
        await store.commit_shards(file.inode, {0: ref(6, 4096)}, 4096 * 10, drop_from=2)
        assert await store.shard_map(file.inode) == {0: (ref(6, 4096),), 1: (ref(2, 100),)}
        assert sorted(shard_id for shard_id, _ in await store.garbage(10)) == [1, 3, 4, 5]
        await store.set_shard_nodes(6, ("c",))
        await store.commit_shards(file.inode, {0: patch(7, (0,))}, 4096 * 10)
        assert await store.shard_map(file.inode) == {0: (ref(6, 4096, nodes=("c",)), patch(7, (0,))), 1: (ref(2, 100),)}

    run_with_store(harness, body)


def test_commit_shards_punches_holes(harness):
    """`holes` (fallocate's punch hole) empties indexes anywhere in the file, patches
    included, in the same transaction as new objects at other indexes."""
    async def body(store: MetadataStore) -> None:
        file = await mkfile(store, ROOT_INODE, b"file")
        await store.commit_shards(file.inode, {0: ref(1, 4096), 1: ref(2, 4096), 2: ref(3, 4096)}, 3 * 4096)
        await store.commit_shards(file.inode, {1: patch(4, (0,))}, 3 * 4096)
        t = now()
        after = await store.commit_shards(file.inode, {0: ref(5, 100)}, 3 * 4096, mtime_ns=t, ctime_ns=t, holes=[1, 7])
        assert (after.size, after.blocks, after.mtime_ns) == (3 * 4096, (100 + 4096 + 511) // 512, t)
        assert await store.shard_map(file.inode) == {0: (ref(5, 100),), 2: (ref(3, 4096),)}
        assert sorted(shard_id for shard_id, _ in await store.garbage(10)) == [1, 2, 4]
        # A hole and a new object at one index: the index holds just the new one.
        await store.commit_shards(file.inode, {2: ref(6, 10)}, 3 * 4096, holes=[2])
        assert await store.shard_map(file.inode) == {0: (ref(5, 100),), 2: (ref(6, 10),)}
        assert sorted(shard_id for shard_id, _ in await store.garbage(10)) == [1, 2, 3, 4]

    run_with_store(harness, body)


def test_patches_apply_in_commit_order_whatever_their_ids(harness):
    """Each mount takes shard ids in batches, so a later patch may carry a
    smaller id than an earlier one of another mount: the later commit still
    lies on top (else a reader sees the older page)."""
    async def body(store: MetadataStore) -> None:
        file = await mkfile(store, ROOT_INODE, b"file")
        await store.commit_shards(file.inode, {0: ref(50, 8192)}, 8192)
        await store.commit_shards(file.inode, {0: patch(60, (0,))}, 8192)  # mount B's batch
        await store.commit_shards(file.inode, {0: patch(20, (0, 1))}, 8192)  # then mount A's, older batch
        await store.commit_shards(file.inode, {0: patch(61, (1,))}, 8192)
        expected = (ref(50, 8192), patch(60, (0,)), patch(20, (0, 1)), patch(61, (1,)))
        assert await store.shard_map(file.inode) == {0: expected}
        # A whole shard with a smaller id than the patches before it: they go, later ones stack on it.
        await store.commit_shards(file.inode, {0: ref(10, 8192)}, 8192)
        await store.commit_shards(file.inode, {0: patch(5, (1,))}, 8192)
        assert await store.shard_map(file.inode) == {0: (ref(10, 8192), patch(5, (1,)))}

    run_with_store(harness, body)


def test_commit_shards_with_attr_changes_is_a_truncate_and_a_setattr_in_one(harness):
    async def body(store: MetadataStore) -> None:
        file = await mkfile(store, ROOT_INODE, b"file")
        await store.commit_shards(file.inode, {0: ref(1, 4096), 1: ref(2, 4096)}, 8192)
        t = now()
        changes = AttrChanges(mode=0o4600, uid=7, gid=8, atime_ns=t - 5, mtime_ns=t - 3)
        attrs = await store.commit_shards(
            file.inode, {0: ref(3, 100)}, 100, drop_from=1, mtime_ns=t, ctime_ns=t, changes=changes
        )
        expected = InodeAttrs(file.inode, stat.S_IFREG | 0o4600, 1, 7, 8, 0, 100, 1, t - 5, t - 3, t, b"")
        assert attrs == expected == await store.getattr(file.inode)
        assert await store.shard_map(file.inode) == {0: (ref(3, 100),)}
        assert sorted(shard_id for shard_id, _ in await store.garbage(10)) == [1, 2]
        t = now()
        attrs = await store.commit_shards(file.inode, {}, 50, mtime_ns=t, ctime_ns=t, changes=AttrChanges(uid=9))
        assert (attrs.size, attrs.uid, attrs.mtime_ns, attrs.ctime_ns, attrs.mode) == (50, 9, t, t, expected.mode)

        # All or nothing: a refused commit changes no attr either.
        other = await mkfile(store, ROOT_INODE, b"other")
        await store.commit_shards(other.inode, {0: ref(20)}, 1000)
        before = await store.getattr(file.inode)
        refusals = [
            (InvalidArgument, dict(shards={0: ref(20)}, changes=AttrChanges(mode=0o600), ctime_ns=now())),  # id in use
            (InvalidArgument, dict(shards={}, changes=AttrChanges(mode=0o600))),  # no ctime for the changes
        ]
        for error, arguments in refusals:
            with pytest.raises(error):
                await store.commit_shards(file.inode, size=0, drop_from=0, **arguments)
        assert await store.getattr(file.inode) == before
        assert await store.shard_map(file.inode) == {0: (ref(3, 100),)}
        directory = await mkdir(store, ROOT_INODE, b"dir")
        with pytest.raises(IsADirectory):
            await store.commit_shards(directory.inode, {}, 0, ctime_ns=now(), changes=AttrChanges(mode=0o700))
        assert await store.getattr(directory.inode) == directory

    run_with_store(harness, body)


def test_commit_shards_errors(harness):
    async def body(store: MetadataStore) -> None:
        directory = await mkdir(store, ROOT_INODE, b"dir")
        with pytest.raises(IsADirectory):
            await store.commit_shards(directory.inode, {0: ref(1)}, 1000)
        with pytest.raises(NotFound):
            await store.commit_shards(9999, {0: ref(1)}, 1000)
        with pytest.raises(NotFound):
            await store.shard_map(9999)
        assert await store.shards(0, 10) == []

    run_with_store(harness, body)


def test_shards_listing_and_set_shard_nodes(harness):
    async def body(store: MetadataStore) -> None:
        one = await mkfile(store, ROOT_INODE, b"one")
        two = await mkfile(store, ROOT_INODE, b"two")
        await store.commit_shards(one.inode, {0: ref(10), 1: ref(30)}, 2000)
        await store.commit_shards(two.inode, {5: ref(20)}, 6000)
        assert await store.shard_map(one.inode) == {0: (ref(10),), 1: (ref(30),)}  # cached, if it is a cache
        assert await store.shards(0, 10) == [
            ShardRecord(one.inode, 0, ref(10), (one.inode,)),
            ShardRecord(two.inode, 5, ref(20), (two.inode,)),
            ShardRecord(one.inode, 1, ref(30), (one.inode,)),
        ]
        assert await store.shards(10, 1) == [ShardRecord(two.inode, 5, ref(20), (two.inode,))]
        assert await store.shards(30, 10) == []
        await store.set_shard_nodes(30, ("c", "d"))
        assert await store.shard_map(one.inode) == {0: (ref(10),), 1: (ref(30, nodes=("c", "d")),)}
        assert (await store.shards(20, 10))[0].ref.nodes == ("c", "d")
        with pytest.raises(NotFound):
            await store.set_shard_nodes(99, ("a",))

    run_with_store(harness, body)


def test_delete_inodes_collects_shards_and_xattrs(harness):
    async def body(store: MetadataStore) -> None:
        file = await mkfile(store, ROOT_INODE, b"file")
        other = await mkfile(store, ROOT_INODE, b"other")
        kept = await mkfile(store, ROOT_INODE, b"kept")
        await store.commit_shards(file.inode, {0: ref(7), 1: ref(8)}, 2000)
        await store.commit_shards(other.inode, {0: ref(9)}, 1000)
        await store.commit_shards(kept.inode, {0: ref(10)}, 1000)
        await store.setxattr(file.inode, b"user.a", b"1", 0, now())
        await store.delete_inodes([file.inode])  # still named: nothing happens
        assert (await store.getattr(file.inode)).nlink == 1
        assert await store.garbage(10) == []
        await store.unlink(ROOT_INODE, b"file", now())
        await store.unlink(ROOT_INODE, b"other", now())
        await store.delete_inodes([file.inode, kept.inode, other.inode])  # kept is still named
        assert [shard_id for shard_id, _ in await store.garbage(10)] == [7, 8, 9]
        assert await store.orphan_inodes() == []
        assert [record.inode for record in await store.shards(0, 10)] == [kept.inode]
        for inode in (file.inode, other.inode):
            for call in (store.getattr(inode), store.shard_map(inode), store.listxattr(inode)):
                with pytest.raises(NotFound):
                    await call
        await store.delete_inodes([file.inode, 12345])  # gone already, never was: nothing happens
        await store.delete_inodes([])

    run_with_store(harness, body)


def test_sessions_register_heartbeat_and_are_reclaimed_once_stale(harness):
    async def body(store: MetadataStore) -> None:
        first = await store.open_session("host-a", 11, "/mnt/a")
        second = await store.open_session("host-b", 22, "/mnt/b")
        assert second > first
        listed = {record.id: record for record in await store.list_sessions()}
        assert (listed[first].host, listed[first].pid, listed[first].mountpoint) == ("host-a", 11, "/mnt/a")
        assert listed[first].heartbeat_ns >= listed[first].started_ns > 0
        assert await store.reap_sessions(3600 * 10**9) == []  # nobody is an hour late
        # Wide margins: on a loaded machine a heartbeat and a reap can be far apart.
        await trio.sleep(1.0)
        assert await store.heartbeat(second)
        reaped = await store.reap_sessions(500 * 10**6)  # first has not beaten for a second
        assert [record.id for record in reaped] == [first]
        assert await store.reap_sessions(500 * 10**6) == []  # once
        assert not await store.heartbeat(first)  # fenced: told it was reclaimed
        with pytest.raises(SessionLost):
            await store.open_file(first, ROOT_INODE)
        assert [record.id for record in await store.list_sessions()] == [second]
        await store.close_session(second)
        assert await store.list_sessions() == []
        assert await store.open_session("host-a", 11, "/mnt/a") > second  # ids are never reused

    run_with_store(harness, body)


def test_an_inode_open_in_any_session_is_not_deleted(harness):
    async def body(store: MetadataStore) -> None:
        a = await store.open_session("a", 1, "/a")
        b = await store.open_session("b", 2, "/b")
        file = await mkfile(store, ROOT_INODE, b"file")
        made = (await store.create(ROOT_INODE, b"made", FILE, 1000, 1000, now(), opened_by=b)).attrs
        await store.commit_shards(file.inode, {0: ref(7)}, 1000)
        assert (await store.open_file(a, file.inode)) == await store.getattr(file.inode)
        await store.open_file(a, file.inode)  # twice is once
        for name in (b"file", b"made"):
            await store.unlink(ROOT_INODE, name, now())
        assert await store.orphan_inodes() == []  # both are open
        await store.delete_inodes([file.inode, made.inode])
        assert (await store.getattr(file.inode)).nlink == 0
        assert (await store.getattr(made.inode)).nlink == 0
        await store.close_files(a, [file.inode])
        assert await store.orphan_inodes() == [file.inode]
        await store.delete_inodes([file.inode])
        assert [shard_id for shard_id, _ in await store.garbage(10)] == [7]
        reaped = await store.reap_sessions(0)  # b dies with made open: its record goes with it
        assert {record.id for record in reaped} == {a, b}
        assert await store.orphan_inodes() == [made.inode]
        with pytest.raises(NotFound):
            await store.open_file(await store.open_session("c", 3, "/c"), file.inode)

    run_with_store(harness, body)


def test_garbage_of_a_file_a_session_holds_open_waits_until_it_heard_of_the_change(harness):
    async def body(store: MetadataStore) -> None:
        reader = await store.open_session("reader", 1, "/r")
        writer = await store.open_session("writer", 2, "/w")
        file = await mkfile(store, ROOT_INODE, b"file")
        await store.commit_shards(file.inode, {0: ref(7)}, 1000)
        await store.open_file(reader, file.inode)
        await store.open_file(writer, file.inode)
        await store.commit_shards(file.inode, {0: ref(8)}, 1000)  # the writer replaces shard 7
        assert await store.garbage(10) == []  # the reader's shard map may still name 7
        later = time.time_ns() + 2 * SETTLE_NS  # as if both heard of every change until then
        await store.heartbeat(reader, later)
        assert await store.garbage(10) == []  # the writer holds it open too, and said nothing yet
        await store.heartbeat(writer, later)
        assert [shard_id for shard_id, _ in await store.garbage(10)] == [7]
        await store.heartbeat(writer, 1)  # synced_ns never goes back
        assert [shard_id for shard_id, _ in await store.garbage(10)] == [7]
        await store.close_files(reader, [file.inode])
        await store.close_files(writer, [file.inode])
        await store.commit_shards(file.inode, {0: ref(9)}, 1000)
        assert [shard_id for shard_id, _ in await store.garbage(10)] == [7, 8]  # open nowhere: at once

    run_with_store(harness, body)


def test_locks_are_shared_by_sessions_and_go_with_them(harness):
    async def body(store: MetadataStore) -> None:
        a = await store.open_session("a", 1, "/a")
        b = await store.open_session("b", 2, "/b")
        file = await mkfile(store, ROOT_INODE, b"db")

        def posix(session: int, owner: int, lock_type: int, start: int, end: int, pid: int = 0) -> LockRecord:
            return LockRecord((session, owner), POSIX, lock_type, start, end, pid)

        assert await store.set_lock(a, file.inode, posix(a, 7, F_WRLCK, 0, 99, pid=1234)) is None
        blocking = await store.set_lock(b, file.inode, posix(b, 7, F_RDLCK, 50, 60))  # same owner number, other session
        assert blocking is not None and blocking.owner_key == (a, 7) and (blocking.start, blocking.end) == (0, 99)
        assert blocking.pid == 1234 and blocking.type == F_WRLCK
        assert await store.test_lock(file.inode, posix(b, 1, F_RDLCK, 100, 200)) is None
        assert await store.set_lock(b, file.inode, posix(b, 1, F_RDLCK, 100, 200)) is None
        assert await store.set_lock(a, file.inode, posix(a, 7, F_UNLCK, 40, 59)) is None  # splits a's lock
        assert await store.set_lock(b, file.inode, posix(b, 2, F_RDLCK, 40, 59)) is None
        assert await store.test_lock(file.inode, posix(b, 3, F_WRLCK, 60, 60)) is not None
        flock_a = LockRecord.flock((a, 9), F_WRLCK)
        assert await store.set_lock(a, file.inode, flock_a) is None  # flock and fcntl locks are apart
        assert await store.set_lock(b, file.inode, LockRecord.flock((b, 9), F_RDLCK)) == flock_a
        await store.release_locks(a, file.inode, [9], FLOCK)
        assert await store.set_lock(b, file.inode, LockRecord.flock((b, 9), F_RDLCK)) is None
        await store.release_locks(a, file.inode, [7], POSIX)
        assert await store.test_lock(file.inode, posix(a, 8, F_WRLCK, 0, 39)) is None
        assert await store.test_lock(file.inode, posix(a, 8, F_WRLCK, 100, 100)) is not None  # b's
        await trio.sleep(1.0)
        assert await store.heartbeat(a)
        assert [record.id for record in await store.reap_sessions(500 * 10**6)] == [b]  # b's locks go with it
        assert await store.test_lock(file.inode, posix(a, 8, F_WRLCK, 0, OFFSET_MAX)) is None
        with pytest.raises(SessionLost):
            await store.set_lock(b, file.inode, posix(b, 1, F_RDLCK, 0, 0))

    run_with_store(harness, body)


def test_allocate_shard_ids_never_repeat(harness):
    async def main() -> None:
        handed_out: list[int] = []
        for _ in range(3):
            async with harness.store() as store:
                for count in (1, 5, 0, 100):
                    ids = await store.allocate_shard_ids(count)
                    assert len(ids) == count
                    handed_out += ids
        assert len(handed_out) == len(set(handed_out)) == 318
        assert min(handed_out) > 0

    trio.run(main)


def test_usage(harness):
    async def body(store: MetadataStore) -> None:
        assert await store.usage() == UsageCounts(1, 0, 0, 0)
        one = await mkfile(store, ROOT_INODE, b"one")
        await mkdir(store, ROOT_INODE, b"dir")
        await store.create(ROOT_INODE, b"link", SYMLINK, 0, 0, now(), target=b"target")
        await store.commit_shards(one.inode, {0: ref(1, 4096), 2: ref(2, 10)}, 9000)
        assert await store.usage() == UsageCounts(inodes=4, logical_bytes=9000, stored_bytes=4106, shards=2, payload_bytes=4106)

    run_with_store(harness, body)


# -- xattrs ---------------------------------------------------------------------------


def test_xattrs(harness):
    async def body(store: MetadataStore) -> None:
        file = await mkfile(store, ROOT_INODE, b"file")
        with pytest.raises(NoData):
            await store.getxattr(file.inode, b"security.capability")
        with pytest.raises(NoData):
            await store.getxattr(file.inode, b"security.capability")
        assert await store.listxattr(file.inode) == []
        t = now()
        changed = await store.setxattr(file.inode, b"user.one", b"1", 0, t)
        assert changed == await store.getattr(file.inode) and changed.ctime_ns == t
        await store.setxattr(file.inode, b"user.two", b"\x00binary\xff", XATTR_CREATE, now())
        assert await store.getxattr(file.inode, b"user.two") == b"\x00binary\xff"
        assert sorted(await store.listxattr(file.inode)) == [b"user.one", b"user.two"]
        with pytest.raises(Exists):
            await store.setxattr(file.inode, b"user.one", b"x", XATTR_CREATE, now())
        with pytest.raises(NoData):
            await store.setxattr(file.inode, b"user.three", b"x", XATTR_REPLACE, now())
        await store.setxattr(file.inode, b"user.one", b"replaced", XATTR_REPLACE, now())
        await store.setxattr(file.inode, b"user.one", b"", 0, now())
        assert await store.getxattr(file.inode, b"user.one") == b""
        t = now()
        changed = await store.removexattr(file.inode, b"user.one", t)
        assert changed == await store.getattr(file.inode) and changed.ctime_ns == t
        with pytest.raises(NoData):
            await store.getxattr(file.inode, b"user.one")
        with pytest.raises(NoData):
            await store.removexattr(file.inode, b"user.one", now())
        assert await store.listxattr(file.inode) == [b"user.two"]
        with pytest.raises(NoData):
            await store.getxattr(file.inode, b"security.capability")
        directory = await mkdir(store, ROOT_INODE, b"dir")
        await store.setxattr(directory.inode, b"user.one", b"dir", 0, now())
        assert await store.getxattr(directory.inode, b"user.one") == b"dir"
        for call in (
            store.getxattr(9999, b"user.one"),
            store.listxattr(9999),
            store.setxattr(9999, b"user.one", b"x", 0, now()),
            store.removexattr(9999, b"user.one", now()),
        ):
            with pytest.raises(NotFound):
                await call

    run_with_store(harness, body)


# -- lifecycle ------------------------------------------------------------------------


def test_everything_persists_across_close_and_reopen(harness):
    async def main() -> None:
        async with harness.store() as store:
            directory = await mkdir(store, ROOT_INODE, b"dir")
            file = await mkfile(store, directory.inode, b"file")
            await store.link(file.inode, ROOT_INODE, b"hard", now())
            await store.create(directory.inode, b"link", SYMLINK, 0, 0, now(), target=b"file")
            await store.commit_shards(file.inode, {0: ref(1), 2: ref(2)}, 5000)
            await store.commit_shards(file.inode, {2: ref(3)}, 5000)
            await store.setxattr(file.inode, b"user.k", b"v", 0, now())
            orphan = await mkfile(store, ROOT_INODE, b"orphan")
            await store.unlink(ROOT_INODE, b"orphan", now())
            await store.sync()
            before = {
                "root": await list_all(store, ROOT_INODE),
                "dir": await list_all(store, directory.inode),
                "file": await store.getattr(file.inode),
                "shards": await store.shard_map(file.inode),
                "garbage": await store.garbage(10),
                "usage": await store.usage(),
            }
        async with harness.store() as store:
            assert await list_all(store, ROOT_INODE) == before["root"]
            assert await list_all(store, directory.inode) == before["dir"]
            assert await store.getattr(file.inode) == before["file"]
            assert await store.shard_map(file.inode) == before["shards"]
            assert await store.garbage(10) == before["garbage"]
            assert await store.usage() == before["usage"]
            assert await store.getxattr(file.inode, b"user.k") == b"v"
            assert await store.orphan_inodes() == [orphan.inode]
            assert (await store.lookup(directory.inode, b"..")).inode == ROOT_INODE
            await check_nlinks(store)

    trio.run(main)


def test_layout_is_recorded_once_and_kept(harness):
    async def main() -> None:
        async with harness.store() as store:
            assert await store.layout(1 << 20, 1 << 14) == (1 << 20, 1 << 14)
            assert await store.layout(4 << 20, 1 << 16) == (1 << 20, 1 << 14)
        async with harness.store() as store:
            assert await store.layout(4 << 20, 1 << 16) == (1 << 20, 1 << 14)

    trio.run(main)


# -- the node registry ----------------------------------------------------------


def test_node_registry(harness):
    async def body(store: MetadataStore) -> None:
        assert await store.nodes() == []
        assert await store.add_node("n2", "127.0.0.1:7000") == NodeRecord("n2", "127.0.0.1:7000", NODE_ACTIVE)
        await store.add_node("n1", "local:/srv/n1")
        with pytest.raises(Exists):
            await store.add_node("n1", "local:/elsewhere")
        assert [node.name for node in await store.nodes()] == ["n1", "n2"]

        await store.set_node_state("n1", NODE_DRAINING)
        await store.record_node_stat("n1", 1000, 300, 7, 123)
        assert (await store.nodes())[0] == NodeRecord("n1", "local:/srv/n1", NODE_DRAINING, 1000, 300, 7, 123)
        await store.set_node_state("n1", NODE_DRAINED)
        with pytest.raises(InvalidArgument):
            await store.set_node_state("n1", "sleeping")
        for missing in (
            store.set_node_state("nope", NODE_ACTIVE),
            store.record_node_stat("nope", 1, 1, 1, 1),
            store.remove_node("nope"),
        ):
            with pytest.raises(NotFound):
                await missing

        await store.remove_node("n1")
        assert await store.nodes() == [NodeRecord("n2", "127.0.0.1:7000", NODE_ACTIVE)]

    run_with_store(harness, body)


def test_node_registry_persists(harness):
    async def main() -> None:
        async with harness.store() as store:
            await store.add_node("n1", "local:/srv/n1")
            await store.record_node_stat("n1", 10, 5, 1, 99)
        async with harness.store() as store:
            assert await store.nodes() == [NodeRecord("n1", "local:/srv/n1", NODE_ACTIVE, 10, 5, 1, 99)]

    trio.run(main)


def test_a_schema_1_database_gains_the_node_registry_and_patches(tmp_path):
    """A file system made before the registry and patches existed opens with
    its files and shards intact, an empty registry, and takes patches."""
    import sqlite3

    from dfsfuse.metadata import sqlite as engine

    path = str(tmp_path / "metadata.db")
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("BEGIN")
    engine._MIGRATIONS[1](db)
    db.execute("INSERT INTO meta (key, value) VALUES ('schema_version', 1)")
    db.execute("COMMIT")
    db.close()

    async def make_file() -> int:
        store = await SqliteMetadata.open(path)  # migrates to the current version
        try:
            file = await mkfile(store, ROOT_INODE, b"old")
            await store.commit_shards(file.inode, {0: ref(4, 4096)}, 4096)
            return file.inode
        finally:
            await store.close()

    # Undo the migrations after V1 to get a V1 database with a file in it.
    inode = trio.run(make_file)
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("BEGIN")
    db.execute("DROP TABLE settings")
    db.execute("DROP TABLE nodes")
    db.execute("DROP TABLE quotas")
    db.execute("DROP INDEX entries_by_inode")
    db.execute("ALTER TABLE inodes DROP COLUMN flags")
    for table in ("sessions", "open_files", "locks"):
        db.execute(f"DROP TABLE {table}")
    db.execute("ALTER TABLE garbage DROP COLUMN inode")
    db.execute("ALTER TABLE garbage DROP COLUMN since_ns")
    db.execute("ALTER TABLE shards RENAME TO shards_new")
    for statement in engine._statements(engine._SCHEMA_V1):
        if "CREATE TABLE shards" in statement:
            db.execute(statement)
    db.execute("INSERT INTO shards SELECT id, inode, idx, length, checksum, nodes FROM shards_new")
    db.execute("DROP TABLE shards_new")
    db.execute("UPDATE meta SET value = 1 WHERE key = 'schema_version'")
    db.execute("COMMIT")
    db.close()

    async def main() -> None:
        store = await SqliteMetadata.open(path)
        try:
            assert (await store.getattr(ROOT_INODE)).inode == ROOT_INODE
            assert await store.nodes() == []
            await store.add_node("n1", "local:/srv/n1")
            assert await store.shard_map(inode) == {0: (ref(4, 4096),)}
            await store.commit_shards(inode, {0: patch(5, (1,))}, 8192)
            assert await store.shard_map(inode) == {0: (ref(4, 4096), patch(5, (1,)))}
        finally:
            await store.close()

    trio.run(main)
    version = sqlite3.connect(path).execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    assert version == (engine.SCHEMA_VERSION,) == (7,)


def test_a_snapshot_opens_as_the_metadata_of_its_instant(harness, tmp_path):
    """The snapshot holds every change made before it and none made after,
    and loads on its own as the complete metadata of a new data dir."""
    settings = MetadataSettings(tmp_path / "restored" / "metadata.db")

    async def body(store: MetadataStore) -> None:
        kept = await mkfile(store, ROOT_INODE, b"kept")
        await store.commit_shards(kept.inode, {0: ref(7)}, 1000)
        await store.add_node("n1", "n1.example:7070")
        dump = await store.snapshot()
        await mkfile(store, ROOT_INODE, b"after")
        settings.path.parent.mkdir()
        async with load_dump(settings, dump):
            pass

    run_with_store(harness, body)

    async def check() -> None:
        restored = await open_engine(settings, create=False)
        try:
            assert await names_in(restored, ROOT_INODE) == {b"kept"}
            kept = await restored.lookup(ROOT_INODE, b"kept")
            assert (await restored.shard_map(kept.inode))[0][0].shard_id == 7
            assert [node.name for node in await restored.nodes()] == ["n1"]
            assert (await restored.allocate_shard_ids(1)).start >= 1
        finally:
            await restored.close()

    trio.run(check)


# -- dumps (dfsfuse.metadata.dump, loaded through dfsfuse.metadata.engines) ------


def test_a_dump_is_an_envelope_naming_its_engine(harness):
    async def body(store: MetadataStore) -> None:
        await mkfile(store, ROOT_INODE, b"kept")
        dump = await store.snapshot()
        assert dump.startswith(dump_format.MAGIC)
        decoded = dump_format.decode_dump(dump)
        assert decoded.format_version == dump_format.FORMAT_VERSION
        assert decoded.engine in ENGINE_NAMES
        assert dump_format.encode_dump(decoded.engine, decoded.payload) == dump
        async with open_dump(dump) as opened:
            assert await names_in(opened, ROOT_INODE) == {b"kept"}

    run_with_store(harness, body)


def test_a_bare_sqlite_image_from_before_the_envelope_still_loads(tmp_path):
    """Snapshots written before dumps had an envelope are SQLite images (format 0)."""

    async def main() -> None:
        async with sqlite_harness(tmp_path).store() as store:
            await mkfile(store, ROOT_INODE, b"old")
            image = dump_format.decode_dump(await store.snapshot()).payload
        assert image.startswith(b"SQLite format 3\0")
        assert dump_format.decode_dump(image) == dump_format.Dump("sqlite", image, format_version=0)
        async with open_dump(image) as opened:
            assert await names_in(opened, ROOT_INODE) == {b"old"}
        settings = MetadataSettings(tmp_path / "restored.db")
        async with load_dump(settings, image):
            pass
        restored = await open_engine(settings, create=False)
        try:
            assert await names_in(restored, ROOT_INODE) == {b"old"}
        finally:
            await restored.close()

    trio.run(main)


def test_a_dump_that_cannot_be_read_is_a_clear_error(tmp_path):
    async def main() -> None:
        async with sqlite_harness(tmp_path).store() as store:
            dump = await store.snapshot()
        decoded = dump_format.decode_dump(dump)
        newer = bytearray(dump)
        newer[8:12] = (dump_format.FORMAT_VERSION + 1).to_bytes(4, "little")
        bad = {
            b"": "not a dfsfuse metadata dump",
            b"PK\3\4 a zip file": "not a dfsfuse metadata dump",
            dump[:14]: "cut short",
            dump[:-1]: "corrupt metadata dump",
            dump + b"\0": "corrupt metadata dump",
            bytes(newer): f"format {dump_format.FORMAT_VERSION + 1} is not one this dfsfuse reads",
            dump_format.encode_dump("nosql", decoded.payload): "engine .nosql.",
            dump_format.encode_dump("sqlite", b"not a database"): "holds no SQLite database",
        }
        settings = MetadataSettings(tmp_path / "restored.db")
        for data, message in bad.items():
            for use in (lambda: open_dump(data), lambda: load_dump(settings, data)):
                with pytest.raises(UserError, match=message) as raised:
                    async with use():
                        pass
                assert "\n" not in str(raised.value)
            assert sorted(path.name for path in tmp_path.iterdir()) == ["metadata.db"]

    trio.run(main)


def test_loading_a_dump_is_all_or_nothing(tmp_path):
    """Nothing is left behind by a load whose block fails; a dump never loads
    over existing metadata."""

    async def main() -> None:
        async with sqlite_harness(tmp_path).store() as store:
            await mkfile(store, ROOT_INODE, b"file")
            dump = await store.snapshot()
        settings = MetadataSettings(tmp_path / "new" / "metadata.db")
        settings.path.parent.mkdir()
        with pytest.raises(RuntimeError):
            async with load_dump(settings, dump) as staged:
                assert await names_in(staged, ROOT_INODE) == {b"file"}
                assert not metadata_exists(settings)
                raise RuntimeError("cut short")
        assert list(settings.path.parent.iterdir()) == []
        async with load_dump(settings, dump) as staged:
            await staged.allocate_shard_ids(100)
        assert metadata_exists(settings)
        assert [path.name for path in settings.path.parent.iterdir()] == ["metadata.db"]
        with pytest.raises(UserError, match="exists already"):
            async with load_dump(settings, dump):
                pass
        restored = await open_engine(settings, create=False)
        try:
            assert (await restored.allocate_shard_ids(1)).start > 100  # what the block did was kept
        finally:
            await restored.close()

    trio.run(main)


@pytest.fixture
def second_postgres_url(postgres_server):
    """Another fresh database, beside the one a PostgreSQL harness uses."""
    postgres_server.create_database("dump_target")
    yield postgres_server.url("dump_target", password=True)
    postgres_server.drop_database("dump_target")


def test_a_dump_of_any_engine_loads_into_postgresql(harness, second_postgres_url):
    """Dumps are engine-neutral: one loads into a new PostgreSQL file system
    whole (ids, shards, the registry), and new ids there come after its own;
    a database that holds a file system already is refused."""
    settings = MetadataSettings(pathlib.Path("/nonexistent"), "postgresql", second_postgres_url)
    dumped: list[bytes] = []

    async def body(store: MetadataStore) -> None:
        directory = await mkdir(store, ROOT_INODE, b"dir")
        kept = await mkfile(store, directory.inode, b"kept")
        await store.commit_shards(kept.inode, {0: ref(7)}, 1000)
        await store.add_node("n1", "n1.example:7070")
        dumped.append(await store.snapshot())

    run_with_store(harness, body)

    async def check() -> None:
        assert not metadata_exists(settings)
        async with load_dump(settings, dumped[0]):
            pass
        assert metadata_exists(settings)
        restored = await open_engine(settings, create=False)
        try:
            directory = await restored.lookup(ROOT_INODE, b"dir")
            kept = await restored.lookup(directory.inode, b"kept")
            assert (await restored.shard_map(kept.inode))[0][0].shard_id == 7
            assert [node.name for node in await restored.nodes()] == ["n1"]
            newer = await mkfile(restored, ROOT_INODE, b"new")
            assert newer.inode > kept.inode
            assert newer.inode not in (directory.inode, kept.inode)
        finally:
            await restored.close()
        with pytest.raises(UserError, match="holds a file system already"):
            async with load_dump(settings, dumped[0]):
                pass

    trio.run(check)


# -- directory quotas -------------------------------------------------------------


async def quota_usage(store: MetadataStore, directory: int) -> tuple[int, int]:
    """(used bytes, used inodes) of a quota, checked against a recount of the tree."""
    assert await store.check_quotas(repair=False) == []
    quota = await store.quota(directory)
    return quota.used_bytes, quota.used_inodes


def test_a_new_quota_counts_what_is_there_and_every_change_after(harness):
    async def body(store: MetadataStore) -> None:
        top = await mkdir(store, ROOT_INODE, b"top")
        sub = await mkdir(store, top.inode, b"sub")
        file = await mkfile(store, sub.inode, b"file")
        await store.commit_shards(file.inode, {0: ref(1, 1000)}, 1000)
        await store.create(top.inode, b"link", SYMLINK, 0, 0, now(), target=b"a-target")
        outside = await mkfile(store, ROOT_INODE, b"outside")
        await store.commit_shards(outside.inode, {0: ref(2, 50)}, 50)
        quota = await store.set_quota(top.inode, 10_000, 100)
        assert quota == QuotaRecord(top.inode, 10_000, 100, used_bytes=1000, used_inodes=3)
        assert await store.quotas() == [quota]
        assert await store.quotas_of(file.inode) == [quota]
        assert await store.quotas_of(top.inode) == [quota]
        assert await store.quotas_of(outside.inode) == []
        # Writes, truncates, creates and deletes below it are charged; outside not.
        await store.commit_shards(file.inode, {1: ref(3, 500)}, 4096 + 500)
        assert await quota_usage(store, top.inode) == (4596, 3)
        await store.commit_shards(file.inode, {}, 100, drop_from=1)
        assert await quota_usage(store, top.inode) == (100, 3)
        await store.commit_shards(outside.inode, {}, 0, drop_from=0)
        second = await mkfile(store, top.inode, b"second")
        await store.commit_shards(second.inode, {0: ref(4, 7)}, 7)
        assert await quota_usage(store, top.inode) == (107, 4)
        await store.unlink(sub.inode, b"file", now())
        assert await quota_usage(store, top.inode) == (7, 3)
        # An unnamed (open) file is charged to nothing, even if it grows.
        await store.commit_shards(file.inode, {0: ref(5, 900)}, 900)
        assert await quota_usage(store, top.inode) == (7, 3)
        await store.rmdir(top.inode, b"sub", now())
        assert await quota_usage(store, top.inode) == (7, 2)
        # Changing the limits keeps the usage; removing the directory removes its quota.
        assert await store.set_quota(top.inode, None, 5) == QuotaRecord(top.inode, None, 5, 7, 2)
        await store.unlink(top.inode, b"second", now())
        await store.unlink(top.inode, b"link", now())
        await store.rmdir(ROOT_INODE, b"top", now())
        assert await store.quotas() == []

    run_with_store(harness, body)


def test_quota_calls_refuse_what_is_no_quota(harness):
    async def body(store: MetadataStore) -> None:
        top = await mkdir(store, ROOT_INODE, b"top")
        file = await mkfile(store, ROOT_INODE, b"file")
        with pytest.raises(NotADirectory):
            await store.set_quota(file.inode, 1, 1)
        with pytest.raises(NotFound):
            await store.set_quota(9999, 1, 1)
        with pytest.raises(InvalidArgument):
            await store.set_quota(top.inode, -1, None)
        with pytest.raises(NotFound):
            await store.quota(top.inode)
        with pytest.raises(NotFound):
            await store.remove_quota(top.inode)
        await store.set_quota(top.inode, None, None)
        await store.remove_quota(top.inode)
        assert await store.quotas() == []

    run_with_store(harness, body)


def test_creates_past_a_limit_are_refused_and_change_nothing(harness):
    async def body(store: MetadataStore) -> None:
        top = await mkdir(store, ROOT_INODE, b"top")
        await store.set_quota(top.inode, None, 2)
        await mkfile(store, top.inode, b"one")
        sub = await mkdir(store, top.inode, b"sub")
        before = await store.getattr(top.inode)
        for make in (
            lambda: mkfile(store, top.inode, b"three"),
            lambda: mkdir(store, sub.inode, b"deeper"),
            lambda: store.create(sub.inode, b"symlink", SYMLINK, 0, 0, now(), target=b"x"),
        ):
            with pytest.raises(QuotaExceeded):
                await make()
        assert await names_in(store, top.inode) == {b"one", b"sub"}
        assert await names_in(store, sub.inode) == set()
        assert await store.getattr(top.inode) == before
        assert await quota_usage(store, top.inode) == (0, 2)
        # A limit below the usage is allowed: then only shrinking goes on.
        await store.set_quota(top.inode, None, 1)
        await store.unlink(top.inode, b"one", now())
        with pytest.raises(QuotaExceeded):
            await mkfile(store, top.inode, b"again")
        await store.remove_quota(top.inode)
        await mkfile(store, top.inode, b"again")
        await check_nlinks(store)

    run_with_store(harness, body)


def test_nested_quotas_and_renames_across_them(harness):
    async def body(store: MetadataStore) -> None:
        outer = await mkdir(store, ROOT_INODE, b"outer")
        inner = await mkdir(store, outer.inode, b"inner")
        other = await mkdir(store, ROOT_INODE, b"other")
        await store.set_quota(outer.inode, 10_000, None)
        await store.set_quota(inner.inode, 3000, 10)
        await store.set_quota(other.inode, None, None)
        file = await mkfile(store, inner.inode, b"file")
        await store.commit_shards(file.inode, {0: ref(1, 2000)}, 2000)
        assert [q.directory for q in await store.quotas_of(file.inode)] == [inner.inode, outer.inode]
        assert await quota_usage(store, outer.inode) == (2000, 2)
        assert await quota_usage(store, inner.inode) == (2000, 1)
        # Up out of the inner quota: only inner lets go.
        await store.rename(inner.inode, b"file", outer.inode, b"file", 0, now())
        assert await quota_usage(store, outer.inode) == (2000, 2)
        assert await quota_usage(store, inner.inode) == (0, 0)
        # A directory takes its whole tree along.
        tree = await mkdir(store, other.inode, b"tree")
        for name, size in ((b"a", 100), (b"b", 200)):
            leaf = await mkfile(store, tree.inode, name)
            await store.commit_shards(leaf.inode, {0: ref(10 + size, size)}, size)
        await mkdir(store, tree.inode, b"empty")
        assert await quota_usage(store, other.inode) == (300, 4)
        await store.rename(other.inode, b"tree", inner.inode, b"tree", 0, now())
        assert await quota_usage(store, other.inode) == (0, 0)
        assert await quota_usage(store, inner.inode) == (300, 4)
        assert await quota_usage(store, outer.inode) == (2300, 6)
        # A rename that would pass a limit is refused and changes nothing.
        await store.rename(outer.inode, b"file", other.inode, b"file", 0, now())
        await store.commit_shards(file.inode, {0: ref(2, 2800)}, 2800)
        with pytest.raises(QuotaExceeded):
            await store.rename(other.inode, b"file", inner.inode, b"file", 0, now())
        assert await names_in(store, other.inode) == {b"file"}
        assert await quota_usage(store, inner.inode) == (300, 4)
        assert await quota_usage(store, other.inode) == (2800, 1)
        # Replacing a file frees its usage before the new one is charged.
        await store.commit_shards(file.inode, {0: ref(2, 2700)}, 2700)
        await store.commit_shards((await mkfile(store, inner.inode, b"big")).inode, {0: ref(3, 2700)}, 2700)
        assert await quota_usage(store, inner.inode) == (3000, 5)
        await store.rename(other.inode, b"file", inner.inode, b"big", 0, now())
        assert await quota_usage(store, inner.inode) == (3000, 5)
        assert await quota_usage(store, outer.inode) == (3000, 6)
        # An exchange moves both sides' usage.
        small = await mkfile(store, other.inode, b"small")
        await store.commit_shards(small.inode, {0: ref(4, 5)}, 5)
        await store.rename(other.inode, b"small", inner.inode, b"big", RENAME_EXCHANGE, now())
        assert await quota_usage(store, inner.inode) == (305, 5)
        assert await quota_usage(store, other.inode) == (2700, 1)
        # Moving a quota directory keeps its quota; the quotas above follow.
        await store.rename(outer.inode, b"inner", other.inode, b"inner", 0, now())
        assert await quota_usage(store, outer.inode) == (0, 0)
        assert await quota_usage(store, other.inode) == (3005, 7)
        assert await quota_usage(store, inner.inode) == (305, 5)
        await check_nlinks(store)

    run_with_store(harness, body)


def test_hard_links_are_charged_once_and_stay_in_their_quotas(harness):
    async def body(store: MetadataStore) -> None:
        top = await mkdir(store, ROOT_INODE, b"top")
        a = await mkdir(store, top.inode, b"a")
        b = await mkdir(store, top.inode, b"b")
        await store.set_quota(top.inode, None, None)
        file = await mkfile(store, a.inode, b"file")
        await store.commit_shards(file.inode, {0: ref(1, 300)}, 300)
        await store.link(file.inode, b.inode, b"again", now())
        assert await quota_usage(store, top.inode) == (300, 3)
        with pytest.raises(CrossDevice):
            await store.link(file.inode, ROOT_INODE, b"out", now())
        # A rename of one of its names within the same quotas is fine; out of them, EXDEV.
        await store.rename(b.inode, b"again", a.inode, b"again", 0, now())
        with pytest.raises(CrossDevice):
            await store.rename(a.inode, b"again", ROOT_INODE, b"again", 0, now())
        await store.rename(top.inode, b"b", ROOT_INODE, b"b", 0, now())  # empty now
        with pytest.raises(CrossDevice):  # a directory holding a file with names elsewhere
            await store.rename(top.inode, b"a", ROOT_INODE, b"a", 0, now())
        # The file is still charged once, until its last name goes.
        await store.unlink(a.inode, b"again", now())
        assert await quota_usage(store, top.inode) == (300, 2)
        await store.unlink(a.inode, b"file", now())
        assert await quota_usage(store, top.inode) == (0, 1)
        await check_nlinks(store)

    run_with_store(harness, body)



def test_concurrent_creates_and_commits_keep_usage_exact(harness):
    """Transactions in flight at once (PostgreSQL runs them on connections of
    their own, SERIALIZABLE): exactly the limit's worth of creates succeeds,
    and concurrent size commits add up."""

    async def body(store: MetadataStore) -> None:
        top = await mkdir(store, ROOT_INODE, b"top")
        await store.set_quota(top.inode, None, 10)
        made: list[InodeAttrs] = []
        refused = 0

        async def make(index: int) -> None:
            nonlocal refused
            try:
                made.append(await mkfile(store, top.inode, b"f%d" % index))
            except QuotaExceeded:
                refused += 1

        async with trio.open_nursery() as nursery:
            for index in range(25):
                nursery.start_soon(make, index)
        assert (len(made), refused) == (10, 15)

        async def grow(file: InodeAttrs, shard_id: int) -> None:
            await store.commit_shards(file.inode, {0: ref(shard_id, 100 + shard_id)}, 100 + shard_id)

        async with trio.open_nursery() as nursery:
            for shard_id, file in enumerate(made, start=1):
                nursery.start_soon(grow, file, shard_id)
        assert await quota_usage(store, top.inode) == (sum(100 + i for i in range(1, 11)), 10)

    run_with_store(harness, body)


# -- tree snapshots ----------------------------------------------------------


def test_snapshot_tree_copies_names_attrs_xattrs_and_shares_objects(harness):
    async def body(store: MetadataStore) -> None:
        top = await mkdir(store, ROOT_INODE, b"top")
        sub = await mkdir(store, top.inode, b"sub")
        file = await mkfile(store, sub.inode, b"file")
        await store.commit_shards(file.inode, {0: ref(1, 4096), 1: ref(2, 100)}, 4096 + 100)
        await store.commit_shards(file.inode, {0: patch(3, (0,))}, 4196)
        await store.link(file.inode, top.inode, b"hardlink", now())
        await store.create(top.inode, b"symlink", stat.S_IFLNK | 0o777, 0, 0, now(), target=b"sub/file")
        await store.setxattr(sub.inode, b"user.color", b"blue", 0, now())
        t = now()

        change = await store.snapshot_tree(top.inode, ROOT_INODE, b"snap", False, t)
        copy = change.entry.attrs
        assert stat.S_ISDIR(copy.mode) and copy.nlink == top.nlink + 1 == 3 and copy.ctime_ns == t
        assert change.entry.parent.nlink == 4  # root: 2 + top + snap
        assert len(change.inodes) == 4 and change.logical_bytes == 4196  # the hard link is one inode
        assert await names_in(store, copy.inode) == {b"sub", b"hardlink", b"symlink"}
        sub_copy = await store.lookup(copy.inode, b"sub")
        file_copy = await store.lookup(sub_copy.inode, b"file")
        assert file_copy.inode != file.inode
        assert file_copy == await store.lookup(copy.inode, b"hardlink")
        assert (file_copy.nlink, file_copy.size, file_copy.blocks) == (2, 4196, (4096 + 100 + PAGE_SIZE + 511) // 512)
        assert await store.shard_map(file_copy.inode) == await store.shard_map(file.inode)
        records = await store.shards(0, 10)  # each object once, with every file that has it
        assert [(r.ref.shard_id, r.inode, r.sharers) for r in records] == [
            (shard_id, file.inode, (file.inode, file_copy.inode)) for shard_id in (1, 2, 3)
        ]
        assert await store.getxattr(sub_copy.inode, b"user.color") == b"blue"
        assert (await store.lookup(copy.inode, b"symlink")).target == b"sub/file"
        assert (await store.lookup(sub_copy.inode, b"..")).inode == copy.inode
        await check_nlinks(store)

        # A write on either side replaces objects in its own map only.
        await store.commit_shards(file.inode, {0: ref(4, 10)}, 10, drop_from=1)
        assert await store.shard_map(file_copy.inode) == {0: (ref(1, 4096), patch(3, (0,))), 1: (ref(2, 100),)}
        assert await store.garbage(10) == []  # the snapshot still has 1, 2 and 3
        usage = await store.usage()
        assert (usage.shards, usage.stored_bytes) == (4, 4096 + 100 + PAGE_SIZE + 10)

        # Removing the snapshot frees what only it held, and nothing else.
        removed = await store.remove_tree(ROOT_INODE, b"snap", now())
        assert sorted(removed.unlinked) == sorted(change.inodes)
        await store.delete_inodes(removed.unlinked)
        assert sorted(shard_id for shard_id, _ in await store.garbage(10)) == [1, 2, 3]
        assert await store.shard_map(file.inode) == {0: (ref(4, 10),)}
        assert await names_in(store, ROOT_INODE) == {b"top"}
        assert (await store.getattr(ROOT_INODE)).nlink == 3
        await check_nlinks(store)

    run_with_store(harness, body)


def test_snapshot_tree_read_only_marks_every_inode_and_refuses_bad_targets(harness):
    async def body(store: MetadataStore) -> None:
        top = await mkdir(store, ROOT_INODE, b"top")
        file = await mkfile(store, top.inode, b"file")
        await store.commit_shards(file.inode, {0: ref(1)}, 1000)
        change = await store.snapshot_tree(top.inode, ROOT_INODE, b"ro", True, now())
        assert change.entry.attrs.readonly
        assert (await store.lookup(change.entry.attrs.inode, b"file")).readonly
        assert not (await store.getattr(top.inode)).readonly and not (await store.getattr(file.inode)).readonly

        single = await store.snapshot_tree(file.inode, top.inode, b"file-copy", False, now())
        assert (single.entry.attrs.nlink, single.entry.attrs.size) == (1, 1000)
        assert single.logical_bytes == 1000

        before = await store.getattr(ROOT_INODE)
        with pytest.raises(Exists):
            await store.snapshot_tree(top.inode, ROOT_INODE, b"ro", False, now())
        with pytest.raises(InvalidArgument):
            await store.snapshot_tree(top.inode, top.inode, b"inside", False, now())
        with pytest.raises(NotFound):
            await store.snapshot_tree(10**9, ROOT_INODE, b"nothing", False, now())
        with pytest.raises(NotADirectory):
            await store.snapshot_tree(top.inode, file.inode, b"x", False, now())
        assert await store.getattr(ROOT_INODE) == before
        assert await names_in(store, top.inode) == {b"file", b"file-copy"}

        # Removing a tree whose file has a name outside it keeps that file.
        await store.link(file.inode, ROOT_INODE, b"outside", now())
        removed = await store.remove_tree(ROOT_INODE, b"top", now())
        assert file.inode not in removed.unlinked and single.entry.attrs.inode in removed.unlinked
        assert (await store.lookup(ROOT_INODE, b"outside")).nlink == 1
        with pytest.raises(NotFound):
            await store.remove_tree(ROOT_INODE, b"top", now())
        await check_nlinks(store)

    run_with_store(harness, body)


def test_snapshot_tree_and_remove_tree_keep_quota_usage_exact(harness):
    async def body(store: MetadataStore) -> None:
        limited = await mkdir(store, ROOT_INODE, b"limited")
        source = await mkdir(store, limited.inode, b"source")
        inner = await mkdir(store, source.inode, b"inner")
        file = await mkfile(store, inner.inode, b"file")
        await store.commit_shards(file.inode, {0: ref(1, 1000)}, 1000)
        await store.link(file.inode, source.inode, b"again", now())
        await store.set_quota(limited.inode, 2500, 100)
        await store.set_quota(inner.inode, None, 10)
        assert await quota_usage(store, limited.inode) == (1000, 3)

        await store.snapshot_tree(source.inode, limited.inode, b"snap", False, now())
        assert await quota_usage(store, limited.inode) == (2000, 6)
        assert await quota_usage(store, inner.inode) == (1000, 1)  # quotas are not copied
        assert {quota.directory for quota in await store.quotas()} == {limited.inode, inner.inode}
        before = await store.getattr(limited.inode)
        with pytest.raises(QuotaExceeded):  # another 1000 bytes would pass 2500
            await store.snapshot_tree(source.inode, limited.inode, b"one-too-many", False, now())
        assert await store.getattr(limited.inode) == before

        await store.snapshot_tree(source.inode, ROOT_INODE, b"outside", False, now())  # no quota there
        assert await quota_usage(store, limited.inode) == (2000, 6)
        await store.remove_tree(limited.inode, b"source", now())
        assert await quota_usage(store, limited.inode) == (1000, 3)
        assert {quota.directory for quota in await store.quotas()} == {limited.inode}  # inner's went with it

    run_with_store(harness, body)


def test_files_in_the_trash_count_against_no_quota_and_restoring_one_is_charged(harness):
    async def body(store: MetadataStore) -> None:
        root_quota = await store.set_quota(ROOT_INODE, None, None)  # the trash is below the root, not in its quota
        limited = await mkdir(store, ROOT_INODE, b"limited")
        file = await mkfile(store, limited.inode, b"file")
        await store.commit_shards(file.inode, {0: ref(1, 1000)}, 1000)
        await store.set_quota(limited.inode, 1500, None)
        assert await quota_usage(store, limited.inode) == (1000, 1)
        assert await quota_usage(store, ROOT_INODE) == (1000, 2)

        deleted = await store.unlink(limited.inode, b"file", now(), trash_days=1)
        assert deleted.attrs.in_trash
        assert await quota_usage(store, limited.inode) == (0, 0)
        assert await quota_usage(store, ROOT_INODE) == (0, 1)

        other = await mkfile(store, limited.inode, b"other")
        await store.commit_shards(other.inode, {0: ref(2, 1000)}, 1000)
        (entry,) = await store.trash_entries()
        with pytest.raises(QuotaExceeded):  # back in: 2000 bytes where 1500 are allowed
            await store.rename(entry.hour_dir, entry.name, limited.inode, b"file", 0, now())
        await store.rename(entry.hour_dir, entry.name, ROOT_INODE, b"restored", 0, now())
        assert await quota_usage(store, ROOT_INODE) == (2000, 3)
        assert root_quota.directory == ROOT_INODE

    run_with_store(harness, body)


def test_snapshots_and_quotas_keep_out_of_the_trash(harness):
    async def body(store: MetadataStore) -> None:
        top = await mkdir(store, ROOT_INODE, b"top")
        await mkfile(store, top.inode, b"file")
        await store.unlink(top.inode, b"file", now(), trash_days=1)
        trash = await store.lookup(ROOT_INODE, TRASH_NAME)
        (entry,) = await store.trash_entries()
        refusals = [
            (Exists, store.snapshot_tree(top.inode, ROOT_INODE, TRASH_NAME, False, now())),
            (NotPermitted, store.snapshot_tree(top.inode, trash.inode, b"snap", False, now())),
            (NotPermitted, store.snapshot_tree(top.inode, entry.hour_dir, b"snap", False, now())),
            (NotPermitted, store.snapshot_tree(entry.inode, top.inode, b"snap", False, now())),
            (NotPermitted, store.set_quota(trash.inode, None, 5)),
            (NotPermitted, store.set_quota(entry.hour_dir, None, 5)),
        ]
        for error, call in refusals:
            with pytest.raises(error):
                await call
        assert await store.quotas() == []
        assert [e.inode for e in await store.trash_entries()] == [entry.inode]
        await check_nlinks(store)

    run_with_store(harness, body)


def test_remove_tree_uncharges_a_file_that_keeps_a_name_outside_the_quota(harness):
    async def body(store: MetadataStore) -> None:
        limited = await mkdir(store, ROOT_INODE, b"limited")
        tree = await mkdir(store, limited.inode, b"tree")
        file = await mkfile(store, tree.inode, b"file")
        await store.commit_shards(file.inode, {0: ref(1, 1000)}, 1000)
        await store.link(file.inode, ROOT_INODE, b"outside", now())
        await store.set_quota(limited.inode, None, None)  # set after the link: counts the file once
        assert await quota_usage(store, limited.inode) == (1000, 2)
        await store.remove_tree(limited.inode, b"tree", now())
        assert await quota_usage(store, limited.inode) == (0, 0)
        assert (await store.lookup(ROOT_INODE, b"outside")).nlink == 1

    run_with_store(harness, body)


def test_names_below_a_removed_tree_are_gone_from_the_cache_too(harness):
    async def main() -> None:
        async with harness.store() as store:
            top = await mkdir(store, ROOT_INODE, b"top")
            sub = await mkdir(store, top.inode, b"sub")
            file = await mkfile(store, sub.inode, b"file")
            await store.link(file.inode, ROOT_INODE, b"outside", now())
        async with harness.store() as store:  # a fresh cache: the lookup is a record of its own
            assert (await store.lookup(sub.inode, b"file")).inode == file.inode
            await store.remove_tree(ROOT_INODE, b"top", now())
            assert (await store.getattr(file.inode)).nlink == 1  # its attrs cached again
            with pytest.raises(NotFound):
                await store.lookup(sub.inode, b"file")
            assert await store.readdir(sub.inode, 0, 10) == []
            assert (await store.getattr(file.inode)).nlink == 1

    trio.run(main)


def test_object_encodings_settings_and_policy_xattrs_are_kept(harness):
    """An encoded object's ShardRef comes back whole (also to a snapshot and
    through set_shard_nodes), usage counts its payload, settings hold bytes,
    and a new file or directory copies every policy xattr of its directory."""
    compressed = Encoding(300, b"\7" * 16, "zstd", sealed=True)
    coded = Encoding(2000, b"\5" * 16, "", False, 4, 2, tuple(bytes([n]) * 16 for n in range(6)))

    async def body(store: MetadataStore) -> None:
        top = await mkdir(store, ROOT_INODE, b"top")
        file = await mkfile(store, top.inode, b"file")
        shards = {0: dataclasses.replace(ref(1, 1000), encoding=compressed),
                  1: dataclasses.replace(ref(2, 5000, ("a", "", "c", "d", "e", "f")), encoding=coded)}
        await store.commit_shards(file.inode, shards, 6000)
        assert await store.shard_map(file.inode) == {index: (shard,) for index, shard in shards.items()}
        usage = await store.usage()
        assert (usage.stored_bytes, usage.payload_bytes) == (6000, 2300)
        await store.set_shard_nodes(2, ("a", "b", "c", "d", "e", "f"))
        moved = (await store.shard_map(file.inode))[1][0]
        assert moved.encoding == coded and moved.nodes == ("a", "b", "c", "d", "e", "f")
        copy = (await store.snapshot_tree(top.inode, ROOT_INODE, b"snap", False, now())).entry.attrs
        file_copy = await store.lookup(copy.inode, b"file")
        assert await store.shard_map(file_copy.inode) == await store.shard_map(file.inode)

        assert await store.setting("keyring") is None
        await store.set_setting("keyring", b"\0\1binary")
        await store.set_setting("keyring", b"\0\2binary")
        assert await store.setting("keyring") == b"\0\2binary"

        for name, value in ((REPLICAS_XATTR, b"3"), (COMPRESSION_XATTR, b"lz4"), (ERASURE_XATTR, b"4+2")):
            await store.setxattr(top.inode, name, value, 0, now())
        await store.setxattr(top.inode, b"user.other", b"not inherited", 0, now())
        created = await store.create(top.inode, b"new", stat.S_IFREG | 0o644, 0, 0, now())
        expected = {REPLICAS_XATTR: b"3", COMPRESSION_XATTR: b"lz4", ERASURE_XATTR: b"4+2"}
        assert dict(created.xattrs) == expected
        assert sorted(await store.listxattr(created.attrs.inode)) == sorted(expected)
        sub = await store.create(top.inode, b"sub", stat.S_IFDIR | 0o755, 0, 0, now())
        assert dict(sub.xattrs) == expected

    run_with_store(harness, body)
