"""The embedded metadata engine: one SQLite database in WAL mode.

Every MetadataStore call is exactly one SQLite transaction. The transactions
run one at a time, in call order, on one dedicated thread that owns the single
connection (_TransactionThread), so the trio loop never blocks on the disk and
no two calls interleave. A dedicated thread costs about half of what
trio.to_thread costs per call, and this engine sits under every FUSE request
that misses the cache. Writes begin with BEGIN IMMEDIATE, so another process
that opens the database (status, fsck) waits instead of failing half-way.

Durability: WAL with synchronous=NORMAL makes a committed transaction survive
the death of the process, not of the machine; `sync()` makes it survive the
machine. `allocate_shard_ids` alone commits with synchronous=FULL, because a
shard id handed out must never be handed out again.

_SCHEMA_V1, _SCHEMA_V2 and _SCHEMA_V3 below are the only definition of the
tables (V2 adds to V1, V3 replaces V1's shards table), and their comments are
the reference for what each column holds (docs/formats.md mirrors them).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import sqlite3
import stat
import struct
import threading
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterator,
    Mapping,
    Sequence,
)
from pathlib import Path
from typing import Any, TypeVar

import outcome
import trio

from dfsfuse.durable import fsync_dir, fsync_file
from dfsfuse.errors import (
    DataError,
    Exists,
    InvalidArgument,
    IsADirectory,
    NoData,
    NotADirectory,
    NotEmpty,
    NotFound,
    NotPermitted,
    UserError,
)
from dfsfuse.metadata.base import (
    NODE_ACTIVE,
    NODE_STATES,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    REPLICAS_XATTR,
    ROOT_INODE,
    XATTR_CREATE,
    XATTR_REPLACE,
    AttrChanges,
    DirEntry,
    EntryChange,
    InodeAttrs,
    MetadataStore,
    NodeRecord,
    RenameChange,
    ShardLayers,
    ShardRecord,
    ShardRef,
    UsageCounts,
    check_name,
)
from dfsfuse.metadata.dump import Dump, encode_dump

ENGINE_NAME = "sqlite"  # config [metadata] engine, and the engine named in its dumps
STAGED_SUFFIX = ".restoring"  # load_dump builds the database under this name
FILE_TYPE_BITS = 0o170000  # the S_IFMT part of a mode
PAGE_CACHE_KIB = 65536  # SQLite's page cache: keeps the hot index pages in memory

T = TypeVar("T")

_SCHEMA_V1 = """
-- Named integers that belong to the whole file system.
--   schema_version  the version of this schema; see _MIGRATIONS.
--   next_shard_id   the lowest shard id never handed out. It only grows, and
--                   allocate_shard_ids makes every bump durable before it
--                   returns, so no shard id is reused, even after a crash.
--                   Shard ids start at 1.
--   shard_size      bytes of file data per shard, and
--   block_size      bytes per checksum block of a replica: recorded by the
--                   first layout() call (the first mount) and never changed,
--                   since shard indexes and replica offsets depend on them.
--                   Absent until then.
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;

-- One row per inode: every named inode, and inodes whose last name is gone
-- but which may still be open (nlink 0, "orphans") until delete_inodes.
CREATE TABLE inodes (
    -- The inode number. AUTOINCREMENT: numbers are never reused, so a number
    -- the kernel still holds can never name another file. 1 is the root.
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    -- st_mode: the file type (S_IFMT bits) and the permission bits.
    mode         INTEGER NOT NULL,
    -- Non-directory: its number of names. Directory: 2 + its subdirectories.
    -- 0: no name left (a removed directory, or a file unlinked while open).
    nlink        INTEGER NOT NULL,
    uid          INTEGER NOT NULL,
    gid          INTEGER NOT NULL,
    -- The device number of a character or block device, else 0.
    rdev         INTEGER NOT NULL,
    -- Regular file: its length in bytes (set by commit_shards; may extend
    -- past the last shard, the rest reads as a hole). Symlink: len(target).
    -- Others: 0.
    size         INTEGER NOT NULL,
    -- The sum of shards.length over this inode's shards (one copy, not per
    -- replica); st_blocks is ceil(stored_bytes / 512).
    stored_bytes INTEGER NOT NULL,
    -- Times in integer nanoseconds since the epoch.
    atime_ns     INTEGER NOT NULL,
    mtime_ns     INTEGER NOT NULL,
    ctime_ns     INTEGER NOT NULL,
    -- The target of a symlink; x'' for every other type.
    target       BLOB NOT NULL,
    -- Directories only: the directory that holds its one name (the root:
    -- itself, 1); it answers lookup(".."), and walking it up answers "is this
    -- directory inside that one" for rename. A removed directory keeps its
    -- last parent. NULL for every other type.
    parent       INTEGER
);
-- orphan_inodes without a scan of every inode.
CREATE INDEX inodes_orphans ON inodes (id) WHERE nlink = 0;

-- Directory entries: one row per name. "." and ".." are not stored.
CREATE TABLE entries (
    -- The readdir offset of the entry. AUTOINCREMENT: it grows in creation
    -- order and is never reused, so a resumed listing neither skips nor
    -- repeats an entry. Renaming keeps the row, and so the offset.
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    -- inodes.id of the directory holding the name; a live directory.
    parent INTEGER NOT NULL,
    -- The name: 1 to NAME_MAX bytes, no b"/" or NUL, not b"." or b"..".
    name   BLOB NOT NULL,
    -- inodes.id of the inode named. A directory has exactly one entry, a
    -- non-directory one per link (its nlink).
    inode  INTEGER NOT NULL,
    UNIQUE (parent, name)
);
-- readdir pages: the entries of one directory in offset order.
CREATE INDEX entries_listing ON entries (parent, id);

-- The shard maps of regular files: one row per shard in use (replaced in V3).
CREATE TABLE shards (
    -- The shard id (from meta.next_shard_id); names the replica files.
    -- A shard id is in at most one of shards and garbage, and only once.
    id       INTEGER PRIMARY KEY,
    -- inodes.id of the regular file the shard belongs to.
    inode    INTEGER NOT NULL,
    -- The shard index: the shard holds the file's bytes from
    -- idx * shard_size on. Missing indexes are holes.
    idx      INTEGER NOT NULL,
    -- The number of bytes of file data in the shard.
    length   INTEGER NOT NULL,
    -- xxh3-128 of exactly those bytes (16 bytes).
    checksum BLOB NOT NULL,
    -- The node stores that hold a replica: a JSON array of names.
    nodes    TEXT NOT NULL,
    UNIQUE (inode, idx)
);

-- Shards no longer referenced by any file, whose replicas still have to be
-- deleted. A row goes once every replica is gone (forget_garbage).
CREATE TABLE garbage (
    shard_id INTEGER PRIMARY KEY,
    -- Where replicas may be: a JSON array of node store names.
    nodes    TEXT NOT NULL
);

-- Extended attributes; they go with their inode (delete_inodes).
CREATE TABLE xattrs (
    -- inodes.id of the inode the attribute belongs to.
    inode INTEGER NOT NULL,
    name  BLOB NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (inode, name)
) WITHOUT ROWID;
"""
_SCHEMA_V2 = """
-- The cluster's node stores (the registry). Mounts and commands open the
-- stores listed here; the config file's [[nodes]] are added when absent.
CREATE TABLE nodes (
    -- The name shards.nodes and garbage.nodes record; never reused while
    -- any replica may still be on the node.
    name         TEXT PRIMARY KEY,
    -- 'local:/absolute/path' (a directory) or 'HOST:PORT' (a node server).
    address      TEXT NOT NULL,
    -- 'active' (takes new replicas), 'draining' (takes none, its replicas
    -- are being moved off) or 'drained' (takes none and holds none).
    state        TEXT NOT NULL,
    -- What the node reported when it last answered: bytes of its disk,
    -- bytes of replicas, replica count; 0 until then.
    capacity     INTEGER NOT NULL DEFAULT 0,
    used         INTEGER NOT NULL DEFAULT 0,
    shard_count  INTEGER NOT NULL DEFAULT 0,
    -- When it last answered, in ns since the epoch; 0: never.
    last_seen_ns INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
"""
_SCHEMA_V3 = """
-- The shard maps of regular files: one row per stored object in use. A shard
-- index holds at most one whole shard and any number of patches on top.
CREATE TABLE shards_v3 (
    -- The object's shard id (from meta.next_shard_id); names the replica
    -- files. A shard id is in at most one of shards and garbage, and only once.
    id       INTEGER PRIMARY KEY,
    -- inodes.id of the regular file the object belongs to.
    inode    INTEGER NOT NULL,
    -- The shard index: the object holds file bytes from idx * shard_size on.
    -- An index with no row is a hole.
    idx      INTEGER NOT NULL,
    -- The number of bytes the object holds.
    length   INTEGER NOT NULL,
    -- xxh3-128 of exactly those bytes (16 bytes).
    checksum BLOB NOT NULL,
    -- The node stores that hold a replica: a JSON array of names.
    nodes    TEXT NOT NULL,
    -- NULL: a whole shard, the bytes [0, length) of the index. Else a patch:
    -- page numbers (4 KiB pages of the index, ascending) as little-endian
    -- uint32s; the object holds those pages one after another. Patches apply
    -- in id order on top of the whole shard; a new whole shard replaces them.
    pages    BLOB
);
INSERT INTO shards_v3 (id, inode, idx, length, checksum, nodes)
    SELECT id, inode, idx, length, checksum, nodes FROM shards;
DROP TABLE shards;
ALTER TABLE shards_v3 RENAME TO shards;
-- shard_map and commit_shards: the objects of one file, index by index.
CREATE INDEX shards_by_index ON shards (inode, idx);
"""
# References between tables (entries.parent, entries.inode, shards.inode,
# xattrs.inode -> inodes.id) are kept by the code, not by SQLite foreign keys:
# enforcing them would need an index on entries.inode and a check on every
# write, for invariants that each transaction below already maintains.


def _statements(script: str) -> Iterator[str]:
    """The SQL statements of `script`, one at a time (comments included)."""
    statement = ""
    for line in script.splitlines(keepends=True):
        statement += line
        if sqlite3.complete_statement(statement):
            yield statement
            statement = ""


def _create_schema_v1(db: sqlite3.Connection) -> None:
    for statement in _statements(_SCHEMA_V1):
        db.execute(statement)
    now_ns = time.time_ns()
    db.execute(
        "INSERT INTO inodes (id, mode, nlink, uid, gid, rdev, size, stored_bytes,"
        " atime_ns, mtime_ns, ctime_ns, target, parent)"
        " VALUES (?, ?, 2, ?, ?, 0, 0, 0, ?, ?, ?, x'', ?)",
        (ROOT_INODE, stat.S_IFDIR | 0o755, os.getuid(), os.getgid(), now_ns, now_ns, now_ns, ROOT_INODE),
    )
    db.execute("INSERT INTO meta (key, value) VALUES ('next_shard_id', 1)")


def _add_schema_v2(db: sqlite3.Connection) -> None:
    for statement in _statements(_SCHEMA_V2):
        db.execute(statement)


def _add_schema_v3(db: sqlite3.Connection) -> None:
    for statement in _statements(_SCHEMA_V3):
        db.execute(statement)


# _MIGRATIONS[n] turns a database at schema version n - 1 (0: empty) into one
# at version n, inside the transaction that records version n.
_MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {
    1: _create_schema_v1,
    2: _add_schema_v2,
    3: _add_schema_v3,
}
SCHEMA_VERSION = max(_MIGRATIONS)


def _schema_version(db: sqlite3.Connection) -> int:
    if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone() is None:
        return 0
    row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return 0 if row is None else int(row[0])


def _transaction(db: sqlite3.Connection, begin: str, body: Callable[..., T], args: tuple[Any, ...]) -> T:
    """Run body(db, *args) as one transaction: all of it is committed, or none."""
    db.execute(begin)
    try:
        result = body(db, *args)
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return result


def _migrate_one_version(db: sqlite3.Connection, path: str) -> int:
    """Apply the next migration, if one is due; the schema version after."""
    version = _schema_version(db)
    if version > SCHEMA_VERSION:
        raise UserError(
            f"{path}: metadata schema version {version} is newer than this dfsfuse"
            f" understands ({SCHEMA_VERSION})"
        )
    if version < SCHEMA_VERSION:
        version += 1
        _MIGRATIONS[version](db)
        db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)", (version,))
    return version


def _migrate(db: sqlite3.Connection, path: str) -> None:
    """Bring the database up to SCHEMA_VERSION, one version per transaction."""
    while _transaction(db, "BEGIN IMMEDIATE", _migrate_one_version, (path,)) < SCHEMA_VERSION:
        pass


def _connect(path: str) -> sqlite3.Connection:
    return _prepared(sqlite3.connect(path, check_same_thread=False, isolation_level=None), path)


def _connect_image(image: bytes) -> sqlite3.Connection:
    """A database in memory holding `image` (a dump's payload), migrated as a file would be."""
    # A database in memory cannot be in WAL mode, and SQLite refuses one whose
    # header says so: set the header's write and read versions (bytes 18 and
    # 19) from 2, WAL, to 1, rollback journal.
    legacy = bytearray(image)
    legacy[18:20] = b"\x01\x01"
    db = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
    try:
        db.deserialize(legacy)
    except BaseException:
        db.close()
        raise
    return _prepared(db, "the metadata dump")


def _prepared(db: sqlite3.Connection, name: str) -> sqlite3.Connection:
    """`db` set up and migrated to SCHEMA_VERSION; closed if that fails."""
    try:
        if sqlite3.sqlite_version_info < (3, 35, 0):
            raise UserError(f"SQLite {sqlite3.sqlite_version} is too old: dfsfuse needs 3.35 or newer")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute(f"PRAGMA cache_size = -{PAGE_CACHE_KIB}")
        _migrate(db, name)
    except BaseException:
        db.close()
        raise
    return db


class _TransactionThread:
    """A thread that runs the calls given to `run` one at a time, in order.

    The queue serializes the calls, so the connection needs no lock. A call
    cannot be cancelled once queued (trio's Abort.FAILED): a transaction that
    has started always finishes and its caller always learns the outcome.
    """

    def __init__(self) -> None:
        # (function, args, deliver the outcome), or None to stop
        self._jobs: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], Callable[[Any], None]] | None]
        self._jobs = queue.SimpleQueue()
        self.running = True
        threading.Thread(target=self._serve, name="dfsfuse-sqlite", daemon=True).start()

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            function, args, deliver = job
            with contextlib.suppress(trio.RunFinishedError):  # the caller's trio run was torn down
                deliver(outcome.capture(function, *args))

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        if not self.running:
            raise trio.ClosedResourceError("the metadata store is closed")
        await trio.lowlevel.checkpoint_if_cancelled()
        task = trio.lowlevel.current_task()
        token = trio.lowlevel.current_trio_token()

        def deliver(result: outcome.Outcome[T]) -> None:
            token.run_sync_soon(trio.lowlevel.reschedule, task, result)

        self._jobs.put((function, args, deliver))
        result: T = await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
        return result

    def stop(self) -> None:
        """End the thread once the calls already queued are done."""
        self.running = False
        self._jobs.put(None)


class SqliteMetadata(MetadataStore):
    """The MetadataStore of one SQLite database file; see the module docstring."""

    def __init__(self, db: sqlite3.Connection):
        """Take over an open connection made by `open` (use that instead)."""
        self._db = db
        self._thread = _TransactionThread()

    @classmethod
    async def open(cls, path: str) -> SqliteMetadata:
        """Open the database at `path`, creating it with a root directory if new."""
        return cls(await trio.to_thread.run_sync(_connect, path))

    async def _read(self, body: Callable[..., T], *args: Any) -> T:
        return await self._thread.run(_transaction, self._db, "BEGIN", body, args)

    async def _write(self, body: Callable[..., T], *args: Any) -> T:
        return await self._thread.run(_transaction, self._db, "BEGIN IMMEDIATE", body, args)

    # -- inodes and names -------------------------------------------------
    async def getattr(self, inode: int) -> InodeAttrs:
        return await self._read(_inode_attrs, inode)

    async def lookup(self, parent: int, name: bytes) -> InodeAttrs:
        return await self._read(_lookup, parent, name)

    async def create(
        self,
        parent: int,
        name: bytes,
        mode: int,
        uid: int,
        gid: int,
        now_ns: int,
        rdev: int = 0,
        target: bytes = b"",
    ) -> EntryChange:
        return await self._write(_create, parent, name, mode, uid, gid, now_ns, rdev, target)

    async def link(self, inode: int, new_parent: int, new_name: bytes, now_ns: int) -> EntryChange:
        return await self._write(_link, inode, new_parent, new_name, now_ns)

    async def unlink(self, parent: int, name: bytes, now_ns: int) -> EntryChange:
        return await self._write(_unlink, parent, name, now_ns)

    async def rmdir(self, parent: int, name: bytes, now_ns: int) -> EntryChange:
        return await self._write(_rmdir, parent, name, now_ns)

    async def rename(
        self,
        old_parent: int,
        old_name: bytes,
        new_parent: int,
        new_name: bytes,
        flags: int,
        now_ns: int,
    ) -> RenameChange | None:
        return await self._write(_rename, old_parent, old_name, new_parent, new_name, flags, now_ns)

    async def setattr(self, inode: int, changes: AttrChanges, now_ns: int) -> InodeAttrs:
        return await self._write(_setattr, inode, changes, now_ns)

    async def readdir(self, parent: int, after: int, limit: int) -> list[DirEntry]:
        return await self._read(_readdir, parent, after, limit)

    async def delete_inodes(self, inodes: Sequence[int]) -> None:
        await self._write(_delete_inodes, list(inodes))

    async def orphan_inodes(self) -> list[int]:
        return await self._read(_orphan_inodes)

    # -- file contents ----------------------------------------------------
    async def shard_map(self, inode: int) -> Mapping[int, ShardLayers]:
        return await self._read(_shard_map, inode)

    async def commit_shards(
        self,
        inode: int,
        shards: Mapping[int, ShardRef],
        size: int,
        drop_from: int | None = None,
        mtime_ns: int | None = None,
        ctime_ns: int | None = None,
        *,
        changes: AttrChanges | None = None,
    ) -> InodeAttrs:
        return await self._write(_commit_shards, inode, dict(shards), size, drop_from, mtime_ns, ctime_ns, changes)

    async def allocate_shard_ids(self, count: int) -> range:
        if count < 0:
            raise InvalidArgument(f"cannot allocate {count} shard ids")
        return await self._thread.run(_allocate_shard_ids_durably, self._db, count)

    async def layout(self, shard_size: int, block_size: int) -> tuple[int, int]:
        return await self._write(_layout, shard_size, block_size)

    async def garbage(self, limit: int) -> list[tuple[int, tuple[str, ...]]]:
        return await self._read(_garbage, limit)

    async def forget_garbage(self, shard_ids: Sequence[int]) -> None:
        await self._write(_forget_garbage, list(shard_ids))

    async def shards(self, after_shard_id: int, limit: int) -> list[ShardRecord]:
        return await self._read(_shards, after_shard_id, limit)

    async def set_shard_nodes(self, shard_id: int, nodes: tuple[str, ...]) -> None:
        await self._write(_set_shard_nodes, shard_id, tuple(nodes))

    async def usage(self) -> UsageCounts:
        return await self._read(_usage)

    # -- extended attributes ----------------------------------------------
    async def setxattr(self, inode: int, name: bytes, value: bytes, flags: int, now_ns: int) -> InodeAttrs:
        return await self._write(_setxattr, inode, name, value, flags, now_ns)

    async def getxattr(self, inode: int, name: bytes) -> bytes:
        return await self._read(_getxattr, inode, name)

    async def listxattr(self, inode: int) -> list[bytes]:
        return await self._read(_listxattr, inode)

    async def removexattr(self, inode: int, name: bytes, now_ns: int) -> InodeAttrs:
        return await self._write(_removexattr, inode, name, now_ns)

    # -- the node registry -------------------------------------------------
    async def nodes(self) -> list[NodeRecord]:
        return await self._read(_nodes)

    async def add_node(self, name: str, address: str) -> NodeRecord:
        return await self._write(_add_node, name, address)

    async def set_node_state(self, name: str, state: str) -> None:
        if state not in NODE_STATES:
            raise InvalidArgument(f"unknown node state {state!r}")
        await self._write(_update_node, name, "state = ?", (state,))

    async def record_node_stat(self, name: str, capacity: int, used: int, shards: int, seen_ns: int) -> None:
        await self._write(
            _update_node, name, "capacity = ?, used = ?, shard_count = ?, last_seen_ns = ?",
            (capacity, used, shards, seen_ns),
        )

    async def remove_node(self, name: str) -> None:
        await self._write(_remove_node, name)

    # -- lifecycle --------------------------------------------------------
    async def snapshot(self) -> bytes:
        """A dump whose payload is a database image (see _database_image)."""
        return await self._thread.run(_dump, self._db)

    async def sync(self) -> None:
        await self._thread.run(_checkpoint, self._db)

    async def close(self) -> None:
        if self._thread.running:
            await self._thread.run(self._db.close)
            self._thread.stop()


# -- dumps ------------------------------------------------------------------
# dfsfuse.metadata.engines reaches these through the engine name ENGINE_NAME.


@contextlib.asynccontextmanager
async def load_dump(path: Path, dump: Dump) -> AsyncIterator[SqliteMetadata]:
    """Create the database at `path` from `dump`, all or nothing.

    The database is written under a temporary name (`path` + STAGED_SUFFIX)
    and opened for the caller's block to finish it (restore moves the shard
    id counter on); only when the block ends without an error is it made
    durable and renamed to `path`. So until then, and if anything fails or
    the process dies, there is nothing at `path`. UserError if `path` exists
    (a dump only ever makes new metadata) or the dump is not a SQLite one.
    """
    _check_loadable(dump)
    if path.exists():
        raise UserError(f"{path} exists already: a metadata dump is loaded only into new metadata")
    staged = path.with_name(path.name + STAGED_SUFFIX)
    try:
        await trio.to_thread.run_sync(_write_staged, staged, dump.payload)
        meta = SqliteMetadata(await _dump_database(trio.to_thread.run_sync(_connect, str(staged))))
        try:
            yield meta
            await meta.sync()
        finally:
            with trio.CancelScope(shield=True):
                await meta.close()
        await trio.to_thread.run_sync(_install, staged, path)
    finally:
        _remove_staged(staged)


@contextlib.asynccontextmanager
async def open_dump(dump: Dump) -> AsyncIterator[SqliteMetadata]:
    """The metadata in `dump`, in memory: changes go nowhere, and it is gone at the end."""
    _check_loadable(dump)
    meta = SqliteMetadata(await _dump_database(trio.to_thread.run_sync(_connect_image, dump.payload)))
    try:
        yield meta
    finally:
        with trio.CancelScope(shield=True):
            await meta.close()


def _check_loadable(dump: Dump) -> None:
    if dump.engine != ENGINE_NAME:
        raise UserError(f"a dump of metadata engine {dump.engine!r} cannot be loaded into {ENGINE_NAME}")


async def _dump_database(connecting: Awaitable[sqlite3.Connection]) -> sqlite3.Connection:
    """The connection to a dump's database; a UserError if it is no database."""
    try:
        return await connecting
    except sqlite3.DatabaseError as error:
        raise UserError(f"the metadata dump holds no SQLite database that opens: {error}") from None


def _write_staged(staged: Path, payload: bytes) -> None:
    _remove_staged(staged)  # a WAL left by a load cut short must not be applied to this one
    staged.write_bytes(payload)


def _remove_staged(staged: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        staged.with_name(staged.name + suffix).unlink(missing_ok=True)


def _install(staged: Path, path: Path) -> None:
    """Rename the finished database into place, durably."""
    fsync_file(staged)
    if path.exists():
        raise UserError(f"{path} appeared while a metadata dump was loaded; nothing loaded")
    os.rename(staged, path)
    fsync_dir(path.parent)


# -- transaction bodies ---------------------------------------------------
# Each function below runs inside one transaction on the worker thread; an
# exception rolls the whole transaction back.

# The columns of an inode row in InodeAttrs field order, so that
# InodeAttrs(*row) builds the attributes; `blocks` is computed here.
_ATTR_COLUMNS = (
    "{t}id, {t}mode, {t}nlink, {t}uid, {t}gid, {t}rdev, {t}size, ({t}stored_bytes + 511) / 512,"
    " {t}atime_ns, {t}mtime_ns, {t}ctime_ns, {t}target"
)
_ATTRS = _ATTR_COLUMNS.format(t="")
_ATTRS_OF_I = _ATTR_COLUMNS.format(t="i.")


def _encode_nodes(nodes: Sequence[str]) -> str:
    return json.dumps(list(nodes))


def _decode_nodes(text: str) -> tuple[str, ...]:
    return tuple(json.loads(text))


def _inode_exists(db: sqlite3.Connection, inode: int) -> bool:
    return db.execute("SELECT 1 FROM inodes WHERE id = ?", (inode,)).fetchone() is not None


def _inode_attrs(db: sqlite3.Connection, inode: int) -> InodeAttrs:
    row = db.execute(f"SELECT {_ATTRS} FROM inodes WHERE id = ?", (inode,)).fetchone()
    if row is None:
        raise NotFound(f"no inode {inode}")
    return InodeAttrs(*row)


def _update_inode(db: sqlite3.Connection, inode: int, assignments: str, params: Sequence[Any]) -> InodeAttrs:
    """Apply `assignments` (SQL "column = ?, ...") to the inode; its attrs after."""
    row = db.execute(
        f"UPDATE inodes SET {assignments} WHERE id = ? RETURNING {_ATTRS}", (*params, inode)
    ).fetchone()
    if row is None:
        raise NotFound(f"no inode {inode}")
    return InodeAttrs(*row)


def _require_directory(db: sqlite3.Connection, inode: int, *, live: bool = True) -> None:
    """NotFound unless `inode` exists (and, if `live`, still has a name); NotADirectory
    unless it is a directory."""
    row = db.execute("SELECT mode, nlink FROM inodes WHERE id = ?", (inode,)).fetchone()
    if row is None or (live and row[1] == 0):
        raise NotFound(f"no directory {inode}")
    if not stat.S_ISDIR(row[0]):
        raise NotADirectory(f"inode {inode} is not a directory")


def _touch_directory(db: sqlite3.Connection, directory: int, now_ns: int, nlink_delta: int) -> InodeAttrs:
    """A live directory's entries changed: set its mtime and ctime, adjust its
    nlink; its attrs after."""
    row = db.execute(
        "UPDATE inodes SET nlink = nlink + ?, mtime_ns = ?, ctime_ns = ?"
        f" WHERE id = ? AND nlink > 0 AND mode & ? = ? RETURNING {_ATTRS}",
        (nlink_delta, now_ns, now_ns, directory, FILE_TYPE_BITS, stat.S_IFDIR),
    ).fetchone()
    if row is None:
        _require_directory(db, directory)  # raises: only a missing, removed or non-directory misses
    return InodeAttrs(*row)


def _entry(db: sqlite3.Connection, parent: int, name: bytes) -> tuple[int, InodeAttrs] | None:
    """(entry id, attrs of the inode named) for `name` in `parent`, or None."""
    row = db.execute(
        f"SELECT e.id, {_ATTRS_OF_I} FROM entries e JOIN inodes i ON i.id = e.inode"
        " WHERE e.parent = ? AND e.name = ?",
        (parent, name),
    ).fetchone()
    return None if row is None else (row[0], InodeAttrs(*row[1:]))


def _existing_entry(db: sqlite3.Connection, parent: int, name: bytes) -> tuple[int, InodeAttrs]:
    found = _entry(db, parent, name)
    if found is None:
        _require_directory(db, parent)
        raise NotFound(f"no {name!r} in directory {parent}")
    return found


def _add_entry(db: sqlite3.Connection, parent: int, name: bytes, inode: int) -> int:
    """Name `inode` in `parent`; the new entry's id (its readdir offset)."""
    try:
        entry_id = db.execute(
            "INSERT INTO entries (parent, name, inode) VALUES (?, ?, ?)", (parent, name, inode)
        ).lastrowid
    except sqlite3.IntegrityError:
        raise Exists(f"{name!r} exists in directory {parent}") from None
    assert entry_id is not None
    return entry_id


def _has_entries(db: sqlite3.Connection, directory: int) -> bool:
    return db.execute("SELECT 1 FROM entries WHERE parent = ? LIMIT 1", (directory,)).fetchone() is not None


def _directory_parent(db: sqlite3.Connection, directory: int) -> int:
    return int(db.execute("SELECT parent FROM inodes WHERE id = ?", (directory,)).fetchone()[0])


def _is_within(db: sqlite3.Connection, directory: int, ancestor: int) -> bool:
    """Whether `directory` is `ancestor` or lies somewhere below it."""
    while directory != ancestor:
        if directory == ROOT_INODE:
            return False
        directory = _directory_parent(db, directory)
    return True


def _lookup(db: sqlite3.Connection, parent: int, name: bytes) -> InodeAttrs:
    if name == b"." or name == b"..":
        _require_directory(db, parent)
        return _inode_attrs(db, parent if name == b"." else _directory_parent(db, parent))
    return _existing_entry(db, parent, name)[1]


def _create(
    db: sqlite3.Connection,
    parent: int,
    name: bytes,
    mode: int,
    uid: int,
    gid: int,
    now_ns: int,
    rdev: int,
    target: bytes,
) -> EntryChange:
    check_name(name)
    is_directory = stat.S_ISDIR(mode)
    if not stat.S_ISLNK(mode):
        target = b""
    parent_attrs = _touch_directory(db, parent, now_ns, 1 if is_directory else 0)
    nlink = 2 if is_directory else 1
    size = len(target)
    inode = db.execute(
        "INSERT INTO inodes (mode, nlink, uid, gid, rdev, size, stored_bytes, atime_ns, mtime_ns, ctime_ns,"
        " target, parent) VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?, ?)",
        (mode, nlink, uid, gid, rdev, size, now_ns, now_ns, now_ns, target, parent if is_directory else None),
    ).lastrowid
    assert inode is not None
    offset = _add_entry(db, parent, name, inode)
    attrs = InodeAttrs(inode, mode, nlink, uid, gid, rdev, size, 0, now_ns, now_ns, now_ns, target)
    xattrs = _inherit_replicas(db, parent, inode) if is_directory or stat.S_ISREG(mode) else {}
    return EntryChange(attrs, parent_attrs, offset, xattrs)


def _inherit_replicas(db: sqlite3.Connection, parent: int, inode: int) -> dict[bytes, bytes]:
    """Give a new inode the REPLICAS_XATTR of its directory, if it has one; the xattrs given."""
    row = db.execute(
        "INSERT INTO xattrs (inode, name, value) SELECT ?, name, value FROM xattrs"
        " WHERE inode = ? AND name = ? RETURNING value",
        (inode, parent, REPLICAS_XATTR),
    ).fetchone()
    return {} if row is None else {REPLICAS_XATTR: row[0]}


def _link(db: sqlite3.Connection, inode: int, new_parent: int, new_name: bytes, now_ns: int) -> EntryChange:
    check_name(new_name)
    attrs = _inode_attrs(db, inode)
    if stat.S_ISDIR(attrs.mode):
        raise NotPermitted(f"inode {inode} is a directory and cannot be hard-linked")
    if attrs.nlink == 0:
        raise NotFound(f"inode {inode} has no name left to link to")  # as linkat(2) says
    parent_attrs = _touch_directory(db, new_parent, now_ns, 0)
    offset = _add_entry(db, new_parent, new_name, inode)
    attrs = _update_inode(db, inode, "nlink = nlink + 1, ctime_ns = ?", (now_ns,))
    return EntryChange(attrs, parent_attrs, offset)


def _unlink(db: sqlite3.Connection, parent: int, name: bytes, now_ns: int) -> EntryChange:
    entry_id, attrs = _existing_entry(db, parent, name)
    if stat.S_ISDIR(attrs.mode):
        raise IsADirectory(f"{name!r} in directory {parent} is a directory")
    db.execute("DELETE FROM entries WHERE id = ?", (entry_id,))
    parent_attrs = _touch_directory(db, parent, now_ns, 0)
    attrs = _update_inode(db, attrs.inode, "nlink = nlink - 1, ctime_ns = ?", (now_ns,))
    return EntryChange(attrs, parent_attrs, entry_id)


def _rmdir(db: sqlite3.Connection, parent: int, name: bytes, now_ns: int) -> EntryChange:
    entry_id, attrs = _existing_entry(db, parent, name)
    if not stat.S_ISDIR(attrs.mode):
        raise NotADirectory(f"{name!r} in directory {parent} is not a directory")
    if _has_entries(db, attrs.inode):
        raise NotEmpty(f"directory {attrs.inode} is not empty")
    db.execute("DELETE FROM entries WHERE id = ?", (entry_id,))
    parent_attrs = _touch_directory(db, parent, now_ns, -1)
    attrs = _update_inode(db, attrs.inode, "nlink = 0, ctime_ns = ?", (now_ns,))
    return EntryChange(attrs, parent_attrs, entry_id)


def _rename(
    db: sqlite3.Connection,
    old_parent: int,
    old_name: bytes,
    new_parent: int,
    new_name: bytes,
    flags: int,
    now_ns: int,
) -> RenameChange | None:
    if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == RENAME_NOREPLACE | RENAME_EXCHANGE:
        raise InvalidArgument(f"invalid rename flags {flags:#x}")
    check_name(new_name)
    source_entry, source = _existing_entry(db, old_parent, old_name)
    target = _entry(db, new_parent, new_name)
    if target is None:
        _require_directory(db, new_parent)
        if flags & RENAME_EXCHANGE:
            raise NotFound(f"no {new_name!r} in directory {new_parent} to exchange with")
    elif flags & RENAME_NOREPLACE:
        raise Exists(f"{new_name!r} exists in directory {new_parent}")
    if target is not None and target[1].inode == source.inode:
        return None
    source_is_directory = stat.S_ISDIR(source.mode)
    if source_is_directory and new_parent != old_parent and _is_within(db, new_parent, source.inode):
        raise InvalidArgument(f"cannot move directory {source.inode} into itself")

    # The nlink change of each parent; one key when both are the same.
    nlink_deltas = {old_parent: 0, new_parent: 0}

    def move_directory(directory: int, origin: int, destination: int) -> None:
        if origin != destination:
            db.execute("UPDATE inodes SET parent = ? WHERE id = ?", (destination, directory))
            nlink_deltas[origin] -= 1
            nlink_deltas[destination] += 1

    exchanged = replaced = None
    if flags & RENAME_EXCHANGE:
        assert target is not None
        target_entry, other = target
        other_is_directory = stat.S_ISDIR(other.mode)
        if other_is_directory and old_parent != new_parent and _is_within(db, old_parent, other.inode):
            raise InvalidArgument(f"cannot move directory {other.inode} into itself")
        db.execute("UPDATE entries SET inode = ? WHERE id = ?", (other.inode, source_entry))
        db.execute("UPDATE entries SET inode = ? WHERE id = ?", (source.inode, target_entry))
        if other_is_directory:
            move_directory(other.inode, new_parent, old_parent)
        exchanged = _update_inode(db, other.inode, "ctime_ns = ?", (now_ns,))
        new_name_entry = target_entry
    else:
        if target is not None:
            replaced = _remove_rename_target(db, target, source_is_directory, now_ns)
            if source_is_directory:
                nlink_deltas[new_parent] -= 1
        db.execute("UPDATE entries SET parent = ?, name = ? WHERE id = ?", (new_parent, new_name, source_entry))
        new_name_entry = source_entry
    if source_is_directory:
        move_directory(source.inode, old_parent, new_parent)
    moved = _update_inode(db, source.inode, "ctime_ns = ?", (now_ns,))
    parents = tuple(
        _touch_directory(db, directory, now_ns, nlink_delta) for directory, nlink_delta in nlink_deltas.items()
    )
    return RenameChange(moved, exchanged, replaced, parents, new_name_entry)


def _remove_rename_target(
    db: sqlite3.Connection, target: tuple[int, InodeAttrs], source_is_directory: bool, now_ns: int
) -> InodeAttrs:
    """Remove the name a rename replaces; the replaced inode's attrs after."""
    target_entry, victim = target
    if source_is_directory:
        if not stat.S_ISDIR(victim.mode):
            raise NotADirectory(f"cannot replace non-directory {victim.inode} with a directory")
        if _has_entries(db, victim.inode):
            raise NotEmpty(f"directory {victim.inode} is not empty")
        nlink = 0
    else:
        if stat.S_ISDIR(victim.mode):
            raise IsADirectory(f"cannot replace directory {victim.inode} with a non-directory")
        nlink = victim.nlink - 1
    db.execute("DELETE FROM entries WHERE id = ?", (target_entry,))
    return _update_inode(db, victim.inode, "nlink = ?, ctime_ns = ?", (nlink, now_ns))


def _setattr(db: sqlite3.Connection, inode: int, changes: AttrChanges, now_ns: int) -> InodeAttrs:
    assignments: list[str] = []
    params: list[Any] = []
    _add_attr_changes(assignments, params, changes, now_ns)
    return _update_inode(db, inode, ", ".join(assignments), params)


def _add_attr_changes(assignments: list[str], params: list[Any], changes: AttrChanges, now_ns: int) -> None:
    """Add what setattr(changes, now_ns) assigns to an UPDATE's assignments."""
    assignments.append("ctime_ns = ?")
    params.append(now_ns)
    if changes.mode is not None:
        assignments.append("mode = (mode & ?) | ?")
        params += [FILE_TYPE_BITS, changes.mode & 0o7777]
    for column in ("uid", "gid", "atime_ns", "mtime_ns"):
        value = getattr(changes, column)
        if value is not None:
            assignments.append(f"{column} = ?")
            params.append(value)


def _readdir(db: sqlite3.Connection, parent: int, after: int, limit: int) -> list[DirEntry]:
    rows = db.execute(
        f"SELECT e.id, e.name, {_ATTRS_OF_I} FROM entries e JOIN inodes i ON i.id = e.inode"
        " WHERE e.parent = ? AND e.id > ? ORDER BY e.id LIMIT ?",
        (parent, after, max(limit, 0)),
    ).fetchall()
    if not rows:
        _require_directory(db, parent, live=False)  # a removed directory lists as empty
    return [DirEntry(row[1], InodeAttrs(*row[2:]), row[0]) for row in rows]


def _delete_inodes(db: sqlite3.Connection, inodes: list[int]) -> None:
    for inode in inodes:
        row = db.execute("SELECT nlink FROM inodes WHERE id = ?", (inode,)).fetchone()
        if row is None or row[0] > 0:
            continue
        db.execute("INSERT INTO garbage (shard_id, nodes) SELECT id, nodes FROM shards WHERE inode = ?", (inode,))
        db.execute("DELETE FROM shards WHERE inode = ?", (inode,))
        db.execute("DELETE FROM xattrs WHERE inode = ?", (inode,))
        db.execute("DELETE FROM inodes WHERE id = ?", (inode,))


def _orphan_inodes(db: sqlite3.Connection) -> list[int]:
    return [row[0] for row in db.execute("SELECT id FROM inodes WHERE nlink = 0 ORDER BY id")]


_SHARD_COLUMNS = "id, length, checksum, nodes, pages"


def _shard_ref(row: Sequence[Any]) -> ShardRef:
    """A ShardRef from the columns _SHARD_COLUMNS, in that order."""
    return ShardRef(row[0], row[1], row[2], _decode_nodes(row[3]), _decode_pages(row[4]))


def _encode_pages(pages: tuple[int, ...]) -> bytes | None:
    return struct.pack(f"<{len(pages)}I", *pages) if pages else None


def _decode_pages(blob: bytes | None) -> tuple[int, ...]:
    return struct.unpack(f"<{len(blob) // 4}I", blob) if blob else ()


def _shard_map(db: sqlite3.Connection, inode: int) -> dict[int, ShardLayers]:
    rows = db.execute(
        f"SELECT idx, {_SHARD_COLUMNS} FROM shards WHERE inode = ? ORDER BY idx, pages IS NOT NULL, id", (inode,)
    ).fetchall()
    if not rows and not _inode_exists(db, inode):
        raise NotFound(f"no inode {inode}")
    layers: dict[int, list[ShardRef]] = {}
    for row in rows:
        layers.setdefault(row[0], []).append(_shard_ref(row[1:]))
    return {index: tuple(refs) for index, refs in layers.items()}


def _commit_shards(
    db: sqlite3.Connection,
    inode: int,
    shards: dict[int, ShardRef],
    size: int,
    drop_from: int | None,
    mtime_ns: int | None,
    ctime_ns: int | None,
    changes: AttrChanges | None,
) -> InodeAttrs:
    if changes is not None and ctime_ns is None:
        raise InvalidArgument("commit_shards with attr changes needs ctime_ns (the setattr's now_ns)")
    row = db.execute("SELECT mode FROM inodes WHERE id = ?", (inode,)).fetchone()
    if row is None:
        raise NotFound(f"no inode {inode}")
    if stat.S_ISDIR(row[0]):
        raise IsADirectory(f"inode {inode} is a directory")
    if not stat.S_ISREG(row[0]):
        raise InvalidArgument(f"inode {inode} is not a regular file")
    removed: list[tuple[int, int, str]] = []  # (shard id, length, nodes)
    if drop_from is not None:
        removed += db.execute(
            "DELETE FROM shards WHERE inode = ? AND idx >= ? RETURNING id, length, nodes", (inode, drop_from)
        ).fetchall()
    for index, ref in shards.items():
        if not ref.is_patch:
            removed += db.execute(
                "DELETE FROM shards WHERE inode = ? AND idx = ? RETURNING id, length, nodes", (inode, index)
            ).fetchall()
    try:
        db.executemany(
            "INSERT INTO shards (id, inode, idx, length, checksum, nodes, pages) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (ref.shard_id, inode, index, ref.length, ref.checksum, _encode_nodes(ref.nodes), _encode_pages(ref.pages))
                for index, ref in shards.items()
            ],
        )
    except sqlite3.IntegrityError:
        raise InvalidArgument(f"a shard id committed to inode {inode} is already in use") from None
    kept = {ref.shard_id for ref in shards.values()}
    db.executemany(
        "INSERT INTO garbage (shard_id, nodes) VALUES (?, ?)",
        [(shard_id, nodes) for shard_id, _, nodes in removed if shard_id not in kept],
    )
    stored_delta = sum(ref.length for ref in shards.values()) - sum(length for _, length, _ in removed)
    assignments = ["size = ?", "stored_bytes = stored_bytes + ?"]
    params: list[Any] = [size, stored_delta]
    if mtime_ns is not None:
        assignments.append("mtime_ns = ?")
        params.append(mtime_ns)
    if ctime_ns is not None:
        _add_attr_changes(assignments, params, changes or AttrChanges(), ctime_ns)
    return _update_inode(db, inode, ", ".join(assignments), params)


def _allocate_shard_ids(db: sqlite3.Connection, count: int) -> range:
    end = db.execute(
        "UPDATE meta SET value = value + ? WHERE key = 'next_shard_id' RETURNING value", (count,)
    ).fetchone()[0]
    return range(end - count, end)


def _allocate_shard_ids_durably(db: sqlite3.Connection, count: int) -> range:
    """Allocate in a transaction whose commit syncs the WAL (synchronous=FULL)."""
    db.execute("PRAGMA synchronous = FULL")
    try:
        return _transaction(db, "BEGIN IMMEDIATE", _allocate_shard_ids, (count,))
    finally:
        db.execute("PRAGMA synchronous = NORMAL")


def _layout(db: sqlite3.Connection, shard_size: int, block_size: int) -> tuple[int, int]:
    for key, value in (("shard_size", shard_size), ("block_size", block_size)):
        db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)", (key, value))
    rows = dict(db.execute("SELECT key, value FROM meta WHERE key IN ('shard_size', 'block_size')"))
    return rows["shard_size"], rows["block_size"]


def _garbage(db: sqlite3.Connection, limit: int) -> list[tuple[int, tuple[str, ...]]]:
    rows = db.execute("SELECT shard_id, nodes FROM garbage ORDER BY shard_id LIMIT ?", (max(limit, 0),))
    return [(row[0], _decode_nodes(row[1])) for row in rows]


def _forget_garbage(db: sqlite3.Connection, shard_ids: list[int]) -> None:
    db.executemany("DELETE FROM garbage WHERE shard_id = ?", [(shard_id,) for shard_id in shard_ids])


def _shards(db: sqlite3.Connection, after_shard_id: int, limit: int) -> list[ShardRecord]:
    rows = db.execute(
        f"SELECT inode, idx, {_SHARD_COLUMNS} FROM shards WHERE id > ? ORDER BY id LIMIT ?",
        (after_shard_id, max(limit, 0)),
    )
    return [ShardRecord(row[0], row[1], _shard_ref(row[2:])) for row in rows]


def _set_shard_nodes(db: sqlite3.Connection, shard_id: int, nodes: tuple[str, ...]) -> None:
    cursor = db.execute("UPDATE shards SET nodes = ? WHERE id = ?", (_encode_nodes(nodes), shard_id))
    if cursor.rowcount == 0:
        raise NotFound(f"no live shard {shard_id}")


def _usage(db: sqlite3.Connection) -> UsageCounts:
    inodes, logical_bytes, stored_bytes = db.execute(
        "SELECT COUNT(*), COALESCE(SUM(CASE WHEN mode & ? = ? THEN size ELSE 0 END), 0),"
        " COALESCE(SUM(stored_bytes), 0) FROM inodes",
        (FILE_TYPE_BITS, stat.S_IFREG),
    ).fetchone()
    (shards,) = db.execute("SELECT COUNT(*) FROM shards").fetchone()
    return UsageCounts(inodes, logical_bytes, stored_bytes, shards)


def _setxattr(
    db: sqlite3.Connection, inode: int, name: bytes, value: bytes, flags: int, now_ns: int
) -> InodeAttrs:
    attrs = _update_inode(db, inode, "ctime_ns = ?", (now_ns,))
    present = db.execute("SELECT 1 FROM xattrs WHERE inode = ? AND name = ?", (inode, name)).fetchone()
    if flags & XATTR_CREATE and present:
        raise Exists(f"inode {inode} already has xattr {name!r}")
    if flags & XATTR_REPLACE and not present:
        raise NoData(f"inode {inode} has no xattr {name!r}")
    db.execute(
        "INSERT INTO xattrs (inode, name, value) VALUES (?, ?, ?)"
        " ON CONFLICT (inode, name) DO UPDATE SET value = excluded.value",
        (inode, name, value),
    )
    return attrs


def _getxattr(db: sqlite3.Connection, inode: int, name: bytes) -> bytes:
    row = db.execute("SELECT value FROM xattrs WHERE inode = ? AND name = ?", (inode, name)).fetchone()
    if row is None:
        if not _inode_exists(db, inode):
            raise NotFound(f"no inode {inode}")
        raise NoData(f"inode {inode} has no xattr {name!r}")
    value: bytes = row[0]
    return value


def _listxattr(db: sqlite3.Connection, inode: int) -> list[bytes]:
    names = [row[0] for row in db.execute("SELECT name FROM xattrs WHERE inode = ? ORDER BY name", (inode,))]
    if not names and not _inode_exists(db, inode):
        raise NotFound(f"no inode {inode}")
    return names


def _removexattr(db: sqlite3.Connection, inode: int, name: bytes, now_ns: int) -> InodeAttrs:
    attrs = _update_inode(db, inode, "ctime_ns = ?", (now_ns,))
    cursor = db.execute("DELETE FROM xattrs WHERE inode = ? AND name = ?", (inode, name))
    if cursor.rowcount == 0:
        raise NoData(f"inode {inode} has no xattr {name!r}")
    return attrs


_NODE_COLUMNS = "name, address, state, capacity, used, shard_count, last_seen_ns"


def _nodes(db: sqlite3.Connection) -> list[NodeRecord]:
    return [NodeRecord(*row) for row in db.execute(f"SELECT {_NODE_COLUMNS} FROM nodes ORDER BY name")]


def _add_node(db: sqlite3.Connection, name: str, address: str) -> NodeRecord:
    try:
        db.execute("INSERT INTO nodes (name, address, state) VALUES (?, ?, ?)", (name, address, NODE_ACTIVE))
    except sqlite3.IntegrityError:
        raise Exists(f"node {name!r} is already registered") from None
    return NodeRecord(name, address, NODE_ACTIVE)


def _update_node(db: sqlite3.Connection, name: str, assignments: str, params: Sequence[Any]) -> None:
    cursor = db.execute(f"UPDATE nodes SET {assignments} WHERE name = ?", (*params, name))
    if cursor.rowcount == 0:
        raise NotFound(f"no node {name!r}")


def _remove_node(db: sqlite3.Connection, name: str) -> None:
    if db.execute("DELETE FROM nodes WHERE name = ?", (name,)).rowcount == 0:
        raise NotFound(f"no node {name!r}")


def _dump(db: sqlite3.Connection) -> bytes:
    """The dump MetadataStore.snapshot returns: a database image in an envelope,
    both made here so the trio loop copies nothing."""
    return encode_dump(ENGINE_NAME, _database_image(db))


def _database_image(db: sqlite3.Connection) -> bytes:
    """The database as of one instant, as one self-contained file image.

    The backup API copies every page in one step under one read transaction,
    so the image is consistent; it runs on the engine's thread, between two
    calls, so no transaction of ours is half done. Copied into a connection
    in memory, the image carries no WAL, but its header still says WAL mode
    (_connect_image minds that).
    """
    image = sqlite3.connect(":memory:")
    try:
        db.backup(image)
        return image.serialize()
    finally:
        image.close()


def _checkpoint(db: sqlite3.Connection) -> None:
    """Make every committed transaction durable.

    A FULL checkpoint syncs the WAL, copies it into the database file and
    syncs that file (synchronous=NORMAL in WAL mode syncs around checkpoints),
    so afterwards every commit is on stable storage, and the WAL can restart
    from its beginning. `busy` means another process's read kept the
    checkpoint from finishing.
    """
    busy, _, _ = db.execute("PRAGMA wal_checkpoint(FULL)").fetchone()
    if busy:
        raise DataError("the metadata database could not be checkpointed: another process is using it")
