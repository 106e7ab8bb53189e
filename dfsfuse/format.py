"""`dfsfuse format`: make a new, empty file system where the config says its
metadata lives (SQLite in the data dir, or a PostgreSQL database with --meta).

Formatting records the shard and block sizes (they never change), seeds the
node registry with the config's [[nodes]], and with --replicas gives the root
directory that replica count (user.dfs.replicas, which every new file and
directory inherits), so every mount of the file system uses it. With
--encrypt it makes the keyring (dfsfuse/shards/sealing.py) from the key
file's passphrase: encryption is chosen here, for the file system's whole
life. Existing metadata is never touched: formatting refuses it.
"""

from __future__ import annotations

import time

import trio

from .config import Config
from .datadir import DataDirLock, prepare_data_dir
from .errors import UserError
from .metadata.base import REPLICAS_XATTR, ROOT_INODE
from .metadata.engines import metadata_exists
from .runtime import open_components
from .shards.sealing import AEAD, KDF, create_keyring, read_key_file


def format_file_system(config: Config, replicas: int | None, encrypt: bool) -> int:
    where = config.metadata.where
    passphrase = _passphrase(config, encrypt)
    prepare_data_dir(config)
    lock = DataDirLock(config.lock_path)
    lock.acquire("unmount it first")
    try:
        if metadata_exists(config.metadata):
            raise UserError(f"{where} already holds a dfsfuse file system; nothing changed")

        async def main() -> None:
            async with open_components(config, cached=False, create=True) as parts:
                if passphrase is not None:
                    await create_keyring(parts.meta, passphrase)
                if replicas is not None:
                    await parts.meta.setxattr(ROOT_INODE, REPLICAS_XATTR, str(replicas).encode(), 0, time.time_ns())
                await parts.meta.sync()

        trio.run(main)
    finally:
        lock.release()
    print(
        f"dfsfuse: made a file system in {where}: {len(config.nodes)} node stores registered, "
        f"{config.replicas} replicas, shard size {config.shard_size}, block size {config.block_size}"
        + (f", encrypted ({AEAD}, key from {config.key_file} by {KDF})" if encrypt else "")
    )
    return 0


def _passphrase(config: Config, encrypt: bool) -> bytes | None:
    """The key file's passphrase with --encrypt; a key file without it is
    refused rather than ignored, lest a plain file system be made by mistake."""
    if not encrypt:
        if config.key_file is not None:
            raise UserError(
                f"a key file ({config.key_file}) but no --encrypt: add --encrypt to make an encrypted file system"
            )
        return None
    if config.key_file is None:
        raise UserError("format --encrypt needs the passphrase: --key-file FILE (or [encryption] key_file)")
    return read_key_file(config.key_file)
