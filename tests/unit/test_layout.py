"""dfsfuse.vfs.layout: offsets to shards and checksum blocks."""

import pytest

from dfsfuse.layout import block_span, shard_count, shard_length, shard_span


def test_shard_span_inside_one_shard():
    assert list(shard_span(10, 20, 100)) == [(0, 10, 20)]


def test_shard_span_crossing_shards():
    assert list(shard_span(90, 230, 100)) == [(0, 90, 10), (1, 0, 100), (2, 0, 100), (3, 0, 20)]


def test_shard_span_on_boundaries():
    assert list(shard_span(100, 100, 100)) == [(1, 0, 100)]
    assert list(shard_span(99, 2, 100)) == [(0, 99, 1), (1, 0, 1)]


def test_shard_span_empty_range():
    assert list(shard_span(50, 0, 100)) == []


@pytest.mark.parametrize("offset, length", [(0, 1), (7, 1000), (123, 4567), (4096, 4096)])
def test_shard_span_covers_range_exactly(offset, length):
    pieces = list(shard_span(offset, length, 1000))
    assert sum(take for _, _, take in pieces) == length
    position = offset
    for index, inner, take in pieces:
        assert index * 1000 + inner == position
        assert 0 < take <= 1000 - inner
        position += take


@pytest.mark.parametrize(
    "size, expected", [(0, 0), (1, 1), (99, 1), (100, 1), (101, 2), (1000, 10)]
)
def test_shard_count(size, expected):
    assert shard_count(size, 100) == expected


def test_shard_length():
    assert [shard_length(index, 250, 100) for index in range(4)] == [100, 100, 50, 0]
    assert shard_length(0, 0, 100) == 0
    assert shard_length(1, 200, 100) == 100


def test_block_span():
    assert block_span(0, 1, 64) == range(0, 1)
    assert block_span(0, 64, 64) == range(0, 1)
    assert block_span(63, 2, 64) == range(0, 2)
    assert block_span(64, 64, 64) == range(1, 2)
    assert block_span(10, 200, 64) == range(0, 4)


def test_block_span_empty():
    assert len(block_span(10, 0, 64)) == 0
    assert len(block_span(10, -5, 64)) == 0
