"""Directory quotas on the write path: a file's growth is refused (EDQUOT)
when write(2), truncate or fallocate asks for it, not when it is committed.

Written data is buffered and committed later (a full shard, close, fsync), so
a refusal at commit time would drop data the application was told was
written. The engine's commit therefore only accounts for sizes (it never
refuses a growth), and the QuotaGuard admits or refuses each growth before
the writer accepts it: the growth fits a quota if

    used (the engine's, as of the last refresh) + this mount's uncommitted
    growth of every file under that quota + this growth <= the limit.

A file's uncommitted growth is its size in memory (or the end of a growth
admitted and still being written) minus its committed size. The engine's
usage and this mount's view of it must not count a commit twice or miss it:

- every commit runs inside `committing()`, which on its way out moves the
  generation on; a refresh of the usage counts only if no commit ended while
  it was in flight (a commit that ended before it started is in what it read,
  and no longer in the uncommitted growth);
- a commit still in flight may be in what a refresh read and still in the
  uncommitted growth: counted twice, which can only refuse too early, so a
  refusal waits for the commits in flight then (not for later ones, which
  could go on for ever) and is decided once more, on a fresh reading.

What is cached: every quota (one `quotas()` read, none if there are none:
then a growth costs one dict lookup), and for each file written under one
the quota directories above it (`quotas_of`). A rename, link or unlink here
may move a file into other quotas (`names_changed`), another mount's change
may do anything (`note_changes`), and a quota set or removed here changes
the limits (`quotas_changed`): each drops what it may have made wrong.

Other mounts' uncommitted data is not seen: two mounts writing under one
quota at once may together pass it by what they hold uncommitted, and no
more (creates and renames are refused in the engine's transaction, exactly).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

import trio

from ..errors import NotFound, QuotaExceeded
from ..metadata.base import MetadataStore, QuotaRecord


class GrowingFile(Protocol):
    """What the guard reads of a file's writer."""

    inode: int

    @property
    def size(self) -> int:
        """The size in memory, written data included."""

    @property
    def committed_size(self) -> int:
        """The size the engine has (and has charged to the file's quotas)."""


class QuotaGuard:
    def __init__(self, meta: MetadataStore):
        self._meta = meta
        self._quotas: dict[int, QuotaRecord] | None = None  # None: read again before the next growth
        self._domains: dict[int, frozenset[int]] = {}  # inode -> quota directories above it
        self._files: dict[int, GrowingFile] = {}  # files that asked to grow, until closed
        self._claims: dict[int, int] = {}  # inode -> end of a growth admitted, being written
        self._generation = 0  # moves on when a commit ends
        self._fresh_generation = -1  # the generation the cached usage is as of
        self._in_flight: dict[int, trio.Event] = {}  # commits under way: set when each ends
        self._next_commit = 0

    # -- admitting growth ---------------------------------------------------
    async def admit(self, file: GrowingFile, end: int) -> None:
        """Let `file` grow to `end` bytes, or raise QuotaExceeded (EDQUOT)
        if that would pass a quota it lies under; nothing to check when it
        does not grow. The growth counts as uncommitted until `written`."""
        if end <= max(file.size, self._claims.get(file.inode, 0)):
            return
        waited = False
        while True:
            if self.none_anywhere:
                return
            if self._quotas is None or self._fresh_generation != self._generation:
                await self._refresh()
                continue
            missing = self._missing_domain(file)
            if missing is not None:
                self._domains[missing] = await self._domain_of(missing)
                continue
            exceeded = self._exceeded(file, end)
            if exceeded is None:
                self._files[file.inode] = file
                self._claims[file.inode] = end
                return
            if waited or not self._in_flight:
                raise QuotaExceeded(exceeded)
            for ended in list(self._in_flight.values()):  # the refusal may count one of them twice
                await ended.wait()
            waited = True

    def written(self, file: GrowingFile) -> None:
        """The write or truncate that was admitted is done (its growth is in
        `file.size` now, or it failed)."""
        self._claims.pop(file.inode, None)

    def forget(self, inode: int) -> None:
        """The file is closed and stored: nothing of it is uncommitted."""
        self._files.pop(inode, None)
        self._claims.pop(inode, None)
        self._domains.pop(inode, None)

    async def _domain_of(self, inode: int) -> frozenset[int]:
        """The quota directories above `inode`; none if it is gone (deleted by
        another mount: its data counts nowhere)."""
        try:
            return frozenset(quota.directory for quota in await self._meta.quotas_of(inode))
        except NotFound:
            return frozenset()

    async def _refresh(self) -> None:
        generation = self._generation
        self._quotas = {quota.directory: quota for quota in await self._meta.quotas()}
        self._fresh_generation = generation

    def _missing_domain(self, file: GrowingFile) -> int | None:
        """A file that counts here whose quota directories are not known yet."""
        if file.inode not in self._domains:
            return file.inode
        for other in self._files.values():
            if other.inode not in self._domains and self._uncommitted(other):
                return other.inode
        return None

    def _uncommitted(self, file: GrowingFile) -> int:
        return max(0, max(file.size, self._claims.get(file.inode, 0)) - file.committed_size)

    def _exceeded(self, file: GrowingFile, end: int) -> str | None:
        """Why growing `file` to `end` would pass a quota, or None if it would not."""
        assert self._quotas is not None
        domain = self._domains[file.inode]
        growth = end - max(file.size, self._claims.get(file.inode, 0))
        for directory in domain:
            quota = self._quotas.get(directory)
            if quota is None or quota.max_bytes is None:
                continue
            pending = sum(
                self._uncommitted(other)
                for other in self._files.values()
                if directory in self._domains.get(other.inode, ()) and other.inode != file.inode
            )
            used = quota.used_bytes + pending + self._uncommitted(file)
            if used + growth > quota.max_bytes:
                return (
                    f"the quota of directory {directory} allows {quota.max_bytes} bytes;"
                    f" {used} are used, {growth} more were asked for"
                )
        return None

    @property
    def none_anywhere(self) -> bool:
        """Whether it is known that no quota is set anywhere."""
        return self._quotas is not None and not self._quotas

    async def any_anywhere(self) -> bool:
        """Whether some quota is set (read again if not known)."""
        if self._quotas is None:
            await self._refresh()
        return not self.none_anywhere

    # -- what changes the picture -------------------------------------------
    @contextlib.contextmanager
    def committing(self) -> Iterator[None]:
        """Around a commit of a file's size: the usage read before it ends is stale."""
        ticket = self._next_commit
        self._next_commit += 1
        ended = self._in_flight[ticket] = trio.Event()
        try:
            yield
        finally:
            del self._in_flight[ticket]
            self._generation += 1
            ended.set()

    def names_changed(self) -> None:
        """A name was moved, added or removed here: files may lie under other quotas now."""
        if self._quotas:
            self._domains.clear()
            self._generation += 1

    def quotas_changed(self) -> None:
        """A quota was set or removed here."""
        self._quotas = None
        self._domains.clear()

    def note_changes(self) -> None:
        """Another mount changed something: its commits, names or quotas."""
        self.quotas_changed()
