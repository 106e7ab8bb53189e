"""The replica file format: a header, a table of block checksums, the data.

A replica is self-verifying at two granularities. The header records the
whole-shard xxh3-128 checksum (the one ShardRef carries) and the table holds
one xxh3-128 digest per block of the data, so a reader of a few blocks
verifies just those blocks without reading the rest of the shard. The header
ends with a digest of itself and of the whole table, so a damaged header or
table is caught when a whole replica is verified.

Layout (integers little-endian; offsets in bytes):

    0   4   magic b"DFSR"
    4   4   format version (1)
    8   4   block size
    12  8   data length
    20  16  xxh3-128 of the data (the shard checksum)
    36  16  xxh3-128 of bytes 0..36 followed by the whole block table
    52      block table: block_count(length, block size) digests of 16 bytes
    52 + 16 * block_count: the data

The block size is a parameter of the file system, not of one replica: a
partial reader computes where the table entries and blocks are from the
shard length (in its ShardRef) and the configured block size, without
reading the header. Everything here is pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import struct

from dfsfuse.layout import block_span
from dfsfuse.shards.checksum import (
    DIGEST_SIZE,
    block_checksum,
    block_checksum_table,
    combined_checksum,
    shard_checksum,
)
from dfsfuse.storage.base import Buffer

MAGIC = b"DFSR"
FORMAT_VERSION = 1
DEFAULT_BLOCK_SIZE = 64 * 1024

_FIELDS = struct.Struct("<4sIIQ16s")  # magic, version, block size, length, shard checksum
HEADER_SIZE = _FIELDS.size + DIGEST_SIZE


class ReplicaCorrupt(Exception):
    """A replica (or the part of it that was read) does not verify."""


@dataclasses.dataclass(frozen=True)
class ReplicaHeader:
    version: int
    block_size: int
    length: int
    checksum: bytes


@dataclasses.dataclass(frozen=True)
class BlockWindow:
    """The whole blocks of a replica that cover a byte range of the shard's data.

    `table_range` and `data_range` are (offset, length) ranges of the replica
    file, ready to pass together to NodeStore.read; `data_start` is the offset
    in the shard's data where the first block begins.
    """

    first_block: int
    block_count: int
    block_size: int
    data_start: int
    table_range: tuple[int, int]
    data_range: tuple[int, int]


def block_count(length: int, block_size: int) -> int:
    """Blocks (the last one possibly short) that `length` bytes of data take."""
    return -(-length // block_size)


def table_size(length: int, block_size: int) -> int:
    return block_count(length, block_size) * DIGEST_SIZE


def data_offset(length: int, block_size: int) -> int:
    """Where the data starts in a replica of `length` bytes of data."""
    return HEADER_SIZE + table_size(length, block_size)


def replica_size(length: int, block_size: int) -> int:
    return data_offset(length, block_size) + length


def encode(data: Buffer, block_size: int = DEFAULT_BLOCK_SIZE, checksum: bytes | None = None) -> list[Buffer]:
    """The replica of `data` as [header, block table, data]; the data is not copied.

    Pass `checksum` when the caller has already computed shard_checksum(data),
    to spare a second pass over the data.
    """
    if not 0 < block_size < 2**32:
        raise ValueError(f"block size {block_size} out of range")
    view = memoryview(data).cast("B")
    if checksum is None:
        checksum = shard_checksum(view)
    elif len(checksum) != DIGEST_SIZE:
        raise ValueError(f"a shard checksum has {DIGEST_SIZE} bytes, not {len(checksum)}")
    table = block_checksum_table(view, block_size)
    fields = _FIELDS.pack(MAGIC, FORMAT_VERSION, block_size, len(view), checksum)
    header = fields + combined_checksum([fields, table])
    return [header, table, view]


def decode_header(head: Buffer) -> ReplicaHeader:
    """The fields of a replica header (the first HEADER_SIZE bytes of `head`).

    Checks the magic and the version only; the header's own digest covers the
    block table too, so verify_replica checks it.
    """
    if len(head) < HEADER_SIZE:
        raise ReplicaCorrupt(f"header is {len(head)} bytes, expected {HEADER_SIZE}")
    magic, version, block_size, length, checksum = _FIELDS.unpack_from(head)
    if magic != MAGIC:
        raise ReplicaCorrupt(f"bad magic {magic!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise ReplicaCorrupt(f"unknown format version {version}")
    if block_size == 0:
        raise ReplicaCorrupt("block size 0 in header")
    return ReplicaHeader(version, block_size, length, checksum)


def verify_replica(head: Buffer, data: Buffer, checksum: bytes, length: int) -> None:
    """Check a whole replica against the shard it should hold.

    `head` is the replica up to data_offset (header and block table), `data`
    the rest of the file; `checksum` and `length` come from the ShardRef.
    Raises ReplicaCorrupt naming the first mismatch found: header fields,
    header digest, data length, a block, then the whole-shard checksum.
    """
    header = decode_header(head)
    expected_head = data_offset(header.length, header.block_size)
    if len(head) != expected_head:
        raise ReplicaCorrupt(f"header and block table are {len(head)} bytes, expected {expected_head}")
    head_view = memoryview(head).cast("B")
    fields = head_view[: _FIELDS.size]
    stored_digest = head_view[_FIELDS.size : HEADER_SIZE]
    table = head_view[HEADER_SIZE:]
    if combined_checksum([fields, table]) != stored_digest:
        raise ReplicaCorrupt("header digest mismatch: header or block table damaged")
    if header.length != length:
        raise ReplicaCorrupt(f"header says {header.length} bytes of data, the shard has {length}")
    if header.checksum != checksum:
        raise ReplicaCorrupt("header holds a different shard checksum than expected")
    if len(data) != length:
        raise ReplicaCorrupt(f"data is {len(data)} bytes, expected {length}")
    data_view = memoryview(data).cast("B")
    _verify_block_digests(0, header.block_size, table, data_view)
    if shard_checksum(data_view) != checksum:
        raise ReplicaCorrupt("shard checksum mismatch")


def block_window(length: int, block_size: int, offset: int, size: int) -> BlockWindow:
    """The blocks to read for bytes [offset, offset+size) of a shard of `length` bytes.

    The range must be non-empty and inside the shard.
    """
    if size <= 0 or offset < 0 or offset + size > length:
        raise ValueError(f"range ({offset}, {size}) is not inside a shard of {length} bytes")
    blocks = block_span(offset, size, block_size)
    data_start = blocks.start * block_size
    data_end = min(length, blocks.stop * block_size)
    return BlockWindow(
        first_block=blocks.start,
        block_count=len(blocks),
        block_size=block_size,
        data_start=data_start,
        table_range=(HEADER_SIZE + blocks.start * DIGEST_SIZE, len(blocks) * DIGEST_SIZE),
        data_range=(data_offset(length, block_size) + data_start, data_end - data_start),
    )


def verify_blocks(window: BlockWindow, table_entries: Buffer, blocks: Buffer) -> None:
    """Check blocks read with a BlockWindow against their table entries.

    Raises ReplicaCorrupt if either read came back short or a block differs.
    """
    expected_table = window.table_range[1]
    if len(table_entries) != expected_table:
        raise ReplicaCorrupt(f"read {len(table_entries)} bytes of block table, expected {expected_table}")
    expected_data = window.data_range[1]
    if len(blocks) != expected_data:
        raise ReplicaCorrupt(f"read {len(blocks)} bytes of blocks, expected {expected_data}")
    _verify_block_digests(
        window.first_block, window.block_size, memoryview(table_entries).cast("B"), memoryview(blocks).cast("B")
    )


def _verify_block_digests(first_block: int, block_size: int, table: memoryview, data: memoryview) -> None:
    for index, start in enumerate(range(0, len(data), block_size)):
        entry = table[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE]
        if block_checksum(data[start : start + block_size]) != entry:
            raise ReplicaCorrupt(f"block {first_block + index} checksum mismatch")
