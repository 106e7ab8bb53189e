"""Reading a file that holds a secret (the cluster secret, an encryption
key file's passphrase), refused in one line if others may read it.

The secret is the file's bytes without trailing newlines, so `echo` and an
editor make the same secret.
"""

from __future__ import annotations

import os
import stat

from dfsfuse.errors import UserError

MAX_SECRET_BYTES = 4096


def read_secret_file(path: str, what: str, forbidden_mode: int, fix: str) -> bytes:
    """The secret in `path`, refused unless it is a non-empty regular file
    none of whose `forbidden_mode` bits are set; `what` names the file in
    errors, and `fix` is the command that mends its mode (`fix PATH`)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as error:
        raise UserError(f"{what} {path}: {error.strerror or error}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UserError(f"{what} {path} is not a regular file")
        if info.st_mode & forbidden_mode:
            raise UserError(f"{what} {path} is accessible to other users ({fix} {path})")
        if info.st_size > MAX_SECRET_BYTES:
            raise UserError(f"{what} {path} is larger than {MAX_SECRET_BYTES} bytes")
        secret = os.read(fd, MAX_SECRET_BYTES + 1).rstrip(b"\r\n")
    except OSError as error:
        raise UserError(f"{what} {path}: {error.strerror or error}") from None
    finally:
        os.close(fd)
    if not secret:
        raise UserError(f"{what} {path} is empty")
    return secret
