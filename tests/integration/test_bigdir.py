"""A directory with 100,000 entries: created, listed with `ls -l` twice, looked up."""

import os
import random
import stat
import threading
import time

import pytest
from dfstest import run

ENTRIES = 100_000


def _create_range(directory: str, start: int, stop: int, errors: list) -> None:
    try:
        for i in range(start, stop):
            # mknod of a regular file: one request (after the lookup), no open/flush/release
            os.mknod(os.path.join(directory, f"f{i:06d}"), stat.S_IFREG | 0o644)
    except OSError as exc:  # pragma: no cover - reported below
        errors.append(exc)


@pytest.mark.timeout(900)
def test_directory_with_100k_entries(workdir, mount):
    directory = str(workdir / "big")
    os.mkdir(directory)
    started = time.monotonic()
    errors: list = []
    threads = [
        threading.Thread(target=_create_range, args=(directory, k * ENTRIES // 4, (k + 1) * ENTRIES // 4, errors))
        for k in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, f"creating entries failed: {errors[:3]}"
    created = time.monotonic() - started

    names = os.listdir(directory)
    assert len(names) == ENTRIES and len(set(names)) == ENTRIES
    assert set(names) == {f"f{i:06d}" for i in range(ENTRIES)}

    timings = []
    for _ in range(2):
        started = time.monotonic()
        out = run(["ls", "-l", "--color=never", directory], timeout=240).stdout
        timings.append(time.monotonic() - started)
        lines = out.splitlines()
        assert lines[0].startswith("total ")
        assert len(lines) == ENTRIES + 1, f"ls -l printed {len(lines) - 1} entries"
        assert all(line.startswith("-rw-r--r-- 1 root root 0 ") for line in lines[1:200])
    print(f"\ncreate {ENTRIES}: {created:.1f}s; ls -l: {timings[0]:.1f}s then {timings[1]:.1f}s")

    rng = random.Random(3)
    for i in rng.sample(range(ENTRIES), 200):
        st = os.stat(os.path.join(directory, f"f{i:06d}"))
        assert stat.S_ISREG(st.st_mode) and st.st_size == 0
    # changes show up in the next listing (the cached listing is kept up to date)
    os.unlink(os.path.join(directory, "f000000"))
    os.rename(os.path.join(directory, "f000001"), os.path.join(directory, "renamed"))
    os.mkdir(os.path.join(directory, "zz-subdir"))
    names = set(os.listdir(directory))
    assert len(names) == ENTRIES
    assert "f000000" not in names and "f000001" not in names
    assert {"renamed", "zz-subdir"} <= names
    assert os.stat(directory).st_nlink == 3
