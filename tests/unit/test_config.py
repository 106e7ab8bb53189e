"""Configuration: defaults, TOML, and a one-line error for every mistake."""

from pathlib import Path

import pytest

from dfsfuse import config
from dfsfuse.errors import UserError
from dfsfuse.metadata.engines import MetadataSettings


def test_defaults_need_no_file(tmp_path):
    settings = config.load(str(tmp_path / "data"))
    assert settings.replicas == 2
    assert settings.shard_size == 4 * config.MiB
    assert settings.block_size == 64 * config.KiB
    assert [n.name for n in settings.nodes] == ["node1", "node2", "node3"]
    assert settings.nodes[0].path == tmp_path / "data" / "nodes" / "node1"
    assert settings.metadata_path == tmp_path / "data" / "metadata.db"


def test_default_data_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert config.load().data_dir == tmp_path / "dfsfuse" / "default"


def test_file_settings_and_sizes(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        'replicas = 3\nshard_size = "1MiB"\nblock_size = "16k"\n'
        '[cache]\nwrite_buffer = "8MiB"\n'
        '[[nodes]]\nname = "a"\npath = "/srv/a"\n[[nodes]]\nname = "b"\npath = "rel"\n[[nodes]]\nname = "c"\npath = "/srv/c"\n'
    )
    settings = config.load(str(tmp_path / "d"), str(path))
    assert (settings.replicas, settings.shard_size, settings.block_size) == (3, config.MiB, 16 * config.KiB)
    assert settings.write_buffer_bytes == 8 * config.MiB
    assert settings.nodes[1].path == tmp_path / "d" / "rel"


@pytest.mark.parametrize(
    "text, message",
    [
        ("replicas = [", "not valid TOML"),
        ("replicas = 4", "replicas = 4 needs between 1 and 3"),
        ('replicas = "two"', "replicas must be an integer"),
        ('shard_size = "4 parsecs"', "shard_size must be a size"),
        ('block_size = "3KiB"', "block_size must be a multiple of 4KiB"),
        ('shard_size = "60KiB"\nblock_size = "6KiB"', "block_size must be a multiple of 4KiB"),
        ("colour = 1", "unknown setting colour"),
        ('[[nodes]]\nname = "a/b"\npath = "x"', "node name 'a/b'"),
        ('[[nodes]]\nname = "a"\npath = "x"\n[[nodes]]\nname = "a"\npath = "y"', "node names must be unique"),
        ('[[nodes]]\nname = "a"', "needs either path (a directory) or address"),
        ('[[nodes]]\nname = "a"\npath = "x"\naddress = "h:1"', "needs either path (a directory) or address"),
        ('tls_ca_file = "no-such-ca.pem"', "tls_ca_file"),
        ('[metadata]\nengine = "mysql"', "metadata.engine = 'mysql' is not an engine dfsfuse knows (sqlite, postgresql)"),
        ('[metadata]\nengine = 1', "engine must be a string"),
        ('[metadata]\ndsn = "x"', "unknown setting metadata.dsn"),
        ('metadata = "sqlite"', "[metadata] must be a table"),
        ('[metadata]\nengine = "postgresql"', "'postgresql' needs a URL: [metadata] url, --meta or DFSFUSE_META"),
        ('[metadata]\nengine = "sqlite"\nurl = "postgresql://h/db"', "'sqlite' takes no URL"),
        ('[metadata]\nurl = "mysql://u:pw@h/db"', "metadata URL mysql://u:***@h/db must start with postgresql://"),
        ('[metrics]\nlisten = "9567"', "metrics address '9567' must be HOST:PORT"),
        ('[metrics]\nlisten = "::1:9567"', "write an IPv6 address in brackets"),
        ('[metrics]\nport = 9567', "unknown setting metrics.port"),
    ],
)
def test_mistakes_are_one_line_user_errors(tmp_path, text, message):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(UserError) as raised:
        config.load(str(tmp_path), str(path))
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        config.load(str(tmp_path), str(tmp_path / "nope.toml"))


def test_write_quorum_defaults_to_replicas_and_must_fit(tmp_path):
    assert config.load(str(tmp_path)).write_quorum == 2
    path = tmp_path / "c.toml"
    path.write_text("replicas = 3\nwrite_quorum = 2\n")
    assert config.load(str(tmp_path), str(path)).write_quorum == 2
    for quorum in (0, 4):
        path.write_text(f"replicas = 3\nwrite_quorum = {quorum}\n")
        with pytest.raises(UserError, match="write_quorum"):
            config.load(str(tmp_path), str(path))


def test_node_servers_and_tls_ca_file(tmp_path):
    (tmp_path / "ca.pem").write_text("not checked until a node server is reached\n")
    path = tmp_path / "c.toml"
    path.write_text(
        'tls_ca_file = "ca.pem"\n'
        '[[nodes]]\nname = "a"\naddress = "10.0.0.1:7070"\n[[nodes]]\nname = "b"\npath = "/srv/b"\n'
    )
    settings = config.load(str(tmp_path), str(path))
    assert settings.tls_ca_file == tmp_path / "ca.pem"  # relative to the data dir
    assert [(n.name, n.path, n.address) for n in settings.nodes] == [
        ("a", None, "10.0.0.1:7070"), ("b", Path("/srv/b"), None)
    ]
    assert config.load(str(tmp_path)).tls_ca_file is None


def test_snapshot_interval(tmp_path):
    assert config.load(str(tmp_path / "data")).snapshot_interval == 300
    path = tmp_path / "c.toml"
    path.write_text("snapshot_interval = 0\n")
    assert config.load(str(tmp_path / "data"), str(path)).snapshot_interval == 0
    path.write_text("snapshot_interval = -5\n")
    with pytest.raises(UserError, match="snapshot_interval"):
        config.load(str(tmp_path / "data"), str(path))


def test_metadata_engine(tmp_path):
    settings = config.load(str(tmp_path / "data"))
    assert settings.metadata_engine == "sqlite"
    assert settings.metadata == MetadataSettings(tmp_path / "data" / "metadata.db", "sqlite")
    path = tmp_path / "c.toml"
    path.write_text('[metadata]\nengine = "sqlite"\n')
    assert config.load(str(tmp_path / "data"), str(path)).metadata.engine == "sqlite"


def test_a_metadata_url_means_postgresql_and_the_flag_wins(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[metadata]\nurl = "postgresql://db.example/fs"\npassword_file = "pw"\n')
    from_file = config.load(str(tmp_path / "data"), str(path))
    assert from_file.metadata.engine == "postgresql"
    assert from_file.metadata.url == "postgresql://db.example/fs"
    assert from_file.metadata.password_file == (Path.cwd() / "pw")
    flagged = config.load(str(tmp_path / "data"), str(path), meta_url="postgres://other/fs", meta_password_file="/p")
    assert (flagged.metadata.url, flagged.metadata.password_file) == ("postgres://other/fs", Path("/p"))
    assert flagged.metadata.where == "postgres://other/fs"


def test_metrics_listen_is_off_by_default(tmp_path):
    assert config.load(str(tmp_path)).metrics_listen is None
    path = tmp_path / "c.toml"
    path.write_text('[metrics]\nlisten = "[::1]:9567"\n')
    assert config.load(str(tmp_path), str(path)).metrics_listen == "[::1]:9567"
    assert config.parse_metrics_listen("[::1]:9567") == ("::1", 9567)


def test_the_key_file_flag_wins_over_the_encryption_table(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[encryption]\nkey_file = "~/fs.key"\n')
    assert config.load(str(tmp_path / "data")).key_file is None
    assert config.load(str(tmp_path / "data"), str(path)).key_file == Path.home() / "fs.key"
    assert config.load(str(tmp_path / "data"), str(path), key_file="/k").key_file == Path("/k")
    path.write_text('[encryption]\nkey = "x"\n')
    with pytest.raises(UserError, match="unknown setting encryption.key"):
        config.load(str(tmp_path / "data"), str(path))
