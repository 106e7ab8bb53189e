"""Erasure coding of payloads (dfsfuse/shards/erasure.py): every loss pattern
up to m fragments gives the payload back, and rebuilt fragments are the
ones lost."""

from __future__ import annotations

import itertools
import os

import pytest

from dfsfuse.shards import erasure


@pytest.mark.parametrize("k, m", [(2, 1), (3, 2), (4, 2)])
@pytest.mark.parametrize("length", [1, 5, 4096, 100_003])
def test_any_k_fragments_give_the_payload_back(k, m, length):
    payload = os.urandom(length)
    fragments = erasure.split(payload, k, m)
    size = erasure.fragment_length(length, k)
    assert len(fragments) == k + m and all(len(fragment) == size for fragment in fragments)
    assert b"".join(bytes(fragment) for fragment in fragments[:k])[:length] == payload  # systematic
    for lost in range(m + 1):
        for gone in itertools.combinations(range(k + m), lost):
            left = {number: fragments[number] for number in range(k + m) if number not in gone}
            assert erasure.join(left, k, m, length) == payload, f"lost {gone}"
            rebuilt = erasure.rebuild(left, k, m, gone)
            assert {n: bytes(f) for n, f in rebuilt.items()} == {n: bytes(fragments[n]) for n in gone}


def test_fewer_than_k_fragments_are_refused():
    fragments = erasure.split(os.urandom(1000), 4, 2)
    with pytest.raises(ValueError, match="4 are needed"):
        erasure.join({0: fragments[0], 4: fragments[4], 5: fragments[5]}, 4, 2, 1000)


def test_the_threshold_for_fragmenting():
    k = 4
    assert not erasure.worth_fragmenting(k * erasure.MIN_FRAGMENT_BYTES - k, k)
    assert erasure.worth_fragmenting(k * erasure.MIN_FRAGMENT_BYTES - k + 1, k)
    with pytest.raises(ValueError):
        erasure.split(b"", 4, 2)
