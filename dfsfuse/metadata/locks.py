"""POSIX record locks and flock locks as arithmetic on records, no I/O.

A metadata engine keeps the locks of a file as LockRecords and, inside one
transaction, asks `conflict` whether a request can be granted and `apply` for
the requesting owner's records afterwards (the caller waits or fails with
EAGAIN on a conflict; `apply` does not look at other owners).

Ranges are inclusive at both ends, and end OFFSET_MAX means "to the end of the
file, however long it grows", as in the kernel's FUSE protocol and in
pyfuse3's getlk/setlk. An owner_key is opaque and hashable: it must tell
apart the lock owners of every session (mount) of the file system, e.g.
(session id, the kernel's lock owner).

Semantics, as Linux keeps them:
- posix: an owner holds at most one type on any byte. A request of an owner
  replaces its own locks on the range (which splits them where the range cuts
  them); F_UNLCK removes them; adjacent or overlapping ranges of the owner with
  the same type merge. Read locks of different owners coexist; a write lock
  conflicts with any lock of another owner on a common byte.
- flock: one lock per owner on the whole file (start 0, end OFFSET_MAX); a
  request converts it (shared <-> exclusive) or, with F_UNLCK, removes it. A
  shared lock conflicts with another owner's exclusive one; an exclusive one
  with any.
- The two kinds never conflict with each other (Linux keeps them apart).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Iterable
from fcntl import F_RDLCK, F_UNLCK, F_WRLCK

OFFSET_MAX = 2**63 - 1

POSIX = "posix"
FLOCK = "flock"


@dataclasses.dataclass(frozen=True)
class LockRecord:
    """A lock held, or (with type F_UNLCK) a request to unlock.

    pid is the holder's process id as the kernel gave it with the request,
    only for reporting through F_GETLK (0 when unknown).
    """

    owner_key: Hashable
    kind: str
    type: int
    start: int
    end: int
    pid: int = 0

    def __post_init__(self) -> None:
        if self.kind not in (POSIX, FLOCK):
            raise ValueError(f"lock kind {self.kind!r} is neither {POSIX!r} nor {FLOCK!r}")
        if self.type not in (F_RDLCK, F_WRLCK, F_UNLCK):
            raise ValueError(f"lock type {self.type!r} is not F_RDLCK, F_WRLCK or F_UNLCK")
        if not 0 <= self.start <= self.end <= OFFSET_MAX:
            raise ValueError(f"lock range {self.start}..{self.end} is not within 0..OFFSET_MAX")
        if self.kind == FLOCK and (self.start, self.end) != (0, OFFSET_MAX):
            raise ValueError("a flock lock covers the whole file: start 0, end OFFSET_MAX")

    @classmethod
    def flock(cls, owner_key: Hashable, type: int, pid: int = 0) -> LockRecord:
        """A flock lock (or unlock) of owner_key on the whole file."""
        return cls(owner_key, FLOCK, type, 0, OFFSET_MAX, pid)

    def overlaps(self, other: LockRecord) -> bool:
        return self.start <= other.end and other.start <= self.end


def conflict(existing: Iterable[LockRecord], request: LockRecord) -> LockRecord | None:
    """The lock of another owner that keeps `request` from being granted, or None.

    Of several, the one that starts first (then the first given), so that
    F_GETLK answers the same for the same table. An unlock never conflicts.
    """
    if request.type == F_UNLCK:
        return None
    found = None
    for record in existing:
        if (record.kind == request.kind and record.owner_key != request.owner_key
                and F_WRLCK in (record.type, request.type) and record.overlaps(request)
                and (found is None or record.start < found.start)):
            found = record
    return found


def apply(existing: Iterable[LockRecord], request: LockRecord) -> list[LockRecord]:
    """The records of request.owner_key of request.kind once `request` is granted, by start.

    Only that owner's records of that kind are read from `existing`; the
    caller replaces them with the result (and checks `conflict` first).
    """
    if request.kind == FLOCK:
        return [] if request.type == F_UNLCK else [request]

    kept = []
    for record in existing:
        if record.owner_key != request.owner_key or record.kind != POSIX:
            continue
        if not record.overlaps(request):
            kept.append(record)
            continue
        if record.start < request.start:
            kept.append(dataclasses.replace(record, end=request.start - 1))
        if record.end > request.end:
            kept.append(dataclasses.replace(record, start=request.end + 1))
    if request.type != F_UNLCK:
        kept.append(request)
    kept.sort(key=lambda r: r.start)

    merged: list[LockRecord] = []
    for record in kept:
        last = merged[-1] if merged else None
        if last is not None and last.type == record.type and last.end + 1 >= record.start:
            # The new lock's pid wins: it is the latest holder of the range
            pid = record.pid if record is request else last.pid
            merged[-1] = dataclasses.replace(last, end=max(last.end, record.end), pid=pid)
        else:
            merged.append(record)
    return merged


def release(existing: Iterable[LockRecord], owner_key: Hashable, kind: str | None = None) -> list[LockRecord]:
    """`existing` without the locks of owner_key (of one kind, or of both).

    For a close of a file by a lock owner (FUSE flush: its POSIX locks) and
    the release of an open file (its flock locks, and OFD locks, whose owner
    is the open file).
    """
    return [r for r in existing if r.owner_key != owner_key or (kind is not None and r.kind != kind)]
