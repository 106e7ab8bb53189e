"""The cluster secret: read from a file both node servers and their clients use.

It never crosses the wire; see the handshake in dfsfuse.storage.protocol.
"""

from __future__ import annotations

import stat

from dfsfuse.secretfile import read_secret_file


def load_secret(path: str) -> bytes:
    """The secret in `path`, refused unless it is a non-empty regular file
    that users other than its owner and group cannot read."""
    return read_secret_file(path, "secret file", stat.S_IRWXO, "chmod o-rwx")
