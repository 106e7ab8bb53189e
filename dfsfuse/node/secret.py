"""The cluster secret: read from a file both node servers and their clients use.

The secret is the file's bytes without trailing newlines (so `echo` and an
editor make the same secret). It never crosses the wire; see the handshake in
dfsfuse.storage.protocol.
"""

from __future__ import annotations

import os
import stat

from dfsfuse.errors import UserError

MAX_SECRET_BYTES = 4096


def load_secret(path: str) -> bytes:
    """The secret in `path`, refused unless it is a non-empty regular file
    that users other than its owner and group cannot read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as error:
        raise UserError(f"secret file {path}: {error.strerror or error}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UserError(f"secret file {path} is not a regular file")
        if info.st_mode & stat.S_IRWXO:
            raise UserError(f"secret file {path} is accessible to other users (chmod o-rwx {path})")
        if info.st_size > MAX_SECRET_BYTES:
            raise UserError(f"secret file {path} is larger than {MAX_SECRET_BYTES} bytes")
        secret = os.read(fd, MAX_SECRET_BYTES + 1).rstrip(b"\r\n")
    except OSError as error:
        raise UserError(f"secret file {path}: {error.strerror or error}") from None
    finally:
        os.close(fd)
    if not secret:
        raise UserError(f"secret file {path} is empty")
    return secret
