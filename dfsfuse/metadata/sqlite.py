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

_SCHEMA_V1 to _SCHEMA_V7 below are the only definition of the tables (V2, V4,
V5 and V7 add to the ones before, V3 and V6 replace the shards table and V6 adds), and their comments are
the reference for what each column holds (docs/formats.md mirrors them).
"""

from __future__ import annotations

import contextlib
import os
import queue
import sqlite3
import threading
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from pathlib import Path
from typing import Any, TypeVar

import outcome
import trio

from dfsfuse.durable import fsync_dir, fsync_file
from dfsfuse.errors import DataError, UserError
from dfsfuse.metadata.dump import Dump, encode_dump
from dfsfuse.metadata.sql import SqlMetadata, create_root, replace_rows

ENGINE_NAME = "sqlite"  # config [metadata] engine, and the engine named in its dumps
STAGED_SUFFIX = ".restoring"  # load_dump builds the database under this name
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
    -- on top of the whole shard (in layer order since schema 5); a new whole
    -- shard replaces them.
    pages    BLOB
);
INSERT INTO shards_v3 (id, inode, idx, length, checksum, nodes)
    SELECT id, inode, idx, length, checksum, nodes FROM shards;
DROP TABLE shards;
ALTER TABLE shards_v3 RENAME TO shards;
-- shard_map and commit_shards: the objects of one file, index by index.
CREATE INDEX shards_by_index ON shards (inode, idx);
"""
_SCHEMA_V4 = """
-- The file a garbage shard came from (inodes.id; the inode may be gone), so
-- that its replicas stay while another session holds the file open and may
-- still read them through the shard map it has. NULL in rows from before.
ALTER TABLE garbage ADD COLUMN inode INTEGER;
-- When it became garbage, ns since the epoch by the engine's clock.
ALTER TABLE garbage ADD COLUMN since_ns INTEGER NOT NULL DEFAULT 0;

-- The mounts using the file system, one row per mount while it runs. On one
-- machine with the embedded engine there is at most one (the data dir's
-- lock); the networked engine has one per mount on any machine.
CREATE TABLE sessions (
    -- Never reused, so a session reclaimed as stale stays reclaimed.
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    -- Where the mount runs: host name, process id, mount point.
    host         TEXT NOT NULL,
    pid          INTEGER NOT NULL,
    mountpoint   TEXT NOT NULL,
    -- When it registered, and when it last said it is alive, in ns since the
    -- epoch by the engine's clock. A session whose heartbeat is older than
    -- the session timeout is stale: the next live mount reclaims it, with
    -- its open_files and locks rows.
    started_ns   INTEGER NOT NULL,
    heartbeat_ns INTEGER NOT NULL,
    -- The session has applied every change other sessions committed before
    -- this (a barrier: dfsfuse/metadata/notices.py); 0: not known. Garbage
    -- of a file it holds open waits until this passes since_ns + SETTLE_NS.
    synced_ns    INTEGER NOT NULL DEFAULT 0
);

-- Files a session holds open. An unlinked inode is deleted only when no
-- session holds it open; garbage shards of a file held open by another
-- session wait. Only shared engines record them (MetadataStore.shared).
CREATE TABLE open_files (
    session INTEGER NOT NULL,  -- sessions.id
    inode   INTEGER NOT NULL,  -- inodes.id
    PRIMARY KEY (session, inode)
) WITHOUT ROWID;
CREATE INDEX open_files_by_inode ON open_files (inode);

-- Byte-range (fcntl) and whole-file (flock) locks, shared by every mount,
-- held by a lock owner of a session; they go with their session.
CREATE TABLE locks (
    session    INTEGER NOT NULL,  -- sessions.id
    inode      INTEGER NOT NULL,  -- inodes.id of the locked file
    -- The kernel's lock owner: one per process (fcntl) or per open file (flock).
    owner      INTEGER NOT NULL,
    -- 'posix' (fcntl/lockf) or 'flock'.
    kind       TEXT NOT NULL,
    -- 'read' (shared) or 'write' (exclusive).
    mode       TEXT NOT NULL,
    -- The bytes locked, first and last inclusive (whole file for flock).
    first_byte INTEGER NOT NULL,
    last_byte  INTEGER NOT NULL,
    -- The process that took it, as F_GETLK reports it.
    pid        INTEGER NOT NULL
);
CREATE INDEX locks_by_inode ON locks (inode);
"""
_SCHEMA_V5 = """
-- The order in which the objects of one shard index apply: each commit puts
-- its object above the others of the index (the largest layer there, plus
-- one), so patches apply in the order they were committed, whichever mount
-- committed them. Shard ids cannot order them: each mount takes its ids in
-- batches, so a later commit may carry a smaller id. Rows from before take
-- their id, the order one mount gave them.
ALTER TABLE shards ADD COLUMN layer INTEGER NOT NULL DEFAULT 0;
UPDATE shards SET layer = id;
"""
_SCHEMA_V6 = """
-- Flags of an inode, a bit set: 1 (INODE_READONLY in dfsfuse/metadata/base.py)
-- marks an inode of a read-only snapshot, which refuses every change with
-- EROFS; 2 (INODE_TRASH) the trash's directories and the files in them
-- (dfsfuse/metadata/trash.py, docs/formats.md "The trash"). 0 for every
-- inode from before.
ALTER TABLE inodes ADD COLUMN flags INTEGER NOT NULL DEFAULT 0;

-- Which entries name an inode: the path of a directory or file from its
-- inode (the original path of a file in the trash, the quota directories
-- above a file).
CREATE INDEX entries_by_inode ON entries (inode);

-- The shard maps again, now with a shard id in more than one file: a
-- snapshot shares its source's objects instead of copying them. An object's
-- rows all hold the same length, checksum, nodes and pages; it becomes
-- garbage when its last row goes. A shard id is in shards or in garbage,
-- never both, and at most once per file.
CREATE TABLE shards_v6 (
    id       INTEGER NOT NULL,
    inode    INTEGER NOT NULL,
    idx      INTEGER NOT NULL,
    length   INTEGER NOT NULL,
    checksum BLOB NOT NULL,
    nodes    TEXT NOT NULL,
    pages    BLOB,
    layer    INTEGER NOT NULL
);
INSERT INTO shards_v6 (id, inode, idx, length, checksum, nodes, pages, layer)
    SELECT id, inode, idx, length, checksum, nodes, pages, layer FROM shards;
DROP TABLE shards;
ALTER TABLE shards_v6 RENAME TO shards;
CREATE INDEX shards_by_index ON shards (inode, idx);
-- The files that share an object (garbage, repair), and one row per file.
CREATE UNIQUE INDEX shards_by_id ON shards (id, inode);

-- Directory quotas: limits on the bytes and inodes below a directory, and
-- what is used there now, kept in the transaction of every change of it.
CREATE TABLE quotas (
    -- inodes.id of the directory the quota is set on.
    dir         INTEGER PRIMARY KEY,
    -- The limits; NULL: no limit of that kind.
    max_bytes   INTEGER,
    max_inodes  INTEGER,
    -- The sum of the sizes of the regular files, and the number of inodes,
    -- below the directory (the directory itself not counted).
    used_bytes  INTEGER NOT NULL,
    used_inodes INTEGER NOT NULL
) WITHOUT ROWID;
"""
_SCHEMA_V7 = """
-- How an object's bytes are kept (dfsfuse/shards/encoding.py): compressed,
-- sealed, erasure coded. NULL: plain replicas of the object's bytes, as every
-- object was before. The same on every row of one id.
ALTER TABLE shards ADD COLUMN encoding TEXT;
-- The bytes of the object's payload (after compression and sealing, one
-- copy, before erasure coding); NULL: `length`, a plain object.
ALTER TABLE shards ADD COLUMN payload_length INTEGER;

-- Named values of the whole file system that are not integers (meta holds
-- those): the encryption keyring (dfsfuse/shards/sealing.py).
CREATE TABLE settings (
    name  TEXT PRIMARY KEY,
    value BLOB NOT NULL
) WITHOUT ROWID;
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
    create_root(_SqliteTransaction(db), os.getuid(), os.getgid(), time.time_ns())


def _add_schema_v2(db: sqlite3.Connection) -> None:
    for statement in _statements(_SCHEMA_V2):
        db.execute(statement)


def _add_schema_v3(db: sqlite3.Connection) -> None:
    for statement in _statements(_SCHEMA_V3):
        db.execute(statement)


def _add_schema_v4(db: sqlite3.Connection) -> None:
    for statement in _statements(_SCHEMA_V4):
        db.execute(statement)


def _add_schema_v5(db: sqlite3.Connection) -> None:
    for statement in _statements(_SCHEMA_V5):
        db.execute(statement)


def _add_schema_v6(db: sqlite3.Connection) -> None:
    for statement in _statements(_SCHEMA_V6):
        db.execute(statement)


def _add_schema_v7(db: sqlite3.Connection) -> None:
    for statement in _statements(_SCHEMA_V7):
        db.execute(statement)


# _MIGRATIONS[n] turns a database at schema version n - 1 (0: empty) into one
# at version n, inside the transaction that records version n.
_MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {
    1: _create_schema_v1,
    2: _add_schema_v2,
    3: _add_schema_v3,
    4: _add_schema_v4,
    5: _add_schema_v5,
    6: _add_schema_v6,
    7: _add_schema_v7,
}
SCHEMA_VERSION = max(_MIGRATIONS)


def _schema_version(db: sqlite3.Connection) -> int:
    if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone() is None:
        return 0
    row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return 0 if row is None else int(row[0])


def _transaction(db: sqlite3.Connection, begin: str, body: Callable[..., T], args: tuple[Any, ...]) -> T:
    """Run body(*args) as one transaction on `db`: all of it is committed, or none."""
    db.execute(begin)
    try:
        result = body(*args)
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
    while _transaction(db, "BEGIN IMMEDIATE", _migrate_one_version, (db, path)) < SCHEMA_VERSION:
        pass


def _write_durably(db: sqlite3.Connection, body: Callable[..., T], args: tuple[Any, ...]) -> T:
    """A write transaction whose commit syncs the WAL (synchronous=FULL)."""
    db.execute("PRAGMA synchronous = FULL")
    try:
        return _transaction(db, "BEGIN IMMEDIATE", body, args)
    finally:
        db.execute("PRAGMA synchronous = NORMAL")


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


class _SqliteTransaction:
    """The Transaction the shared bodies (dfsfuse.metadata.sql) see: the
    connection itself. Writes run one at a time (BEGIN IMMEDIATE on the one
    connection), so there are no row locks to take."""

    def __init__(self, db: sqlite3.Connection):
        self._db = db

    def execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        return self._db.execute(sql, params)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self._db.executemany(sql, rows)

    def lock_inodes(self, inodes: Iterable[int]) -> None:
        pass

    def clock_ns(self) -> int:
        return time.time_ns()  # one machine: its clock is the only one

    def changed(self, inode: int) -> None:
        pass  # not shared: nobody else to tell

    def changed_entry(self, parent: int, name: bytes) -> None:
        pass


class SqliteMetadata(SqlMetadata):
    """The MetadataStore of one SQLite database file; see the module docstring."""

    def __init__(self, db: sqlite3.Connection):
        """Take over an open connection made by `open` (use that instead)."""
        self._db = db
        self._tx = _SqliteTransaction(db)
        self._thread = _TransactionThread()

    @classmethod
    async def open(cls, path: str) -> SqliteMetadata:
        """Open the database at `path`, creating it with a root directory if new."""
        return cls(await trio.to_thread.run_sync(_connect, path))

    async def _read(self, body: Callable[..., T], *args: Any) -> T:
        return await self._thread.run(_transaction, self._db, "BEGIN", body, (self._tx, *args))

    async def _write(self, body: Callable[..., T], *args: Any) -> T:
        return await self._thread.run(_transaction, self._db, "BEGIN IMMEDIATE", body, (self._tx, *args))

    async def _write_durably(self, body: Callable[..., T], *args: Any) -> T:
        return await self._thread.run(_write_durably, self._db, body, (self._tx, *args))

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


def image_of_rows(tables: Mapping[str, Sequence[Sequence[Any]]]) -> bytes:
    """A database image holding exactly these rows (dfsfuse.metadata.sql's
    TABLE_COLUMNS): how another engine writes a dump every engine loads."""
    db = _prepared(sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None), "a metadata dump")
    try:
        _transaction(db, "BEGIN IMMEDIATE", replace_rows, (_SqliteTransaction(db), tables))
        return db.serialize()
    finally:
        db.close()


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
