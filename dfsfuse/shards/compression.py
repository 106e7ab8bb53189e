"""Compressing objects: the only module that imports zstandard and lz4.

Both run in worker threads on large objects (they release the GIL). zstd at
level 3 compresses text several times faster than our replicas are written
and decompresses faster still; lz4 is the lighter choice for CPU-poor
clients (docs/performance.md has the figures of bench/encodingbench.py).
"""

from __future__ import annotations

import lz4.frame
import zstandard

from dfsfuse.storage.base import Buffer

ZSTD_LEVEL = 3
# Compression is kept only if it saves at least 1/MIN_SAVING of the bytes:
# otherwise every read would pay for decompressing to save almost nothing.
MIN_SAVING = 32


class CompressionError(Exception):
    """Stored bytes that do not decompress to the expected length."""


def compress(name: str, data: Buffer) -> bytes | None:
    """`data` compressed with `name` ("zstd" or "lz4"), or None if that
    would not save enough to be worth decompressing on every read."""
    if name == "zstd":
        packed = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(data)
    elif name == "lz4":
        packed = lz4.frame.compress(data, store_size=True)
    else:
        raise ValueError(f"unknown compression {name!r}")
    return packed if len(packed) <= len(data) - len(data) // MIN_SAVING - 1 else None


def decompress(name: str, packed: Buffer, length: int) -> bytes:
    """The `length` bytes `packed` holds; CompressionError if it does not."""
    try:
        if name == "zstd":
            data = zstandard.ZstdDecompressor().decompress(packed, max_output_size=length)
        elif name == "lz4":
            data = lz4.frame.decompress(packed)
        else:
            raise CompressionError(f"unknown compression {name!r}")
    except (zstandard.ZstdError, RuntimeError) as error:
        raise CompressionError(f"{name} data does not decompress: {error}") from None
    if len(data) != length:
        raise CompressionError(f"{name} data decompressed to {len(data)} bytes, expected {length}")
    return data
