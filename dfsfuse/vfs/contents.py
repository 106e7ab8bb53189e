"""The contents of one regular file: buffered writes, verified reads, truncate.

One FileContents exists per inode while the file is open (shared by all its
handles) and briefly for a truncate of a closed file. It owns the file's
dirty shard buffers and its copy of the shard map, and follows the rule that
makes crashes harmless: a shard's replicas are stored first, then one
metadata transaction points the file at it.

Concurrency (all on the trio loop): `_write_lock` orders writes and truncates
among themselves; `_commit_lock` orders metadata commits so the committed size
never goes backwards; a shard index that is being flushed is kept in
`_flushing` (still readable) and writers to it wait for the flush to finish.
Store errors are kept in `_error` and reported by the next write, flush or
fsync, as the kernel's write-back does.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time

import trio

from ..errors import DataError, DfsError
from ..metadata.base import InodeAttrs, MetadataStore, ShardRef
from ..shards.cache import ShardCache
from ..shards.replicator import Replicator
from ..write.buffer import ShardBuffer, WriteBudget
from ..write.flusher import Flusher
from .layout import shard_count, shard_span

log = logging.getLogger("dfsfuse.contents")

# A read at least this large, or one that continues the previous read, fetches
# the whole shard into the cache (and the next one ahead); smaller random reads
# fetch only the checksum blocks they touch.
WHOLE_SHARD_READ = 128 * 1024


@dataclasses.dataclass
class ContentServices:
    """What every FileContents shares: stores, metadata, caches, limits."""

    meta: MetadataStore
    replicator: Replicator
    flusher: Flusher
    cache: ShardCache
    budget: WriteBudget
    shard_size: int
    nursery: trio.Nursery
    reads_in_flight: collections.Counter[int] = dataclasses.field(default_factory=collections.Counter)
    garbage_added: trio.Event = dataclasses.field(default_factory=trio.Event)

    def note_garbage(self) -> None:
        self.garbage_added.set()


class FileContents:
    def __init__(self, attrs: InodeAttrs, shard_map: dict[int, ShardRef], services: ContentServices):
        self.inode = attrs.inode
        self.size = attrs.size
        self.mtime_ns = attrs.mtime_ns
        self.ctime_ns = attrs.ctime_ns
        self.open_count = 0
        self._services = services
        self._shard_size = services.shard_size
        self._committed_size = attrs.size
        self._times_dirty = False
        self._shard_map = shard_map
        self._dirty: dict[int, ShardBuffer] = {}
        self._flushing: dict[int, ShardBuffer] = {}
        self._flush_done: dict[int, trio.Event] = {}
        self._unsynced: dict[int, ShardRef] = {}
        self._error: DfsError | None = None
        self._write_lock = trio.Lock()
        self._commit_lock = trio.Lock()

    @property
    def is_clean(self) -> bool:
        return not (self._dirty or self._flushing or self._times_dirty or self.size != self._committed_size)

    # -- writing -------------------------------------------------------------
    async def write(self, offset: int, data: bytes) -> int:
        await self._services.budget.wait_for_room()
        async with self._write_lock:
            if self._error is not None:
                raise self._error
            view = memoryview(data)
            position = 0
            size = self._shard_size
            for index, inner, take in shard_span(offset, len(data), size):
                buffer = await self._writable_buffer(index, whole=(inner == 0 and take == size))
                self._services.budget.grow(buffer.write(inner, view[position : position + take]))
                position += take
                self.size = max(self.size, index * size + inner + take)
                if inner + take == size:
                    self.start_background_flush(index)
            self._touch()
        return len(data)

    async def _writable_buffer(self, index: int, whole: bool) -> ShardBuffer:
        while index in self._flush_done:
            await self._flush_done[index].wait()
        buffer = self._dirty.get(index)
        if buffer is not None:
            return buffer
        ref = self._shard_map.get(index)
        base = b""
        if ref is not None and not whole:
            base = await self._shard_data(ref)
        buffer = ShardBuffer(base)
        self._dirty[index] = buffer
        self._services.budget.track((self.inode, index))
        self._services.budget.grow(len(base))
        return buffer

    def start_background_flush(self, index: int) -> None:
        """Flush one dirty shard without waiting (a full shard, or budget eviction)."""
        if index in self._dirty:
            self._services.nursery.start_soon(self._flush_shard, index, False)

    async def _flush_shard(self, index: int, sync: bool) -> None:
        buffer = self._dirty.pop(index, None)
        if buffer is None:
            return
        services = self._services
        services.budget.untrack((self.inode, index))
        done = trio.Event()
        self._flushing[index] = buffer
        self._flush_done[index] = done
        try:
            if len(buffer):
                await self._store_and_commit(index, buffer, sync)
        except Exception as error:  # noqa: BLE001 - a background failure must reach the application
            if not isinstance(error, DfsError):
                log.exception("inode %d shard %d: unexpected error while flushing", self.inode, index)
                error = DataError(f"inode {self.inode} shard {index}: {error}")
            else:
                log.error("inode %d shard %d: flush failed: %s", self.inode, index, error)
            if self._error is None:
                self._error = error
            # Keep the data: a later flush or fsync tries again. A fresh copy,
            # since views of the old bytearray may outlive the failed store and
            # would forbid resizing it.
            self._dirty[index] = ShardBuffer(buffer.data)
            services.budget.track((self.inode, index))
        else:
            await services.budget.release(len(buffer))
        finally:
            del self._flushing[index]
            del self._flush_done[index]
            done.set()

    async def _store_and_commit(self, index: int, buffer: ShardBuffer, sync: bool) -> None:
        services = self._services
        ref = await services.flusher.store(memoryview(buffer.data), sync)
        try:
            async with self._commit_lock:
                end = index * self._shard_size + len(buffer)
                size = min(self.size, max(self._committed_size, end))
                await services.meta.commit_shards(
                    self.inode, {index: ref}, size, mtime_ns=self.mtime_ns, ctime_ns=self.ctime_ns
                )
                self._committed_size = size
                self._replace_ref(index, ref)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._discard_stored(ref)
            raise
        if not sync:
            self._unsynced[ref.shard_id] = ref

    async def _discard_stored(self, ref: ShardRef) -> None:
        """Delete replicas of a shard whose commit failed (they are orphans)."""
        try:
            await self._services.replicator.delete(ref.shard_id, ref.nodes)
        except DfsError as error:
            log.warning("shard %d: could not delete uncommitted replicas (fsck will): %s", ref.shard_id, error)

    def _replace_ref(self, index: int, ref: ShardRef | None) -> None:
        old = self._shard_map.pop(index, None)
        if ref is not None:
            self._shard_map[index] = ref
        if old is not None:
            self._services.cache.discard(old.shard_id)
            self._unsynced.pop(old.shard_id, None)
            self._services.note_garbage()

    def _touch(self) -> None:
        self.mtime_ns = self.ctime_ns = time.time_ns()
        self._times_dirty = True

    async def flush(self, sync: bool) -> None:
        """Store every dirty shard and commit size and times; with `sync`, durably.

        Raises the first error any flush of this file met since the last report.
        """
        async with trio.open_nursery() as nursery:
            for index in list(self._dirty):
                nursery.start_soon(self._flush_shard, index, sync)
        await self._wait_for_flushes()
        if sync and self._unsynced:
            await self._services.replicator.sync(list(self._unsynced.values()))
            self._unsynced.clear()
        if not self._dirty:
            await self._commit_size_and_times()
        if sync:
            await self._services.meta.sync()
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    async def _commit_size_and_times(self) -> None:
        async with self._commit_lock:
            if self.size == self._committed_size and not self._times_dirty:
                return
            size = self.size
            await self._services.meta.commit_shards(
                self.inode, {}, size, mtime_ns=self.mtime_ns, ctime_ns=self.ctime_ns
            )
            self._committed_size = size
            self._times_dirty = False

    async def _wait_for_flushes(self) -> None:
        while self._flush_done:
            await next(iter(self._flush_done.values())).wait()

    # -- truncate ------------------------------------------------------------
    async def truncate(self, new_size: int) -> InodeAttrs:
        """Set the size; a shrink rewrites the cut shard so stale bytes never return."""
        async with self._write_lock:
            await self._wait_for_flushes()
            shard_size = self._shard_size
            keep = shard_count(new_size, shard_size)
            replacement: dict[int, ShardRef] = {}
            if new_size < self.size:
                for index in [i for i in self._dirty if i >= keep]:
                    await self._drop_dirty(index)
                tail_index, tail_length = divmod(new_size, shard_size)
                if tail_length:
                    tail = await self._cut_tail(tail_index, tail_length)
                    if tail is not None:
                        replacement[tail_index] = tail
            now = time.time_ns()
            async with self._commit_lock:
                attrs = await self._services.meta.commit_shards(
                    self.inode, replacement, new_size, drop_from=keep, mtime_ns=now, ctime_ns=now
                )
                for index in [i for i in self._shard_map if i >= keep]:
                    self._replace_ref(index, None)
                for index, ref in replacement.items():
                    self._replace_ref(index, ref)
                    self._unsynced[ref.shard_id] = ref
                self.size = self._committed_size = new_size
                self.mtime_ns = self.ctime_ns = now
            return attrs

    async def _drop_dirty(self, index: int) -> None:
        buffer = self._dirty.pop(index)
        self._services.budget.untrack((self.inode, index))
        await self._services.budget.release(len(buffer))

    async def _cut_tail(self, index: int, length: int) -> ShardRef | None:
        """Store the first `length` bytes of shard `index` as a new shard, if it is longer."""
        buffer = self._dirty.get(index)
        if buffer is not None:
            await self._services.budget.release(buffer.truncate(length))
            ref = await self._services.flusher.store(bytes(buffer.data), sync=False)
            await self._drop_dirty(index)
            return ref
        ref = self._shard_map.get(index)
        if ref is None or ref.length <= length:
            return None
        data = await self._shard_data(ref)
        return await self._services.flusher.store(memoryview(data)[:length], sync=False)

    # -- reading -------------------------------------------------------------
    async def read(self, offset: int, size: int, sequential: bool) -> bytes:
        if offset >= self.size or size <= 0:
            return b""
        size = min(size, self.size - offset)
        whole = sequential or size >= WHOLE_SHARD_READ
        parts = []
        for index, inner, take in shard_span(offset, size, self._shard_size):
            pending = self._dirty.get(index) or self._flushing.get(index)
            if pending is not None:
                chunk = bytes(pending.data[inner : inner + take])
            else:
                ref = self._shard_map.get(index)
                if ref is None or inner >= ref.length:
                    chunk = b""
                else:
                    chunk = await self._read_stored(index, ref, inner, min(take, ref.length - inner), whole)
            if len(chunk) < take:
                chunk += bytes(take - len(chunk))
            parts.append(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _read_stored(self, index: int, ref: ShardRef, inner: int, length: int, whole: bool) -> bytes:
        cached = self._services.cache.get(ref.shard_id)
        if cached is not None:
            return cached[inner : inner + length]
        if whole:
            data = await self._shard_data(ref)
            self._read_ahead(index + 1)
            return data[inner : inner + length]
        return await self._guarded_read(ref, inner, length)

    async def _shard_data(self, ref: ShardRef) -> bytes:
        """The whole verified shard, from the cache or the stores."""
        return await self._services.cache.get_or_fetch(
            ref.shard_id, lambda: self._guarded_read(ref, 0, ref.length)
        )

    async def _guarded_read(self, ref: ShardRef, offset: int, length: int) -> bytes:
        """Read while telling the garbage collector that this shard is in use."""
        in_flight = self._services.reads_in_flight
        in_flight[ref.shard_id] += 1
        try:
            return await self._services.replicator.read(ref, offset, length)
        except DataError:
            log.error("inode %d: no good replica of shard %d", self.inode, ref.shard_id)
            raise
        finally:
            in_flight[ref.shard_id] -= 1
            if not in_flight[ref.shard_id]:
                del in_flight[ref.shard_id]

    def _read_ahead(self, index: int) -> None:
        ref = self._shard_map.get(index)
        if ref is None or index in self._dirty or self._services.cache.is_cached_or_fetching(ref.shard_id):
            return

        async def fetch_quietly() -> None:
            try:
                await self._shard_data(ref)
            except DfsError:
                pass  # the real read will retry and report

        self._services.nursery.start_soon(fetch_quietly)
