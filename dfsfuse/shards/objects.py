"""An object's plain bytes to its payload and back: compress, seal; open, decompress.

This is the pure half of storing an object (encoding.py describes the
result); the Replicator puts the payload on the node stores, as replicas
or erasure-coded fragments. Decoding checks everything it undoes: the AEAD
tag of a sealed payload, the decompressed length, and finally the plain
bytes against ShardRef.checksum.
"""

from __future__ import annotations

from typing import Protocol

from dfsfuse.metadata.base import ShardRef
from dfsfuse.shards.checksum import shard_checksum
from dfsfuse.shards.compression import CompressionError, compress, decompress
from dfsfuse.shards.encoding import Encoding
from dfsfuse.shards.replica import ReplicaCorrupt
from dfsfuse.storage.base import Buffer


class Sealer(Protocol):
    """Authenticated encryption of payloads under the file system's key
    (dfsfuse/shards/sealing.py), bound to the object's shard id."""

    def seal(self, shard_id: int, data: Buffer) -> bytes: ...

    def open(self, shard_id: int, sealed: Buffer) -> bytes:
        """The plain bytes; ReplicaCorrupt if the payload does not authenticate."""
        ...


class ObjectCodec:
    def __init__(self, sealer: Sealer | None = None):
        self.sealer = sealer

    def encode(
        self, shard_id: int, plain: Buffer, compression: str, always: bool = False
    ) -> tuple[bytes, Encoding | None, Buffer]:
        """(checksum of the plain bytes, the encoding, the payload).

        The encoding is None, and the payload the plain bytes themselves, when
        nothing changes them (no compression that pays off, no key) and
        `always` (erasure coding, which needs an Encoding) is not set.
        """
        checksum = shard_checksum(plain)
        payload: Buffer = plain
        used = ""
        if compression:
            packed = compress(compression, plain)
            if packed is not None:
                payload, used = packed, compression
        sealed = self.sealer is not None
        if self.sealer is not None:
            payload = self.sealer.seal(shard_id, payload)
        if not (used or sealed or always):
            return checksum, None, plain
        return checksum, Encoding(len(payload), shard_checksum(payload), used, sealed), payload

    def decode(self, ref: ShardRef, payload: Buffer) -> bytes:
        """The plain bytes of an encoded object from its verified payload;
        ReplicaCorrupt if they cannot be had or do not match ref.checksum."""
        encoding = ref.encoding
        if encoding is None:
            raise ValueError(f"shard {ref.shard_id} is not encoded")
        data: Buffer = payload
        if encoding.sealed:
            if self.sealer is None:
                raise ReplicaCorrupt(f"shard {ref.shard_id} is encrypted and this mount has no key")
            data = self.sealer.open(ref.shard_id, data)
        if encoding.compression:
            try:
                data = decompress(encoding.compression, data, ref.length)
            except CompressionError as error:
                raise ReplicaCorrupt(str(error)) from None
        plain = bytes(data)
        if len(plain) != ref.length or shard_checksum(plain) != ref.checksum:
            raise ReplicaCorrupt("decoded object does not match the shard checksum")
        return plain
