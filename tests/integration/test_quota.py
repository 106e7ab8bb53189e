"""Directory quotas through the mount, with ordinary tools: `dfsfuse quota
set|get|list|remove`, EDQUOT from dd, cp, touch, mkdir and mv past a limit
(with nothing already stored damaged), EXDEV for hard links across quotas,
df on a quota directory, exact usage after concurrent writers, two mounts
on PostgreSQL sharing quotas, and fsck's recount after a crash with a wrong
usage on disk.

Small shards (64 KiB) so that a few hundred KiB cross shard boundaries and
background flushes commit while writers go on.
"""

import errno
import json
import os
import re
import sqlite3
import stat
import subprocess
import threading
import time
from pathlib import Path

from conftest import two_postgres_mounts
from dfstest import (
    PYTHON,
    KiB,
    MiB,
    dfsfuse_cli,
    drop_caches,
    expect_errno,
    one_line_error,
    parse_status,
    read_file,
    run,
)

ALSO_POSTGRES = True  # also with its metadata on PostgreSQL (conftest.py)

MOUNT_CONFIG = """
shard_size = "64KiB"
block_size = "16KiB"
"""


def quota(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return dfsfuse_cli("quota", *map(str, args), check=check)


def usage_of(directory: Path) -> tuple[int, int]:
    """(used bytes, used inodes) as `dfsfuse quota get --json` reports them."""
    described = json.loads(quota("get", directory, "--json").stdout)["quotas"][0]
    return described["used_bytes"], described["used_inodes"]


def counted(directory: Path) -> tuple[int, int]:
    """(bytes, inodes) below a directory, counted as du --apparent-size and find do:
    regular files' sizes (each inode once) and every inode but the directory itself."""
    sizes: dict[int, int] = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            info = os.lstat(os.path.join(root, name))
            sizes[info.st_ino] = info.st_size if stat.S_ISREG(info.st_mode) else 0
    return sum(sizes.values()), len(sizes)


def dd_copied(result: subprocess.CompletedProcess) -> int:
    match = re.search(r"^(\d+) bytes", result.stderr, re.MULTILINE)
    assert match, result.stderr
    return int(match.group(1))


def test_dd_and_cp_past_the_byte_limit_get_edquot_and_keep_what_was_accepted(workdir):
    limited = workdir / "limited"
    limited.mkdir()
    kept = os.urandom(100 * KiB)
    (limited / "kept").write_bytes(kept)
    quota("set", limited, "--bytes", "1MiB")
    # dd of 3 MiB in 64 KiB writes: the write that would pass 1 MiB fails at once.
    result = run(["dd", "if=/dev/urandom", f"of={limited / 'big'}", "bs=64k", "count=48"], check=False)
    assert result.returncode != 0 and "Disk quota exceeded" in result.stderr, result.stderr
    accepted = dd_copied(result)
    assert 0 < accepted <= MiB - len(kept) and accepted % (64 * KiB) == 0, accepted
    assert os.stat(limited / "big").st_size == accepted
    # Refused growth leaves a rewrite of what is there possible, and a shrink.
    with open(limited / "big", "r+b") as handle:
        handle.write(b"rewritten")
        expect_errno(errno.EDQUOT, os.pwrite, handle.fileno(), b"x", MiB)
        expect_errno(errno.EDQUOT, os.truncate, handle.fileno(), MiB)
    drop_caches()
    assert read_file(limited / "kept") == kept
    assert os.stat(limited / "big").st_size == accepted
    assert usage_of(limited) == (len(kept) + accepted, 2)
    # cp of a file larger than what is left: EDQUOT, and no more charged than the copy holds.
    source = workdir / "source"
    source.write_bytes(os.urandom(1100 * KiB))
    os.truncate(limited / "big", 0)
    result = run(["cp", source, limited / "copy"], check=False)
    assert result.returncode != 0 and "Disk quota exceeded" in result.stderr, result.stderr
    copied = os.stat(limited / "copy").st_size
    assert copied <= MiB - len(kept)
    assert read_file(limited / "copy") == read_file(source)[:copied]
    assert usage_of(limited) == (len(kept) + copied, 3) == counted(limited)
    # Lifting the limit lets the same copy through.
    quota("set", limited, "--bytes", "none")
    run(["cp", source, limited / "copy"])
    assert read_file(limited / "copy") == read_file(source)


def test_touch_mkdir_and_symlink_past_the_inode_limit_get_edquot(workdir):
    limited = workdir / "limited"
    limited.mkdir()
    quota("set", limited, "--inodes", "3")
    run(["touch", limited / "a", limited / "b"])
    (limited / "sub").mkdir()
    result = run(["touch", limited / "c"], check=False)
    assert result.returncode != 0 and "Disk quota exceeded" in result.stderr, result.stderr
    expect_errno(errno.EDQUOT, os.mkdir, limited / "sub" / "deeper")
    expect_errno(errno.EDQUOT, os.symlink, "a", limited / "link")
    assert sorted(os.listdir(limited)) == ["a", "b", "sub"]
    os.unlink(limited / "a")
    os.symlink("b", limited / "link")  # one was freed
    assert usage_of(limited) == (0, 3) == counted(limited)


def test_mv_into_a_quota_that_would_overflow_fails_and_leaves_the_source(workdir):
    limited = workdir / "limited"
    limited.mkdir()
    quota("set", limited, "--bytes", "200KiB")
    fits, too_big = workdir / "fits", workdir / "too-big"
    fits.write_bytes(os.urandom(150 * KiB))
    too_big.write_bytes(os.urandom(100 * KiB))
    run(["mv", fits, limited])
    data = read_file(too_big)
    result = run(["mv", too_big, limited], check=False)
    assert result.returncode != 0 and "Disk quota exceeded" in result.stderr, result.stderr
    assert read_file(too_big) == data and not (limited / "too-big").exists()
    # A tree moved out takes its usage along.
    tree = limited / "tree"
    tree.mkdir()
    run(["mv", limited / "fits", tree])
    run(["mv", tree, workdir / "tree"])
    assert usage_of(limited) == (0, 0)
    run(["mv", too_big, limited])
    assert usage_of(limited) == (100 * KiB, 1) == counted(limited)
    # Hard links across quotas: EXDEV, as XFS project quotas; within one, fine.
    expect_errno(errno.EXDEV, os.link, limited / "too-big", workdir / "outside-link")
    os.link(limited / "too-big", limited / "inside-link")
    assert usage_of(limited) == (100 * KiB, 1) == counted(limited)  # one inode, charged once


def test_df_on_a_quota_directory_shows_the_quota(workdir, mount):
    limited = workdir / "limited"
    (limited / "below").mkdir(parents=True)
    (limited / "below" / "file").write_bytes(os.urandom(256 * KiB))
    whole = os.statvfs(mount.mountpoint)
    quota("set", limited, "--bytes", "2MiB", "--inodes", "1000")
    for path in (limited, limited / "below", limited / "below" / "file"):
        seen = os.statvfs(path)
        assert seen.f_blocks * seen.f_frsize == 2 * MiB, path
        assert (seen.f_blocks - seen.f_bfree) * seen.f_frsize == 256 * KiB, path
        assert (seen.f_files, seen.f_ffree) == (1000, 998), path
    assert os.statvfs(workdir).f_blocks == whole.f_blocks  # outside: the whole file system
    lines = run(["df", "-B1", limited]).stdout.splitlines()
    assert lines[-1].split()[1:3] == [str(2 * MiB), str(256 * KiB)], lines


def test_quota_commands_show_and_refuse_clearly(workdir, mount):
    limited = workdir / "limited"
    limited.mkdir()
    (limited / "file").write_bytes(b"x" * 5000)
    result = quota("set", limited, "--bytes", "1K", "--inodes", "10")
    assert "set quota on" in result.stdout and "more than the limit" in result.stdout, result.stdout
    result = quota("set", limited, "--inodes", "20")
    assert "changed quota on" in result.stdout, result.stdout
    got = json.loads(quota("get", limited, "--json").stdout)["quotas"]
    assert [(q["mount_path"], q["max_bytes"], q["max_inodes"], q["used_bytes"], q["used_inodes"]) for q in got] == [
        (str(limited), 1024, 20, 5000, 1)
    ]
    table = quota("list", limited / "file").stdout  # any path in the mount names it
    assert str(limited) in table and "DIRECTORY" in table, table
    listed = json.loads(quota("list", mount.mountpoint, "--json").stdout)
    assert str(limited) in [q["mount_path"] for q in listed["quotas"]]
    status = parse_status(mount.status(as_json=True))
    assert any(q["path"] == f"/{workdir.name}/limited" and q["used_bytes"] == 5000 for q in status["quotas"])
    assert f"/{workdir.name}/limited" in mount.status()
    removed = quota("remove", limited)
    assert "removed quota" in removed.stdout
    for args, words in (
        (("get", limited), "no quota"),
        (("remove", limited), "no quota"),
        (("set", limited / "file", "--bytes", "1M"), "not a directory"),
        (("set", workdir / "missing", "--bytes", "1M"), "no such file"),
        (("set", "/proc", "--bytes", "1M"), "not in a dfsfuse mount"),
        (("set", limited, "--bytes", "12X"), "must be a size"),
        (("set", limited, "--inodes", "-5"), "must be a number"),
        (("set", limited), "give --bytes"),
    ):
        line = one_line_error(quota(*args, check=False))
        assert words in line, (args, line)


WRITER = r"""
import os, random, sys
directory, seed = sys.argv[1], int(sys.argv[2])
rng = random.Random(seed)
os.makedirs(os.path.join(directory, f"w{seed}"), exist_ok=True)
for step in range(60):
    path = os.path.join(directory, f"w{seed}", f"f{rng.randrange(8)}")
    action = rng.random()
    try:
        if action < 0.5:
            with open(path, "ab") as handle:
                handle.write(os.urandom(rng.randrange(1, 150_000)))
        elif action < 0.7:
            os.truncate(path, rng.randrange(0, 200_000))
        elif action < 0.85:
            os.unlink(path)
        else:
            os.rename(path, os.path.join(directory, f"w{(seed + 1) % 4}", f"moved{seed}-{step}"))
    except FileNotFoundError:
        pass
"""


def test_usage_is_exact_after_concurrent_writers(workdir):
    shared = workdir / "shared"
    shared.mkdir()
    quota("set", shared, "--bytes", "1TiB", "--inodes", "100000")
    for seed in range(4):
        (shared / f"w{seed}").mkdir()
    writers = [subprocess.Popen([PYTHON, "-c", WRITER, str(shared), str(seed)]) for seed in range(4)]
    assert [writer.wait(timeout=300) for writer in writers] == [0, 0, 0, 0]
    assert usage_of(shared) == counted(shared)


def test_fsck_reports_and_repairs_a_wrong_usage_after_a_crash(mount_factory):
    fs = mount_factory.new("crashed", config=MOUNT_CONFIG)
    limited = fs.mountpoint / "limited"
    limited.mkdir()
    quota("set", limited, "--bytes", "10MiB")
    fd = os.open(limited / "file", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, os.urandom(300 * KiB))
    os.fsync(fd)
    fs.crash()  # with the file still open
    try:
        os.close(fd)
    except OSError:
        pass  # the mount is gone
    run(["fusermount3", "-u", "-z", fs.mountpoint], check=False)
    with sqlite3.connect(fs.data_dir / "metadata.db") as db:  # what a bug would leave behind
        db.execute("UPDATE quotas SET used_bytes = 12345, used_inodes = 7")
    result = fs.fsck()
    assert re.search(
        r"quota of /limited \(inode \d+\): recorded 12345 bytes, 7 inodes; counted 307200 bytes, 1 inodes: corrected",
        result.stdout,
    ), result.stdout
    assert "quota of" not in fs.fsck().stdout  # repaired
    fs.start()
    assert usage_of(limited) == (300 * KiB, 1) == counted(limited)
    (limited / "more").write_bytes(b"y" * 10)
    assert usage_of(limited) == (300 * KiB + 10, 2)



def test_two_mounts_on_postgresql_share_their_quotas(postgres_server, test_root):
    """A quota set through one mount holds on the other at once (its write path
    hears of it through the change notices), and creates from both mounts
    at the same moment stop exactly at the limit."""
    with two_postgres_mounts(postgres_server, test_root, "quota_two_mounts", MOUNT_CONFIG) as (a, b):
        (a.mountpoint / "shared").mkdir()
        (b.mountpoint / "shared" / "early").write_bytes(b"before any quota")  # b knows of no quota yet
        quota("set", a.mountpoint / "shared", "--bytes", "256KiB", "--inodes", "20")
        # b hears of it through the change notice: then its df, and its write path, see the quota.
        deadline = time.monotonic() + 10
        while (seen := os.statvfs(b.mountpoint / "shared")).f_blocks * seen.f_frsize != 256 * KiB:
            assert time.monotonic() < deadline, "mount b did not hear of the quota"
            time.sleep(0.05)
        result = run(["dd", "if=/dev/zero", f"of={b.mountpoint / 'shared' / 'big'}", "bs=64k", "count=8"],
                     check=False)
        assert result.returncode != 0 and "Disk quota exceeded" in result.stderr, result.stderr
        assert dd_copied(result) <= 256 * KiB - len(b"before any quota")

        made = {a: 0, b: 0}

        def create_many(mount) -> None:
            for index in range(20):
                try:
                    (mount.mountpoint / "shared" / f"{mount.mountpoint.parent.name}-{index}").touch()
                    made[mount] += 1
                except OSError as error:
                    assert error.errno == errno.EDQUOT, error

        threads = [threading.Thread(target=create_many, args=(mount,)) for mount in (a, b)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert made[a] + made[b] == 20 - 2, made  # early and big took two
        assert usage_of(b.mountpoint / "shared") == counted(a.mountpoint / "shared")
        assert usage_of(a.mountpoint / "shared")[1] == 20
