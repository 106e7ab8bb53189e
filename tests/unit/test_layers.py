"""The layer arithmetic of a shard index: reach, page sources, read runs, merge."""

from __future__ import annotations

import random

from dfsfuse.layout import PAGE_SIZE
from dfsfuse.metadata.base import ShardRef
from dfsfuse.shards.layers import (
    base_of,
    merge,
    page_sources,
    patch_count,
    reach,
    source_runs,
    stored_length,
)


def whole(shard_id: int, length: int) -> ShardRef:
    return ShardRef(shard_id, length, bytes(16), ("a",))


def patch(shard_id: int, *pages: int) -> ShardRef:
    return ShardRef(shard_id, len(pages) * PAGE_SIZE, bytes(16), ("a",), tuple(pages))


def test_reach_and_stored_length():
    assert reach(whole(1, 5000)) == 5000
    assert reach(patch(2, 1, 7)) == 8 * PAGE_SIZE
    assert stored_length((whole(1, 5000), patch(2, 3))) == 4 * PAGE_SIZE
    assert stored_length((whole(1, 9 * PAGE_SIZE), patch(2, 3))) == 9 * PAGE_SIZE
    assert stored_length(()) == 0


def test_base_and_patch_count():
    base, top = whole(1, PAGE_SIZE), patch(2, 0)
    assert base_of((base, top)) is base
    assert base_of((top,)) is None
    assert base_of(()) is None
    assert patch_count((base, top, patch(3, 1))) == 2


def test_newest_patch_wins_each_page():
    older, newer = patch(2, 0, 1, 2), patch(3, 1)
    sources = page_sources((whole(1, 3 * PAGE_SIZE), older, newer))
    assert sources == {0: (older, 0), 1: (newer, 0), 2: (older, 2)}


def test_source_runs_split_where_the_source_or_its_slots_break():
    older, newer = patch(2, 0, 1, 2), patch(3, 1, 5)
    sources = page_sources((whole(1, 8 * PAGE_SIZE), older, newer))
    runs = list(source_runs(100, 7 * PAGE_SIZE, sources))
    assert runs == [
        (100, PAGE_SIZE, (older, 0)),
        (PAGE_SIZE, 2 * PAGE_SIZE, (newer, 0)),
        (2 * PAGE_SIZE, 3 * PAGE_SIZE, (older, 2)),
        (3 * PAGE_SIZE, 5 * PAGE_SIZE, None),  # two pages of the whole shard: one run
        (5 * PAGE_SIZE, 6 * PAGE_SIZE, (newer, 1)),
        (6 * PAGE_SIZE, 7 * PAGE_SIZE, None),
    ]
    # Consecutive pages at consecutive slots of one patch are one run.
    assert list(source_runs(0, 3 * PAGE_SIZE, page_sources((older,)))) == [(0, 3 * PAGE_SIZE, (older, 0))]


def test_merge_matches_applying_the_layers_in_order():
    rng = random.Random(3)
    length = 10 * PAGE_SIZE + 123
    base = rng.randbytes(length)
    expected = bytearray(base)
    layers = [whole(1, length)]
    contents = [base]
    for shard_id in range(2, 6):
        pages = sorted(rng.sample(range(12), 3))
        data = rng.randbytes(len(pages) * PAGE_SIZE)
        layers.append(patch(shard_id, *pages))
        contents.append(data)
        end = (pages[-1] + 1) * PAGE_SIZE
        expected.extend(bytes(max(0, end - len(expected))))
        for slot, page in enumerate(pages):
            expected[page * PAGE_SIZE : (page + 1) * PAGE_SIZE] = data[slot * PAGE_SIZE : (slot + 1) * PAGE_SIZE]
    assert merge(tuple(layers), contents) == bytes(expected)


def test_merge_of_patches_alone_has_zeros_where_no_page_is():
    data = b"x" * PAGE_SIZE
    assert merge((patch(2, 1),), [data]) == bytes(PAGE_SIZE) + data
    assert merge((whole(1, 3),), [b"abc"]) == b"abc"
