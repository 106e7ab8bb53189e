"""Finding a mount's device in mountinfo, for its read-ahead setting."""

from __future__ import annotations

from dfsfuse.fuse.readahead import mount_device

MOUNTINFO = (
    b"22 1 252:1 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
    b"40 22 0:38 / /mnt/dfs rw,nosuid,nodev,relatime shared:20 - fuse.dfsfuse dfsfuse:/a rw,user_id=0\n"
    b"41 22 0:39 / /mnt/my\\040dfs rw,nosuid shared:21 - fuse.dfsfuse dfsfuse:/b rw,user_id=0\n"
    b"42 40 0:45 / /mnt/dfs rw,nosuid shared:22 - fuse.dfsfuse dfsfuse:/c rw,user_id=0\n"
    b"43 22 0:46 / /mnt/caf\xc3\xa9 rw shared:23 - fuse.dfsfuse dfsfuse:/d rw\n"
)


def test_the_newest_mount_at_the_path_wins(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_bytes(MOUNTINFO)
    assert mount_device("/mnt/dfs", str(info)) == "0:45"
    assert mount_device("/mnt/my dfs", str(info)) == "0:39"
    assert mount_device("/mnt/café", str(info)) == "0:46"
    assert mount_device("/mnt", str(info)) is None
    assert mount_device("/", str(info)) == "252:1"
