"""`dfsfuse quota set|get|list|remove`: directory quotas, from a path inside
a mount.

The path's mount is found in /proc/mounts (datadir.dfsfuse_mounts), and
the mount is asked over its control socket (cluster/quotas.py answers); the
directory is named by its inode, which stat(2) gives (st_ino is the dfsfuse
inode). Nothing here touches the metadata itself: the mount is its only
writer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any, TextIO

from .cluster import control
from .config import parse_size
from .datadir import mount_holding
from .errors import UserError
from .report import size as show_size
from .report import table

NO_LIMIT = "none"  # what `--bytes`/`--inodes` take to lift a limit, and what tables show


@dataclasses.dataclass(frozen=True)
class Place:
    """A path inside a dfsfuse mount: the mount and the path's inode."""

    mountpoint: str
    socket_path: Path
    inode: int


def locate(path: str, *, directory: bool) -> Place:
    """The dfsfuse mount that `path` lies in and its inode; with `directory`,
    it must be a directory. UserError for anything else."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file or directory") from None
    except OSError as error:
        raise UserError(f"{path}: {error.strerror or error}") from None
    if directory and not stat.S_ISDIR(info.st_mode):
        raise UserError(f"{path}: not a directory")
    found = mount_holding(os.path.realpath(path))
    if found:
        data_dir, mountpoint = found
        if os.stat(mountpoint).st_dev == info.st_dev:  # not in another file system mounted below it
            return Place(mountpoint, data_dir / "control.sock", info.st_ino)
    raise UserError(f"{path}: not in a dfsfuse mount (see `mount -t fuse.dfsfuse`)")


def parse_limit(value: str | None, what: str, *, sized: bool) -> int | None | str:
    """A limit as typed: a size (10GiB, 500M, 1T, bytes) or a count, or
    "none" for no limit; None if not given."""
    if value is None:
        return None
    if value.strip().lower() == NO_LIMIT:
        return NO_LIMIT
    if sized:
        return parse_size(value, what, source="quota set")
    if not value.strip().isdigit():
        raise UserError(f"quota set: {what} must be a number of inodes or {NO_LIMIT}, not {value!r}")
    return int(value)


def quota_set(path: str, max_bytes: str | None, max_inodes: str | None, out: TextIO = sys.stdout) -> int:
    limits: dict[str, int | None] = {}
    for name, value, sized in (("bytes", max_bytes, True), ("inodes", max_inodes, False)):
        limit = parse_limit(value, f"--{name}", sized=sized)
        if limit is not None:
            limits[name] = None if limit == NO_LIMIT else int(limit)
    if not limits:
        raise UserError("quota set: give --bytes SIZE, --inodes N or both (none lifts a limit)")
    place = locate(path, directory=True)
    answer = _ask(place, path, "quota set", {"directory": place.inode, "limits": limits})
    quota = answer["quota"]
    print(f"{'set' if answer['created'] else 'changed'} quota on {_shown_path(place, quota)}: {_summary(quota)}", file=out)
    for kind, used, limit in (("bytes", "used_bytes", "max_bytes"), ("inodes", "used_inodes", "max_inodes")):
        if quota[limit] is not None and quota[used] > quota[limit]:
            print(
                f"note: {quota[used]} {kind} are used already, more than the limit of {quota[limit]}:"
                f" nothing more may be added until usage falls below it",
                file=out,
            )
    return 0


def quota_get(path: str, as_json: bool, out: TextIO = sys.stdout) -> int:
    place = locate(path, directory=True)
    quota = _ask(place, path, "quota get", {"directory": place.inode})["quota"]
    _show([quota], place, as_json, out)
    return 0


def quota_list(path: str, as_json: bool, out: TextIO = sys.stdout) -> int:
    place = locate(path, directory=False)
    quotas = _ask(place, path, "quota list", {})["quotas"]
    _show(quotas, place, as_json, out)
    return 0


def quota_remove(path: str, out: TextIO = sys.stdout) -> int:
    place = locate(path, directory=True)
    quota = _ask(place, path, "quota remove", {"directory": place.inode})["quota"]
    print(f"removed quota on {_shown_path(place, quota)} ({_summary(quota)})", file=out)
    return 0


def quota_rows(quotas: list[dict[str, Any]], root: str = "") -> tuple[list[str], list[list[str]]]:
    """A table of quotas as the control socket describes them (dfsfuse
    status shows the same): paths under `root` (a mount point, or "" for
    paths from the file system's root)."""
    header = ["DIRECTORY", "BYTES USED", "BYTES LIMIT", "BYTES %", "INODES USED", "INODES LIMIT", "INODES %"]
    rows = []
    for quota in quotas:
        rows.append([
            _join(root, quota["path"]),
            show_size(quota["used_bytes"]), _limit(quota["max_bytes"], sized=True),
            _percent(quota["used_bytes"], quota["max_bytes"]),
            str(quota["used_inodes"]), _limit(quota["max_inodes"], sized=False),
            _percent(quota["used_inodes"], quota["max_inodes"]),
        ])
    return header, rows


def _show(quotas: list[dict[str, Any]], place: Place, as_json: bool, out: TextIO) -> None:
    if as_json:
        listed = [{**quota, "mount_path": _join(place.mountpoint, quota["path"])} for quota in quotas]
        print(json.dumps({"mountpoint": place.mountpoint, "quotas": listed}, indent=2), file=out)
        return
    if not quotas:
        print(f"no quotas under {place.mountpoint}", file=out)
        return
    for line in table(*quota_rows(quotas, place.mountpoint)):
        print(line, file=out)


def _ask(place: Place, path: str, operation: str, arguments: dict[str, Any]) -> dict[str, Any]:
    try:
        client = control.connect(place.socket_path)
        if client is None:
            raise UserError(f"the mount at {place.mountpoint} does not answer on {place.socket_path}")
        return control.ask(client, operation, arguments)
    except UserError as error:
        raise UserError(f"{operation} {path}: {error}", error.exit_code) from None
    except OSError as error:
        raise UserError(f"{operation} {path}: cannot ask the mount: {error.strerror or error}") from None


def _shown_path(place: Place, quota: dict[str, Any]) -> str:
    return _join(place.mountpoint, quota["path"])


def _join(root: str, path: str) -> str:
    return path if not root else (root.rstrip("/") + path if path != "/" else root)


def _summary(quota: dict[str, Any]) -> str:
    return (
        f"bytes {show_size(quota['used_bytes'])} of {_limit(quota['max_bytes'], sized=True)},"
        f" inodes {quota['used_inodes']} of {_limit(quota['max_inodes'], sized=False)}"
    )


def _limit(limit: int | None, *, sized: bool) -> str:
    if limit is None:
        return NO_LIMIT
    return show_size(limit) if sized else str(limit)


def _percent(used: int, limit: int | None) -> str:
    if limit is None:
        return "-"
    return f"{100 * used / limit:.1f}%" if limit else ("0.0%" if not used else "over")
