"""ShardBuffer arithmetic and the WriteBudget's backpressure."""

import trio
import trio.testing

from dfsfuse.layout import PAGE_SIZE
from dfsfuse.write.buffer import ShardBuffer, WriteBudget


def test_buffer_holds_whole_pages_and_reports_growth():
    buffer = ShardBuffer()
    # Whole pages need nothing stored; a partly covered page must be added first.
    assert buffer.partial_pages(PAGE_SIZE, 2 * PAGE_SIZE) == []
    assert buffer.write(PAGE_SIZE, b"a" * 2 * PAGE_SIZE) == 2 * PAGE_SIZE
    assert buffer.partial_pages(10, PAGE_SIZE) == [0]  # page 1 is held already
    assert buffer.partial_pages(PAGE_SIZE + 10, 5) == []
    assert buffer.add_page(0, b"old") == PAGE_SIZE
    assert buffer.write(10, b"b" * PAGE_SIZE) == 0
    assert (len(buffer), buffer.end) == (3 * PAGE_SIZE, 3 * PAGE_SIZE)
    assert bytes(buffer.pages[0]) == b"old" + bytes(7) + b"b" * (PAGE_SIZE - 10)
    assert bytes(buffer.pages[1]) == b"b" * 10 + b"a" * (PAGE_SIZE - 10)
    assert buffer.covers(3 * PAGE_SIZE) and not buffer.covers(3 * PAGE_SIZE + 1)
    assert buffer.covers_range(PAGE_SIZE + 1, 3 * PAGE_SIZE) and not buffer.covers_range(PAGE_SIZE, 4 * PAGE_SIZE - 1)


def test_buffer_overlays_its_pages_on_a_window_of_the_shard():
    buffer = ShardBuffer()
    buffer.write(PAGE_SIZE, b"x" * PAGE_SIZE)
    buffer.write(5 * PAGE_SIZE, b"y" * PAGE_SIZE)
    data = bytearray(b"-" * 3 * PAGE_SIZE)  # the shard's bytes [100, 100 + 3 pages)
    buffer.overlay(data, start=100)
    assert data == b"-" * (PAGE_SIZE - 100) + b"x" * PAGE_SIZE + b"-" * (PAGE_SIZE + 100)
    short = bytearray(PAGE_SIZE + 7)
    buffer.overlay(short)
    assert short == bytes(PAGE_SIZE) + b"x" * 7


def _requested(receive: trio.MemoryReceiveChannel) -> list:
    """The flush requests waiting on the flusher's channel."""
    requests = []
    while True:
        try:
            requests.append(receive.receive_nowait())
        except trio.WouldBlock:
            return requests


def test_budget_evicts_oldest_first_and_blocks_until_released():
    async def main():
        send, receive = trio.open_memory_channel(10)
        budget = WriteBudget(100, send)
        budget.track((1, 0))
        budget.track((2, 0))
        budget.grow(150)
        finished = trio.Event()

        async def writer():
            await budget.wait_for_room(lambda: None)
            finished.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            await trio.testing.wait_all_tasks_blocked()
            assert _requested(receive) == [(1, 0)]
            assert not finished.is_set()
            await budget.release(100)
            await finished.wait()
        assert budget.used == 50

    trio.run(main)


def test_budget_returns_at_once_when_under_limit():
    async def main():
        budget = WriteBudget(100, trio.open_memory_channel(1)[0])
        budget.grow(99)
        with trio.fail_after(1):
            await budget.wait_for_room(lambda: None)

    trio.run(main)
