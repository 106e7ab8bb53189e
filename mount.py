#!/usr/bin/env python3
"""Mount dfsfuse: `mount.py MOUNTPOINT [--data-dir DIR] [--config FILE] [--meta URL] [--foreground] [-o OPTS]`."""

import sys

from dfsfuse.cli import mount_main

if __name__ == "__main__":
    sys.exit(mount_main())
