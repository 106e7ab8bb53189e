"""A write-through metadata cache in front of any MetadataStore.

Served from memory once seen: getattr; lookup, both found and not found;
whole directory listings, resumable at any offset; getxattr and listxattr,
including "no such attribute" (the kernel asks for security.capability before
every write, `ls -l` for security.selinux of every entry): an inode's names,
once listed, answer for every name it does not have, and of an inode created
through the cache every xattr is known (none, or the replica count it
inherited: EntryChange.xattrs); and shard maps. Every change goes to
the engine first; then the cache updates exactly what the change touched,
from what the engine returns (the attrs after of the inodes and parent
directories, the offsets of the entries). So creating a name costs one engine
call: the kernel's lookup of the new name, the getattr of the parent that
decides the new inode's group, and the xattrs of the new inode are answered
from memory.

Listings. A listing holds a directory's entries from its first on, with a name
index. One that is complete (read to its end, or started empty by a mkdir
through the cache) also answers lookups of absent names, and stays complete
through changes: an entry added goes in at its offset (a new name's is the
highest, so it is appended), an entry removed comes out. A partial listing
takes in an added entry only if its offset falls within the part it covers.

Other writers. With the embedded engine the cache sees every change (one
mount per data directory, which the data directory lock guarantees). A
shared engine tells it what other mounts change (`follow_changes`: the
notice of each commit, pushed): the records of the inodes and entries named
are dropped, under `_lock`, so a read that missed before the other commit
and returns after it cannot store what it read over the drop. Until a notice
arrives (milliseconds), a record may show the state before another mount's
change; `open_file` reads the attrs fresh, so a file closed on one mount and
opened on another shows all its bytes (close-to-open). Readdir offsets are
the engine's entry ids, valid whoever changes the directory.

Concurrency. A hit is answered without an await. A miss or a change holds
`_lock` from the engine call until the cache is updated, so records are
filled and changed in the order the engine saw the calls; otherwise a read
that started before a change could store what it read after the change was
applied. For SQLite, which runs one call at a time anyway, this costs
nothing; a networked engine would trade it for per-record versions. If a
change fails in a way that leaves its outcome unknown (anything but the
engine refusing it, e.g. a cancellation or a lost connection), the whole
cache is dropped.

Memory. Records are kept in one LRU order and weigh 1 each, plus 1 per
directory entry of a listing, per xattr of an xattr record and per shard of a
shard map; past `max_entries` the least recently used records are dropped
whole. The attrs of an inode live once, in an _AttrSlot shared by every record
that shows them (an attrs record, a lookup, listing entries), so a change
updates them in one place for all. A deleted inode's slot is marked stale, and
the next read of it goes to the engine.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import dataclasses
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence

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
)
from dfsfuse.metadata.base import (
    ROOT_INODE,
    AttrChanges,
    ChangeNotice,
    DirEntry,
    EntryChange,
    InodeAttrs,
    MetadataStore,
    NodeRecord,
    ProgressReport,
    QuotaRecord,
    RenameChange,
    SessionRecord,
    ShardLayers,
    ShardRecord,
    ShardRef,
    TrashEntry,
    TrashPurge,
    TreeChange,
    UsageCounts,
    same_file_state,
)
from dfsfuse.metadata.locks import LockRecord
from dfsfuse.metadata.trash import TRASH_NAME

# The errors with which an engine refuses a change and changes nothing.
_REFUSALS = (
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
)

# Record kinds; a record's key is (kind, inode) or, for lookups,
# (_LOOKUP, parent, name).
_RecordKey = tuple[str, int] | tuple[str, int, bytes]
_ATTRS = "attrs"
_LOOKUP = "lookup"
_LISTING = "listing"
_XATTRS = "xattrs"
_SHARD_MAP = "shard map"


class _AttrSlot:
    """The attrs of one inode, shared by every record that shows them.

    `attrs` is None while stale; `holders` counts the records referring to the
    slot, which goes away with the last of them.
    """

    __slots__ = ("attrs", "holders")

    def __init__(self, attrs: InodeAttrs):
        self.attrs: InodeAttrs | None = attrs
        self.holders = 0


class _Listing:
    """The entries of one directory from its first on, in offset order, with no
    gap: `entries` grows page by page while a listing reads on from its end,
    and is `complete` once the engine had nothing after the last entry. Each
    entry's attrs are in the slot of its inode; `entries[i].attrs` is the
    value last served, so an unchanged entry is served as it is. `names` maps
    the name of each entry held to its offset."""

    __slots__ = ("complete", "entries", "names", "offsets")

    def __init__(self, complete: bool = False) -> None:
        self.offsets: list[int] = []
        self.entries: list[DirEntry] = []
        self.names: dict[bytes, int] = {}
        self.complete = complete

    def covers(self, offset: int) -> bool:
        """Whether an entry at `offset` belongs in the listing as far as it goes."""
        return self.complete or (bool(self.offsets) and offset < self.offsets[-1])

    def position(self, name: bytes) -> int | None:
        """The index in `entries` of the entry named `name`, if held."""
        offset = self.names.get(name)
        return None if offset is None else bisect.bisect_left(self.offsets, offset)


class _Xattrs:
    """What is known of one inode's extended attributes."""

    __slots__ = ("names", "values")

    def __init__(self) -> None:
        self.values: dict[bytes, bytes | None] = {}  # None: known to be absent
        self.names: dict[bytes, None] | None = None  # every name, once listed

    def weight(self) -> int:
        return 1 + len(self.values) + len(self.names or ())


class CachedMetadata(MetadataStore):
    """`engine` behind a write-through cache of at most about `max_entries`
    records; see the module docstring for what is cached and when it is right."""

    def __init__(self, engine: MetadataStore, max_entries: int = 200_000):
        self._engine = engine
        self._max_entries = max_entries
        self._lock = trio.Lock()
        self._lru: collections.OrderedDict[_RecordKey, int] = collections.OrderedDict()  # key -> weight
        self._weight = 0
        self._slots: dict[int, _AttrSlot] = {}
        self._lookups: dict[_RecordKey, int | None] = {}  # lookup key -> inode, None: absent
        self._listings: dict[int, _Listing] = {}
        self._xattrs: dict[int, _Xattrs] = {}
        self._shard_maps: dict[int, Mapping[int, ShardLayers]] = {}
        # shard id -> {inode: index} of the held maps that have the object
        # (more than one file when snapshots share it)
        self._shard_places: dict[int, dict[int, int]] = {}

    @property
    def shared(self) -> bool:  # type: ignore[override]
        return self._engine.shared

    @property
    def cached_entries(self) -> int:
        """The total weight of the records held now; at most max_entries."""
        return self._weight

    # -- inodes and names -------------------------------------------------
    async def getattr(self, inode: int) -> InodeAttrs:
        slot = self._slots.get(inode)
        if slot is not None and slot.attrs is not None:
            self._touch((_ATTRS, inode))
            return slot.attrs
        async with self._lock:
            attrs = await self._engine.getattr(inode)
            self._store_attrs(attrs)
            return attrs

    async def lookup(self, parent: int, name: bytes) -> InodeAttrs:
        """Names and ".." are cached (the ".." of a directory goes when it moves
        or is removed); "." is not, as the kernel resolves it itself."""
        if name == b".":
            return await self._engine.lookup(parent, name)
        key = (_LOOKUP, parent, name)
        if key in self._lookups:
            inode = self._lookups[key]
            if inode is None:
                self._lru.move_to_end(key)
                raise NotFound(f"no {name!r} in directory {parent}")
            attrs = self._slots[inode].attrs
            if attrs is not None:
                self._lru.move_to_end(key)
                return attrs
        listing = self._listing_of_name(parent, name)
        if listing is not None:
            position = listing.position(name)
            if position is not None:
                attrs = self._slots[listing.entries[position].attrs.inode].attrs
                if attrs is not None:
                    self._lru.move_to_end((_LISTING, parent))
                    return attrs
            elif listing.complete:
                self._lru.move_to_end((_LISTING, parent))
                raise NotFound(f"no {name!r} in directory {parent}")
        async with self._lock:
            try:
                attrs = await self._engine.lookup(parent, name)
            except NotFound:
                self._set_lookup(parent, name, None)
                raise
            listing = self._listing_of_name(parent, name)
            if listing is not None and name in listing.names:
                self._refresh_attrs(attrs)
            else:
                self._set_lookup(parent, name, attrs)
            return attrs

    async def create(
        self,
        parent: int,
        name: bytes,
        mode: int,
        uid: int,
        gid: int,
        now_ns: int,
        rdev: int = 0,
        target: bytes = b"",
        opened_by: int | None = None,
    ) -> EntryChange:
        """A directory made here starts with a complete, empty listing, so that
        lookups of the names about to be created in it need no engine call; a
        regular file starts with an empty shard map, so opening it needs none;
        and the new inode's xattrs are all known (EntryChange.xattrs), so
        asking for its replica count or any other xattr needs none either."""
        async with self._changing():
            change = await self._engine.create(parent, name, mode, uid, gid, now_ns, rdev, target, opened_by)
            self._name_added(parent, name, change.attrs, change.offset)
            self._refresh_attrs(change.parent)
            inode = change.attrs.inode
            if stat.S_ISDIR(mode):
                self._listings[inode] = _Listing(complete=True)
                self._account((_LISTING, inode), 1)
            elif stat.S_ISREG(mode):
                self._shard_maps[inode] = {}
                self._account((_SHARD_MAP, inode), 1)
            self._set_xattr_names(inode, list(change.xattrs))
            for name, value in change.xattrs.items():
                self._remember_xattr(inode, name, value)
            return change

    async def link(self, inode: int, new_parent: int, new_name: bytes, now_ns: int) -> EntryChange:
        async with self._changing():
            change = await self._engine.link(inode, new_parent, new_name, now_ns)
            self._name_added(new_parent, new_name, change.attrs, change.offset)
            self._refresh_attrs(change.parent)
            return change

    async def unlink(self, parent: int, name: bytes, now_ns: int, trash_days: float = 0.0) -> EntryChange:
        async with self._changing():
            change = await self._engine.unlink(parent, name, now_ns, trash_days)
            self._follow_trash(change.trash)
            self._name_removed(parent, name)
            self._store_attrs(change.attrs)
            self._refresh_attrs(change.parent)
            return change

    async def snapshot_tree(
        self, source: int, parent: int, name: bytes, readonly: bool, now_ns: int,
        report: ProgressReport | None = None,
    ) -> TreeChange:
        async with self._changing():
            change = await self._engine.snapshot_tree(source, parent, name, readonly, now_ns, report)
            top = change.entry
            self._name_added(parent, name, top.attrs, top.offset)
            self._refresh_attrs(top.parent)
            self._set_xattr_names(top.attrs.inode, list(top.xattrs))
            for xattr, value in top.xattrs.items():
                self._remember_xattr(top.attrs.inode, xattr, value)
            return change

    async def remove_tree(self, parent: int, name: bytes, now_ns: int, report: ProgressReport | None = None) -> TreeChange:
        async with self._changing():
            change = await self._engine.remove_tree(parent, name, now_ns, report)
            # Names, listings and attrs all through the tree changed, and links
            # out of it: forget everything, as after a notice too large to say
            # (removing a tree is rare; looking each record up is not worth it).
            self._forget_everything()
            return change

    async def rmdir(self, parent: int, name: bytes, now_ns: int) -> EntryChange:
        async with self._changing():
            change = await self._engine.rmdir(parent, name, now_ns)
            self._name_removed(parent, name)
            self._store_attrs(change.attrs)
            self._refresh_attrs(change.parent)
            self._directory_removed(change.attrs.inode)
            return change

    async def rename(
        self,
        old_parent: int,
        old_name: bytes,
        new_parent: int,
        new_name: bytes,
        flags: int,
        now_ns: int,
        trash_days: float = 0.0,
    ) -> RenameChange | None:
        async with self._changing():
            change = await self._engine.rename(old_parent, old_name, new_parent, new_name, flags, now_ns, trash_days)
            if change is None:
                return None
            self._follow_trash(change.trash)
            if change.exchanged is not None:
                # Both entries stay where they are; only the inodes they name swap.
                self._name_replaced(old_parent, old_name, change.exchanged)
                self._name_replaced(new_parent, new_name, change.moved)
            else:
                self._name_removed(old_parent, old_name)
                self._name_added(new_parent, new_name, change.moved, change.offset)
            for moved in (change.moved, change.exchanged):
                if moved is not None:
                    self._remove((_LOOKUP, moved.inode, b".."))
            if change.replaced is not None:
                self._store_attrs(change.replaced)
                self._directory_removed(change.replaced.inode)
            for parent_attrs in change.parents:
                self._refresh_attrs(parent_attrs)
            return change

    async def setattr(self, inode: int, changes: AttrChanges, now_ns: int) -> InodeAttrs:
        async with self._changing():
            attrs = await self._engine.setattr(inode, changes, now_ns)
            self._store_attrs(attrs)
            return attrs

    async def readdir(self, parent: int, after: int, limit: int) -> list[DirEntry]:
        listing = self._listings.get(parent)
        if listing is not None:
            page = self._page(listing, after, limit)
            if page is not None:
                self._touch((_LISTING, parent))
                return page
        async with self._lock:
            page = await self._engine.readdir(parent, after, limit)
            self._absorb_page(parent, after, limit, page)
            return page

    async def delete_inodes(self, inodes: Sequence[int]) -> None:
        async with self._changing():
            await self._engine.delete_inodes(inodes)
            for inode in inodes:
                for kind in (_ATTRS, _XATTRS, _SHARD_MAP):
                    self._remove((kind, inode))
                self._directory_removed(inode)
                self._mark_stale(inode)

    async def orphan_inodes(self) -> list[int]:
        return await self._engine.orphan_inodes()

    async def trash_entries(self, expiring_before_ns: int | None = None) -> list[TrashEntry]:
        return await self._engine.trash_entries(expiring_before_ns)

    async def purge_trash(self, entries: Sequence[tuple[int, bytes]]) -> TrashPurge:
        async with self._changing():
            purge = await self._engine.purge_trash(entries)
            self._follow_trash(purge.notice)
            for attrs in purge.unlinked:
                self._store_attrs(attrs)
                self._directory_removed(attrs.inode)
            return purge

    # -- file contents ----------------------------------------------------
    async def shard_map(self, inode: int) -> Mapping[int, ShardLayers]:
        """The cache's own mapping, not a copy, so a hit costs nothing: the
        caller must not change it (see MetadataStore.shard_map).

        Nor does the cache change a mapping once handed out: a change of the
        file's shards (commit_shards, set_shard_nodes) puts a new one in its
        place. So a mapping stays as it was while its holder awaits, and a
        holder that wants the current one asks again (a hit has no await).
        """
        shard_map = self._shard_maps.get(inode)
        if shard_map is not None:
            self._touch((_SHARD_MAP, inode))
            return shard_map
        async with self._lock:
            shard_map = await self._engine.shard_map(inode)
            self._remove((_SHARD_MAP, inode))
            self._shard_maps[inode] = shard_map
            for index, layers in shard_map.items():
                for ref in layers:
                    self._place_shard(ref.shard_id, inode, index)
            self._account((_SHARD_MAP, inode), 1 + _object_count(shard_map))
            return shard_map

    async def commit_shards(
        self,
        inode: int,
        shards: Mapping[int, ShardRef],
        size: int,
        drop_from: int | None = None,
        mtime_ns: int | None = None,
        ctime_ns: int | None = None,
        *,
        changes: AttrChanges | None = None,
        holes: Sequence[int] = (),
    ) -> InodeAttrs:
        async with self._changing():
            attrs = await self._engine.commit_shards(
                inode, shards, size, drop_from, mtime_ns, ctime_ns, changes=changes, holes=holes
            )
            self._store_attrs(attrs)
            held = self._shard_maps.get(inode)
            if held is not None:
                shard_map = self._shard_maps[inode] = dict(held)  # a new mapping: see shard_map
                dropped = [index for index in shard_map if drop_from is not None and index >= drop_from]
                dropped += [index for index in holes if index in shard_map]
                dropped += [index for index, ref in shards.items() if not ref.is_patch and index in shard_map]
                for index in dropped:
                    for old in shard_map.pop(index, ()):
                        self._unplace_shard(old.shard_id, inode)
                for index, ref in shards.items():
                    shard_map[index] = shard_map.get(index, ()) + (ref,)
                    self._place_shard(ref.shard_id, inode, index)
                self._account((_SHARD_MAP, inode), 1 + _object_count(shard_map))
            return attrs

    async def allocate_shard_ids(self, count: int) -> range:
        return await self._engine.allocate_shard_ids(count)

    async def layout(self, shard_size: int, block_size: int) -> tuple[int, int]:
        return await self._engine.layout(shard_size, block_size)

    async def garbage(self, limit: int) -> list[tuple[int, tuple[str, ...]]]:
        return await self._engine.garbage(limit)

    async def forget_garbage(self, shard_ids: Sequence[int]) -> None:
        await self._engine.forget_garbage(shard_ids)

    async def shards(self, after_shard_id: int, limit: int) -> list[ShardRecord]:
        return await self._engine.shards(after_shard_id, limit)

    async def set_shard_nodes(self, shard_id: int, nodes: tuple[str, ...]) -> None:
        async with self._changing():
            await self._engine.set_shard_nodes(shard_id, nodes)
            for inode, index in self._shard_places.get(shard_id, {}).items():
                shard_map = self._shard_maps[inode] = dict(self._shard_maps[inode])  # see shard_map
                shard_map[index] = tuple(
                    dataclasses.replace(ref, nodes=tuple(nodes)) if ref.shard_id == shard_id else ref
                    for ref in shard_map[index]
                )

    async def usage(self) -> UsageCounts:
        return await self._engine.usage()

    async def setting(self, name: str) -> bytes | None:
        return await self._engine.setting(name)

    async def set_setting(self, name: str, value: bytes) -> None:
        await self._engine.set_setting(name, value)

    # -- directory quotas: passed through (kept by the engine, callers want them fresh) --
    async def set_quota(self, directory: int, max_bytes: int | None, max_inodes: int | None) -> QuotaRecord:
        return await self._engine.set_quota(directory, max_bytes, max_inodes)

    async def quota(self, directory: int) -> QuotaRecord:
        return await self._engine.quota(directory)

    async def quotas(self) -> list[QuotaRecord]:
        return await self._engine.quotas()

    async def quotas_of(self, inode: int) -> list[QuotaRecord]:
        return await self._engine.quotas_of(inode)

    async def remove_quota(self, directory: int) -> None:
        await self._engine.remove_quota(directory)

    async def check_quotas(self, repair: bool) -> list[tuple[QuotaRecord, QuotaRecord]]:
        return await self._engine.check_quotas(repair)

    # -- extended attributes ----------------------------------------------
    async def setxattr(self, inode: int, name: bytes, value: bytes, flags: int, now_ns: int) -> InodeAttrs:
        async with self._changing():
            attrs = await self._engine.setxattr(inode, name, value, flags, now_ns)
            self._refresh_attrs(attrs)
            xattrs = self._xattrs.get(inode)
            if xattrs is not None:
                xattrs.values[name] = value
                if xattrs.names is not None:
                    xattrs.names[name] = None
                self._account((_XATTRS, inode), xattrs.weight())
            return attrs

    async def getxattr(self, inode: int, name: bytes) -> bytes:
        """A miss lists the inode's names first: most names asked for are absent
        (security.selinux for each entry `ls -l` shows, security.capability
        before each write), and the list answers all of those from memory."""
        xattrs = self._xattrs.get(inode)
        if xattrs is not None:
            if name in xattrs.values:
                self._touch((_XATTRS, inode))
                value = xattrs.values[name]
                if value is None:
                    raise NoData(f"inode {inode} has no xattr {name!r}")
                return value
            if xattrs.names is not None and name not in xattrs.names:
                self._touch((_XATTRS, inode))
                raise NoData(f"inode {inode} has no xattr {name!r}")
        async with self._lock:
            xattrs = self._xattrs.get(inode)
            if xattrs is None or xattrs.names is None:
                self._set_xattr_names(inode, await self._engine.listxattr(inode))
                xattrs = self._xattrs.get(inode)
                if xattrs is not None and xattrs.names is not None and name not in xattrs.names:
                    raise NoData(f"inode {inode} has no xattr {name!r}")
            try:
                value = await self._engine.getxattr(inode, name)
            except NoData:
                self._remember_xattr(inode, name, None)
                raise
            self._remember_xattr(inode, name, value)
            return value

    async def listxattr(self, inode: int) -> list[bytes]:
        xattrs = self._xattrs.get(inode)
        if xattrs is not None and xattrs.names is not None:
            self._touch((_XATTRS, inode))
            return list(xattrs.names)
        async with self._lock:
            names = await self._engine.listxattr(inode)
            self._set_xattr_names(inode, names)
            return names

    async def removexattr(self, inode: int, name: bytes, now_ns: int) -> InodeAttrs:
        async with self._changing():
            attrs = await self._engine.removexattr(inode, name, now_ns)
            self._refresh_attrs(attrs)
            xattrs = self._xattrs.get(inode)
            if xattrs is not None:
                xattrs.values[name] = None
                if xattrs.names is not None:
                    xattrs.names.pop(name, None)
                self._account((_XATTRS, inode), xattrs.weight())
            return attrs

    # -- sessions: passed through, but for what they say of inodes ---------
    async def open_session(self, host: str, pid: int, mountpoint: str) -> int:
        return await self._engine.open_session(host, pid, mountpoint)

    async def heartbeat(self, session: int, synced_ns: int = 0) -> bool:
        return await self._engine.heartbeat(session, synced_ns)

    async def reap_sessions(self, timeout_ns: int) -> list[SessionRecord]:
        return await self._engine.reap_sessions(timeout_ns)

    async def list_sessions(self) -> list[SessionRecord]:
        return await self._engine.list_sessions()

    async def close_session(self, session: int) -> None:
        await self._engine.close_session(session)

    async def open_file(self, session: int, inode: int) -> InodeAttrs:
        """Fresh attrs from the engine. If they differ from the cached ones
        (another mount changed the file and its notice is still on the way),
        what the cache holds of the file's contents and xattrs goes too."""
        async with self._changing():
            attrs = await self._engine.open_file(session, inode)
            slot = self._slots.get(inode)
            if slot is not None and slot.attrs is not None and not same_file_state(slot.attrs, attrs):
                self._forget_inode(inode)
            self._store_attrs(attrs)
            return attrs

    async def close_files(self, session: int, inodes: Sequence[int]) -> None:
        await self._engine.close_files(session, inodes)

    async def set_lock(self, session: int, inode: int, request: LockRecord) -> LockRecord | None:
        return await self._engine.set_lock(session, inode, request)

    async def test_lock(self, inode: int, request: LockRecord) -> LockRecord | None:
        return await self._engine.test_lock(inode, request)

    async def release_locks(self, session: int, inode: int, owners: Sequence[int], kind: str | None) -> None:
        await self._engine.release_locks(session, inode, owners, kind)

    async def follow_changes(
        self, session: int, on_change: Callable[[ChangeNotice], Awaitable[None]],
        *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """The engine's notices, applied to the cache first, then passed on."""

        async def apply(notice: ChangeNotice) -> None:
            async with self._lock:
                self._apply(notice)
            await on_change(notice)

        await self._engine.follow_changes(session, apply, task_status=task_status)

    async def send_barrier(self, session: int, token: int) -> int | None:
        return await self._engine.send_barrier(session, token)

    async def try_role(self, role: str, wait: float = 0.0) -> bool:
        return await self._engine.try_role(role, wait)

    async def release_role(self, role: str) -> None:
        await self._engine.release_role(role)

    def _apply(self, notice: ChangeNotice) -> None:
        if notice.everything:
            self._forget_everything()
            return
        for inode in notice.inodes:
            self._forget_inode(inode)
        for parent, name in notice.entries:
            self._remove((_LOOKUP, parent, name))
            self._remove((_LISTING, parent))

    def _forget_inode(self, inode: int) -> None:
        """Another mount changed `inode`: its attrs are stale, its xattrs,
        shard map and ".." unknown."""
        for key in ((_ATTRS, inode), (_XATTRS, inode), (_SHARD_MAP, inode), (_LOOKUP, inode, b"..")):
            self._remove(key)
        self._mark_stale(inode)

    # -- the node registry: passed through, never cached ------------------
    async def nodes(self) -> list[NodeRecord]:
        return await self._engine.nodes()

    async def add_node(self, name: str, address: str) -> NodeRecord:
        return await self._engine.add_node(name, address)

    async def set_node_state(self, name: str, state: str) -> None:
        await self._engine.set_node_state(name, state)

    async def record_node_stat(self, name: str, capacity: int, used: int, shards: int, seen_ns: int) -> None:
        await self._engine.record_node_stat(name, capacity, used, shards, seen_ns)

    async def remove_node(self, name: str) -> None:
        await self._engine.remove_node(name)

    async def snapshot(self) -> bytes:
        return await self._engine.snapshot()

    async def sync(self) -> None:
        await self._engine.sync()

    async def close(self) -> None:
        self._forget_everything()
        await self._engine.close()

    # -- changes ------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _changing(self) -> AsyncIterator[None]:
        """Hold the lock around a change; forget everything if its outcome is unknown."""
        async with self._lock:
            try:
                yield
            except _REFUSALS:
                raise
            except BaseException:
                self._forget_everything()
                raise

    def _follow_trash(self, notice: ChangeNotice | None) -> None:
        """A change also moved names into, out of or within the trash: forget
        the listings and names it changed there and the attrs and xattrs of
        the inodes it touched (the engine returns no attrs of the trash's
        directories)."""
        if notice is None:
            return
        for inode in notice.inodes:
            self._remove((_XATTRS, inode))
            self._mark_stale(inode)
        for parent, name in notice.entries:
            self._remove((_LOOKUP, parent, name))
            self._remove((_LISTING, parent))

    def _directory_removed(self, inode: int) -> None:
        """`inode`, if a directory, has no name any more: forget its listing and ".."."""
        self._remove((_LISTING, inode))
        self._remove((_LOOKUP, inode, b".."))

    def _name_added(self, parent: int, name: bytes, attrs: InodeAttrs, offset: int) -> None:
        """`name` in `parent` now names the inode of `attrs` by the entry at
        `offset`; the entry the name had before, if any, is gone."""
        listing = self._listings.get(parent)
        if listing is not None:
            self._unlist(parent, listing, name)
        if listing is not None and listing.covers(offset):
            self._remove((_LOOKUP, parent, name))
            position = bisect.bisect_left(listing.offsets, offset)
            self._hold(attrs)
            listing.offsets.insert(position, offset)
            listing.entries.insert(position, DirEntry(name, attrs, offset))
            listing.names[name] = offset
            self._account((_LISTING, parent), 1 + len(listing.entries))
        else:
            self._set_lookup(parent, name, attrs)

    def _name_removed(self, parent: int, name: bytes) -> None:
        """`name` in `parent` names nothing any more."""
        listing = self._listings.get(parent)
        if listing is not None:
            self._unlist(parent, listing, name)
        if listing is not None and listing.complete:
            self._remove((_LOOKUP, parent, name))  # the listing answers that it is absent
        else:
            self._set_lookup(parent, name, None)

    def _name_replaced(self, parent: int, name: bytes, attrs: InodeAttrs) -> None:
        """`name` in `parent` keeps its entry, which now names the inode of `attrs`."""
        listing = self._listings.get(parent)
        position = None if listing is None else listing.position(name)
        if listing is not None and position is not None:
            entry = listing.entries[position]
            self._hold(attrs)
            self._release(entry.attrs.inode)
            listing.entries[position] = DirEntry(name, attrs, entry.offset)
            self._remove((_LOOKUP, parent, name))
        else:
            self._set_lookup(parent, name, attrs)

    def _unlist(self, parent: int, listing: _Listing, name: bytes) -> None:
        """Take the entry named `name` out of `parent`'s listing, if it holds it."""
        position = listing.position(name)
        if position is not None:
            del listing.offsets[position], listing.names[name]
            self._release(listing.entries.pop(position).attrs.inode)
            self._account((_LISTING, parent), 1 + len(listing.entries))

    def _listing_of_name(self, parent: int, name: bytes) -> _Listing | None:
        """The listing of `parent` if held, where `name` is or would be; None
        for "..", which no listing holds, and for the trash, which the root's
        listing does not show."""
        if name == b".." or (parent == ROOT_INODE and name == TRASH_NAME):
            return None
        return self._listings.get(parent)

    # -- attrs slots ----------------------------------------------------------
    def _store_attrs(self, attrs: InodeAttrs) -> None:
        """Fresh attrs: update the inode's slot, and keep them in an attrs record."""
        key = (_ATTRS, attrs.inode)
        if key in self._lru:
            self._slots[attrs.inode].attrs = attrs
            self._lru.move_to_end(key)
        else:
            self._hold(attrs)
            self._account(key, 1)

    def _refresh_attrs(self, attrs: InodeAttrs) -> None:
        """Fresh attrs: update the inode's slot if something holds it."""
        slot = self._slots.get(attrs.inode)
        if slot is not None:
            slot.attrs = attrs

    def _mark_stale(self, inode: int) -> None:
        slot = self._slots.get(inode)
        if slot is not None:
            slot.attrs = None

    def _hold(self, attrs: InodeAttrs) -> None:
        slot = self._slots.get(attrs.inode)
        if slot is None:
            slot = self._slots[attrs.inode] = _AttrSlot(attrs)
        slot.attrs = attrs
        slot.holders += 1

    def _release(self, inode: int) -> None:
        slot = self._slots[inode]
        slot.holders -= 1
        if slot.holders == 0:
            del self._slots[inode]

    # -- lookups, listings, xattrs ----------------------------------------------
    def _set_lookup(self, parent: int, name: bytes, attrs: InodeAttrs | None) -> None:
        """Record that `name` in `parent` names the inode of `attrs` (None: nothing)."""
        key = (_LOOKUP, parent, name)
        self._remove(key)
        if attrs is not None:
            self._hold(attrs)
        self._lookups[key] = None if attrs is None else attrs.inode
        self._account(key, 1)

    def _page(self, listing: _Listing, after: int, limit: int) -> list[DirEntry] | None:
        """The page readdir(after, limit) from memory; None if the listing does
        not reach that far yet or an entry's attrs are stale."""
        start = bisect.bisect_right(listing.offsets, after)
        end = start + max(limit, 0)
        if end > len(listing.entries) and not listing.complete:
            return None
        page = listing.entries[start:end]
        for position, entry in enumerate(page):
            attrs = self._slots[entry.attrs.inode].attrs
            if attrs is not entry.attrs:
                if attrs is None:
                    return None
                entry = DirEntry(entry.name, attrs, entry.offset)
                page[position] = listing.entries[start + position] = entry
        return page

    def _absorb_page(self, parent: int, after: int, limit: int, page: list[DirEntry]) -> None:
        """Learn from a page the engine returned: fresh attrs for its entries, and
        more of the directory's listing when the page continues it without a gap."""
        for entry in page:
            self._refresh_attrs(entry.attrs)
        if limit <= 0:
            return
        listing = self._listings.get(parent)
        if listing is None:
            if after != 0:
                return
            listing = self._listings[parent] = _Listing()
        covered = listing.offsets[-1] if listing.offsets else 0
        if listing.complete or after > covered:
            return
        if page:
            for entry in page[bisect.bisect_right([entry.offset for entry in page], covered) :]:
                self._hold(entry.attrs)
                listing.offsets.append(entry.offset)
                listing.entries.append(entry)
                listing.names[entry.name] = entry.offset
        elif after == covered:
            listing.complete = True
        self._account((_LISTING, parent), 1 + len(listing.entries))

    def _set_xattr_names(self, inode: int, names: list[bytes]) -> None:
        """Record every xattr name `inode` has."""
        xattrs = self._xattrs.setdefault(inode, _Xattrs())
        xattrs.names = dict.fromkeys(names)
        self._account((_XATTRS, inode), xattrs.weight())

    def _remember_xattr(self, inode: int, name: bytes, value: bytes | None) -> None:
        xattrs = self._xattrs.setdefault(inode, _Xattrs())
        xattrs.values[name] = value
        self._account((_XATTRS, inode), xattrs.weight())

    # -- the LRU ------------------------------------------------------------------
    def _touch(self, key: _RecordKey) -> None:
        """Mark a record as just used, if there is one (attrs may be held by other records only)."""
        try:
            self._lru.move_to_end(key)
        except KeyError:
            pass

    def _account(self, key: _RecordKey, weight: int) -> None:
        """Register a record or its new weight as just used, then evict the least
        recently used records (possibly this one) down to max_entries."""
        self._weight += weight - self._lru.pop(key, 0)
        self._lru[key] = weight
        while self._weight > self._max_entries and self._lru:
            evicted, evicted_weight = self._lru.popitem(last=False)
            self._weight -= evicted_weight
            self._drop(evicted)

    def _remove(self, key: _RecordKey) -> None:
        weight = self._lru.pop(key, None)
        if weight is not None:
            self._weight -= weight
            self._drop(key)

    def _drop(self, key: _RecordKey) -> None:
        """Free the data of a record that has left the LRU."""
        kind = key[0]
        if kind == _LOOKUP:
            named = self._lookups.pop(key)
            if named is not None:
                self._release(named)
            return
        inode = key[1]
        if kind == _ATTRS:
            self._release(inode)
        elif kind == _LISTING:
            for entry in self._listings.pop(inode).entries:
                self._release(entry.attrs.inode)
        elif kind == _XATTRS:
            del self._xattrs[inode]
        else:
            for layers in self._shard_maps.pop(inode).values():
                for ref in layers:
                    self._unplace_shard(ref.shard_id, inode)

    def _place_shard(self, shard_id: int, inode: int, index: int) -> None:
        self._shard_places.setdefault(shard_id, {})[inode] = index

    def _unplace_shard(self, shard_id: int, inode: int) -> None:
        places = self._shard_places[shard_id]
        del places[inode]
        if not places:
            del self._shard_places[shard_id]

    def _forget_everything(self) -> None:
        self._lru.clear()
        self._weight = 0
        self._slots.clear()
        self._lookups.clear()
        self._listings.clear()
        self._xattrs.clear()
        self._shard_maps.clear()
        self._shard_places.clear()


def _object_count(shard_map: Mapping[int, ShardLayers]) -> int:
    return sum(len(layers) for layers in shard_map.values())
