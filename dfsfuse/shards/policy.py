"""How a file's new objects are stored: replica count, compression, erasure coding.

A file's policy comes from its xattrs (metadata/base.py POLICY_XATTRS, copied
from its directory when it is created) over the config's defaults. It
applies to the objects written from then on; objects already stored keep
their own encoding (ShardRef.encoding), so one tree can mix them all.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from dfsfuse.errors import InvalidArgument, UserError
from dfsfuse.metadata.base import COMPRESSION_XATTR, ERASURE_XATTR, REPLICAS_XATTR
from dfsfuse.shards.encoding import COMPRESSIONS

OFF = "off"
MAX_FRAGMENTS = 32  # k + m: more fragments than this cost more requests than they save disk


@dataclasses.dataclass(frozen=True)
class StoragePolicy:
    replicas: int | None = None  # None: the configured R
    compression: str = ""  # "", or one of encoding.COMPRESSIONS
    erasure: tuple[int, int] | None = None  # (k, m), or None: replicated

    def copies(self, default_replicas: int) -> float:
        """Bytes on the node stores per byte of payload: R, or (k + m) / k."""
        if self.erasure is not None:
            k, m = self.erasure
            return (k + m) / k
        return self.replicas or default_replicas


def policy_of(xattrs: Mapping[bytes, bytes], default_compression: str = "") -> StoragePolicy:
    """The policy a file's xattrs give (values as setxattr checked them)."""
    replicas = xattrs.get(REPLICAS_XATTR)
    compression = xattrs.get(COMPRESSION_XATTR)
    erasure = xattrs.get(ERASURE_XATTR)
    return StoragePolicy(
        replicas=None if replicas is None else int(replicas),
        compression=default_compression if compression is None else _compression(compression.decode()),
        erasure=None if erasure is None else parse_erasure(erasure.decode()),
    )


def check_policy_value(name: bytes, value: bytes, writable_nodes: int) -> bytes:
    """The value to store for a setxattr of one of POLICY_XATTRS, normalized;
    InvalidArgument (EINVAL) for a value the cluster cannot honour."""
    if name == REPLICAS_XATTR:
        return check_replicas_value(value, writable_nodes)
    if name == COMPRESSION_XATTR:
        return check_compression_value(value)
    return check_erasure_value(value, writable_nodes)


def check_replicas_value(value: bytes, writable_nodes: int) -> bytes:
    """user.dfs.replicas must be a whole number of replicas the cluster can hold."""
    text = value.strip()
    if not text.isdigit() or not 1 <= int(text) <= writable_nodes:
        raise InvalidArgument(f"{REPLICAS_XATTR.decode()} must be a number from 1 to {writable_nodes}")
    return str(int(text)).encode()


def check_compression_value(value: bytes) -> bytes:
    """user.dfs.compression must name a compression or "off"."""
    text = value.strip().decode("ascii", "replace").lower()
    if text != OFF and text not in COMPRESSIONS:
        raise InvalidArgument(f"{COMPRESSION_XATTR.decode()} must be one of {', '.join((*COMPRESSIONS, OFF))}")
    return text.encode()


def check_erasure_value(value: bytes, writable_nodes: int) -> bytes:
    """user.dfs.ec must be "K+M" with K + M distinct writable nodes, or "off"."""
    text = value.strip().decode("ascii", "replace").lower()
    if text == OFF:
        return text.encode()
    erasure = parse_erasure(text)
    if erasure is None:
        raise InvalidArgument(
            f"{ERASURE_XATTR.decode()} must be K+M (data and parity fragments, e.g. 4+2) or off"
        )
    k, m = erasure
    if k + m > writable_nodes:
        raise InvalidArgument(
            f"{ERASURE_XATTR.decode()} {k}+{m} needs {k + m} nodes; the cluster has {writable_nodes} writable"
        )
    return f"{k}+{m}".encode()


def parse_erasure(text: str) -> tuple[int, int] | None:
    """(k, m) from "K+M" (2 <= k, 1 <= m, k + m <= MAX_FRAGMENTS); None for
    "off" or anything else."""
    data, plus, parity = text.strip().partition("+")
    if not plus or not data.isdigit() or not parity.isdigit():
        return None
    k, m = int(data), int(parity)
    if k < 2 or m < 1 or k + m > MAX_FRAGMENTS:
        return None
    return k, m


def parse_compression(text: str, source: str) -> str:
    """The config's compression: a name of COMPRESSIONS or "off" (""); UserError otherwise."""
    name = text.strip().lower()
    if name != OFF and name not in COMPRESSIONS:
        raise UserError(f"{source}: compression must be one of {', '.join((*COMPRESSIONS, OFF))}, not {text!r}")
    return _compression(name)


def _compression(name: str) -> str:
    return "" if name == OFF else name
