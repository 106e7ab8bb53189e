"""A node store in a local directory.

Layout under ROOT (tests look at it; other code goes through LocalStore):

    ROOT/STORE                  identity: {"format": 2, "name": "<store name>"} (JSON)
    ROOT/shards/<xx>/<id>       one replica file per shard of PACK_BELOW bytes or more;
                                <id> is the shard id as 16 lowercase hex digits, <xx> its last two
    ROOT/packs/                 the smaller replicas, appended to pack files (dfsfuse.storage.packs)
    ROOT/tmp/                   replicas being written, and spools (Spool: receiving.<random>,
                                unlinked once open); emptied when the store opens

A replica is written to ROOT/tmp/ and renamed into place, so a reader sees
either no replica or a whole one. With sync=True the file is fsync'd before
the rename and its directory after it. A replica of DIRECT_WRITE_MIN bytes
or more is written with O_DIRECT where the file system allows it (see
dfsfuse.storage.directio for why); smaller ones, the replicas of small files
that are likely to be read again soon, go through the page cache.

A replica smaller than PACK_BELOW is appended to the active pack instead:
one write, and with sync=True one fdatasync shared by the appends in flight
(a small file's replicas cost an append, not a file create and rename). A
delete logs the record as dead; compaction copies the live records of a
sealed pack whose dead share reached COMPACT_DEAD_SHARE into the active pack,
makes them durable, and removes the old pack (see compact()).

The store keeps an index of the shard ids it holds, their sizes, and for a
packed replica its pack and record offset (32 bytes per shard), built by one
scan when it opens and kept up to date by put and delete, so list() and
stat() never rescan. It assumes it is the only writer of its directory
while open. Format 1 (before packs) opens as it is and is marked format 2.
"""

from __future__ import annotations

import array
import bisect
import errno
import json
import logging
import mmap
import os
import secrets
from collections.abc import Callable, Sequence
from stat import S_ISREG
from typing import TypeVar

import trio

from dfsfuse.durable import fsync_dir, fsync_file
from dfsfuse.errors import NoSpace, ShardMissing, StoreUnavailable
from dfsfuse.storage.base import Buffer, NodeStore, StoreStat
from dfsfuse.storage.directio import supports_direct_io, write_direct
from dfsfuse.storage.fileio import pread_all as _pread_all
from dfsfuse.storage.fileio import write_all as _write_all
from dfsfuse.storage.packs import PACKS_DIR, RECORD, Found, Pack

from . import packs

log = logging.getLogger("dfsfuse.storage")

STORE_FORMAT = 2
READABLE_FORMATS = (1, 2)  # 1: before packs, no ROOT/packs/
IDENTITY_FILE = "STORE"
SHARDS_DIR = "shards"
TMP_DIR = "tmp"
DIRECT_WRITE_MIN = 1 << 20
PACK_BELOW = 128 << 10  # replicas smaller than this go to packs (docs/performance.md says why)
PACK_LIMIT = 64 << 20  # a pack this large is sealed and a new one started
COMPACT_DEAD_SHARE = 0.5  # a sealed pack is compacted once this share of it is dead
COPY_BATCH = 4 << 20  # bytes of live records compaction copies per append
_IN_FILE = -1  # in the index's pack column: the replica is a file of its own
# Ids from here up are metadata snapshots (docs/formats.md), never packed: a
# restore after a disaster may have nothing but one node's files to work from.
FILE_IDS_FROM = 2**63

_MAX_SHARD_ID = 2**64 - 1
_T = TypeVar("_T")
_Located = tuple[int, int, int, int]  # shard id, pack number (or _IN_FILE), record offset, replica size
_Copy = tuple[int, int, Pack, int, int]  # shard id, old offset, new pack, new offset, replica size
_Copies = list[_Copy]  # (inside LocalStore, `list` is its method)
_DeadByPack = dict[int, list[tuple[int, int]]]  # pack number -> (shard id, record offset) of dead records


def replica_name(shard_id: int) -> str:
    """The path of a shard's replica relative to the store's root."""
    return os.path.join(SHARDS_DIR, f"{shard_id & 0xFF:02x}", f"{shard_id:016x}")


class LocalStore(NodeStore):
    """Shard replicas as files in a directory of the local file system.

    Construct, then `await prepare()` before any other call (or use
    `await LocalStore.open(name, root)`, which does both).

    `root` (absolute) is public and read-only, for messages and logs; the
    layout under it is this module's business.

    `exclusive`: this process is the store's only user (a node server, a
    mount whose metadata no other mount shares, a command that holds the
    data dir's lock). Only then does opening clean up after a crash
    (temporaries, torn pack tails) and do small replicas go to packs, whose
    appends and compactions assume one writer. Opened beside other users
    (`status` beside a mount; mounts that share their metadata, and so may
    share local stores on one machine), the store changes nothing at open
    and writes every replica as a file of its own, which is safe beside
    other writers; it still reads packed replicas.
    """

    # Why a directory whose recorded_name() is None is not a node store, in words for messages.
    NO_IDENTITY = f"it has no {IDENTITY_FILE} file"

    # Replicas smaller than this are appended to packs; 0: every replica is a
    # file (a store's tests that damage replica files on disk set that).
    pack_below = PACK_BELOW

    def __init__(self, name: str, root: str, *, exclusive: bool = True):
        if not name or "\n" in name:
            raise ValueError(f"invalid store name {name!r}")
        self.name = name
        self.root = os.path.abspath(root)
        self.exclusive = exclusive
        self._shards_dir = os.path.join(self.root, SHARDS_DIR)
        self._tmp_dir = os.path.join(self.root, TMP_DIR)
        self._packs_dir = os.path.join(self.root, PACKS_DIR)
        # Sorted shard ids and, at the same positions, the sizes of their
        # replicas, the pack holding each (_IN_FILE: a file of its own) and
        # the offset of its record's header there.
        self._ids = array.array("Q")
        self._sizes = array.array("Q")
        self._in_pack = array.array("q")
        self._offsets = array.array("Q")
        self._used = 0
        self._device = ""
        self._direct_io = False
        self._packs: dict[int, Pack] = {}  # by number; the highest is the active one
        # Held from choosing a record's place until the index points at it, so
        # records are appended in the order the index changes (the later record wins).
        self._append_lock = trio.Lock()
        self._sync_locks: dict[int, trio.Lock] = {}
        self._dead_lock = trio.Lock()  # dead-log writes, and removing a pack
        self._compacting = False

    @classmethod
    async def open(cls, name: str, root: str, *, exclusive: bool = True) -> LocalStore:
        store = cls(name, root, exclusive=exclusive)
        await store.prepare()
        return store

    @staticmethod
    def recorded_name(root: str) -> str | None:
        """The store name in ROOT's identity file, if it has a readable one:
        None means ROOT is not (or no longer) a node store."""
        try:
            with open(os.path.join(root, IDENTITY_FILE), "rb") as file:
                name = json.loads(file.read()).get("name")
        except (OSError, ValueError, AttributeError):
            return None
        return name if isinstance(name, str) and name else None

    async def prepare(self) -> None:
        """Create the layout if new, check the identity file, remove leftover
        temporaries and index the replicas present."""
        replicas, found, pack_list, device, direct_io = await self._run("open store", self.root, self._prepare_sync)
        self._packs = {pack.number: pack for pack in pack_list}
        entries = [(shard_id, size, _IN_FILE, 0) for shard_id, size in replicas]
        entries += [(record.shard_id, record.length, record.pack, record.offset) for record in found]
        entries.sort()
        self._ids = array.array("Q", (entry[0] for entry in entries))
        self._sizes = array.array("Q", (entry[1] for entry in entries))
        self._in_pack = array.array("q", (entry[2] for entry in entries))
        self._offsets = array.array("Q", (entry[3] for entry in entries))
        self._used = sum(self._sizes)
        for record in found:
            self._packs[record.pack].live += RECORD.size + record.length
        self._device = device
        self._direct_io = direct_io

    def _prepare_sync(self) -> tuple[list[tuple[int, int]], list[Found], list[Pack], str, bool]:
        """The layout work of prepare(): returns the (shard id, size) of every
        replica file, in id order, the live pack records (packs.open_packs),
        the packs, the device of the root, and whether the file system takes
        O_DIRECT writes. A replica file that a pack record also holds is
        removed: the record was written later (see _put_packed)."""
        os.makedirs(self._tmp_dir, exist_ok=True)
        if self.exclusive:  # another user's temporaries may be writes under way
            for entry in os.scandir(self._tmp_dir):
                os.unlink(entry.path)
        direct_io = supports_direct_io(self._tmp_dir)
        self._check_or_write_identity()
        pack_list, found = packs.open_packs(self._packs_dir, repair=self.exclusive)
        in_packs = {record.shard_id for record in found}
        replicas: list[tuple[int, int]] = []
        for bucket in range(256):
            bucket_dir = os.path.join(self._shards_dir, f"{bucket:02x}")
            os.makedirs(bucket_dir, exist_ok=True)
            for entry in os.scandir(bucket_dir):
                shard_id = _parse_replica_name(entry.name, bucket)
                if shard_id is None or not entry.is_file(follow_symlinks=False):
                    continue
                if shard_id in in_packs:
                    if self.exclusive:
                        os.unlink(entry.path)
                else:
                    replicas.append((shard_id, entry.stat(follow_symlinks=False).st_size))
        replicas.sort()
        return replicas, found, pack_list, str(os.stat(self.root).st_dev), direct_io

    def _check_or_write_identity(self) -> None:
        path = os.path.join(self.root, IDENTITY_FILE)
        try:
            with open(path, "rb") as file:
                identity = json.loads(file.read())
        except FileNotFoundError:
            self._write_identity(path)
            return
        except ValueError as exc:
            raise StoreUnavailable(
                f"node store {self.name!r}: {path} is not a store identity file: {exc}"
            ) from exc
        if not isinstance(identity, dict) or identity.get("format") not in READABLE_FORMATS:
            raise StoreUnavailable(f"node store {self.name!r}: {path}: unsupported store format")
        if identity.get("name") != self.name:
            raise StoreUnavailable(
                f"node store {self.name!r}: {self.root} belongs to store {identity.get('name')!r}"
            )
        if identity["format"] != STORE_FORMAT:
            # Before packs are made: code that knows no packs must refuse the store, not miss replicas.
            self._write_identity(path)

    def _write_identity(self, path: str) -> None:
        content = json.dumps({"format": STORE_FORMAT, "name": self.name}).encode() + b"\n"
        temp = os.path.join(self._tmp_dir, IDENTITY_FILE)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            _write_all(fd, [content])
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temp, path)
        fsync_dir(self.root)

    # -- NodeStore ---------------------------------------------------------
    async def put(self, shard_id: int, parts: Sequence[Buffer], sync: bool) -> None:
        path = self._path(shard_id)
        if self.exclusive and shard_id < FILE_IDS_FROM and sum(memoryview(part).nbytes for part in parts) < self.pack_below:
            await self._put_packed(shard_id, parts, sync)
            return
        size = await self._run("write", path, self._put_sync, shard_id, path, parts, sync)
        await self._kill([self._index(shard_id, size, _IN_FILE, 0)])

    async def _put_packed(self, shard_id: int, parts: Sequence[Buffer], sync: bool) -> None:
        """Append the replica to the active pack, then point the index at it;
        the record it replaces (in a pack, or a file) is killed after, so a
        crash in between leaves both, and the later record wins."""
        size = sum(memoryview(part).nbytes for part in parts)
        async with self._append_lock:
            pack = await self._active_pack()
            (offset,) = await self._append(pack, [(shard_id, parts)])
            replaced = self._index(shard_id, size, pack.number, offset)
        if sync:
            await self._sync_pack(pack, offset + RECORD.size + size)
        if replaced is not None and replaced[1] == _IN_FILE:
            path = self._path(shard_id)
            await self._run("delete", path, _unlink_if_present, path)
        else:
            await self._kill([replaced])

    async def _active_pack(self) -> Pack:
        """The pack to append to, a new one if there is none or it is sealed
        or full; the caller holds `_append_lock`."""
        newest = self._packs[max(self._packs)] if self._packs else None
        if newest is not None and not newest.sealed and newest.end < PACK_LIMIT:
            return newest
        if newest is not None:
            newest.sealed = True
        number = max(self._packs, default=0) + 1
        pack = await self._run("create a pack in", self._packs_dir, packs.create_pack, self._packs_dir, number)
        self._packs[number] = pack
        return pack

    async def _append(self, pack: Pack, records: Sequence[tuple[int, Sequence[Buffer]]]) -> list[int]:
        """Append records to `pack` (the caller holds `_append_lock`): their offsets."""
        offsets = await self._run("write", pack.path, packs.append_records, pack, records)
        pack.end = offsets[-1] + RECORD.size + sum(memoryview(part).nbytes for part in records[-1][1])
        return offsets

    async def _sync_pack(self, pack: Pack, end: int) -> None:
        """Make the pack durable up to `end`: one fdatasync serves every
        append made before it started (group commit)."""
        lock = self._sync_locks.setdefault(pack.number, trio.Lock())
        async with lock:
            if pack.synced >= end or pack.retired:
                return
            target = pack.end
            pack.users += 1
            try:
                await self._run("sync", pack.path, os.fdatasync, pack.fd)
            finally:
                pack.users -= 1
                pack.close_if_idle()
            pack.synced = max(pack.synced, target)

    def _put_sync(self, shard_id: int, path: str, parts: Sequence[Buffer], sync: bool) -> int:
        temp = os.path.join(self._tmp_dir, f"{shard_id:016x}.{secrets.token_hex(8)}")
        direct = self._direct_io and sum(memoryview(part).nbytes for part in parts) >= DIRECT_WRITE_MIN
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | (os.O_DIRECT if direct else 0)
        fd = os.open(temp, flags, 0o644)
        try:
            try:
                size = write_direct(fd, parts) if direct else _write_all(fd, parts)
                if sync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(temp, path)
        except BaseException:
            _unlink_quietly(temp)
            raise
        if sync:
            fsync_dir(os.path.dirname(path))
        return size

    async def open_spool(self, shard_id: int) -> Spool:
        """A spool to receive the replica of `shard_id` in pieces (see Spool);
        NoSpace or StoreUnavailable if its file cannot be made."""
        spool = Spool(self, shard_id)
        await spool._create()
        return spool

    async def read(self, shard_id: int, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        for offset, length in ranges:
            if offset < 0 or length < -1:
                raise ValueError(f"invalid range ({offset}, {length})")
        path = self._path(shard_id)
        while True:
            position = self._position(shard_id)
            if position is None or self._in_pack[position] == _IN_FILE:
                return await self._run("read", path, _read_ranges, path, ranges, missing=ShardMissing)
            pack = self._packs[self._in_pack[position]]
            data_offset, size = self._offsets[position] + RECORD.size, self._sizes[position]
            pack.users += 1  # a compaction that retires the pack meanwhile leaves its descriptor open
            try:
                return await self._run(
                    "read", pack.path, packs.read_record, pack, data_offset, size, ranges, missing=ShardMissing
                )
            except ShardMissing:
                if not pack.retired:
                    raise
                # Compaction removed the pack under this read: the index points at the copy now.
            finally:
                pack.users -= 1
                pack.close_if_idle()

    async def delete(self, shard_id: int) -> None:
        await self.delete_many([shard_id])

    async def delete_many(self, shard_ids: Sequence[int]) -> None:
        """All in one worker thread: a thread hop costs more than an unlink.
        Then the sealed packs that became mostly dead are compacted."""
        files = [shard_id for shard_id in shard_ids if not self._is_packed(shard_id)]
        paths = [self._path(shard_id) for shard_id in files]
        await self._kill([self._forget(shard_id) for shard_id in shard_ids if self._is_packed(shard_id)])
        deleted, failure = await self._run("delete", self.root, _unlink_each, paths)
        for shard_id in files[:deleted]:
            self._forget(shard_id)
        if failure is not None:
            raise self._error("delete", paths[deleted], failure) from failure
        await self.compact()

    async def exists(self, shard_id: int) -> bool:
        path = self._path(shard_id)
        if self._is_packed(shard_id):
            return True
        return await self._run("stat", path, _is_file, path)

    async def list(self, after: int, limit: int) -> list[int]:
        start = bisect.bisect_right(self._ids, after)
        return self._ids[start : start + max(limit, 0)].tolist()

    async def sync(self, shard_ids: Sequence[int]) -> None:
        paths = [self._path(shard_id) for shard_id in shard_ids if not self._is_packed(shard_id)]
        ends: dict[int, int] = {}
        for shard_id in shard_ids:
            position = self._position(shard_id)
            if position is not None and self._in_pack[position] != _IN_FILE:
                end = self._offsets[position] + RECORD.size + self._sizes[position]
                number = self._in_pack[position]
                ends[number] = max(ends.get(number, 0), end)
        for number, end in ends.items():
            await self._sync_pack(self._packs[number], end)
        if paths:
            await self._run("sync", self._shards_dir, _fsync_files_and_dirs, paths)

    async def stat(self) -> StoreStat:
        fs = await self._run("statvfs", self.root, os.statvfs, self.root)
        return StoreStat(
            capacity=fs.f_blocks * fs.f_frsize,
            free=fs.f_bavail * fs.f_frsize,
            used=self._used,
            shards=len(self._ids),
            device=self._device,
        )

    async def close(self) -> None:
        for pack in self._packs.values():
            pack.retired = True
            pack.close_if_idle()
        self._packs.clear()

    # -- packs: deletion and compaction ------------------------------------
    async def _kill(self, records: Sequence[_Located | None]) -> None:
        """Log pack records (shard id, pack, offset, size) as dead, not
        durably (as a file replica's unlink is not); None and replica files are skipped."""
        by_pack: _DeadByPack = {}
        for record in records:
            if record is not None and record[1] != _IN_FILE:
                shard_id, number, offset, size = record
                pack = self._packs.get(number)
                if pack is not None:  # else compaction removed the pack and the record with it
                    pack.live -= RECORD.size + size
                    by_pack.setdefault(number, []).append((shard_id, offset))
        if by_pack:
            await self._log_dead(by_pack, sync=False)

    async def _log_dead(self, by_pack: _DeadByPack, sync: bool) -> None:
        """Append to the packs' dead logs; `_dead_lock` keeps compaction from
        removing (and closing) a pack meanwhile."""
        async with self._dead_lock:
            logs = [(self._packs[number], entries) for number, entries in by_pack.items() if number in self._packs]

            def log_all() -> None:
                for pack, entries in logs:
                    packs.log_dead(self._packs_dir, pack, entries, sync)

            await self._run("log deletions in", self._packs_dir, log_all)

    async def compact(self) -> int:
        """Compact every sealed pack whose dead share reached
        COMPACT_DEAD_SHARE; returns the bytes of pack files removed.

        For each: its live records are read and appended to the active pack
        (under `_append_lock`, a batch at a time, skipping those deleted or
        replaced meanwhile), the active pack is fdatasynced, the index moves
        to the copies (a copy whose record was deleted or replaced during
        the copy is logged dead, durably), and only then is the old pack
        removed. A crash before the removal leaves both copies, identical
        (shard ids are immutable), and the later one wins at open; the
        removed pack takes its dead records with it, so nothing deleted
        comes back. Reads go on meanwhile: they find a record in either pack.
        """
        if self._compacting or not self.exclusive:
            return 0
        self._compacting = True
        reclaimed = 0
        try:
            for pack in list(self._packs.values()):
                if pack.sealed and pack.readable and pack.dead >= COMPACT_DEAD_SHARE * (pack.end - packs.PACK_HEADER.size):
                    reclaimed += await self._compact(pack)
        finally:
            self._compacting = False
        return reclaimed

    async def _compact(self, pack: Pack) -> int:
        number = pack.number
        live = [
            (self._ids[i], self._offsets[i], self._sizes[i])
            for i in range(len(self._ids)) if self._in_pack[i] == number
        ]
        copies: _Copies = []
        start = 0
        while start < len(live):
            batch = [live[start]]
            while start + len(batch) < len(live) and sum(r[2] for r in batch) < COPY_BATCH:
                batch.append(live[start + len(batch)])
            start += len(batch)
            copies += await self._copy_batch(pack, batch)
        for target in {id(copy[2]): copy[2] for copy in copies}.values():
            await self._sync_pack(target, target.end)
        stale: _DeadByPack = {}
        for shard_id, old_offset, target, new_offset, size in copies:
            position = self._position(shard_id)
            if position is not None and (self._in_pack[position], self._offsets[position]) == (number, old_offset):
                self._in_pack[position], self._offsets[position] = target.number, new_offset
            else:
                target.live -= RECORD.size + size
                stale.setdefault(target.number, []).append((shard_id, new_offset))
        if stale:
            await self._log_dead(stale, sync=True)
        async with self._dead_lock:
            del self._packs[number]
            self._sync_locks.pop(number, None)
            pack.retired = True
            try:
                await self._run("remove a pack in", self._packs_dir, packs.remove_pack, self._packs_dir, pack)
            finally:
                pack.close_if_idle()
        log.info(
            "node store %r: compacted pack %s: %d live records copied, %d bytes of %d reclaimed",
            self.name, pack.path, len(copies), pack.dead, pack.end,
        )
        return pack.end

    async def _copy_batch(self, pack: Pack, batch: Sequence[tuple[int, int, int]]) -> _Copies:
        """Append the records (shard id, offset, size) of `pack` that the
        index still points at to the active pack; the copies made."""
        pack.users += 1
        try:
            datas = await self._run(
                "read", pack.path, packs.read_records, pack.fd, [(offset, size) for _, offset, size in batch]
            )
        finally:
            pack.users -= 1
            pack.close_if_idle()
        async with self._append_lock:
            kept = [
                (record, data) for record, data in zip(batch, datas)
                if self._points_at(record[0], pack.number, record[1])
            ]
            if not kept:
                return []
            target = await self._active_pack()
            offsets = await self._append(target, [(record[0], [data]) for record, data in kept])
            target.live += sum(RECORD.size + record[2] for record, _ in kept)
        return [
            (shard_id, old_offset, target, new_offset, size)
            for ((shard_id, old_offset, size), _), new_offset in zip(kept, offsets)
        ]

    # -- the index -----------------------------------------------------------
    def _position(self, shard_id: int) -> int | None:
        position = bisect.bisect_left(self._ids, shard_id)
        if position < len(self._ids) and self._ids[position] == shard_id:
            return position
        return None

    def _is_packed(self, shard_id: int) -> bool:
        position = self._position(shard_id)
        return position is not None and self._in_pack[position] != _IN_FILE

    def _points_at(self, shard_id: int, number: int, offset: int) -> bool:
        position = self._position(shard_id)
        return position is not None and (self._in_pack[position], self._offsets[position]) == (number, offset)

    def _index(self, shard_id: int, size: int, number: int, offset: int) -> _Located | None:
        """Record where the replica of `shard_id` is now; returns where it was."""
        position = bisect.bisect_left(self._ids, shard_id)
        if position < len(self._ids) and self._ids[position] == shard_id:
            before = (shard_id, self._in_pack[position], self._offsets[position], self._sizes[position])
            self._used += size - self._sizes[position]
            self._sizes[position], self._in_pack[position], self._offsets[position] = size, number, offset
            return before
        self._ids.insert(position, shard_id)
        self._sizes.insert(position, size)
        self._in_pack.insert(position, number)
        self._offsets.insert(position, offset)
        self._used += size
        return None

    def _forget(self, shard_id: int) -> _Located | None:
        """Drop a deleted replica from the index; returns where it was."""
        position = self._position(shard_id)
        if position is None:
            return None
        before = (shard_id, self._in_pack[position], self._offsets[position], self._sizes[position])
        self._used -= self._sizes[position]
        for column in (self._ids, self._sizes, self._in_pack, self._offsets):
            del column[position]
        return before

    # -- helpers -----------------------------------------------------------
    def _path(self, shard_id: int) -> str:
        if not 0 <= shard_id <= _MAX_SHARD_ID:
            raise ValueError(f"shard id {shard_id} out of range")
        return os.path.join(self.root, replica_name(shard_id))

    async def _run(
        self,
        action: str,
        path: str,
        function: Callable[..., _T],
        *args: object,
        missing: type[ShardMissing] | None = None,
    ) -> _T:
        """Run blocking `function` in a worker thread and map its OSError.

        ENOENT becomes `missing` when given (a read of an absent replica),
        else it means the store's layout is gone, like any other failure.
        """
        try:
            return await trio.to_thread.run_sync(function, *args)
        except OSError as exc:
            raise self._error(action, path, exc, missing) from exc

    def _error(
        self, action: str, path: str, exc: OSError, missing: type[ShardMissing] | None = None
    ) -> ShardMissing | NoSpace | StoreUnavailable:
        message = f"node store {self.name!r}: {action} {path}: {exc.strerror or exc}"
        if exc.errno == errno.ENOENT and missing is not None:
            return missing(message)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return NoSpace(message)
        return StoreUnavailable(message)


class Spool:
    """A replica received in pieces (a node server's PUT body), in an unnamed
    temporary file in the store's tmp/ (the same disk): memory holds at most
    one piece, and a spool that is cut short leaves nothing behind, not even
    a name.

    commit() hands the pieces to LocalStore.put as a read-only memory map of
    the file; the store copies them into its own temporary and renames that
    into place. The spool file is never fsynced and is dropped right after,
    so its pages usually never reach the disk at all.

    Failures are NoSpace or StoreUnavailable, as the store's own; after one,
    abort() the spool.
    """

    def __init__(self, store: LocalStore, shard_id: int):
        self._store = store
        self._shard_id = shard_id
        self._fd = -1
        self.size = 0  # bytes appended so far

    async def _create(self) -> None:
        self._fd = await self._run("create a spool file", _create_unnamed, self._store._tmp_dir)

    async def append(self, data: Buffer) -> None:
        await self._run("write", _write_all, self._fd, [data])
        self.size += memoryview(data).nbytes

    async def commit(self, sync: bool) -> None:
        """Store what was appended as the replica (fsynced with `sync`, as
        LocalStore.put), then drop the spool."""
        try:
            parts: list[Buffer] = []
            if self.size:
                # Not closed explicitly: the store's views of it may outlive put()
                # (in a traceback); the map goes with its last reference.
                parts.append(memoryview(await self._run("map", self._map)))
            await self._store.put(self._shard_id, parts, sync)
        finally:
            self.abort()

    def abort(self) -> None:
        """Drop the spool and what it received; nothing is stored. Idempotent."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _map(self) -> mmap.mmap:
        return mmap.mmap(self._fd, self.size, prot=mmap.PROT_READ)

    async def _run(self, action: str, function: Callable[..., _T], *args: object) -> _T:
        """The store's _run, with messages that name the shard and the tmp/ directory."""
        action = f"receiving shard {self._shard_id:016x}: {action} in"
        return await self._store._run(action, self._store._tmp_dir, function, *args)


def _create_unnamed(directory: str) -> int:
    """A new file in `directory`, opened read-write and unlinked at once."""
    path = os.path.join(directory, f"receiving.{secrets.token_hex(8)}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    os.unlink(path)
    return fd


def _parse_replica_name(name: str, bucket: int) -> int | None:
    """The shard id a file in bucket `bucket` is named for, or None for a stray file."""
    if len(name) != 16:
        return None
    try:
        shard_id = int(name, 16)
    except ValueError:
        return None
    if f"{shard_id:016x}" != name or shard_id & 0xFF != bucket:
        return None
    return shard_id


def _read_ranges(path: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        results = []
        for offset, length in ranges:
            wanted = max(0, size - offset) if length == -1 else length
            results.append(_pread_all(fd, wanted, offset))
        return results
    finally:
        os.close(fd)


def _unlink_if_present(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _unlink_each(paths: Sequence[str]) -> tuple[int, OSError | None]:
    """Unlink paths in order until one fails: (how many are gone, the error)."""
    for done, path in enumerate(paths):
        try:
            _unlink_if_present(path)
        except OSError as error:
            return done, error
    return len(paths), None


def _is_file(path: str) -> bool:
    try:
        return S_ISREG(os.stat(path).st_mode)
    except FileNotFoundError:
        return False


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _fsync_files_and_dirs(paths: Sequence[str]) -> None:
    """fsync each existing file, then each directory that holds one (once)."""
    directories = set()
    for path in paths:
        try:
            fsync_file(path)
        except FileNotFoundError:
            continue
        directories.add(os.path.dirname(path))
    for directory in sorted(directories):
        fsync_dir(directory)
