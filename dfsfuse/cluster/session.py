"""This mount's session in the metadata: its heartbeat, the files it holds
open, and the reclaiming of other mounts' stale sessions.

Every mount registers a session when it starts and ends it when it unmounts.
While it runs it heartbeats every timeout/4 seconds; a session whose
heartbeat is older than the session timeout is stale, and any live mount
reclaims it (its open-file records and locks go with it, in one transaction,
and only one mount does it). A mount whose own session was reclaimed (it was
cut off from the metadata, or stopped, for longer than the timeout) learns it
at its next heartbeat, or when it next records an open file: its session is
`lost`, and the mount refuses every request (EIO) until it is mounted again,
since what it believes it holds (open files, locks) may now be another's.

A mount reclaims others only after it has itself heartbeated without a gap
for a whole timeout: after the metadata server was away (a restart, a
failover) every session looks stale at first, and the mounts must first all
have had the time to heartbeat again.

Only a shared engine (MetadataStore.shared) records open files: with the
embedded engine, the one mount knows its open files itself.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Awaitable, Callable

import trio

from dfsfuse.errors import DfsError, SessionLost
from dfsfuse.metadata.base import ROLES, InodeAttrs, MetadataStore

log = logging.getLogger("dfsfuse.session")

DEFAULT_TIMEOUT = 60.0  # seconds without a heartbeat after which a session is stale
BEATS_PER_TIMEOUT = 4
CLOSE_DELAY = 0.5  # seconds closes are gathered before they are recorded in one transaction


class MountSession:
    """See the module docstring; open with `MountSession.open`, then run `run`."""

    def __init__(self, meta: MetadataStore, session_id: int, timeout: float):
        self.meta = meta
        self.id = session_id
        self.timeout = timeout
        self.lost = False
        self._records_open = meta.shared
        self._closed: set[int] = set()
        self._close_pending = trio.Event()
        self._closing: set[int] = set()  # closes being recorded now
        self._closes_recorded = trio.Event()
        # Once the mount serves: waits until every change other mounts
        # committed is applied here; the engine's clock when it started
        # (KernelInvalidator.barrier). Each heartbeat reports it (synced_ns),
        # which lets garbage this mount might still read go. It runs apart
        # from the heartbeat, which must never wait for it.
        self.barrier: Callable[[], Awaitable[int | None]] | None = None
        self._synced_ns = 0

    @classmethod
    async def open(cls, meta: MetadataStore, mountpoint: str, timeout: float = DEFAULT_TIMEOUT) -> MountSession:
        """Register this mount. With metadata that is not shared, any other
        session is a mount of this data dir that died: reclaimed at once."""
        if not meta.shared:
            for stale in await meta.reap_sessions(0):
                log.info("reclaimed session %d (%s pid %d), left by a mount that died", stale.id, stale.host, stale.pid)
        session_id = await meta.open_session(socket.gethostname(), os.getpid(), mountpoint)
        log.info("session %d registered", session_id)
        return cls(meta, session_id, timeout)

    def check(self) -> None:
        if self.lost:
            raise SessionLost.of(self.id)

    async def open_file(self, inode: int) -> InodeAttrs:
        """Record that this mount holds `inode` open; its attrs, fresh."""
        self.check()
        self._closed.discard(inode)
        while inode in self._closing:  # a close recorded after this open would undo it
            await self._closes_recorded.wait()
        try:
            return await self.meta.open_file(self.id, inode)
        except SessionLost:
            self._lose()
            raise

    @property
    def records_open(self) -> bool:
        return self._records_open

    def opened_by(self) -> int | None:
        """What create's `opened_by` gets: this session, if it records open files."""
        self.check()
        return self.id if self._records_open else None

    def closed(self, inode: int) -> None:
        """This mount holds `inode` open no longer (recorded soon, in a batch)."""
        if self._records_open:
            self._closed.add(inode)
            self._close_pending.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Heartbeat, reclaim stale sessions and record closes, until cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._record_closes)
            nursery.start_soon(self._follow_barriers)
            task_status.started()
            await self._heartbeat()
            nursery.cancel_scope.cancel()

    async def _follow_barriers(self) -> None:
        """Learn, every beat, up to when this mount has applied other mounts' changes."""
        while True:
            await trio.sleep(self.timeout / BEATS_PER_TIMEOUT)
            if self.barrier is not None:
                try:
                    synced_ns = await self.barrier()
                except DfsError as error:
                    log.warning("session %d: barrier failed: %s", self.id, error)
                    continue
                if synced_ns is not None:
                    self._synced_ns = max(self._synced_ns, synced_ns)

    async def _heartbeat(self) -> None:
        interval = self.timeout / BEATS_PER_TIMEOUT
        continuous_since = trio.current_time()
        while not self.lost:
            await trio.sleep(interval)
            started = trio.current_time()
            try:
                alive = await self.meta.heartbeat(self.id, self._synced_ns)
            except DfsError as error:
                log.warning("session %d: heartbeat failed: %s", self.id, error)
                continuous_since = trio.current_time()
                continue
            if not alive:
                self._lose()
                for role in ROLES:  # let a live mount have them
                    await self.meta.release_role(role)
                return
            if trio.current_time() - started > interval:
                continuous_since = trio.current_time()  # a gap: others may have been cut off as well
            elif trio.current_time() - continuous_since >= self.timeout:
                await self._reap()

    async def _reap(self) -> None:
        try:
            reaped = await self.meta.reap_sessions(int(self.timeout * 1e9))
        except DfsError as error:
            log.warning("session %d: reclaiming stale sessions failed: %s", self.id, error)
            return
        for stale in reaped:
            log.warning(
                "reclaimed stale session %d of %s pid %d (%s): no heartbeat for %.0f s",
                stale.id, stale.host, stale.pid, stale.mountpoint, self.timeout,
            )

    def _lose(self) -> None:
        if not self.lost:
            self.lost = True
            log.error(
                "session %d was reclaimed as stale by another mount (no heartbeat for %.0f s);"
                " every request fails now: unmount and mount again", self.id, self.timeout,
            )

    async def _record_closes(self) -> None:
        while True:
            await self._close_pending.wait()
            await trio.sleep(CLOSE_DELAY)
            await self.flush_closes()

    async def flush_closes(self) -> None:
        self._close_pending = trio.Event()
        closed, self._closed = self._closed, set()
        if not closed or self.lost:
            return
        self._closing, self._closes_recorded = closed, trio.Event()
        try:
            await self.meta.close_files(self.id, sorted(closed))
        except DfsError as error:
            log.warning("session %d: recording %d closes failed: %s", self.id, len(closed), error)
            self._closed |= closed
            self._close_pending.set()
        finally:
            self._closing = set()
            self._closes_recorded.set()

    async def close(self) -> None:
        """End the session (an unmount): all it holds goes."""
        if not self.lost:
            await self.meta.close_session(self.id)
            log.info("session %d ended", self.id)
