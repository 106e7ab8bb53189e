"""The replica file format: encode, layout arithmetic, verification."""

import os
import struct

import pytest

from dfsfuse.shards import replica
from dfsfuse.shards.checksum import DIGEST_SIZE, block_checksum, shard_checksum
from dfsfuse.shards.replica import ReplicaCorrupt

BLOCK = 64


def encoded(data: bytes, block_size: int = BLOCK) -> bytes:
    return b"".join(bytes(part) for part in replica.encode(data, block_size))


def split(file: bytes, length: int, block_size: int = BLOCK) -> tuple[bytes, bytes]:
    offset = replica.data_offset(length, block_size)
    return file[:offset], file[offset:]


def test_header_layout():
    data = os.urandom(200)
    header, table, body = replica.encode(data, BLOCK)
    assert len(header) == replica.HEADER_SIZE == 52
    assert header[0:4] == b"DFSR"
    assert struct.unpack_from("<IIQ", header, 4) == (replica.FORMAT_VERSION, BLOCK, 200)
    assert header[20:36] == shard_checksum(data)
    assert header[36:52] == shard_checksum(header[:36] + table)
    assert len(table) == 4 * DIGEST_SIZE
    assert table[3 * DIGEST_SIZE :] == block_checksum(data[192:])
    assert bytes(body) == data


def test_encode_does_not_copy_the_data():
    data = bytearray(os.urandom(1000))
    body = replica.encode(data, BLOCK)[2]
    data[0] ^= 0xFF
    assert body[0] == data[0]


def test_encode_uses_a_given_checksum():
    data = os.urandom(100)
    header = replica.encode(data, BLOCK, checksum=b"x" * 16)[0]
    assert header[20:36] == b"x" * 16
    with pytest.raises(ValueError):
        replica.encode(data, BLOCK, checksum=b"short")


def test_sizes_are_computable_from_length_and_block_size():
    for length in (0, 1, 63, 64, 65, 1000):
        file = encoded(os.urandom(length))
        assert len(file) == replica.replica_size(length, BLOCK)
        assert replica.data_offset(length, BLOCK) == 52 + replica.block_count(length, BLOCK) * 16
    assert replica.block_count(0, BLOCK) == 0
    assert replica.block_count(65, BLOCK) == 2


def test_decode_header():
    data = os.urandom(100)
    header = replica.decode_header(encoded(data))
    assert header == replica.ReplicaHeader(replica.FORMAT_VERSION, BLOCK, 100, shard_checksum(data))


@pytest.mark.parametrize("length", [0, 1, 64, 1000])
def test_verify_replica_accepts_a_good_replica(length):
    data = os.urandom(length)
    head, body = split(encoded(data), length)
    replica.verify_replica(head, body, shard_checksum(data), length)


def damage(file: bytes, position: int) -> bytes:
    changed = bytearray(file)
    changed[position] ^= 0x01
    return bytes(changed)


@pytest.mark.parametrize(
    "position, message",
    [
        (0, "magic"),
        (4, "version"),
        (9, "header and block table"),  # block size
        (13, "header and block table"),  # length
        (25, "header digest"),  # stored shard checksum
        (40, "header digest"),  # the header digest itself
        (60, "header digest"),  # the block table
        (52 + 16 * 16 + 70, "block 1 checksum"),  # the data
    ],
)
def test_verify_replica_detects_any_flipped_byte(position, message):
    data = os.urandom(1000)
    head, body = split(damage(encoded(data), position), 1000)
    with pytest.raises(ReplicaCorrupt, match=message):
        replica.verify_replica(head, body, shard_checksum(data), 1000)


def test_verify_replica_detects_truncation_and_trailing_bytes():
    data = os.urandom(1000)
    file = encoded(data)
    checksum = shard_checksum(data)
    head, body = split(file, 1000)
    with pytest.raises(ReplicaCorrupt, match="data is 999 bytes"):
        replica.verify_replica(head, body[:-1], checksum, 1000)
    with pytest.raises(ReplicaCorrupt, match="data is 1001 bytes"):
        replica.verify_replica(head, body + b"x", checksum, 1000)
    with pytest.raises(ReplicaCorrupt, match="header is 10 bytes"):
        replica.verify_replica(file[:10], b"", checksum, 1000)


def test_verify_replica_detects_a_different_shard():
    data = os.urandom(100)
    other = os.urandom(100)
    head, body = split(encoded(other), 100)
    with pytest.raises(ReplicaCorrupt, match="different shard checksum"):
        replica.verify_replica(head, body, shard_checksum(data), 100)
    with pytest.raises(ReplicaCorrupt, match="says 100 bytes"):
        replica.verify_replica(head, body, shard_checksum(other), 99)


def test_verify_replica_checks_the_whole_shard_checksum():
    """A replica encoded with a wrong shard checksum has consistent blocks but
    must still be rejected."""
    data = os.urandom(100)
    wrong = b"\0" * 16
    head, body = split(b"".join(bytes(p) for p in replica.encode(data, BLOCK, checksum=wrong)), 100)
    with pytest.raises(ReplicaCorrupt, match="shard checksum mismatch"):
        replica.verify_replica(head, body, wrong, 100)


def read_window(file: bytes, window: replica.BlockWindow) -> tuple[bytes, bytes]:
    (table_offset, table_length), (data_offset, data_length) = window.table_range, window.data_range
    return file[table_offset : table_offset + table_length], file[data_offset : data_offset + data_length]


@pytest.mark.parametrize(
    "offset, size, first, count", [(0, 1, 0, 1), (63, 2, 0, 2), (64, 64, 1, 1), (100, 900, 1, 15), (999, 1, 15, 1)]
)
def test_block_window_reads_and_verifies_a_range(offset, size, first, count):
    data = os.urandom(1000)
    file = encoded(data)
    window = replica.block_window(1000, BLOCK, offset, size)
    assert (window.first_block, window.block_count) == (first, count)
    table_entries, blocks = read_window(file, window)
    replica.verify_blocks(window, table_entries, blocks)
    start = offset - window.data_start
    assert blocks[start : start + size] == data[offset : offset + size]


def test_verify_blocks_detects_damage_and_short_reads():
    data = os.urandom(1000)
    file = encoded(data)
    window = replica.block_window(1000, BLOCK, 130, 100)
    table_entries, blocks = read_window(file, window)
    with pytest.raises(ReplicaCorrupt, match="block 3 checksum"):
        replica.verify_blocks(window, table_entries, damage(blocks, 64 + 5))
    with pytest.raises(ReplicaCorrupt, match="block 2 checksum"):
        replica.verify_blocks(window, damage(table_entries, 1), blocks)
    with pytest.raises(ReplicaCorrupt, match="bytes of blocks"):
        replica.verify_blocks(window, table_entries, blocks[:-1])
    with pytest.raises(ReplicaCorrupt, match="bytes of block table"):
        replica.verify_blocks(window, table_entries[:-1], blocks)


def test_block_window_of_last_short_block():
    window = replica.block_window(1000, BLOCK, 990, 10)
    assert window.data_range == (replica.data_offset(1000, BLOCK) + 960, 40)


def test_block_window_rejects_ranges_outside_the_shard():
    for offset, size in [(0, 0), (-1, 5), (990, 11)]:
        with pytest.raises(ValueError):
            replica.block_window(1000, BLOCK, offset, size)


def test_encode_rejects_bad_block_size():
    with pytest.raises(ValueError):
        replica.encode(b"x", 0)
