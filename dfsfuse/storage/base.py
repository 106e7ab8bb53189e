"""The node store interface: where shard replicas live.

A node store keeps opaque replica files (the format is dfsfuse.shards.replica's
business) named by shard id. A local directory and a remote node server
implement the same interface and pass the same contract tests.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence

Buffer = bytes | bytearray | memoryview


@dataclasses.dataclass(frozen=True)
class StoreStat:
    capacity: int  # bytes of the underlying file system
    free: int  # bytes still available to this store
    used: int  # bytes taken by replica files
    shards: int  # number of replica files
    device: str = ""  # identifies the underlying disk, so statfs counts it once


class NodeStore(abc.ABC):
    """One place that holds shard replicas.

    Errors: ShardMissing when no replica of the shard is here, NoSpace when the
    store is full, StoreUnavailable when the store cannot be reached or fails.
    """

    name: str

    @abc.abstractmethod
    async def put(self, shard_id: int, parts: Sequence[Buffer], sync: bool) -> None:
        """Store the concatenation of `parts` as the replica of `shard_id`.

        Atomic: readers see either no replica or the whole new one, never a
        partial file. With `sync`, the data is on stable storage on return.
        """

    @abc.abstractmethod
    async def read(self, shard_id: int, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """Byte ranges (offset, length) of the replica; length -1 means to the end.

        A range past the end of the file comes back short; ShardMissing if
        there is no replica.
        """

    @abc.abstractmethod
    async def delete(self, shard_id: int) -> None:
        """Remove the replica; no error if it is absent."""

    async def delete_many(self, shard_ids: Sequence[int]) -> None:
        """Remove these replicas (absent ones are fine), as the garbage
        collector does in bulk; a store may do it in one go."""
        for shard_id in shard_ids:
            await self.delete(shard_id)

    @abc.abstractmethod
    async def exists(self, shard_id: int) -> bool:
        """Whether a replica of the shard is here."""

    @abc.abstractmethod
    async def list(self, after: int, limit: int) -> list[int]:
        """Shard ids held here that are > after, ascending, at most `limit`."""

    @abc.abstractmethod
    async def sync(self, shard_ids: Sequence[int]) -> None:
        """Make replicas put earlier with sync=False durable (absent ones are skipped)."""

    @abc.abstractmethod
    async def stat(self) -> StoreStat:
        """Capacity and usage."""

    async def close(self) -> None:
        """Release connections or handles; the default has none."""
