"""The write pipeline of one regular file: buffer, seal, store, commit, retry.

One FileWriter exists per inode while the file is open (shared by all its
handles) and while a closed file is being truncated. It follows the rule
that makes crashes harmless: an object's replicas are stored first, then one
metadata transaction points the file at it.

Dirty data is held in 4 KiB pages (buffer.py). A flush stores a shard
index's dirty pages either as a whole new shard (a new file, a shard written
through, or when too many patches have piled up: "compaction") or as a patch
of just those pages on top of the objects already there, so a 4 KiB
overwrite of a big file stores 4 KiB, not the shard (metadata/base.py
ShardRef). The file's shard map has one copy, the metadata cache's: the
writer reads it there, and each commit updates it there.

Concurrency (all on the trio loop, where tasks interleave at every await):
- `_write_lock` is held by a write (while it finds and fills buffers), by a
  truncate (for all of it), and by anyone taking dirty buffers to flush them.
  So a buffer is never taken from under a write or a truncate.
- A taken buffer sits in `_flushing` (still readable) until its shard is
  stored and committed; a writer or truncate that needs that shard index
  waits for it first. Storing happens outside the lock.
- `_commit_lock` orders the metadata commits of the file (shards, size,
  times, and a setattr of the open file), so the committed size never goes
  backwards and a commit never puts back times a setattr replaced.

Errors: a buffer whose store failed goes back to the dirty set and is tried
again by the next flush. `flush` raises whenever data is still unstored when
it finishes, so every close and fsync learns of it; `write` refuses new data
while earlier data could not be stored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Protocol

import trio

from ..errors import DataError, DfsError, NotFound
from ..layout import PAGE_SIZE, shard_count, shard_length, shard_span
from ..metadata.base import (
    AttrChanges,
    InodeAttrs,
    MetadataStore,
    ShardLayers,
    ShardRef,
)
from ..shards.cache import ShardCache
from ..shards.garbage import GarbageCollector
from ..shards.layers import patch_count, stored_length
from ..shards.policy import StoragePolicy
from ..shards.replicator import Replicator
from .buffer import ShardBuffer, WriteBudget
from .quotas import QuotaGuard
from .storer import ShardStorer
from .unsynced import UnsyncedReplicas

log = logging.getLogger("dfsfuse.write")

# A flush writes a whole new shard instead of a patch once an index has this
# many patches (reads merge every patch), or when the patch would hold more
# than 1/PATCH_SHARE_LIMIT of the shard's bytes anyway.
MAX_PATCHES = 8
PATCH_SHARE_LIMIT = 4


class StoredData(Protocol):
    """What the writer reads of the file's stored objects (vfs/reader.py)."""

    async def read_stored(self, index: int, offset: int, length: int) -> bytes:
        """Stored bytes of shard `index` from `offset`; shorter past the end."""

    async def shard_data(self, index: int) -> bytes:
        """The whole stored shard `index`, its objects merged, verified."""


@dataclasses.dataclass(frozen=True)
class WriteServices:
    """What every FileWriter shares."""

    meta: MetadataStore
    replicator: Replicator
    storer: ShardStorer
    budget: WriteBudget
    cache: ShardCache  # verified shard data for reads; stale entries are dropped on commit
    garbage: GarbageCollector
    unsynced: UnsyncedReplicas
    shard_size: int
    quotas: QuotaGuard  # admits growth under directory quotas; told of every size commit


class FileWriter:
    def __init__(
        self, attrs: InodeAttrs, policy: StoragePolicy, stored: StoredData, services: WriteServices
    ):
        self.inode = attrs.inode
        self.policy = policy  # how its new objects are stored (replicas, compression, erasure coding)
        self.size = attrs.size
        self.mtime_ns = attrs.mtime_ns
        self.ctime_ns = attrs.ctime_ns
        self._stored = stored
        self._services = services
        self._shard_size = services.shard_size
        self._committed_size = attrs.size
        self._times_dirty = False
        self._dirty: dict[int, ShardBuffer] = {}
        self._flushing: dict[int, ShardBuffer] = {}
        self._flush_done: dict[int, trio.Event] = {}
        self._error: DfsError | None = None  # the last store failure
        self._failed: set[int] = set()  # dirty shard indexes whose store failed
        self._write_lock = trio.Lock()
        self._commit_lock = trio.Lock()

    @property
    def committed_size(self) -> int:
        """The size the engine holds (and has charged to the file's quotas)."""
        return self._committed_size

    @property
    def is_clean(self) -> bool:
        return not (self._dirty or self._flushing or self._times_dirty or self.size != self._committed_size)

    def held(self, index: int) -> ShardBuffer | None:
        """The unstored data of a shard index (dirty, or being stored), if any."""
        buffer = self._dirty.get(index)
        return self._flushing.get(index) if buffer is None else buffer

    def _raise_stored_error(self) -> None:
        if self._failed and self._error is not None:
            # A fresh exception each time: re-raising one object would chain
            # every failed call's traceback onto it.
            raise type(self._error)(str(self._error), self._error.errno)

    async def _shard_map(self) -> Mapping[int, ShardLayers]:
        return await self._services.meta.shard_map(self.inode)

    # -- writing -------------------------------------------------------------
    async def write(self, offset: int, data: bytes) -> int:
        self._raise_stored_error()
        budget = self._services.budget
        await budget.wait_for_room(self._raise_stored_error)
        async with self._write_lock, self._admitted(offset + len(data)):
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
                    await budget.request_flush((self, index))
            self._touch()
        return len(data)

    @contextlib.asynccontextmanager
    async def _admitted(self, end: int) -> AsyncIterator[None]:
        """A change that may grow the file to `end` bytes, once the directory
        quotas above it allow that (else QuotaExceeded: EDQUOT at once, nothing
        accepted); the caller holds `_write_lock`."""
        quotas = self._services.quotas
        await quotas.admit(self, end)
        try:
            yield
        finally:
            quotas.written(self)

    async def _writable_buffer(self, index: int) -> ShardBuffer:
        while index in self._flush_done:
            await self._flush_done[index].wait()
        buffer = self._dirty.get(index)
        if buffer is None:
            buffer = self._dirty[index] = ShardBuffer()
            self._services.budget.track((self, index))
        return buffer

    async def _stored_page(self, index: int, page: int) -> bytes:
        """The stored contents of one page (shorter, or empty, past the end)."""
        if page * PAGE_SIZE >= stored_length((await self._shard_map()).get(index, ())):
            return b""
        return await self._stored.read_stored(index, page * PAGE_SIZE, PAGE_SIZE)

    def _touch(self) -> None:
        self.mtime_ns = self.ctime_ns = time.time_ns()
        self._times_dirty = True

    async def setattr(self, changes: AttrChanges, now_ns: int) -> InodeAttrs:
        """A chmod, chown or utimens of the open file, committed in order with
        the file's other commits: a shard commit must not take the times from
        before the setattr and land after it (tar sets times on the open file
        while a full shard is still being stored)."""
        async with self._commit_lock:
            attrs = await self._services.meta.setattr(self.inode, changes, now_ns)
            self.mtime_ns, self.ctime_ns = attrs.mtime_ns, attrs.ctime_ns
        return attrs

    def adopt(self, attrs: InodeAttrs) -> None:
        """Another mount changed the stored file: take its size and times, if
        nothing written here is still unstored (if something is, this
        mount's writes land over the other's, as two writers on one machine)."""
        if self.is_clean:
            self.size = self._committed_size = attrs.size
            self.mtime_ns, self.ctime_ns = attrs.mtime_ns, attrs.ctime_ns

    # -- storing -------------------------------------------------------------
    async def flush_in_background(self, index: int) -> None:
        """The flusher's request (a full shard, or budget eviction)."""
        async with self._write_lock:
            buffer = self._take(index)
        if buffer is None:
            await self._services.budget.end_flush(0)
        else:
            await self._store_taken(index, buffer, sync=False)

    def _take(self, index: int) -> ShardBuffer | None:
        """Move a dirty buffer to `_flushing`; the caller holds `_write_lock`
        and has counted the flush in the budget."""
        buffer = self._dirty.pop(index, None)
        if buffer is None:
            return None
        self._services.budget.untrack((self, index))
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
                before = (await self._shard_map()).get(index, ())
                with services.quotas.committing():
                    await services.meta.commit_shards(
                        self.inode, {index: ref}, size, mtime_ns=times[0], ctime_ns=times[1]
                    )
                    self._committed_size = size
                if (self.mtime_ns, self.ctime_ns) == times:
                    self._times_dirty = False  # no write since: close need not commit them again
                if ref.is_patch:
                    self._superseded(before)
                else:
                    self._replaced(before)
        except DfsError:
            # The engine refused the commit, so nothing points at the new
            # replicas. (Any other failure may have committed: leave them to fsck.)
            await services.storer.discard(ref)
            raise
        if not sync:
            services.unsynced.remember(self.inode, ref)

    async def _store_buffer(self, index: int, buffer: ShardBuffer, sync: bool) -> tuple[ShardRef, int]:
        """Store the buffer's pages as a patch, or the index as a whole new
        shard; returns the new object and the end of the data it commits
        (relative to the index)."""
        layers = (await self._shard_map()).get(index, ())
        limit = shard_length(index, self.size, self._shard_size)
        stored = min(stored_length(layers), limit)
        length = max(stored, min(buffer.end, limit))
        storer = self._services.storer
        pages = buffer.pages
        if buffer.covers(length):
            joined = b"".join(pages[page] for page in range(-(-length // PAGE_SIZE)))
            return await storer.store(memoryview(joined)[:length], sync, self.policy), length
        if layers and self._patch_fits(layers, buffer, length):
            numbers = sorted(page for page in pages if page * PAGE_SIZE < limit)
            ref = await storer.store(b"".join(pages[page] for page in numbers), sync, self.policy)
            return dataclasses.replace(ref, pages=tuple(numbers)), (numbers[-1] + 1) * PAGE_SIZE
        data = await self._merged(index, buffer, stored, length)
        return await storer.store(data, sync, self.policy), length

    async def _merged(self, index: int, buffer: ShardBuffer, stored: int, length: int) -> bytearray:
        """The first `length` bytes of shard `index`: the buffer's pages over
        the first `stored` stored bytes, zeros elsewhere."""
        data = bytearray(length)
        kept = min(stored, length)
        if kept:
            data[:kept] = (await self._stored.shard_data(index))[:kept]
        buffer.overlay(data)
        return data

    @staticmethod
    def _patch_fits(layers: ShardLayers, buffer: ShardBuffer, length: int) -> bool:
        return patch_count(layers) < MAX_PATCHES and len(buffer) * PATCH_SHARE_LIMIT <= length

    def _superseded(self, before: ShardLayers) -> None:
        """A patch went on top of `before`: the merged data cached under the
        old newest object is stale."""
        if before:
            self._services.cache.discard(before[-1].shard_id)

    def _replaced(self, before: ShardLayers) -> None:
        """A commit made the objects `before` garbage."""
        if before:
            services = self._services
            services.cache.discard(before[-1].shard_id)
            services.unsynced.forget(self.inode, [ref.shard_id for ref in before])
            services.garbage.note_garbage()

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
        refs = services.unsynced.of(self.inode)
        if refs:
            # A replica whose node died since it was written is made again
            # elsewhere; the new replica sets are recorded before fsync returns.
            for moved in await services.replicator.sync_durably(refs):
                try:
                    await services.meta.set_shard_nodes(moved.shard_id, moved.nodes)
                except NotFound:
                    continue  # the shard was replaced or deleted meanwhile
            services.unsynced.forget(self.inode, [ref.shard_id for ref in refs])
        await services.meta.sync()

    async def _commit_size_and_times(self) -> None:
        async with self._commit_lock:
            if self.size == self._committed_size and not self._times_dirty:
                return
            size = self.size
            with self._services.quotas.committing():
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
    async def truncate(self, new_size: int, changes: AttrChanges | None = None) -> InodeAttrs:
        """Set the size, and with `changes` other attributes in the same
        commit; a shrink stores the cut last shard anew, so the bytes past the
        new end never come back. On failure nothing changes."""
        async with self._write_lock, self._admitted(new_size):
            await self._wait_for_flushes()
            shard_size = self._shard_size
            keep = shard_count(new_size, shard_size)
            tail_index, tail_length = divmod(new_size, shard_size)
            tail: ShardRef | None = None
            if new_size < self.size and tail_length:
                tail = await self._store_cut_tail(tail_index, tail_length)
            return await self._commit_reshaped(
                {} if tail is None else {tail_index: tail}, lambda: new_size, drop_from=keep, changes=changes,
                exact_size=True,
            )

    # -- holes ---------------------------------------------------------------
    async def zero_range(self, offset: int, length: int, grow_to: int | None = None) -> InodeAttrs:
        """Make [offset, offset+length) read as zeros (fallocate's punch hole
        and zero range), and with `grow_to` make the file at least that long
        (with `length` 0 that is all it does), in one commit. A shard index
        the range covers to the end of its data loses its objects (their
        replicas become garbage: the space is freed); one it covers in part
        is stored anew with the range zeroed and its trailing zeros cut, as
        truncate stores a cut tail. Only indexes that hold data are visited,
        so a range over a huge sparse file costs what the file holds. On
        failure nothing changes."""
        async with self._write_lock, self._admitted(grow_to or 0):
            await self._wait_for_flushes()
            shard_size = self._shard_size
            end = min(offset + length, self.size)  # nothing past the end to zero
            held = {*(await self._shard_map()), *self._dirty}
            holes: list[int] = []
            replacements: dict[int, ShardRef] = {}
            try:
                for index in sorted(i for i in held if offset < (i + 1) * shard_size and i * shard_size < end):
                    start = index * shard_size
                    inner = max(offset, start) - start
                    take = min(end, start + shard_size) - start - inner
                    buffer, stored, data_end = await self._held_data(index)
                    if data_end <= inner:
                        continue  # nothing there to zero
                    ref = None if inner == 0 and take >= data_end else await self._store_zeroed(
                        index, buffer, stored, data_end, inner, take
                    )
                    if ref is None:
                        holes.append(index)
                    else:
                        replacements[index] = ref
            except DfsError:
                for ref in replacements.values():  # stored for nothing
                    await self._services.storer.discard(ref)
                raise

            def new_size() -> int:
                # As a flush would: the size covers the data the new objects
                # hold, and never goes below what another commit recorded.
                ends = [index * shard_size + ref.length for index, ref in replacements.items()]
                return max(self._committed_size, grow_to or 0, min(self.size, max(ends, default=0)))

            return await self._commit_reshaped(replacements, new_size, holes=holes)

    async def _commit_reshaped(
        self, replacements: dict[int, ShardRef], size: Callable[[], int], *, holes: Sequence[int] = (),
        drop_from: int | None = None, changes: AttrChanges | None = None, exact_size: bool = False,
    ) -> InodeAttrs:
        """One commit that reshapes the file (truncate, punch): the new whole
        shards `replacements` (stored already), the indexes in `holes` and from
        `drop_from` on emptied, the size `size()` (taken under the commit lock),
        the times now, and `changes`. Then the in-memory state follows: what
        the commit replaced becomes garbage, the new objects are remembered
        for fsync, the dirty buffers of every index it touched go (they were
        merged into the new objects or cut away), and the size becomes the
        committed one (`exact_size`) or grows to it. The caller holds
        `_write_lock` with no flush in flight. If the engine refuses, the new
        objects are deleted and nothing changes."""
        now = time.time_ns()
        try:
            async with self._commit_lock:
                committed = size()
                shard_map = await self._shard_map()
                touched = {*holes, *replacements, *(i for i in shard_map if drop_from is not None and i >= drop_from)}
                gone = [shard_map[index] for index in touched if index in shard_map]
                with self._services.quotas.committing():
                    attrs = await self._services.meta.commit_shards(
                        self.inode, replacements, committed, drop_from=drop_from, mtime_ns=now, ctime_ns=now,
                        changes=changes, holes=holes,
                    )
                    self._committed_size = committed
        except DfsError:
            # Refused: nothing points at the new replicas (any other failure may
            # have committed: fsck deals with what did not).
            for ref in replacements.values():
                await self._services.storer.discard(ref)
            raise
        # Committed: the in-memory state follows, with no await before the size is set.
        for layers in gone:
            self._replaced(layers)
        for ref in replacements.values():
            self._services.unsynced.remember(self.inode, ref)
        dropped = [i for i in self._dirty if i in touched or (drop_from is not None and i >= drop_from)]
        self.size = committed if exact_size else max(self.size, committed)
        self.mtime_ns, self.ctime_ns = attrs.mtime_ns, attrs.ctime_ns
        for index in dropped:
            await self._drop_dirty(index)
        return attrs

    async def _held_data(self, index: int) -> tuple[ShardBuffer, int, int]:
        """Shard `index`'s dirty buffer (an empty one if none), how many of its
        stored bytes count, and how far its data reaches (buffered or stored,
        within the file's size)."""
        buffer = self._dirty.get(index)
        if buffer is None:
            buffer = ShardBuffer()
        limit = shard_length(index, self.size, self._shard_size)
        stored = min(stored_length((await self._shard_map()).get(index, ())), limit)
        return buffer, stored, max(stored, min(buffer.end, limit))

    async def _store_zeroed(
        self, index: int, buffer: ShardBuffer, stored: int, held: int, inner: int, take: int
    ) -> ShardRef | None:
        """Shard `index` (`held` bytes of it) with [inner, inner+take) zeroed
        and its trailing zeros cut (they read as zeros past an object's
        length), stored as a new whole shard; None if nothing but zeros is left."""
        data = await self._merged(index, buffer, stored, held)
        data[inner : min(inner + take, held)] = bytes(min(take, held - inner))
        kept = len(data.rstrip(b"\0"))
        if not kept:
            return None
        del data[kept:]
        return await self._services.storer.store(data, sync=False, policy=self.policy)

    async def _drop_dirty(self, index: int) -> None:
        self._failed.discard(index)
        buffer = self._dirty.pop(index)
        self._services.budget.untrack((self, index))
        await self._services.budget.release(len(buffer))

    async def _store_cut_tail(self, index: int, length: int) -> ShardRef | None:
        """Store the first `length` bytes of shard `index` as a new shard, if
        what the shard holds now (buffered or stored) is longer."""
        buffer, stored, held = await self._held_data(index)
        if held <= length:
            return None
        data = await self._merged(index, buffer, stored, length)
        return await self._services.storer.store(data, sync=False, policy=self.policy)
