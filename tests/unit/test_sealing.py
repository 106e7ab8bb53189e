"""Sealing (dfsfuse/shards/sealing.py): round trips, tampering, payloads
moved to another id, wrong passphrases, key file checks, nonce uniqueness,
and the object codec over a sealer."""

from __future__ import annotations

import os

import pytest
import trio

from dfsfuse.errors import UserError
from dfsfuse.metadata.base import ShardRef
from dfsfuse.metadata.sqlite import SqliteMetadata
from dfsfuse.shards import sealing
from dfsfuse.shards.objects import ObjectCodec
from dfsfuse.shards.replica import ReplicaCorrupt

SHARD = 41
PASSPHRASE = b"correct horse battery staple"


@pytest.fixture(scope="module")
def key() -> sealing.FileSystemKey:
    return sealing.new_key(PASSPHRASE)


def key_file(tmp_path, content: bytes = PASSPHRASE + b"\n", mode: int = 0o600):
    path = tmp_path / "key"
    path.write_bytes(content)
    path.chmod(mode)
    return path


def test_a_sealed_payload_opens_only_unchanged_and_under_its_own_id(key):
    plain = os.urandom(100_000)
    sealed = key.seal(SHARD, memoryview(plain))
    assert len(sealed) == len(plain) + sealing.SEAL_OVERHEAD and plain[:64] not in sealed
    assert key.open(SHARD, sealed) == plain
    assert key.open(SHARD, key.seal(SHARD, b"")) == b""
    for position in (0, 1, 13, len(sealed) // 2, len(sealed) - 1):
        tampered = bytearray(sealed)
        tampered[position] ^= 0x01
        with pytest.raises(ReplicaCorrupt):
            key.open(SHARD, tampered)
    with pytest.raises(ReplicaCorrupt):
        key.open(SHARD + 1, sealed)  # moved under another shard id
    with pytest.raises(ReplicaCorrupt):
        key.open(SHARD, sealed[: sealing.SEAL_OVERHEAD - 1])
    with pytest.raises(ReplicaCorrupt):
        sealing.new_key(PASSPHRASE).open(SHARD, sealed)  # another file system's key


def test_nonces_never_repeat(key):
    nonces = set()
    for shard_id in range(200):
        for _ in range(50):  # the same id sealed again (a retried write) draws new random bytes
            sealed = key.seal(shard_id, b"x")
            nonce = sealed[1 : 1 + sealing.NONCE_BYTES]
            assert nonce[:8] == shard_id.to_bytes(8, "big")
            nonces.add(nonce)
    assert len(nonces) == 200 * 50


def test_the_keyring_unwraps_only_with_its_passphrase(key, tmp_path):
    stored = key.keyring.to_bytes()
    reopened = sealing.unlock(sealing.Keyring.from_bytes(stored), PASSPHRASE, tmp_path / "key")
    assert reopened.open(SHARD, key.seal(SHARD, b"same data key")) == b"same data key"
    with pytest.raises(UserError, match="wrong key"):
        sealing.unlock(sealing.Keyring.from_bytes(stored), b"not it", tmp_path / "key")
    # A changed parameter is bound as associated data: the unwrap fails, not a weaker derivation.
    weaker = stored.replace(b'"t":3', b'"t":1')
    with pytest.raises(UserError, match="wrong key"):
        sealing.unlock(sealing.Keyring.from_bytes(weaker), PASSPHRASE, tmp_path / "key")
    with pytest.raises(UserError, match="newer"):
        sealing.Keyring.from_bytes(stored.replace(b'"v":1', b'"v":2'))
    with pytest.raises(UserError, match="unreadable"):
        sealing.Keyring.from_bytes(b"{}")
    with pytest.raises(UserError, match="out of bounds"):
        sealing.Keyring.from_bytes(stored.replace(b'"m":65536', b'"m":1099511627776'))


def test_key_files_are_checked(tmp_path):
    assert sealing.read_key_file(key_file(tmp_path)) == PASSPHRASE
    for mode in (0o640, 0o604):
        with pytest.raises(UserError, match=r"accessible to other users \(chmod 600 .*key\)$"):
            sealing.read_key_file(key_file(tmp_path, mode=mode))
    with pytest.raises(UserError, match="is empty"):
        sealing.read_key_file(key_file(tmp_path, b"\n"))
    with pytest.raises(UserError, match="No such file"):
        sealing.read_key_file(tmp_path / "missing")
    with pytest.raises(UserError, match="not a regular file"):
        sealing.read_key_file(tmp_path)


def test_sealed_snapshots_carry_their_keyring(key, tmp_path):
    envelope = key.seal_snapshot(2**63 + 5, b"DFSMETA\n dump")
    assert sealing.is_sealed_snapshot(envelope) and b"dump" not in envelope
    opened = sealing.snapshot_key(envelope, key_file(tmp_path))
    assert opened.open_snapshot(2**63 + 5, envelope) == b"DFSMETA\n dump"
    with pytest.raises(ReplicaCorrupt):
        opened.open_snapshot(2**63 + 6, envelope)
    with pytest.raises(UserError, match="wrong key"):
        sealing.snapshot_key(envelope, key_file(tmp_path, b"another passphrase"))


def test_the_codec_compresses_then_seals(key):
    codec = ObjectCodec(key)
    plain = b"compressible " * 10_000
    checksum, encoding, payload = codec.encode(SHARD, plain, "zstd")
    assert encoding is not None and encoding.sealed and encoding.compression == "zstd"
    assert len(payload) < len(plain) // 10 and b"compressible" not in payload
    ref = ShardRef(SHARD, len(plain), checksum, ("n1",), encoding=encoding)
    assert codec.decode(ref, payload) == plain
    with pytest.raises(ReplicaCorrupt, match="no key"):
        ObjectCodec().decode(ref, payload)


def test_mount_key_tells_each_mistake_apart(tmp_path):
    async def main() -> None:
        plain = await SqliteMetadata.open(str(tmp_path / "plain.db"))
        encrypted = await SqliteMetadata.open(str(tmp_path / "encrypted.db"))
        good = key_file(tmp_path)
        try:
            assert await sealing.mount_key(plain, None, "plain") is None
            with pytest.raises(UserError, match="is not encrypted"):
                await sealing.mount_key(plain, good, "plain")
            await sealing.create_keyring(encrypted, PASSPHRASE)
            with pytest.raises(UserError, match="is encrypted: give its key file"):
                await sealing.mount_key(encrypted, None, "encrypted")
            key = await sealing.mount_key(encrypted, good, "encrypted")
            assert key is not None and key.open(1, key.seal(1, b"a")) == b"a"
            wrong = tmp_path / "wrong"
            wrong.write_bytes(b"wrong")
            wrong.chmod(0o600)
            with pytest.raises(UserError, match="wrong key"):
                await sealing.mount_key(encrypted, wrong, "encrypted")
        finally:
            await plain.close()
            await encrypted.close()

    trio.run(main)
