"""dfsfuse.metadata.locks against a brute-force model that keeps a lock per byte.

Requests start and end inside bytes 0..SPAN-1, or end at OFFSET_MAX; so every
byte from SPAN on is covered by the same requests, and the model's byte SPAN
stands for all of them.
"""

import itertools
import random

import pytest

from dfsfuse.metadata.locks import (
    F_RDLCK,
    F_UNLCK,
    F_WRLCK,
    FLOCK,
    OFFSET_MAX,
    POSIX,
    LockRecord,
    apply,
    conflict,
    release,
)

SPAN = 24
OWNERS = ("a", "b", "c", ("session2", 7))
TYPES = (F_RDLCK, F_WRLCK, F_UNLCK)


def posix(owner, type_, start, end, pid=0):
    return LockRecord(owner, POSIX, type_, start, end, pid)


def random_request(rng: random.Random) -> LockRecord:
    start = rng.randrange(SPAN)
    end = OFFSET_MAX if rng.random() < 0.2 else rng.randrange(start, SPAN)
    return posix(rng.choice(OWNERS), rng.choice(TYPES), start, end, pid=rng.randrange(1, 100))


def model_bytes(request: LockRecord) -> range:
    return range(request.start, min(request.end, SPAN) + 1)


def expand(records) -> dict[int, dict]:
    """byte -> {owner: type} of a table of records (the model's form)."""
    table: dict[int, dict] = {byte: {} for byte in range(SPAN + 1)}
    for record in records:
        for byte in model_bytes(record):
            assert record.owner_key not in table[byte], f"two records of one owner on byte {byte}: {records}"
            table[byte][record.owner_key] = record.type
    return table


def model_conflicts(model, request) -> bool:
    if request.type == F_UNLCK:
        return False
    return any(owner != request.owner_key and F_WRLCK in (held, request.type)
               for byte in model_bytes(request) for owner, held in model[byte].items())


def model_apply(model, request) -> None:
    for byte in model_bytes(request):
        if request.type == F_UNLCK:
            model[byte].pop(request.owner_key, None)
        else:
            model[byte][request.owner_key] = request.type


def assert_canonical(records) -> None:
    """Sorted, disjoint, and merged: no two adjacent ranges of one type."""
    for first, second in itertools.pairwise(records):
        assert first.end < second.start, records
        assert not (first.end + 1 == second.start and first.type == second.type), f"unmerged: {records}"
    assert all(r.type != F_UNLCK for r in records), records


@pytest.mark.parametrize("seed", range(40))
def test_posix_random_operations_match_per_byte_model(seed):
    rng = random.Random(seed)
    table: list[LockRecord] = []
    model = expand(table)
    for _ in range(150):
        request = random_request(rng)
        found = conflict(table, request)
        assert (found is not None) == model_conflicts(model, request), (table, request)
        if found is not None:
            assert found in table and found.owner_key != request.owner_key and found.overlaps(request)
            assert F_WRLCK in (found.type, request.type)
            assert found.start == min(r.start for r in table if conflict([r], request)), "not the first conflict"
            # apply is arithmetic on the owner's records alone: it may still be computed
            mine = apply(table, request)
            assert all(r.owner_key == request.owner_key for r in mine)
            continue
        mine = apply(table, request)
        assert_canonical(mine)
        assert all(r.owner_key == request.owner_key and r.kind == POSIX for r in mine)
        table = [r for r in table if r.owner_key != request.owner_key] + mine
        model_apply(model, request)
        assert expand(table) == model, (request, table)
        if rng.random() < 0.03:
            owner = rng.choice(OWNERS)
            table = release(table, owner)
            for byte in model.values():
                byte.pop(owner, None)
            assert expand(table) == model


def test_split_by_unlock_in_the_middle():
    held = [posix("a", F_WRLCK, 0, OFFSET_MAX)]
    assert apply(held, posix("a", F_UNLCK, 10, 19)) == [posix("a", F_WRLCK, 0, 9), posix("a", F_WRLCK, 20, OFFSET_MAX)]


def test_change_of_type_in_the_middle_splits_in_three():
    held = [posix("a", F_RDLCK, 0, 99)]
    assert apply(held, posix("a", F_WRLCK, 10, 19)) == [
        posix("a", F_RDLCK, 0, 9), posix("a", F_WRLCK, 10, 19), posix("a", F_RDLCK, 20, 99)]


def test_adjacent_same_type_merge_and_the_new_pid_wins():
    held = [posix("a", F_RDLCK, 0, 9, pid=5), posix("a", F_RDLCK, 20, 29, pid=5)]
    assert apply(held, posix("a", F_RDLCK, 10, 19, pid=6)) == [posix("a", F_RDLCK, 0, 29, pid=6)]


def test_adjacent_different_type_stay_apart():
    held = [posix("a", F_RDLCK, 0, 9)]
    assert apply(held, posix("a", F_WRLCK, 10, 19)) == [posix("a", F_RDLCK, 0, 9), posix("a", F_WRLCK, 10, 19)]


def test_other_owners_records_are_not_in_the_result():
    held = [posix("a", F_RDLCK, 0, 9), posix("b", F_RDLCK, 0, 9)]
    assert apply(held, posix("a", F_UNLCK, 0, OFFSET_MAX)) == []


def test_read_locks_of_different_owners_coexist_and_write_conflicts():
    held = [posix("a", F_RDLCK, 0, 9), posix("b", F_RDLCK, 5, 14)]
    assert conflict(held, posix("c", F_RDLCK, 0, OFFSET_MAX)) is None
    assert conflict(held, posix("c", F_WRLCK, 12, 12)) == held[1]
    assert conflict(held, posix("c", F_WRLCK, 0, OFFSET_MAX)) == held[0]
    assert conflict(held, posix("a", F_WRLCK, 0, 4)) is None, "an owner does not conflict with itself"
    assert conflict(held, posix("c", F_WRLCK, 15, OFFSET_MAX)) is None
    assert conflict(held, posix("c", F_UNLCK, 0, OFFSET_MAX)) is None


def test_flock_one_lock_per_owner_converts_and_conflicts():
    table = apply([], LockRecord.flock("f1", F_RDLCK))
    assert table == [LockRecord.flock("f1", F_RDLCK)]
    assert conflict(table, LockRecord.flock("f2", F_RDLCK)) is None
    table = table + apply(table, LockRecord.flock("f2", F_RDLCK))
    assert conflict(table, LockRecord.flock("f1", F_WRLCK)) == LockRecord.flock("f2", F_RDLCK)
    table = release(table, "f2")
    assert conflict(table, LockRecord.flock("f1", F_WRLCK)) is None
    assert apply(table, LockRecord.flock("f1", F_WRLCK)) == [LockRecord.flock("f1", F_WRLCK)]
    assert apply(table, LockRecord.flock("f1", F_UNLCK)) == []


def test_flock_and_posix_never_conflict_and_release_by_kind():
    table = [LockRecord.flock("x", F_WRLCK), posix("x", F_WRLCK, 0, OFFSET_MAX)]
    assert conflict(table, posix("y", F_RDLCK, 0, 0)) == table[1]
    assert conflict(table, LockRecord.flock("y", F_RDLCK)) == table[0]
    assert conflict([table[0]], posix("y", F_WRLCK, 0, OFFSET_MAX)) is None
    assert apply(table, posix("x", F_UNLCK, 0, OFFSET_MAX)) == []
    assert release(table, "x", POSIX) == [table[0]]
    assert release(table, "x", FLOCK) == [table[1]]
    assert release(table, "x") == []


@pytest.mark.parametrize("seed", range(10))
def test_flock_random_operations_match_model(seed):
    rng = random.Random(1000 + seed)
    table: list[LockRecord] = []
    held: dict = {}
    for _ in range(100):
        owner, type_ = rng.choice(OWNERS), rng.choice(TYPES)
        request = LockRecord.flock(owner, type_)
        others = [t for o, t in held.items() if o != owner]
        expected = type_ != F_UNLCK and (F_WRLCK in others or (type_ == F_WRLCK and bool(others)))
        assert (conflict(table, request) is not None) == expected
        if expected:
            continue
        table = [r for r in table if r.owner_key != owner] + apply(table, request)
        if type_ == F_UNLCK:
            held.pop(owner, None)
        else:
            held[owner] = type_
        assert {r.owner_key: r.type for r in table} == held and len(table) == len(held)


@pytest.mark.parametrize("args", [
    ("a", "mandatory", F_RDLCK, 0, 1),
    ("a", POSIX, 99, 0, 1),
    ("a", POSIX, F_RDLCK, -1, 1),
    ("a", POSIX, F_RDLCK, 5, 4),
    ("a", POSIX, F_RDLCK, 0, OFFSET_MAX + 1),
    ("a", FLOCK, F_RDLCK, 0, 10),
])
def test_invalid_records_are_refused(args):
    with pytest.raises(ValueError):
        LockRecord(*args)
