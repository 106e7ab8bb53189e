"""The payload of a change notice, as one mount's commit sends it to the others.

A notice is the JSON text of an object (docs/formats.md, "Change notices"):

    {"v": 1, "s": SESSION, "i": [INODE, ...], "e": [[PARENT, "HEXNAME"], ...]}

`s` is the session that made the change (0: a command outside any mount);
`i` the inodes whose attrs, xattrs or contents changed or that went; `e` the
(directory, name) entries added, removed or re-pointed, names in hex since
they are bytes. PostgreSQL refuses a NOTIFY payload of 8,000 bytes or more,
so a change too big to list (an rm -rf of a large directory in one call never
happens, but a batch of deletes can) says {"v": 1, "s": SESSION, "all": true}
instead, and receivers forget everything they cached.

A barrier, {"v": 1, "s": SESSION, "b": TOKEN}, changes nothing: a session
sends it to itself and, since PostgreSQL delivers notices in commit order,
knows once it hears it back that it has heard every change committed before.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from dfsfuse.metadata.base import ChangeNotice

VERSION = 1
MAX_PAYLOAD = 7900  # bytes; PostgreSQL's limit is 8000
EVERYTHING = ChangeNotice(everything=True)


def encode_notice(session: int, inodes: Iterable[int], entries: Iterable[tuple[int, bytes]]) -> str:
    payload = json.dumps(
        {"v": VERSION, "s": session, "i": sorted(inodes), "e": [[parent, name.hex()] for parent, name in sorted(entries)]},
        separators=(",", ":"),
    )
    if len(payload) > MAX_PAYLOAD:
        payload = json.dumps({"v": VERSION, "s": session, "all": True}, separators=(",", ":"))
    return payload


def encode_barrier(session: int, token: int) -> str:
    return json.dumps({"v": VERSION, "s": session, "b": token}, separators=(",", ":"))


def decode_notice(payload: str, own_session: int) -> ChangeNotice | None:
    """The notice in `payload`; None for one `own_session` sent (the cache
    followed that change itself). A payload this dfsfuse does not read (a
    newer version) means EVERYTHING: forgetting too much is only slower."""
    try:
        notice = json.loads(payload)
        if notice["v"] != VERSION:
            return EVERYTHING
        if "b" in notice:
            return ChangeNotice(barrier=int(notice["b"])) if notice["s"] == own_session else None
        if notice["s"] == own_session and own_session:
            return None
        if notice.get("all"):
            return EVERYTHING
        return ChangeNotice(
            inodes=frozenset(int(inode) for inode in notice["i"]),
            entries=frozenset((int(parent), bytes.fromhex(name)) for parent, name in notice["e"]),
        )
    except (ValueError, KeyError, TypeError):
        return EVERYTHING
