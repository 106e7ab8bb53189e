"""The node registry seen from outside the metadata: addresses, the config's
nodes, and opening the store each registered node names.

A node's address is `local:/absolute/path` (a directory on this machine) or
`HOST:PORT` (a node server, `[IPV6]:PORT` for IPv6). Remote nodes are reached
with the cluster secret: the config's `secret_file`, else DATA_DIR/secret; and
over TLS when the config has `tls_ca_file` (client_tls_context).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import ssl
from collections.abc import Sequence
from pathlib import Path

from dfsfuse.config import Config, NodeSpec
from dfsfuse.errors import DfsError, StoreUnavailable, UserError
from dfsfuse.metadata.base import MetadataStore, NodeRecord
from dfsfuse.storage.addresses import split_host_port
from dfsfuse.storage.base import Buffer, NodeStore, StoreStat
from dfsfuse.storage.local import LocalStore

log = logging.getLogger("dfsfuse.nodes")

LOCAL_PREFIX = "local:"


@dataclasses.dataclass(frozen=True)
class NodeAccess:
    """How this machine reaches node servers: the cluster secret and TLS."""

    secret_path: Path  # where the cluster secret is read from
    secret_configured: bool  # the config names it (secret_file); else it is DATA_DIR/secret, if present
    tls_ca_file: Path | None = None  # talk TLS, trusting this CA; None: plain TCP
    # Whether this process is the only user of the local node stores it opens
    # (LocalStore's `exclusive`): not beside a mount, nor with metadata other
    # mounts share (they may open the same directories on this machine).
    local_exclusive: bool = True

    @classmethod
    def from_config(cls, config: Config) -> NodeAccess:
        return cls(config.cluster_secret_path, config.secret_file is not None, config.tls_ca_file)


@dataclasses.dataclass(frozen=True)
class RemoteAddress:
    host: str
    port: int


def local_address(path: str | Path) -> str:
    return LOCAL_PREFIX + os.path.abspath(path)


def describe_address(address: str) -> str:
    """The address as a person writes it: a local node's directory, or HOST:PORT."""
    return address[len(LOCAL_PREFIX) :] if address.startswith(LOCAL_PREFIX) else address


def parse_address(address: str) -> Path | RemoteAddress:
    """The directory of a local address, or the host and port of a remote one."""
    if address.startswith(LOCAL_PREFIX):
        path = Path(address[len(LOCAL_PREFIX) :])
        if not path.is_absolute():
            raise UserError(f"node address {address!r}: a local path must be absolute")
        return path
    try:
        host_port = split_host_port(address)
    except ValueError as error:
        raise UserError(f"node address {address!r}: {error}") from None
    if host_port is None or not host_port[0] or not host_port[1]:
        raise UserError(f"node address {address!r}: expected HOST:PORT or a directory")
    return RemoteAddress(*host_port)


async def register_config_nodes(meta: MetadataStore, specs: Sequence[NodeSpec]) -> list[NodeRecord]:
    """The registry, after seeding an empty one with the config file's [[nodes]].

    Only an empty registry is seeded (a new file system, or one made before
    the registry existed): from then on the registry is the node list, so a
    node removed with `dfsfuse node remove` stays removed.
    """
    if not await meta.nodes():
        for spec in specs:
            if spec.address is not None:
                parse_address(spec.address)  # a UserError if it is not HOST:PORT
                await meta.add_node(spec.name, spec.address)
            else:
                assert spec.path is not None
                await meta.add_node(spec.name, local_address(spec.path))
    return await meta.nodes()


class UnreachableStore(NodeStore):
    """Stands in for a node whose store could not be opened: every call fails
    with StoreUnavailable, so reads go to other replicas and status shows the
    node down. The NodeSet tries to open the real store again on each refresh."""

    def __init__(self, name: str, reason: str):
        self.name = name
        self.reason = reason

    def _fail(self) -> StoreUnavailable:
        return StoreUnavailable(f"node store {self.name!r} cannot be opened: {self.reason}")

    async def put(self, shard_id: int, parts: Sequence[Buffer], sync: bool) -> None:
        raise self._fail()

    async def read(self, shard_id: int, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        raise self._fail()

    async def delete(self, shard_id: int) -> None:
        raise self._fail()

    async def exists(self, shard_id: int) -> bool:
        raise self._fail()

    async def list(self, after: int, limit: int) -> list[int]:
        raise self._fail()

    async def sync(self, shard_ids: Sequence[int]) -> None:
        raise self._fail()

    async def stat(self) -> StoreStat:
        raise self._fail()


async def open_store_or_stand_in(node: NodeRecord, access: NodeAccess) -> NodeStore:
    """The node's store, or an UnreachableStore (logged) if it cannot be opened now."""
    try:
        return await open_store(node, access)
    except UserError as error:
        log.warning("%s", error)
        return UnreachableStore(node.name, str(error))


async def open_store(node: NodeRecord, access: NodeAccess) -> NodeStore:
    """The node store `node` names; UserError if it cannot be used.

    A local store is created if missing only for a node never seen before: a
    known node whose directory is gone (a disk not mounted, or a data dir
    restored on another machine) must not come back empty and take replicas.
    """
    where = parse_address(node.address)
    if isinstance(where, Path):
        if node.last_seen_ns and LocalStore.recorded_name(str(where)) is None:
            raise UserError(f"node store {node.name} at {where} is gone: {LocalStore.NO_IDENTITY}")
        try:
            return await LocalStore.open(node.name, str(where), exclusive=access.local_exclusive)
        except (OSError, DfsError) as error:
            reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
            raise UserError(f"node store {node.name} at {where} cannot be used: {reason}") from None
    from dfsfuse.node.secret import load_secret
    from dfsfuse.storage.remote import RemoteStore

    secret_path = access.secret_path
    if not access.secret_configured and not secret_path.exists():
        raise UserError(
            f"node {node.name} is a node server at {node.address}: set secret_file in the config"
            f" or put the cluster secret in {secret_path}"
        )
    return RemoteStore(
        node.name, where.host, where.port, load_secret(str(secret_path)), ssl_context=client_tls_context(access.tls_ca_file)
    )


def client_tls_context(tls_ca_file: Path | None) -> ssl.SSLContext | None:
    """TLS towards node servers, trusting the config's tls_ca_file; None (plain TCP) without one."""
    if tls_ca_file is None:
        return None
    try:
        return ssl.create_default_context(cafile=str(tls_ca_file))
    except (OSError, ssl.SSLError) as error:
        raise UserError(f"config: tls_ca_file {tls_ca_file} cannot be used: {error}") from None
