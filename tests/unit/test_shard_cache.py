"""The verified-shard LRU cache: bounds, eviction order, shared fetches."""

import trio
import trio.testing

from dfsfuse.shards.cache import ShardCache


def test_lru_evicts_least_recently_used_within_byte_budget():
    cache = ShardCache(max_bytes=10)
    cache.put(1, b"aaaa")
    cache.put(2, b"bbbb")
    assert cache.get(1) == b"aaaa"  # 1 is now the most recently used
    cache.put(3, b"cccc")
    assert cache.get(2) is None
    assert cache.get(1) == b"aaaa" and cache.get(3) == b"cccc"


def test_entry_larger_than_budget_is_not_kept():
    cache = ShardCache(max_bytes=4)
    cache.put(1, b"too large")
    assert cache.get(1) is None


def test_concurrent_readers_share_one_fetch():
    calls = []

    async def main():
        cache = ShardCache(max_bytes=1 << 20)
        release = trio.Event()

        async def fetch():
            calls.append(1)
            await release.wait()
            return b"shard"

        results = []

        async def reader():
            results.append(await cache.get_or_fetch(7, fetch))

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            assert cache.is_cached_or_fetching(7)
            release.set()
        assert results == [b"shard"] * 3

    trio.run(main)
    assert len(calls) == 1


def test_failed_fetch_is_not_cached_and_others_retry():
    async def main():
        cache = ShardCache(max_bytes=1 << 20)

        async def failing():
            raise OSError("boom")

        try:
            await cache.get_or_fetch(1, failing)
        except OSError:
            pass
        assert not cache.is_cached_or_fetching(1)

        async def working():
            return b"ok"

        assert await cache.get_or_fetch(1, working) == b"ok"

    trio.run(main)
