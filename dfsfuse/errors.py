"""The error hierarchy of dfsfuse.

Every error a layer below the FUSE adapter raises on purpose is a DfsError that
carries the errno the application should see. The FUSE adapter turns it into a
FUSEError; the command line turns a UserError into one line on stderr and an
exit code. Nothing here imports pyfuse3.
"""

import errno


class DfsError(Exception):
    """Base of all expected failures; `errno` is what a POSIX caller sees."""

    errno = errno.EIO

    def __init__(self, message: str = "", err: int | None = None):
        super().__init__(message)
        if err is not None:
            self.errno = err


class NotFound(DfsError):
    errno = errno.ENOENT


class Exists(DfsError):
    errno = errno.EEXIST


class NotEmpty(DfsError):
    errno = errno.ENOTEMPTY


class NotADirectory(DfsError):
    errno = errno.ENOTDIR


class IsADirectory(DfsError):
    errno = errno.EISDIR


class InvalidArgument(DfsError):
    errno = errno.EINVAL


class NameTooLong(DfsError):
    errno = errno.ENAMETOOLONG


class NoData(DfsError):
    """A missing extended attribute (ENODATA, which Linux also calls ENOATTR)."""

    errno = errno.ENODATA


class NotPermitted(DfsError):
    errno = errno.EPERM


class NoSpace(DfsError):
    errno = errno.ENOSPC


class ReadOnly(DfsError):
    """A change of an inode of a read-only snapshot (EROFS)."""

    errno = errno.EROFS


class QuotaExceeded(DfsError):
    """A directory quota (bytes or inodes) would be exceeded (EDQUOT, "Disk quota exceeded")."""

    errno = errno.EDQUOT


class CrossDevice(DfsError):
    """A link or rename that cannot be done in place (EXDEV): `mv` then copies
    and deletes, `ln` fails. dfsfuse refuses so a hard link across quota domains."""

    errno = errno.EXDEV


class DataError(DfsError):
    """No good copy of some data could be read or written (EIO)."""

    errno = errno.EIO


class SessionLost(DfsError):
    """This mount's session was reclaimed as stale by another mount (it did
    not heartbeat in time): what it held open or locked is no longer its own,
    so it refuses to go on (EIO) until it is mounted again."""

    errno = errno.EIO

    @classmethod
    def of(cls, session: int) -> "SessionLost":
        return cls(f"session {session} was reclaimed as stale by another mount; unmount and mount again")


class ShardMissing(DfsError):
    """A node store holds no replica of the requested shard."""

    errno = errno.EIO


class StoreUnavailable(DfsError):
    """A node store could not be reached or failed an operation."""

    errno = errno.EIO


class UserError(Exception):
    """A mistake a person can fix: printed as one line, exits with `exit_code`."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code
