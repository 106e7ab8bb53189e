"""Pack files: small replicas appended to a few large files of a node store.

A small replica costs a file create, a write and a rename, and with sync a
file and a directory fsync; appended to a pack it costs one write (and one
fdatasync shared by every replica appended meanwhile). LocalStore decides
which replicas go to packs and keeps the index of where each one is; this
module owns the pack files: their format, scanning them when the store
opens, appending, reading, the dead logs, and the copy step of compaction.

Layout under ROOT/packs/ (docs/formats.md, "Pack files", is the reference):

    <n>.pack    header (PACK_HEADER), then records: RECORD header + replica bytes
    <n>.dead    the dead log of pack <n>: DEAD_ENTRY (shard id, record offset)
                for each record deleted or replaced, appended, never rewritten

<n> is the pack number, 10 decimal digits, never reused: the newest pack has
the highest, and only it (the active pack) is appended to. A record is
identified by its pack and the offset of its header, so a shard put again
into the same pack after a delete is not killed by the old dead entry. When
a shard has live records in two packs (a put that replaced it, or a
compaction cut short by a crash) the later one wins: higher pack number,
then higher offset. Records are only ever appended in the order their
puts are indexed, so the later record is always the newer replica.

Blocking functions here run in worker threads (LocalStore calls them through
trio.to_thread); `Pack` objects are shared with the trio loop, which alone
changes their counters.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import re
import struct
import zlib
from collections.abc import Iterable, Sequence

from dfsfuse.durable import fsync_dir
from dfsfuse.storage.base import Buffer
from dfsfuse.storage.fileio import pread_all, write_all

log = logging.getLogger("dfsfuse.storage.packs")

PACKS_DIR = "packs"
PACK_VERSION = 1
PACK_MAGIC = b"DFSPACK\n"
PACK_HEADER = struct.Struct("<8sII")  # magic, version, reserved (0)
RECORD_MAGIC = b"DFPR"
RECORD = struct.Struct("<4sIQQ")  # magic, crc32 of bytes 8..24, shard id, replica length
DEAD_ENTRY = struct.Struct("<QQ")  # shard id, offset of the dead record's header

_PACK_NAME = re.compile(r"^([0-9]{10})\.(pack|dead)$")


def pack_file_name(number: int) -> str:
    return f"{number:010d}.pack"


def dead_log_name(number: int) -> str:
    return f"{number:010d}.dead"


def record_header(shard_id: int, length: int) -> bytes:
    body = struct.pack("<QQ", shard_id, length)
    return RECORD.pack(RECORD_MAGIC, zlib.crc32(body), shard_id, length)


@dataclasses.dataclass(eq=False)
class Pack:
    """One pack file, open for reading and (the active one) appending.

    `end` is where the next record goes (the file's size); `live` counts the
    bytes (headers included) of the records the store's index points at.
    `users` counts reads in flight: a retired pack's descriptor is closed
    once the last of them is done, never under a worker thread's pread.
    """

    number: int
    path: str
    fd: int
    end: int
    synced: int  # bytes known to be on stable storage
    live: int = 0
    sealed: bool = False  # never appended to again (full, or damaged)
    readable: bool = True  # False: a pack of an unknown version or header, left alone
    users: int = 0
    retired: bool = False
    dead_fd: int = -1

    @property
    def dead(self) -> int:
        """Bytes of the pack that no live record uses."""
        return self.end - PACK_HEADER.size - self.live

    def close_if_idle(self) -> None:
        if self.retired and self.users == 0:
            for fd in (self.fd, self.dead_fd):
                if fd >= 0:
                    os.close(fd)
            self.fd = self.dead_fd = -1


@dataclasses.dataclass(frozen=True)
class Found:
    """A record seen by the scan at open: its pack, header offset, id and length."""

    pack: int
    offset: int
    shard_id: int
    length: int


def open_packs(directory: str, repair: bool = True) -> tuple[list[Pack], list[Found]]:
    """Scan ROOT/packs/ when the store opens: every pack (oldest first) and
    every live record, that is: not in its pack's dead log, and the latest
    record of its shard id. With `repair` (the store's only user) it cuts
    torn tails off, removes dead logs whose pack is gone and packs whose
    creation was cut short; without, it changes nothing (a tail may be an
    append under way) and stops each pack at its last whole record. Damage
    is logged, never raised: a damaged pack keeps the records before the damage."""
    os.makedirs(directory, exist_ok=True)
    packs: list[Pack] = []
    found: dict[int, Found] = {}
    names: dict[int, set[str]] = {}
    for entry in os.scandir(directory):
        match = _PACK_NAME.match(entry.name)
        if match:
            names.setdefault(int(match[1]), set()).add(match[2])
    for number in sorted(names):
        if "pack" not in names[number]:
            if repair:
                os.unlink(os.path.join(directory, dead_log_name(number)))
            continue
        scanned = _scan_pack(directory, number, repair)
        if scanned is None:
            continue
        pack, records = scanned
        packs.append(pack)
        dead = _read_dead_log(os.path.join(directory, dead_log_name(number)))
        for record in records:
            if (record.shard_id, record.offset) not in dead:
                found[record.shard_id] = record  # later packs and offsets come later: they win
    if repair:
        fsync_dir(directory)
    return packs, sorted(found.values(), key=lambda record: record.shard_id)


def _scan_pack(directory: str, number: int, repair: bool) -> tuple[Pack, list[Found]] | None:
    path = os.path.join(directory, pack_file_name(number))
    fd = os.open(path, (os.O_RDWR if repair else os.O_RDONLY) | os.O_CLOEXEC)
    size = os.fstat(fd).st_size
    if size < PACK_HEADER.size:  # its creation was cut short (or is under way): it holds no record
        os.close(fd)
        if repair:
            os.unlink(path)
        return None
    magic, version, _ = PACK_HEADER.unpack(os.pread(fd, PACK_HEADER.size, 0))
    pack = Pack(number, path, fd, end=size, synced=size)
    if magic != PACK_MAGIC or version != PACK_VERSION:
        log.warning("pack %s: not a pack of version %d; left alone, its records are not read", path, PACK_VERSION)
        pack.sealed, pack.readable = True, False
        return pack, []
    records: list[Found] = []
    offset = PACK_HEADER.size
    while offset < size:
        raw = os.pread(fd, RECORD.size, offset)
        if len(raw) < RECORD.size:
            break  # torn tail: a header cut short
        magic, crc, shard_id, length = RECORD.unpack(raw)
        if magic != RECORD_MAGIC or crc != zlib.crc32(raw[8:]):
            log.warning(
                "pack %s: damaged record header at offset %d; the %d bytes from there are not read "
                "(their replicas count as missing here) and the pack takes no more records",
                path, offset, size - offset,
            )
            pack.sealed = True
            return pack, records
        if offset + RECORD.size + length > size:
            break  # torn tail: a record cut short
        records.append(Found(number, offset, shard_id, length))
        offset += RECORD.size + length
    if offset < size and repair:
        log.info("pack %s: cutting a torn tail of %d bytes at offset %d", path, size - offset, offset)
        os.ftruncate(fd, offset)
        os.fsync(fd)
    pack.end = pack.synced = offset
    pack.sealed = pack.sealed or not repair  # a store beside other users appends to no pack
    return pack, records


def _read_dead_log(path: str) -> set[tuple[int, int]]:
    """(shard id, record offset) of every whole entry; a torn last entry is ignored."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        return set()
    whole = len(data) - len(data) % DEAD_ENTRY.size
    return set(DEAD_ENTRY.iter_unpack(data[:whole]))


def create_pack(directory: str, number: int) -> Pack:
    """A new empty pack, its header and its name durable."""
    path = os.path.join(directory, pack_file_name(number))
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        header = PACK_HEADER.pack(PACK_MAGIC, PACK_VERSION, 0)
        os.pwrite(fd, header, 0)
        os.fsync(fd)
        fsync_dir(directory)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    return Pack(number, path, fd, end=len(header), synced=len(header))


def append_records(pack: Pack, records: Sequence[tuple[int, Sequence[Buffer]]]) -> list[int]:
    """Write records (shard id, parts) at the pack's end in as few calls as
    the kernel allows; returns their header offsets. On failure the pack is
    cut back to where it was, so no partial record stays behind."""
    views: list[memoryview] = []
    offsets = []
    offset = pack.end
    for shard_id, parts in records:
        data = [view for view in (memoryview(part).cast("B") for part in parts) if len(view)]
        length = sum(len(view) for view in data)
        views.append(memoryview(record_header(shard_id, length)))
        views += data
        offsets.append(offset)
        offset += RECORD.size + length
    try:
        check_in_place(pack)
        write_all(pack.fd, views, pack.end)
    except BaseException:
        try:
            os.ftruncate(pack.fd, pack.end)
        except OSError:
            pass
        raise
    return offsets


def check_in_place(pack: Pack) -> None:
    """FileNotFoundError unless the pack's path still names its open file: a
    store whose directory was removed or moved must fail as a file-per-replica
    store does, not go on writing to a file nobody will find."""
    here = os.fstat(pack.fd)
    there = os.stat(pack.path)
    if (here.st_dev, here.st_ino) != (there.st_dev, there.st_ino):
        raise FileNotFoundError(errno.ENOENT, "the pack file is no longer in the store", pack.path)


def read_record(pack: Pack, data_offset: int, length: int, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
    """Ranges (offset, length; -1: to the end) of a record's replica bytes,
    which start at `data_offset` of the pack and are `length` long."""
    check_in_place(pack)
    fd = pack.fd
    results = []
    for offset, wanted in ranges:
        available = max(0, length - offset)
        take = available if wanted == -1 else min(wanted, available)
        results.append(_pread_record(fd, take, data_offset + offset) if take else b"")
    return results


def read_records(fd: int, records: Sequence[tuple[int, int]]) -> list[bytes]:
    """The replica bytes of records (header offset, replica length) of a pack."""
    return [_pread_record(fd, length, offset + RECORD.size) for offset, length in records]


def _pread_record(fd: int, length: int, offset: int) -> bytes:
    data = pread_all(fd, length, offset)
    if len(data) != length:
        raise OSError(errno.EIO, f"the pack ends {length - len(data)} bytes short of a record")
    return data


def log_dead(directory: str, pack: Pack, entries: Iterable[tuple[int, int]], sync: bool) -> None:
    """Append (shard id, record offset) entries to the pack's dead log (made
    on first use); with `sync`, fdatasync it (and its name when new)."""
    data = b"".join(DEAD_ENTRY.pack(shard_id, offset) for shard_id, offset in entries)
    if not data:
        return
    created = False
    if pack.dead_fd < 0:
        path = os.path.join(directory, dead_log_name(pack.number))
        created = not os.path.exists(path)
        pack.dead_fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    # One write of whole entries: a crash leaves at most a torn last entry, which the scan ignores.
    written = os.write(pack.dead_fd, data)
    if written != len(data):
        raise OSError(errno.ENOSPC, "short write to a dead log")
    if sync:
        os.fdatasync(pack.dead_fd)
        if created:
            fsync_dir(directory)


def remove_pack(directory: str, pack: Pack) -> None:
    """Unlink a retired pack, then its dead log (a dead log without its pack
    is removed at the next open), and make that durable."""
    os.unlink(pack.path)
    try:
        os.unlink(os.path.join(directory, dead_log_name(pack.number)))
    except FileNotFoundError:
        pass
    fsync_dir(directory)
