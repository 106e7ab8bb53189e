"""The background flusher: one task that stores the shards nobody waits for.

Two kinds of flush happen without a caller waiting: a shard a write filled
to its end, and the oldest buffers when writers wait for room in the write
budget. Both arrive as (file, shard index) messages on a trio memory channel
(WriteBudget.request_flush sends them); this task starts each in its own
task in its nursery. The channel's capacity is the backpressure: a requester
waits while FLUSH_QUEUE requests are waiting to be started.
"""

from __future__ import annotations

import trio

from .buffer import BufferKey

FLUSH_QUEUE = 64


def flush_channel() -> tuple[trio.MemorySendChannel[BufferKey], trio.MemoryReceiveChannel[BufferKey]]:
    """The channel between the write budget (sender) and the flusher."""
    return trio.open_memory_channel[BufferKey](FLUSH_QUEUE)


class Flusher:
    def __init__(self, requests: trio.MemoryReceiveChannel[BufferKey]):
        self._requests = requests

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start a flush for every request, until cancelled."""
        async with trio.open_nursery() as nursery:
            task_status.started()
            async for file, index in self._requests:
                nursery.start_soon(file.flush_in_background, index)
