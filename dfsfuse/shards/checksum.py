"""Every hash dfsfuse computes; the only module that imports xxhash.

Data is checksummed with xxh3-128 (fast enough to verify every read, long
enough that a random corruption is never mistaken for good data). Placement
uses xxh3-64 as the weight of rendezvous hashing.
"""

from __future__ import annotations

import struct

import xxhash

from dfsfuse.storage.base import Buffer

DIGEST_SIZE = 16  # bytes of an xxh3-128 digest

_SHARD_ID = struct.Struct("<Q")


def shard_checksum(data: Buffer) -> bytes:
    """The xxh3-128 digest of a whole shard's data, as ShardRef.checksum holds it."""
    return xxhash.xxh3_128_digest(data)


def block_checksum(block: Buffer) -> bytes:
    """The xxh3-128 digest of one checksum block."""
    return xxhash.xxh3_128_digest(block)


def block_checksum_table(data: Buffer, block_size: int) -> bytes:
    """The digests of consecutive `block_size` blocks of `data`, concatenated.

    The last block may be short; empty data has an empty table.
    """
    view = memoryview(data).cast("B")
    return b"".join(
        xxhash.xxh3_128_digest(view[start : start + block_size])
        for start in range(0, len(view), block_size)
    )


def combined_checksum(parts: list[Buffer]) -> bytes:
    """The xxh3-128 digest of the concatenation of `parts`, without joining them."""
    hasher = xxhash.xxh3_128()
    for part in parts:
        hasher.update(part)
    return hasher.digest()


def placement_weight(shard_id: int, store_name: str) -> int:
    """The 64-bit rendezvous weight of `store_name` for `shard_id`."""
    return xxhash.xxh3_64_intdigest(_SHARD_ID.pack(shard_id) + store_name.encode("utf-8"))
