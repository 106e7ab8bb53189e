"""The metadata engines dfsfuse has, and the one way to open one.

Everything that opens a file system's metadata (runtime.open_components for
the mount and the commands, dfsfuse.restore) goes through this module with
the MetadataSettings the config gives, never through an engine's own class;
so do metadata dumps (dfsfuse.metadata.dump), which name the engine that
made them. So another engine is one more entry in _ENGINES (and its
settings in MetadataSettings and config.py); nothing above this changes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

from dfsfuse.errors import UserError
from dfsfuse.metadata import postgres, sqlite
from dfsfuse.metadata.base import MetadataStore
from dfsfuse.metadata.dump import Dump, decode_dump

DEFAULT_ENGINE = "sqlite"


@dataclasses.dataclass(frozen=True)
class MetadataSettings:
    """What it takes to reach a file system's metadata (config [metadata], --meta)."""

    path: Path  # sqlite: the database file, DATA_DIR/metadata.db
    engine: str = DEFAULT_ENGINE  # one of ENGINE_NAMES
    url: str | None = None  # postgresql: the libpq URL of the database
    password_file: Path | None = None  # postgresql: a file holding the password (else libpq's own ways)

    @property
    def where(self) -> str:
        """Where the metadata lives, as messages name it (no password)."""
        return str(self.path) if self.url is None else postgres.redacted(self.url)

    def password(self) -> str | None:
        """The password in `password_file`, if one is set; a UserError if it
        cannot be read or others may read it."""
        if self.password_file is None:
            return None
        try:
            if self.password_file.stat().st_mode & 0o077:
                raise UserError(f"password file {self.password_file} must not be readable by others (chmod 600 it)")
            return self.password_file.read_text().rstrip("\r\n")
        except OSError as error:
            raise UserError(f"cannot read password file {self.password_file}: {error.strerror}") from None

    def postgres_url(self) -> str:
        if self.url is None:
            raise UserError("the postgresql metadata engine needs a URL: --meta postgresql://HOST/DB or [metadata] url")
        return self.url


@dataclasses.dataclass(frozen=True)
class _Engine:
    """How the factory reaches one kind of engine."""

    # Open the metadata; with `create`, make new metadata (a root directory)
    # if there is none. OSError or UserError if its storage cannot be reached.
    open: Callable[[MetadataSettings, bool], Awaitable[MetadataStore]]
    # Whether the settings' storage holds metadata already.
    exists: Callable[[MetadataSettings], bool]
    # Whether a mount of a file system that does not exist yet creates it
    # (the embedded engine), or refuses (a shared database: `dfsfuse format`).
    mount_creates: bool
    # Whether mounts on other machines may use it at the same time (MetadataStore.shared).
    shared: bool
    # The engine's load_dump (below), for a dump already decoded.
    load_dump: Callable[[MetadataSettings, Dump], AbstractAsyncContextManager[MetadataStore]]
    # The metadata of a dump this engine made, open in scratch storage that
    # is gone at the end of the block.
    open_dump: Callable[[Dump], AbstractAsyncContextManager[MetadataStore]]


async def _open_sqlite(settings: MetadataSettings, create: bool) -> MetadataStore:
    if not create and not settings.path.exists():
        raise UserError(f"no dfsfuse file system in {settings.path.parent} (mount it once, or dfsfuse format)")
    return await sqlite.SqliteMetadata.open(str(settings.path))


async def _open_postgres(settings: MetadataSettings, create: bool) -> MetadataStore:
    return await postgres.PostgresMetadata.open(settings.postgres_url(), settings.password(), create=create)


_ENGINES = {
    sqlite.ENGINE_NAME: _Engine(
        open=_open_sqlite,
        exists=lambda settings: settings.path.exists(),
        mount_creates=True,
        shared=False,
        load_dump=lambda settings, dump: sqlite.load_dump(settings.path, dump),
        open_dump=sqlite.open_dump,
    ),
    postgres.ENGINE_NAME: _Engine(
        open=_open_postgres,
        exists=lambda settings: postgres.holds_file_system(settings.postgres_url(), settings.password()),
        mount_creates=False,
        shared=True,
        load_dump=lambda settings, dump: postgres.load_dump(settings.postgres_url(), settings.password(), dump),
        open_dump=sqlite.open_dump,
    ),
}
ENGINE_NAMES = tuple(_ENGINES)


def _engine(name: str) -> _Engine:
    try:
        return _ENGINES[name]
    except KeyError:
        raise UserError(f"unknown metadata engine {name!r} (known: {', '.join(ENGINE_NAMES)})") from None


async def open_engine(settings: MetadataSettings, *, create: bool) -> MetadataStore:
    """The engine the settings name, open; with `create`, new metadata (an
    empty file system) is made if there is none.

    A one-line UserError if its storage cannot be reached, or without
    `create` holds no file system.
    """
    try:
        return await _engine(settings.engine).open(settings, create)
    except OSError as error:
        raise UserError(f"cannot open metadata {settings.where}: {error.strerror or error}") from None


def mount_creates(settings: MetadataSettings) -> bool:
    """Whether mounting a file system that does not exist makes it (else: dfsfuse format)."""
    return _engine(settings.engine).mount_creates


def is_shared(settings: MetadataSettings) -> bool:
    """Whether other mounts, on any machine, may use this metadata at the same time."""
    return _engine(settings.engine).shared


def metadata_exists(settings: MetadataSettings) -> bool:
    """Whether the settings' storage already holds a file system's metadata."""
    return _engine(settings.engine).exists(settings)


def load_dump(settings: MetadataSettings, dump: bytes) -> AbstractAsyncContextManager[MetadataStore]:
    """Create the settings' metadata from `dump` (MetadataStore.snapshot), all
    or nothing: `async with load_dump(settings, dump) as meta:` gives the new
    metadata open, for the block to finish (restore moves the shard id counter
    on); it becomes the file system's metadata, durably, only when the block
    ends without an error, and if anything fails nothing is left behind.

    A one-line UserError if metadata exists there already, or if the dump is
    not one this dfsfuse reads (dfsfuse.metadata.dump) or the engine can load.
    """
    return _engine(settings.engine).load_dump(settings, decode_dump(dump))


def open_dump(dump: bytes) -> AbstractAsyncContextManager[MetadataStore]:
    """The metadata in `dump`, open apart from any file system's storage and
    gone at the end of the block: `async with open_dump(dump) as meta:`.
    Restore reads a snapshot's node registry with it before it loads one."""
    decoded = decode_dump(dump)
    return _engine(decoded.engine).open_dump(decoded)
