"""The contents of one regular file: buffered writes, verified reads, truncate.

One FileContents exists per inode while the file is open (shared by all its
handles) and while a closed file is being truncated. It owns the file's
dirty shard buffers and its copy of the shard map, and follows the rule that
makes crashes harmless: an object's replicas are stored first, then one
metadata transaction points the file at it.

Dirty data is held in 4 KiB pages (write/buffer.py). A flush stores a shard
index's dirty pages either as a whole new shard (a new file, a shard written
through, or when too many patches have piled up: "compaction") or as a patch
of just those pages on top of the objects already there, so a 4 KiB
overwrite of a big file stores 4 KiB, not the shard (metadata/base.py,
ShardLayers). Reads take each page from the newest object that holds it.

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
from collections.abc import Iterator

import trio

from ..errors import DataError, DfsError, NotFound
from ..metadata.base import PAGE_SIZE, InodeAttrs, MetadataStore, ShardLayers, ShardRef
from ..shards.cache import ShardCache
from ..shards.replicator import Replicator
from ..write.buffer import ShardBuffer, WriteBudget
from ..write.flusher import Flusher
from .layout import shard_count, shard_length, shard_span

log = logging.getLogger("dfsfuse.contents")

# A read at least this large, or one that continues the previous read, fetches
# the whole shard into the cache, and the next one ahead; smaller random reads
# fetch only the checksum blocks they touch (NOT_WHOLE). A sequential reader
# gets READ_AHEAD_SHARDS ahead: a disk serves several 4 MiB reads in flight
# much faster than one at a time (a cold 1 GiB read: 415 MB/s with one shard
# ahead, 630 MB/s with four, measured here).
WHOLE_SHARD_READ = 128 * 1024
READ_AHEAD_SHARDS = 4
NOT_WHOLE = 0

# A flush writes a whole new shard instead of a patch once an index has this
# many patches (reads merge every patch), or when the patch would hold more
# than 1/PATCH_SHARE_LIMIT of the shard's bytes anyway.
MAX_PATCHES = 8
PATCH_SHARE_LIMIT = 4

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
        self,
        attrs: InodeAttrs,
        shard_map: dict[int, ShardLayers],
        services: ContentServices,
        replicas: int | None = None,
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
        self._layers = shard_map
        self._page_sources: dict[int, dict[int, tuple[ShardRef, int]]] = {}  # see _sources_of
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
        budget = self._services.budget
        await budget.wait_for_room(self._raise_stored_error)
        async with self._write_lock:
            self._raise_stored_error()
            view = memoryview(data)
            position = 0
            size = self._shard_size
            for index, inner, take in shard_span(offset, len(data), size):
                buffer = await self._writable_buffer(index)
                for page in buffer.partial_pages(inner, take):
                    budget.grow(buffer.add_page(page, await self._stored_page(index, page)))
                budget.grow(buffer.write(inner, view[position : position + take]))
                position += take
                self.size = max(self.size, index * size + inner + take)
                if inner + take == size:
                    self.start_background_flush(index)
            self._touch()
        return len(data)

    async def _writable_buffer(self, index: int) -> ShardBuffer:
        while index in self._flush_done:
            await self._flush_done[index].wait()
        buffer = self._dirty.get(index)
        if buffer is None:
            buffer = self._dirty[index] = ShardBuffer()
            self._services.budget.track((self.inode, index))
        return buffer

    async def _stored_page(self, index: int, page: int) -> bytes:
        """The stored contents of one page (shorter, or empty, past the end)."""
        if page * PAGE_SIZE >= self._stored_length(index):
            return b""
        return await self._read_stored(index, page * PAGE_SIZE, PAGE_SIZE, ahead=NOT_WHOLE)

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
            # Also on cancellation: the data must not vanish.
            del self._flushing[index]
            if not stored:
                self._dirty[index] = buffer
                self._failed.add(index)
            self._flush_done.pop(index).set()
            with trio.CancelScope(shield=True):
                await budget.end_flush(0 if not stored else len(buffer))

    async def _store_and_commit(self, index: int, buffer: ShardBuffer, sync: bool) -> None:
        services = self._services
        ref, end = await self._store_buffer(index, buffer, sync)
        try:
            async with self._commit_lock:
                end += index * self._shard_size
                size = min(self.size, max(self._committed_size, end))
                times = (self.mtime_ns, self.ctime_ns)
                await services.meta.commit_shards(self.inode, {index: ref}, size, mtime_ns=times[0], ctime_ns=times[1])
                self._committed_size = size
                if (self.mtime_ns, self.ctime_ns) == times:
                    self._times_dirty = False  # no write since: close need not commit them again
                self._add_committed(index, ref)
        except DfsError:
            # The engine refused the commit, so nothing points at the new
            # replicas. (Any other failure may have committed: leave them to fsck.)
            await self._discard_stored(ref)
            raise
        if not sync:
            services.remember_unsynced(self.inode, ref)

    async def _store_buffer(self, index: int, buffer: ShardBuffer, sync: bool) -> tuple[ShardRef, int]:
        """Store the buffer's pages as a patch, or the index as a whole new
        shard; returns the new object and the end of the data it commits
        (relative to the index)."""
        layers = self._layers.get(index, ())
        limit = shard_length(index, self.size, self._shard_size)
        stored_length = min(self._stored_length(index), limit)
        length = max(stored_length, min(buffer.end, limit))
        flusher = self._services.flusher
        pages = buffer.pages
        if buffer.covers(length):
            joined = b"".join(pages[page] for page in range(-(-length // PAGE_SIZE)))
            return await flusher.store(memoryview(joined)[:length], sync, self.replicas), length
        if layers and self._patch_fits(layers, buffer, length):
            numbers = sorted(page for page in pages if page * PAGE_SIZE < limit)
            ref = await flusher.store(b"".join(pages[page] for page in numbers), sync, self.replicas)
            return dataclasses.replace(ref, pages=tuple(numbers)), (numbers[-1] + 1) * PAGE_SIZE
        data = await self._merged(index, buffer, stored_length, length)
        return await flusher.store(data, sync, self.replicas), length

    async def _merged(self, index: int, buffer: ShardBuffer, stored_length: int, length: int) -> bytearray:
        """The first `length` bytes of shard `index`: the buffer's pages over
        the first `stored_length` stored bytes, zeros elsewhere."""
        data = bytearray(length)
        kept = min(stored_length, length)
        if kept:
            data[:kept] = (await self._shard_data(index))[:kept]
        buffer.overlay(data)
        return data

    @staticmethod
    def _patch_fits(layers: ShardLayers, buffer: ShardBuffer, length: int) -> bool:
        patches = sum(1 for ref in layers if ref.is_patch)
        return patches < MAX_PATCHES and len(buffer) * PATCH_SHARE_LIMIT <= length

    async def _discard_stored(self, ref: ShardRef) -> None:
        try:
            await self._services.replicator.delete(ref.shard_id, ref.nodes)
        except DfsError as error:
            log.warning("shard %d: could not delete uncommitted replicas (fsck will): %s", ref.shard_id, error)

    def _add_committed(self, index: int, ref: ShardRef) -> None:
        """Follow a committed object: a patch goes on top, a whole shard
        replaces every object of its index."""
        if ref.is_patch:
            layers = self._layers.get(index, ())
            if layers:
                self._services.cache.discard(layers[-1].shard_id)  # its merged data is stale now
            self._layers[index] = layers + (ref,)
            self._page_sources.pop(index, None)
        else:
            self._drop_layers(index)
            self._layers[index] = (ref,)

    def _drop_layers(self, index: int) -> None:
        """Forget the objects of an index, which the metadata made garbage."""
        old = self._layers.pop(index, ())
        self._page_sources.pop(index, None)
        if old:
            self._services.cache.discard(old[-1].shard_id)
            self._services.forget_unsynced(self.inode, [ref.shard_id for ref in old])
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
            taken: list[tuple[int, ShardBuffer]] = []
            for index in list(self._dirty):
                self._services.budget.begin_flush()
                buffer = self._take(index)
                assert buffer is not None  # it is in _dirty, and the lock is held
                taken.append((index, buffer))
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
                self._follow_move(moved)
            services.forget_unsynced(self.inode, [ref.shard_id for ref in refs])
        await services.meta.sync()

    def _follow_move(self, moved: ShardRef) -> None:
        """Use the new replica set of an object this file holds."""
        for index, layers in self._layers.items():
            if any(ref.shard_id == moved.shard_id for ref in layers):
                self._layers[index] = tuple(
                    dataclasses.replace(ref, nodes=moved.nodes) if ref.shard_id == moved.shard_id else ref
                    for ref in layers
                )
                self._page_sources.pop(index, None)

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
            for index in [i for i in self._layers if i >= keep]:
                self._drop_layers(index)
            dropped = [i for i in self._dirty if i >= keep or (tail is not None and i == tail_index)]
            if tail is not None:
                self._add_committed(tail_index, tail)
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
        buffer = self._dirty.get(index, ShardBuffer())
        limit = shard_length(index, self.size, self._shard_size)
        stored_length = min(self._stored_length(index), limit)
        if max(stored_length, min(buffer.end, limit)) <= length:
            return None
        data = await self._merged(index, buffer, stored_length, length)
        return await self._services.flusher.store(data, sync=False, replicas=self.replicas)

    # -- reading -------------------------------------------------------------
    async def read(self, offset: int, size: int, sequential: bool) -> bytes:
        if offset >= self.size or size <= 0:
            return b""
        size = min(size, self.size - offset)
        ahead = READ_AHEAD_SHARDS if sequential else 1 if size >= WHOLE_SHARD_READ else NOT_WHOLE
        parts = [
            await self._read_index(index, inner, take, ahead)
            for index, inner, take in shard_span(offset, size, self._shard_size)
        ]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _read_index(self, index: int, inner: int, take: int, ahead: int) -> bytes:
        """`take` bytes of shard `index` from `inner` on: dirty pages first,
        then what is stored, zeros where nothing is."""
        buffer = self._dirty.get(index)
        if buffer is None:
            buffer = self._flushing.get(index)
        if buffer is None:
            chunk = await self._read_stored(index, inner, take, ahead)
            return chunk if len(chunk) == take else chunk + bytes(take - len(chunk))
        out = bytearray(take)
        if not buffer.covers_range(inner, inner + take):
            chunk = await self._read_stored(index, inner, take, ahead)
            out[: len(chunk)] = chunk
        buffer.overlay(out, start=inner)
        return bytes(out)

    def _stored_length(self, index: int) -> int:
        """How far the stored objects of an index reach (0: none)."""
        return max((_reach(ref) for ref in self._layers.get(index, ())), default=0)

    async def _read_stored(self, index: int, inner: int, length: int, ahead: int) -> bytes:
        """Stored bytes of shard `index`; shorter than `length` past the end.

        With `ahead` > 0 (NOT_WHOLE is 0) the whole shard is fetched into the
        cache, and so are that many shards after it."""
        layers = self._layers.get(index)
        if not layers:
            return b""
        for following in range(index + 1, index + 1 + ahead):  # on hits too: keep the window full
            self._read_ahead(following)
        cached = self._services.cache.get(layers[-1].shard_id)
        if cached is not None:
            return cached[inner : inner + length]
        if ahead:
            return (await self._shard_data(index))[inner : inner + length]
        if len(layers) == 1 and not layers[0].is_patch:
            return await self._read_object(layers[0], inner, length)
        sources = self._sources_of(index)
        base = None if layers[0].is_patch else layers[0]
        out = bytearray(length)
        for start, stop, source in _source_runs(inner, inner + length, sources):
            if source is None:
                chunk = b"" if base is None else await self._read_object(base, start, stop - start)
            else:
                ref, slot = source
                offset = slot * PAGE_SIZE + start % PAGE_SIZE
                chunk = await self._guarded_read(ref, offset, stop - start)
            out[start - inner : start - inner + len(chunk)] = chunk
        return bytes(out)

    async def _read_object(self, ref: ShardRef, offset: int, length: int) -> bytes:
        """Bytes of a whole shard's object; shorter past its end."""
        if offset >= ref.length:
            return b""
        return await self._guarded_read(ref, offset, min(length, ref.length - offset))

    def _sources_of(self, index: int) -> dict[int, tuple[ShardRef, int]]:
        """page -> (patch, the page's slot in it), for the newest patch
        holding each page of the index; pages absent come from the whole shard."""
        sources = self._page_sources.get(index)
        if sources is None:
            sources = self._page_sources[index] = {}
            for ref in self._layers.get(index, ()):
                for slot, page in enumerate(ref.pages):
                    sources[page] = (ref, slot)
        return sources

    async def _shard_data(self, index: int) -> bytes:
        """The whole verified shard, its objects merged, from the cache or the stores."""
        layers = self._layers[index]
        in_flight = self._services.reads_in_flight
        for ref in layers:  # also while waiting for another reader's fetch
            in_flight[ref.shard_id] += 1
        try:
            return await self._services.cache.get_or_fetch(layers[-1].shard_id, lambda: self._merge(layers))
        finally:
            for ref in layers:
                self._done_reading(ref.shard_id)

    async def _merge(self, layers: ShardLayers) -> bytes:
        base = None if layers[0].is_patch else layers[0]
        patches = layers[1:] if base is not None else layers
        if not patches:
            return await self._guarded_read(layers[0], 0, layers[0].length)
        merged = bytearray(max(_reach(ref) for ref in layers))
        if base is not None:
            merged[: base.length] = await self._guarded_read(base, 0, base.length)
        for ref in patches:
            data = await self._guarded_read(ref, 0, ref.length)
            for slot, page in enumerate(ref.pages):
                merged[page * PAGE_SIZE : (page + 1) * PAGE_SIZE] = data[slot * PAGE_SIZE : (slot + 1) * PAGE_SIZE]
        return bytes(merged)

    async def _guarded_read(self, ref: ShardRef, offset: int, length: int) -> bytes:
        """Read while telling the garbage collector that this object is in use."""
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
        """The object's ref as the metadata has it now, if its replicas moved
        (rebalance, drain, repair) since this file loaded its shard map."""
        for layers in (await self._services.meta.shard_map(self.inode)).values():
            for current in layers:
                if current.shard_id == ref.shard_id and current.nodes != ref.nodes:
                    self._follow_move(current)
                    return current
        return None

    def _done_reading(self, shard_id: int) -> None:
        in_flight = self._services.reads_in_flight
        in_flight[shard_id] -= 1
        if not in_flight[shard_id]:
            del in_flight[shard_id]

    def _read_ahead(self, index: int) -> None:
        layers = self._layers.get(index)
        if not layers or index in self._dirty or self._services.cache.is_cached_or_fetching(layers[-1].shard_id):
            return

        async def fetch_quietly() -> None:
            try:
                await self._shard_data(index)
            except Exception:  # noqa: BLE001 - the real read will retry and report
                log.debug("read-ahead of shard index %d failed", index, exc_info=True)

        self._services.nursery.start_soon(fetch_quietly)


def _reach(ref: ShardRef) -> int:
    """The offset in its shard index just past the last byte an object holds."""
    return (ref.pages[-1] + 1) * PAGE_SIZE if ref.is_patch else ref.length


def _source_runs(
    start: int, stop: int, sources: dict[int, tuple[ShardRef, int]]
) -> Iterator[tuple[int, int, tuple[ShardRef, int] | None]]:
    """Split [start, stop) into maximal runs that one read can serve; yields
    (run start, run stop, source of its first page): pages all from the whole
    shard (source None), or from one patch at consecutive slots."""
    position = start
    while position < stop:
        first = position // PAGE_SIZE
        source = sources.get(first)
        end = min(stop, (first + 1) * PAGE_SIZE)
        while end < stop and _continues(source, sources.get(end // PAGE_SIZE), end // PAGE_SIZE - first):
            end = min(stop, end + PAGE_SIZE)
        yield position, end, source
        position = end


def _continues(first: tuple[ShardRef, int] | None, source: tuple[ShardRef, int] | None, distance: int) -> bool:
    if first is None or source is None:
        return first is source
    return source[0] is first[0] and source[1] == first[1] + distance
