"""Object encodings: the text form, compression, the codec, and the
replicator storing, verifying, reading and repairing compressed objects."""

from __future__ import annotations

import dataclasses
import os

import pytest
import trio

from dfsfuse.errors import InvalidArgument, UserError
from dfsfuse.metadata.base import (
    COMPRESSION_XATTR,
    ERASURE_XATTR,
    REPLICAS_XATTR,
    ShardRef,
)
from dfsfuse.shards.checksum import shard_checksum
from dfsfuse.shards.compression import CompressionError, compress, decompress
from dfsfuse.shards.encoding import (
    Encoding,
    EncodingError,
    encoding_of_text,
    encoding_text,
)
from dfsfuse.shards.objects import ObjectCodec
from dfsfuse.shards.policy import (
    StoragePolicy,
    check_compression_value,
    check_erasure_value,
    check_policy_value,
    parse_compression,
    policy_of,
)
from dfsfuse.shards.replica import ReplicaCorrupt
from dfsfuse.shards.replicator import Replicator
from dfsfuse.storage.local import LocalStore

TEXT = b"".join(b"line %d of a very compressible log file\n" % n for n in range(100_000))
NOISE = os.urandom(300_000)


def test_an_encoding_survives_its_text_form():
    plain = Encoding(1234, bytes(range(16)), "zstd", sealed=True)
    coded = Encoding(999, b"\1" * 16, "", False, 4, 2, tuple(bytes([n]) * 16 for n in range(6)))
    for encoding in (plain, coded):
        assert Encoding.from_text(encoding.to_text()) == encoding
    assert encoding_text(None) is None and encoding_of_text(None) is None
    assert coded.copy_length == 250 and coded.fragments == 6 and plain.copy_length == 1234


@pytest.mark.parametrize("text", [
    "", "{}", "[1]", '{"v": 2, "n": 1, "c": "00"}', '{"v": 1, "n": 1, "c": "zz"}',
    '{"v": 1, "n": 1, "c": "' + "00" * 16 + '", "z": "gzip"}',
    '{"v": 1, "n": 1, "c": "' + "00" * 16 + '", "ec": [4, 2], "f": []}',
])
def test_a_bad_encoding_text_is_refused(text):
    with pytest.raises(EncodingError):
        Encoding.from_text(text)


@pytest.mark.parametrize("name", ["zstd", "lz4"])
def test_compression_round_trips_and_saves_on_text(name):
    packed = compress(name, TEXT)
    assert packed is not None and len(packed) < len(TEXT) // 5
    assert decompress(name, packed, len(TEXT)) == TEXT
    assert compress(name, NOISE) is None  # incompressible: stored as it is
    with pytest.raises(CompressionError):
        decompress(name, packed, len(TEXT) + 1)
    with pytest.raises(CompressionError):
        decompress(name, b"not compressed data at all", 100)


def test_the_codec_leaves_plain_what_it_cannot_shrink_and_checks_what_it_decodes():
    codec = ObjectCodec()
    checksum, encoding, payload = codec.encode(7, NOISE, "zstd")
    assert encoding is None and payload is NOISE and checksum == shard_checksum(NOISE)
    checksum, encoding, payload = codec.encode(7, TEXT, "zstd")
    assert encoding is not None and encoding.compression == "zstd" and not encoding.sealed
    assert encoding.payload_length == len(payload) and encoding.payload_checksum == shard_checksum(payload)
    ref = ShardRef(7, len(TEXT), checksum, ("n0",), encoding=encoding)
    assert codec.decode(ref, payload) == TEXT
    with pytest.raises(ReplicaCorrupt):
        codec.decode(dataclasses.replace(ref, checksum=b"\0" * 16), payload)
    _, always, _ = codec.encode(7, NOISE, "", always=True)
    assert always is not None and always.compression == "" and always.payload_length == len(NOISE)


def test_policies_come_from_xattrs_over_the_config():
    assert policy_of({}, "lz4") == StoragePolicy(None, "lz4", None)
    xattrs = {REPLICAS_XATTR: b"3", COMPRESSION_XATTR: b"off", ERASURE_XATTR: b"4+2"}
    assert policy_of(xattrs, "zstd") == StoragePolicy(3, "", (4, 2))
    assert StoragePolicy(erasure=(4, 2)).copies(2) == 1.5 and StoragePolicy().copies(2) == 2
    assert check_compression_value(b" ZSTD\n") == b"zstd"
    assert check_policy_value(REPLICAS_XATTR, b" 03\n", 3) == b"3"
    assert check_policy_value(ERASURE_XATTR, b"2+1", 3) == b"2+1"
    for name, bad in ((REPLICAS_XATTR, b"4"), (REPLICAS_XATTR, b"0"), (COMPRESSION_XATTR, b"xz")):
        with pytest.raises(InvalidArgument):
            check_policy_value(name, bad, 3)
    assert check_erasure_value(b"4+2", 6) == b"4+2" and check_erasure_value(b"off", 1) == b"off"
    for bad in (b"gzip", b""):
        with pytest.raises(InvalidArgument):
            check_compression_value(bad)
    for bad in (b"4+2x", b"1+1", b"4+0", b"20+20", b"4"):
        with pytest.raises(InvalidArgument):
            check_erasure_value(bad, 64)
    with pytest.raises(InvalidArgument, match="needs 6 nodes"):
        check_erasure_value(b"4+2", 5)
    assert parse_compression("off", "config") == ""
    with pytest.raises(UserError, match="compression must be one of"):
        parse_compression("brotli", "config")


async def _replicator(tmp_path) -> tuple[Replicator, dict[str, LocalStore]]:
    stores = {name: await LocalStore.open(name, str(tmp_path / name)) for name in ("n0", "n1", "n2")}
    return Replicator(list(stores.values()), 2, 4096), stores


async def _corrupt(store: LocalStore, shard_id: int, position: int) -> None:
    """Flip a byte of the replica, through the store (whatever its layout)."""
    (data,) = await store.read(shard_id, [(0, -1)])
    damaged = bytearray(data)
    damaged[position] ^= 0x40
    await store.put(shard_id, [bytes(damaged)], sync=False)


@pytest.mark.parametrize("name", ["zstd", "lz4"])
def test_a_compressed_object_is_stored_small_and_reads_back_in_any_range(tmp_path, name):
    async def body() -> None:
        replicator, stores = await _replicator(tmp_path)
        ref = await replicator.write(11, TEXT, sync=True, policy=StoragePolicy(compression=name))
        assert ref.encoding is not None and ref.encoding.compression == name
        for node in ref.nodes:
            assert (await stores[node].stat()).used < len(TEXT) // 5
        assert await replicator.read(ref, 0, ref.length) == TEXT
        for offset, length in ((0, 1), (12345, 4096), (len(TEXT) - 10, 100), (len(TEXT), 5)):
            assert await replicator.read(ref, offset, length) == TEXT[offset : offset + length]
        plain = await replicator.write(12, NOISE, sync=True, policy=StoragePolicy(compression=name))
        assert plain.encoding is None and await replicator.read(plain, 100, 50) == NOISE[100:150]

    trio.run(body)


def test_a_corrupt_compressed_replica_is_caught_before_decompression_and_repaired(tmp_path):
    async def body() -> None:
        replicator, stores = await _replicator(tmp_path)
        ref = await replicator.write(21, TEXT, sync=True, policy=StoragePolicy(compression="zstd"))
        first, second = ref.nodes
        await _corrupt(stores[first], ref.shard_id, 200)  # inside the compressed data
        assert await replicator.read(ref, 0, ref.length) == TEXT  # from the other replica
        result = await replicator.repair(ref)
        assert (result.corrupt, result.repaired, result.good) == (1, 1, 1)
        assert (await replicator.repair(ref)).good == 2
        await _corrupt(stores[first], ref.shard_id, 200)
        await _corrupt(stores[second], ref.shard_id, 300)
        with pytest.raises(Exception, match="no good replica"):
            await replicator.read(ref, 0, 10)
        assert (await replicator.repair(ref)).unrecoverable

    trio.run(body)
