"""The metadata engines dfsfuse has, and the one way to open one.

Everything that opens a file system's metadata (runtime.open_components for
the mount and the commands, dfsfuse.restore) goes through this module with
the MetadataSettings the config gives, never through an engine's own class.
So another engine is one more entry in _ENGINES (and its settings in
MetadataSettings and config.py); nothing above this module changes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from pathlib import Path

from dfsfuse.errors import UserError
from dfsfuse.metadata import sqlite
from dfsfuse.metadata.base import MetadataStore

DEFAULT_ENGINE = "sqlite"


@dataclasses.dataclass(frozen=True)
class MetadataSettings:
    """What it takes to reach a file system's metadata (config [metadata])."""

    path: Path  # sqlite: the database file, DATA_DIR/metadata.db
    engine: str = DEFAULT_ENGINE  # one of ENGINE_NAMES

    @property
    def where(self) -> str:
        """Where the metadata lives, as messages name it."""
        return str(self.path)


@dataclasses.dataclass(frozen=True)
class _Engine:
    """How the factory reaches one kind of engine."""

    # Open the metadata, creating it (a root directory) if there is none;
    # OSError if its storage cannot be reached.
    open: Callable[[MetadataSettings], Awaitable[MetadataStore]]


_ENGINES = {
    "sqlite": _Engine(open=lambda settings: sqlite.SqliteMetadata.open(str(settings.path))),
}
ENGINE_NAMES = tuple(_ENGINES)


def _engine(name: str) -> _Engine:
    try:
        return _ENGINES[name]
    except KeyError:
        raise UserError(f"unknown metadata engine {name!r} (known: {', '.join(ENGINE_NAMES)})") from None


async def open_engine(settings: MetadataSettings) -> MetadataStore:
    """The engine the settings name, open; created empty if it was not there.

    A one-line UserError if its storage cannot be reached.
    """
    try:
        return await _engine(settings.engine).open(settings)
    except OSError as error:
        raise UserError(f"cannot open metadata {settings.where}: {error.strerror or error}") from None
