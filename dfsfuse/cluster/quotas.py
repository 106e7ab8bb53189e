"""The mount's side of `dfsfuse quota set|get|list|remove`: requests on its
control socket (control.py), answered at once with a JSON object, beside
any running cluster operation.

A directory is named by its inode (the command takes it from stat(2) of the
path, where st_ino is the dfsfuse inode). Each answer describes a quota as
`describe` makes it: the directory's inode and its path from the root of the
file system, the limits (null: none) and the usage.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

from dfsfuse.cluster.operations import Cluster
from dfsfuse.errors import DfsError, NotADirectory, NotFound, UserError
from dfsfuse.metadata.base import ROOT_INODE, MetadataStore, QuotaRecord

QuotaRequest = Callable[..., Awaitable[dict[str, Any]]]

# How `quota set` names a limit in its arguments; a limit left out is kept.
LIMITS = {"bytes": "max_bytes", "inodes": "max_inodes"}
NO_QUOTA = "no quota is set on this directory"


async def quota_set(cluster: Cluster, directory: int, limits: dict[str, int | None]) -> dict[str, Any]:
    """Set the limits named in `limits` ("bytes", "inodes": a number, or
    null for no limit); the others stay as they were (none, on a new quota)."""
    unknown = set(limits) - set(LIMITS)
    if unknown or not all(value is None or type(value) is int for value in limits.values()):
        raise UserError(f"quota set: limits must be {' and '.join(LIMITS)}, each a number or null, not {limits}")
    meta = cluster.meta
    try:
        try:
            current: QuotaRecord | None = await meta.quota(directory)
        except NotFound:
            current = None
        wanted = {
            field: limits[name] if name in limits else (None if current is None else getattr(current, field))
            for name, field in LIMITS.items()
        }
        quota = await meta.set_quota(directory, **wanted)
    except DfsError as error:
        raise _user_error(error, missing="no such directory") from None
    cluster.quotas_changed()
    return {"quota": await describe(meta, quota), "created": current is None}


async def quota_get(cluster: Cluster, directory: int) -> dict[str, Any]:
    try:
        quota = await cluster.meta.quota(directory)
    except DfsError as error:
        raise _user_error(error, missing=NO_QUOTA) from None
    return {"quota": await describe(cluster.meta, quota)}


async def quota_list(cluster: Cluster) -> dict[str, Any]:
    return {"quotas": [await describe(cluster.meta, quota) for quota in await cluster.meta.quotas()]}


async def quota_remove(cluster: Cluster, directory: int) -> dict[str, Any]:
    meta = cluster.meta
    try:
        quota = await meta.quota(directory)
        await meta.remove_quota(directory)
    except DfsError as error:
        raise _user_error(error, missing=NO_QUOTA) from None
    cluster.quotas_changed()
    return {"quota": await describe(meta, quota)}


QUOTA_REQUESTS: dict[str, QuotaRequest] = {
    "quota set": quota_set,
    "quota get": quota_get,
    "quota list": quota_list,
    "quota remove": quota_remove,
}


async def describe(meta: MetadataStore, quota: QuotaRecord) -> dict[str, Any]:
    """A quota as the answers carry it (docs/formats.md, "Control socket")."""
    return {
        "directory": quota.directory,
        "path": await directory_path(meta, quota.directory),
        "max_bytes": quota.max_bytes,
        "max_inodes": quota.max_inodes,
        "used_bytes": quota.used_bytes,
        "used_inodes": quota.used_inodes,
    }


async def directory_path(meta: MetadataStore, directory: int) -> str:
    """The path of a directory from the file system's root ("/" for the root),
    found by walking up through ".." and finding each name in its parent's
    listing (the cache holds listings; quota commands are rare)."""
    names: list[bytes] = []
    while directory != ROOT_INODE:
        parent = (await meta.lookup(directory, b"..")).inode
        names.append(await _name_in(meta, parent, directory))
        directory = parent
    return "/" + "/".join(os.fsdecode(name) for name in reversed(names))


async def _name_in(meta: MetadataStore, parent: int, inode: int) -> bytes:
    after = 0
    while entries := await meta.readdir(parent, after, 1000):
        for entry in entries:
            if entry.attrs.inode == inode:
                return entry.name
        after = entries[-1].offset
    raise NotFound(f"directory {inode} is not in its parent {parent}")


def _user_error(error: DfsError, missing: str) -> UserError:
    """What the engine refused, as a line for the person who asked;
    `missing` says what NotFound means to the request."""
    if isinstance(error, NotADirectory):
        return UserError("not a directory")
    if isinstance(error, NotFound):
        return UserError(missing)
    return UserError(str(error))
