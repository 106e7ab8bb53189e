"""Component tests: the FUSE-agnostic layers in-process, over real parts.

See fsharness.py for how a FileSystem is built. Each test runs its own
trio.run; nothing here needs /dev/fuse.
"""

import pytest
from fsharness import Harness


@pytest.fixture
def harness(tmp_path):
    """A fresh data directory with the default small-shard configuration."""
    return Harness(tmp_path / "data")
