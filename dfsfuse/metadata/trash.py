"""The trash's names and settings, pure: what every engine and the tools agree on.

A deleted or overwritten file is not removed but moved, in the same
transaction, into an hour directory of the trash directory, a directory inode
whose parent is the root but which has no entry there (so listings of the
root never show it); `lookup(root, TRASH_NAME)` finds it by the meta key
TRASH_INODE_KEY. An hour directory is named by the UTC hour in which its
entries expire (`2026-12-07-05`), so that whole hours can be collected at
once; an entry's name is its original path with each "/" shown as
PATH_SEPARATOR, then "~" and its inode number, which makes it unique (an
inode is in the trash under one name at most). The exact original path,
and when it was deleted and expires, are xattrs of the entry's inode.
"""

from __future__ import annotations

import calendar
import re
import time

from dfsfuse.errors import InvalidArgument
from dfsfuse.metadata.base import NAME_MAX

TRASH_NAME = b".trash"  # in the root
TRASH_INODE_KEY = "trash_inode"  # meta row: the trash directory's inode, once made

# On a directory: how long files deleted below it stay in the trash (days,
# a non-negative number; 0 turns the trash off there). The nearest directory
# up from the deleted name that has it wins over the configured trash_days.
TRASH_DAYS_XATTR = b"user.dfs.trash_days"

# On a file in the trash: where it was (the path from the root, starting
# with "/"), and when it was deleted and expires (ns since the epoch, ASCII
# digits). A file moved out of the trash loses them.
TRASH_PATH_XATTR = b"user.dfs.trash.path"
TRASH_DELETED_XATTR = b"user.dfs.trash.deleted"
TRASH_EXPIRES_XATTR = b"user.dfs.trash.expires"
TRASH_XATTRS = (TRASH_PATH_XATTR, TRASH_DELETED_XATTR, TRASH_EXPIRES_XATTR)

PATH_SEPARATOR = "\u2215".encode()  # DIVISION SLASH: reads as "/", is none
ELLIPSIS = "\u2026".encode()  # marks the front of a path cut to fit NAME_MAX
DAY_NS = 86_400 * 10**9
HOUR_NS = 3600 * 10**9
_HOUR_FORMAT = "%Y-%m-%d-%H"
_HOUR_NAME = re.compile(rb"\d{4}-\d{2}-\d{2}-\d{2}")


def hour_name(when_ns: int) -> bytes:
    """The name of the hour directory for entries that expire at `when_ns`."""
    return time.strftime(_HOUR_FORMAT, time.gmtime(when_ns // 10**9)).encode()


def hour_start_ns(name: bytes) -> int | None:
    """When the hour an hour directory is named by begins; None for another name."""
    if not _HOUR_NAME.fullmatch(name):
        return None
    try:
        parsed = time.strptime(name.decode(), _HOUR_FORMAT)
    except ValueError:
        return None
    return calendar.timegm(parsed) * 10**9


def entry_name(path: bytes, inode: int) -> bytes:
    """The name in an hour directory of the file that was at `path` ("/a/b"):
    "a∕b~INODE", its front cut (and marked with "…") to fit NAME_MAX."""
    suffix = b"~%d" % inode
    shown = path.lstrip(b"/").replace(b"/", PATH_SEPARATOR)
    room = NAME_MAX - len(suffix)
    if len(shown) > room:
        shown = ELLIPSIS + _utf8_tail(shown, room - len(ELLIPSIS))
    return shown + suffix


def _utf8_tail(data: bytes, limit: int) -> bytes:
    """The last `limit` bytes or fewer of `data`, not starting inside a UTF-8 sequence."""
    tail = data[len(data) - limit:]
    while tail and 0x80 <= tail[0] < 0xC0:
        tail = tail[1:]
    return tail


def parse_days(value: bytes | str, what: str) -> float:
    """A number of trash days (non-negative, decimals allowed); InvalidArgument
    with `what` in its message otherwise."""
    text = value.decode(errors="replace") if isinstance(value, bytes) else value
    try:
        days = float(text.strip())
    except ValueError:
        days = -1.0
    if not 0 <= days <= 36500:  # also refuses nan and inf
        raise InvalidArgument(f"{what} must be a number of days from 0 (off) to 36500, not {text.strip()!r}")
    return days


def expiry_ns(deleted_ns: int, days: float) -> int:
    return deleted_ns + int(days * DAY_NS)
