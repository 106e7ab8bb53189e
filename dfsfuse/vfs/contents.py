"""The contents of one regular file: what it wrote and what is stored, as one.

One FileContents exists per inode while the file is open (shared by all its
handles) and while a closed file is being truncated. Its FileWriter
(write/file_writer.py) holds and stores what the application wrote; its
FileReader (reader.py) reads what is stored. A read sees both: the pages
still held in memory over the stored bytes, zeros where neither has data.
"""

from __future__ import annotations

from ..layout import shard_span
from ..metadata.base import AttrChanges, InodeAttrs
from ..shards.policy import StoragePolicy
from ..write.file_writer import FileWriter, WriteServices
from .reader import FileReader, ReadServices, read_ahead_for


class FileContents:
    def __init__(self, attrs: InodeAttrs, policy: StoragePolicy, writes: WriteServices, reads: ReadServices):
        self.inode = attrs.inode
        self.open_count = 0
        self._reader = FileReader(attrs.inode, reads)
        self.writer = FileWriter(attrs, policy, self._reader, writes)
        self._shard_size = writes.shard_size

    @property
    def size(self) -> int:
        return self.writer.size

    @property
    def is_clean(self) -> bool:
        return self.writer.is_clean

    async def write(self, offset: int, data: bytes) -> int:
        return await self.writer.write(offset, data)

    async def flush(self, sync: bool) -> None:
        await self.writer.flush(sync)

    async def truncate(self, new_size: int, changes: AttrChanges | None = None) -> InodeAttrs:
        return await self.writer.truncate(new_size, changes)

    async def discard(self) -> None:
        await self.writer.discard()

    async def read(self, offset: int, size: int, sequential: bool) -> bytes:
        length = self.writer.size
        if offset >= length or size <= 0:
            return b""
        size = min(size, length - offset)
        ahead = read_ahead_for(size, sequential)
        parts = [
            await self._read_index(index, inner, take, ahead)
            for index, inner, take in shard_span(offset, size, self._shard_size)
        ]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _read_index(self, index: int, inner: int, take: int, ahead: int) -> bytes:
        """`take` bytes of shard `index` from `inner` on: held pages first,
        then what is stored, zeros where nothing is."""
        buffer = self.writer.held(index)
        if buffer is None:
            chunk = await self._reader.read_stored(index, inner, take, ahead)
            return chunk if len(chunk) == take else chunk + bytes(take - len(chunk))
        out = bytearray(take)
        if not buffer.covers_range(inner, inner + take):
            chunk = await self._reader.read_stored(index, inner, take, ahead)
            out[: len(chunk)] = chunk
        buffer.overlay(out, start=inner)
        return bytes(out)
