"""fcntl and flock locks, kept in the metadata so that every mount sees them.

The kernel hands this mount its lock requests (through the pyfuse3 patch,
docs/pyfuse3-patch.md); each is one metadata transaction on the file's
locks (MetadataStore.set_lock), owned by (this session, the kernel's lock
owner). So a lock taken on one machine keeps a conflicting one out on
every other, and the locks of a mount that dies go when its session is
reclaimed.

A request that may wait (F_SETLKW, flock without LOCK_NB) asks again after a
pause that grows from WAIT_FIRST to WAIT_MAX while another owner holds a
conflicting lock: a lock released on another mount sends no word here. The
wait is cancellable (the kernel's INTERRUPT of a waiter that got a signal
cancels it); the transaction that grants a lock is shielded, so a request is
either granted whole or leaves nothing.

Locks end as POSIX says: a process's fcntl locks on a file when it closes any
descriptor of it (flush carries its lock owner), a flock lock when its open
file is released, and OFD locks (owned by the open file) at release too.
"""

from __future__ import annotations

import collections
import errno
import fcntl
from typing import cast

import trio

from ..errors import DfsError
from ..metadata.base import MetadataStore
from ..metadata.locks import FLOCK, OFFSET_MAX, POSIX, LockRecord

WAIT_FIRST = 0.005  # seconds before a waiting request asks again
WAIT_MAX = 0.2


def _stored(owner: int) -> int:
    """The kernel's lock owner, an unsigned 64-bit number, as the signed
    64-bit integer the metadata stores."""
    return owner - 2**64 if owner >= 2**63 else owner


class LockConflict(DfsError):
    """Another owner holds a conflicting lock and the request may not wait."""

    errno = errno.EAGAIN


class FileLocks:
    """The lock calls of one mount, in `session` (a MountSession's id)."""

    def __init__(self, meta: MetadataStore, session: int):
        self._meta = meta
        self._session = session
        self._owners_by_handle: collections.defaultdict[int, set[int]] = collections.defaultdict(set)
        # (inode, owner) that took a lock through this mount and may hold it
        # still: a close or release of anything else costs no transaction.
        self._holders: set[tuple[int, int]] = set()

    async def test(self, inode: int, owner: int, lock_type: int, start: int, end: int) -> LockRecord | None:
        """F_GETLK: the lock that would keep this one out, or None. Its pid is
        the holder's when it is in this mount, else 0 (a process elsewhere)."""
        request = LockRecord((self._session, _stored(owner)), POSIX, lock_type, start, end)
        found = await self._meta.test_lock(inode, request)
        if found is not None and cast(tuple[int, int], found.owner_key)[0] != self._session:
            found = LockRecord(found.owner_key, found.kind, found.type, found.start, found.end, 0)
        return found

    async def set_posix(
        self, inode: int, handle: int, owner: int, lock_type: int, start: int, end: int, pid: int, wait: bool
    ) -> None:
        """F_SETLK / F_SETLKW (and F_OFD_*): LockConflict if it cannot be had
        and must not wait."""
        owner = _stored(owner)
        self._owners_by_handle[handle].add(owner)
        await self._set(inode, LockRecord((self._session, owner), POSIX, lock_type, start, end, pid), wait)

    async def flock(self, inode: int, handle: int, owner: int, operation: int, pid: int = 0) -> None:
        """flock(2): LOCK_SH, LOCK_EX or LOCK_UN, perhaps with LOCK_NB."""
        lock_type = {fcntl.LOCK_SH: fcntl.F_RDLCK, fcntl.LOCK_EX: fcntl.F_WRLCK, fcntl.LOCK_UN: fcntl.F_UNLCK}[
            operation & ~fcntl.LOCK_NB
        ]
        owner = _stored(owner)
        self._owners_by_handle[handle].add(owner)
        request = LockRecord((self._session, owner), FLOCK, lock_type, 0, OFFSET_MAX, pid)
        await self._set(inode, request, wait=not operation & fcntl.LOCK_NB)

    async def _set(self, inode: int, request: LockRecord, wait: bool) -> None:
        self._holders.add((inode, cast(tuple[int, int], request.owner_key)[1]))
        pause = WAIT_FIRST
        while True:
            with trio.CancelScope(shield=True):
                blocking = await self._meta.set_lock(self._session, inode, request)
            if blocking is None:
                return
            if not wait:
                raise LockConflict(f"inode {inode} is locked by another owner")
            await trio.sleep(pause)
            pause = min(WAIT_MAX, pause * 2)

    async def closed_by(self, inode: int, owner: int) -> None:
        """A process (lock owner) closed a descriptor of the file: its fcntl
        locks on it end. Its locks are then no business of the release of
        any open file (which comes later, and may come after the process
        locked the file again through another descriptor)."""
        owner = _stored(owner)
        for owners in self._owners_by_handle.values():
            owners.discard(owner)
        if (inode, owner) in self._holders:
            self._holders.discard((inode, owner))
            await self._meta.release_locks(self._session, inode, [owner], POSIX)

    async def released(self, inode: int, handle: int, flock_owner: int | None) -> None:
        """An open file went: its flock lock and its OFD locks end (the owners
        that locked through it and were not closed_by: OFD locks are owned by
        the open file, which no flush names)."""
        owners = self._owners_by_handle.pop(handle, set())
        if flock_owner is not None:
            owners.add(_stored(flock_owner))
        owners = {owner for owner in owners if (inode, owner) in self._holders}
        self._holders -= {(inode, owner) for owner in owners}
        await self._meta.release_locks(self._session, inode, sorted(owners), None)
