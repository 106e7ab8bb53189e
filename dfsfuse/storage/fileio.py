"""Whole writes and reads of file descriptors: the loops around writev,
pwritev and pread that a short transfer needs, shared by replica files
(dfsfuse.storage.local) and pack files (dfsfuse.storage.packs)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from dfsfuse.storage.base import Buffer

_IOV_MAX = os.sysconf("SC_IOV_MAX")  # buffers one writev call accepts


def write_all(fd: int, parts: Sequence[Buffer], offset: int | None = None) -> int:
    """Write every byte of `parts` in order with as few calls as the kernel
    allows, at the file position (writev) or at `offset` (pwritev); returns
    the number of bytes written."""
    pending = [view for view in (memoryview(part).cast("B") for part in parts) if len(view)]
    total = sum(len(view) for view in pending)
    while pending:
        if offset is None:
            written = os.writev(fd, pending[:_IOV_MAX])
        else:
            written = os.pwritev(fd, pending[:_IOV_MAX], offset)
            offset += written
        while written:
            if written >= len(pending[0]):
                written -= len(pending.pop(0))
            else:
                pending[0] = pending[0][written:]
                written = 0
    return total


def pread_all(fd: int, length: int, offset: int) -> bytes:
    """pread until `length` bytes or the end of the file (one call in the usual case)."""
    data = os.pread(fd, length, offset)
    if len(data) == length or not data:
        return data
    chunks = [data]
    got = len(data)
    while got < length:
        chunk = os.pread(fd, length - got, offset + got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)
