"""A mount whose nodes are node servers named in its config ([[nodes]] with
`address`), over TLS: the servers run with --tls-cert/--tls-key and the mount
trusts their self-signed certificate through `tls_ca_file`. The servers
refuse plaintext, so a mount that works speaks TLS.
"""

from __future__ import annotations

import hashlib
import os

import pytest
from dfstest import (
    MiB,
    NodeServer,
    dfsfuse_cli,
    drop_caches,
    one_line_error,
    parse_status,
    read_file,
    remote_config,
    run,
    write_file,
    write_secret,
)


@pytest.fixture
def certificate(tmp_path):
    """A self-signed certificate for 127.0.0.1 and its key."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    run([
        "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
    ])
    return cert, key


@pytest.fixture
def tls_servers(tmp_path, certificate):
    cert, key = certificate
    secret = write_secret(tmp_path / "secret")
    servers = [NodeServer(tmp_path, f"tls{index}", secret, "--tls-cert", str(cert), "--tls-key", str(key))
               for index in (1, 2, 3)]
    try:
        for server in servers:
            server.start()
        yield servers, secret, cert
    finally:
        for server in servers:
            server.stop()


def test_a_mount_talks_tls_to_node_servers(mount_factory, tls_servers):
    servers, secret, cert = tls_servers
    config = remote_config(servers, secret, f'replicas = 2\nshard_size = "1MiB"\ntls_ca_file = "{cert}"\n')
    fs = mount_factory.new("tls", config=config, start=False)
    fs.node_roots = [server.data for server in servers]
    fs.start()
    data = os.urandom(5 * MiB + 17)
    write_file(fs / "over-tls", data, fsync=True)
    drop_caches()
    assert hashlib.sha256(read_file(fs / "over-tls")).hexdigest() == hashlib.sha256(data).hexdigest()
    info = parse_status(fs.status(as_json=True))
    assert set(info["nodes"]) == {"tls1", "tls2", "tls3"} and info["under_replicated"] == 0, info
    assert sum(node["shards"] for node in info["nodes"].values()) >= 2 * 6  # 6 shards of 1 MiB, 2 replicas each
    fs.stop()  # fsck too, over TLS

    # Without the CA the same file system cannot reach its nodes: status says so.
    plain = fs.config_path.read_text().replace(f'tls_ca_file = "{cert}"\n', "")
    fs.config_path.write_text(plain)
    status = dfsfuse_cli("status", "--data-dir", fs.data_dir, "--config", fs.config_path, "--json").stdout
    assert [node["alive"] for node in parse_status(status)["nodes"].values()] == [False] * 3, status


def test_a_missing_ca_file_is_a_one_line_error(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text(f'tls_ca_file = "{tmp_path / "no-such-ca.pem"}"\n')
    line = one_line_error(dfsfuse_cli("status", "--data-dir", tmp_path / "data", "--config", config, check=False))
    assert "tls_ca_file" in line and "no-such-ca.pem" in line, line
