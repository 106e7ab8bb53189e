"""Encryption at rest on real mounts: an encrypted file system made by
`dfsfuse format --encrypt`, on three node servers (SQLite metadata) and on
PostgreSQL metadata (local node stores), reads everything back while no
file on any node store holds a byte of plain data or a file name; the
commands that move ciphertext (fsck, scrub, status) run without the key and
repair a corrupt replica; a missing, wrong or unwanted key is one line and
nothing is mounted; and `dfsfuse restore` opens a sealed metadata snapshot
only with the key.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import module_file_system
from dfstest import (
    MOUNT_PY,
    PYTHON,
    REPO,
    KiB,
    dfsfuse_cli,
    is_mounted,
    one_line_error,
    run,
    tree_digest,
    write_file,
)
from test_restore import LAYOUT, local_nodes_config

MARKER = b"plaintext-marker-3b9f"  # in file data and in a file name: found on no node store
PASSPHRASE = b"an integration test passphrase\n"


def key_file(path: Path, passphrase: bytes = PASSPHRASE, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(passphrase)
    path.chmod(mode)
    return path


def encryption_table(key: Path) -> str:
    return f'\n[encryption]\nkey_file = "{key}"\n'


@pytest.fixture(scope="module", params=["remote", "postgresql"])
def encrypted(request, test_root):
    """An encrypted file system, formatted and mounted, its key in the config's [encryption]."""
    base = test_root / f"encryption-{request.param}"
    key = key_file(base / "fs.key")
    with module_file_system(request, base, request.param, LAYOUT + encryption_table(key), None, ("--encrypt",)) as mount:
        mount.key_file = key
        yield mount


def node_files(mount) -> list[Path]:
    return [path for node in mount.node_dirs() for path in node.rglob("*") if path.is_file()]


def write_mixed_tree(root: Path) -> None:
    """Plain, zstd-compressed and erasure-coded files, one and several shards, a name with the marker."""
    (root / "compressed").mkdir()
    os.setxattr(root / "compressed", "user.dfs.compression", b"zstd")
    line = MARKER + b" repeats so that it compresses well\n"
    write_file(root / "compressed" / "text", line * 20_000)  # several shards before compression
    write_file(root / "plain", MARKER + os.urandom(300 * KiB) + MARKER)
    write_file(root / MARKER.decode(), b"a small file named after the marker\n")
    os.symlink(MARKER.decode(), root / "link")
    (root / "coded").mkdir()
    os.setxattr(root / "coded", "user.dfs.ec", b"2+1")  # fragments of the sealed payload
    write_file(root / "coded" / "random", MARKER + os.urandom(1024 * KiB) + MARKER)


def test_node_stores_never_hold_plain_data_or_names(encrypted, local_tmp):
    root = encrypted.mountpoint / "tree"
    root.mkdir()
    write_mixed_tree(root)
    before = tree_digest(root)
    encrypted.remount()  # the snapshot at unmount goes to the nodes; reads below come from them
    assert tree_digest(root) == before
    stored = node_files(encrypted)
    assert len(stored) > 6, stored
    holding = [path for path in stored if MARKER in path.read_bytes()]
    assert not holding, f"plain data on the node stores: {holding}"


def test_commands_without_the_key_verify_and_repair(encrypted, local_tmp):
    root = encrypted.mountpoint / "repair"
    root.mkdir()
    write_file(root / "data", os.urandom(600 * KiB))
    before = tree_digest(root)
    encrypted.stop()
    key = encrypted.key_file
    hidden = key.rename(key.with_name("away"))  # nothing below may read it
    try:
        replica = next(iter(encrypted.replica_files().values()))[0]
        data = bytearray(replica.read_bytes())
        data[-1] ^= 0xFF
        replica.write_bytes(data)
        checked = dfsfuse_cli("fsck", "--data-dir", encrypted.data_dir, "--config", encrypted.config_path).stdout
        assert ", 1 corrupt, " in checked and "; repaired 1," in checked, checked
        assert "node1" in encrypted.status() or "server1" in encrypted.status()
        dfsfuse_cli("scrub", "--data-dir", encrypted.data_dir, "--config", encrypted.config_path)
    finally:
        hidden.rename(key)
    encrypted.start()
    assert tree_digest(root) == before


def mount_refused(mount, *args: object) -> str:
    """The one line a mount with ARGS prints; it mounted nothing."""
    result = run([PYTHON, MOUNT_PY, mount.mountpoint, "--data-dir", mount.data_dir, *args], check=False, cwd=REPO)
    assert not is_mounted(mount.mountpoint)
    return one_line_error(result)


def test_a_missing_or_wrong_key_mounts_nothing(encrypted, local_tmp):
    encrypted.stop()
    config = encrypted.config_path.read_text()
    key = encrypted.key_file
    without_key = local_tmp / "without-key.toml"
    without_key.write_text(config.replace(encryption_table(key), ""))
    line = mount_refused(encrypted, "--config", without_key)
    assert "is encrypted: give its key file (--key-file FILE" in line
    wrong = key_file(local_tmp / "wrong.key", b"not the passphrase")
    line = mount_refused(encrypted, "--config", encrypted.config_path, "--key-file", wrong)  # the flag wins
    assert line.startswith("dfsfuse: wrong key: the passphrase in") and str(wrong) in line
    readable = key_file(local_tmp / "readable.key", mode=0o644)
    line = mount_refused(encrypted, "--config", encrypted.config_path, "--key-file", readable)
    assert line == f"dfsfuse: key file {readable} is accessible to other users (chmod 600 {readable})"
    # The flag wins the other way too: a config whose key file is gone, and the right one on the command line.
    encrypted.config_path.write_text(config.replace(str(key), str(local_tmp / "gone.key")))
    encrypted.extra_args = ["--key-file", str(key)]
    try:
        encrypted.start()
    finally:
        encrypted.extra_args = []
        encrypted.config_path.write_text(config)
    write_file(encrypted.mountpoint / "after-the-refusals", MARKER)
    assert (encrypted.mountpoint / "after-the-refusals").read_bytes() == MARKER


def test_a_key_is_refused_where_there_is_no_encryption(mount_factory, local_tmp):
    key = key_file(local_tmp / "fs.key")
    plain = mount_factory.new("plain", start=False)
    line = mount_refused(plain, "--key-file", key)
    assert "holds no file system yet; make an encrypted one with: dfsfuse format --encrypt --key-file" in line
    line = one_line_error(dfsfuse_cli("format", "--data-dir", plain.data_dir, "--key-file", key, check=False))
    assert "no --encrypt" in line
    line = one_line_error(dfsfuse_cli("format", "--encrypt", "--data-dir", plain.data_dir, check=False))
    assert "--encrypt needs the passphrase: --key-file FILE" in line
    assert not (plain.data_dir / "metadata.db").exists()
    dfsfuse_cli("format", "--data-dir", plain.data_dir)
    line = mount_refused(plain, "--key-file", key)
    assert "is not encrypted (encryption is chosen at format); mount it without a key file" in line


def test_restore_opens_a_sealed_snapshot_only_with_the_key(mount_factory, local_tmp):
    nodes = local_tmp / "nodes"
    key = key_file(local_tmp / "fs.key")
    config = local_nodes_config(nodes, encryption_table(key))
    lost = mount_factory.new("lost", config=config, start=False)
    dfsfuse_cli("format", "--encrypt", "--data-dir", lost.data_dir, "--config", lost.config_path)
    lost.start()
    write_mixed_tree(lost.mountpoint)
    before = tree_digest(lost.mountpoint)
    lost.stop()
    shutil.rmtree(lost.data_dir)

    new_dir = local_tmp / "restored"
    restore = ["restore", "--node", nodes / "disk2", "--data-dir", new_dir]
    line = one_line_error(dfsfuse_cli(*restore, check=False))
    assert "snapshots are encrypted: give the file system's key file with --key-file FILE" in line
    wrong = key_file(local_tmp / "wrong.key", b"not the passphrase")
    assert "wrong key" in one_line_error(dfsfuse_cli(*restore, "--key-file", wrong, check=False))
    assert not (new_dir / "metadata.db").exists()
    assert "restored the metadata snapshot" in dfsfuse_cli(*restore, "--key-file", key).stdout
    restored = mount_factory.new("restored", config=config, data_dir=new_dir)
    assert tree_digest(restored.mountpoint) == before
    restored.stop()
