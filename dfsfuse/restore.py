"""`dfsfuse restore`: rebuild a lost data dir from a metadata snapshot on the nodes.

For when the machine that mounted the file system is gone (its metadata
with it); dfsfuse.cluster.snapshots describes the snapshots. In order:
1. a data dir that already holds a file system is refused;
2. the snapshots on the node named on the command line are read newest
   first, and the first that verifies is taken (a sealed one, of an
   encrypted file system, is opened with the key from --key-file and the
   keyring the snapshot carries: dfsfuse.shards.sealing);
3. the snapshot's node registry names the rest of the cluster: each of those
   nodes that answers is asked for a newer snapshot that verifies;
4. the shard id counter is moved past every shard id found on the nodes
   that answered, since shards written after the snapshot are there (as
   orphans to the restored metadata) and their ids must not be handed out
   again;
5. the metadata is made from the snapshot only now, all or nothing
   (dfsfuse.metadata.engines.load_dump), so a restore cut short leaves no
   file system behind;
6. without a secret_file in the config, the cluster secret is copied to
   DATA_DIR/secret, where a mount looks for it.
The restored registry names the cluster's nodes, so a mount of the data dir
uses them as they are: config [[nodes]] seed only an empty registry.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import shutil
from pathlib import Path

import trio

from .cluster.inventory import replica_ids
from .cluster.registry import (
    NodeAccess,
    RemoteAddress,
    client_tls_context,
    describe_address,
    open_store,
    parse_address,
)
from .cluster.snapshots import (
    is_snapshot_id,
    read_snapshot,
    snapshot_ids,
    snapshot_time_ns,
)
from .config import Config
from .datadir import DataDirLock, prepare_data_dir
from .errors import DfsError, ShardMissing, UserError
from .metadata.base import NODE_ACTIVE, MetadataStore, NodeRecord
from .metadata.engines import load_dump, metadata_exists, open_dump
from .node.secret import load_secret
from .shards.replica import ReplicaCorrupt
from .shards.sealing import FileSystemKey, is_sealed_snapshot, snapshot_key
from .storage.base import NodeStore
from .storage.local import LocalStore


class _SnapshotOpener:
    """The metadata dumps in stored snapshots: sealed ones are opened with
    the key file's passphrase (one key derivation for the whole restore)."""

    def __init__(self, key_file: Path | None):
        self._key_file = key_file
        self._key: FileSystemKey | None = None

    async def dump(self, snapshot_id: int, stored: bytes) -> bytes:
        """The dump; ReplicaCorrupt if a sealed one does not authenticate,
        a one-line UserError if the key file is missing, wrong or not wanted."""
        if not is_sealed_snapshot(stored):
            if self._key_file is not None:
                raise UserError("the metadata snapshots are not encrypted; restore without a key file")
            return stored
        if self._key_file is None:
            raise UserError("the metadata snapshots are encrypted: give the file system's key file with --key-file FILE")
        if self._key is None:
            self._key = await trio.to_thread.run_sync(snapshot_key, stored, self._key_file)
        return self._key.open_snapshot(snapshot_id, stored)


@dataclasses.dataclass
class _Snapshot:
    snapshot_id: int
    dump: bytes  # MetadataStore.snapshot
    source: str  # the node it was read from, as a person writes its address


def restore(config: Config, node: str, secret_file: str | None) -> int:
    if metadata_exists(config.metadata):
        raise UserError(
            f"data dir {config.data_dir} already holds a file system ({config.metadata.where});"
            " restore into a new data dir"
        )
    secret_in_config = config.secret_file is not None
    if secret_file is not None:
        config = dataclasses.replace(config, secret_file=Path(secret_file).absolute())
    prepare_data_dir(config)
    lock = DataDirLock(config.lock_path)
    lock.acquire("stop that process first")
    try:
        snapshot, inodes = trio.run(_restore, config, node)
        if secret_file is not None and not secret_in_config:
            _keep_secret(config)
    finally:
        lock.release()
    taken = datetime.datetime.fromtimestamp(snapshot_time_ns(snapshot.snapshot_id) / 1e9, datetime.timezone.utc)
    print(
        f"restored the metadata snapshot of {taken:%Y-%m-%d %H:%M:%S} UTC from {snapshot.source}"
        f" ({inodes} inodes) into {config.metadata.where}"
    )
    return 0


async def _restore(config: Config, node: str) -> tuple[_Snapshot, int]:
    stores: list[NodeStore] = []
    opener = _SnapshotOpener(config.key_file)
    try:
        source = await _open_source(node, config)
        stores.append(source)
        try:
            snapshot = await _newest_verified(source, describe_address(node), opener, newer_than=0)
        except DfsError as error:
            raise UserError(f"cannot read the snapshots on {node}: {error}") from None
        if snapshot is None:
            raise UserError(f"node {node} holds no metadata snapshot that verifies; nothing restored")
        for peer in await _registered_peers(snapshot.dump, source, config):
            stores.append(peer)
            try:
                newer = await _newest_verified(peer, f"node {peer.name}", opener, newer_than=snapshot.snapshot_id)
            except DfsError as error:
                print(f"node {peer.name} not asked for a newer snapshot: {error}")
                continue
            if newer is not None:
                snapshot = newer
        highest_shard_id = await _highest_shard_id(stores)
        async with load_dump(config.metadata, snapshot.dump) as meta:
            inodes = await _finish_metadata(meta, highest_shard_id)
        return snapshot, inodes
    finally:
        with trio.CancelScope(shield=True):
            for store in stores:
                await store.close()


async def _open_source(node: str, config: Config) -> NodeStore:
    """The node store `node` names: a node store directory, or HOST:PORT of a node server."""
    if os.path.isdir(node):
        name = LocalStore.recorded_name(node)
        if name is None:
            raise UserError(f"{node} is not a node store directory ({LocalStore.NO_IDENTITY})")
        try:
            return await LocalStore.open(name, node)
        except DfsError as error:
            raise UserError(f"node store {node} cannot be used: {error}") from None
    where = parse_address(node)
    if not isinstance(where, RemoteAddress):
        raise UserError(f"{describe_address(node)} is not a node store directory")
    from .storage.remote import RemoteStore, node_server_store_name

    if config.secret_file is None and not config.cluster_secret_path.exists():
        raise UserError(f"{node} is a node server: give the cluster secret with --secret-file FILE")
    secret = load_secret(str(config.cluster_secret_path))
    tls = client_tls_context(config.tls_ca_file)
    try:
        name = await node_server_store_name(where.host, where.port, secret, ssl_context=tls)
    except DfsError as error:
        raise UserError(f"cannot restore from {node}: {error}") from None
    return RemoteStore(name, where.host, where.port, secret, ssl_context=tls)


async def _newest_verified(
    store: NodeStore, where: str, opener: _SnapshotOpener, newer_than: int
) -> _Snapshot | None:
    """The store's newest snapshot newer than `newer_than` whose replica
    verifies (and, sealed, authenticates), or None; a bad one is reported
    and an older one tried. DfsError if the store cannot be read at all."""
    for snapshot_id in reversed(await snapshot_ids(store)):
        if snapshot_id <= newer_than:
            break
        try:
            dump = await opener.dump(snapshot_id, await read_snapshot(store, snapshot_id))
            return _Snapshot(snapshot_id, dump, where)
        except (ReplicaCorrupt, ShardMissing) as error:
            print(f"snapshot {snapshot_id} on {where} does not verify ({error}); trying an older one")
    return None


async def _registered_peers(dump: bytes, source: NodeStore, config: Config) -> list[NodeStore]:
    """The other nodes the snapshot's registry names that can be reached now.

    A local node is used only if its directory is already a node store: the
    snapshot may come from another machine, and opening a missing one would
    create it empty.
    """
    async with open_dump(dump) as meta:
        registered = await meta.nodes()
    peers: list[NodeStore] = []
    for record in registered:
        where = parse_address(record.address)
        if record.name == source.name or (isinstance(where, Path) and LocalStore.recorded_name(str(where)) is None):
            continue
        try:
            store = await open_store(NodeRecord(record.name, record.address, NODE_ACTIVE), NodeAccess.from_config(config))
            await store.stat()
        except (UserError, DfsError) as error:
            print(f"node {record.name} at {describe_address(record.address)} not asked for a newer snapshot: {error}")
            continue
        peers.append(store)
    return peers


async def _highest_shard_id(stores: list[NodeStore]) -> int:
    """The highest shard id (not snapshot id) any of the stores holds; 0 if none."""
    highest = 0
    for store in stores:
        try:
            held = await replica_ids(store)
        except DfsError as error:
            print(f"node {store.name}: cannot list its shards: {error}")
            continue
        highest = max([highest, *(shard_id for shard_id in held if not is_snapshot_id(shard_id))])
    return highest


async def _finish_metadata(meta: MetadataStore, highest_shard_id: int) -> int:
    """Move the restored metadata's shard id counter past `highest_shard_id`;
    the number of inodes it holds."""
    unused = await meta.allocate_shard_ids(0)
    if highest_shard_id >= unused.start:
        await meta.allocate_shard_ids(highest_shard_id + 1 - unused.start)
    return (await meta.usage()).inodes


def _keep_secret(config: Config) -> None:
    """Copy the cluster secret to DATA_DIR/secret (owner-only), where a mount
    without a secret_file in its config looks for it."""
    target = config.data_dir / "secret"
    if target.exists() or target == config.secret_file:
        return
    assert config.secret_file is not None
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with open(fd, "wb") as out, open(config.secret_file, "rb") as source:
        shutil.copyfileobj(source, out)
    print(f"the cluster secret is kept in {target}")
