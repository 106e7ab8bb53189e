"""The dfsfuse command line: mount, status, fsck.

Mistakes a person can fix end as one line on stderr and a non-zero exit
code, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from . import config as config_module
from .errors import UserError


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", metavar="DIR", help="all state: metadata and the default node stores")
    parser.add_argument("--config", metavar="FILE", help="TOML file: replicas, shard size, node stores, caches")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dfsfuse", description="A sharded, replicated FUSE file system.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    mount = commands.add_parser("mount", help="mount the file system")
    mount.add_argument("mountpoint", metavar="MOUNTPOINT")
    _add_data_options(mount)
    mount.add_argument("--foreground", action="store_true", help="stay in the foreground, logging to stderr")
    mount.add_argument("-o", dest="options", action="append", default=[], metavar="OPT[,OPT...]",
                       help="mount options: allow_other, ro, nosuid, nodev, noexec, noatime")

    status = commands.add_parser("status", help="node stores, usage and under-replicated shards")
    _add_data_options(status)

    fsck = commands.add_parser("fsck", help="check metadata against the node stores and repair")
    _add_data_options(fsck)
    return parser


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    config = config_module.load(args.data_dir, args.config)
    if args.command == "mount":
        from .runtime import mount

        return mount(config, args.mountpoint, args.options, args.foreground)
    if args.command == "status":
        from .status import status

        return status(config)
    from .fsck import fsck

    return fsck(config)


def main(argv: list[str] | None = None) -> int:
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except UserError as error:
        print(f"dfsfuse: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        return 130


def mount_main() -> int:
    """`mount.py MOUNTPOINT [options]`: the same as `dfsfuse mount`."""
    return main(["mount", *sys.argv[1:]])
