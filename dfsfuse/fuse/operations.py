"""The FUSE adapter: the only module that imports pyfuse3.

Each handler converts one kernel request into one FileSystem call and its
result into pyfuse3's types; a DfsError becomes FUSEError(errno). Anything
else is a bug: it is logged with its traceback and the request fails with EIO
instead of ending the main loop. A mount whose session was reclaimed answers
every request with EIO (cluster/session.py).

What other mounts change reaches the kernel's caches through
KernelInvalidator, on a thread of its own: pyfuse3's invalidate_entry and
invalidate_inode block until the kernel has dropped what they name, which
waits for requests in flight on it, so called from a handler (or from the
trio loop, which answers those requests) they could wait for themselves.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pyfuse3
import trio

from .. import metrics
from ..errors import DfsError
from ..metadata.base import ROOT_INODE, AttrChanges, ChangeNotice, InodeAttrs
from ..vfs.filesystem import Caller, FileSystem
from ..vfs.locking import FileLocks
from .readahead import set_read_ahead

log = logging.getLogger("dfsfuse.fuse")

# The kernel may cache attributes and names for a while: every change this
# mount makes goes through the kernel, which drops what it makes stale (as
# S3QL, which uses 300 s), and other mounts' changes are pushed to it
# (KernelInvalidator). The one thing it cannot know is st_blocks growing
# when a file's data is stored at close: a stat between a write and the
# close may show the old st_blocks for up to ATTR_TIMEOUT.
ATTR_TIMEOUT = 60.0
ENTRY_TIMEOUT = 60.0
READDIR_PAGE = 1000
BARRIER_TIMEOUT = 10.0  # seconds a lock waits for other mounts' earlier changes to arrive

# Offsets in the kernel's readdir stream: 1 and 2 follow "." and "..", and an
# entry's own offset from the metadata store is shifted past them.
_DOT_ENTRIES = 2

T = TypeVar("T")


def _translate_errors(handler: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """The request's errors as errnos (module docstring), and its count,
    time and errors in the metrics (dfsfuse/metrics.py)."""
    operation = handler.__name__
    requests = metrics.FUSE_REQUESTS.labels(operation)
    seconds = metrics.FUSE_SECONDS.labels(operation)

    @functools.wraps(handler)
    async def wrapper(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            if self.fs.session_lost:
                raise pyfuse3.FUSEError(errno.EIO)
            try:
                return await handler(self, *args, **kwargs)
            except DfsError as error:
                raise pyfuse3.FUSEError(error.errno) from None
            except pyfuse3.FUSEError:
                raise
            except Exception:
                log.exception("internal error in %s", operation)
                raise pyfuse3.FUSEError(errno.EIO) from None
        except pyfuse3.FUSEError as error:
            metrics.FUSE_ERRORS.labels(operation, errno.errorcode.get(error.errno, str(error.errno))).inc()
            raise
        finally:
            requests.inc()
            seconds.observe(time.perf_counter() - started)

    return wrapper


def _entry(attrs: InodeAttrs) -> pyfuse3.EntryAttributes:
    entry = pyfuse3.EntryAttributes()
    entry.st_ino = attrs.inode
    entry.generation = 0
    entry.entry_timeout = ENTRY_TIMEOUT
    entry.attr_timeout = ATTR_TIMEOUT
    entry.st_mode = attrs.mode
    entry.st_nlink = attrs.nlink
    entry.st_uid = attrs.uid
    entry.st_gid = attrs.gid
    entry.st_rdev = attrs.rdev
    entry.st_size = attrs.size
    entry.st_blksize = 128 * 1024
    entry.st_blocks = attrs.blocks
    entry.st_atime_ns = attrs.atime_ns
    entry.st_mtime_ns = attrs.mtime_ns
    entry.st_ctime_ns = attrs.ctime_ns
    return entry


def _caller(ctx: pyfuse3.RequestContext) -> Caller:
    return Caller(uid=ctx.uid, gid=ctx.gid, umask=ctx.umask)


class Operations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, fs: FileSystem):
        super().__init__()
        self.fs = fs
        self.mountpoint: str | None = None  # resolved, set by start()
        self.invalidator = KernelInvalidator(fs)

    def init(self):
        # Called while the kernel's INIT is answered, and the reply would
        # lower a read-ahead set now: set it just after, on the trio loop.
        if self.mountpoint is not None:
            trio.lowlevel.current_trio_token().run_sync_soon(set_read_ahead, self.mountpoint)

    @_translate_errors
    async def lookup(self, parent_inode, name, ctx=None):
        return _entry(await self.fs.lookup(parent_inode, name))

    async def forget(self, inode_list):
        for inode, count in inode_list:
            try:
                await self.fs.forget(inode, count)
            except Exception:  # forget has no request to fail; never end the loop
                log.exception("forget of inode %d failed", inode)

    @_translate_errors
    async def getattr(self, inode, ctx=None):
        return _entry(await self.fs.getattr(inode))

    @_translate_errors
    async def setattr(self, inode, attr, fields, fh, ctx):
        changes = AttrChanges(
            mode=attr.st_mode & 0o7777 if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
        )
        size = attr.st_size if fields.update_size else None
        return _entry(await self.fs.setattr(inode, changes, size))

    @_translate_errors
    async def readlink(self, inode, ctx):
        return await self.fs.readlink(inode)

    @_translate_errors
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        return _entry(await self.fs.create_node(parent_inode, name, mode, _caller(ctx), rdev=rdev))

    @_translate_errors
    async def mkdir(self, parent_inode, name, mode, ctx):
        return _entry(await self.fs.create_node(parent_inode, name, (mode & 0o7777) | 0o040000, _caller(ctx)))

    @_translate_errors
    async def symlink(self, parent_inode, name, target, ctx):
        return _entry(await self.fs.create_node(parent_inode, name, 0o120777, _caller(ctx), target=target))

    @_translate_errors
    async def link(self, inode, new_parent_inode, new_name, ctx):
        return _entry(await self.fs.link(inode, new_parent_inode, new_name))

    @_translate_errors
    async def unlink(self, parent_inode, name, ctx):
        await self.fs.unlink(parent_inode, name)

    @_translate_errors
    async def rmdir(self, parent_inode, name, ctx):
        await self.fs.rmdir(parent_inode, name)

    @_translate_errors
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        # pyfuse3's RENAME_* equal the metadata interface's (and Linux's) values.
        await self.fs.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    @_translate_errors
    async def open(self, inode, flags, ctx):
        handle = await self.fs.open(inode, flags)
        changed = self.fs.changed_elsewhere(handle)
        if changed:
            # Another mount changed the file and its notice has not come yet:
            # the kernel's size and times go now (an attribute invalidation
            # waits for nothing, so it is safe while this open is in flight),
            # its cached pages with keep_cache=False.
            await trio.to_thread.run_sync(_invalidate_attrs, inode)
        return pyfuse3.FileInfo(fh=handle, keep_cache=not changed)

    @_translate_errors
    async def create(self, parent_inode, name, mode, flags, ctx):
        handle, attrs = await self.fs.create(parent_inode, name, mode, flags, _caller(ctx))
        return pyfuse3.FileInfo(fh=handle, keep_cache=True), _entry(attrs)

    @_translate_errors
    async def read(self, fh, off, size):
        data = await self.fs.read(fh, off, size)
        metrics.READ_BYTES.inc(len(data))
        return data

    @_translate_errors
    async def write(self, fh, off, buf):
        written = await self.fs.write(fh, off, buf)
        metrics.WRITTEN_BYTES.inc(written)
        return written

    @_translate_errors
    async def flush(self, fh, lock_owner=None):
        """A close(2): store what was written; the closing process's fcntl
        locks on the file end (the patched pyfuse3 passes its lock owner)."""
        inode = self.fs.inode_of(fh)
        try:
            await self.fs.flush(fh)
        finally:
            if lock_owner is not None and self.fs.locks is not None and inode is not None:
                await self.fs.locks.closed_by(inode, lock_owner)

    @_translate_errors
    async def release(self, fh, flock_owner=None):
        inode = self.fs.inode_of(fh)
        try:
            await self.fs.release(fh)  # stores what was written first
        finally:
            if self.fs.locks is not None and inode is not None:
                await self.fs.locks.released(inode, fh, flock_owner)

    # Locks (docs/pyfuse3-patch.md): kept in the metadata for every mount
    # (vfs/locking.py), the kernel keeps none of its own.
    @_translate_errors
    async def getlk(self, inode, fh, owner, lock_type, start, end, ctx):
        found = await self._locks().test(inode, owner, lock_type, start, end)
        if found is None:
            return (fcntl.F_UNLCK, start, end, 0)
        return (found.type, found.start, found.end, found.pid)

    @_translate_errors
    async def setlk(self, inode, fh, owner, lock_type, start, end, pid, sleep, ctx):
        locks = self._locks()
        if lock_type == fcntl.F_UNLCK:
            await self.fs.store_for_unlock(inode)
        await locks.set_posix(inode, fh, owner, lock_type, start, end, pid, sleep)
        if lock_type != fcntl.F_UNLCK:
            await self._revalidate(inode)

    @_translate_errors
    async def flock(self, inode, fh, owner, op, ctx):
        locks = self._locks()
        if op & fcntl.LOCK_UN:
            await self.fs.store_for_unlock(inode)
        await locks.flock(inode, fh, owner, op, ctx.pid)
        if not op & fcntl.LOCK_UN:
            await self._revalidate(inode)

    async def _revalidate(self, inode: int) -> None:
        """Locks are where applications expect another mount's writes to show:
        after a grant, pages of the file changed elsewhere go from the kernel
        (from a worker thread: this waits for reads in flight of the file,
        which other tasks answer, never for this request)."""
        with trio.CancelScope(shield=True):  # the lock is granted: the request must succeed
            await self.invalidator.barrier()  # names another mount changed before are gone here too
            await self.fs.revalidate_for_lock(inode, lambda: trio.to_thread.run_sync(_invalidate_data, inode))

    def _locks(self) -> FileLocks:
        if self.fs.locks is None:
            raise pyfuse3.FUSEError(errno.ENOLCK)
        return self.fs.locks

    @_translate_errors
    async def fallocate(self, inode, fh, mode, offset, length):
        """fallocate(2); reaches us through our patch of pyfuse3 (docs/pyfuse3-patch.md)."""
        await self.fs.fallocate(fh, mode, offset, length)

    @_translate_errors
    async def fsync(self, fh, datasync):
        await self.fs.fsync(fh, datasync)

    @_translate_errors
    async def opendir(self, inode, ctx):
        attrs = await self.fs.getattr(inode)
        if attrs.mode & 0o170000 != 0o040000:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @_translate_errors
    async def readdir(self, fh, start_id, token):
        inode = fh
        if start_id < 1:
            if not pyfuse3.readdir_reply(token, b".", _entry(await self.fs.getattr(inode)), 1):
                return
            start_id = 1
        if start_id < 2:
            parent = await self.fs.getattr_of_parent(inode)
            if not pyfuse3.readdir_reply(token, b"..", _entry(parent), 2):
                return
        after = max(0, start_id - _DOT_ENTRIES)
        while True:
            entries = await self.fs.readdir(inode, after, READDIR_PAGE)
            for entry in entries:
                if not pyfuse3.readdir_reply(token, entry.name, _entry(entry.attrs), entry.offset + _DOT_ENTRIES):
                    return
                self.fs.add_ref(entry.attrs.inode)
            if len(entries) < READDIR_PAGE:
                return
            after = entries[-1].offset

    async def releasedir(self, fh):
        return None

    @_translate_errors
    async def fsyncdir(self, fh, datasync):
        await self.fs.fsync_metadata()

    async def statfs(self, ctx):
        """statfs(2) from a pyfuse3 without our patch 0003 (no inode: the root's view)."""
        return await self.statfs_inode(pyfuse3.ROOT_INODE, ctx)

    @_translate_errors
    async def statfs_inode(self, inode, ctx):
        """statfs(2) on a path: `df DIR` below a directory quota shows the quota.
        pyfuse3 passes the path's inode through our patch 0003 (docs/pyfuse3-patch.md)."""
        stats = await self.fs.statfs(inode)
        result = pyfuse3.StatvfsData()
        result.f_bsize = stats.block_size
        result.f_frsize = stats.block_size
        result.f_blocks = stats.blocks
        result.f_bfree = stats.blocks_free
        result.f_bavail = stats.blocks_free
        result.f_files = stats.files
        result.f_ffree = stats.files_free
        result.f_favail = stats.files_free
        result.f_namemax = stats.name_max
        return result

    @_translate_errors
    async def setxattr(self, inode, name, value, ctx):
        # pyfuse3 does not pass XATTR_CREATE/XATTR_REPLACE; plain set semantics.
        await self.fs.setxattr(inode, name, value, 0)

    @_translate_errors
    async def getxattr(self, inode, name, ctx):
        return await self.fs.getxattr(inode, name)

    @_translate_errors
    async def listxattr(self, inode, ctx):
        return await self.fs.listxattr(inode)

    @_translate_errors
    async def removexattr(self, inode, name, ctx):
        await self.fs.removexattr(inode, name)


def _invalidate_data(inode: int) -> None:
    try:
        pyfuse3.invalidate_inode(inode, attr_only=False)
    except OSError:
        pass  # the kernel holds nothing of it


def _invalidate_attrs(inode: int) -> None:
    try:
        pyfuse3.invalidate_inode(inode, attr_only=True)
    except OSError:
        pass  # the kernel does not know the inode (any more): nothing to drop


class KernelInvalidator:
    """Drops from the kernel's caches what other mounts changed: the entries
    (names) and inodes (attrs and cached pages) of each notice, in order, on
    a thread of its own (see the module docstring); `__call__` only queues."""

    def __init__(self, fs: FileSystem):
        self._fs = fs
        self._queue: queue.SimpleQueue[ChangeNotice | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._trio_token: trio.lowlevel.TrioToken | None = None
        self._barriers: dict[int, trio.Event] = {}
        self._tokens = itertools.count(1)

    async def barrier(self) -> int | None:
        """Return once every change other mounts committed before this call
        is applied here, to the metadata cache and the kernel (a lock holder
        must not see a name or page that the last holder replaced): the
        engine's clock when the barrier went out, or None if there is none
        (nobody else changes the metadata) or it took over BARRIER_TIMEOUT
        seconds (said in the log)."""
        if self._thread is None:
            return None
        token = next(self._tokens)
        arrived = self._barriers[token] = trio.Event()
        try:
            sent_ns = await self._fs.send_barrier(token)
            if sent_ns is None:
                return None
            with trio.move_on_after(BARRIER_TIMEOUT) as waited:
                await arrived.wait()
            if waited.cancelled_caught:
                log.warning("changes of other mounts took over %.0f s to arrive", BARRIER_TIMEOUT)
                return None
            return sent_ns
        finally:
            self._barriers.pop(token, None)

    def _barrier_reached(self, token: int) -> None:
        arrived = self._barriers.get(token)
        if arrived is not None:
            arrived.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the thread until cancelled, then stop it once the queue is drained."""
        self._trio_token = trio.lowlevel.current_trio_token()
        self._thread = threading.Thread(target=self._work, name="dfsfuse-invalidate", daemon=True)
        self._thread.start()
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            self._queue.put(None)
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._thread.join)

    async def __call__(self, notice: ChangeNotice) -> None:
        if not notice.barrier:
            self._fs.note_changes(notice)
        if self._thread is not None:
            self._queue.put(notice)

    def _work(self) -> None:
        while (notice := self._queue.get()) is not None:
            if notice.barrier:
                assert self._trio_token is not None
                try:
                    self._trio_token.run_sync_soon(self._barrier_reached, notice.barrier)
                except trio.RunFinishedError:
                    pass
                continue
            try:
                self._invalidate(notice)
            except Exception:  # noqa: BLE001 - the thread must go on
                log.exception("invalidating the kernel's caches failed")

    def _invalidate(self, notice: ChangeNotice) -> None:
        known = set(self._fs.known_inodes()) | {ROOT_INODE}
        entries = [] if notice.everything else [(parent, name) for parent, name in notice.entries if parent in known]
        inodes = known if notice.everything else notice.inodes & known
        for parent, name in entries:
            try:
                pyfuse3.invalidate_entry(parent, name)
            except OSError:
                pass  # not in the kernel's cache
        for inode in inodes:
            try:
                pyfuse3.invalidate_inode(inode, attr_only=False)
            except OSError:
                pass


def mount_options(fsname: str, extra: list[str]) -> set[str]:
    """The FUSE mount options: ours plus the user's -o list."""
    options = set(pyfuse3.default_options)
    options.add(f"fsname={fsname}")
    options.add("subtype=dfsfuse")
    options.update(extra)
    return options


def shares_locks() -> bool:
    """Whether this pyfuse3 hands lock requests to the file system (our
    patch, docs/pyfuse3-patch.md); without it the kernel keeps them per mount."""
    return bool(getattr(pyfuse3, "DFSFUSE_LOCKS", 0))


def start(operations: Operations, mountpoint: str, options: set[str]) -> None:
    """Mount: after this the kernel queues requests until `serve` runs."""
    operations.mountpoint = os.path.realpath(mountpoint)  # now: once mounted, resolving it would wait for us
    pyfuse3.init(operations, mountpoint, options)


async def serve() -> None:
    """Answer kernel requests until the file system is unmounted."""
    await pyfuse3.main(min_tasks=8, max_tasks=64)


def stop(unmount: bool) -> None:
    pyfuse3.close(unmount=unmount)


def terminate() -> None:
    """Make `serve` return (from a signal handler), which unmounts at close."""
    pyfuse3.terminate()
