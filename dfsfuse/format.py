"""`dfsfuse format`: make a new, empty file system where the config says its
metadata lives (SQLite in the data dir, or a PostgreSQL database with --meta).

Formatting records the shard and block sizes (they never change), seeds the
node registry with the config's [[nodes]], and with --replicas gives the root
directory that replica count (user.dfs.replicas, which every new file and
directory inherits), so every mount of the file system uses it. Existing
metadata is never touched: formatting refuses it.
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


def format_file_system(config: Config, replicas: int | None) -> int:
    where = config.metadata.where
    prepare_data_dir(config)
    lock = DataDirLock(config.lock_path)
    lock.acquire("unmount it first")
    try:
        if metadata_exists(config.metadata):
            raise UserError(f"{where} already holds a dfsfuse file system; nothing changed")

        async def main() -> None:
            async with open_components(config, cached=False, create=True) as parts:
                if replicas is not None:
                    await parts.meta.setxattr(ROOT_INODE, REPLICAS_XATTR, str(replicas).encode(), 0, time.time_ns())
                await parts.meta.sync()

        trio.run(main)
    finally:
        lock.release()
    print(
        f"dfsfuse: made a file system in {where}: {len(config.nodes)} node stores registered, "
        f"{config.replicas} replicas, shard size {config.shard_size}, block size {config.block_size}"
    )
    return 0
