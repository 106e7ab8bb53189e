"""POSIX semantics over the metadata store and shard I/O, free of FUSE.

The FUSE adapter converts each kernel request into one call here. This layer
adds what neither the metadata engine nor the stores know about: open files
and their contents, kernel references (lookup counts) that keep an unlinked
inode alive, ownership rules for new inodes (umask, setgid directories) and
name limits.

An inode whose last name is removed is deleted only when no handle has it
open and the kernel holds no reference to it, by the garbage collector's next
round (shards/garbage.py); if the mount dies first, the next mount deletes it
(`orphan_inodes`).

Other mounts (a shared engine). The first open of a file records it as open
in this mount's session (cluster/session.py), so that an unlink elsewhere
leaves its data until this mount closes it, and reads its attrs fresh: if
another mount changed the file since this one cached it, the open says so
(`changed_elsewhere`), and the kernel must not keep the pages it cached. A
file open here that another mount changes (`note_changes`) takes the new
size and times before its next read or getattr.

The trash (dfsfuse/metadata/trash.py). An unlink, or a rename that replaces
a file, hands the engine the configured `trash_days`; the engine moves a
last name into the trash instead of removing it, so the inode stays with its
data and nlink and nothing here deletes it. Files in the trash cannot be
changed (EPERM): no setattr, xattr change or open for writing. Files leave
the trash for good through `purge_trash` (the background expiry,
vfs/trash.py, and `dfsfuse trash empty`), which deletes them like unlinked
files: once unreferenced.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable

import trio

from ..cluster.session import MountSession
from ..errors import (
    DfsError,
    InvalidArgument,
    IsADirectory,
    NoSpace,
    NotPermitted,
    ReadOnly,
)
from ..metadata.base import (
    NAME_MAX,
    POLICY_XATTRS,
    ROOT_INODE,
    AttrChanges,
    ChangeNotice,
    DirEntry,
    EntryChange,
    InodeAttrs,
    ProgressReport,
    TrashPurge,
    TreeChange,
    check_name,
    same_file_state,
)
from ..metadata.trash import TRASH_DAYS_XATTR, parse_days
from ..shards.policy import (
    StoragePolicy,
    check_policy_value,
    policy_of,
)
from ..write.file_writer import WriteServices
from .contents import FileContents
from .locking import FileLocks
from .reader import ReadServices

log = logging.getLogger("dfsfuse.vfs")

# fallocate(2) modes (linux/falloc.h); Linux passes a FUSE file system no others.
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


@dataclasses.dataclass(frozen=True)
class Caller:
    """Who makes a request: the process's fsuid, fsgid and umask."""

    uid: int
    gid: int
    umask: int = 0o022


@dataclasses.dataclass(frozen=True)
class FsStats:
    block_size: int
    blocks: int
    blocks_free: int
    files: int
    files_free: int
    name_max: int = NAME_MAX


@dataclasses.dataclass
class Handle:
    contents: FileContents
    flags: int
    next_offset: int = 0  # where a sequential reader would read next
    changed_elsewhere: bool = False  # the open found the file changed by another mount


class FileSystem:
    """The POSIX layer; `replicas` is the configured R (statfs divides by it);
    `session` this mount's, if it has one (not in the component tests);
    `trash_days` the configured trash_days (0: no trash where no directory
    asks for one)."""

    def __init__(
        self, writes: WriteServices, reads: ReadServices, replicas: int, session: MountSession | None = None,
        trash_days: float = 0.0, compression: str = "",
    ):
        self._trash_days = trash_days
        self._compression = compression  # the config's, for files without user.dfs.compression
        # Set by the mount once the FUSE adapter exists (as session.barrier is):
        # drops from the kernel's caches what changed without a kernel request
        # (names purged from the trash), so that the kernel lets go of them.
        self.kernel_invalidator: Callable[[ChangeNotice], Awaitable[None]] | None = None
        self._meta = writes.meta
        self._replicator = writes.replicator
        self._garbage = writes.garbage
        self._unsynced = writes.unsynced
        self._quotas = writes.quotas
        self._writes = writes
        self._reads = reads
        self._replicas = replicas
        self._files: dict[int, FileContents] = {}
        self._handles: dict[int, Handle] = {}
        self._next_handle = 1
        self._refs: collections.Counter[int] = collections.Counter()
        self._unlinked: set[int] = set()
        self._session = session
        self._stale: set[int] = set()  # open files another mount changed since
        # The attrs of open files as of the last time this mount made sure the
        # kernel's cached pages showed them (revalidate_for_lock).
        self._pages_seen: dict[int, InodeAttrs] = {}
        self._revalidating: collections.defaultdict[int, trio.Lock] = collections.defaultdict(trio.Lock)
        self.locks = None if session is None else FileLocks(self._meta, session.id)

    @property
    def session_lost(self) -> bool:
        """Whether this mount's session was reclaimed: then nothing it does is safe."""
        return self._session is not None and self._session.lost

    def known_inodes(self) -> list[int]:
        """The inodes the kernel holds references to."""
        return list(self._refs)

    def note_changes(self, notice: ChangeNotice) -> None:
        """Another mount changed these inodes: open files here re-read their
        attrs, and the quota usage is read again before the next growth."""
        self._stale.update(self._files if notice.everything else notice.inodes & self._files.keys())
        self._quotas.note_changes()

    async def _refresh_if_stale(self, inode: int) -> None:
        if inode in self._stale:
            self._stale.discard(inode)
            contents = self._files.get(inode)
            if contents is not None:
                contents.writer.adopt(await self._meta.getattr(inode))

    async def shutdown(self) -> None:
        """After the kernel let go: write everything, delete what is unreferenced."""
        for contents in list(self._files.values()):
            try:
                await contents.flush(sync=True)
            except DfsError as error:
                log.error("inode %d: data could not be stored at unmount: %s", contents.inode, error)
        self._handles.clear()
        self._files.clear()
        self._refs.clear()
        self._garbage.doom(self._unlinked)
        self._unlinked.clear()
        await self._garbage.collect()
        await self._meta.sync()
        await trio.to_thread.run_sync(os.sync)

    def _contents(self, attrs: InodeAttrs, policy: StoragePolicy) -> FileContents:
        """A file's contents, registered, so every open shares them."""
        contents = self._files[attrs.inode] = FileContents(attrs, policy, self._writes, self._reads)
        return contents

    # -- kernel references -----------------------------------------------------
    def add_ref(self, inode: int, count: int = 1) -> None:
        self._refs[inode] += count

    async def forget(self, inode: int, count: int) -> None:
        remaining = self._refs[inode] - count
        if remaining > 0:
            self._refs[inode] = remaining
            return
        del self._refs[inode]
        self._delete_if_unreferenced(inode)

    def _delete_if_unreferenced(self, inode: int) -> None:
        """Hand an unlinked inode that nothing refers to any more to the garbage
        collector, which deletes it with the others of its round: one engine
        transaction for a whole `rm -rf`, not one per file."""
        if inode in self._unlinked and not self._refs[inode] and inode not in self._files:
            self._unlinked.discard(inode)
            self._unsynced.forget(inode)
            self._garbage.doom([inode])

    def _note_links(self, attrs: InodeAttrs | None) -> None:
        if attrs is not None and attrs.nlink == 0:
            self._unlinked.add(attrs.inode)

    # -- names -----------------------------------------------------------------
    async def lookup(self, parent: int, name: bytes) -> InodeAttrs:
        if name not in (b".", b".."):  # the engine resolves those
            check_name(name)
        attrs = self._overlay(await self._meta.lookup(parent, name))
        self.add_ref(attrs.inode)
        return attrs

    async def getattr(self, inode: int) -> InodeAttrs:
        await self._refresh_if_stale(inode)
        return self._overlay(await self._meta.getattr(inode))

    async def getattr_of_parent(self, inode: int) -> InodeAttrs:
        """The attributes of a directory's parent, without a kernel reference."""
        return self._overlay(await self._meta.lookup(inode, b".."))

    def _overlay(self, attrs: InodeAttrs) -> InodeAttrs:
        """Attributes with the not yet committed size and times of an open file."""
        contents = self._files.get(attrs.inode)
        if contents is None:
            return attrs
        writer = contents.writer
        return dataclasses.replace(
            attrs, size=writer.size, mtime_ns=writer.mtime_ns, ctime_ns=max(attrs.ctime_ns, writer.ctime_ns)
        )

    async def create_node(
        self, parent: int, name: bytes, mode: int, caller: Caller, rdev: int = 0, target: bytes = b""
    ) -> InodeAttrs:
        """mknod, mkdir and symlink: a new inode owned by the caller."""
        return (await self._create(parent, name, mode, caller, rdev, target)).attrs

    async def _create(
        self, parent: int, name: bytes, mode: int, caller: Caller, rdev: int = 0, target: bytes = b"",
        opened_by: int | None = None,
    ) -> EntryChange:
        """One engine call, which also gives a new file or directory the
        parent's storage policy (POLICY_XATTRS), and records a file created
        open as open in `opened_by`, a session."""
        check_name(name)
        parent_attrs = await self._meta.getattr(parent)
        _check_writable(parent_attrs)
        mode, gid = _new_mode_and_group(parent_attrs, mode, caller)
        created = await self._meta.create(
            parent, name, mode, caller.uid, gid, time.time_ns(), rdev=rdev, target=target, opened_by=opened_by
        )
        self.add_ref(created.attrs.inode)
        return created

    async def _policy_of(self, inode: int) -> StoragePolicy:
        """How the file's new objects are stored: its xattrs over the config."""
        names = [name for name in await self._meta.listxattr(inode) if name in POLICY_XATTRS]
        return policy_of({name: await self._meta.getxattr(inode, name) for name in names}, self._compression)

    async def link(self, inode: int, new_parent: int, new_name: bytes) -> InodeAttrs:
        check_name(new_name)
        await self._check_writable(inode, new_parent)  # a link changes the inode's nlink and ctime
        attrs = self._overlay((await self._meta.link(inode, new_parent, new_name, time.time_ns())).attrs)
        self._quotas.names_changed()
        self._unlinked.discard(inode)
        self.add_ref(inode)
        return attrs

    async def unlink(self, parent: int, name: bytes) -> None:
        check_name(name)
        await self._check_writable(parent)
        attrs = (await self._meta.unlink(parent, name, time.time_ns(), self._trash_days)).attrs
        self._quotas.names_changed()
        self._note_links(attrs)
        self._delete_if_unreferenced(attrs.inode)

    async def rmdir(self, parent: int, name: bytes) -> None:
        check_name(name)  # also refuses '.' and '..' (EINVAL)
        await self._check_writable(parent)
        attrs = (await self._meta.rmdir(parent, name, time.time_ns())).attrs
        self._note_links(attrs)
        self._delete_if_unreferenced(attrs.inode)

    async def rename(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes, flags: int) -> None:
        check_name(old_name)
        check_name(new_name)
        await self._check_writable(old_parent, new_parent)
        change = await self._meta.rename(
            old_parent, old_name, new_parent, new_name, flags, time.time_ns(), self._trash_days
        )
        self._quotas.names_changed()
        if change is not None and change.replaced is not None:
            self._note_links(change.replaced)
            self._delete_if_unreferenced(change.replaced.inode)

    async def purge_trash(self, entries: list[tuple[int, bytes]]) -> TrashPurge:
        """Remove these (hour directory, name) entries from the trash for good;
        their inodes are deleted once unreferenced, as after an unlink. The
        kernel is told to forget the names, or a name it looked up would
        keep its inode referenced until the kernel evicts it."""
        purge = await self._meta.purge_trash(entries)
        for attrs in purge.unlinked:
            self._note_links(attrs)
            self._delete_if_unreferenced(attrs.inode)
        await self._tell_kernel(purge.notice)
        return purge


    async def readlink(self, inode: int) -> bytes:
        attrs = await self._meta.getattr(inode)
        if not stat.S_ISLNK(attrs.mode):
            raise InvalidArgument("not a symbolic link")
        return attrs.target

    async def readdir(self, inode: int, after: int, limit: int) -> list[DirEntry]:
        entries = await self._meta.readdir(inode, after, limit)
        return [dataclasses.replace(entry, attrs=self._overlay(entry.attrs)) for entry in entries]

    async def _check_writable(self, *inodes: int) -> None:
        """ReadOnly (EROFS) if any of these inodes belongs to a read-only
        snapshot (names in a directory of the trash the engine guards)."""
        for inode in inodes:
            _check_writable(await self._meta.getattr(inode))

    async def _check_changeable(self, inode: int) -> None:
        """As _check_writable, and NotPermitted (EPERM) for a file in the trash:
        its data and attributes stay as they were deleted."""
        attrs = await self._meta.getattr(inode)
        _check_writable(attrs)
        if attrs.in_trash:
            raise NotPermitted("files in the trash cannot be changed; move one out to restore it")

    # -- attributes ------------------------------------------------------------
    async def setattr(self, inode: int, changes: AttrChanges, size: int | None) -> InodeAttrs:
        """One engine call: with a size, the truncate commits the other changes too."""
        await self._check_changeable(inode)
        if size is not None:
            await self._truncate(inode, size, None if changes == AttrChanges() else changes)
        else:
            contents = self._files.get(inode)
            if contents is None:
                await self._meta.setattr(inode, changes, time.time_ns())
            else:
                await contents.writer.setattr(changes, time.time_ns())
        return await self.getattr(inode)

    async def _truncate(self, inode: int, size: int, changes: AttrChanges | None) -> None:
        if size < 0:
            raise InvalidArgument("negative size")
        contents = self._files.get(inode)
        if contents is not None:
            await contents.truncate(size, changes)
            return
        attrs = await self._meta.getattr(inode)
        if stat.S_ISDIR(attrs.mode):
            raise IsADirectory("cannot truncate a directory")
        if not stat.S_ISREG(attrs.mode):
            raise InvalidArgument("only regular files can be truncated")
        policy = await self._policy_of(inode)
        contents = self._files.get(inode)  # opened meanwhile?
        if contents is None:
            # Registered while it works, so an open in the meantime shares it.
            contents = self._contents(attrs, policy)
        try:
            await contents.truncate(size, changes)
        finally:
            self._drop_if_closed(contents)

    async def statfs(self, inode: int = ROOT_INODE) -> FsStats:
        """The file system's capacity and use, as seen from `inode`: below a
        directory quota (the nearest one above `inode`), its limits are the
        totals and its usage the used part (free never more than the nodes
        have), as on a JuiceFS --subdir mount."""
        capacity, free = await self._replicator.capacity()
        capacity //= self._replicas
        free //= self._replicas
        usage = await self._meta.usage()
        block = 4096
        files = max(2**32, usage.inodes * 2)
        stats = FsStats(block, capacity // block, free // block, files, files - usage.inodes)
        if not await self._quotas.any_anywhere():
            return stats
        quotas = await self._meta.quotas_of(inode)
        if not quotas:
            return stats
        quota = quotas[0]
        if quota.max_bytes is not None:
            left = max(0, quota.max_bytes - quota.used_bytes)
            stats = dataclasses.replace(
                stats, blocks=-(-quota.max_bytes // block), blocks_free=min(left, free) // block
            )
        if quota.max_inodes is not None:
            stats = dataclasses.replace(
                stats, files=quota.max_inodes, files_free=max(0, quota.max_inodes - quota.used_inodes)
            )
        return stats

    # -- extended attributes ---------------------------------------------------
    async def setxattr(self, inode: int, name: bytes, value: bytes, flags: int) -> None:
        _check_xattr_name(name)
        await self._check_changeable(inode)
        if name in POLICY_XATTRS:
            value = check_policy_value(name, value, len(self._replicator.writable))
        if name == TRASH_DAYS_XATTR:
            value = _check_trash_days_value(value)
        await self._meta.setxattr(inode, name, value, flags, time.time_ns())

    async def getxattr(self, inode: int, name: bytes) -> bytes:
        _check_xattr_name(name)
        return await self._meta.getxattr(inode, name)

    async def listxattr(self, inode: int) -> list[bytes]:
        return await self._meta.listxattr(inode)

    async def removexattr(self, inode: int, name: bytes) -> None:
        _check_xattr_name(name)
        await self._check_changeable(inode)
        await self._meta.removexattr(inode, name, time.time_ns())

    # -- open files ------------------------------------------------------------
    async def open(self, inode: int, flags: int) -> int:
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            await self._check_changeable(inode)
        contents = self._files.get(inode)
        changed = False
        if contents is None or not contents.open_count:
            attrs, changed = await self._open_attrs(inode)
            if not stat.S_ISREG(attrs.mode):
                if self._session is not None:
                    self._session.closed(inode)
                if stat.S_ISDIR(attrs.mode):
                    raise IsADirectory("cannot open a directory as a file")
                raise InvalidArgument("not a regular file")
            if contents is None:
                policy = await self._policy_of(inode)
                contents = self._files.get(inode)  # another open may have won the race
                if contents is None:
                    contents = self._contents(attrs, policy)
            elif changed:
                contents.writer.adopt(attrs)
        handle = await self._open_contents(contents, flags)
        self._handles[handle].changed_elsewhere = changed
        return handle

    async def _open_attrs(self, inode: int) -> tuple[InodeAttrs, bool]:
        """The attrs of a file being opened and whether another mount changed
        it since this one cached them; recorded as open in the session if
        other mounts could delete it meanwhile."""
        if self._session is None or not self._session.records_open:
            return await self._meta.getattr(inode), False
        before = await self._meta.getattr(inode)
        attrs = await self._session.open_file(inode)
        self._pages_seen[inode] = attrs  # the open drops stale pages (changed_elsewhere)
        return attrs, not same_file_state(before, attrs)

    async def store_for_unlock(self, inode: int) -> None:
        """Before a lock on the file is let go: store what was written under
        it, so that whoever takes the lock next, on any mount, reads it (as
        NFS does at an unlock)."""
        contents = self._files.get(inode)
        if contents is not None and not contents.is_clean:
            await contents.flush(sync=False)

    async def revalidate_for_lock(self, inode: int, drop_pages: Callable[[], Awaitable[None]]) -> None:
        """After a lock on the file was taken: whether the kernel's cached
        pages of it may be stale, so that the lock holder reads what the
        last holder wrote, on whichever mount. They are unless the file is
        as it was when this mount last made sure of them (an open, an
        earlier lock): a notice of the change may be on the way or still
        being applied, so neither the cache nor the notices can tell. An
        open file here takes the file's new size, and `drop_pages` drops the
        kernel's pages; one lock at a time per file, so that a second lock
        holder here does not take the file for checked while the first is
        still dropping its pages."""
        if self._session is None or not self._session.records_open:
            return
        async with self._revalidating[inode]:
            attrs = await self._session.open_file(inode)  # fresh; the cache forgets what differs
            seen = self._pages_seen.get(inode)
            if seen is not None and same_file_state(seen, attrs):
                return
            contents = self._files.get(inode)
            if contents is not None:
                contents.writer.adopt(attrs)
            await drop_pages()
            self._pages_seen[inode] = attrs

    async def send_barrier(self, token: int) -> int | None:
        """See MetadataStore.send_barrier; None without a session."""
        if self._session is None:
            return None
        return await self._meta.send_barrier(self._session.id, token)

    def inode_of(self, handle: int) -> int | None:
        entry = self._handles.get(handle)
        return None if entry is None else entry.contents.inode

    def changed_elsewhere(self, handle: int) -> bool:
        """Whether the open that made `handle` found the file changed by
        another mount (then the kernel's cached pages of it are stale)."""
        return self._handle(handle).changed_elsewhere

    async def _open_contents(self, contents: FileContents, flags: int) -> int:
        contents.open_count += 1
        if flags & os.O_TRUNC:
            # libfuse asks the kernel for atomic O_TRUNC: the truncate is ours.
            try:
                await contents.truncate(0)
            except BaseException:
                contents.open_count -= 1
                self._drop_if_closed(contents)
                raise
        handle = self._next_handle
        self._next_handle += 1
        self._handles[handle] = Handle(contents, flags)
        return handle

    async def create(self, parent: int, name: bytes, mode: int, flags: int, caller: Caller) -> tuple[int, InodeAttrs]:
        opened_by = None if self._session is None else self._session.opened_by()
        created = await self._create(parent, name, stat.S_IFREG | stat.S_IMODE(mode), caller, opened_by=opened_by)
        contents = self._contents(created.attrs, policy_of(created.xattrs, self._compression))
        return await self._open_contents(contents, flags & ~os.O_TRUNC), created.attrs

    def _handle(self, handle: int) -> Handle:
        try:
            return self._handles[handle]
        except KeyError:
            raise DfsError("bad file handle", errno.EBADF) from None

    async def read(self, handle: int, offset: int, size: int) -> bytes:
        entry = self._handle(handle)
        await self._refresh_if_stale(entry.contents.inode)
        sequential = offset == entry.next_offset and offset > 0
        entry.next_offset = offset + size
        return await entry.contents.read(offset, size, sequential)

    async def write(self, handle: int, offset: int, data: bytes) -> int:
        return await self._handle(handle).contents.write(offset, data)

    async def fallocate(self, handle: int, mode: int, offset: int, length: int) -> None:
        """fallocate(2) on an open file. Mode 0 and FALLOC_FL_KEEP_SIZE
        allocate: ENOSPC unless the nodes have room for the bytes the range
        adds past the end of the file (room is checked, not reserved: every
        write stores a new object, as on any copy-on-write file system), and
        mode 0 grows the file over a hole. FALLOC_FL_PUNCH_HOLE (always with
        KEEP_SIZE) frees the range, FALLOC_FL_ZERO_RANGE zeros it (and, without
        KEEP_SIZE, grows the file): both read as zeros after, and shards
        they cover whole are deleted. COLLAPSE_RANGE and INSERT_RANGE would
        shift every later shard's data: EOPNOTSUPP (the kernel answers them
        so without asking)."""
        if offset < 0 or length <= 0:
            raise InvalidArgument("fallocate needs offset >= 0 and length > 0")
        punch, zero, keep_size = mode & FALLOC_FL_PUNCH_HOLE, mode & FALLOC_FL_ZERO_RANGE, mode & FALLOC_FL_KEEP_SIZE
        if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE) or (punch and zero):
            raise DfsError(f"fallocate mode {mode:#x} is not supported", errno.EOPNOTSUPP)
        if punch and not keep_size:
            raise DfsError("FALLOC_FL_PUNCH_HOLE needs FALLOC_FL_KEEP_SIZE", errno.EOPNOTSUPP)
        writer = self._handle(handle).contents.writer
        end = offset + length
        if not punch:
            await self._check_room(end - max(offset, writer.size), writer.policy.copies(self._replicas))
        grow_to = None if keep_size else end  # the writer never shrinks the file for it
        if punch or zero:
            await writer.zero_range(offset, length, grow_to)
        elif grow_to is not None and grow_to > writer.size:
            await writer.zero_range(grow_to, 0, grow_to)  # nothing to zero: grows, under the writer's locks

    async def _check_room(self, new_bytes: int, copies: float) -> None:
        """NoSpace unless the nodes have room for `new_bytes` more file data
        stored `copies` times (replicas, or the share of erasure coding)."""
        if new_bytes <= 0:
            return
        _, free = await self._replicator.capacity()
        room = int(free / copies)
        if new_bytes > room:
            raise NoSpace(f"fallocate of {new_bytes} bytes: the nodes have room for {room}")

    async def flush(self, handle: int) -> None:
        contents = self._handle(handle).contents
        if not contents.is_clean:  # every close flushes; one that only read has nothing to store
            await contents.flush(sync=False)

    async def fsync(self, handle: int, datasync: bool) -> None:
        await self._handle(handle).contents.flush(sync=True)

    async def fsync_metadata(self) -> None:
        """fsyncdir: directory changes are committed per call; make them durable."""
        await self._meta.sync()

    # -- whole trees (dfsfuse snapshot) -------------------------------------------
    async def snapshot_tree(
        self, source: int, parent: int, name: bytes, readonly: bool, report: ProgressReport | None = None
    ) -> TreeChange:
        """Snapshot `source` as `name` in `parent` (MetadataStore.snapshot_tree),
        after committing what this mount's open files hold buffered, so the
        snapshot has every write made here before it was asked for."""
        check_name(name)
        await self._check_writable(parent)
        for contents in list(self._files.values()):
            if not contents.is_clean:
                await contents.flush(sync=True)  # the snapshot's own fsync would not reach them
        change = await self._meta.snapshot_tree(source, parent, name, readonly, time.time_ns(), report)
        await self._tell_kernel(ChangeNotice(inodes=frozenset({parent}), entries=frozenset({(parent, name)})))
        return change

    async def remove_tree(self, parent: int, name: bytes, report: ProgressReport | None = None) -> TreeChange:
        """Remove `name` in `parent` and everything below it, read-only or not
        (a snapshot); the inodes left without a name go as an unlink's do."""
        check_name(name)
        await self._check_writable(parent)
        change = await self._meta.remove_tree(parent, name, time.time_ns(), report)
        for inode in change.unlinked:
            self._unlinked.add(inode)
            self._delete_if_unreferenced(inode)
        await self._tell_kernel(ChangeNotice(inodes=frozenset({parent, *change.inodes}), entries=frozenset({(parent, name)})))
        return change

    async def _tell_kernel(self, notice: ChangeNotice) -> None:
        """Drop from the kernel's caches what changed without a kernel request."""
        if self.kernel_invalidator is not None:
            await self.kernel_invalidator(notice)

    async def release(self, handle: int) -> None:
        entry = self._handles.pop(handle, None)
        if entry is None:
            return
        contents = entry.contents
        contents.open_count -= 1
        if contents.open_count:
            return
        try:
            if contents.inode in self._unlinked:
                await contents.discard()  # nobody can see the data again
            elif not contents.is_clean:
                await contents.flush(sync=False)
        except DfsError as error:
            # No caller to tell (close already got its flush); the data stays
            # buffered and the next open, or the unmount, tries again.
            log.error("inode %d: data not stored at release: %s", contents.inode, error)
        finally:
            self._drop_if_closed(contents)

    def _drop_if_closed(self, contents: FileContents) -> None:
        """Forget a file's contents once nothing has it open and all is stored."""
        if not contents.open_count and contents.is_clean and self._files.get(contents.inode) is contents:
            del self._files[contents.inode]
            self._stale.discard(contents.inode)
            self._pages_seen.pop(contents.inode, None)
            self._revalidating.pop(contents.inode, None)
            if self._session is not None:
                self._session.closed(contents.inode)
            self._quotas.forget(contents.inode)
            self._delete_if_unreferenced(contents.inode)


def _check_writable(attrs: InodeAttrs) -> None:
    if attrs.readonly:
        raise ReadOnly(f"inode {attrs.inode} belongs to a read-only snapshot")


def _check_trash_days_value(value: bytes) -> bytes:
    """user.dfs.trash_days must be a number of days (0: the trash is off below)."""
    days = parse_days(value, TRASH_DAYS_XATTR.decode())
    return (b"%d" % days) if days == int(days) else repr(days).encode()


def _check_xattr_name(name: bytes) -> None:
    if not name or len(name) > 255:
        raise DfsError("bad extended attribute name", errno.ERANGE if name else errno.EINVAL)
    if name.startswith(b"system."):
        # POSIX ACLs and other system attributes are not supported; tools such
        # as cp -a treat ENOTSUP as "nothing to copy".
        raise DfsError("system attributes are not supported", errno.EOPNOTSUPP)


def _new_mode_and_group(parent: InodeAttrs, mode: int, caller: Caller) -> tuple[int, int]:
    """Mode after umask and the group of a new inode, as Linux decides them.

    A setgid directory passes its group on (and, to subdirectories, the setgid
    bit itself); a new file keeps its own setgid bit only if the caller is in
    its group or is root.
    """
    file_type = stat.S_IFMT(mode)
    permissions = stat.S_IMODE(mode)
    if not stat.S_ISLNK(mode):
        permissions &= ~caller.umask
    gid = caller.gid
    if parent.mode & stat.S_ISGID:
        gid = parent.gid
        if stat.S_ISDIR(mode):
            permissions |= stat.S_ISGID
        elif permissions & stat.S_ISGID and caller.uid != 0 and caller.gid != gid:
            permissions &= ~stat.S_ISGID
    return file_type | permissions, gid
