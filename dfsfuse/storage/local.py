"""A node store in a local directory.

Layout under ROOT (tests look at it; other code goes through LocalStore):

    ROOT/STORE                  identity: {"format": 1, "name": "<store name>"} (JSON)
    ROOT/shards/<xx>/<id>       one replica file per shard; <id> is the shard id
                                as 16 lowercase hex digits, <xx> its last two
    ROOT/tmp/                   replicas being written, and spools (Spool: receiving.<random>,
                                unlinked once open); emptied when the store opens

A replica is written to ROOT/tmp/ and renamed into place, so a reader sees
either no replica or a whole one. With sync=True the file is fsync'd before
the rename and its directory after it. A replica of DIRECT_WRITE_MIN bytes
or more is written with O_DIRECT where the file system allows it (see
dfsfuse.storage.directio for why); smaller ones, the replicas of small files
that are likely to be read again soon, go through the page cache.

The store keeps an index of the shard ids it holds and their sizes (16 bytes
per shard), built by one scan when it opens and kept up to date by put and
delete, so list() and stat() never rescan. It assumes it is the only writer
of its directory while open.
"""

from __future__ import annotations

import array
import bisect
import errno
import json
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

STORE_FORMAT = 1
IDENTITY_FILE = "STORE"
SHARDS_DIR = "shards"
TMP_DIR = "tmp"
DIRECT_WRITE_MIN = 1 << 20

_MAX_SHARD_ID = 2**64 - 1
_IOV_MAX = os.sysconf("SC_IOV_MAX")  # buffers one writev call accepts
_T = TypeVar("_T")


def replica_name(shard_id: int) -> str:
    """The path of a shard's replica relative to the store's root."""
    return os.path.join(SHARDS_DIR, f"{shard_id & 0xFF:02x}", f"{shard_id:016x}")


class LocalStore(NodeStore):
    """Shard replicas as files in a directory of the local file system.

    Construct, then `await prepare()` before any other call (or use
    `await LocalStore.open(name, root)`, which does both).

    `root` (absolute) is public and read-only, for messages and logs; the
    layout under it is this module's business.
    """

    # Why a directory whose recorded_name() is None is not a node store, in words for messages.
    NO_IDENTITY = f"it has no {IDENTITY_FILE} file"

    def __init__(self, name: str, root: str):
        if not name or "\n" in name:
            raise ValueError(f"invalid store name {name!r}")
        self.name = name
        self.root = os.path.abspath(root)
        self._shards_dir = os.path.join(self.root, SHARDS_DIR)
        self._tmp_dir = os.path.join(self.root, TMP_DIR)
        # Sorted shard ids and, at the same positions, the sizes of their files.
        self._ids = array.array("Q")
        self._sizes = array.array("Q")
        self._used = 0
        self._device = ""
        self._direct_io = False

    @classmethod
    async def open(cls, name: str, root: str) -> LocalStore:
        store = cls(name, root)
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
        replicas, device, direct_io = await self._run("open store", self.root, self._prepare_sync)
        self._ids = array.array("Q", (shard_id for shard_id, _ in replicas))
        self._sizes = array.array("Q", (size for _, size in replicas))
        self._used = sum(self._sizes)
        self._device = device
        self._direct_io = direct_io

    def _prepare_sync(self) -> tuple[list[tuple[int, int]], str, bool]:
        """The layout work of prepare(): returns the (shard id, size) of every
        replica present, in id order, the device of the root, and whether
        the file system takes O_DIRECT writes."""
        os.makedirs(self._tmp_dir, exist_ok=True)
        for entry in os.scandir(self._tmp_dir):
            os.unlink(entry.path)
        direct_io = supports_direct_io(self._tmp_dir)
        self._check_or_write_identity()
        replicas: list[tuple[int, int]] = []
        for bucket in range(256):
            bucket_dir = os.path.join(self._shards_dir, f"{bucket:02x}")
            os.makedirs(bucket_dir, exist_ok=True)
            for entry in os.scandir(bucket_dir):
                shard_id = _parse_replica_name(entry.name, bucket)
                if shard_id is not None and entry.is_file(follow_symlinks=False):
                    replicas.append((shard_id, entry.stat(follow_symlinks=False).st_size))
        replicas.sort()
        return replicas, str(os.stat(self.root).st_dev), direct_io

    def _check_or_write_identity(self) -> None:
        path = os.path.join(self.root, IDENTITY_FILE)
        try:
            with open(path, "rb") as file:
                identity = json.loads(file.read())
        except FileNotFoundError:
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
            return
        except ValueError as exc:
            raise StoreUnavailable(
                f"node store {self.name!r}: {path} is not a store identity file: {exc}"
            ) from exc
        if not isinstance(identity, dict) or identity.get("format") != STORE_FORMAT:
            raise StoreUnavailable(f"node store {self.name!r}: {path}: unsupported store format")
        if identity.get("name") != self.name:
            raise StoreUnavailable(
                f"node store {self.name!r}: {self.root} belongs to store {identity.get('name')!r}"
            )

    # -- NodeStore ---------------------------------------------------------
    async def put(self, shard_id: int, parts: Sequence[Buffer], sync: bool) -> None:
        path = self._path(shard_id)
        size = await self._run("write", path, self._put_sync, shard_id, path, parts, sync)
        position = bisect.bisect_left(self._ids, shard_id)
        if position < len(self._ids) and self._ids[position] == shard_id:
            self._used += size - self._sizes[position]
            self._sizes[position] = size
        else:
            self._ids.insert(position, shard_id)
            self._sizes.insert(position, size)
            self._used += size

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
        return await self._run("read", path, _read_ranges, path, ranges, missing=ShardMissing)

    async def delete(self, shard_id: int) -> None:
        path = self._path(shard_id)
        await self._run("delete", path, _unlink_if_present, path)
        self._forget(shard_id)

    async def delete_many(self, shard_ids: Sequence[int]) -> None:
        """All in one worker thread: a thread hop costs more than an unlink."""
        paths = [self._path(shard_id) for shard_id in shard_ids]
        deleted, failure = await self._run("delete", self.root, _unlink_each, paths)
        for shard_id in shard_ids[:deleted]:
            self._forget(shard_id)
        if failure is not None:
            raise self._error("delete", paths[deleted], failure) from failure

    def _forget(self, shard_id: int) -> None:
        """Drop a deleted replica from the index."""
        position = bisect.bisect_left(self._ids, shard_id)
        if position < len(self._ids) and self._ids[position] == shard_id:
            self._used -= self._sizes[position]
            del self._ids[position]
            del self._sizes[position]

    async def exists(self, shard_id: int) -> bool:
        path = self._path(shard_id)
        return await self._run("stat", path, _is_file, path)

    async def list(self, after: int, limit: int) -> list[int]:
        start = bisect.bisect_right(self._ids, after)
        return self._ids[start : start + max(limit, 0)].tolist()

    async def sync(self, shard_ids: Sequence[int]) -> None:
        paths = [self._path(shard_id) for shard_id in shard_ids]
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


def _write_all(fd: int, parts: Sequence[Buffer]) -> int:
    """Write every byte of `parts` in order with as few writev calls as the
    kernel allows; returns the number of bytes written."""
    pending = [view for view in (memoryview(part).cast("B") for part in parts) if len(view)]
    total = sum(len(view) for view in pending)
    while pending:
        written = os.writev(fd, pending[:_IOV_MAX])
        while written:
            if written >= len(pending[0]):
                written -= len(pending.pop(0))
            else:
                pending[0] = pending[0][written:]
                written = 0
    return total


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


def _pread_all(fd: int, length: int, offset: int) -> bytes:
    """pread until `length` bytes or the end of the file (one call in the usual case)."""
    data = os.pread(fd, length, offset)
    if len(data) == length or not data:
        return data
    chunks = [data]
    got = len(data)
    while got < length:
        chunk = os.pread(fd, length - got, offset + got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


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
