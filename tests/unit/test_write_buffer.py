"""ShardBuffer arithmetic and the WriteBudget's backpressure."""

import trio
import trio.testing

from dfsfuse.layout import PAGE_SIZE
from dfsfuse.write.buffer import ShardBuffer, WriteBudget
from dfsfuse.write.flusher import Flusher, flush_channel


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


class _RecordingFile:
    """A Flushable that notes the flushes the flusher starts and ends them."""

    def __init__(self, budget: WriteBudget):
        self.budget = budget
        self.flushed: list[int] = []

    async def flush_in_background(self, index: int) -> None:
        self.flushed.append(index)
        await self.budget.end_flush(0)


def test_flusher_starts_a_flush_for_every_request():
    async def main():
        send, receive = flush_channel()
        budget = WriteBudget(100, send)
        file = _RecordingFile(budget)
        async with trio.open_nursery() as nursery:
            await nursery.start(Flusher(receive).run)
            for index in range(3):
                await budget.request_flush((file, index))
            await trio.testing.wait_all_tasks_blocked()
            assert sorted(file.flushed) == [0, 1, 2]
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_full_flush_queue_holds_requesters_back():
    async def main():
        send, receive = trio.open_memory_channel(2)
        budget = WriteBudget(100, send)
        file = _RecordingFile(budget)
        sent = 0

        async def requester():
            nonlocal sent
            for index in range(5):
                await budget.request_flush((file, index))
                sent += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(requester)
            await trio.testing.wait_all_tasks_blocked()
            assert sent == 2  # the queue's capacity; nobody takes requests yet
            await nursery.start(Flusher(receive).run)
            await trio.testing.wait_all_tasks_blocked()
            assert sent == 5 and sorted(file.flushed) == list(range(5))
            nursery.cancel_scope.cancel()

    trio.run(main)
