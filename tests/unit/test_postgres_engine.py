"""The PostgreSQL engine beyond the metadata contract (which it passes too):
several engines on one database at once, as several mounts are, and how it
is reached (URLs, passwords, an unreachable or empty database)."""

from __future__ import annotations

import pathlib
import stat
import time

import pytest
import trio

from dfsfuse.errors import UserError
from dfsfuse.metadata.base import ROOT_INODE, MetadataStore
from dfsfuse.metadata.engines import MetadataSettings, metadata_exists, open_engine
from dfsfuse.metadata.postgres import PostgresMetadata, redacted

FILE = stat.S_IFREG | 0o644
DIRECTORY = stat.S_IFDIR | 0o755


def run_with_two(url: str, body) -> None:
    """body(a, b): two engines on one database, as two mounts on two machines."""

    async def main() -> None:
        first = await PostgresMetadata.open(url)
        second = await PostgresMetadata.open(url)
        try:
            await body(first, second)
        finally:
            await first.close()
            await second.close()

    trio.run(main)


async def names_in(store: MetadataStore, directory: int) -> list[bytes]:
    return [entry.name for entry in await store.readdir(directory, 0, 10_000)]


def test_opposite_renames_from_two_engines_neither_deadlock_nor_lose_a_name(postgres_url):
    async def body(a: PostgresMetadata, b: PostgresMetadata) -> None:
        left = (await a.create(ROOT_INODE, b"left", DIRECTORY, 0, 0, time.time_ns())).attrs.inode
        right = (await a.create(ROOT_INODE, b"right", DIRECTORY, 0, 0, time.time_ns())).attrs.inode
        for i in range(20):
            await a.create(left, b"l%d" % i, FILE, 0, 0, time.time_ns())
            await a.create(right, b"r%d" % i, FILE, 0, 0, time.time_ns())

        async def move(store: PostgresMetadata, prefix: bytes, origin: int, destination: int) -> None:
            for i in range(20):
                name = b"%s%d" % (prefix, i)
                await store.rename(origin, name, destination, name, 0, time.time_ns())

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(move, a, b"l", left, right)
                nursery.start_soon(move, b, b"r", right, left)
        assert sorted(await names_in(a, left)) == sorted(b"r%d" % i for i in range(20))
        assert sorted(await names_in(b, right)) == sorted(b"l%d" % i for i in range(20))
        assert (await a.getattr(left)).nlink == (await a.getattr(right)).nlink == 2

    run_with_two(postgres_url, body)


def test_creates_from_two_engines_in_one_directory_get_unique_inodes_and_offsets(postgres_url):
    async def body(a: PostgresMetadata, b: PostgresMetadata) -> None:
        made: list = []

        async def make(store: PostgresMetadata, prefix: bytes) -> None:
            for i in range(40):
                made.append(await store.create(ROOT_INODE, b"%s%d" % (prefix, i), FILE, 0, 0, time.time_ns()))

        async with trio.open_nursery() as nursery:
            for store, prefix in ((a, b"a"), (a, b"b"), (b, b"c"), (b, b"d")):
                nursery.start_soon(make, store, prefix)
        assert len({change.attrs.inode for change in made}) == 160
        assert len({change.offset for change in made}) == 160
        listing = await b.readdir(ROOT_INODE, 0, 1000)
        assert len(listing) == 160
        assert [entry.offset for entry in listing] == sorted(entry.offset for entry in listing)

    run_with_two(postgres_url, body)


def test_shard_ids_from_two_engines_never_overlap(postgres_url):
    async def body(a: PostgresMetadata, b: PostgresMetadata) -> None:
        ranges: list[range] = []

        async def allocate(store: PostgresMetadata) -> None:
            for _ in range(25):
                ranges.append(await store.allocate_shard_ids(8))

        async with trio.open_nursery() as nursery:
            for store in (a, a, b, b):
                nursery.start_soon(allocate, store)
        ids = [shard_id for allocated in ranges for shard_id in allocated]
        assert len(ids) == len(set(ids)) == 800

    run_with_two(postgres_url, body)


def test_an_unreachable_server_is_one_line_naming_the_url():
    url = "postgresql://someone:secret@127.0.0.1:9/nothing"  # the discard port: nothing listens
    with pytest.raises(UserError) as raised:
        trio.run(PostgresMetadata.open, url)
    message = str(raised.value)
    assert "\n" not in message
    assert "cannot reach PostgreSQL at postgresql://someone:***@127.0.0.1:9/nothing" in message
    assert "secret" not in message


def test_an_empty_database_is_no_file_system_until_one_is_made(postgres_url):
    settings = MetadataSettings(pathlib.Path("/nonexistent"), "postgresql", postgres_url)
    assert not metadata_exists(settings)
    with pytest.raises(UserError, match="holds no dfsfuse file system"):
        trio.run(lambda: open_engine(settings, create=False))

    async def make() -> None:
        await (await open_engine(settings, create=True)).close()

    trio.run(make)
    assert metadata_exists(settings)


def test_the_password_comes_from_a_private_file(postgres_server, postgres_url, tmp_path):
    bare = postgres_url.replace(f":{postgres_server.password}@", "@")
    assert postgres_server.password not in bare
    password_file = tmp_path / "pgpass"
    password_file.write_text(postgres_server.password + "\n")
    password_file.chmod(0o644)
    settings = MetadataSettings(pathlib.Path("/nonexistent"), "postgresql", bare, password_file)
    with pytest.raises(UserError, match="must not be readable by others"):
        metadata_exists(settings)
    password_file.chmod(0o600)
    assert not metadata_exists(settings)
    password_file.write_text("wrong\n")
    with pytest.raises(UserError, match="cannot reach PostgreSQL"):
        metadata_exists(settings)


def test_messages_never_show_a_password():
    assert redacted("postgresql://u:pw@h:5432/db?sslmode=require") == "postgresql://u:***@h:5432/db?sslmode=require"
    assert redacted("postgresql://u@h/db") == "postgresql://u@h/db"
    assert redacted("postgresql://h/db") == "postgresql://h/db"
