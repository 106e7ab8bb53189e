"""Real work on a real mount with the tools people use: cp, tar, rsync, git, sqlite3."""

import os
import shutil
import sqlite3
import stat
import sys
from pathlib import Path

import pytest
from dfstest import MiB, command_env, drop_caches, run, tree_digest

BIG = 200 * MiB
ALSO_REMOTE = True  # also on three node servers (conftest.py)
ALSO_POSTGRES = True  # also with its metadata on PostgreSQL (conftest.py)


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory):
    """A real directory tree on the local disk: stdlib packages plus links, modes, odd files."""
    root = tmp_path_factory.mktemp("src") / "tree"
    stdlib = Path(os.__file__).parent
    for package in ("email", "json", "xml", "logging"):
        shutil.copytree(stdlib / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    extra = root / "extra"
    extra.mkdir()
    (extra / "empty-dir").mkdir()
    (extra / "empty-file").write_bytes(b"")
    (extra / "random.bin").write_bytes(os.urandom(5 * MiB + 333))
    (extra / "exec.sh").write_text("#!/bin/sh\necho hi\n")
    (extra / "exec.sh").chmod(0o755)
    (extra / "private").write_text("secret\n")
    (extra / "private").chmod(0o600)
    os.symlink("../json/__init__.py", extra / "link-to-json")
    os.symlink("no-such-target", extra / "dangling")
    os.link(extra / "random.bin", extra / "hardlink.bin")
    (extra / "name with spaces & ünïcode").write_text("odd name\n")
    os.utime(extra / "private", (1_500_000_000, 1_500_000_000))
    return root


def _diff(a, b):
    result = run(["diff", "-r", "--no-dereference", a, b], check=False)
    assert result.returncode == 0, f"trees differ:\n{result.stdout[-4000:]}{result.stderr[-2000:]}"


@pytest.mark.timeout(600)
def test_copy_200mb_file_in_and_out(workdir, mount, local_tmp):
    src = local_tmp / "big.bin"
    with open(src, "wb") as handle:
        for _ in range(BIG // (8 * MiB)):
            handle.write(os.urandom(8 * MiB))
    run(["cp", src, workdir / "big.bin"], timeout=240)
    assert (workdir / "big.bin").stat().st_size == BIG
    mount.remount()  # the copy back must come from the node stores, not a cache
    back = local_tmp / "back.bin"
    run(["cp", workdir / "big.bin", back], timeout=240)
    run(["cmp", src, back])
    src.unlink()
    back.unlink()
    os.unlink(workdir / "big.bin")


def test_tar_round_trip(workdir, source_tree, local_tmp):
    dest = workdir / "untarred"
    dest.mkdir()
    run(f"tar -C '{source_tree}' -cf - . | tar -C '{dest}' -xpf -")
    _diff(source_tree, dest)
    assert tree_digest(source_tree, 10**9) == tree_digest(dest, 10**9)  # modes, mtimes (tar: seconds), links
    archive = workdir / "tree.tar"
    run(["tar", "-C", source_tree, "-cf", archive, "."])
    drop_caches()
    out = local_tmp / "from-mount"
    out.mkdir()
    run(["tar", "-C", out, "-xpf", archive])
    _diff(source_tree, out)
    (local_tmp / "second").mkdir()
    run(f"tar -C '{dest}' -cf - . | tar -C '{local_tmp}/second' -xpf -")
    assert tree_digest(local_tmp / "second", 10**9) == tree_digest(source_tree, 10**9)


def test_rsync_round_trip(workdir, source_tree, local_tmp):
    dest = workdir / "rsynced"
    run(["rsync", "-aH", f"{source_tree}/", f"{dest}/"])
    _diff(source_tree, dest)
    assert tree_digest(source_tree) == tree_digest(dest)
    st_a, st_b = (dest / "extra" / "random.bin").stat(), (dest / "extra" / "hardlink.bin").stat()
    assert st_a.st_ino == st_b.st_ino and st_a.st_nlink == 2, "rsync -H hard link not kept"
    # a second run finds nothing to do: sizes, mtimes, modes, links all kept
    again = run(["rsync", "-aHi", f"{source_tree}/", f"{dest}/"]).stdout
    assert again.strip() == "", f"second rsync transferred:\n{again}"
    drop_caches()
    check = run(["rsync", "-aHci", "--dry-run", f"{source_tree}/", f"{dest}/"]).stdout
    assert check.strip() == "", f"checksums differ:\n{check}"
    # and back out again
    back = local_tmp / "back"
    run(["rsync", "-aH", f"{dest}/", f"{back}/"])
    _diff(source_tree, back)
    # an update: rsync writes a temp file and renames it over the old one
    (source_tree / "extra" / "exec.sh").write_text("#!/bin/sh\necho changed\n")
    (source_tree / "extra" / "exec.sh").chmod(0o755)
    run(["rsync", "-aH", "--delete", f"{source_tree}/", f"{dest}/"])
    assert (dest / "extra" / "exec.sh").read_text() == "#!/bin/sh\necho changed\n"
    assert stat.S_IMODE((dest / "extra" / "exec.sh").stat().st_mode) == 0o755
    _diff(source_tree, dest)


def test_git_on_the_mount(workdir, source_tree, local_tmp):
    repo = workdir / "repo"
    shutil.copytree(source_tree / "json", repo / "json")
    shutil.copytree(source_tree / "email", repo / "email")
    run(["git", "init", "-q", "-b", "main", repo])
    run(["git", "-C", repo, "add", "-A"])
    run(["git", "-C", repo, "commit", "-q", "-m", "first"])
    (repo / "json" / "__init__.py").write_text("# changed\n")
    (repo / "email" / "new.txt").write_text("new file\n")
    run(["git", "-C", repo, "add", "-A"])
    run(["git", "-C", repo, "commit", "-q", "-m", "second"])
    run(["git", "-C", repo, "mv", "email", "mail"])
    run(["git", "-C", repo, "commit", "-q", "-m", "rename"])
    run(["git", "-C", repo, "gc", "-q", "--aggressive"])  # packs: many renames, unlinks and mmaps
    drop_caches()
    fsck = run(["git", "-C", repo, "fsck", "--full", "--strict"])
    assert "error" not in fsck.stderr.lower()
    log = run(["git", "-C", repo, "log", "--format=%s"]).stdout.split()
    assert log == ["rename", "second", "first"]
    assert run(["git", "-C", repo, "status", "--porcelain"]).stdout == ""
    clone = local_tmp / "clone"
    run(["git", "clone", "-q", repo, clone])
    changed = run(["git", "-C", clone, "diff", "--stat", "HEAD~2", "HEAD", "--", "json"]).stdout
    assert "json/__init__.py" in changed
    assert (clone / "mail" / "new.txt").read_text() == "new file\n"
    run(["git", "-C", repo, "checkout", "-q", "HEAD~2"])
    assert (repo / "email" / "new.txt").exists() is False
    _diff(source_tree / "json", repo / "json")


def test_sqlite_cli(workdir):
    db = workdir / "cli.db"
    script = (
        "CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT, blob BLOB);\n"
        "BEGIN;\n"
        + "".join(f"INSERT INTO t(name, blob) VALUES('name{i}', randomblob({i % 500}));\n" for i in range(5000))
        + "COMMIT;\n"
        "CREATE INDEX t_name ON t(name);\n"
        "UPDATE t SET name = 'changed' WHERE id % 10 = 0;\n"
        "DELETE FROM t WHERE id % 7 = 0;\n"
    )
    run(["sqlite3", db], input=script)
    out = run(["sqlite3", db, "SELECT count(*), sum(name = 'changed') FROM t; PRAGMA integrity_check;"]).stdout.split()
    expected_count = 5000 - 5000 // 7
    expected_changed = len([i for i in range(1, 5001) if i % 10 == 0 and i % 7 != 0])
    assert out == [f"{expected_count}|{expected_changed}", "ok"]
    run(["sqlite3", db, "VACUUM;"])
    drop_caches()
    out = run(["sqlite3", db, "PRAGMA integrity_check; SELECT name FROM t WHERE id = 1;"]).stdout.split()
    assert out == ["ok", "name0"]


def test_sqlite_python_rollback_and_wal(workdir, mount):
    for mode in ("DELETE", "WAL"):
        path = workdir / f"py-{mode}.db"
        con = sqlite3.connect(path)
        try:
            assert con.execute(f"PRAGMA journal_mode={mode}").fetchone()[0].upper() == mode
            con.execute("CREATE TABLE kv(k TEXT PRIMARY KEY, v BLOB)")
            with con:
                con.executemany("INSERT INTO kv VALUES(?, ?)", ((f"k{i}", os.urandom(100)) for i in range(3000)))
            try:
                with con:
                    con.execute("DELETE FROM kv")
                    raise RuntimeError("roll back")
            except RuntimeError:
                pass
            assert con.execute("SELECT count(*) FROM kv").fetchone()[0] == 3000
            other = sqlite3.connect(path)  # a second connection sees committed data
            try:
                assert other.execute("SELECT count(*) FROM kv").fetchone()[0] == 3000
            finally:
                other.close()
        finally:
            con.close()
    mount.remount()
    for mode in ("DELETE", "WAL"):
        con = sqlite3.connect(workdir / f"py-{mode}.db")
        try:
            assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            assert con.execute("SELECT count(*) FROM kv").fetchone()[0] == 3000
        finally:
            con.close()


def test_unmount_remount_keeps_everything(workdir, mount, source_tree):
    dest = workdir / "tree"
    shutil.copytree(source_tree, dest, symlinks=True)
    sparse = workdir / "sparse"
    with open(sparse, "wb") as handle:
        handle.truncate(50 * MiB)
        handle.seek(20 * MiB)
        handle.write(b"in the middle")
    os.setxattr(dest / "extra" / "private", "user.note", b"kept")
    before = tree_digest(workdir)
    stats = {p: os.lstat(p) for p in (dest / "extra" / "private", sparse, dest / "extra" / "hardlink.bin")}
    mount.remount()
    assert tree_digest(workdir) == before
    for path, st in stats.items():
        now = os.lstat(path)
        for field in ("st_mode", "st_uid", "st_gid", "st_size", "st_mtime_ns", "st_nlink", "st_ino"):
            assert getattr(now, field) == getattr(st, field), f"{path}: {field} changed over a remount"
    assert os.getxattr(dest / "extra" / "private", "user.note") == b"kept"
    with open(sparse, "rb") as handle:
        handle.seek(20 * MiB - 5)
        assert handle.read(20) == bytes(5) + b"in the middle" + bytes(2)


def test_python_runs_from_the_mount(workdir):
    (workdir / "mod.py").write_text("def answer():\n    return 42\n")
    (workdir / "main.py").write_text("import mod\nprint(mod.answer())\n")
    env = command_env()
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    out = run([sys.executable, workdir / "main.py"], env=env).stdout
    assert out.strip() == "42"
    assert (workdir / "__pycache__").is_dir()  # Python wrote its bytecode cache there
