"""Typed, validated configuration: defaults, a TOML file, then flags.

With no file at all the file system lives in one data directory with three
local node stores inside it. A config file may set:

    replicas = 2                  # copies of every shard (R)
    write_quorum = 2              # replicas a write waits for (W, 1..R; default R)
    secret_file = "/etc/dfs/secret"  # the cluster secret for node servers; default DATA_DIR/secret
    tls_ca_file = "/etc/dfs/ca.pem"  # talk TLS to node servers, trusting certificates this CA signed
    shard_size = "4MiB"           # bytes, or a size with KiB/MiB/GiB
    block_size = "64KiB"          # checksum block inside a replica
    snapshot_interval = 300       # seconds between metadata snapshots on the nodes; 0: only at unmount
    trash_days = 1                # days deleted and overwritten files stay in /.trash; 0: off (or -o trash_days=)
    trash_sweep_interval = 300    # seconds between looks for expired files in the trash
    compression = "off"           # zstd, lz4 or off: how new shards are compressed (user.dfs.compression per directory)
    [cache]
    shard_cache = "256MiB"        # verified shard data kept for reads
    write_buffer = "128MiB"       # dirty data held before writers wait
    metadata_entries = 200000     # inodes/entries kept by the metadata cache
    [metadata]
    engine = "sqlite"             # sqlite (DATA_DIR/metadata.db, the default) or postgresql
    url = "postgresql://dfs@db.example/dfs?sslmode=verify-full"  # postgresql: the database (or --meta)
    password_file = "/etc/dfs/pgpass"  # postgresql: its password (or libpq's PGPASSFILE/.pgpass)
    session_timeout = 60          # seconds without a heartbeat after which another mount reclaims a mount's session
    [encryption]
    key_file = "/etc/dfs/fs.key"  # an encrypted file system's passphrase (mode 600); --key-file wins
    [[nodes]]                     # node stores; default: three under the data dir
    name = "disk1"
    path = "/srv/dfs1"            # a local directory
    [[nodes]]
    name = "disk2"
    address = "10.0.0.2:7070"     # or a node server (`dfsfuse node serve`), HOST:PORT

The [[nodes]] seed the metadata's node registry when it is empty (the first
mount); from then on the registry is the cluster's node list (`dfsfuse node
add|drain|remove|list`), and later changes to [[nodes]] are not read.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from pathlib import Path

from .errors import InvalidArgument, UserError
from .metadata.engines import DEFAULT_ENGINE, ENGINE_NAMES, MetadataSettings
from .metadata.postgres import ENGINE_NAME as POSTGRES_ENGINE
from .metadata.postgres import URL_SCHEMES as POSTGRES_URL_SCHEMES
from .metadata.postgres import redacted
from .metadata.trash import parse_days
from .shards.policy import parse_compression
from .storage.addresses import split_host_port

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

_SIZE_UNITS = {
    "": 1, "b": 1, "k": KiB, "kib": KiB, "m": MiB, "mib": MiB, "g": GiB, "gib": GiB, "t": TiB, "tib": TiB,
}
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclasses.dataclass(frozen=True)
class NodeSpec:
    name: str
    path: Path | None  # a local directory, or None for a node server at `address`
    address: str | None = None  # HOST:PORT of a node server


@dataclasses.dataclass(frozen=True)
class Config:
    data_dir: Path
    nodes: tuple[NodeSpec, ...]
    replicas: int = 2
    write_quorum: int = 2
    shard_size: int = 4 * MiB
    block_size: int = 64 * KiB
    shard_cache_bytes: int = 256 * MiB
    write_buffer_bytes: int = 128 * MiB
    metadata_entries: int = 200_000
    secret_file: Path | None = None  # None: DATA_DIR/secret, if it exists
    tls_ca_file: Path | None = None  # None: plain TCP to node servers
    snapshot_interval: int = 300  # seconds between metadata snapshots (dfsfuse.cluster.snapshots); 0: only at unmount
    metadata_engine: str = DEFAULT_ENGINE  # one of dfsfuse.metadata.engines.ENGINE_NAMES
    metadata_url: str | None = None  # postgresql: the database (--meta, DFSFUSE_META, [metadata] url)
    metadata_password_file: Path | None = None  # postgresql: --meta-password-file, [metadata] password_file
    session_timeout: float = 60.0  # [metadata] session_timeout (dfsfuse.cluster.session)
    metrics_listen: str | None = None  # HOST:PORT of the Prometheus endpoint ([metrics] listen, -o metrics=)
    trash_days: float = 1.0  # how long deleted files stay in the trash (dfsfuse/metadata/trash.py); 0: off
    trash_sweep_interval: float = 300.0  # seconds between the mount's looks for expired files in the trash
    compression: str = ""  # how new shards are compressed ("", "zstd", "lz4"); user.dfs.compression wins
    key_file: Path | None = None  # an encrypted file system's passphrase (--key-file, [encryption] key_file)
    # Whether shard_size or block_size were set (config file, format flags): if
    # not, a command takes the ones the file system was made with.
    layout_given: bool = False

    @property
    def cluster_secret_path(self) -> Path:
        return self.secret_file or self.data_dir / "secret"

    @property
    def metadata_path(self) -> Path:
        return self.data_dir / "metadata.db"

    @property
    def metadata(self) -> MetadataSettings:
        """What the metadata engine factory (dfsfuse.metadata.engines) needs."""
        return MetadataSettings(
            self.metadata_path, self.metadata_engine, self.metadata_url, self.metadata_password_file
        )

    @property
    def log_path(self) -> Path:
        return self.data_dir / "dfsfuse.log"

    @property
    def lock_path(self) -> Path:
        return self.data_dir / "lock"

    @property
    def control_socket_path(self) -> Path:
        """Where a mount listens for cluster operations (dfsfuse.cluster.control)."""
        return self.data_dir / "control.sock"


def default_data_dir() -> Path:
    """The user's data directory: $XDG_DATA_HOME/dfsfuse/default."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "dfsfuse" / "default"


def parse_size(value: object, what: str, source: str = "config") -> int:
    """An int, or a string such as "4MiB" / "64k" / "1T", as a byte count;
    `source` begins the error's line."""
    if isinstance(value, bool):
        raise UserError(f"{source}: {what} must be a size such as 4MiB, not {value!r}")
    if isinstance(value, int):
        number, unit = value, ""
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", value)
        if not match or match.group(2).lower() not in _SIZE_UNITS:
            raise UserError(f"{source}: {what} must be a size such as 4MiB, not {value!r}")
        number, unit = int(match.group(1)), match.group(2).lower()
    else:
        raise UserError(f"{source}: {what} must be a size such as 4MiB, not {value!r}")
    return number * _SIZE_UNITS[unit]


def load(
    data_dir: str | None = None,
    config_file: str | None = None,
    *,
    meta_url: str | None = None,
    meta_password_file: str | None = None,
    key_file: str | None = None,
    overrides: dict | None = None,
) -> Config:
    """Build the configuration; every mistake is a one-line UserError.

    `meta_url` and `meta_password_file` (the command line's --meta and
    --meta-password-file) win over the config's [metadata] url and
    password_file, `key_file` (--key-file) over [encryption] key_file;
    `overrides` win over the config's top-level settings.
    """
    settings: dict = {}
    if config_file is not None:
        settings = _read_toml(Path(config_file))
    settings.update(overrides or {})
    root = Path(data_dir).expanduser() if data_dir else None
    if root is None and "data_dir" in settings:
        root = Path(_expect(settings, "data_dir", str)).expanduser()
    root = (root or default_data_dir()).absolute()

    known = {
        "data_dir", "replicas", "write_quorum", "secret_file", "tls_ca_file", "shard_size", "block_size", "cache", "nodes",
        "snapshot_interval", "metadata", "metrics", "trash_days", "trash_sweep_interval",
        "compression", "encryption",
    }
    _reject_unknown(settings, known, "")
    cache = settings.get("cache", {})
    if not isinstance(cache, dict):
        raise UserError("config: [cache] must be a table")
    _reject_unknown(cache, {"shard_cache", "write_buffer", "metadata_entries"}, "cache.")

    nodes = _nodes(settings.get("nodes"), root)
    replicas = _expect(settings, "replicas", int, default=2)
    if not 1 <= replicas <= len(nodes):
        raise UserError(f"config: replicas = {replicas} needs between 1 and {len(nodes)} (the number of node stores)")
    write_quorum = _expect(settings, "write_quorum", int, default=replicas)
    if not 1 <= write_quorum <= replicas:
        raise UserError(f"config: write_quorum = {write_quorum} needs between 1 and replicas ({replicas})")
    shard_size = parse_size(settings.get("shard_size", 4 * MiB), "shard_size")
    block_size = parse_size(settings.get("block_size", 64 * KiB), "block_size")
    if not 4 * KiB <= block_size <= shard_size or shard_size % block_size or block_size % (4 * KiB):
        # Multiples of 4 KiB: patches store 4 KiB pages (metadata/base.py PAGE_SIZE).
        raise UserError("config: block_size must be a multiple of 4KiB and divide shard_size")
    if shard_size > 64 * MiB:
        raise UserError("config: shard_size may be at most 64MiB")
    metadata_entries = _expect(cache, "metadata_entries", int, default=200_000)
    if metadata_entries < 1000:
        raise UserError("config: cache.metadata_entries must be at least 1000")
    write_buffer = parse_size(cache.get("write_buffer", 128 * MiB), "cache.write_buffer")
    check_write_buffer(write_buffer, shard_size)
    return Config(
        data_dir=root,
        nodes=nodes,
        replicas=replicas,
        write_quorum=write_quorum,
        shard_size=shard_size,
        block_size=block_size,
        shard_cache_bytes=parse_size(cache.get("shard_cache", 256 * MiB), "cache.shard_cache"),
        write_buffer_bytes=write_buffer,
        metadata_entries=metadata_entries,
        secret_file=Path(_expect(settings, "secret_file", str)).expanduser() if "secret_file" in settings else None,
        tls_ca_file=_tls_ca_file(settings, root),
        snapshot_interval=_snapshot_interval(settings),
        layout_given="shard_size" in settings or "block_size" in settings,
        metrics_listen=_metrics_listen(settings),
        trash_days=_trash_days(settings),
        trash_sweep_interval=_trash_sweep_interval(settings),
        compression=parse_compression(str(_expect(settings, "compression", str, default="off")), "config"),
        key_file=_key_file(settings, key_file),
        **_metadata_settings(settings, meta_url, meta_password_file),
    )


def _metadata_settings(settings: dict, meta_url: str | None, meta_password_file: str | None) -> dict:
    """The Config fields of [metadata]: the engine, and a database's URL and password file."""
    metadata = settings.get("metadata", {})
    if not isinstance(metadata, dict):
        raise UserError("config: [metadata] must be a table")
    _reject_unknown(metadata, {"engine", "url", "password_file", "session_timeout"}, "metadata.")
    session_timeout = _expect(metadata, "session_timeout", int, default=60)
    if not 2 <= session_timeout <= 3600:
        raise UserError("config: metadata.session_timeout must be from 2 to 3600 seconds")
    url = meta_url or _expect(metadata, "url", str, default="") or None
    password_file = meta_password_file or _expect(metadata, "password_file", str, default="") or None
    default = DEFAULT_ENGINE if url is None else POSTGRES_ENGINE
    engine = _expect(metadata, "engine", str, default=default)
    if engine not in ENGINE_NAMES:
        raise UserError(f"config: metadata.engine = {engine!r} is not an engine dfsfuse knows ({', '.join(ENGINE_NAMES)})")
    if url is not None and not url.startswith(POSTGRES_URL_SCHEMES):
        raise UserError(f"metadata URL {redacted(url)} must start with postgresql:// (the only networked engine)")
    if url is not None and engine != POSTGRES_ENGINE:
        raise UserError(f"config: metadata.engine = {engine!r} takes no URL; --meta postgresql://... means postgresql")
    if engine == POSTGRES_ENGINE and url is None:
        raise UserError("config: metadata.engine = 'postgresql' needs a URL: [metadata] url, --meta or DFSFUSE_META")
    return {
        "metadata_engine": engine,
        "metadata_url": url,
        "metadata_password_file": None if password_file is None else Path(password_file).expanduser().absolute(),
        "session_timeout": float(session_timeout),
    }


def _key_file(settings: dict, flag: str | None) -> Path | None:
    """--key-file, else [encryption] key_file; read only by the commands
    that need the key (format --encrypt, mount, restore), so that the others
    run on machines without it."""
    table = settings.get("encryption", {})
    if not isinstance(table, dict):
        raise UserError("config: [encryption] must be a table")
    _reject_unknown(table, {"key_file"}, "encryption.")
    path = flag or _expect(table, "key_file", str, default="") or None
    return None if path is None else Path(path).expanduser().absolute()


def check_write_buffer(write_buffer: int, shard_size: int) -> None:
    """The write buffer must hold two shards (one filling while one is stored)."""
    if write_buffer < 2 * shard_size:
        raise UserError(f"config: cache.write_buffer must hold at least two shards (shard_size {shard_size})")


def _metrics_listen(settings: dict) -> str | None:
    """[metrics] listen: where the mount serves Prometheus metrics; None: nowhere (the default)."""
    table = settings.get("metrics", {})
    if not isinstance(table, dict):
        raise UserError("config: [metrics] must be a table")
    _reject_unknown(table, {"listen"}, "metrics.")
    listen = _expect(table, "listen", str, default="") or None
    if listen is not None:
        parse_metrics_listen(listen)
    return listen


def parse_metrics_listen(text: str) -> tuple[str, int]:
    """HOST:PORT of the metrics endpoint, or UserError saying how to write it."""
    try:
        where = split_host_port(text)
    except ValueError as error:
        raise UserError(f"metrics address {text!r}: {error}") from None
    if where is None or not where[0] or where[1] == 0:
        raise UserError(f"metrics address {text!r} must be HOST:PORT, e.g. 127.0.0.1:9567")
    return where


def _trash_days(settings: dict) -> float:
    value = settings.get("trash_days", 1)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"config: trash_days must be a number of days (0: no trash), not {value!r}")
    return parse_trash_days(str(value))


def parse_trash_days(text: str) -> float:
    """trash_days from the config or `-o trash_days=`, or a one-line UserError."""
    try:
        return parse_days(text, "trash_days")
    except InvalidArgument as error:
        raise UserError(f"config: {error}") from None


def _trash_sweep_interval(settings: dict) -> float:
    value = settings.get("trash_sweep_interval", 300)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.1 <= value <= 86400:
        raise UserError(f"config: trash_sweep_interval must be from 0.1 to 86400 seconds, not {value!r}")
    return float(value)


def _snapshot_interval(settings: dict) -> int:
    interval = _expect(settings, "snapshot_interval", int, default=300)
    if interval < 0:
        raise UserError("config: snapshot_interval must be 0 (only at unmount) or a number of seconds")
    return interval


def _tls_ca_file(settings: dict, data_dir: Path) -> Path | None:
    if "tls_ca_file" not in settings:
        return None
    path = Path(_expect(settings, "tls_ca_file", str)).expanduser()
    path = path if path.is_absolute() else data_dir / path
    if not path.is_file():
        raise UserError(f"config: tls_ca_file {path} is not a file")
    return path


def _read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist") from None
    except OSError as error:
        raise UserError(f"cannot read config file {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise UserError(f"config file {path} is not valid TOML: {error}") from None


def _nodes(raw: object, data_dir: Path) -> tuple[NodeSpec, ...]:
    if raw is None:
        return tuple(NodeSpec(f"node{i}", data_dir / "nodes" / f"node{i}") for i in (1, 2, 3))
    if not isinstance(raw, list) or not raw:
        raise UserError("config: nodes must be a non-empty list of [[nodes]] tables")
    specs = []
    for position, node in enumerate(raw, 1):
        if not isinstance(node, dict):
            raise UserError(f"config: node #{position} must be a table with name and path (or address)")
        _reject_unknown(node, {"name", "path", "address"}, f"nodes[{position}].")
        name = _expect(node, "name", str)
        check_node_name(name, "config: ")
        if ("path" in node) == ("address" in node):
            raise UserError(f"config: node {name} needs either path (a directory) or address (HOST:PORT)")
        if "address" in node:
            specs.append(NodeSpec(name, None, _expect(node, "address", str)))
            continue
        path = Path(_expect(node, "path", str)).expanduser()
        specs.append(NodeSpec(name, path if path.is_absolute() else data_dir / path))
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise UserError("config: node names must be unique")
    return tuple(specs)


def check_node_name(name: str, context: str = "") -> None:
    if not _NODE_NAME.match(name):
        raise UserError(f"{context}node name {name!r} must be letters, digits, '.', '_' or '-' (at most 64)")


def _expect(table: dict, key: str, kind: type, default: object = None):
    if key not in table:
        if default is None:
            raise UserError(f"config: {key} is required")
        return default
    value = table[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        noun = {int: "an integer", str: "a string"}.get(kind, kind.__name__)
        raise UserError(f"config: {key} must be {noun}, not {value!r}")
    return value


def _reject_unknown(table: dict, known: set[str], prefix: str) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise UserError(f"config: unknown setting {prefix}{unknown[0]}")
