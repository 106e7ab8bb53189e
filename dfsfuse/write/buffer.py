"""Dirty shard buffers and the memory budget that bounds them.

A ShardBuffer holds the bytes [0, len) of one shard of one file as the
application wrote them (on top of the shard's old contents, loaded first when
a write covers only part of an existing shard). The WriteBudget counts the
bytes held by all buffers of all files; when it is exceeded, writers wait
while the oldest buffers are flushed, so memory stays bounded whatever the
application does and a slow store slows the writers down instead.
"""

from __future__ import annotations

import collections
from typing import Callable

import trio

from ..errors import DataError


class ShardBuffer:
    """The pending contents of one shard: a growable bytearray."""

    __slots__ = ("data",)

    def __init__(self, base: bytes | bytearray = b""):
        self.data = bytearray(base)

    def __len__(self) -> int:
        return len(self.data)

    def write(self, offset: int, chunk: bytes | memoryview) -> int:
        """Write at `offset`, zero-filling any gap; returns how much the buffer grew."""
        before = len(self.data)
        end = offset + len(chunk)
        if offset > before:
            self.data.extend(bytes(offset - before))
        self.data[offset:end] = chunk
        return len(self.data) - before

    def truncate(self, length: int) -> int:
        """Cut to `length` bytes; returns how much the buffer shrank."""
        before = len(self.data)
        if length < before:
            del self.data[length:]
        return before - len(self.data)


BufferKey = tuple[int, int]  # (inode, shard index)


class WriteBudget:
    """Global accounting of buffered bytes with backpressure.

    `evict` is called with the key of the oldest tracked buffer when writers
    must wait; it starts flushing that buffer, which brackets the work with
    `begin_flush` and `end_flush`. A buffer whose store failed is not tracked
    again (its file's next flush retries it), so when the budget is full of
    such data and nothing is being flushed, writers get an error instead of
    waiting for ever.
    """

    def __init__(self, max_bytes: int, evict: Callable[[BufferKey], None]):
        self.max_bytes = max_bytes
        self._evict = evict
        self._used = 0
        self._flushes = 0
        self._oldest_first: collections.OrderedDict[BufferKey, None] = collections.OrderedDict()
        self._changed = trio.Condition()

    @property
    def used(self) -> int:
        return self._used

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
        self._flushes += 1

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
                key = next(iter(self._oldest_first))
                self.untrack(key)
                self._evict(key)
            elif not self._flushes:
                raise DataError("the write buffer is full of data that could not be stored")
            async with self._changed:
                if self._used >= self.max_bytes and (self._flushes or self._oldest_first):
                    await self._changed.wait()
