"""An LRU cache of verified shard contents, with de-duplicated fetches.

Only data that the replicator verified enters the cache, so a hit needs no
check. Memory is bounded by bytes; an entry larger than the whole budget is
served but not kept. Two readers asking for the same uncached shard share one
fetch, which is what makes read-ahead cheap.
"""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable

import trio


class ShardCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self._bytes = 0
        self._fetching: dict[int, trio.Event] = {}

    def get(self, shard_id: int) -> bytes | None:
        data = self._entries.get(shard_id)
        if data is not None:
            self._entries.move_to_end(shard_id)
        return data

    def put(self, shard_id: int, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        self.discard(shard_id)
        self._entries[shard_id] = data
        self._bytes += len(data)
        while self._bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= len(evicted)

    def discard(self, shard_id: int) -> None:
        data = self._entries.pop(shard_id, None)
        if data is not None:
            self._bytes -= len(data)

    def is_cached_or_fetching(self, shard_id: int) -> bool:
        return shard_id in self._entries or shard_id in self._fetching

    async def get_or_fetch(self, shard_id: int, fetch: Callable[[], Awaitable[bytes]]) -> bytes:
        """The cached shard, or the result of one shared `fetch` call."""
        while True:
            data = self.get(shard_id)
            if data is not None:
                return data
            pending = self._fetching.get(shard_id)
            if pending is None:
                break
            await pending.wait()
            if shard_id not in self._entries:
                # The other fetch failed or the shard was too large to keep:
                # fetch on our own rather than wait again.
                return await fetch()
        done = trio.Event()
        self._fetching[shard_id] = done
        try:
            data = await fetch()
            self.put(shard_id, data)
            return data
        finally:
            del self._fetching[shard_id]
            done.set()
