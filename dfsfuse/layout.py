"""Pure arithmetic between file offsets, shards, pages and checksum blocks.

Every layer uses it (the POSIX layer to split a range by shard, the write
buffers and patches in pages, the replica format in checksum blocks), so it
sits under all of them and imports nothing.
"""

from __future__ import annotations

from collections.abc import Iterator

PAGE_SIZE = 4096  # the unit of dirty data and of a patch (metadata/base.py ShardRef)


def shard_span(offset: int, length: int, shard_size: int) -> Iterator[tuple[int, int, int]]:
    """Split the byte range [offset, offset+length) by shard.

    Yields (shard index, offset inside that shard, length inside that shard)
    in file order; nothing for an empty range.
    """
    end = offset + length
    while offset < end:
        index, inner = divmod(offset, shard_size)
        take = min(shard_size - inner, end - offset)
        yield index, inner, take
        offset += take


def shard_count(size: int, shard_size: int) -> int:
    """How many shard indexes a file of `size` bytes spans."""
    return -(-size // shard_size)


def shard_length(index: int, size: int, shard_size: int) -> int:
    """Bytes of file data that shard `index` covers in a file of `size` bytes."""
    return max(0, min(shard_size, size - index * shard_size))


def block_span(offset: int, length: int, block_size: int) -> range:
    """Indexes of the checksum blocks that the range [offset, offset+length) touches."""
    if length <= 0:
        return range(0)
    return range(offset // block_size, (offset + length - 1) // block_size + 1)
