"""How an object's bytes are kept on the node stores: its Encoding.

An object whose ShardRef has no encoding (None) is stored as every object
was before schema 7: R replicas, each a replica container (replica.py) of
the object's plain bytes, verified against ShardRef.checksum.

Otherwise the plain bytes went through these steps, in this order, and the
result is the object's *payload*:

1. compression (zstd or lz4), kept only if it saved something (an
   incompressible object is stored uncompressed: `compression` empty);
2. sealing with the file system's key (AEAD, when the file system is
   encrypted), the shard id bound as associated data.

The payload is then stored either as replicas (each node in ShardRef.nodes
holds a replica container of the whole payload, verified against
`payload_checksum` before anything decodes it), or erasure coded: split into
`data_fragments` (k) pieces plus `parity_fragments` (m) parity pieces, and
fragment i stored as a replica container on ShardRef.nodes[i], verified
against `fragment_checksums[i]` ('' in nodes: fragment i is on no node yet,
repair makes it). Any k verified fragments give the payload back.

Reading reverses the steps and checks ShardRef.checksum (xxh3-128 of the
plain bytes) at the end, so both the stored and the plain bytes are covered.

The text form (`to_text`, the shards table's `encoding` column) is compact
JSON with a format version, so that later formats can be told apart:

    {"v": 1, "n": <payload length>, "c": "<payload xxh3-128, hex>",
     "z": "zstd" | "lz4" (absent: not compressed), "s": 1 (absent: not sealed),
     "ec": [k, m] and "f": ["<fragment xxh3-128, hex>", ...] (absent: replicated)}
"""

from __future__ import annotations

import dataclasses
import json

from dfsfuse.shards.checksum import DIGEST_SIZE

ENCODING_VERSION = 1
COMPRESSIONS = ("zstd", "lz4")


class EncodingError(ValueError):
    """An encoding text this version cannot read."""


@dataclasses.dataclass(frozen=True)
class Encoding:
    payload_length: int
    payload_checksum: bytes
    compression: str = ""  # "", or one of COMPRESSIONS
    sealed: bool = False
    data_fragments: int = 0  # k; 0: replicated
    parity_fragments: int = 0  # m
    fragment_checksums: tuple[bytes, ...] = ()

    @property
    def erasure_coded(self) -> bool:
        return self.data_fragments > 0

    @property
    def fragments(self) -> int:
        """k + m: how many fragments (and so node slots) an erasure-coded object has."""
        return self.data_fragments + self.parity_fragments

    @property
    def copy_length(self) -> int:
        """The bytes one replica (or one fragment) holds."""
        if not self.erasure_coded:
            return self.payload_length
        return -(-self.payload_length // self.data_fragments)

    def to_text(self) -> str:
        fields: dict[str, object] = {
            "v": ENCODING_VERSION,
            "n": self.payload_length,
            "c": self.payload_checksum.hex(),
        }
        if self.compression:
            fields["z"] = self.compression
        if self.sealed:
            fields["s"] = 1
        if self.erasure_coded:
            fields["ec"] = [self.data_fragments, self.parity_fragments]
            fields["f"] = [digest.hex() for digest in self.fragment_checksums]
        return json.dumps(fields, separators=(",", ":"))

    @classmethod
    def from_text(cls, text: str) -> Encoding:
        try:
            fields = json.loads(text)
            version = fields["v"]
            if version != ENCODING_VERSION:
                raise EncodingError(f"object encoding version {version} is newer than this dfsfuse ({ENCODING_VERSION})")
            k, m = fields.get("ec", (0, 0))
            encoding = cls(
                payload_length=int(fields["n"]),
                payload_checksum=bytes.fromhex(fields["c"]),
                compression=str(fields.get("z", "")),
                sealed=bool(fields.get("s", 0)),
                data_fragments=int(k),
                parity_fragments=int(m),
                fragment_checksums=tuple(bytes.fromhex(digest) for digest in fields.get("f", ())),
            )
        except EncodingError:
            raise
        except (ValueError, KeyError, TypeError) as error:
            raise EncodingError(f"unreadable object encoding {text!r}: {error}") from None
        encoding.check()
        return encoding

    def check(self) -> None:
        """Raise EncodingError unless the fields are consistent."""
        if self.compression and self.compression not in COMPRESSIONS:
            raise EncodingError(f"unknown compression {self.compression!r}")
        if self.payload_length < 0 or len(self.payload_checksum) != DIGEST_SIZE:
            raise EncodingError("bad payload length or checksum")
        if self.erasure_coded:
            if self.parity_fragments < 0 or len(self.fragment_checksums) != self.fragments:
                raise EncodingError(
                    f"{self.fragments} fragments but {len(self.fragment_checksums)} fragment checksums"
                )
        elif self.parity_fragments or self.fragment_checksums:
            raise EncodingError("fragment fields on a replicated object")


def encoding_text(encoding: Encoding | None) -> str | None:
    """The `encoding` column's value: NULL for a plain replicated object."""
    return None if encoding is None else encoding.to_text()


def encoding_of_text(text: str | None) -> Encoding | None:
    return None if text is None else Encoding.from_text(text)


def copy_length(length: int, encoding: Encoding | None) -> int:
    """The data bytes one replica or fragment of an object holds."""
    return length if encoding is None else encoding.copy_length
