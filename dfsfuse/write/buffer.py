"""Dirty shard buffers and the memory budget that bounds them.

A ShardBuffer holds the dirty 4 KiB pages of one shard index of one file, as
the application wrote them. Pages are whole: a write that covers only part of
a page the buffer does not hold yet needs the page's current contents first
(`partial_pages` names them, `add_page` puts them in). So a small overwrite
costs a page, not a shard, in memory and later in the stores (a patch).

The WriteBudget counts the bytes held by all buffers of all files; when it is
exceeded, writers wait while the oldest buffers are flushed, so memory stays
bounded whatever the application does and a slow store slows the writers
down instead.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Protocol

import trio

from ..errors import DataError
from ..layout import PAGE_SIZE


class ShardBuffer:
    """Dirty pages of one shard index: page number -> PAGE_SIZE writable bytes
    (a bytearray, or a view of the block a write copied)."""

    __slots__ = ("pages",)

    def __init__(self) -> None:
        self.pages: dict[int, bytearray | memoryview] = {}

    def __len__(self) -> int:
        """Bytes held (what the budget counts)."""
        return len(self.pages) * PAGE_SIZE

    @property
    def end(self) -> int:
        """The offset just past the last page held; 0 when empty."""
        return (max(self.pages) + 1) * PAGE_SIZE if self.pages else 0

    def partial_pages(self, offset: int, length: int) -> list[int]:
        """Pages that [offset, offset+length) covers only in part and that are
        not held: their current contents must be added before the write."""
        if length <= 0:
            return []
        first, last = offset // PAGE_SIZE, (offset + length - 1) // PAGE_SIZE
        edges = {first} if offset % PAGE_SIZE else set()
        if (offset + length) % PAGE_SIZE:
            edges.add(last)
        return sorted(page for page in edges if page not in self.pages)

    def add_page(self, page: int, contents: bytes | bytearray) -> int:
        """Hold `contents` (zero-padded to a page) as page `page`; returns the growth."""
        data = bytearray(contents[:PAGE_SIZE])
        data.extend(bytes(PAGE_SIZE - len(data)))
        grown = 0 if page in self.pages else PAGE_SIZE
        self.pages[page] = data
        return grown

    def write(self, offset: int, chunk: bytes | memoryview) -> int:
        """Write at `offset`; the pages it covers in part must be held already.
        Returns how many bytes the buffer grew.

        The whole pages of a write are copied once, as one block, and held as
        views of it: one allocation per write rather than one per page."""
        grown = 0
        view = memoryview(chunk)
        position = 0
        while position < len(view):
            page, inner = divmod(offset + position, PAGE_SIZE)
            whole_pages = (len(view) - position) // PAGE_SIZE if inner == 0 else 0
            if whole_pages:
                block = memoryview(bytearray(view[position : position + whole_pages * PAGE_SIZE]))
                for number in range(whole_pages):
                    if page + number not in self.pages:
                        grown += PAGE_SIZE
                    self.pages[page + number] = block[number * PAGE_SIZE : (number + 1) * PAGE_SIZE]
                position += whole_pages * PAGE_SIZE
            else:
                take = min(PAGE_SIZE - inner, len(view) - position)
                self.pages[page][inner : inner + take] = view[position : position + take]
                position += take
        return grown

    def covers(self, length: int) -> bool:
        """Whether every page of [0, length) is held."""
        return self.covers_range(0, length)

    def covers_range(self, start: int, stop: int) -> bool:
        """Whether every page that [start, stop) touches is held."""
        return all(page in self.pages for page in range(start // PAGE_SIZE, -(-stop // PAGE_SIZE)))

    def overlay(self, data: bytearray, start: int = 0) -> None:
        """Copy the held pages onto `data`, which holds the shard's bytes from
        `start` on; pages (or parts) outside it are left out."""
        stop = start + len(data)
        window = range(start // PAGE_SIZE, -(-stop // PAGE_SIZE))
        # Look up the window's pages or walk the held ones, whichever is fewer:
        # a 4 KiB read of a shard with many dirty pages stays cheap.
        for page in window if len(window) < len(self.pages) else list(self.pages):
            contents = self.pages.get(page)
            lo, hi = max(page * PAGE_SIZE, start), min((page + 1) * PAGE_SIZE, stop)
            if contents is not None and lo < hi:
                data[lo - start : hi - start] = contents[lo - page * PAGE_SIZE : hi - page * PAGE_SIZE]

class Flushable(Protocol):
    """A file whose dirty shard indexes the background flusher can store."""

    async def flush_in_background(self, index: int) -> None:
        """Store the index's dirty buffer if it still has one; ends the
        flush that `WriteBudget.request_flush` began."""


BufferKey = tuple[Flushable, int]  # (file, shard index)


class WriteBudget:
    """Global accounting of buffered bytes with backpressure.

    Flushes in the background are requested here (`request_flush`): a
    message on a memory channel to the flusher task (write/flusher.py),
    whose capacity holds back requesters when the flusher falls behind.
    When writers must wait for room, the oldest tracked buffer is requested.
    Every requested flush is counted until the file ends it (`end_flush`),
    so writers waiting for room know relief is coming. A buffer whose store
    failed is not tracked again (its file's next flush retries it), so when
    the budget is full of such data and nothing is being flushed, writers
    get an error instead of waiting for ever.
    """

    def __init__(self, max_bytes: int, flush_requests: trio.MemorySendChannel[BufferKey]):
        self.max_bytes = max_bytes
        self._flush_requests = flush_requests
        self._used = 0
        self._flushes = 0
        self._oldest_first: collections.OrderedDict[BufferKey, None] = collections.OrderedDict()
        self._changed = trio.Condition()

    @property
    def used(self) -> int:
        return self._used

    @property
    def flushes(self) -> int:
        """Flushes requested or under way and not yet ended."""
        return self._flushes

    def track(self, key: BufferKey) -> None:
        """Note that an evictable dirty buffer exists for `key` (oldest first)."""
        self._oldest_first.setdefault(key, None)

    def untrack(self, key: BufferKey) -> None:
        self._oldest_first.pop(key, None)

    def grow(self, amount: int) -> None:
        self._used += amount

    async def release(self, amount: int) -> None:
        self._used -= amount
        async with self._changed:
            self._changed.notify_all()

    def begin_flush(self) -> None:
        """Count a flush the caller does itself (fsync, close)."""
        self._flushes += 1

    async def request_flush(self, key: BufferKey) -> None:
        """Have the flusher task store this buffer (a full shard, an eviction)."""
        self.untrack(key)
        self._flushes += 1
        await self._flush_requests.send(key)

    async def end_flush(self, released: int) -> None:
        self._flushes -= 1
        await self.release(released)

    async def wait_for_room(self, check: Callable[[], None]) -> None:
        """Return once buffered bytes are under the limit, evicting oldest first.

        `check` is called on every wake-up and may raise to stop waiting (the
        writer's own file has failed). DataError when the budget is full of
        data that could not be stored.
        """
        while True:
            check()
            if self._used < self.max_bytes:
                return
            if self._oldest_first:
                await self.request_flush(next(iter(self._oldest_first)))
            elif not self._flushes:
                raise DataError("the write buffer is full of data that could not be stored")
            async with self._changed:
                if self._used >= self.max_bytes and (self._flushes or self._oldest_first):
                    await self._changed.wait()
