"""The contents of one regular file: buffered writes, verified reads, truncate.

One FileContents exists per inode while the file is open (shared by all its
handles) and while a closed file is being truncated. It owns the file's
dirty shard buffers and its copy of the shard map, and follows the rule that
makes crashes harmless: a shard's replicas are stored first, then one
metadata transaction points the file at it.

Concurrency (all on the trio loop, where tasks interleave at every await):
- `_write_lock` is held by a write (while it finds and fills buffers), by a
  truncate (for all of it), and by anyone taking dirty buffers to flush them.
  So a buffer is never taken from under a write or a truncate.
- A taken buffer sits in `_flushing` (still readable) until its shard is
  stored and committed; a writer or truncate that needs that shard index
  waits for it first. Storing happens outside the lock.
- `_commit_lock` orders the metadata commits of the file, so the committed
  size never goes backwards.

Errors: a buffer whose store failed goes back to the dirty set and is tried
again by the next flush. `flush` raises whenever data is still unstored when
it finishes, so every close and fsync learns of it; `write` refuses new data
while earlier data could not be stored.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time

import trio

from ..errors import DataError, DfsError, NotFound
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

# Replicas stored without fsync are remembered per inode so that a later fsync
# can sync them; past this many in all they are synced in the background.
UNSYNCED_LIMIT = 65536


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
    # inode -> {shard id: ref} of replicas stored without fsync, kept across
    # opens so an fsync after a reopen still makes them durable.
    unsynced: dict[int, dict[int, ShardRef]] = dataclasses.field(default_factory=dict)
    unsynced_count: int = 0

    def note_garbage(self) -> None:
        self.garbage_added.set()

    def remember_unsynced(self, inode: int, ref: ShardRef) -> None:
        self.unsynced.setdefault(inode, {})[ref.shard_id] = ref
        self.unsynced_count += 1
        if self.unsynced_count > UNSYNCED_LIMIT:
            everything = [ref for refs in self.unsynced.values() for ref in refs.values()]
            self.unsynced.clear()
            self.unsynced_count = 0
            self.nursery.start_soon(self._sync_quietly, everything)

    def forget_unsynced(self, inode: int, shard_ids: list[int] | None = None) -> None:
        """Forget the given shards of `inode` (all of them if None)."""
        refs = self.unsynced.get(inode)
        if refs is None:
            return
        for shard_id in list(refs) if shard_ids is None else shard_ids:
            if refs.pop(shard_id, None) is not None:
                self.unsynced_count -= 1
        if not refs:
            del self.unsynced[inode]

    async def _sync_quietly(self, refs: list[ShardRef]) -> None:
        try:
            await self.replicator.sync(refs)
        except DfsError as error:
            log.warning("background sync of %d replicas failed: %s", len(refs), error)


class FileContents:
    def __init__(
        self, attrs: InodeAttrs, shard_map: dict[int, ShardRef], services: ContentServices, replicas: int | None = None
    ):
        self.inode = attrs.inode
        self.replicas = replicas  # how many replicas its shards get; None: the configured R
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
        self._error: DfsError | None = None  # the last store failure
        self._failed: set[int] = set()  # dirty shard indexes whose store failed
        self._write_lock = trio.Lock()
        self._commit_lock = trio.Lock()

    @property
    def is_clean(self) -> bool:
        return not (self._dirty or self._flushing or self._times_dirty or self.size != self._committed_size)

    def _raise_stored_error(self) -> None:
        if self._failed and self._error is not None:
            # A fresh exception each time: re-raising one object would chain
            # every failed call's traceback onto it.
            raise type(self._error)(str(self._error), self._error.errno)

    # -- writing -------------------------------------------------------------
    async def write(self, offset: int, data: bytes) -> int:
        self._raise_stored_error()
        await self._services.budget.wait_for_room(self._raise_stored_error)
        async with self._write_lock:
            self._raise_stored_error()
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
            # Counted from now, so writers waiting for room know relief is coming.
            self._services.budget.begin_flush()
            self._services.nursery.start_soon(self._flush_in_background, index)

    async def _flush_in_background(self, index: int) -> None:
        async with self._write_lock:
            buffer = self._take(index)
        if buffer is None:
            await self._services.budget.end_flush(0)
        else:
            await self._store_taken(index, buffer, sync=False)

    def _take(self, index: int) -> ShardBuffer | None:
        """Move a dirty buffer to `_flushing`; the caller holds `_write_lock`
        and has counted the flush with `budget.begin_flush`."""
        buffer = self._dirty.pop(index, None)
        if buffer is None:
            return None
        self._services.budget.untrack((self.inode, index))
        self._flushing[index] = buffer
        self._flush_done[index] = trio.Event()
        return buffer

    async def _store_taken(self, index: int, buffer: ShardBuffer, sync: bool) -> None:
        """Store and commit a taken buffer; on failure it becomes dirty again."""
        budget = self._services.budget
        stored = False
        try:
            if len(buffer):
                await self._store_and_commit(index, buffer, sync)
            stored = True
            self._failed.discard(index)
        except DfsError as error:
            log.error("inode %d shard %d: could not store: %s", self.inode, index, error)
            self._error = error
        except Exception as error:  # noqa: BLE001 - a background failure must reach the application
            log.exception("inode %d shard %d: unexpected error while storing", self.inode, index)
            self._error = DataError(f"inode {self.inode} shard {index}: {error}")
        finally:
            # Also on cancellation: the data must not vanish. A fresh copy,
            # since views of the old bytearray may outlive a failed store and
            # would forbid resizing it.
            del self._flushing[index]
            if not stored:
                self._dirty[index] = ShardBuffer(buffer.data)
                self._failed.add(index)
            self._flush_done.pop(index).set()
            with trio.CancelScope(shield=True):
                await budget.end_flush(0 if not stored else len(buffer))

    async def _store_and_commit(self, index: int, buffer: ShardBuffer, sync: bool) -> None:
        services = self._services
        ref = await services.flusher.store(memoryview(buffer.data), sync, self.replicas)
        try:
            async with self._commit_lock:
                end = index * self._shard_size + len(buffer)
                size = min(self.size, max(self._committed_size, end))
                await services.meta.commit_shards(
                    self.inode, {index: ref}, size, mtime_ns=self.mtime_ns, ctime_ns=self.ctime_ns
                )
                self._committed_size = size
                self._replace_ref(index, ref)
        except DfsError:
            # The engine refused the commit, so nothing points at the new
            # replicas. (Any other failure may have committed: leave them to fsck.)
            await self._discard_stored(ref)
            raise
        if not sync:
            services.remember_unsynced(self.inode, ref)

    async def _discard_stored(self, ref: ShardRef) -> None:
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
            self._services.forget_unsynced(self.inode, [old.shard_id])
            self._services.note_garbage()

    def _touch(self) -> None:
        self.mtime_ns = self.ctime_ns = time.time_ns()
        self._times_dirty = True

    async def flush(self, sync: bool) -> None:
        """Store every dirty shard and commit size and times; with `sync`, durably.

        Raises if, when it is done, some of the file's data failed to store
        (its own attempt or a background flush that ended meanwhile).
        """
        async with self._write_lock:
            taken = []
            for index in list(self._dirty):
                self._services.budget.begin_flush()
                taken.append((index, self._take(index)))
        async with trio.open_nursery() as nursery:
            for index, buffer in taken:
                nursery.start_soon(self._store_taken, index, buffer, sync)
        await self._wait_for_flushes()
        if self._failed:
            self._raise_stored_error()
        self._error = None
        await self._commit_size_and_times()
        if sync:
            await self._sync_stored()

    async def _sync_stored(self) -> None:
        services = self._services
        refs = list(services.unsynced.get(self.inode, {}).values())
        if refs:
            # A replica whose node died since it was written is made again
            # elsewhere; the new replica sets are recorded before fsync returns.
            for moved in await services.replicator.sync_durably(refs):
                try:
                    await services.meta.set_shard_nodes(moved.shard_id, moved.nodes)
                except NotFound:
                    continue  # the shard was replaced or deleted meanwhile
                for index, current in list(self._shard_map.items()):
                    if current.shard_id == moved.shard_id:
                        self._shard_map[index] = moved
            services.forget_unsynced(self.inode, [ref.shard_id for ref in refs])
        await services.meta.sync()

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

    async def discard(self) -> None:
        """Drop all buffered data (the file was unlinked and closed)."""
        async with self._write_lock:
            await self._wait_for_flushes()
            for index in list(self._dirty):
                await self._drop_dirty(index)
            self.size = self._committed_size
            self._times_dirty = False

    # -- truncate ------------------------------------------------------------
    async def truncate(self, new_size: int) -> InodeAttrs:
        """Set the size; a shrink stores the cut last shard anew, so the bytes
        past the new end never come back. On failure nothing changes."""
        async with self._write_lock:
            await self._wait_for_flushes()
            shard_size = self._shard_size
            keep = shard_count(new_size, shard_size)
            tail_index, tail_length = divmod(new_size, shard_size)
            tail: ShardRef | None = None
            if new_size < self.size and tail_length:
                tail = await self._store_cut_tail(tail_index, tail_length)
            now = time.time_ns()
            replacement = {} if tail is None else {tail_index: tail}
            try:
                async with self._commit_lock:
                    attrs = await self._services.meta.commit_shards(
                        self.inode, replacement, new_size, drop_from=keep, mtime_ns=now, ctime_ns=now
                    )
                    self._committed_size = new_size
            except DfsError:
                if tail is not None:
                    await self._discard_stored(tail)
                raise
            # Committed: now the in-memory state follows, with no await between.
            for index in [i for i in self._shard_map if i >= keep]:
                self._replace_ref(index, None)
            dropped = [i for i in self._dirty if i >= keep or (tail is not None and i == tail_index)]
            if tail is not None:
                self._replace_ref(tail_index, tail)
                self._services.remember_unsynced(self.inode, tail)
            self.size = new_size
            self.mtime_ns = self.ctime_ns = now
            for index in dropped:
                await self._drop_dirty(index)
            return attrs

    async def _drop_dirty(self, index: int) -> None:
        self._failed.discard(index)
        buffer = self._dirty.pop(index)
        self._services.budget.untrack((self.inode, index))
        await self._services.budget.release(len(buffer))

    async def _store_cut_tail(self, index: int, length: int) -> ShardRef | None:
        """Store the first `length` bytes of shard `index` as a new shard, if
        what the shard holds now (buffered or stored) is longer."""
        buffer = self._dirty.get(index)
        if buffer is not None:
            if len(buffer) <= length:
                return None
            data = bytes(buffer.data[:length])
        else:
            ref = self._shard_map.get(index)
            if ref is None or ref.length <= length:
                return None
            data = (await self._shard_data(ref))[:length]
        return await self._services.flusher.store(data, sync=False, replicas=self.replicas)

    # -- reading -------------------------------------------------------------
    async def read(self, offset: int, size: int, sequential: bool) -> bytes:
        if offset >= self.size or size <= 0:
            return b""
        size = min(size, self.size - offset)
        whole = sequential or size >= WHOLE_SHARD_READ
        parts = []
        for index, inner, take in shard_span(offset, size, self._shard_size):
            pending = self._dirty.get(index)
            if pending is None:
                pending = self._flushing.get(index)
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
        in_flight = self._services.reads_in_flight
        in_flight[ref.shard_id] += 1  # also while waiting for another reader's fetch
        try:
            return await self._services.cache.get_or_fetch(
                ref.shard_id, lambda: self._guarded_read(ref, 0, ref.length)
            )
        finally:
            self._done_reading(ref.shard_id)

    async def _guarded_read(self, ref: ShardRef, offset: int, length: int) -> bytes:
        """Read while telling the garbage collector that this shard is in use."""
        self._services.reads_in_flight[ref.shard_id] += 1
        try:
            try:
                return await self._services.replicator.read(ref, offset, length)
            except DataError:
                moved = await self._moved_ref(ref)
                if moved is None:
                    raise
                return await self._services.replicator.read(moved, offset, length)
        except DataError:
            log.error("inode %d: no good replica of shard %d", self.inode, ref.shard_id)
            raise
        finally:
            self._done_reading(ref.shard_id)

    async def _moved_ref(self, ref: ShardRef) -> ShardRef | None:
        """The shard's ref as the metadata has it now, if its replicas moved
        (rebalance, drain, repair) since this file loaded its shard map."""
        for index, current in (await self._services.meta.shard_map(self.inode)).items():
            if current.shard_id == ref.shard_id and current.nodes != ref.nodes:
                if self._shard_map.get(index, current).shard_id == ref.shard_id:
                    self._shard_map[index] = current
                return current
        return None

    def _done_reading(self, shard_id: int) -> None:
        in_flight = self._services.reads_in_flight
        in_flight[shard_id] -= 1
        if not in_flight[shard_id]:
            del in_flight[shard_id]

    def _read_ahead(self, index: int) -> None:
        ref = self._shard_map.get(index)
        if ref is None or index in self._dirty or self._services.cache.is_cached_or_fetching(ref.shard_id):
            return

        async def fetch_quietly() -> None:
            try:
                await self._shard_data(ref)
            except Exception:  # noqa: BLE001 - the real read will retry and report
                log.debug("read-ahead of shard %d failed", ref.shard_id, exc_info=True)

        self._services.nursery.start_soon(fetch_quietly)
