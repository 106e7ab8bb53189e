"""The composition root: build the stores and metadata, mount, serve, unmount.

`mount` checks everything a person can get wrong before anything is mounted,
takes the data directory's lock (one mount per data directory), and, unless
asked to stay in the foreground, forks a daemon that reports back through a
pipe: the command returns only when the file system is mounted, or prints
the daemon's one-line error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import trio

from . import metrics
from .cluster.autorepair import background_repair
from .cluster.control import ControlServer
from .cluster.heartbeat import probe
from .cluster.nodeset import NodeSet
from .cluster.operations import (
    MAINTENANCE_BUSY,
    OPERATIONS,
    Cluster,
    Output,
    maintenance_turn,
)
from .cluster.registry import NodeAccess, open_store_or_stand_in, register_config_nodes
from .cluster.session import MountSession
from .cluster.snapshots import SnapshotWriter
from .cluster.tree import TREE_OPERATIONS
from .config import Config, check_write_buffer, parse_metrics_listen, parse_trash_days
from .datadir import DataDirLock, mountpoint_of, prepare_data_dir, require_file_system
from .errors import UserError
from .metadata.base import NODE_ACTIVE, MetadataStore, NodeRecord
from .metadata.cache import CachedMetadata
from .metadata.engines import is_shared, metadata_exists, mount_creates, open_engine
from .shards.cache import ShardCache
from .shards.garbage import GarbageCollector
from .shards.objects import ObjectCodec
from .shards.replicator import Replicator
from .shards.sealing import FileSystemKey, mount_key
from .storage.base import NodeStore, StoreStat
from .vfs.filesystem import FileSystem
from .vfs.reader import ReadServices
from .vfs.trash import TrashSweeper
from .write.buffer import WriteBudget
from .write.file_writer import WriteServices
from .write.flusher import Flusher, flush_channel
from .write.quotas import QuotaGuard
from .write.storer import ShardStorer
from .write.unsynced import UnsyncedReplicas

log = logging.getLogger("dfsfuse")

MOUNT_OPTIONS = {"allow_other", "ro", "rw", "nosuid", "suid", "nodev", "dev", "noexec", "exec", "noatime"}


@dataclasses.dataclass
class Components:
    meta: MetadataStore
    stores: list[NodeStore]
    replicator: Replicator
    nodes: list[NodeRecord]  # the registry when the stores were opened, by name
    access: NodeAccess  # how node servers are reached
    config: Config  # the config, with the shard and block size the file system was made with
    key: FileSystemKey | None  # with `unlock`, an encrypted file system's key (what the replicator seals with)


@contextlib.asynccontextmanager
async def open_components(
    config: Config, cached: bool, create: bool = False, unlock: bool = False, beside_mounts: bool = False
) -> AsyncIterator[Components]:
    """Open the metadata engine and the node stores its registry lists (a
    store that cannot be opened is stood in for by an UnreachableStore);
    with `create`, a file system is made if the metadata holds none. With
    `unlock` (a mount), an encrypted file system is unlocked with the config's
    key file and the replicator seals and opens objects; without it (the
    commands, which only move and verify payloads), no key is read. With
    `beside_mounts` (status, which runs while mounts write), local node
    stores are opened as one user among others (LocalStore's `exclusive`).

    An empty registry is seeded with the config's [[nodes]] first. A config
    that does not set shard_size and block_size takes the file system's (a
    machine that only runs commands need not repeat them); one that sets
    other values is refused.
    """
    engine = await open_engine(config.metadata, create=create)
    meta: MetadataStore = CachedMetadata(engine, config.metadata_entries) if cached else engine
    stores: list[NodeStore] = []
    try:
        key = await mount_key(meta, config.key_file, config.metadata.where) if unlock else None
        recorded = await meta.layout(config.shard_size, config.block_size)
        if recorded != (config.shard_size, config.block_size):
            if config.layout_given:
                raise UserError(
                    f"config: this file system was made with shard_size {recorded[0]} and block_size {recorded[1]};"
                    " they cannot change (set them back in the config file, or leave them out)"
                )
            config = dataclasses.replace(config, shard_size=recorded[0], block_size=recorded[1])
            check_write_buffer(config.write_buffer_bytes, config.shard_size)
        nodes = await register_config_nodes(meta, config.nodes)
        if len(nodes) < config.replicas:
            raise UserError(
                f"config: replicas = {config.replicas} but the cluster has {len(nodes)} nodes"
                " (see dfsfuse node list; lower replicas or add nodes)"
            )
        access = dataclasses.replace(
            NodeAccess.from_config(config), local_exclusive=not (beside_mounts or meta.shared)
        )
        for node in nodes:
            stores.append(await open_store_or_stand_in(node, access))
        replicator = Replicator(
            stores, config.replicas, config.block_size, write_quorum=config.write_quorum, codec=ObjectCodec(key)
        )
        replicator.update_nodes(stores, [node.name for node in nodes if node.state == NODE_ACTIVE])
        yield Components(meta, stores, replicator, nodes, access, config, key)
    finally:
        with trio.CancelScope(shield=True):
            for store in stores:
                await store.close()
            await meta.close()


@dataclasses.dataclass
class FileSystemParts:
    """A running FileSystem and the shared parts under it."""

    fs: FileSystem
    budget: WriteBudget
    cache: ShardCache
    garbage: GarbageCollector


@contextlib.asynccontextmanager
async def running_file_system(
    meta: MetadataStore, replicator: Replicator, config: Config, session: MountSession | None = None,
    quotas: QuotaGuard | None = None,
) -> AsyncIterator[FileSystemParts]:
    """Build the POSIX layer and its write and read paths over `meta` and
    `replicator`, with their background tasks (the flusher, the garbage
    collector, read-ahead) running until the block ends; `quotas`, the
    guard that the control socket's quota requests tell of changes (a
    new one if None). Call
    `fs.shutdown()` in the block to store everything first; leaving without
    it is what a crash of the mount leaves behind."""
    async with trio.open_nursery() as nursery:
        flush_requests, flusher_inbox = flush_channel()
        budget = WriteBudget(config.write_buffer_bytes, flush_requests)
        metrics.watch(metrics.WRITE_BUFFER_BYTES, lambda: budget.used)
        metrics.watch(metrics.FLUSH_QUEUE, lambda: budget.flushes)
        cache = ShardCache(config.shard_cache_bytes)
        garbage = GarbageCollector(meta, replicator)
        writes = WriteServices(
            meta=meta,
            replicator=replicator,
            storer=ShardStorer(meta, replicator),
            budget=budget,
            cache=cache,
            garbage=garbage,
            unsynced=UnsyncedReplicas(replicator, nursery),
            shard_size=config.shard_size,
            quotas=QuotaGuard(meta) if quotas is None else quotas,
        )
        reads = ReadServices(meta=meta, replicator=replicator, cache=cache, garbage=garbage, nursery=nursery)
        await nursery.start(Flusher(flusher_inbox).run)
        await nursery.start(garbage.run)
        fs = FileSystem(writes, reads, config.replicas, session, config.trash_days, config.compression)
        await nursery.start(TrashSweeper(fs, meta, config.trash_sweep_interval).run)
        yield FileSystemParts(fs, budget, cache, garbage)
        nursery.cancel_scope.cancel()


def run_cluster_operation(config: Config, operation: str, output: Output, arguments: dict[str, Any]) -> int:
    """Run a cluster operation in this process, holding the data dir's lock
    (the mount, the only other writer, is not running)."""
    require_file_system(config)
    prepare_data_dir(config)  # with --meta, a machine's first command may make it
    lock = DataDirLock(config.lock_path)
    where = mountpoint_of(config)
    lock.acquire(f"it is mounted{' at ' + where if where else ''} but its control socket does not answer")

    async def main() -> int:
        async with open_components(config, cached=False) as parts:
            nodes = NodeSet(parts.meta, parts.access, parts.replicator, parts.stores)
            await nodes.refresh()
            cluster = Cluster(parts.meta, parts.replicator, nodes, config.replicas, parts.access)
            try:
                async with maintenance_turn(parts.meta, trio.Lock()) as held:
                    if not held:
                        raise UserError(MAINTENANCE_BUSY)
                    return await OPERATIONS[operation](cluster, output, **arguments)
            finally:
                await nodes.close()
                await parts.meta.sync()

    try:
        return trio.run(main)
    finally:
        lock.release()


def probe_nodes(config: Config) -> tuple[list[NodeRecord], dict[str, StoreStat | None]]:
    """The registry's nodes and what each answers now (None: no answer)."""
    require_file_system(config)

    async def main() -> tuple[list[NodeRecord], dict[str, StoreStat | None]]:
        async with open_components(config, cached=False) as parts:
            return parts.nodes, await probe(parts.stores)

    return trio.run(main)


def check_mountpoint(path: str) -> str:
    """The absolute mount point, or a UserError saying what is wrong with it."""
    mountpoint = os.path.abspath(path)
    if _is_dead_mount(mountpoint):
        # A crashed mount leaves ENOTCONN behind; a lazy unmount clears it.
        result = subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True, text=True)
        if result.returncode != 0:
            raise UserError(
                f"{mountpoint} is a dead mount (its process ended); run: fusermount3 -u -z {mountpoint}"
            )
        print(f"dfsfuse: cleared the dead mount left at {mountpoint}", file=sys.stderr)
    if not os.path.lexists(mountpoint):
        raise UserError(f"mount point {mountpoint} does not exist (create it with: mkdir -p {mountpoint})")
    if not os.path.isdir(mountpoint):
        raise UserError(f"mount point {mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        raise UserError(f"{mountpoint} is already a mount point; unmount it first")
    return mountpoint


def _is_dead_mount(path: str) -> bool:
    try:
        os.stat(path)
    except OSError as error:
        return error.errno == errno.ENOTCONN
    return False


def parse_mount_options(raw: list[str]) -> tuple[list[str], dict[str, Any]]:
    """The FUSE mount options of the -o lists, and the Config fields that
    dfsfuse's own among them set (not the kernel's): `metrics=HOST:PORT`
    (metrics_listen) and `trash_days=DAYS`."""
    options = [opt for group in raw for opt in group.split(",") if opt]
    settings: dict[str, Any] = {}
    for option in options:
        if option.startswith("metrics="):
            settings["metrics_listen"] = option.removeprefix("metrics=")
            parse_metrics_listen(settings["metrics_listen"])
        elif option.startswith("trash_days="):
            settings["trash_days"] = parse_trash_days(option.removeprefix("trash_days="))
        elif option not in MOUNT_OPTIONS:
            allowed = ", ".join(sorted([*MOUNT_OPTIONS, "metrics=HOST:PORT", "trash_days=DAYS"]))
            raise UserError(f"unsupported mount option {option!r} (supported: {allowed})")
    ours = ("metrics=", "trash_days=")
    return [opt for opt in options if opt != "rw" and not opt.startswith(ours)], settings


def mount(config: Config, mountpoint: str, options: list[str], foreground: bool) -> int:
    mountpoint = check_mountpoint(mountpoint)
    options, settings = parse_mount_options(options)
    config = dataclasses.replace(config, **settings)
    if is_shared(config.metadata):
        from .fuse.operations import shares_locks

        if not shares_locks():
            raise UserError(
                "this pyfuse3 lacks dfsfuse's lock patch, so file locks would not reach other mounts;"
                " run scripts/install.sh (docs/pyfuse3-patch.md)"
            )
    if config.key_file is not None and not metadata_exists(config.metadata):
        raise UserError(
            f"{config.metadata.where} holds no file system yet;"
            f" make an encrypted one with: dfsfuse format --encrypt --key-file {config.key_file}"
        )
    prepare_data_dir(config)
    lock = DataDirLock(config.lock_path)
    active = mountpoint_of(config)
    lock.acquire(f"it is mounted at {active}; unmount it first" if active else "stop that process first")
    if foreground:
        _log_to(sys.stderr)
        lock.write_pid()
        return _run_mount(config, mountpoint, options, ready=lambda: None)
    return _daemonize(config, mountpoint, options, lock)


def _daemonize(config: Config, mountpoint: str, options: list[str], lock: DataDirLock) -> int:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        lock.release()  # the daemon's inherited descriptor keeps the lock
        report = b""
        while chunk := os.read(read_end, 4096):
            report += chunk
        os.close(read_end)
        if report == b"ok":
            return 0
        message = report.decode(errors="replace").strip()
        if not message:
            message = f"the mount process ended before the file system was ready; see {config.log_path}"
        raise UserError(message)
    os.close(read_end)
    os.setsid()
    _detach_stdio()
    _log_to(open(config.log_path, "a", buffering=1))
    lock.write_pid()

    def ready() -> None:
        os.write(write_end, b"ok")
        os.close(write_end)

    try:
        code = _run_mount(config, mountpoint, options, ready)
    except UserError as error:
        log.error("%s", error)
        os.write(write_end, str(error).encode())
        code = error.exit_code
    except BaseException:
        log.exception("the mount process failed")
        code = 1
    os._exit(code)


def _detach_stdio() -> None:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def _log_to(stream) -> None:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def _run_mount(config: Config, mountpoint: str, options: list[str], ready: Callable[[], None]) -> int:
    async def main() -> int:
        with metrics.serve(config.metrics_listen):
            if config.metrics_listen is not None:
                log.info("metrics at %s", metrics.describe_listen(config.metrics_listen))
            return await mounted()

    async def mounted() -> int:
        async with open_components(config, cached=True, create=mount_creates(config.metadata), unlock=True) as parts:
            session = await MountSession.open(parts.meta, mountpoint, config.session_timeout)
            quotas = QuotaGuard(parts.meta)
            async with trio.open_nursery() as nursery:
                await nursery.start(session.run)
                await nursery.start(parts.replicator.run)
                async with running_file_system(
                    parts.meta, parts.replicator, parts.config, session, quotas
                ) as file_system:
                    snapshots = await _start_cluster_services(nursery, parts, config, quotas, file_system.fs)
                    try:
                        await _serve(file_system.fs, parts.meta, session, config, mountpoint, options, ready)
                    finally:
                        with trio.CancelScope(shield=True):
                            await snapshots.write_at_unmount()  # after shutdown: every file's data is committed
                            await session.close()
                nursery.cancel_scope.cancel()
        log.info("unmounted cleanly")
        return 0

    try:
        return trio.run(main)
    except BaseExceptionGroup as group:
        raise _single_user_error(group) from None


async def _start_cluster_services(
    nursery: trio.Nursery, parts: Components, config: Config, quotas: QuotaGuard, fs: FileSystem
) -> SnapshotWriter:
    """The mount's cluster side: following the node registry, the control
    socket (whose quota requests tell `quotas` of what they change, and whose
    operations on the tree go through `fs`), background repair and periodic
    metadata snapshots."""
    nodes = NodeSet(parts.meta, parts.access, parts.replicator, parts.stores)
    await nursery.start(nodes.run)
    cluster = Cluster(
        parts.meta, parts.replicator, nodes, config.replicas, parts.access,
        quotas_changed=quotas.quotas_changed, fs=fs,
    )
    maintenance_lock = trio.Lock()  # one cluster operation or repair pass at a time
    await nursery.start(ControlServer(config.control_socket_path, cluster, maintenance_lock, TREE_OPERATIONS).run)
    await nursery.start(background_repair, cluster, maintenance_lock)
    snapshots = SnapshotWriter(parts.meta, parts.replicator, parts.key)
    if config.snapshot_interval:
        await nursery.start(snapshots.run, config.snapshot_interval)
    return snapshots


async def _serve(
    fs: FileSystem, meta: MetadataStore, session: MountSession, config: Config, mountpoint: str,
    options: list[str], ready: Callable[[], None],
) -> None:
    """Mount, serve the kernel until it lets go (an unmount, or a signal),
    then store everything and end the FUSE session. Meanwhile other mounts'
    changes are applied to the kernel's caches; that ends first, since
    pyfuse3 must not be asked to invalidate anything once its session ends."""
    from .fuse import operations as fuse  # here, so status and fsck never load pyfuse3

    try:
        operations = fuse.Operations(fs)
        session.barrier = operations.invalidator.barrier
        fs.kernel_invalidator = operations.invalidator
        fuse.start(operations, mountpoint, fuse.mount_options(f"dfsfuse:{config.data_dir}", options))
    except RuntimeError as error:
        raise UserError(f"cannot mount at {mountpoint}: {error}") from None
    log.info("mounted %s at %s", config.data_dir, mountpoint)
    ready()
    stopped_by_signal = False

    async def stop_on_signal() -> None:
        nonlocal stopped_by_signal
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                log.info("signal %d: unmounting", signum)
                stopped_by_signal = True
                fuse.terminate()
                return

    try:
        async with trio.open_nursery() as kernel_side:
            kernel_side.start_soon(stop_on_signal)
            await kernel_side.start(operations.invalidator.run)
            await kernel_side.start(meta.follow_changes, session.id, operations.invalidator)
            await fuse.serve()
            kernel_side.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await fs.shutdown()
            fuse.stop(unmount=stopped_by_signal)


def _single_user_error(group: BaseExceptionGroup) -> BaseException:
    """The UserError inside trio's exception groups, or the group itself."""
    found: BaseException | None = group.split(UserError)[0]
    while isinstance(found, BaseExceptionGroup) and len(found.exceptions) == 1:
        found = found.exceptions[0]
    return found if isinstance(found, UserError) else group
