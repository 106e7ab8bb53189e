"""Checksums and rendezvous placement."""

import collections
import os

import pytest

from dfsfuse.shards.checksum import (
    DIGEST_SIZE,
    block_checksum,
    block_checksum_table,
    combined_checksum,
    placement_weight,
    shard_checksum,
)
from dfsfuse.shards.placement import place

# xxh3-128 of b"" as specified by the xxHash reference implementation, so the
# on-disk checksums stay what other implementations compute.
XXH3_128_EMPTY = bytes.fromhex("99aa06d3014798d86001c324468d497f")


def test_shard_checksum_is_xxh3_128():
    assert shard_checksum(b"") == XXH3_128_EMPTY
    assert len(shard_checksum(b"hello")) == DIGEST_SIZE


def test_checksum_accepts_every_buffer_type():
    data = os.urandom(1000)
    expected = shard_checksum(data)
    assert shard_checksum(bytearray(data)) == expected
    assert shard_checksum(memoryview(data)) == expected
    assert block_checksum(data) == expected


def test_block_checksum_table():
    data = os.urandom(250)
    table = block_checksum_table(data, 100)
    assert table == block_checksum(data[:100]) + block_checksum(data[100:200]) + block_checksum(data[200:])
    assert block_checksum_table(b"", 100) == b""
    assert len(block_checksum_table(bytes(200), 100)) == 2 * DIGEST_SIZE


def test_combined_checksum_equals_checksum_of_concatenation():
    parts = [b"abc", bytearray(b"defg"), memoryview(b"hij")]
    assert combined_checksum(parts) == shard_checksum(b"abcdefghij")


def test_placement_weight_depends_on_both_inputs():
    assert placement_weight(1, "a") == placement_weight(1, "a")
    assert placement_weight(1, "a") != placement_weight(2, "a")
    assert placement_weight(1, "a") != placement_weight(1, "b")
    assert 0 <= placement_weight(2**64 - 1, "node") < 2**64


def test_place_orders_all_stores_and_is_stable():
    names = [f"node{i}" for i in range(7)]
    order = place(42, names)
    assert sorted(order) == sorted(names)
    assert place(42, list(reversed(names))) == order
    assert place(42, names) == order


def test_place_spreads_primaries_evenly():
    names = [f"node{i}" for i in range(10)]
    primaries = collections.Counter(place(shard_id, names)[0] for shard_id in range(20000))
    assert set(primaries) == set(names)
    for count in primaries.values():
        assert 1700 < count < 2300  # expected 2000, sigma about 42


@pytest.mark.parametrize("replicas", [1, 3])
def test_adding_a_store_moves_about_one_in_n(replicas):
    """Rendezvous hashing: only shards that rank the new store in their top R
    move, and each of them moves exactly one replica, to the new store."""
    old = [f"node{i}" for i in range(10)]
    new = old + ["node10"]
    shards = 20000
    moved = 0
    for shard_id in range(shards):
        before = set(place(shard_id, old)[:replicas])
        after = set(place(shard_id, new)[:replicas])
        if before != after:
            moved += 1
            assert after - before == {"node10"}
            assert len(before - after) == 1
    expected = replicas / len(new)
    assert abs(moved / shards - expected) < 0.02


def test_removing_a_store_only_moves_its_shards():
    names = [f"node{i}" for i in range(8)]
    remaining = [name for name in names if name != "node3"]
    for shard_id in range(5000):
        before = place(shard_id, names)
        after = place(shard_id, remaining)
        assert after == [name for name in before if name != "node3"]
