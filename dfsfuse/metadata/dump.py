"""The metadata dump: the whole metadata of a file system as of one instant,
in an envelope that names the engine that made it and its format.

MetadataStore.snapshot() returns a dump, dfsfuse.cluster.snapshots keeps
dumps on the node stores, and dfsfuse.metadata.engines loads one into an
engine (dfsfuse restore). The envelope is what lets a loader know what it
holds before it reads the payload, which only the engine named understands
(SQLite: a database image). docs/formats.md describes the bytes.

Format 0 has no envelope: snapshots written before there was one are bare
SQLite database images, recognized by SQLite's own header, and still load.
"""

from __future__ import annotations

import dataclasses
import struct

from dfsfuse.errors import UserError

MAGIC = b"DFSMETA\n"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sIB")  # magic, format version, length of the engine name
_PAYLOAD_LENGTH = struct.Struct("<Q")
SQLITE_IMAGE_MAGIC = b"SQLite format 3\0"  # the start of every SQLite database file: format 0


@dataclasses.dataclass(frozen=True)
class Dump:
    engine: str  # the engine that made it, as config [metadata] engine names it
    payload: bytes  # the engine's own image of the metadata
    format_version: int = FORMAT_VERSION


def encode_dump(engine: str, payload: bytes) -> bytes:
    """`payload`, the metadata as engine `engine` images it, in an envelope."""
    name = engine.encode("ascii")
    return _HEADER.pack(MAGIC, FORMAT_VERSION, len(name)) + name + _PAYLOAD_LENGTH.pack(len(payload)) + payload


def decode_dump(data: bytes) -> Dump:
    """What an envelope holds; a one-line UserError if `data` is no dump this
    dfsfuse can read (not one at all, cut short, or of a newer format)."""
    if data.startswith(SQLITE_IMAGE_MAGIC):
        return Dump("sqlite", data, format_version=0)
    if len(data) < _HEADER.size or not data.startswith(MAGIC):
        raise UserError("not a dfsfuse metadata dump (no DFSMETA header, and no SQLite database)")
    _, version, name_length = _HEADER.unpack_from(data)
    if version != FORMAT_VERSION:
        raise UserError(
            f"metadata dump format {version} is not one this dfsfuse reads (0 and {FORMAT_VERSION});"
            " use the dfsfuse that wrote it"
        )
    start = _HEADER.size + name_length + _PAYLOAD_LENGTH.size
    if len(data) < start:
        raise UserError(f"metadata dump cut short: {len(data)} bytes, its header alone needs {start}")
    (payload_length,) = _PAYLOAD_LENGTH.unpack_from(data, start - _PAYLOAD_LENGTH.size)
    if len(data) != start + payload_length:
        raise UserError(f"corrupt metadata dump: {len(data) - start} payload bytes where the header says {payload_length}")
    try:
        engine = data[_HEADER.size : _HEADER.size + name_length].decode("ascii")
    except UnicodeDecodeError:
        raise UserError("corrupt metadata dump: its engine name is not ASCII") from None
    return Dump(engine, data[start:], version)
