"""The metadata store interface: one atomic operation per call.

Every method is async and is one transaction in the engine, so a networked
engine can implement it without relying on "no await in between". Names are
bytes, times are integer nanoseconds since the epoch, and failures are the
DfsError subclasses from dfsfuse.errors (NotFound, Exists, NotEmpty, ...).

Directory listing offsets are opaque positive integers chosen by the engine:
`readdir(parent, after=0)` starts a listing and `readdir(parent, after=e.offset)`
resumes right after entry `e`. Entries added or removed during a listing may or
may not appear, but no other entry is skipped or repeated.

Changes return the attrs after of the inodes and directories they touched,
and changes of names the offsets of their entries, so that a cache in front
of the engine can follow them exactly instead of reading them back (which
would cost a round trip per name created).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Awaitable, Callable, Mapping, Sequence

import trio

from dfsfuse.errors import InvalidArgument, NameTooLong
from dfsfuse.metadata.locks import LockRecord
from dfsfuse.shards.encoding import Encoding

ROOT_INODE = 1
NAME_MAX = 255  # the longest name in bytes, as on Linux file systems

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2

XATTR_CREATE = 1
XATTR_REPLACE = 2

# An inode of a read-only snapshot: every change of it, or of the entries of
# such a directory, is refused (EROFS).
INODE_READONLY = 1
# The trash directory, its hour directories and the files in them
# (dfsfuse/metadata/trash.py): names cannot be added to or removed from such
# a directory, nor such a file changed (EPERM); a file may be moved out.
INODE_TRASH = 2

# How many replicas a file's shards get (ASCII digits); on a directory,
# inherited by the files and subdirectories created in it. Absent: the
# configured R.
REPLICAS_XATTR = b"user.dfs.replicas"
# How a file's new shards are compressed ("zstd", "lz4", "off") and erasure
# coded ("K+M", "off"); inherited like REPLICAS_XATTR. Absent: the config's
# compression, and replication.
COMPRESSION_XATTR = b"user.dfs.compression"
ERASURE_XATTR = b"user.dfs.ec"
# The xattrs a new file or directory copies from its directory.
POLICY_XATTRS = (REPLICAS_XATTR, COMPRESSION_XATTR, ERASURE_XATTR)

# The jobs that run in one place at a time however many mounts there are
# (try_role): collecting garbage, and repairing and scrubbing replicas.
ROLE_GARBAGE = "garbage"
ROLE_MAINTENANCE = "maintenance"
ROLES = (ROLE_GARBAGE, ROLE_MAINTENANCE)

# How long after a shard became garbage a session that holds its file open
# may still read it: the reads it began before it heard of the change.
SETTLE_NS = 5 * 10**9


def check_name(name: bytes) -> None:
    """Refuse a name no directory entry can have: InvalidArgument (EINVAL) if it
    is empty, holds b"/" or NUL, or is b"." or b".."; NameTooLong past NAME_MAX.

    The one rule for names, kept by every engine for the names it stores and
    by the POSIX layer before it asks (lookup resolves b"." and b".." itself,
    so it checks only other names).
    """
    if name in (b"", b".", b"..") or b"/" in name or b"\0" in name:
        raise InvalidArgument(f"invalid file name {name!r}")
    if len(name) > NAME_MAX:
        raise NameTooLong(f"file name of {len(name)} bytes (at most {NAME_MAX})")


@dataclasses.dataclass(frozen=True)
class InodeAttrs:
    """The attributes of one inode, as `stat` shows them.

    `blocks` counts 512-byte units of file data actually stored (the sum of
    the lengths of the inode's shards, once, not per replica), so holes take
    no space. `target` is the link target of a symlink, else b"". `flags` is
    a bit set of INODE_* flags.
    """

    inode: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blocks: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    target: bytes = b""
    flags: int = 0

    @property
    def readonly(self) -> bool:
        return bool(self.flags & INODE_READONLY)

    @property
    def in_trash(self) -> bool:
        return bool(self.flags & INODE_TRASH)


def same_file_state(before: InodeAttrs, after: InodeAttrs) -> bool:
    """Whether two attrs of one inode show the same file: alike in all but
    the atime (which reads move). If not, its data may have changed too."""
    return dataclasses.replace(before, atime_ns=0) == dataclasses.replace(after, atime_ns=0)


@dataclasses.dataclass(frozen=True)
class AttrChanges:
    """The fields a setattr call changes; None means unchanged.

    ctime is always set to `now_ns` by setattr. The size of a file is not
    changed here but through `commit_shards` (it goes with the shard map),
    which takes AttrChanges too, for a setattr that changes both.
    """

    mode: int | None = None  # permission bits and setuid/setgid/sticky (mode & 0o7777)
    uid: int | None = None
    gid: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None


@dataclasses.dataclass(frozen=True)
class ShardRef:
    """Where one stored object of a file lives and how to verify it.

    An object is either a whole shard or a patch on top of one. `nodes` names
    the node stores that hold a replica, `checksum` is the xxh3-128 digest
    (16 bytes) of the object's `length` bytes. Shard ids are never reused.

    A whole shard (`pages` empty) holds the bytes [0, length) of its shard
    index. A patch holds PAGE_SIZE (layout.py) bytes for each page number in `pages`
    (pages of the shard index, ascending), one after another, so
    length == len(pages) * PAGE_SIZE. Patches let a small overwrite store
    only the pages it changed instead of the whole shard.

    `encoding` says how the object's bytes are kept (compressed, sealed,
    erasure coded: dfsfuse/shards/encoding.py); None: plain replicas. For an
    erasure-coded object `nodes` has one slot per fragment, in order.
    """

    shard_id: int
    length: int
    checksum: bytes
    nodes: tuple[str, ...]
    pages: tuple[int, ...] = ()
    encoding: Encoding | None = None

    @property
    def is_patch(self) -> bool:
        return bool(self.pages)


# The objects of one shard index, in the order they apply: the whole shard
# first (if there is one), then its patches, oldest first. A later object's
# pages win; bytes no object holds read as zeros.
ShardLayers = tuple[ShardRef, ...]


@dataclasses.dataclass(frozen=True)
class DirEntry:
    name: bytes
    attrs: InodeAttrs
    offset: int  # pass as `after` to resume the listing after this entry


@dataclasses.dataclass(frozen=True)
class EntryChange:
    """What create, link, unlink and rmdir did, so that a cache can follow the
    change without asking the engine again.

    `attrs` is the inode named, after the change; `parent` the directory's
    attrs after (mtime, ctime, nlink); `offset` the readdir offset of the entry
    added or removed. An added entry always has the highest offset in its
    directory, so it comes last in a listing. `xattrs`, for create, are every
    xattr the new inode was given (an inherited REPLICAS_XATTR), so a cache
    knows all of them and the caller its replica count; empty otherwise.
    `trash`, for an unlink that moved the name into the trash instead, is
    what that changed besides (trash directories, the entry added there,
    the inode's xattrs), for a cache to forget; then `attrs.nlink` did not drop.
    """

    attrs: InodeAttrs
    parent: InodeAttrs
    offset: int
    xattrs: Mapping[bytes, bytes] = dataclasses.field(default_factory=dict)
    trash: ChangeNotice | None = None


@dataclasses.dataclass(frozen=True)
class RenameChange:
    """What a rename did, in the same spirit as EntryChange.

    All attrs are as after the change. `moved` is the inode that old_name
    named (its ctime changed); `exchanged`, with RENAME_EXCHANGE, the inode
    that new_name named and old_name names now; `replaced`, without it, the
    inode that new_name named and no longer does (nlink reduced, so the caller
    can delete it once unreferenced), if any. `parents` are old_parent and
    new_parent (just one if they are the same directory). `offset` is the
    readdir offset of the entry now named new_name in new_parent: an entry
    keeps its offset when it is renamed, and both entries keep theirs in an
    exchange. `trash`: what the rename changed in the trash besides, for a
    cache to forget: the replaced file moved into it (then `replaced` keeps
    its nlink), or `moved` restored out of it (its trash xattrs gone).
    """

    moved: InodeAttrs
    exchanged: InodeAttrs | None
    replaced: InodeAttrs | None
    parents: tuple[InodeAttrs, ...]
    offset: int
    trash: ChangeNotice | None = None


@dataclasses.dataclass(frozen=True)
class TrashEntry:
    """A file in the trash: its hour directory (inode and name), its name
    there, its inode, size and stored bytes (one copy), the path it had, and
    when it was deleted and expires (ns)."""

    hour_dir: int
    hour: bytes
    name: bytes
    inode: int
    size: int
    stored_bytes: int
    path: bytes
    deleted_ns: int
    expires_ns: int


@dataclasses.dataclass(frozen=True)
class TrashPurge:
    """What purge_trash did: the attrs after of the inodes whose trash name
    it removed (nlink 0 unless linked elsewhere: the caller deletes them
    once unreferenced), and what it changed, for caches to forget."""

    unlinked: tuple[InodeAttrs, ...]
    notice: ChangeNotice


@dataclasses.dataclass(frozen=True)
class TreeChange:
    """What snapshot_tree and remove_tree did. `entry` is as for create (the
    snapshot's top inode, its parent after, the entry's offset and the top
    inode's xattrs) or unlink (the top inode after, nlink 0 if it has no name
    left). `inodes` is every inode the tree holds, the top one included, and
    `logical_bytes` the sum of its regular files' sizes. `unlinked` are
    the inodes remove_tree left without a name (to delete once unreferenced)."""

    entry: EntryChange
    inodes: tuple[int, ...]
    logical_bytes: int
    unlinked: tuple[int, ...] = ()


# Progress of a long engine call: (done, total), called from the thread the
# transaction runs on, every few thousand entries.
ProgressReport = Callable[[int, int], None]


@dataclasses.dataclass(frozen=True)
class UsageCounts:
    inodes: int
    logical_bytes: int  # sum of file sizes (regular files)
    stored_bytes: int  # sum of shard lengths (one copy)
    shards: int
    payload_bytes: int = 0  # sum of the objects' payloads: compressed and sealed, one copy


@dataclasses.dataclass(frozen=True)
class QuotaRecord:
    """A directory quota: its limits (None: no limit of that kind) and what is
    used below the directory now (the directory itself not counted): the
    sizes of the regular files, and the inodes of every type. A file with
    several names is counted once."""

    directory: int
    max_bytes: int | None
    max_inodes: int | None
    used_bytes: int
    used_inodes: int


@dataclasses.dataclass(frozen=True)
class ShardRecord:
    """One live shard as listed for fsck and status: `inode` and `index` of
    the file with the lowest inode number that has it, and `sharers`, every
    file that has it (more than one when snapshots share it; empty: `inode`
    alone, as a record built by hand says)."""

    inode: int
    index: int
    ref: ShardRef
    sharers: tuple[int, ...] = ()


NODE_ACTIVE = "active"  # takes new replicas
NODE_DRAINING = "draining"  # takes none; its replicas are being moved elsewhere
NODE_DRAINED = "drained"  # takes none and holds none; may be removed
NODE_STATES = (NODE_ACTIVE, NODE_DRAINING, NODE_DRAINED)


@dataclasses.dataclass(frozen=True)
class NodeRecord:
    """A node store in the cluster's registry, with what it last reported."""

    name: str  # the name ShardRef.nodes records
    address: str  # "local:/absolute/path" or "HOST:PORT" of a node server
    state: str  # one of NODE_STATES
    capacity: int = 0  # bytes, as last reported; 0 until the node is first seen
    used: int = 0  # bytes taken by replicas, as last reported
    shards: int = 0  # replicas held, as last reported
    last_seen_ns: int = 0  # when the node last answered; 0: never


@dataclasses.dataclass(frozen=True)
class SessionRecord:
    """One mount of the file system, as it registered itself (open_session).

    Times are ns since the epoch by the engine's clock (one clock for every
    machine: a networked engine's server), so that machines whose clocks
    disagree still agree on which session is stale.
    """

    id: int  # never reused: a reclaimed session stays reclaimed
    host: str
    pid: int
    mountpoint: str
    started_ns: int
    heartbeat_ns: int


@dataclasses.dataclass(frozen=True)
class ChangeNotice:
    """What another mount changed, for a cache to forget (follow_changes).

    `inodes` are inodes whose attrs, xattrs or contents changed, or that were
    deleted; `entries` are (directory, name) whose entry was added, removed
    or now names another inode. `everything`: the engine cannot say (a notice
    too large to send, or notices lost while the engine was unreachable), so
    nothing cached can be trusted. `barrier`, if not 0, is this session's
    own send_barrier coming back, and no change.
    """

    inodes: frozenset[int] = frozenset()
    entries: frozenset[tuple[int, bytes]] = frozenset()
    everything: bool = False
    barrier: int = 0


class MetadataStore(abc.ABC):
    """Inodes, directory entries, shard maps, xattrs, the garbage list, the node
    registry, and the sessions of the mounts that use them."""

    # Whether other mounts may change this metadata while this one runs (a
    # networked engine): then mounts register sessions and record the files
    # they hold open, and follow_changes tells each what the others changed.
    shared = False

    # -- inodes and names -------------------------------------------------
    @abc.abstractmethod
    async def getattr(self, inode: int) -> InodeAttrs:
        """NotFound if the inode does not exist (or was deleted)."""

    @abc.abstractmethod
    async def lookup(self, parent: int, name: bytes) -> InodeAttrs:
        """The inode named `name` in directory `parent`; NotFound if none.

        b"." and b".." are resolved too (".." of the root is the root).
        """

    @abc.abstractmethod
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
        """Make a new inode of any type (mode includes S_IFMT) and name it.

        A directory starts with nlink 2 and adds one to its parent's nlink; a
        symlink stores `target` and its size is len(target). The parent's
        mtime and ctime become now_ns. A new regular file or directory gets
        the parent's REPLICAS_XATTR, if it has one, in the same transaction
        (other types get no xattr); EntryChange.xattrs says what it got.
        Exists if the name is taken, NotFound or NotADirectory if `parent` is
        not a live directory, InvalidArgument or NameTooLong for a name
        check_name refuses. With `opened_by`, a session id, a new regular
        file is recorded as open in that session, as open_file does
        (SessionLost if the session is gone).
        """

    @abc.abstractmethod
    async def link(self, inode: int, new_parent: int, new_name: bytes, now_ns: int) -> EntryChange:
        """A new name for an existing non-directory inode; nlink + 1.

        Exists if taken; NotPermitted (EPERM) if `inode` is a directory.
        """

    @abc.abstractmethod
    async def unlink(self, parent: int, name: bytes, now_ns: int, trash_days: float = 0.0) -> EntryChange:
        """Remove a non-directory name; `attrs` are the inode's after (nlink - 1).

        The inode itself stays until `delete_inodes` (it may still be open).
        IsADirectory if the name is a directory, NotFound if absent.

        The trash: if the name is the inode's last and the trash keeps files
        deleted here (the TRASH_DAYS_XATTR of the nearest directory up from
        `parent` that has one, else `trash_days`, is above 0), the name is
        moved into the trash instead (EntryChange.trash). Names in the trash
        cannot be unlinked (NotPermitted).
        """

    @abc.abstractmethod
    async def rmdir(self, parent: int, name: bytes, now_ns: int) -> EntryChange:
        """Remove an empty directory; `attrs` are its attrs after (nlink 0).

        NotEmpty, NotADirectory or NotFound as appropriate. The parent's
        nlink drops by one.
        """

    @abc.abstractmethod
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
        """POSIX rename with RENAME_NOREPLACE and RENAME_EXCHANGE (flags).

        A replaced file goes to the trash as `unlink` says, in the same
        transaction. A file moved out of the trash is restored (loses its
        trash xattrs); nothing can be moved into the trash (NotPermitted).

        Without flags an existing target is replaced: a file by a non-directory,
        an empty directory by a directory (NotEmpty, IsADirectory, NotADirectory
        otherwise). Renaming a directory into its own subtree is InvalidArgument.
        Renaming a name onto itself (or onto another link of the same inode)
        does nothing and returns None. Parent nlinks follow directories that
        move; ctime of the moved inodes and mtime/ctime of both parents become
        now_ns.
        """

    @abc.abstractmethod
    async def setattr(self, inode: int, changes: AttrChanges, now_ns: int) -> InodeAttrs:
        """Apply `changes`; ctime becomes now_ns."""

    @abc.abstractmethod
    async def readdir(self, parent: int, after: int, limit: int) -> list[DirEntry]:
        """Up to `limit` entries of `parent` after offset `after` (0: from the
        start), in offset order, without "." and "..". NotFound/NotADirectory
        for a bad parent."""

    @abc.abstractmethod
    @abc.abstractmethod
    async def snapshot_tree(
        self, source: int, parent: int, name: bytes, readonly: bool, now_ns: int,
        report: ProgressReport | None = None,
    ) -> TreeChange:
        """Make `name` in `parent` a copy of the inode `source` and, if it is a
        directory, of everything below it, as of one instant: new inodes with
        the same attributes (ctime now), xattrs and names, hard links within
        the tree kept, and the same shard objects, shared rather than copied
        (objects are immutable; a later write to either side replaces objects
        in its own map only). `readonly`: every new inode gets INODE_READONLY.
        InvalidArgument for a directory into itself; Exists if `name` is taken."""

    @abc.abstractmethod
    async def remove_tree(self, parent: int, name: bytes, now_ns: int, report: ProgressReport | None = None) -> TreeChange:
        """Remove `name` in `parent` and, if it is a directory, every name below
        it, read-only or not, in one transaction. Inodes left without a name
        are returned in TreeChange.unlinked, to delete_inodes once unreferenced."""

    async def delete_inodes(self, inodes: Sequence[int]) -> None:
        """Remove inodes with nlink 0 for good, all in one transaction: their
        xattrs go, their shards move to the garbage list. Skips an inode that
        has links again, is gone already, or is open in some session."""

    @abc.abstractmethod
    async def trash_entries(self, expiring_before_ns: int | None = None) -> list[TrashEntry]:
        """The files in the trash, oldest hour first; with `expiring_before_ns`,
        only those of the hour directories that begin before it (a superset
        of the entries that expire before it)."""

    @abc.abstractmethod
    async def purge_trash(self, entries: Sequence[tuple[int, bytes]]) -> TrashPurge:
        """Remove these (hour directory, name) entries from the trash for good,
        and every hour directory left empty; entries gone meanwhile are skipped."""

    @abc.abstractmethod
    async def orphan_inodes(self) -> list[int]:
        """Inodes with nlink 0 that no session holds open (left behind when a
        mount died with them open, or when the last session that held one
        open closed it)."""

    # -- file contents ----------------------------------------------------
    @abc.abstractmethod
    async def shard_map(self, inode: int) -> Mapping[int, ShardLayers]:
        """The file's objects by shard index (holes are absent).

        Read-only: the caller must not change the mapping returned. A cache
        returns its own (CachedMetadata: the same mapping until the file's
        shards change, then a new one), so that the POSIX layer can read an
        open file's shard map from it on every read instead of keeping a copy.
        """

    @abc.abstractmethod
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
        """Atomically point shard indexes at new objects and set the file size.

        First every object at an index >= `drop_from` (if given) and at the
        indexes in `holes` (a punched hole: they read as zeros) is removed,
        then each entry of `shards` is applied: a whole shard replaces every
        object at its index, a patch is added on top of them. Objects that
        are no longer referenced move to the garbage list. `blocks` is
        recomputed; mtime/ctime are set when given. Call only after every
        replica of every object in `shards` is stored.

        `changes`, if given, are applied in the same transaction, after the
        times, as setattr(inode, changes, ctime_ns) would apply them (so a
        time in `changes` wins over `mtime_ns`); ctime_ns is then required
        (InvalidArgument without it). A setattr that also sets the size
        (truncate with a mode, owner or times) is so one call.
        """

    @abc.abstractmethod
    async def allocate_shard_ids(self, count: int) -> range:
        """`count` fresh shard ids, never handed out before (even after a crash).

        Shard ids stay below 2**63 (signed 64-bit); dfsfuse.cluster.snapshots
        names snapshots with the ids above.
        """

    @abc.abstractmethod
    async def garbage(self, limit: int) -> list[tuple[int, tuple[str, ...]]]:
        """Shards no longer referenced, as (shard_id, nodes), awaiting
        deletion; but not those of a file that some session holds open and
        whose cached shard map may still name them: a session that has not
        heard of every change committed until SETTLE_NS after the shard
        became garbage (its heartbeat's `synced_ns`)."""

    @abc.abstractmethod
    async def forget_garbage(self, shard_ids: Sequence[int]) -> None:
        """Drop these from the garbage list once their replicas are deleted."""

    @abc.abstractmethod
    async def shards(self, after_shard_id: int, limit: int) -> list[ShardRecord]:
        """Live shards with shard_id > after_shard_id, ascending (for fsck/status)."""

    @abc.abstractmethod
    async def set_shard_nodes(self, shard_id: int, nodes: tuple[str, ...]) -> None:
        """Record where a live shard's replicas now are (after a repair)."""

    @abc.abstractmethod
    async def layout(self, shard_size: int, block_size: int) -> tuple[int, int]:
        """The file system's (shard size, block size), fixed for its whole life.

        The first call records the given values; every later call returns the
        recorded ones, whatever it is given (shard indexes and replica
        formats depend on them).
        """

    @abc.abstractmethod
    async def usage(self) -> UsageCounts:
        """Counts for status and statfs."""

    @abc.abstractmethod
    async def setting(self, name: str) -> bytes | None:
        """A named value of the whole file system (the encryption keyring);
        None if it was never set."""

    @abc.abstractmethod
    async def set_setting(self, name: str, value: bytes) -> None:
        """Set a named value, replacing any earlier one."""

    # -- directory quotas ---------------------------------------------------
    # Usage is kept by every change in its own transaction: create, link,
    # unlink, rmdir, rename and commit_shards charge the quota directories
    # above the names they touch. create and rename refuse with
    # QuotaExceeded (EDQUOT) what would exceed a limit; commit_shards never
    # refuses (the POSIX layer checks growth at write time, before the data
    # is accepted). link, and rename of a file with several names or of a
    # directory holding one, between directories with different sets of
    # quota directories above them are refused with CrossDevice (EXDEV), so
    # a file is always charged exactly once to each quota it lies under.
    @abc.abstractmethod
    async def set_quota(self, directory: int, max_bytes: int | None, max_inodes: int | None) -> QuotaRecord:
        """Set the limits of a directory's quota (None: no limit of that
        kind), making the quota if the directory has none: then its usage is
        counted from the tree in the same transaction. A limit below the
        usage is allowed (further growth is refused). NotFound or
        NotADirectory unless `directory` is a live directory;
        InvalidArgument for a negative limit."""

    @abc.abstractmethod
    async def quota(self, directory: int) -> QuotaRecord:
        """The quota set on `directory`; NotFound if it has none."""

    @abc.abstractmethod
    async def quotas(self) -> list[QuotaRecord]:
        """Every quota, by directory."""

    @abc.abstractmethod
    async def quotas_of(self, inode: int) -> list[QuotaRecord]:
        """The quotas an inode is charged to, nearest first: those set on a
        directory at or above it (for a directory, its own included; for a
        file, above any of its names). Empty for an unnamed inode."""

    @abc.abstractmethod
    async def remove_quota(self, directory: int) -> None:
        """Drop the quota of `directory`; NotFound if it has none. (Removing
        the directory drops its quota too.)"""

    @abc.abstractmethod
    async def check_quotas(self, repair: bool) -> list[tuple[QuotaRecord, QuotaRecord]]:
        """Count every quota's usage from the tree, in one transaction; the
        quotas whose recorded usage differs, as (recorded, counted), and
        with `repair` the counted usage is recorded (fsck)."""

    # -- extended attributes ----------------------------------------------
    @abc.abstractmethod
    async def setxattr(self, inode: int, name: bytes, value: bytes, flags: int, now_ns: int) -> InodeAttrs:
        """Set an xattr; flags XATTR_CREATE (Exists if present) or XATTR_REPLACE
        (NoData if absent). ctime becomes now_ns; returns the inode's attrs after."""

    @abc.abstractmethod
    async def getxattr(self, inode: int, name: bytes) -> bytes:
        """NoData if absent."""

    @abc.abstractmethod
    async def listxattr(self, inode: int) -> list[bytes]:
        """Names of all xattrs of the inode."""

    @abc.abstractmethod
    async def removexattr(self, inode: int, name: bytes, now_ns: int) -> InodeAttrs:
        """NoData if absent. ctime becomes now_ns; returns the inode's attrs after."""

    # -- the node registry -------------------------------------------------
    # Not file system state a cache could serve: callers want it fresh.
    @abc.abstractmethod
    async def nodes(self) -> list[NodeRecord]:
        """Every registered node, by name."""

    @abc.abstractmethod
    async def add_node(self, name: str, address: str) -> NodeRecord:
        """Register an active node; Exists if the name is taken."""

    @abc.abstractmethod
    async def set_node_state(self, name: str, state: str) -> None:
        """Move a node to one of NODE_STATES (InvalidArgument otherwise); NotFound if unknown."""

    @abc.abstractmethod
    async def record_node_stat(self, name: str, capacity: int, used: int, shards: int, seen_ns: int) -> None:
        """Record what a node reported when it last answered; NotFound if unknown."""

    @abc.abstractmethod
    async def remove_node(self, name: str) -> None:
        """Drop a node from the registry; NotFound if unknown. Its replicas are the caller's business."""

    # -- sessions: the mounts using the metadata ---------------------------
    @abc.abstractmethod
    async def open_session(self, host: str, pid: int, mountpoint: str) -> int:
        """Register a mount; its new session id, heartbeat now."""

    @abc.abstractmethod
    async def heartbeat(self, session: int, synced_ns: int = 0) -> bool:
        """Note that the session is alive, and (if `synced_ns`, by the
        engine's clock, send_barrier's) that it has applied every change
        committed before that; False if it was reclaimed as stale (then it
        holds nothing any more, and must not act as if it did)."""

    @abc.abstractmethod
    async def reap_sessions(self, timeout_ns: int) -> list[SessionRecord]:
        """Reclaim every session whose heartbeat is older than `timeout_ns`:
        it and its open-file records and locks go, in one transaction; the
        sessions reclaimed (each by exactly one caller)."""

    @abc.abstractmethod
    async def list_sessions(self) -> list[SessionRecord]:
        """Every registered session, by id."""

    @abc.abstractmethod
    async def close_session(self, session: int) -> None:
        """End a session and drop all it holds (an unmount)."""

    @abc.abstractmethod
    async def open_file(self, session: int, inode: int) -> InodeAttrs:
        """Record that `session` holds `inode` open, so that no other mount
        deletes it (or the shards it reads) meanwhile; its attrs, fresh.
        NotFound if it is gone; SessionLost if the session is."""

    @abc.abstractmethod
    async def close_files(self, session: int, inodes: Sequence[int]) -> None:
        """`session` holds these inodes open no longer."""

    # -- locks: fcntl and flock, one table for every mount -----------------
    @abc.abstractmethod
    async def set_lock(self, session: int, inode: int, request: LockRecord) -> LockRecord | None:
        """Grant `request` (dfsfuse.metadata.locks; its owner_key is
        (session, the kernel's lock owner)), or return the lock of another
        owner that keeps it from being granted, changing nothing. An F_UNLCK
        request always succeeds. SessionLost if the session is gone."""

    @abc.abstractmethod
    async def test_lock(self, inode: int, request: LockRecord) -> LockRecord | None:
        """The lock of another owner that `request` would conflict with, or None (F_GETLK)."""

    @abc.abstractmethod
    async def release_locks(self, session: int, inode: int, owners: Sequence[int], kind: str | None) -> None:
        """Drop the locks (of `kind`, or of both kinds) these owners of the session hold on the inode."""

    async def follow_changes(
        self, session: int, on_change: Callable[[ChangeNotice], Awaitable[None]],
        *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Call `on_change` with what other sessions change, in commit order,
        until cancelled (start it with nursery.start: it is listening once
        started). Metadata that is not `shared` has nothing to tell."""
        task_status.started()

    async def send_barrier(self, session: int, token: int) -> int | None:
        """Have follow_changes hand `session` ChangeNotice(barrier=token) after
        every change committed before this call; the engine's clock when it
        was sent, or None if there is no such order to wait for (metadata
        that is not `shared`)."""
        return None

    async def try_role(self, role: str, wait: float = 0.0) -> bool:
        """Whether this process holds `role` (one of ROLES) now, trying for up
        to `wait` seconds: at most one process using the metadata does at a
        time, until it lets go (release_role), closes the metadata or dies.
        Asking again keeps it, or tries again to take it. Metadata that is
        not `shared` has one user, who holds every role."""
        return True

    async def release_role(self, role: str) -> None:
        """Let another process take `role` (try_role)."""

    # -- lifecycle --------------------------------------------------------
    @abc.abstractmethod
    async def snapshot(self) -> bytes:
        """The whole metadata as of one instant, as a dump (dfsfuse.metadata.dump:
        a versioned envelope naming this engine around the engine's own image)
        from which dfsfuse.metadata.engines.load_dump makes the metadata of a
        new data dir. dfsfuse.cluster.snapshots keeps such dumps on the nodes."""

    @abc.abstractmethod
    async def sync(self) -> None:
        """Make every committed change durable on stable storage."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the engine; further calls are errors."""
