"""Directory quotas on the write path (write/quotas.py), in-process over real
metadata and stores: growth refused exactly at the limit while background
flushes commit, several open files under one quota, truncate and fallocate
growth, room freed by an unlink or a shrink, and a commit whose answer is
still on its way when the usage is read (counted twice for a moment: the
refusal waits for it).

The quota is set before the file system's first growth, so the mount's
guard reads it then (a mount learns of later ones from its control socket).
"""

from __future__ import annotations

import errno
import os

import pytest
import trio
import trio.testing
from fsharness import SHARD, Harness, KiB, run, wait_until

from dfsfuse.errors import QuotaExceeded
from dfsfuse.metadata.base import AttrChanges, ChangeNotice
from dfsfuse.vfs.filesystem import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE

pytestmark = pytest.mark.timeout(60)

PAGE = 4 * KiB


async def fill(env, handle: int, start: int, chunk: int) -> int:
    """Append `chunk`-byte writes from `start` until EDQUOT; the bytes accepted."""
    offset = start
    while True:
        try:
            await env.fs.write(handle, offset, os.urandom(chunk))
        except QuotaExceeded as refused:
            assert refused.errno == errno.EDQUOT
            return offset - start
        offset += chunk


def test_appends_stop_exactly_at_the_limit_while_flushes_commit(tmp_path):
    async def body() -> None:
        async with Harness(tmp_path).running() as env:
            directory = await env.mkdir(b"limited")
            limit = 10 * SHARD + 3 * PAGE + 100
            await env.meta.set_quota(directory, limit, None)
            handle, inode = await env.create(b"file", directory)
            accepted = await fill(env, handle, 0, PAGE)  # full shards are committed in the background meanwhile
            assert accepted == (limit // PAGE) * PAGE
            await env.fs.write(handle, 0, b"rewrite")  # no growth: always fine
            await env.fs.flush(handle)
            assert (await env.meta.quota(directory)).used_bytes == accepted
            assert (await env.fs.getattr(inode)).size == accepted
            await env.fs.release(handle)

    run(body)


def test_open_files_under_one_quota_share_it(tmp_path):
    async def body() -> None:
        async with Harness(tmp_path).running() as env:
            outer = await env.mkdir(b"outer")
            inner = await env.mkdir(b"inner", outer)
            await env.meta.set_quota(outer, 6 * SHARD, None)
            await env.meta.set_quota(inner, 4 * SHARD, None)
            first, _ = await env.create(b"first", inner)
            second, _ = await env.create(b"second", outer)
            await env.fs.write(first, 0, bytes(3 * SHARD))  # uncommitted, mostly
            with pytest.raises(QuotaExceeded):  # inner: 3 + 2 > 4
                await env.fs.write(first, 3 * SHARD, bytes(2 * SHARD))
            await env.fs.write(second, 0, bytes(3 * SHARD))  # outer: 3 + 3 = 6
            with pytest.raises(QuotaExceeded):
                await env.fs.write(second, 3 * SHARD, b"x")
            with pytest.raises(QuotaExceeded):  # inner has room, outer not
                await env.fs.write(first, 3 * SHARD, b"x")
            for handle in (first, second):
                await env.fs.release(handle)
            assert (await env.meta.quota(outer)).used_bytes == 6 * SHARD
            assert await env.meta.check_quotas(repair=False) == []

    run(body)


def test_a_commit_still_in_flight_when_the_usage_is_read_does_not_refuse_a_growth_that_fits(tmp_path):
    async def body() -> None:
        async with Harness(tmp_path).running() as env:
            directory = await env.mkdir(b"limited")
            limit = 4 * SHARD
            await env.meta.set_quota(directory, limit, None)
            first, first_inode = await env.create(b"first", directory)
            second, _ = await env.create(b"second", directory)
            await env.fs.write(first, 0, bytes(SHARD // 2))  # buffered
            await env.fs.write(second, 0, b"x")
            env.engine.gated_commits = frozenset({first_inode})
            env.engine.commit_gate = gate = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(env.fs.flush, first)  # committed, but the answer waits at the gate
                await wait_until(lambda: env.engine.commits_waiting == 1)
                # Another mount's notice: the next growth reads the usage again, first's commit in it.
                env.fs.note_changes(ChangeNotice(everything=True))
                nursery.start_soon(env.fs.write, second, 1, bytes(limit - SHARD // 2 - 1))  # fills it exactly
                await trio.testing.wait_all_tasks_blocked(cushion=0.2)
                gate.set()
            env.engine.commit_gate = None
            with pytest.raises(QuotaExceeded):
                await env.fs.write(second, limit - SHARD // 2, b"x")
            for handle in (first, second):
                await env.fs.release(handle)
            assert (await env.meta.quota(directory)).used_bytes == limit

    run(body)


def test_truncate_and_fallocate_growth_are_refused_and_shrinking_frees_room(tmp_path):
    async def body() -> None:
        async with Harness(tmp_path).running() as env:
            directory = await env.mkdir(b"limited")
            await env.meta.set_quota(directory, 2 * SHARD, None)
            handle, inode = await env.create(b"file", directory)
            await env.fs.write(handle, 0, os.urandom(SHARD))
            for grow in (
                lambda: env.fs.setattr(inode, AttrChanges(), 2 * SHARD + 1),
                lambda: env.fs.fallocate(handle, 0, 0, 3 * SHARD),
            ):
                with pytest.raises(QuotaExceeded):
                    await grow()
            assert (await env.fs.getattr(inode)).size == SHARD
            await env.fs.fallocate(handle, FALLOC_FL_KEEP_SIZE, 0, 3 * SHARD)  # no growth
            await env.fs.fallocate(handle, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, PAGE)
            await env.fs.setattr(inode, AttrChanges(), 2 * SHARD)  # up to the limit exactly
            await env.fs.setattr(inode, AttrChanges(), SHARD // 2)  # a shrink frees room at once
            await env.fs.write(handle, SHARD // 2, bytes(SHARD + SHARD // 2))
            await env.fs.release(handle)
            assert (await env.meta.quota(directory)).used_bytes == 2 * SHARD

    run(body)


def test_an_unlink_frees_room_at_once(tmp_path):
    async def body() -> None:
        async with Harness(tmp_path).running() as env:
            directory = await env.mkdir(b"limited")
            await env.meta.set_quota(directory, 2 * SHARD, None)
            old, _ = await env.create(b"old", directory)
            await env.fs.write(old, 0, bytes(2 * SHARD))
            await env.fs.release(old)
            new, _ = await env.create(b"new", directory)
            with pytest.raises(QuotaExceeded):
                await env.fs.write(new, 0, b"x")
            await env.fs.unlink(directory, b"old")
            await env.fs.write(new, 0, bytes(2 * SHARD))
            await env.fs.release(new)
            assert (await env.meta.quota(directory)).used_bytes == 2 * SHARD

    run(body)

