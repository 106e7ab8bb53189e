"""The garbage collector: deletes unreferenced inodes, then the replicas of
shards nothing refers to any more.

Two kinds of work reach it. The POSIX layer hands it inodes that are
unlinked and no longer referenced (`doom`); deleting them in the metadata
moves their shards to the garbage list. Commits that replace a shard move
the old one there too (`note_garbage`). A round starts once no new work was
noted for GARBAGE_QUIET seconds, or GARBAGE_MAX_DELAY seconds after the
first, and takes all that came meanwhile: a burst of deletes (rm -rf) costs
one metadata sync and one pass, not one per file.

It also owns the in-use accounting: a reader holds `reading(shard ids)`
while it reads objects, and a shard in use waits for the next round, so a
read that started before the shard was replaced still finds its replicas.

Many mounts (a shared engine). Every mount deletes the inodes it dooms, but
only the one holding ROLE_GARBAGE deletes replicas, and it also looks every
SWEEP_INTERVAL seconds for what the others left it: garbage their commits
made, and inodes unlinked while open that no session holds open any more
(`orphan_inodes`, which includes those of reclaimed sessions). The engine
keeps back the garbage of a file some session holds open until that session
has heard of the change (its cached shard map may still name the shard),
and never deletes an inode a session holds open.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
from collections.abc import Iterable, Iterator

import trio

from dfsfuse.metadata.base import ROLE_GARBAGE, MetadataStore
from dfsfuse.shards.replicator import Replicator

log = logging.getLogger("dfsfuse.garbage")

GARBAGE_QUIET = 0.25
GARBAGE_MAX_DELAY = 3.0
GARBAGE_BATCH = 4096  # garbage rows per metadata sync
DELETE_BATCH = 1000  # inodes per transaction (the requests queued behind one wait for it)
RETRY_DELAY = 1.0  # seconds before a round that had to leave shards is tried again
SWEEP_INTERVAL = 5.0  # seconds between looks for other mounts' garbage (a shared engine)


class GarbageCollector:
    def __init__(self, meta: MetadataStore, replicator: Replicator):
        self._meta = meta
        self._replicator = replicator
        self._doomed: set[int] = set()
        self._in_use: collections.Counter[int] = collections.Counter()
        self._added = trio.Event()

    @property
    def pending(self) -> int:
        """Unreferenced inodes waiting for the next round."""
        return len(self._doomed)

    def doom(self, inodes: Iterable[int]) -> None:
        """Delete these unlinked, unreferenced inodes in the next round."""
        self._doomed.update(inodes)
        self._added.set()

    def note_garbage(self) -> None:
        """A commit made shards garbage: start a round soon."""
        self._added.set()

    @contextlib.contextmanager
    def reading(self, shard_ids: Iterable[int]) -> Iterator[None]:
        """Keep these shards' replicas while the block runs (also while it
        waits for another reader's fetch)."""
        held = list(shard_ids)
        self._in_use.update(held)
        try:
            yield
        finally:
            self._in_use.subtract(held)
            for shard_id in held:
                if not self._in_use[shard_id]:
                    del self._in_use[shard_id]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Delete what the last mount left unfinished, then collect whenever
        work is noted (and, with a shared engine, every SWEEP_INTERVAL
        seconds), until cancelled."""
        await self.collect(sweep=True)
        task_status.started()
        sweep_interval = SWEEP_INTERVAL if self._meta.shared else math.inf
        while True:
            with trio.move_on_after(sweep_interval):
                await self._added.wait()
            await self._wait_for_a_pause()
            try:
                complete = await self.collect(sweep=self._meta.shared)
            except Exception:  # noqa: BLE001 - keep the mount alive; try again later
                log.exception("garbage collection failed")
                complete = False
            if not complete:
                await trio.sleep(RETRY_DELAY)  # some shards were being read, or a store failed
                self._added.set()

    async def _wait_for_a_pause(self) -> None:
        """Until no work was noted for GARBAGE_QUIET seconds, or at most
        GARBAGE_MAX_DELAY; work noted from here on starts another round."""
        deadline = trio.current_time() + GARBAGE_MAX_DELAY
        while True:
            self._added = trio.Event()
            await trio.sleep(max(0.0, min(GARBAGE_QUIET, deadline - trio.current_time())))
            if not self._added.is_set() or trio.current_time() >= deadline:
                return

    async def collect(self, sweep: bool = False) -> bool:
        """Delete the doomed inodes, then (if this process holds ROLE_GARBAGE)
        orphans (with `sweep`: at the start, when the last mount's are left,
        and with a shared engine, whose sessions record every open file) and
        the replicas of unreferenced shards; False if some had to wait."""
        holder = await self._meta.try_role(ROLE_GARBAGE)
        if holder and sweep:
            orphans = set(await self._meta.orphan_inodes()) - self._doomed
            for inode in sorted(orphans):
                log.info("deleting inode %d: unlinked, and no mount holds it open any more", inode)
            self._doomed |= orphans
        while self._doomed:
            inodes = sorted(self._doomed)[:DELETE_BATCH]
            await self._meta.delete_inodes(inodes)
            self._doomed.difference_update(inodes)
        if not holder:
            return True
        complete = True
        after_skipped: set[int] = set()
        while True:
            batch = [g for g in await self._meta.garbage(GARBAGE_BATCH) if g[0] not in after_skipped]
            if not batch:
                return complete
            # The commits that made these shards garbage must survive a power
            # loss before the replicas go, or metadata could point at nothing.
            await self._meta.sync()
            doomed = [(shard_id, nodes) for shard_id, nodes in batch if shard_id not in self._in_use]
            failed = await self._replicator.delete_many(doomed)
            deleted = [shard_id for shard_id, _ in doomed if shard_id not in failed]
            if len(deleted) < len(batch):
                after_skipped.update(shard_id for shard_id, _ in batch if shard_id not in deleted)
                complete = False
            if deleted:
                await self._meta.forget_garbage(deleted)
            elif len(batch) < GARBAGE_BATCH:
                return complete
