"""The dfsfuse command line: format, mount, status, stats, snapshot, quota, trash,
fsck, repair, scrub, rebalance, restore, node.

Mistakes a person can fix end as one line on stderr and a non-zero exit
code, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import config as config_module
from .errors import UserError
from .node.cli import add_node_commands, run_node_command

META_ENVIRONMENT = "DFSFUSE_META"  # the default of --meta (for systemd units and fstab lines)


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", metavar="DIR",
                        help="this machine's state: the SQLite metadata (without --meta), log, control socket")
    parser.add_argument("--config", metavar="FILE", help="TOML file: replicas, shard size, node stores, caches")
    parser.add_argument("--meta", metavar="URL", default=os.environ.get(META_ENVIRONMENT) or None,
                        help=f"the shared metadata database, postgresql://HOST/DB (default: ${META_ENVIRONMENT};"
                        " without either, SQLite in the data dir)")
    parser.add_argument("--meta-password-file", metavar="FILE",
                        help="a file (mode 600) holding the database password; else libpq's PGPASSFILE or ~/.pgpass")


def _add_key_file_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--key-file", metavar="FILE",
                        help="the encrypted file system's passphrase, a file only its owner may read"
                        " (default: [encryption] key_file)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dfsfuse", description="A sharded, replicated FUSE file system.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    format_command = commands.add_parser("format", help="make a new file system (SQLite in the data dir, or --meta)")
    _add_data_options(format_command)
    format_command.add_argument("--replicas", type=int, metavar="N", help="copies of every shard (default 2)")
    format_command.add_argument("--shard-size", metavar="SIZE", help="bytes of file data per shard (default 4MiB)")
    format_command.add_argument("--block-size", metavar="SIZE", help="checksum block of a replica (default 64KiB)")
    format_command.add_argument("--encrypt", action="store_true",
                                help="encrypt everything the node stores hold, under the passphrase in --key-file")
    _add_key_file_option(format_command)

    mount = commands.add_parser("mount", help="mount the file system")
    mount.add_argument("mountpoint", metavar="MOUNTPOINT")
    _add_data_options(mount)
    _add_key_file_option(mount)
    mount.add_argument("--foreground", action="store_true", help="stay in the foreground, logging to stderr")
    mount.add_argument("-o", dest="options", action="append", default=[], metavar="OPT[,OPT...]",
                       help="mount options: allow_other, ro, nosuid, nodev, noexec, noatime;"
                       " metrics=HOST:PORT serves Prometheus metrics there; trash_days=DAYS (0: no trash)")

    status = commands.add_parser("status", help="node stores, usage, under-replicated shards and mounts")
    _add_data_options(status)
    status.add_argument("--json", action="store_true", help="as JSON, for scripts (exact numbers)")

    stats = commands.add_parser("stats", help="a mount's live figures: operations, bytes, cache, nodes")
    stats.add_argument("mountpoint", metavar="MOUNTPOINT")
    stats.add_argument("--interval", type=float, default=1.0, metavar="SECONDS", help="between two lines (default 1)")
    stats.add_argument("--count", type=int, metavar="N", help="stop after N lines (default: until interrupted)")

    snapshot = commands.add_parser(
        "snapshot", help="a copy-on-write snapshot of a directory tree: SRC DST, or --delete DST"
    )
    snapshot.add_argument("paths", nargs="+", metavar="SRC DST", help="paths inside a dfsfuse mount")
    snapshot.add_argument("--readonly", action="store_true", help="a snapshot that refuses every change (EROFS)")
    snapshot.add_argument("--delete", action="store_true",
                          help="remove the snapshot DST (read-only or not) and free what only it holds")
    quota = commands.add_parser("quota", help="directory quotas: limits on the bytes and inodes below a directory")
    quota_commands = quota.add_subparsers(dest="quota_command", required=True, metavar="COMMAND")
    quota_set = quota_commands.add_parser("set", help="set or change the limits of a directory's quota")
    quota_set.add_argument("directory", metavar="DIR", help="a directory in a dfsfuse mount")
    quota_set.add_argument("--bytes", metavar="SIZE", help="the most file data below DIR: 10GiB, 500M, 1T, bytes; none")
    quota_set.add_argument("--inodes", metavar="N", help="the most files, directories and links below DIR; none")
    quota_get = quota_commands.add_parser("get", help="a directory's quota: limits and usage")
    quota_get.add_argument("directory", metavar="DIR")
    quota_get.add_argument("--json", action="store_true", help="as JSON, for scripts (exact numbers)")
    quota_list = quota_commands.add_parser("list", help="every quota of the file system mounted at PATH")
    quota_list.add_argument("path", metavar="PATH", help="the mount point, or any path in the mount")
    quota_list.add_argument("--json", action="store_true", help="as JSON, for scripts (exact numbers)")
    quota_remove = quota_commands.add_parser("remove", help="drop a directory's quota")
    quota_remove.add_argument("directory", metavar="DIR")

    fsck = commands.add_parser("fsck", help="check metadata against the node stores and repair")
    _add_data_options(fsck)
    repair = commands.add_parser("repair", help="bring every shard back to R replicas, most-endangered first")
    _add_data_options(repair)
    scrub = commands.add_parser("scrub", help="read and verify every replica, and repair the bad ones")
    _add_data_options(scrub)
    rebalance = commands.add_parser("rebalance", help="move the shards whose placement changed (after node add)")
    _add_data_options(rebalance)

    restore = commands.add_parser(
        "restore", help="rebuild a lost data dir from the newest metadata snapshot on the nodes"
    )
    restore.add_argument("--node", required=True, metavar="HOST:PORT|DIR",
                         help="a node server of the cluster, or a node store directory on this machine")
    restore.add_argument("--secret-file", metavar="FILE", help="the cluster secret (for a node server)")
    _add_data_options(restore)
    _add_key_file_option(restore)

    trash = commands.add_parser("trash", help="deleted and overwritten files kept in MOUNT/.trash")
    trash_commands = trash.add_subparsers(dest="trash_command", required=True, metavar="COMMAND")
    trash_list = trash_commands.add_parser("list", help="what the trash holds: original path, when deleted, size")
    trash_list.add_argument("path", nargs="?", default=".", metavar="PATH",
                            help="a path in the mount; below a directory, only what was deleted there (default .)")
    trash_list.add_argument("--json", action="store_true", help="as JSON, for scripts")
    trash_restore = trash_commands.add_parser("restore", help="move a file out of the trash (never overwrites)")
    trash_restore.add_argument("what", metavar="FILE", help="MOUNT/.trash/HOUR/NAME, or the file's original path")
    trash_restore.add_argument("--to", metavar="DEST", help="where to put it (default: its original path)")
    trash_empty = trash_commands.add_parser("empty", help="delete what the trash holds for good")
    trash_empty.add_argument("path", nargs="?", default=".", metavar="PATH", help="a path in the mount (default .)")
    trash_empty.add_argument("--older-than", type=float, default=0.0, metavar="DAYS",
                             help="only files deleted more than DAYS days ago")

    node_commands = add_node_commands(commands)
    node_list = node_commands.add_parser("list", help="the cluster's nodes: state, alive, usage, last seen")
    _add_data_options(node_list)
    node_add = node_commands.add_parser("add", help="add a node: HOST:PORT of a node server, or a directory")
    node_add.add_argument("where", metavar="HOST:PORT|DIR")
    node_add.add_argument("--name", help="the node's name (default: the directory's name; required for HOST:PORT)")
    _add_data_options(node_add)
    node_drain = node_commands.add_parser("drain", help="move every replica off a node; then it holds none")
    node_drain.add_argument("name", metavar="NODE")
    _add_data_options(node_drain)
    node_remove = node_commands.add_parser("remove", help="remove a node (refused while it holds an only copy)")
    node_remove.add_argument("name", metavar="NODE")
    _add_data_options(node_remove)
    return parser


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "node" and args.node_command == "serve":
        return run_node_command(args)
    if args.command == "stats":  # needs only the mount point
        from .stats import stats

        return stats(args.mountpoint, args.interval, args.count)
    if args.command == "snapshot":  # needs only paths inside a mount
        return _snapshot(args)
    if args.command == "quota":  # the mount answers: needs only a path in it
        return _quota_command(args)
    if args.command == "trash":  # finds the file system from a path in its mount
        from . import trash

        if args.trash_command == "list":
            return trash.list_trash(args.path, args.json)
        if args.trash_command == "restore":
            return trash.restore(args.what, args.to)
        return trash.empty(args.path, args.older_than)
    overrides = {}
    if args.command == "format":
        names = {"replicas": args.replicas, "shard_size": args.shard_size, "block_size": args.block_size}
        overrides = {name: value for name, value in names.items() if value is not None}
    config = config_module.load(
        args.data_dir, args.config, meta_url=args.meta, meta_password_file=args.meta_password_file,
        key_file=getattr(args, "key_file", None), overrides=overrides,
    )
    if args.command == "format":
        from .format import format_file_system

        return format_file_system(config, args.replicas, args.encrypt)
    if args.command == "node":
        if args.node_command == "list":
            from .cluster.commands import print_node_list
            from .runtime import probe_nodes

            return print_node_list(*probe_nodes(config))
        if args.node_command == "add":
            from .cluster.commands import node_add_arguments

            return _cluster_operation(config, "node add", node_add_arguments(args.where, args.name))
        return _cluster_operation(config, f"node {args.node_command}", {"name": args.name})
    if args.command in ("repair", "scrub", "rebalance"):
        return _cluster_operation(config, args.command, {})
    if args.command == "mount":
        from .runtime import mount

        return mount(config, args.mountpoint, args.options, args.foreground)
    if args.command == "status":
        from .status import status

        return status(config, args.json)
    if args.command == "restore":
        from .restore import restore

        return restore(config, args.node, args.secret_file)
    from .fsck import fsck

    return fsck(config)


def _snapshot(args: argparse.Namespace) -> int:
    from .snapshot import delete_snapshot, snapshot

    if args.delete:
        if len(args.paths) != 1 or args.readonly:
            raise UserError("usage: dfsfuse snapshot --delete DST")
        return delete_snapshot(args.paths[0])
    if len(args.paths) != 2:
        raise UserError("usage: dfsfuse snapshot SRC DST [--readonly]")
    return snapshot(args.paths[0], args.paths[1], args.readonly)


def _quota_command(args: argparse.Namespace) -> int:
    from . import quota

    if args.quota_command == "set":
        return quota.quota_set(args.directory, args.bytes, args.inodes)
    if args.quota_command == "get":
        return quota.quota_get(args.directory, args.json)
    if args.quota_command == "list":
        return quota.quota_list(args.path, args.json)
    return quota.quota_remove(args.directory)


def _cluster_operation(config: config_module.Config, operation: str, arguments: dict[str, str]) -> int:
    """In the mount if one runs (it is the only writer), else in this process."""
    from .cluster.commands import TerminalOutput, ask_mount
    from .runtime import run_cluster_operation

    output = TerminalOutput()
    code = ask_mount(config, operation, arguments, output)
    if code is None:
        code = run_cluster_operation(config, operation, output, arguments)
    return code


def main(argv: list[str] | None = None) -> int:
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except UserError as error:
        print(f"dfsfuse: {error}", file=sys.stderr)
        return error.exit_code
    except BrokenPipeError:
        # The reader went away (`dfsfuse status | head`): not a mistake to report.
        # Point stdout at /dev/null so that flushing it at exit fails no more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # as a command killed by SIGPIPE
    except KeyboardInterrupt:
        return 130


def mount_main() -> int:
    """`mount.py MOUNTPOINT [options]`: the same as `dfsfuse mount`."""
    return main(["mount", *sys.argv[1:]])
