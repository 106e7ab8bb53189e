"""Encryption at rest: the key file, the keyring, and sealing with AES-256-GCM.

The only module that imports `cryptography`. An encrypted file system has
one random 256-bit *data key*; the metadata keeps it in the keyring (the
setting KEYRING_SETTING), wrapped (AES-256-GCM) under a key derived from
the passphrase in the key file with Argon2id. A wrong passphrase fails to
unwrap it, so a mount tells a wrong key apart before it reads anything, and
a new passphrase would only rewrap the data key.

Every object payload (objects.py) and every metadata snapshot on the node
stores is sealed under the data key:

    sealed = version (1 byte, SEAL_VERSION) | nonce (12 bytes) | AES-256-GCM ciphertext and 16-byte tag

The nonce is the object's id (8 bytes, big-endian) followed by 4 random
bytes. Shard ids are never reused and snapshot ids (2**63 and up) are apart
from them, so two seals can share a nonce only when one id is sealed twice
(a retried write; snapshot ids from two mounts in one millisecond) and both
draw the same 4 random bytes: for n seals of one id, at most n*n/2**33.
There is no bound on the number of objects a key seals, unlike fully random
96-bit nonces (2**32 seals per key for a 2**-32 collision chance).

The associated data binds a domain string, the format version and the id,
so a payload stored under another shard id (or a snapshot passed off as an
object) does not authenticate. docs/formats.md describes the bytes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path

import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from dfsfuse.errors import UserError
from dfsfuse.metadata.base import MetadataStore
from dfsfuse.secretfile import read_secret_file
from dfsfuse.shards.replica import ReplicaCorrupt
from dfsfuse.storage.base import Buffer

KEYRING_SETTING = "keyring"  # MetadataStore.setting name of the keyring
KEYRING_VERSION = 1
SEAL_VERSION = 1
KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12
TAG_BYTES = 16
SEAL_OVERHEAD = 1 + NONCE_BYTES + TAG_BYTES

# Argon2id as RFC 9106 recommends when memory is scarce: 64 MiB, 3 passes, 4 lanes
# (about 0.15 s on one core of the development machine).
KDF = "argon2id"
KDF_MEMORY_KIB = 64 * 1024
KDF_ITERATIONS = 3
KDF_LANES = 4
SALT_BYTES = 16
MAX_KDF_MEMORY_KIB = 4 * 1024 * 1024  # 4 GiB
AEAD = "aes-256-gcm"

SNAPSHOT_MAGIC = b"DFSSEAL\n"  # a sealed metadata snapshot; plain dumps start DFSMETA\n or with SQLite's header
SNAPSHOT_VERSION = 1
_SNAPSHOT_HEADER = struct.Struct(">8sBI")  # magic, version, keyring length

_OBJECT_DOMAIN = b"dfsfuse object\0"
_SNAPSHOT_DOMAIN = b"dfsfuse snapshot\0"
_KEYRING_DOMAIN = b"dfsfuse keyring\0"
_ID = struct.Struct(">Q")


def read_key_file(path: Path) -> bytes:
    """The passphrase in the key file (its bytes without trailing newlines);
    a one-line UserError unless only its owner may read it."""
    return read_secret_file(str(path), "key file", 0o077, "chmod 600")


@dataclasses.dataclass(frozen=True)
class Keyring:
    """The data key wrapped under the passphrase, and how to unwrap it.

    Stored as compact JSON (to_bytes); the wrapping's associated data is
    the JSON of every other field, so none of them can be changed unnoticed.
    """

    salt: bytes
    wrapped: bytes  # the data key, sealed (SEAL_VERSION format) under the passphrase key
    kdf: str = KDF
    memory_kib: int = KDF_MEMORY_KIB
    iterations: int = KDF_ITERATIONS
    lanes: int = KDF_LANES
    aead: str = AEAD
    version: int = KEYRING_VERSION

    def _parameters(self) -> dict[str, object]:
        return {"v": self.version, "kdf": self.kdf, "m": self.memory_kib, "t": self.iterations,
                "p": self.lanes, "salt": self.salt.hex(), "aead": self.aead}

    def associated_data(self) -> bytes:
        return _KEYRING_DOMAIN + _json(self._parameters())

    def to_bytes(self) -> bytes:
        return _json({**self._parameters(), "key": self.wrapped.hex()})

    @classmethod
    def from_bytes(cls, data: bytes) -> Keyring:
        try:
            fields = json.loads(data)
            version = fields["v"]
            if version != KEYRING_VERSION:
                raise UserError(f"keyring version {version} is newer than this dfsfuse ({KEYRING_VERSION})")
            if fields["kdf"] != KDF or fields["aead"] != AEAD:
                raise UserError(f"keyring uses {fields['kdf']} and {fields['aead']}; this dfsfuse knows {KDF}, {AEAD}")
            keyring = cls(
                salt=bytes.fromhex(fields["salt"]), wrapped=bytes.fromhex(fields["key"]), memory_kib=int(fields["m"]),
                iterations=int(fields["t"]), lanes=int(fields["p"]),
            )
        except (ValueError, KeyError, TypeError):
            raise UserError("the file system's keyring is unreadable") from None
        # Bounds, since restore reads a keyring from a snapshot on an untrusted node:
        # parameters that would take all memory or hours are refused, not tried.
        if not (8 * keyring.lanes <= keyring.memory_kib <= MAX_KDF_MEMORY_KIB and 1 <= keyring.iterations <= 64
                and 1 <= keyring.lanes <= 64):
            raise UserError("the file system's keyring has Argon2id parameters out of bounds")
        return keyring

    def derive(self, passphrase: bytes) -> bytes:
        """The passphrase key (Argon2id, about 0.15 s and 64 MiB)."""
        kdf = Argon2id(salt=self.salt, length=KEY_BYTES, iterations=self.iterations, lanes=self.lanes,
                       memory_cost=self.memory_kib)
        return kdf.derive(passphrase)


def _json(fields: dict[str, object]) -> bytes:
    return json.dumps(fields, separators=(",", ":"), sort_keys=True).encode()


def _seal(aead: AESGCM, prefix: bytes, domain: bytes, data: Buffer) -> bytes:
    """`data` sealed with nonce prefix + 4 random bytes, `domain` + version + prefix bound."""
    nonce = prefix + os.urandom(NONCE_BYTES - len(prefix))
    header = bytes([SEAL_VERSION]) + nonce
    return header + aead.encrypt(nonce, data, domain + header[:1] + prefix)


def _open(aead: AESGCM, prefix: bytes, domain: bytes, sealed: Buffer) -> bytes:
    """The plain bytes; InvalidTag if they do not authenticate (or `sealed` is not SEAL_VERSION)."""
    view = memoryview(sealed)
    if len(view) < SEAL_OVERHEAD or view[0] != SEAL_VERSION:
        raise InvalidTag()
    return aead.decrypt(bytes(view[1 : 1 + NONCE_BYTES]), view[1 + NONCE_BYTES :], domain + bytes(view[:1]) + prefix)


class FileSystemKey:
    """The data key of an encrypted file system: seals and opens objects
    (the Sealer of objects.py) and metadata snapshots."""

    def __init__(self, data_key: bytes, keyring: Keyring):
        self._aead = AESGCM(data_key)
        self.keyring = keyring

    def seal(self, shard_id: int, data: Buffer) -> bytes:
        return _seal(self._aead, _ID.pack(shard_id), _OBJECT_DOMAIN, data)

    def open(self, shard_id: int, sealed: Buffer) -> bytes:
        try:
            return _open(self._aead, _ID.pack(shard_id), _OBJECT_DOMAIN, sealed)
        except InvalidTag:
            raise ReplicaCorrupt(f"shard {shard_id}: sealed payload does not authenticate") from None

    def seal_snapshot(self, snapshot_id: int, dump: bytes) -> bytes:
        """A metadata dump in a sealed snapshot envelope, which carries the
        keyring so that `dfsfuse restore` can open it with the key file alone."""
        keyring = self.keyring.to_bytes()
        header = _SNAPSHOT_HEADER.pack(SNAPSHOT_MAGIC, SNAPSHOT_VERSION, len(keyring))
        return header + keyring + _seal(self._aead, _ID.pack(snapshot_id), _SNAPSHOT_DOMAIN, dump)

    def open_snapshot(self, snapshot_id: int, envelope: bytes) -> bytes:
        """The dump in a sealed snapshot; ReplicaCorrupt if it does not authenticate."""
        _, sealed = _split_snapshot(envelope)
        try:
            return _open(self._aead, _ID.pack(snapshot_id), _SNAPSHOT_DOMAIN, sealed)
        except InvalidTag:
            raise ReplicaCorrupt(f"metadata snapshot {snapshot_id} does not authenticate under this key") from None


def new_key(passphrase: bytes) -> FileSystemKey:
    """A new random data key, wrapped under `passphrase` in a new keyring."""
    data_key = AESGCM.generate_key(bit_length=8 * KEY_BYTES)
    unwrapped = Keyring(salt=os.urandom(SALT_BYTES), wrapped=b"")
    wrapping = AESGCM(unwrapped.derive(passphrase))
    keyring = dataclasses.replace(
        unwrapped, wrapped=_seal(wrapping, b"", unwrapped.associated_data(), data_key)
    )
    return FileSystemKey(data_key, keyring)


def unlock(keyring: Keyring, passphrase: bytes, key_file: Path) -> FileSystemKey:
    """The file system key in `keyring`; a one-line UserError if the passphrase is wrong."""
    wrapping = AESGCM(keyring.derive(passphrase))
    try:
        data_key = _open(wrapping, b"", keyring.associated_data(), keyring.wrapped)
    except InvalidTag:
        raise UserError(f"wrong key: the passphrase in {key_file} does not unlock this file system") from None
    return FileSystemKey(data_key, keyring)


def is_sealed_snapshot(data: bytes) -> bool:
    return data.startswith(SNAPSHOT_MAGIC)


def _split_snapshot(envelope: bytes) -> tuple[Keyring, bytes]:
    """(keyring, sealed dump) of a sealed snapshot envelope."""
    if len(envelope) < _SNAPSHOT_HEADER.size or not is_sealed_snapshot(envelope):
        raise UserError("not a sealed metadata snapshot")
    _, version, keyring_length = _SNAPSHOT_HEADER.unpack_from(envelope)
    if version != SNAPSHOT_VERSION:
        raise UserError(f"sealed snapshot format {version} is newer than this dfsfuse ({SNAPSHOT_VERSION})")
    start = _SNAPSHOT_HEADER.size
    return Keyring.from_bytes(envelope[start : start + keyring_length]), envelope[start + keyring_length :]


def snapshot_key(envelope: bytes, key_file: Path) -> FileSystemKey:
    """The key that opens a sealed snapshot, from the keyring it carries and the key file."""
    keyring, _ = _split_snapshot(envelope)
    return unlock(keyring, read_key_file(key_file), key_file)


async def create_keyring(meta: MetadataStore, passphrase: bytes) -> None:
    """Make a new file system's keyring (`dfsfuse format --encrypt`)."""
    key = await trio.to_thread.run_sync(new_key, passphrase)
    await meta.set_setting(KEYRING_SETTING, key.keyring.to_bytes())


async def mount_key(meta: MetadataStore, key_file: Path | None, where: str) -> FileSystemKey | None:
    """The key a mount seals with: None for a file system that is not
    encrypted. A one-line UserError if an encrypted file system is given no
    key file or a wrong one, or a plain one is given a key file."""
    stored = await meta.setting(KEYRING_SETTING)
    if stored is None:
        if key_file is not None:
            raise UserError(
                f"the file system in {where} is not encrypted (encryption is chosen at format);"
                " mount it without a key file"
            )
        return None
    if key_file is None:
        raise UserError(
            f"the file system in {where} is encrypted: give its key file (--key-file FILE or [encryption] key_file)"
        )
    passphrase = read_key_file(key_file)
    return await trio.to_thread.run_sync(unlock, Keyring.from_bytes(stored), passphrase, key_file)
