"""ShardBuffer arithmetic and the WriteBudget's backpressure."""

import trio
import trio.testing

from dfsfuse.write.buffer import ShardBuffer, WriteBudget


def test_buffer_writes_fill_gaps_with_zeros_and_report_growth():
    buffer = ShardBuffer(b"abc")
    assert buffer.write(5, b"xy") == 4
    assert bytes(buffer.data) == b"abc\0\0xy"
    assert buffer.write(1, b"Z") == 0
    assert bytes(buffer.data) == b"aZc\0\0xy"
    assert buffer.truncate(2) == 5
    assert bytes(buffer.data) == b"aZ"
    assert buffer.truncate(10) == 0


def test_budget_evicts_oldest_first_and_blocks_until_released():
    evicted = []

    async def main():
        budget = WriteBudget(100, evicted.append)
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
            assert evicted == [(1, 0)]
            assert not finished.is_set()
            await budget.release(100)
            await finished.wait()
        assert budget.used == 50

    trio.run(main)


def test_budget_returns_at_once_when_under_limit():
    async def main():
        budget = WriteBudget(100, lambda key: None)
        budget.grow(99)
        with trio.fail_after(1):
            await budget.wait_for_room(lambda: None)

    trio.run(main)
