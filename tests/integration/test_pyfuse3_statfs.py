"""The patched pyfuse3 (patches/pyfuse3/0003-statfs-inode.patch) tells statfs which inode it is asked about.

A tiny one-file pyfuse3 file system (onefile_fs.py) runs in a subprocess of
its own (`python test_pyfuse3_statfs.py serve MOUNTPOINT CALLS KIND`). KIND
"inode" implements `statfs_inode(inode, ctx)` and answers with a block count
that names the inode (1000 + inode), recording each call; KIND "plain"
implements only the old `statfs(ctx)`, as every pyfuse3 file system did
before the patch, and must keep working unchanged.

The calls come from statvfs(3) (os.statvfs) and df(1) on the mount point
(the root, inode 1) and on its file "f" (inode 2).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from onefile_fs import (
    FILE_INODE,
    TIMEOUT,
    OneFileMount,
    mounted,
    operations_class,
    recorder,
    run,
)

pytestmark = pytest.mark.mounted

ROOT_INODE = 1
PLAIN_BLOCKS = 777  # what the plain file system's statfs answers everywhere


# --------------------------------------------------------------- the file system (subprocess)


def serve(mountpoint: str, calls_path: str, kind: str) -> None:
    import pyfuse3

    record = recorder(calls_path)

    def answer(blocks: int) -> pyfuse3.StatvfsData:
        stat = pyfuse3.StatvfsData()
        stat.f_bsize = stat.f_frsize = 4096
        stat.f_blocks = blocks
        stat.f_bfree = stat.f_bavail = 1
        stat.f_files = blocks
        stat.f_ffree = stat.f_favail = 1
        stat.f_namemax = 255
        return stat

    class PlainFS(operations_class()):
        async def statfs(self, ctx):
            record("statfs", pid=ctx.pid)
            return answer(PLAIN_BLOCKS)

    class InodeFS(PlainFS):
        async def statfs_inode(self, inode, ctx):
            record("statfs_inode", inode=inode, pid=ctx.pid)
            return answer(1000 + inode)

    run({"inode": InodeFS, "plain": PlainFS}[kind](), mountpoint, "statfstest")


# --------------------------------------------------------------- fixtures


def _mount(test_root: Path, kind: str):
    import pyfuse3

    if getattr(pyfuse3, "DFSFUSE_PATCHES", 0) < 3:
        pytest.skip(f"pyfuse3 {pyfuse3.__version__} lacks the dfsfuse statfs patch: run scripts/install.sh")
    yield from mounted(OneFileMount(__file__, test_root / "pyfuse3_statfs" / kind, kind))


@pytest.fixture(scope="module")
def inodefs(test_root):
    yield from _mount(test_root, "inode")


@pytest.fixture(scope="module")
def plainfs(test_root):
    yield from _mount(test_root, "plain")


def df_blocks(path: Path) -> int:
    """The size df(1) shows for *path*, in 4 KiB blocks."""
    lines = subprocess.run(["df", "-B4096", "--output=size", str(path)], capture_output=True, text=True,
                           check=True, timeout=TIMEOUT).stdout.split()
    return int(lines[-1])


# --------------------------------------------------------------- tests


def test_statfs_inode_gets_the_inode_of_the_path(inodefs):
    assert os.statvfs(inodefs.mountpoint).f_blocks == 1000 + ROOT_INODE
    assert os.statvfs(inodefs.file).f_blocks == 1000 + FILE_INODE
    assert df_blocks(inodefs.file) == 1000 + FILE_INODE
    calls = inodefs.calls()
    assert [call["inode"] for call in calls] == [ROOT_INODE, FILE_INODE, FILE_INODE]
    assert {call["op"] for call in calls} == {"statfs_inode"}  # the old method is not called beside it
    assert calls[0]["pid"] == os.getpid()  # the request context still comes along


def test_a_file_system_with_only_statfs_works_as_before(plainfs):
    assert os.statvfs(plainfs.mountpoint).f_blocks == PLAIN_BLOCKS
    assert os.statvfs(plainfs.file).f_blocks == PLAIN_BLOCKS
    assert [call["op"] for call in plainfs.calls()] == ["statfs", "statfs"]


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], sys.argv[3], sys.argv[4])
