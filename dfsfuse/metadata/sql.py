"""What the SQL metadata engines share: every MetadataStore call as one
transaction body, written once for SQLite and PostgreSQL.

An engine subclasses SqlMetadata and says how a body runs: `_read(body, *args)`
and `_write(body, *args)` run body(tx, *args) as one transaction and return
its result, all of it committed or none. The bodies speak the SQL both
engines understand (`?` placeholders, INSERT ... ON CONFLICT DO NOTHING
RETURNING, no engine's own functions) through a Transaction, so the tables
have the same names, columns and meaning in both (the SQLite schema's
comments in dfsfuse/metadata/sqlite.py are their reference).

Concurrency. A body reads, then locks every inode row it will change with
`tx.lock_inodes`, in ascending id order, before it changes any: an engine
with row locks (PostgreSQL) then never deadlocks two bodies on each other
(say two renames in opposite directions). SQLite runs one write at a time, so
there the lock is nothing. A body never relies on its reads staying true by
any other means: PostgreSQL runs them SERIALIZABLE and retries on conflict.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import stat
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from fcntl import F_RDLCK, F_WRLCK
from typing import Any, Protocol, TypeVar, cast

from dfsfuse.errors import (
    CrossDevice,
    Exists,
    InvalidArgument,
    IsADirectory,
    NoData,
    NotADirectory,
    NotEmpty,
    NotFound,
    NotPermitted,
    QuotaExceeded,
    SessionLost,
)
from dfsfuse.metadata.base import (
    INODE_READONLY,
    INODE_TRASH,
    NODE_ACTIVE,
    NODE_STATES,
    POLICY_XATTRS,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    ROOT_INODE,
    SETTLE_NS,
    XATTR_CREATE,
    XATTR_REPLACE,
    AttrChanges,
    ChangeNotice,
    DirEntry,
    EntryChange,
    InodeAttrs,
    MetadataStore,
    NodeRecord,
    ProgressReport,
    QuotaRecord,
    RenameChange,
    SessionRecord,
    ShardLayers,
    ShardRecord,
    ShardRef,
    TrashEntry,
    TrashPurge,
    TreeChange,
    UsageCounts,
    check_name,
)
from dfsfuse.metadata.locks import LockRecord, apply, conflict
from dfsfuse.metadata.trash import (
    TRASH_DAYS_XATTR,
    TRASH_DELETED_XATTR,
    TRASH_EXPIRES_XATTR,
    TRASH_INODE_KEY,
    TRASH_NAME,
    TRASH_PATH_XATTR,
    TRASH_XATTRS,
    entry_name,
    expiry_ns,
    hour_name,
    hour_start_ns,
    parse_days,
)
from dfsfuse.shards.encoding import encoding_of_text, encoding_text

FILE_TYPE_BITS = 0o170000  # the S_IFMT part of a mode
SCHEMA_VERSION_KEY = "schema_version"  # the meta row each engine keeps its own schema's version in

T = TypeVar("T")

# The tables of a file system's metadata and their columns, the same in every
# engine; dumps copy them table by table in this order.
TABLE_COLUMNS: dict[str, tuple[str, ...]] = {
    "meta": ("key", "value"),
    "inodes": (
        "id", "mode", "nlink", "uid", "gid", "rdev", "size", "stored_bytes",
        "atime_ns", "mtime_ns", "ctime_ns", "target", "parent", "flags",
    ),
    "entries": ("id", "parent", "name", "inode"),
    "shards": ("id", "inode", "idx", "length", "checksum", "nodes", "pages", "layer", "encoding", "payload_length"),
    "garbage": ("shard_id", "nodes", "inode", "since_ns"),
    "xattrs": ("inode", "name", "value"),
    "nodes": ("name", "address", "state", "capacity", "used", "shard_count", "last_seen_ns"),
    "quotas": ("dir", "max_bytes", "max_inodes", "used_bytes", "used_inodes"),
    "settings": ("name", "value"),
}


class Cursor(Protocol):
    """What a body uses of a statement's result (DB-API, as both drivers give it)."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Any: ...


class Transaction(Protocol):
    """One open transaction, as a body sees it."""

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor: ...

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...

    def lock_inodes(self, inodes: Iterable[int]) -> None:
        """Lock these inode rows for the rest of the transaction, in ascending id order."""

    def clock_ns(self) -> int:
        """Now, in ns since the epoch, by the engine's clock: the one clock
        every mount of a shared engine agrees on (session heartbeats)."""

    def changed(self, inode: int) -> None:
        """Note that the inode's attrs, xattrs or contents change, or that it
        goes: other mounts are told when the transaction commits (a shared
        engine's ChangeNotice)."""

    def changed_entry(self, parent: int, name: bytes) -> None:
        """Note that the entry `name` in `parent` is added, removed or re-pointed."""


class SqlMetadata(MetadataStore):
    """A MetadataStore whose every call is one of the transaction bodies below."""

    @abc.abstractmethod
    async def _read(self, body: Callable[..., T], *args: Any) -> T:
        """Run body(tx, *args) in a transaction that changes nothing."""

    @abc.abstractmethod
    async def _write(self, body: Callable[..., T], *args: Any) -> T:
        """Run body(tx, *args) in a transaction that may change the metadata."""

    async def _write_durably(self, body: Callable[..., T], *args: Any) -> T:
        """`_write`, durable once it returns even if the machine dies (shard ids)."""
        return await self._write(body, *args)

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
        opened_by: int | None = None,
    ) -> EntryChange:
        return await self._write(_create, parent, name, mode, uid, gid, now_ns, rdev, target, opened_by)

    async def link(self, inode: int, new_parent: int, new_name: bytes, now_ns: int) -> EntryChange:
        return await self._write(_link, inode, new_parent, new_name, now_ns)

    async def unlink(self, parent: int, name: bytes, now_ns: int, trash_days: float = 0.0) -> EntryChange:
        return await self._write(_unlink, parent, name, now_ns, trash_days)

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
        trash_days: float = 0.0,
    ) -> RenameChange | None:
        return await self._write(_rename, old_parent, old_name, new_parent, new_name, flags, now_ns, trash_days)

    async def setattr(self, inode: int, changes: AttrChanges, now_ns: int) -> InodeAttrs:
        return await self._write(_setattr, inode, changes, now_ns)

    async def readdir(self, parent: int, after: int, limit: int) -> list[DirEntry]:
        return await self._read(_readdir, parent, after, limit)

    async def snapshot_tree(
        self, source: int, parent: int, name: bytes, readonly: bool, now_ns: int,
        report: ProgressReport | None = None,
    ) -> TreeChange:
        return await self._write(_snapshot_tree, source, parent, name, readonly, now_ns, report)

    async def remove_tree(self, parent: int, name: bytes, now_ns: int, report: ProgressReport | None = None) -> TreeChange:
        return await self._write(_remove_tree, parent, name, now_ns, report)

    async def delete_inodes(self, inodes: Sequence[int]) -> None:
        await self._write(_delete_inodes, sorted(inodes))

    async def orphan_inodes(self) -> list[int]:
        return await self._read(_orphan_inodes)

    async def trash_entries(self, expiring_before_ns: int | None = None) -> list[TrashEntry]:
        return await self._read(_trash_entries, expiring_before_ns)

    async def purge_trash(self, entries: Sequence[tuple[int, bytes]]) -> TrashPurge:
        return await self._write(_purge_trash, [(hour_dir, name) for hour_dir, name in entries])

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
        holes: Sequence[int] = (),
    ) -> InodeAttrs:
        return await self._write(
            _commit_shards, inode, dict(shards), size, drop_from, mtime_ns, ctime_ns, changes, list(holes)
        )

    async def allocate_shard_ids(self, count: int) -> range:
        if count < 0:
            raise InvalidArgument(f"cannot allocate {count} shard ids")
        return await self._write_durably(_allocate_shard_ids, count)

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

    async def setting(self, name: str) -> bytes | None:
        return await self._read(_setting, name)

    async def set_setting(self, name: str, value: bytes) -> None:
        await self._write(_set_setting, name, bytes(value))

    # -- directory quotas ---------------------------------------------------
    async def set_quota(self, directory: int, max_bytes: int | None, max_inodes: int | None) -> QuotaRecord:
        for limit in (max_bytes, max_inodes):
            if limit is not None and limit < 0:
                raise InvalidArgument(f"a quota limit cannot be negative ({limit})")
        return await self._write(_set_quota, directory, max_bytes, max_inodes)

    async def quota(self, directory: int) -> QuotaRecord:
        return await self._read(_quota, directory)

    async def quotas(self) -> list[QuotaRecord]:
        return await self._read(_quotas)

    async def quotas_of(self, inode: int) -> list[QuotaRecord]:
        return await self._read(_quotas_of, inode)

    async def remove_quota(self, directory: int) -> None:
        await self._write(_remove_quota, directory)

    async def check_quotas(self, repair: bool) -> list[tuple[QuotaRecord, QuotaRecord]]:
        return await (self._write if repair else self._read)(_check_quotas, repair)

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

    # -- whole tables, for dumps -------------------------------------------
    # -- sessions ---------------------------------------------------------------
    async def open_session(self, host: str, pid: int, mountpoint: str) -> int:
        return await self._write(_open_session, host, pid, mountpoint)

    async def heartbeat(self, session: int, synced_ns: int = 0) -> bool:
        return await self._write(_heartbeat, session, synced_ns)

    async def reap_sessions(self, timeout_ns: int) -> list[SessionRecord]:
        return await self._write(_reap_sessions, timeout_ns)

    async def list_sessions(self) -> list[SessionRecord]:
        return await self._read(_list_sessions)

    async def close_session(self, session: int) -> None:
        await self._write(_drop_sessions, [session])

    async def open_file(self, session: int, inode: int) -> InodeAttrs:
        return await self._write(_open_file, session, inode)

    async def close_files(self, session: int, inodes: Sequence[int]) -> None:
        await self._write(_close_files, session, sorted(set(inodes)))

    # -- locks ----------------------------------------------------------------
    async def set_lock(self, session: int, inode: int, request: LockRecord) -> LockRecord | None:
        return await self._write(_set_lock, session, inode, request)

    async def test_lock(self, inode: int, request: LockRecord) -> LockRecord | None:
        return await self._read(_test_lock, inode, request)

    async def release_locks(self, session: int, inode: int, owners: Sequence[int], kind: str | None) -> None:
        if owners:
            await self._write(_release_locks, session, inode, sorted(set(owners)), kind)

    async def rows_of(self, table: str) -> list[tuple[Any, ...]]:
        """Every row of one of TABLE_COLUMNS' tables, in its columns' order."""
        if table not in TABLE_COLUMNS:
            raise InvalidArgument(f"no metadata table {table!r}")
        return await self._read(table_rows, table)



def insert_statement(table: str) -> str:
    """INSERT of one whole row of `table`, its columns in TABLE_COLUMNS order."""
    columns = TABLE_COLUMNS[table]
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"


def create_root(tx: Transaction, uid: int, gid: int, now_ns: int) -> None:
    """A new file system's root directory, and the first shard id, 1."""
    # The columns of schema 1, which this runs in (the migrations after add to them).
    tx.execute(
        "INSERT INTO inodes (id, mode, nlink, uid, gid, rdev, size, stored_bytes, atime_ns, mtime_ns, ctime_ns,"
        " target, parent) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (ROOT_INODE, stat.S_IFDIR | 0o755, 2, uid, gid, 0, 0, 0, now_ns, now_ns, now_ns, b"", ROOT_INODE),
    )
    tx.execute("INSERT INTO meta (key, value) VALUES ('next_shard_id', 1)")


def replace_rows(tx: Transaction, tables: Mapping[str, Sequence[Sequence[Any]]]) -> None:
    """Replace every row of every table by `tables`' (a body: loading a dump).

    The meta row schema_version stays: it is the version of this engine's
    schema, not a part of the file system (the rows mean the same in every
    engine and version that TABLE_COLUMNS describes)."""
    for table in reversed(TABLE_COLUMNS):
        tx.execute(f"DELETE FROM {table}" + (f" WHERE key <> '{SCHEMA_VERSION_KEY}'" if table == "meta" else ""))
    for table in TABLE_COLUMNS:
        rows = tables[table]
        if table == "meta":
            rows = [row for row in rows if row[0] != SCHEMA_VERSION_KEY]
        tx.executemany(insert_statement(table), rows)


def table_rows(tx: Transaction, table: str) -> list[tuple[Any, ...]]:
    """Every row of `table`, its columns in TABLE_COLUMNS order (a body: dumps read them)."""
    columns = TABLE_COLUMNS[table]
    return [tuple(row) for row in tx.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY {columns[0]}")]


# -- transaction bodies ---------------------------------------------------
# Each function below runs inside one transaction; an exception rolls the
# whole transaction back.

# The columns of an inode row in InodeAttrs field order, so that
# InodeAttrs(*row) builds the attributes; `blocks` is computed here.
_ATTR_COLUMNS = (
    "{t}id, {t}mode, {t}nlink, {t}uid, {t}gid, {t}rdev, {t}size, ({t}stored_bytes + 511) / 512,"
    " {t}atime_ns, {t}mtime_ns, {t}ctime_ns, {t}target, {t}flags"
)
_ATTRS = _ATTR_COLUMNS.format(t="")
_ATTRS_OF_I = _ATTR_COLUMNS.format(t="i.")


def _encode_nodes(nodes: Sequence[str]) -> str:
    return json.dumps(list(nodes))


def _decode_nodes(text: str) -> tuple[str, ...]:
    return tuple(json.loads(text))


def _inode_exists(tx: Transaction, inode: int) -> bool:
    return tx.execute("SELECT 1 FROM inodes WHERE id = ?", (inode,)).fetchone() is not None


def _inode_attrs(tx: Transaction, inode: int) -> InodeAttrs:
    row = tx.execute(f"SELECT {_ATTRS} FROM inodes WHERE id = ?", (inode,)).fetchone()
    if row is None:
        raise NotFound(f"no inode {inode}")
    return InodeAttrs(*row)


def _update_inode(tx: Transaction, inode: int, assignments: str, params: Sequence[Any]) -> InodeAttrs:
    """Apply `assignments` (SQL "column = ?, ...") to the inode; its attrs after."""
    tx.changed(inode)
    row = tx.execute(
        f"UPDATE inodes SET {assignments} WHERE id = ? RETURNING {_ATTRS}", (*params, inode)
    ).fetchone()
    if row is None:
        raise NotFound(f"no inode {inode}")
    return InodeAttrs(*row)


def _require_directory(tx: Transaction, inode: int, *, live: bool = True) -> None:
    """NotFound unless `inode` exists (and, if `live`, still has a name); NotADirectory
    unless it is a directory."""
    row = tx.execute("SELECT mode, nlink FROM inodes WHERE id = ?", (inode,)).fetchone()
    if row is None or (live and row[1] == 0):
        raise NotFound(f"no directory {inode}")
    if not stat.S_ISDIR(row[0]):
        raise NotADirectory(f"inode {inode} is not a directory")


def _touch_directory(tx: Transaction, directory: int, now_ns: int, nlink_delta: int) -> InodeAttrs:
    """A live directory's entries changed: set its mtime and ctime, adjust its
    nlink; its attrs after."""
    tx.changed(directory)
    row = tx.execute(
        "UPDATE inodes SET nlink = nlink + ?, mtime_ns = ?, ctime_ns = ?"
        f" WHERE id = ? AND nlink > 0 AND mode & ? = ? RETURNING {_ATTRS}",
        (nlink_delta, now_ns, now_ns, directory, FILE_TYPE_BITS, stat.S_IFDIR),
    ).fetchone()
    if row is None:
        _require_directory(tx, directory)  # raises: only a missing, removed or non-directory misses
    return InodeAttrs(*row)


def _entry(tx: Transaction, parent: int, name: bytes) -> tuple[int, InodeAttrs] | None:
    """(entry id, attrs of the inode named) for `name` in `parent`, or None."""
    row = tx.execute(
        f"SELECT e.id, {_ATTRS_OF_I} FROM entries e JOIN inodes i ON i.id = e.inode"
        " WHERE e.parent = ? AND e.name = ?",
        (parent, name),
    ).fetchone()
    return None if row is None else (row[0], InodeAttrs(*row[1:]))


def _existing_entry(tx: Transaction, parent: int, name: bytes) -> tuple[int, InodeAttrs]:
    found = _entry(tx, parent, name)
    if found is None:
        _require_directory(tx, parent)
        raise NotFound(f"no {name!r} in directory {parent}")
    return found


def _add_entry(tx: Transaction, parent: int, name: bytes, inode: int) -> int:
    """Name `inode` in `parent`; the new entry's id (its readdir offset)."""
    tx.changed_entry(parent, name)
    row = tx.execute(
        "INSERT INTO entries (parent, name, inode) VALUES (?, ?, ?)"
        " ON CONFLICT (parent, name) DO NOTHING RETURNING id",
        (parent, name, inode),
    ).fetchone()
    if row is None:
        raise Exists(f"{name!r} exists in directory {parent}")
    entry_id: int = row[0]
    return entry_id


def _remove_entry(tx: Transaction, entry_id: int, parent: int, name: bytes) -> None:
    tx.changed_entry(parent, name)
    tx.execute("DELETE FROM entries WHERE id = ?", (entry_id,))


def _has_entries(tx: Transaction, directory: int) -> bool:
    return tx.execute("SELECT 1 FROM entries WHERE parent = ? LIMIT 1", (directory,)).fetchone() is not None


def _directory_parent(tx: Transaction, directory: int) -> int:
    return int(tx.execute("SELECT parent FROM inodes WHERE id = ?", (directory,)).fetchone()[0])


def _is_within(tx: Transaction, directory: int, ancestor: int) -> bool:
    """Whether `directory` is `ancestor` or lies somewhere below it."""
    while directory != ancestor:
        if directory == ROOT_INODE:
            return False
        directory = _directory_parent(tx, directory)
    return True


def _lookup(tx: Transaction, parent: int, name: bytes) -> InodeAttrs:
    if name == b"." or name == b"..":
        _require_directory(tx, parent)
        return _inode_attrs(tx, parent if name == b"." else _directory_parent(tx, parent))
    if parent == ROOT_INODE and name == TRASH_NAME:
        found = _entry(tx, parent, name)  # a user's own, made before there was a trash, wins
        trash = _trash_directory(tx)
        if found is None and trash is not None:
            return _inode_attrs(tx, trash)
    return _existing_entry(tx, parent, name)[1]


def _create(
    tx: Transaction,
    parent: int,
    name: bytes,
    mode: int,
    uid: int,
    gid: int,
    now_ns: int,
    rdev: int,
    target: bytes,
    opened_by: int | None,
) -> EntryChange:
    check_name(name)
    _refuse_trash_name(parent, name)
    is_directory = stat.S_ISDIR(mode)
    if not stat.S_ISLNK(mode):
        target = b""
    parent_attrs = _touch_directory(tx, parent, now_ns, 1 if is_directory else 0)
    _refuse_in_trash(parent_attrs)
    charge(tx, parent, 0, 1, enforce=True)
    nlink = 2 if is_directory else 1
    size = len(target)
    inode: int = tx.execute(
        "INSERT INTO inodes (mode, nlink, uid, gid, rdev, size, stored_bytes, atime_ns, mtime_ns, ctime_ns,"
        " target, parent) VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?, ?) RETURNING id",
        (mode, nlink, uid, gid, rdev, size, now_ns, now_ns, now_ns, target, parent if is_directory else None),
    ).fetchone()[0]
    offset = _add_entry(tx, parent, name, inode)
    attrs = InodeAttrs(inode, mode, nlink, uid, gid, rdev, size, 0, now_ns, now_ns, now_ns, target)
    xattrs = _inherit_policy(tx, parent, inode) if is_directory or stat.S_ISREG(mode) else {}
    if opened_by is not None and stat.S_ISREG(mode):
        _record_open(tx, opened_by, inode)
    return EntryChange(attrs, parent_attrs, offset, xattrs)


def _inherit_policy(tx: Transaction, parent: int, inode: int) -> dict[bytes, bytes]:
    """Give a new inode the POLICY_XATTRS its directory has; the xattrs given."""
    rows = tx.execute(
        "INSERT INTO xattrs (inode, name, value) SELECT ?, name, value FROM xattrs"
        f" WHERE inode = ? AND name IN ({', '.join('?' * len(POLICY_XATTRS))}) RETURNING name, value",
        (inode, parent, *POLICY_XATTRS),
    ).fetchall()
    return {bytes(name): bytes(value) for name, value in rows}


def _link(tx: Transaction, inode: int, new_parent: int, new_name: bytes, now_ns: int) -> EntryChange:
    check_name(new_name)
    _refuse_trash_name(new_parent, new_name)
    tx.lock_inodes((new_parent, inode))
    attrs = _inode_attrs(tx, inode)
    if stat.S_ISDIR(attrs.mode):
        raise NotPermitted(f"inode {inode} is a directory and cannot be hard-linked")
    if attrs.nlink == 0:
        raise NotFound(f"inode {inode} has no name left to link to")  # as linkat(2) says
    _refuse_in_trash(attrs)  # a file in the trash gets no other name: move it out
    parent_attrs = _touch_directory(tx, new_parent, now_ns, 0)
    _refuse_in_trash(parent_attrs)
    if _quota_ids(quotas_above(tx, new_parent)) != _quota_ids(quotas_of_inode(tx, inode)):
        raise CrossDevice(f"inode {inode} and directory {new_parent} are under different quotas")
    offset = _add_entry(tx, new_parent, new_name, inode)
    attrs = _update_inode(tx, inode, "nlink = nlink + 1, ctime_ns = ?", (now_ns,))
    return EntryChange(attrs, parent_attrs, offset)


def _unlink(tx: Transaction, parent: int, name: bytes, now_ns: int, trash_days: float) -> EntryChange:
    entry_id, attrs = _existing_entry(tx, parent, name)
    if stat.S_ISDIR(attrs.mode):
        raise IsADirectory(f"{name!r} in directory {parent} is a directory")
    _refuse_in_trash(_inode_attrs(tx, parent))
    plan = _trash_plan(tx, parent, name, attrs, now_ns, trash_days)
    tx.lock_inodes((parent, attrs.inode, *([] if plan is None else plan.existing)))
    charged = quotas_of_inode(tx, attrs.inode)
    _remove_entry(tx, entry_id, parent, name)
    _uncharge_name(tx, attrs, charged)
    parent_attrs = _touch_directory(tx, parent, now_ns, 0)
    if plan is not None:
        attrs, notice = _move_to_trash(tx, plan, attrs.inode, now_ns)
        return EntryChange(attrs, parent_attrs, entry_id, trash=notice)
    attrs = _update_inode(tx, attrs.inode, "nlink = nlink - 1, ctime_ns = ?", (now_ns,))
    return EntryChange(attrs, parent_attrs, entry_id)


def _rmdir(tx: Transaction, parent: int, name: bytes, now_ns: int) -> EntryChange:
    entry_id, attrs = _existing_entry(tx, parent, name)
    _refuse_in_trash(_inode_attrs(tx, parent))
    tx.lock_inodes((parent, attrs.inode))
    if not stat.S_ISDIR(attrs.mode):
        raise NotADirectory(f"{name!r} in directory {parent} is not a directory")
    if _has_entries(tx, attrs.inode):
        raise NotEmpty(f"directory {attrs.inode} is not empty")
    _remove_entry(tx, entry_id, parent, name)
    tx.execute("DELETE FROM quotas WHERE dir = ?", (attrs.inode,))
    charge(tx, parent, 0, -1, enforce=False)
    parent_attrs = _touch_directory(tx, parent, now_ns, -1)
    attrs = _update_inode(tx, attrs.inode, "nlink = 0, ctime_ns = ?", (now_ns,))
    return EntryChange(attrs, parent_attrs, entry_id)


def _rename(
    tx: Transaction,
    old_parent: int,
    old_name: bytes,
    new_parent: int,
    new_name: bytes,
    flags: int,
    now_ns: int,
    trash_days: float,
) -> RenameChange | None:
    if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == RENAME_NOREPLACE | RENAME_EXCHANGE:
        raise InvalidArgument(f"invalid rename flags {flags:#x}")
    check_name(new_name)
    _refuse_trash_name(new_parent, new_name)
    source_entry, source = _existing_entry(tx, old_parent, old_name)
    target = _entry(tx, new_parent, new_name)
    restoring = _inode_attrs(tx, old_parent).in_trash
    _refuse_in_trash(_inode_attrs(tx, new_parent))
    if restoring and (stat.S_ISDIR(source.mode) or flags & RENAME_EXCHANGE):
        raise NotPermitted("only files can be moved out of the trash, and not by an exchange")
    plan = None
    if target is not None and not flags and not stat.S_ISDIR(source.mode) and target[1].inode != source.inode:
        plan = _trash_plan(tx, new_parent, new_name, target[1], now_ns, trash_days)
    tx.lock_inodes(
        (old_parent, new_parent, source.inode)
        + (() if target is None else (target[1].inode,))
        + (() if plan is None else plan.existing)
    )
    if target is None:
        _require_directory(tx, new_parent)
        if flags & RENAME_EXCHANGE:
            raise NotFound(f"no {new_name!r} in directory {new_parent} to exchange with")
    elif flags & RENAME_NOREPLACE:
        raise Exists(f"{new_name!r} exists in directory {new_parent}")
    if target is not None and target[1].inode == source.inode:
        return None
    source_is_directory = stat.S_ISDIR(source.mode)
    if source_is_directory and new_parent != old_parent and _is_within(tx, new_parent, source.inode):
        raise InvalidArgument(f"cannot move directory {source.inode} into itself")

    # The nlink change of each parent; one key when both are the same.
    nlink_deltas = {old_parent: 0, new_parent: 0}
    # Which quotas the moved names leave and join: charged below, once the
    # name a plain rename replaces (if any) is uncharged.
    # What is in the trash counts against no quota: a file moved out of it is
    # charged where it goes (below), as if created there.
    crossing = not restoring and _crosses_quotas(tx, old_parent, new_parent)

    def move_directory(directory: int, origin: int, destination: int) -> None:
        if origin != destination:
            tx.execute("UPDATE inodes SET parent = ? WHERE id = ?", (destination, directory))
            nlink_deltas[origin] -= 1
            nlink_deltas[destination] += 1

    exchanged = replaced = trash_notice = None
    if flags & RENAME_EXCHANGE:
        assert target is not None
        target_entry, other = target
        other_is_directory = stat.S_ISDIR(other.mode)
        if other_is_directory and old_parent != new_parent and _is_within(tx, old_parent, other.inode):
            raise InvalidArgument(f"cannot move directory {other.inode} into itself")
        if crossing:
            _move_usage(tx, [(source, old_parent, new_parent), (other, new_parent, old_parent)])
        tx.execute("UPDATE entries SET inode = ? WHERE id = ?", (other.inode, source_entry))
        tx.execute("UPDATE entries SET inode = ? WHERE id = ?", (source.inode, target_entry))
        tx.changed_entry(old_parent, old_name)
        tx.changed_entry(new_parent, new_name)
        if other_is_directory:
            move_directory(other.inode, new_parent, old_parent)
        exchanged = _update_inode(tx, other.inode, "ctime_ns = ?", (now_ns,))
        new_name_entry = target_entry
    else:
        if target is not None and plan is not None:
            charged = quotas_of_inode(tx, target[1].inode)
            _remove_entry(tx, target[0], new_parent, new_name)
            _uncharge_name(tx, target[1], charged)
            replaced, trash_notice = _move_to_trash(tx, plan, target[1].inode, now_ns)
        elif target is not None:
            replaced = _remove_rename_target(tx, target, new_parent, new_name, source_is_directory, now_ns)
            if source_is_directory:
                nlink_deltas[new_parent] -= 1
        if crossing:
            _move_usage(tx, [(source, old_parent, new_parent)])
        tx.execute("UPDATE entries SET parent = ?, name = ? WHERE id = ?", (new_parent, new_name, source_entry))
        tx.changed_entry(old_parent, old_name)
        tx.changed_entry(new_parent, new_name)
        new_name_entry = source_entry
    if source_is_directory:
        move_directory(source.inode, old_parent, new_parent)
    if restoring:  # (a file it replaces may have gone into the trash meanwhile)
        charge(tx, new_parent, *_usage_of(source), enforce=True)
        moved = _restore_from_trash(tx, source.inode, now_ns)
        before = trash_notice or ChangeNotice()
        trash_notice = ChangeNotice(inodes=before.inodes | {source.inode}, entries=before.entries)
    else:
        moved = _update_inode(tx, source.inode, "ctime_ns = ?", (now_ns,))
    parents = tuple(
        _touch_directory(tx, directory, now_ns, nlink_delta) for directory, nlink_delta in nlink_deltas.items()
    )
    return RenameChange(moved, exchanged, replaced, parents, new_name_entry, trash_notice)


def _remove_rename_target(
    tx: Transaction, target: tuple[int, InodeAttrs], parent: int, name: bytes, source_is_directory: bool, now_ns: int
) -> InodeAttrs:
    """Remove the name a rename replaces; the replaced inode's attrs after."""
    target_entry, victim = target
    if source_is_directory:
        if not stat.S_ISDIR(victim.mode):
            raise NotADirectory(f"cannot replace non-directory {victim.inode} with a directory")
        if _has_entries(tx, victim.inode):
            raise NotEmpty(f"directory {victim.inode} is not empty")
        nlink = 0
        _remove_entry(tx, target_entry, parent, name)
        tx.execute("DELETE FROM quotas WHERE dir = ?", (victim.inode,))
        charge(tx, parent, 0, -1, enforce=False)
    else:
        if stat.S_ISDIR(victim.mode):
            raise IsADirectory(f"cannot replace directory {victim.inode} with a non-directory")
        nlink = victim.nlink - 1
        charged = quotas_of_inode(tx, victim.inode)
        _remove_entry(tx, target_entry, parent, name)
        _uncharge_name(tx, victim, charged)
    return _update_inode(tx, victim.inode, "nlink = ?, ctime_ns = ?", (nlink, now_ns))


def _setattr(tx: Transaction, inode: int, changes: AttrChanges, now_ns: int) -> InodeAttrs:
    assignments: list[str] = []
    params: list[Any] = []
    _add_attr_changes(assignments, params, changes, now_ns)
    return _update_inode(tx, inode, ", ".join(assignments), params)


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


def _readdir(tx: Transaction, parent: int, after: int, limit: int) -> list[DirEntry]:
    rows = tx.execute(
        f"SELECT e.id, e.name, {_ATTRS_OF_I} FROM entries e JOIN inodes i ON i.id = e.inode"
        " WHERE e.parent = ? AND e.id > ? ORDER BY e.id LIMIT ?",
        (parent, after, max(limit, 0)),
    ).fetchall()
    if not rows:
        _require_directory(tx, parent, live=False)  # a removed directory lists as empty
    return [DirEntry(row[1], InodeAttrs(*row[2:]), row[0]) for row in rows]


# How many entries a tree snapshot or removal copies or removes between two
# progress reports.
_REPORT_EVERY = 2000


def _tree_below(tx: Transaction, top: int) -> tuple[list[tuple[int, int, bytes, int, int]], int]:
    """Every entry below directory `top`, parents before children, as
    (entry id, parent, name, inode, mode); and the sum of the sizes of the
    regular files there. One query per directory."""
    entries: list[tuple[int, int, bytes, int, int]] = []
    sizes: dict[int, int] = {}  # each regular file once, however many names it has here
    directories = [top]
    while directories:
        directory = directories.pop()
        for entry_id, name, inode, mode, size in tx.execute(
            "SELECT e.id, e.name, e.inode, i.mode, i.size FROM entries e JOIN inodes i ON i.id = e.inode"
            " WHERE e.parent = ? ORDER BY e.id",
            (directory,),
        ):
            entries.append((entry_id, directory, name, inode, mode))
            if stat.S_ISDIR(mode):
                directories.append(inode)
            elif stat.S_ISREG(mode):
                sizes[inode] = size
    return entries, sum(sizes.values())


def _copy_inode(tx: Transaction, source: int, parent: int | None, flags: int, now_ns: int) -> int:
    """A new inode like `source` (ctime now, `parent` for a directory, its
    xattrs, and its shard objects shared); its id."""
    inode: int = tx.execute(
        "INSERT INTO inodes (mode, nlink, uid, gid, rdev, size, stored_bytes, atime_ns, mtime_ns, ctime_ns,"
        " target, parent, flags) SELECT mode, nlink, uid, gid, rdev, size, stored_bytes, atime_ns, mtime_ns, ?,"
        " target, ?, ? FROM inodes WHERE id = ? RETURNING id",
        (now_ns, parent, flags, source),
    ).fetchone()[0]
    tx.execute("INSERT INTO xattrs (inode, name, value) SELECT ?, name, value FROM xattrs WHERE inode = ?", (inode, source))
    tx.execute(
        "INSERT INTO shards (id, inode, idx, length, checksum, nodes, pages, layer, encoding, payload_length)"
        " SELECT id, ?, idx, length, checksum, nodes, pages, layer, encoding, payload_length FROM shards"
        " WHERE inode = ?",
        (inode, source),
    )
    return inode


def _snapshot_tree(
    tx: Transaction, source: int, parent: int, name: bytes, readonly: bool, now_ns: int,
    report: ProgressReport | None,
) -> TreeChange:
    check_name(name)
    _refuse_trash_name(parent, name)
    top = _inode_attrs(tx, source)
    if top.nlink == 0:
        raise NotFound(f"inode {source} has no name left to snapshot")
    _refuse_in_trash(top)  # a deleted file is snapshotted once it is moved out
    is_directory = stat.S_ISDIR(top.mode)
    _require_directory(tx, parent)
    _refuse_in_trash(_inode_attrs(tx, parent))
    if is_directory and _is_within(tx, parent, source):
        raise InvalidArgument(f"cannot snapshot directory {source} into itself")
    below, logical_bytes = _tree_below(tx, source) if is_directory else ([], 0)
    if stat.S_ISREG(top.mode):
        logical_bytes = top.size
    flags = INODE_READONLY if readonly else 0
    tx.lock_inodes((parent,))
    files = {entry[3] for entry in below if not stat.S_ISDIR(entry[4])}
    inodes = 1 + len(files) + sum(1 for entry in below if stat.S_ISDIR(entry[4]))
    charge(tx, parent, logical_bytes, inodes, enforce=True)
    parent_attrs = _touch_directory(tx, parent, now_ns, 1 if is_directory else 0)
    copy_of = {source: _copy_inode(tx, source, parent if is_directory else None, flags, now_ns)}
    offset = _add_entry(tx, parent, name, copy_of[source])
    links: dict[int, int] = {}  # copy -> its names in the snapshot, for the non-directories
    for done, (_, directory, name_below, inode, mode) in enumerate(below, 1):
        if inode not in copy_of:  # else a hard link to a file already copied
            copy_of[inode] = _copy_inode(tx, inode, copy_of[directory] if stat.S_ISDIR(mode) else None, flags, now_ns)
        tx.execute(
            "INSERT INTO entries (parent, name, inode) VALUES (?, ?, ?)", (copy_of[directory], name_below, copy_of[inode])
        )
        if not stat.S_ISDIR(mode):
            links[copy_of[inode]] = links.get(copy_of[inode], 0) + 1
        if report is not None and done % _REPORT_EVERY == 0:
            report(done, len(below))
    if not is_directory:
        links[copy_of[source]] = 1
    tx.executemany("UPDATE inodes SET nlink = ? WHERE id = ?", [(count, inode) for inode, count in links.items()])
    attrs = _inode_attrs(tx, copy_of[source])
    xattrs = dict(tx.execute("SELECT name, value FROM xattrs WHERE inode = ?", (attrs.inode,)).fetchall())
    return TreeChange(EntryChange(attrs, parent_attrs, offset, xattrs), tuple(copy_of.values()), logical_bytes)


def _remove_tree(tx: Transaction, parent: int, name: bytes, now_ns: int, report: ProgressReport | None) -> TreeChange:
    entry_id, top = _existing_entry(tx, parent, name)
    is_directory = stat.S_ISDIR(top.mode)
    below, logical_bytes = _tree_below(tx, top.inode) if is_directory else ([], 0)
    if stat.S_ISREG(top.mode):
        logical_bytes = top.size
    tx.lock_inodes([parent, top.inode, *(entry[3] for entry in below)])
    names_in_tree: dict[int, int] = {}
    for entry in below:
        names_in_tree[entry[3]] = names_in_tree.get(entry[3], 0) + 1
    # Files with names outside the tree too: charged, after, only to the
    # quotas their names left lie under (as an unlink of one name is).
    keeping = {
        inode: (attrs, quotas_of_inode(tx, inode))
        for inode, count in names_in_tree.items()
        if not stat.S_ISDIR((attrs := _inode_attrs(tx, inode)).mode) and attrs.nlink > count
    }
    names_removed: dict[int, int] = {top.inode: 1}
    for done, (below_entry, directory, name_below, inode, _) in enumerate(reversed(below), 1):
        _remove_entry(tx, below_entry, directory, name_below)
        names_removed[inode] = names_removed.get(inode, 0) + 1
        if report is not None and done % _REPORT_EVERY == 0:
            report(done, len(below))
    _remove_entry(tx, entry_id, parent, name)
    parent_attrs = _touch_directory(tx, parent, now_ns, -1 if is_directory else 0)
    unlinked = []
    freed_bytes = 0  # of the files left without a name: no quota counts them any more
    for inode, count in names_removed.items():
        tx.changed(inode)
        nlink, mode, size = tx.execute(
            "UPDATE inodes SET nlink = CASE WHEN mode & ? = ? THEN 0 ELSE nlink - ? END, ctime_ns = ?"
            " WHERE id = ? RETURNING nlink, mode, size",
            (FILE_TYPE_BITS, stat.S_IFDIR, count, now_ns, inode),
        ).fetchone()
        if nlink == 0:
            unlinked.append(inode)
            freed_bytes += size if stat.S_ISREG(mode) else 0
            if stat.S_ISDIR(mode):
                tx.execute("DELETE FROM quotas WHERE dir = ?", (inode,))
    charge(tx, parent, -freed_bytes, -len(unlinked), enforce=False)
    for attrs, charged in keeping.values():
        _uncharge_name(tx, attrs, charged)
    attrs = _inode_attrs(tx, top.inode)
    return TreeChange(
        EntryChange(attrs, parent_attrs, entry_id), tuple(names_removed), logical_bytes, tuple(unlinked)
    )


_OPEN_ANYWHERE = "EXISTS (SELECT 1 FROM open_files o WHERE o.inode = {inode})"


def _delete_inodes(tx: Transaction, inodes: list[int]) -> None:
    tx.lock_inodes(inodes)
    for inode in inodes:
        row = tx.execute(
            f"SELECT nlink, {_OPEN_ANYWHERE.format(inode='?')} FROM inodes WHERE id = ?", (inode, inode)
        ).fetchone()
        if row is None or row[0] > 0 or row[1]:
            continue
        tx.changed(inode)
        removed = tx.execute("DELETE FROM shards WHERE inode = ? RETURNING id, nodes", (inode,)).fetchall()
        _collect_unshared(tx, inode, removed)
        tx.execute("DELETE FROM xattrs WHERE inode = ?", (inode,))
        tx.execute("DELETE FROM quotas WHERE dir = ?", (inode,))
        tx.execute("DELETE FROM inodes WHERE id = ?", (inode,))


def _orphan_inodes(tx: Transaction) -> list[int]:
    return [
        row[0]
        for row in tx.execute(
            f"SELECT id FROM inodes WHERE nlink = 0 AND NOT {_OPEN_ANYWHERE.format(inode='inodes.id')} ORDER BY id"
        )
    ]


# -- the trash (dfsfuse/metadata/trash.py) ----------------------------------


def _refuse_trash_name(parent: int, name: bytes) -> None:
    """The root's TRASH_NAME is taken by the trash: no new name can have it."""
    if parent == ROOT_INODE and name == TRASH_NAME:
        raise Exists(f"{TRASH_NAME.decode()} in the root is the trash")


def _refuse_in_trash(attrs: InodeAttrs) -> None:
    if attrs.in_trash:
        raise NotPermitted(f"inode {attrs.inode} is in the trash, which is read-only (move a file out to restore it)")


def _trash_directory(tx: Transaction) -> int | None:
    row = tx.execute("SELECT value FROM meta WHERE key = ?", (TRASH_INODE_KEY,)).fetchone()
    return None if row is None else int(row[0])


def _new_trash_directory(tx: Transaction, parent: int, now_ns: int) -> int:
    """A directory of the trash (the trash itself, or an hour directory), owned
    by root, with mode 1777 as /tmp has: the kernel lets every user move out
    the files they own (the sticky bit keeps them from others'), and the
    flag refuses whatever else would change it."""
    inode: int = tx.execute(
        "INSERT INTO inodes (mode, nlink, uid, gid, rdev, size, stored_bytes, atime_ns, mtime_ns, ctime_ns,"
        " target, parent, flags) VALUES (?, 2, 0, 0, 0, 0, 0, ?, ?, ?, ?, ?, ?) RETURNING id",
        (stat.S_IFDIR | stat.S_ISVTX | 0o777, now_ns, now_ns, now_ns, b"", parent, INODE_TRASH),
    ).fetchone()[0]
    return inode


@dataclasses.dataclass(frozen=True)
class _TrashPlan:
    """Where a name about to be removed goes in the trash: its original
    path, when it expires, and the trash and hour directories if they exist
    already (`existing`, to lock before anything changes)."""

    path: bytes
    expires_ns: int
    trash: int | None
    hour_dir: int | None

    @property
    def existing(self) -> tuple[int, ...]:
        return tuple(inode for inode in (self.trash, self.hour_dir) if inode is not None)


def _trash_plan(
    tx: Transaction, parent: int, name: bytes, attrs: InodeAttrs, now_ns: int, default_days: float
) -> _TrashPlan | None:
    """Where `name` in `parent`, naming `attrs`, goes when removed: None if
    for good (not its last name, or the trash is off there), else a plan.
    Walks up from `parent` to the root once: the path, and the nearest
    TRASH_DAYS_XATTR."""
    if attrs.nlink != 1 or stat.S_ISDIR(attrs.mode):
        return None
    days: float | None = None
    names = [name]
    directory: int | None = parent
    while directory is not None:
        row = tx.execute(
            "SELECT e.name, e.parent, x.value FROM inodes i LEFT JOIN entries e ON e.inode = i.id"
            " LEFT JOIN xattrs x ON x.inode = i.id AND x.name = ? WHERE i.id = ?",
            (TRASH_DAYS_XATTR, directory),
        ).fetchone()
        if row is None:
            break
        if days is None and row[2] is not None:
            days = _stored_days(bytes(row[2]), default_days)
        if directory == ROOT_INODE or row[0] is None:
            break
        names.append(bytes(row[0]))
        directory = row[1]
    days = default_days if days is None else days
    if days <= 0:
        return None
    expires_ns = expiry_ns(now_ns, days)
    trash = _trash_directory(tx)
    hour = None if trash is None else _entry(tx, trash, hour_name(expires_ns))
    return _TrashPlan(b"/" + b"/".join(reversed(names)), expires_ns, trash, None if hour is None else hour[1].inode)


def _stored_days(value: bytes, default_days: float) -> float:
    """A directory's TRASH_DAYS_XATTR; setxattr checks it, so one that does not
    parse (written by hand into a dump) counts as absent."""
    try:
        return parse_days(value, TRASH_DAYS_XATTR.decode())
    except InvalidArgument:
        return default_days


def _move_to_trash(tx: Transaction, plan: _TrashPlan, inode: int, now_ns: int) -> tuple[InodeAttrs, ChangeNotice]:
    """Name `inode`, whose entry the caller removed, in the trash's hour
    directory of `plan` (making the trash and that directory if need be);
    its attrs after, and what changed for caches."""
    entries: set[tuple[int, bytes]] = set()
    trash = plan.trash
    if trash is None:
        trash = _new_trash_directory(tx, ROOT_INODE, now_ns)
        tx.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (TRASH_INODE_KEY, trash))
        tx.changed_entry(ROOT_INODE, TRASH_NAME)  # lookups that found no trash were cached
        entries.add((ROOT_INODE, TRASH_NAME))
    hour = hour_name(plan.expires_ns)
    hour_dir = plan.hour_dir
    if hour_dir is None:
        hour_dir = _new_trash_directory(tx, trash, now_ns)
        _add_entry(tx, trash, hour, hour_dir)
        _touch_directory(tx, trash, now_ns, 1)
        entries.add((trash, hour))
    _touch_directory(tx, hour_dir, now_ns, 0)
    name = entry_name(plan.path, inode)
    _add_entry(tx, hour_dir, name, inode)
    entries.add((hour_dir, name))
    tx.executemany(
        "INSERT INTO xattrs (inode, name, value) VALUES (?, ?, ?)"
        " ON CONFLICT (inode, name) DO UPDATE SET value = excluded.value",
        [(inode, TRASH_PATH_XATTR, plan.path), (inode, TRASH_DELETED_XATTR, b"%d" % now_ns),
         (inode, TRASH_EXPIRES_XATTR, b"%d" % plan.expires_ns)],
    )
    attrs = _update_inode(tx, inode, "flags = flags | ?, ctime_ns = ?", (INODE_TRASH, now_ns))
    return attrs, ChangeNotice(inodes=frozenset({trash, hour_dir, inode}), entries=frozenset(entries))


def _restore_from_trash(tx: Transaction, inode: int, now_ns: int) -> InodeAttrs:
    """A file moved out of the trash: an ordinary file again."""
    tx.executemany("DELETE FROM xattrs WHERE inode = ? AND name = ?", [(inode, name) for name in TRASH_XATTRS])
    return _update_inode(tx, inode, "flags = flags & ?, ctime_ns = ?", (~INODE_TRASH, now_ns))


def _trash_entries(tx: Transaction, expiring_before_ns: int | None) -> list[TrashEntry]:
    trash = _trash_directory(tx)
    if trash is None:
        return []
    hours = tx.execute("SELECT inode, name FROM entries WHERE parent = ? ORDER BY name", (trash,)).fetchall()
    listed: list[TrashEntry] = []
    for hour_dir, hour in hours:
        start_ns = hour_start_ns(bytes(hour))
        if expiring_before_ns is not None and start_ns is not None and start_ns >= expiring_before_ns:
            continue
        rows = tx.execute(
            "SELECT e.name, i.id, i.size, i.stored_bytes, p.value, d.value, x.value FROM entries e"
            " JOIN inodes i ON i.id = e.inode"
            " LEFT JOIN xattrs p ON p.inode = i.id AND p.name = ?"
            " LEFT JOIN xattrs d ON d.inode = i.id AND d.name = ?"
            " LEFT JOIN xattrs x ON x.inode = i.id AND x.name = ?"
            " WHERE e.parent = ? ORDER BY e.id",
            (TRASH_PATH_XATTR, TRASH_DELETED_XATTR, TRASH_EXPIRES_XATTR, hour_dir),
        )
        listed += [
            TrashEntry(hour_dir, bytes(hour), bytes(row[0]), row[1], row[2], row[3], bytes(row[4] or b""),
                       _stored_ns(row[5]), _stored_ns(row[6]) or (start_ns or 0))
            for row in rows
        ]
    return listed


def _stored_ns(value: bytes | None) -> int:
    text = bytes(value or b"")
    return int(text) if text.isdigit() else 0


def _purge_trash(tx: Transaction, entries: list[tuple[int, bytes]]) -> TrashPurge:
    trash = _trash_directory(tx)
    if trash is None:
        return TrashPurge((), ChangeNotice())
    found = []
    for hour_dir, name in entries:
        entry = _entry(tx, hour_dir, name)
        if entry is not None and _directory_parent(tx, hour_dir) == trash:
            found.append((hour_dir, name, *entry))
    hour_dirs = {hour_dir for hour_dir, *_ in found}
    every_hour = [row[0] for row in tx.execute("SELECT inode FROM entries WHERE parent = ?", (trash,))]
    tx.lock_inodes({trash, *every_hour, *(attrs.inode for *_, attrs in found)})  # any hour may be left empty
    now_ns = tx.clock_ns()
    unlinked = []
    changed_entries = set()
    for hour_dir, name, entry_id, attrs in found:
        _remove_entry(tx, entry_id, hour_dir, name)
        unlinked.append(_update_inode(tx, attrs.inode, "nlink = nlink - 1, ctime_ns = ?", (now_ns,)))
        changed_entries.add((hour_dir, name))
    for hour_dir in hour_dirs:
        _touch_directory(tx, hour_dir, now_ns, 0)
    empty = tx.execute(
        "SELECT h.id, h.name, h.inode FROM entries h WHERE h.parent = ?"
        " AND NOT EXISTS (SELECT 1 FROM entries e WHERE e.parent = h.inode)",
        (trash,),
    ).fetchall()
    for entry_id, hour, hour_dir in empty:
        _remove_entry(tx, entry_id, trash, bytes(hour))
        unlinked.append(_update_inode(tx, hour_dir, "nlink = 0, ctime_ns = ?", (now_ns,)))
        changed_entries.add((trash, bytes(hour)))
    if empty:
        _touch_directory(tx, trash, now_ns, -len(empty))
    touched = {trash, *hour_dirs, *(attrs.inode for attrs in unlinked)}
    return TrashPurge(tuple(unlinked), ChangeNotice(inodes=frozenset(touched), entries=frozenset(changed_entries)))


_SHARD_COLUMNS = "id, length, checksum, nodes, pages, encoding"


def _shard_ref(row: Sequence[Any]) -> ShardRef:
    """A ShardRef from the columns _SHARD_COLUMNS, in that order."""
    return ShardRef(
        row[0], row[1], bytes(row[2]), _decode_nodes(row[3]), _decode_pages(row[4]), encoding_of_text(row[5])
    )


def _encode_pages(pages: tuple[int, ...]) -> bytes | None:
    return struct.pack(f"<{len(pages)}I", *pages) if pages else None


def _decode_pages(blob: bytes | None) -> tuple[int, ...]:
    return struct.unpack(f"<{len(blob) // 4}I", blob) if blob else ()


def _shard_map(tx: Transaction, inode: int) -> dict[int, ShardLayers]:
    rows = tx.execute(
        f"SELECT idx, {_SHARD_COLUMNS} FROM shards WHERE inode = ? ORDER BY idx, pages IS NOT NULL, layer", (inode,)
    ).fetchall()
    if not rows and not _inode_exists(tx, inode):
        raise NotFound(f"no inode {inode}")
    layers: dict[int, list[ShardRef]] = {}
    for row in rows:
        layers.setdefault(row[0], []).append(_shard_ref(row[1:]))
    return {index: tuple(refs) for index, refs in layers.items()}


def _commit_shards(
    tx: Transaction,
    inode: int,
    shards: dict[int, ShardRef],
    size: int,
    drop_from: int | None,
    mtime_ns: int | None,
    ctime_ns: int | None,
    changes: AttrChanges | None,
    holes: list[int],
) -> InodeAttrs:
    if changes is not None and ctime_ns is None:
        raise InvalidArgument("commit_shards with attr changes needs ctime_ns (the setattr's now_ns)")
    tx.lock_inodes((inode,))  # commits to one file in turn: each layer is above the last
    # Whether any quota exists comes along, so a write without quotas costs no extra statement.
    row = tx.execute(
        "SELECT mode, size, nlink, EXISTS (SELECT 1 FROM quotas) FROM inodes WHERE id = ?", (inode,)
    ).fetchone()
    if row is None:
        raise NotFound(f"no inode {inode}")
    if stat.S_ISDIR(row[0]):
        raise IsADirectory(f"inode {inode} is a directory")
    if not stat.S_ISREG(row[0]):
        raise InvalidArgument(f"inode {inode} is not a regular file")
    if size != row[1] and row[2] > 0 and row[3]:  # an unnamed file is charged to no quota
        _charge_quotas(tx, quotas_of_inode(tx, inode), size - row[1], 0, enforce=False)
    removed: list[tuple[int, int, str]] = []  # (shard id, length, nodes)
    if drop_from is not None:
        removed += tx.execute(
            "DELETE FROM shards WHERE inode = ? AND idx >= ? RETURNING id, length, nodes", (inode, drop_from)
        ).fetchall()
    for index in holes:
        removed += tx.execute(
            "DELETE FROM shards WHERE inode = ? AND idx = ? RETURNING id, length, nodes", (inode, index)
        ).fetchall()
    for index, ref in shards.items():
        if not ref.is_patch and index not in holes:
            removed += tx.execute(
                "DELETE FROM shards WHERE inode = ? AND idx = ? RETURNING id, length, nodes", (inode, index)
            ).fetchall()
    for index, ref in shards.items():
        inserted = tx.execute(
            # A new object: in no other file's map (snapshots share objects
            # only through snapshot_tree).
            "INSERT INTO shards (id, inode, idx, length, checksum, nodes, pages, encoding, payload_length, layer)"
            " SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, (SELECT COALESCE(MAX(layer), 0) + 1 FROM shards WHERE inode = ? AND idx = ?)"
            " WHERE NOT EXISTS (SELECT 1 FROM shards WHERE id = ? AND inode <> ?)"
            " ON CONFLICT (id, inode) DO NOTHING RETURNING id",
            (ref.shard_id, inode, index, ref.length, ref.checksum, _encode_nodes(ref.nodes), _encode_pages(ref.pages),
             encoding_text(ref.encoding), None if ref.encoding is None else ref.encoding.payload_length,
             inode, index, ref.shard_id, inode),
        ).fetchone()
        if inserted is None:
            raise InvalidArgument(f"shard id {ref.shard_id} committed to inode {inode} is already in use")
    kept = {ref.shard_id for ref in shards.values()}
    _collect_unshared(tx, inode, [(shard_id, nodes) for shard_id, _, nodes in removed if shard_id not in kept])
    stored_delta = sum(ref.length for ref in shards.values()) - sum(length for _, length, _ in removed)
    assignments = ["size = ?", "stored_bytes = stored_bytes + ?"]
    params: list[Any] = [size, stored_delta]
    if mtime_ns is not None and (changes is None or changes.mtime_ns is None):  # a time in changes wins
        assignments.append("mtime_ns = ?")
        params.append(mtime_ns)
    if ctime_ns is not None:
        _add_attr_changes(assignments, params, changes or AttrChanges(), ctime_ns)
    return _update_inode(tx, inode, ", ".join(assignments), params)


def _collect_unshared(tx: Transaction, inode: int, removed: Sequence[tuple[int, str]]) -> None:
    """Make garbage of the objects (shard id, nodes) just removed from
    `inode`'s map that no other file (a snapshot) still has in its map."""
    garbage = [
        (shard_id, nodes, inode)
        for shard_id, nodes in removed
        if tx.execute("SELECT 1 FROM shards WHERE id = ? LIMIT 1", (shard_id,)).fetchone() is None
    ]
    if garbage:
        since_ns = tx.clock_ns()
        tx.executemany(
            "INSERT INTO garbage (shard_id, nodes, inode, since_ns) VALUES (?, ?, ?, ?)",
            [(*row, since_ns) for row in garbage],
        )


def _allocate_shard_ids(tx: Transaction, count: int) -> range:
    end = tx.execute(
        "UPDATE meta SET value = value + ? WHERE key = 'next_shard_id' RETURNING value", (count,)
    ).fetchone()[0]
    return range(end - count, end)


def _layout(tx: Transaction, shard_size: int, block_size: int) -> tuple[int, int]:
    for key, value in (("shard_size", shard_size), ("block_size", block_size)):
        tx.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING", (key, value))
    rows = dict(tx.execute("SELECT key, value FROM meta WHERE key IN ('shard_size', 'block_size')"))
    return rows["shard_size"], rows["block_size"]


def _garbage(tx: Transaction, limit: int) -> list[tuple[int, tuple[str, ...]]]:
    rows = tx.execute(
        "SELECT shard_id, nodes FROM garbage g WHERE g.inode IS NULL OR NOT EXISTS"
        " (SELECT 1 FROM open_files o JOIN sessions s ON s.id = o.session"
        "  WHERE o.inode = g.inode AND s.synced_ns < g.since_ns + ?)"
        " ORDER BY shard_id LIMIT ?",
        (SETTLE_NS, max(limit, 0)),
    )
    return [(row[0], _decode_nodes(row[1])) for row in rows]


def _forget_garbage(tx: Transaction, shard_ids: list[int]) -> None:
    tx.executemany("DELETE FROM garbage WHERE shard_id = ?", [(shard_id,) for shard_id in shard_ids])


def _shards(tx: Transaction, after_shard_id: int, limit: int) -> list[ShardRecord]:
    # One row per object: the one of the file with the lowest inode number.
    rows = tx.execute(
        f"SELECT inode, idx, {_SHARD_COLUMNS} FROM shards s WHERE id > ? AND NOT EXISTS"
        " (SELECT 1 FROM shards t WHERE t.id = s.id AND t.inode < s.inode) ORDER BY id LIMIT ?",
        (after_shard_id, max(limit, 0)),
    ).fetchall()
    if not rows:
        return []
    # Every file that has each of them (the page is a range of ids).
    sharers: dict[int, list[int]] = {}
    for shard_id, inode in tx.execute(
        "SELECT id, inode FROM shards WHERE id > ? AND id <= ? ORDER BY id, inode", (after_shard_id, rows[-1][2])
    ):
        sharers.setdefault(shard_id, []).append(inode)
    return [ShardRecord(row[0], row[1], _shard_ref(row[2:]), tuple(sharers[row[2]])) for row in rows]


def _set_shard_nodes(tx: Transaction, shard_id: int, nodes: tuple[str, ...]) -> None:
    rows = tx.execute(
        "UPDATE shards SET nodes = ? WHERE id = ? RETURNING inode", (_encode_nodes(nodes), shard_id)
    ).fetchall()
    if not rows:
        raise NotFound(f"no live shard {shard_id}")
    for (inode,) in rows:
        tx.changed(inode)


def _usage(tx: Transaction) -> UsageCounts:
    inodes, logical_bytes = tx.execute(
        "SELECT COUNT(*), CAST(COALESCE(SUM(CASE WHEN mode & ? = ? THEN size ELSE 0 END), 0) AS BIGINT) FROM inodes",
        (FILE_TYPE_BITS, stat.S_IFREG),
    ).fetchone()
    # Each object once, however many files (snapshots) share it.
    shards, stored_bytes, payload_bytes = tx.execute(
        "SELECT COUNT(*), CAST(COALESCE(SUM(length), 0) AS BIGINT),"
        " CAST(COALESCE(SUM(COALESCE(payload_length, length)), 0) AS BIGINT) FROM shards s"
        " WHERE NOT EXISTS (SELECT 1 FROM shards t WHERE t.id = s.id AND t.inode < s.inode)"
    ).fetchone()
    return UsageCounts(inodes, logical_bytes, stored_bytes, shards, payload_bytes)


def _setting(tx: Transaction, name: str) -> bytes | None:
    row = tx.execute("SELECT value FROM settings WHERE name = ?", (name,)).fetchone()
    return None if row is None else bytes(row[0])


def _set_setting(tx: Transaction, name: str, value: bytes) -> None:
    tx.execute(
        "INSERT INTO settings (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        (name, value),
    )


def _setxattr(
    tx: Transaction, inode: int, name: bytes, value: bytes, flags: int, now_ns: int
) -> InodeAttrs:
    attrs = _update_inode(tx, inode, "ctime_ns = ?", (now_ns,))
    present = tx.execute("SELECT 1 FROM xattrs WHERE inode = ? AND name = ?", (inode, name)).fetchone()
    if flags & XATTR_CREATE and present:
        raise Exists(f"inode {inode} already has xattr {name!r}")
    if flags & XATTR_REPLACE and not present:
        raise NoData(f"inode {inode} has no xattr {name!r}")
    tx.execute(
        "INSERT INTO xattrs (inode, name, value) VALUES (?, ?, ?)"
        " ON CONFLICT (inode, name) DO UPDATE SET value = excluded.value",
        (inode, name, value),
    )
    return attrs


def _getxattr(tx: Transaction, inode: int, name: bytes) -> bytes:
    row = tx.execute("SELECT value FROM xattrs WHERE inode = ? AND name = ?", (inode, name)).fetchone()
    if row is None:
        if not _inode_exists(tx, inode):
            raise NotFound(f"no inode {inode}")
        raise NoData(f"inode {inode} has no xattr {name!r}")
    value: bytes = row[0]
    return value


def _listxattr(tx: Transaction, inode: int) -> list[bytes]:
    names = [row[0] for row in tx.execute("SELECT name FROM xattrs WHERE inode = ? ORDER BY name", (inode,))]
    if not names and not _inode_exists(tx, inode):
        raise NotFound(f"no inode {inode}")
    return names


def _removexattr(tx: Transaction, inode: int, name: bytes, now_ns: int) -> InodeAttrs:
    attrs = _update_inode(tx, inode, "ctime_ns = ?", (now_ns,))
    cursor = tx.execute("DELETE FROM xattrs WHERE inode = ? AND name = ?", (inode, name))
    if cursor.rowcount == 0:
        raise NoData(f"inode {inode} has no xattr {name!r}")
    return attrs


_NODE_COLUMNS = "name, address, state, capacity, used, shard_count, last_seen_ns"


def _nodes(tx: Transaction) -> list[NodeRecord]:
    return [NodeRecord(*row) for row in tx.execute(f"SELECT {_NODE_COLUMNS} FROM nodes ORDER BY name")]


def _add_node(tx: Transaction, name: str, address: str) -> NodeRecord:
    added = tx.execute(
        "INSERT INTO nodes (name, address, state) VALUES (?, ?, ?) ON CONFLICT (name) DO NOTHING RETURNING name",
        (name, address, NODE_ACTIVE),
    ).fetchone()
    if added is None:
        raise Exists(f"node {name!r} is already registered")
    return NodeRecord(name, address, NODE_ACTIVE)


def _update_node(tx: Transaction, name: str, assignments: str, params: Sequence[Any]) -> None:
    cursor = tx.execute(f"UPDATE nodes SET {assignments} WHERE name = ?", (*params, name))
    if cursor.rowcount == 0:
        raise NotFound(f"no node {name!r}")


def _remove_node(tx: Transaction, name: str) -> None:
    if tx.execute("DELETE FROM nodes WHERE name = ?", (name,)).rowcount == 0:
        raise NotFound(f"no node {name!r}")




# -- directory quotas ---------------------------------------------------------
# Usage is charged in the transaction of each change, to the quota rows of the
# directories above the names it touches: a walk up through entries (a file's
# names) and inodes.parent (a directory's one parent) to the root, one
# recursive statement. It starts only if some quota exists, so a file system
# without quotas pays one indexed probe of an empty table per change.

_QUOTA_COLUMNS = "q.dir, q.max_bytes, q.max_inodes, q.used_bytes, q.used_inodes"
# The quota rows at or above the start directories, nearest first. {start} is
# a SELECT of (directory, 0) rows up to its WHERE clause's last condition.
_QUOTAS_ABOVE = (
    "WITH RECURSIVE up(dir, depth) AS ("
    " {start} EXISTS (SELECT 1 FROM quotas)"
    " UNION"
    " SELECT i.parent, up.depth + 1 FROM up JOIN inodes i ON i.id = up.dir WHERE up.dir <> " + str(ROOT_INODE) +
    # The trash is no part of any quota: the walk stops at its directories.
    " AND i.flags & " + str(INODE_TRASH) + " = 0"
    ") SELECT " + _QUOTA_COLUMNS + ", MIN(up.depth) FROM up JOIN quotas q ON q.dir = up.dir"
    " GROUP BY q.dir, q.max_bytes, q.max_inodes, q.used_bytes, q.used_inodes ORDER BY MIN(up.depth), q.dir"
)
_QUOTAS_ABOVE_DIRECTORY = _QUOTAS_ABOVE.format(start="SELECT CAST(? AS BIGINT), 0 WHERE")
_QUOTAS_ABOVE_NAMES = _QUOTAS_ABOVE.format(start="SELECT parent, 0 FROM entries WHERE inode = ? AND")
# The inodes below a directory (each once, however many names it has there):
# how many, the sum of the regular files' sizes, and how many regular files
# have more than one name.
_SUBTREE_USAGE = (
    "WITH RECURSIVE tree(dir) AS ("
    " SELECT CAST(? AS BIGINT)"
    " UNION"
    " SELECT e.inode FROM tree JOIN entries e ON e.parent = tree.dir JOIN inodes i ON i.id = e.inode"
    " WHERE i.mode & ? = ?"
    ") SELECT COUNT(*),"
    " CAST(COALESCE(SUM(CASE WHEN mode & ? = ? THEN size ELSE 0 END), 0) AS BIGINT),"
    " COALESCE(SUM(CASE WHEN mode & ? = ? AND nlink > 1 THEN 1 ELSE 0 END), 0)"
    " FROM inodes WHERE id IN (SELECT e.inode FROM tree JOIN entries e ON e.parent = tree.dir)"
)


def _quota_records(rows: Iterable[Sequence[Any]]) -> list[QuotaRecord]:
    return [QuotaRecord(*row[:5]) for row in rows]


def _quota_ids(quotas: Sequence[QuotaRecord]) -> frozenset[int]:
    return frozenset(quota.directory for quota in quotas)


def quotas_above(tx: Transaction, directory: int) -> list[QuotaRecord]:
    """The quotas of `directory` and of every directory above it, nearest first."""
    return _quota_records(tx.execute(_QUOTAS_ABOVE_DIRECTORY, (directory,)))


def quotas_of_inode(tx: Transaction, inode: int) -> list[QuotaRecord]:
    """The quotas above any name of a non-directory inode (what it is charged to), nearest first."""
    return _quota_records(tx.execute(_QUOTAS_ABOVE_NAMES, (inode,)))


def charge(tx: Transaction, directory: int, bytes_delta: int, inodes_delta: int, *, enforce: bool) -> None:
    """Charge a change of usage below `directory` (bytes of regular files,
    inodes) to its quota and every quota above it. With `enforce`, a growth
    that would take any of them past its limit is refused (QuotaExceeded)
    and nothing is charged. The one entry point for a body that adds,
    removes or moves names (an unnamed inode is charged to nothing)."""
    _charge_quotas(tx, quotas_above(tx, directory), bytes_delta, inodes_delta, enforce=enforce)


def _charge_quotas(
    tx: Transaction, quotas: Sequence[QuotaRecord], bytes_delta: int, inodes_delta: int, *, enforce: bool
) -> None:
    if not quotas or (bytes_delta == 0 and inodes_delta == 0):
        return
    if enforce:
        for quota in quotas:
            _check_limit(quota.directory, "bytes", quota.used_bytes, bytes_delta, quota.max_bytes)
            _check_limit(quota.directory, "inodes", quota.used_inodes, inodes_delta, quota.max_inodes)
    tx.executemany(
        "UPDATE quotas SET used_bytes = used_bytes + ?, used_inodes = used_inodes + ? WHERE dir = ?",
        [(bytes_delta, inodes_delta, directory) for directory in sorted(_quota_ids(quotas))],
    )


def _check_limit(directory: int, kind: str, used: int, delta: int, limit: int | None) -> None:
    if delta > 0 and limit is not None and used + delta > limit:
        raise QuotaExceeded(f"the quota of directory {directory} allows {limit} {kind}; {used} are used")


def _usage_of(attrs: InodeAttrs) -> tuple[int, int]:
    """What one non-directory inode is charged: (bytes, inodes)."""
    return (attrs.size if stat.S_ISREG(attrs.mode) else 0), 1


def _uncharge_name(tx: Transaction, attrs: InodeAttrs, charged: Sequence[QuotaRecord]) -> None:
    """A name of the non-directory `attrs` (as before) was just removed; it was
    charged to `charged`. Its last name: every one lets go of it; otherwise
    those of its quotas that no other name of it lies under."""
    if attrs.nlink > 1 and charged:
        left = _quota_ids(quotas_of_inode(tx, attrs.inode))
        charged = [quota for quota in charged if quota.directory not in left]
    size, inodes = _usage_of(attrs)
    _charge_quotas(tx, charged, -size, -inodes, enforce=False)


def _crosses_quotas(tx: Transaction, old_parent: int, new_parent: int) -> bool:
    """Whether a name moving from `old_parent` to `new_parent` leaves or joins a quota."""
    if old_parent == new_parent:
        return False
    return _quota_ids(quotas_above(tx, old_parent)) != _quota_ids(quotas_above(tx, new_parent))


def _move_usage(tx: Transaction, moves: Sequence[tuple[InodeAttrs, int, int]]) -> None:
    """Renamed names (the inode, its old parent, its new parent) take their
    usage along: uncharged from the quotas they leave, then charged, refused
    past a limit, to those they join. CrossDevice for a file with several
    names, or a directory holding one: its other names stay where they are."""
    usages = [_moved_usage(tx, attrs) for attrs, _, _ in moves]
    for (_, origin, destination), (size, inodes) in zip(moves, usages):
        kept = _quota_ids(quotas_above(tx, destination))
        left = [quota for quota in quotas_above(tx, origin) if quota.directory not in kept]
        _charge_quotas(tx, left, -size, -inodes, enforce=False)
    for (_, origin, destination), (size, inodes) in zip(moves, usages):
        kept = _quota_ids(quotas_above(tx, origin))
        joined = [quota for quota in quotas_above(tx, destination) if quota.directory not in kept]
        _charge_quotas(tx, joined, size, inodes, enforce=True)


def _moved_usage(tx: Transaction, attrs: InodeAttrs) -> tuple[int, int]:
    if not stat.S_ISDIR(attrs.mode):
        if attrs.nlink > 1:
            raise CrossDevice(f"inode {attrs.inode} has other names that would stay under other quotas")
        return _usage_of(attrs)
    inodes, size, linked = _subtree_usage(tx, attrs.inode)
    if linked:
        raise CrossDevice(f"directory {attrs.inode} holds files with other names that would stay under other quotas")
    return size, inodes + 1


def _subtree_usage(tx: Transaction, directory: int) -> tuple[int, int, int]:
    """(inodes, bytes, files with several names) below `directory`."""
    inodes, size, linked = tx.execute(
        _SUBTREE_USAGE,
        (directory, FILE_TYPE_BITS, stat.S_IFDIR, FILE_TYPE_BITS, stat.S_IFREG, FILE_TYPE_BITS, stat.S_IFREG),
    ).fetchone()
    return int(inodes), int(size), int(linked)


def _quota_row(tx: Transaction, directory: int) -> QuotaRecord | None:
    row = tx.execute(f"SELECT {_QUOTA_COLUMNS} FROM quotas q WHERE q.dir = ?", (directory,)).fetchone()
    return None if row is None else QuotaRecord(*row)


def _set_quota(tx: Transaction, directory: int, max_bytes: int | None, max_inodes: int | None) -> QuotaRecord:
    _require_directory(tx, directory)
    _refuse_in_trash(_inode_attrs(tx, directory))  # what is in the trash counts against no quota
    tx.changed(directory)  # other mounts learn of the new limits
    row = tx.execute(
        f"UPDATE quotas SET max_bytes = ?, max_inodes = ? WHERE dir = ? RETURNING {_QUOTA_COLUMNS.replace('q.', '')}",
        (max_bytes, max_inodes, directory),
    ).fetchone()
    if row is not None:
        return QuotaRecord(*row)
    inodes, size, _ = _subtree_usage(tx, directory)
    tx.execute(
        "INSERT INTO quotas (dir, max_bytes, max_inodes, used_bytes, used_inodes) VALUES (?, ?, ?, ?, ?)",
        (directory, max_bytes, max_inodes, size, inodes),
    )
    return QuotaRecord(directory, max_bytes, max_inodes, size, inodes)


def _quota(tx: Transaction, directory: int) -> QuotaRecord:
    quota = _quota_row(tx, directory)
    if quota is None:
        _require_directory(tx, directory)
        raise NotFound(f"directory {directory} has no quota")
    return quota


def _quotas(tx: Transaction) -> list[QuotaRecord]:
    return _quota_records(tx.execute(f"SELECT {_QUOTA_COLUMNS} FROM quotas q ORDER BY q.dir"))


def _quotas_of(tx: Transaction, inode: int) -> list[QuotaRecord]:
    row = tx.execute("SELECT mode FROM inodes WHERE id = ?", (inode,)).fetchone()
    if row is None:
        raise NotFound(f"no inode {inode}")
    return quotas_above(tx, inode) if stat.S_ISDIR(row[0]) else quotas_of_inode(tx, inode)


def _remove_quota(tx: Transaction, directory: int) -> None:
    if tx.execute("DELETE FROM quotas WHERE dir = ?", (directory,)).rowcount == 0:
        _require_directory(tx, directory, live=False)
        raise NotFound(f"directory {directory} has no quota")
    tx.changed(directory)


def _check_quotas(tx: Transaction, repair: bool) -> list[tuple[QuotaRecord, QuotaRecord]]:
    wrong = []
    for recorded in _quotas(tx):
        inodes, size, _ = _subtree_usage(tx, recorded.directory)
        counted = dataclasses.replace(recorded, used_bytes=size, used_inodes=inodes)
        if counted != recorded:
            wrong.append((recorded, counted))
            if repair:
                tx.execute(
                    "UPDATE quotas SET used_bytes = ?, used_inodes = ? WHERE dir = ?", (size, inodes, recorded.directory)
                )
    return wrong


# -- sessions ----------------------------------------------------------------

_SESSION_COLUMNS = "id, host, pid, mountpoint, started_ns, heartbeat_ns"


def _open_session(tx: Transaction, host: str, pid: int, mountpoint: str) -> int:
    now_ns = tx.clock_ns()
    session: int = tx.execute(
        "INSERT INTO sessions (host, pid, mountpoint, started_ns, heartbeat_ns) VALUES (?, ?, ?, ?, ?) RETURNING id",
        (host, pid, mountpoint, now_ns, now_ns),
    ).fetchone()[0]
    return session


def _heartbeat(tx: Transaction, session: int, synced_ns: int) -> bool:
    row = tx.execute(
        "UPDATE sessions SET heartbeat_ns = ?, synced_ns = CASE WHEN ? > synced_ns THEN ? ELSE synced_ns END"
        " WHERE id = ? RETURNING id",
        (tx.clock_ns(), synced_ns, synced_ns, session),
    ).fetchone()
    return row is not None


def _reap_sessions(tx: Transaction, timeout_ns: int) -> list[SessionRecord]:
    rows = tx.execute(
        f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE heartbeat_ns < ? ORDER BY id",
        (tx.clock_ns() - timeout_ns,),
    ).fetchall()
    reaped = [SessionRecord(*row) for row in rows]
    _drop_sessions(tx, [record.id for record in reaped])
    return reaped


def _drop_sessions(tx: Transaction, sessions: list[int]) -> None:
    for session in sessions:
        for table in ("open_files", "locks"):
            tx.execute(f"DELETE FROM {table} WHERE session = ?", (session,))
        tx.execute("DELETE FROM sessions WHERE id = ?", (session,))


def _list_sessions(tx: Transaction) -> list[SessionRecord]:
    return [SessionRecord(*row) for row in tx.execute(f"SELECT {_SESSION_COLUMNS} FROM sessions ORDER BY id")]


def _require_session(tx: Transaction, session: int) -> None:
    """SessionLost unless `session` is still registered (it was not reclaimed)."""
    if tx.execute("SELECT 1 FROM sessions WHERE id = ?", (session,)).fetchone() is None:
        raise SessionLost.of(session)


def _record_open(tx: Transaction, session: int, inode: int) -> None:
    """`session` holds `inode` open; SessionLost if the session was reclaimed."""
    _require_session(tx, session)
    tx.execute(
        "INSERT INTO open_files (session, inode) VALUES (?, ?) ON CONFLICT (session, inode) DO NOTHING",
        (session, inode),
    )


def _open_file(tx: Transaction, session: int, inode: int) -> InodeAttrs:
    attrs = _inode_attrs(tx, inode)
    _record_open(tx, session, inode)
    return attrs


def _close_files(tx: Transaction, session: int, inodes: list[int]) -> None:
    tx.executemany("DELETE FROM open_files WHERE session = ? AND inode = ?", [(session, inode) for inode in inodes])


# -- locks -------------------------------------------------------------------

_LOCK_MODES = {F_RDLCK: "read", F_WRLCK: "write"}
_LOCK_TYPES = {mode: lock_type for lock_type, mode in _LOCK_MODES.items()}


def _locks_of(tx: Transaction, inode: int) -> list[LockRecord]:
    rows = tx.execute(
        "SELECT session, owner, kind, mode, first_byte, last_byte, pid FROM locks WHERE inode = ?"
        " ORDER BY first_byte, session, owner",
        (inode,),
    )
    return [LockRecord((row[0], row[1]), row[2], _LOCK_TYPES[row[3]], row[4], row[5], row[6]) for row in rows]


def _set_lock(tx: Transaction, session: int, inode: int, request: LockRecord) -> LockRecord | None:
    _require_session(tx, session)
    tx.lock_inodes((inode,))  # one lock change of a file at a time, on every engine
    existing = _locks_of(tx, inode)
    blocking = conflict(existing, request)
    if blocking is not None:
        return blocking
    _, owner = cast(tuple[int, int], request.owner_key)
    tx.execute(
        "DELETE FROM locks WHERE inode = ? AND session = ? AND owner = ? AND kind = ?",
        (inode, session, owner, request.kind),
    )
    tx.executemany(
        "INSERT INTO locks (session, inode, owner, kind, mode, first_byte, last_byte, pid) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (session, inode, owner, record.kind, _LOCK_MODES[record.type], record.start, record.end, record.pid)
            for record in apply(existing, request)
        ],
    )
    return None


def _test_lock(tx: Transaction, inode: int, request: LockRecord) -> LockRecord | None:
    return conflict(_locks_of(tx, inode), request)


def _release_locks(tx: Transaction, session: int, inode: int, owners: list[int], kind: str | None) -> None:
    for owner in owners:
        tx.execute(
            "DELETE FROM locks WHERE inode = ? AND session = ? AND owner = ?" + ("" if kind is None else " AND kind = ?"),
            (inode, session, owner) if kind is None else (inode, session, owner, kind),
        )
