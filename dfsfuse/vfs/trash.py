"""Emptying the trash: its expired files in the background, and on request.

Files in the trash (dfsfuse/metadata/trash.py) leave it for good through
`FileSystem.purge_trash`, in batches of PURGE_BATCH entries (one engine
transaction each), which also removes the hour directories left empty
(after restores, or once their files went). The mount holding ROLE_GARBAGE
sweeps every `interval` seconds: the files whose expiry has passed go.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import trio

from ..metadata.base import ROLE_GARBAGE, MetadataStore, TrashEntry
from .filesystem import FileSystem

log = logging.getLogger("dfsfuse.trash")

PURGE_BATCH = 500  # trash entries per transaction


async def purge(
    fs: FileSystem, entries: Sequence[TrashEntry], progress: Callable[[int, int], None] | None = None
) -> None:
    """Remove `entries` from the trash for good, PURGE_BATCH at a time;
    `progress(done, total)` after each batch. With no entries, still removes
    the empty hour directories."""
    total = len(entries)
    for start in range(0, max(total, 1), PURGE_BATCH):
        batch = entries[start:start + PURGE_BATCH]
        await fs.purge_trash([(entry.hour_dir, entry.name) for entry in batch])
        if progress is not None:
            progress(min(start + PURGE_BATCH, total), total)


class TrashSweeper:
    """The background expiry of the trash, in the mount holding ROLE_GARBAGE."""

    def __init__(self, fs: FileSystem, meta: MetadataStore, interval: float):
        self._fs = fs
        self._meta = meta
        self._interval = interval

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(self._interval)
            try:
                await self.sweep()
            except Exception:  # noqa: BLE001 - keep the mount alive; try again next time
                log.exception("collecting the trash failed")

    async def sweep(self) -> int:
        """Purge the files whose expiry has passed; how many."""
        if not await self._meta.try_role(ROLE_GARBAGE):
            return 0
        now_ns = time.time_ns()
        expired = [entry for entry in await self._meta.trash_entries(now_ns) if entry.expires_ns <= now_ns]
        await purge(self._fs, expired)
        if expired:
            log.info("trash: %d expired files removed for good", len(expired))
        return len(expired)
