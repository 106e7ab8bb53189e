"""The trash on a real mount: `rm -rf` and overwrites that can be undone,
MOUNT/.trash (hidden from the root's listing, read-only, a file moved out of
it restored), per-directory user.dfs.trash_days, `dfsfuse trash
list/restore/empty`, what `status` and statfs count, and the background
expiry of files whose time is up.

The background sweep runs every half second here; a directory whose
trash_days is a few seconds' worth shows the expiry without waiting a day.
"""

import errno
import json
import os
import stat
import time
from pathlib import Path

from dfstest import (
    MiB,
    as_user,
    dfsfuse_cli,
    drop_caches,
    expect_errno,
    one_line_error,
    parse_status,
    read_file,
    run,
    stored_bytes,
    user_errno,
    wait_until,
    write_file,
)

ALSO_POSTGRES = True  # also with its metadata on PostgreSQL (conftest.py)

MOUNT_OPTIONS = ["allow_other"]  # other users restore their own files
MOUNT_CONFIG = """
trash_days = 1
trash_sweep_interval = 0.5
"""
SEPARATOR = "\u2215"  # how a "/" of the original path shows in a name in the trash
SECONDS = 1 / 86400  # one second, in days


def _trash_files(mount) -> dict[str, Path]:
    """Original path (xattr user.dfs.trash.path) -> the file in MOUNT/.trash;
    symlinks, which the kernel shows no user xattrs of, by their names."""
    trash = mount / ".trash"
    if not trash.exists():
        return {}
    found = {}
    for hour in trash.iterdir():
        for item in hour.iterdir():
            if item.is_symlink():
                found["/" + item.name.rpartition("~")[0].replace(SEPARATOR, "/")] = item
            else:
                found[os.getxattr(item, "user.dfs.trash.path").decode()] = item
    return found


def _original(mount, path: Path) -> str:
    return "/" + str(path.relative_to(mount.mountpoint))



def test_rm_rf_puts_every_file_in_the_trash_and_mv_restores_one(mount, workdir):
    project = workdir / "project"
    (project / "sub" / "deeper").mkdir(parents=True)
    contents = {
        project / "a.txt": b"first file\n",
        project / "sub" / "b.bin": os.urandom(300_000),
        project / "sub" / "deeper" / "c": b"",
    }
    for path, data in contents.items():
        write_file(path, data)
    os.symlink("a.txt", project / "link")
    run(["rm", "-rf", str(project)])
    assert not project.exists()

    assert ".trash" not in os.listdir(mount.mountpoint)
    assert ".trash" not in run(["ls", "-a", str(mount.mountpoint)]).stdout.split()
    assert stat.S_ISDIR(os.stat(mount / ".trash").st_mode)
    in_trash = _trash_files(mount)
    for path in contents:
        original = _original(mount, path)
        assert original in in_trash, f"{original} not in {sorted(in_trash)}"
        assert in_trash[original].name.startswith(original.lstrip("/").replace("/", SEPARATOR) + "~")
        assert read_file(in_trash[original]) == contents[path]
    hours = run(["ls", str(mount / ".trash")]).stdout.split()
    listed = run(["ls", *[str(mount / ".trash" / hour) for hour in hours]]).stdout
    assert (_original(mount, project / "sub" / "b.bin").lstrip("/").replace("/", SEPARATOR)) in listed
    assert os.readlink(in_trash[_original(mount, project / "link")]) == "a.txt"

    restored = workdir / "b.bin"
    run(["mv", str(in_trash[_original(mount, project / "sub" / "b.bin")]), str(restored)])
    drop_caches()
    assert read_file(restored) == contents[project / "sub" / "b.bin"]
    assert "user.dfs.trash.path" not in os.listxattr(restored)
    assert _original(mount, project / "sub" / "b.bin") not in _trash_files(mount)
    write_file(restored, b"writable again")  # an ordinary file once out of the trash
    assert read_file(restored) == b"writable again"


def test_overwriting_by_mv_keeps_the_old_content_in_the_trash(mount, workdir):
    old, new = workdir / "config", workdir / "config.new"
    write_file(old, b"old settings\n")
    write_file(new, b"new settings\n")
    run(["mv", str(new), str(old)])
    assert read_file(old) == b"new settings\n"
    assert read_file(_trash_files(mount)[_original(mount, old)]) == b"old settings\n"


def test_the_trash_is_read_only_but_readable(mount, workdir):
    victim = workdir / "victim"
    write_file(victim, b"keep me")
    victim.unlink()
    entry = _trash_files(mount)[_original(mount, victim)]
    hour = entry.parent
    assert read_file(entry) == b"keep me"
    expect_errno(errno.EPERM, os.open, entry, os.O_WRONLY)
    expect_errno(errno.EPERM, os.open, entry, os.O_RDWR | os.O_TRUNC)
    expect_errno(errno.EPERM, os.chmod, entry, 0o600)
    expect_errno(errno.EPERM, os.setxattr, entry, "user.note", b"x")
    expect_errno(errno.EPERM, os.unlink, entry)
    expect_errno(errno.EPERM, os.rmdir, hour)
    expect_errno(errno.EPERM, os.open, hour / "new", os.O_CREAT | os.O_WRONLY, 0o644)
    expect_errno(errno.EPERM, os.mkdir, mount / ".trash" / "mine")
    expect_errno(errno.EPERM, os.link, entry, workdir / "second-name")
    other = workdir / "other"
    write_file(other, b"other")
    expect_errno(errno.EPERM, os.rename, other, hour / "moved-in")
    expect_errno(errno.EPERM, os.rename, hour, workdir / "hour")
    expect_errno(errno.EEXIST, os.mkdir, mount / ".trash")
    expect_errno(errno.EEXIST, os.open, mount / ".trash", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    assert read_file(entry) == b"keep me"


def test_users_move_their_own_files_out_of_the_trash_and_only_those(mount, workdir):
    workdir.chmod(0o777)
    alice, bob = 2001, 2002
    as_user(alice, alice, write_file, workdir / "alices", b"mine")
    as_user(alice, alice, os.unlink, workdir / "alices")
    entry = _trash_files(mount)[_original(mount, workdir / "alices")]
    assert stat.S_IMODE(os.stat(entry.parent).st_mode) == 0o1777
    assert user_errno(bob, bob, os.rename, entry, workdir / "taken") == errno.EPERM  # the sticky bit
    assert user_errno(alice, alice, os.open, entry.parent / "new", os.O_CREAT | os.O_WRONLY, 0o644) == errno.EPERM
    assert user_errno(alice, alice, os.open, entry, os.O_WRONLY) == errno.EPERM
    as_user(alice, alice, os.rename, entry, workdir / "restored")
    assert read_file(workdir / "restored") == b"mine"
    assert os.stat(workdir / "restored").st_uid == alice


def test_trash_days_zero_on_a_directory_deletes_there_at_once(mount, workdir):
    scratch = workdir / "scratch"
    scratch.mkdir()
    bad = run(["setfattr", "-n", "user.dfs.trash_days", "-v", "soon", str(scratch)], check=False)
    assert bad.returncode != 0 and "Invalid argument" in bad.stderr
    run(["setfattr", "-n", "user.dfs.trash_days", "-v", "0", str(scratch)])
    (scratch / "below").mkdir()
    big = scratch / "below" / "big"
    write_file(big, os.urandom(4 * MiB), fsync=True)
    with_file = stored_bytes(mount)
    run(["rm", "-rf", str(scratch / "below")])
    assert _original(mount, big) not in _trash_files(mount)
    wait_until(lambda: stored_bytes(mount) <= with_file - 2 * 4 * MiB, "the replicas of the deleted file to go")


def test_trash_commands_list_restore_and_empty(mount, workdir):
    docs = workdir / "docs"
    docs.mkdir()
    write_file(docs / "report.txt", b"report v1\n")
    write_file(docs / "notes.txt", b"notes\n")
    write_file(workdir / "elsewhere", b"elsewhere\n")
    run(["rm", "-rf", str(docs), str(workdir / "elsewhere")])

    listed = json.loads(dfsfuse_cli("trash", "list", str(mount.mountpoint), "--json").stdout)
    by_path = {entry["path"]: entry for entry in listed}
    report = _original(mount, docs / "report.txt")
    assert by_path[report]["size"] == len(b"report v1\n")
    assert by_path[report]["deleted_ns"] <= time.time_ns() < by_path[report]["expires_ns"]
    below = json.loads(dfsfuse_cli("trash", "list", str(workdir), "--json").stdout)
    assert sorted(entry["path"] for entry in below) == sorted(
        _original(mount, path) for path in (docs / "report.txt", docs / "notes.txt", workdir / "elsewhere"))
    table = dfsfuse_cli("trash", "list", str(workdir)).stdout
    assert report in table and "3 files" in table

    # By original path: the parent directories come back too.
    assert dfsfuse_cli("trash", "restore", str(docs / "report.txt")).stdout.strip() == f"restored {docs / 'report.txt'}"
    assert read_file(docs / "report.txt") == b"report v1\n"
    error = one_line_error(dfsfuse_cli("trash", "restore", str(docs / "report.txt"), check=False))
    assert "nothing in the trash was at" in error
    # Never over an existing file; --to puts it elsewhere.
    write_file(workdir / "elsewhere", b"a new one\n")
    error = one_line_error(dfsfuse_cli("trash", "restore", str(workdir / "elsewhere"), check=False))
    assert "exists: not overwritten" in error
    assert read_file(workdir / "elsewhere") == b"a new one\n"
    dfsfuse_cli("trash", "restore", str(workdir / "elsewhere"), "--to", str(workdir / "elsewhere.old"))
    assert read_file(workdir / "elsewhere.old") == b"elsewhere\n"
    # A file where its directory was.
    (workdir / "sub").mkdir()
    write_file(workdir / "sub" / "blocked", b"x")
    run(["rm", "-rf", str(workdir / "sub")])
    write_file(workdir / "sub", b"now a file")
    error = one_line_error(dfsfuse_cli("trash", "restore", str(workdir / "sub" / "blocked"), check=False))
    assert error.startswith(f"dfsfuse: cannot make the directory {workdir / 'sub'}")
    # By its name in the trash, into a directory.
    entry = _trash_files(mount)[_original(mount, docs / "notes.txt")]
    dfsfuse_cli("trash", "restore", str(entry), "--to", str(workdir))
    assert read_file(workdir / "notes.txt") == b"notes\n"

    write_file(workdir / "last", b"last\n")
    (workdir / "last").unlink()
    assert one_line_error(dfsfuse_cli("trash", "list", "/proc", check=False)).startswith("dfsfuse: /proc is not in")
    kept = dfsfuse_cli("trash", "empty", str(workdir), "--older-than", "1")
    assert "trash: 0 files" in kept.stdout
    assert _original(mount, workdir / "last") in _trash_files(mount)
    emptied = dfsfuse_cli("trash", "empty", str(mount.mountpoint))
    assert "removed for good" in emptied.stdout
    assert "files removed from the trash" in emptied.stderr  # progress: plain lines, not a terminal
    assert _trash_files(mount) == {}
    assert os.listdir(mount / ".trash") == []


def test_status_counts_what_the_trash_holds(mount, workdir):
    dfsfuse_cli("trash", "empty", str(mount.mountpoint))
    size = 3 * MiB
    big = workdir / "big"
    write_file(big, os.urandom(size), fsync=True)
    assert parse_status(mount.status(as_json=True))["trash"] == {"files": 0, "logical_bytes": 0, "stored_bytes": 0}
    big.unlink()
    time.sleep(1.5)  # a garbage collection round (0.25 s after the last unlink) would have run by now
    assert parse_status(mount.status(as_json=True))["trash"] == {"files": 1, "logical_bytes": size, "stored_bytes": size}
    assert "trash: 1 files, 3.0MiB logical, 3.0MiB stored" in mount.status()
    assert stored_bytes(mount) >= 2 * size  # both replicas are still there
    dfsfuse_cli("trash", "empty", str(mount.mountpoint))
    wait_until(lambda: stored_bytes(mount) < 2 * size, "the emptied trash's replicas to go")
    assert parse_status(mount.status(as_json=True))["trash"]["files"] == 0


def test_statfs_counts_the_trash_as_used(mount_factory):
    """On node stores of a tmpfs of their own, so that nothing else moves the free space."""
    fs = mount_factory.new("statfs", config=MOUNT_CONFIG, start=False)
    nodes = fs.data_dir / "nodes"
    nodes.mkdir(parents=True)
    run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(nodes)])
    try:
        fs.start()
        size = 32 * MiB

        def free() -> int:
            info = os.statvfs(fs.mountpoint)
            return info.f_bavail * info.f_frsize

        empty = free()
        write_file(fs / "big", os.urandom(size), fsync=True)
        with_file = free()
        assert with_file <= empty - size * 9 // 10
        (fs / "big").unlink()
        time.sleep(1.5)  # a garbage collection round (0.25 s after the last unlink) would have run by now
        assert free() == with_file  # held in the trash
        dfsfuse_cli("trash", "empty", str(fs.mountpoint))
        wait_until(lambda: free() >= empty - MiB, "statfs to count the emptied trash's space as free")
        fs.stop()
    finally:
        fs.kill()
        run(["umount", str(nodes)])


def test_expired_files_are_collected_in_the_background(mount, workdir):
    brief = workdir / "brief"
    brief.mkdir()
    run(["setfattr", "-n", "user.dfs.trash_days", "-v", str(3 * SECONDS), str(brief)])
    write_file(brief / "short-lived", os.urandom(MiB), fsync=True)
    write_file(workdir / "long-lived", b"stays a day")
    with_files = stored_bytes(mount)
    (brief / "short-lived").unlink()
    (workdir / "long-lived").unlink()
    assert _original(mount, brief / "short-lived") in _trash_files(mount)
    wait_until(lambda: _original(mount, brief / "short-lived") not in _trash_files(mount), "the expiry", 60)
    assert _original(mount, workdir / "long-lived") in _trash_files(mount)
    wait_until(lambda: stored_bytes(mount) <= with_files - 2 * MiB, "the expired file's replicas to go", 60)


def test_a_file_deleted_before_a_crash_is_in_the_trash_after_it(mount_factory):
    fs = mount_factory.new("crash", config=MOUNT_CONFIG)
    data = os.urandom(2 * MiB)
    write_file(fs / "precious", data, fsync=True)
    write_file(fs / "replaced", b"old", fsync=True)
    write_file(fs / "replacement", b"new", fsync=True)
    (fs / "precious").unlink()
    os.rename(fs / "replacement", fs / "replaced")
    fs.crash()
    run(["fusermount3", "-u", "-z", str(fs.mountpoint)])
    fs.log_offset = fs.log_path.stat().st_size
    fs.start()  # its garbage collector sweeps what the crash left
    in_trash = _trash_files(fs)
    assert read_file(in_trash["/precious"]) == data
    assert read_file(in_trash["/replaced"]) == b"old"
    assert read_file(fs / "replaced") == b"new"
