"""Small files in pack files, through a real mount: the space of deleted
small files comes back once their packs are compacted, and what is left
reads back, also after a SIGKILL of the mount (fsynced small files are
durable in packs as they were as replica files). fsck at unmount checks
metadata and stores agree (the fixture)."""

import os

from dfstest import KiB, MiB, parse_fsck, read_file, run, wait_until, write_file

# No trash (a deleted file must become garbage at once); 1 MiB shards, so a
# 100 KiB file is one replica under the store's 128 KiB pack threshold.
CONFIG = """
shard_size = "1MiB"
trash_days = 0
"""

SMALL = 100 * KiB
FILES = 1100  # 110 MB: with R = 2 over three stores, each store's first 64 MiB pack fills and is sealed


def pack_bytes(fs) -> int:
    return sum(
        entry.stat().st_size
        for node in fs.node_dirs() if (node / "packs").is_dir()
        for entry in os.scandir(node / "packs")
    )


def replica_files(fs) -> int:
    return sum(len(paths) for paths in fs.replica_files().values())


def content(number: int) -> bytes:
    return number.to_bytes(4, "little") * (SMALL // 4)


def test_deleted_small_files_are_compacted_away_and_the_rest_reads_back(mount_factory):
    fs = mount_factory.new("packs", config=CONFIG)
    os.mkdir(fs / "d")
    for number in range(FILES):
        write_file(fs / "d" / f"{number}", content(number))
    assert replica_files(fs) == 0  # every replica went to a pack
    full = pack_bytes(fs)
    assert full > 2 * FILES * SMALL
    kept = range(0, FILES, 10)
    for number in range(FILES):
        if number % 10:
            os.unlink(fs / "d" / f"{number}")
    # The garbage collector deletes the replicas; the sealed packs, now 90% dead, are compacted.
    wait_until(lambda: pack_bytes(fs) < full / 2, "compaction of the packs", timeout=60)
    assert "compacted pack" in fs.log_text(whole=True)
    for number in kept:
        assert read_file(fs / "d" / f"{number}") == content(number)
    fs.remount()
    for number in kept:
        assert read_file(fs / "d" / f"{number}") == content(number)


def test_fsynced_small_files_survive_a_kill_9(mount_factory):
    fs = mount_factory.new("crash", config=CONFIG)
    files = {f"f{number}": os.urandom(number * 997 % (64 * KiB)) for number in range(200)}
    for name, data in files.items():
        write_file(fs / name, data, fsync=True)
    write_file(fs / "big", os.urandom(MiB + 5), fsync=True)  # a replica file next to the packs
    fs.crash()
    run(["fusermount3", "-u", "-z", fs.mountpoint])
    fs.start()  # no fsck first: the stores reopen their packs by themselves
    for name, data in files.items():
        assert read_file(fs / name) == data
    assert len(read_file(fs / "big")) == MiB + 5
    fs.stop(fsck=False)
    result = fs.fsck(check=False)
    assert result.returncode == 0 and parse_fsck(result)["unrecoverable"] == 0, result.stdout + result.stderr
