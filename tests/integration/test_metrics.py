"""A mount's health as figures: the Prometheus endpoint (-o metrics=HOST:PORT,
[metrics] listen) scraped during a workload, `dfsfuse stats MOUNTPOINT`, and
the one-line errors of a bad address or a port that is taken."""

import os
import random
import re
import socket
import threading
import urllib.request
from pathlib import Path

import pytest
from dfstest import MiB, dfsfuse_cli, drop_caches, one_line_error, read_file, write_file

from dfsfuse.cluster import control


def _port_outside_the_ephemeral_range() -> int:
    """A free port below the kernel's ephemeral range, so that no connection the tests
    open meanwhile (they take ephemeral ports) can take it before the mount binds it."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    for _ in range(100):
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


PORT = _port_outside_the_ephemeral_range()
MOUNT_OPTIONS = [f"metrics=127.0.0.1:{PORT}"]
MOUNT_CONFIG = 'shard_size = "1MiB"\n'

SAMPLE = re.compile(r"^(dfsfuse_[a-z_]+)(\{[^}]*\})? (\S+)$")


def scrape() -> dict[str, float]:
    """name{labels} -> value of every dfsfuse_ sample the endpoint serves."""
    with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        match = SAMPLE.match(line)
        assert match, f"a sample without the dfsfuse_ prefix, or malformed: {line!r}"
        samples[match[1] + (match[2] or "")] = float(match[3])
    return samples


def total(samples: dict[str, float], name: str, label: str = "") -> float:
    return sum(value for key, value in samples.items() if key.partition("{")[0] == name and label in key)


def test_the_counters_move_with_a_workload(workdir, mount):
    before = scrape()
    data = os.urandom(3 * MiB + 5)
    write_file(workdir / "file", data, fsync=True)
    for i in range(20):
        (workdir / f"small-{i}").write_bytes(b"x" * 100)
    drop_caches()
    assert read_file(workdir / "file") == data
    drop_caches()
    assert read_file(workdir / "file") == data  # from the mount's shard cache (the kernel's was dropped)
    after = scrape()

    def grew(name: str, label: str = "") -> float:
        return total(after, name, label) - total(before, name, label)

    assert grew("dfsfuse_written_bytes_total") >= len(data) + 2000
    assert grew("dfsfuse_read_bytes_total") >= 2 * len(data)
    assert grew("dfsfuse_fuse_requests_total", 'operation="write"') >= 20
    assert grew("dfsfuse_fuse_requests_total", 'operation="create"') >= 20
    assert grew("dfsfuse_fuse_request_seconds_count", 'operation="fsync"') == 1
    assert grew("dfsfuse_node_request_seconds_count", 'operation="put"') >= 2 * 4  # R = 2, 4 shards
    assert grew("dfsfuse_node_bytes_total", 'operation="put"') >= 2 * len(data)
    assert grew("dfsfuse_shard_cache_lookups_total", 'result="miss"') >= 1
    assert grew("dfsfuse_shard_cache_lookups_total", 'result="hit"') >= 1
    assert "dfsfuse_write_buffer_bytes" in after and "dfsfuse_flush_queue" in after
    # A failed request is counted with its errno.
    with pytest.raises(FileNotFoundError):
        os.stat(workdir / "absent")
    assert total(scrape(), "dfsfuse_fuse_errors_total", 'errno="ENOENT"') >= 1


def test_stats_shows_a_line_per_interval_with_the_writes(workdir, mount):
    stop = threading.Event()

    def writer() -> None:
        chunk = os.urandom(MiB)
        with open(workdir / "stream", "wb") as handle:
            while not stop.is_set():
                handle.write(chunk)
                if handle.tell() >= 64 * MiB:
                    handle.seek(0)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        result = dfsfuse_cli("stats", mount.mountpoint, "--count", "3", "--interval", "0.5")
    finally:
        stop.set()
        thread.join()
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["time", "ops/s", "op"], result.stdout
    assert len(lines) == 4, result.stdout
    write_rates = [float(line.split()[4]) for line in lines[1:]]
    assert max(write_rates) > 0, result.stdout


def test_stats_of_a_directory_that_is_not_a_mount_is_one_line(tmp_path, mount):
    line = one_line_error(dfsfuse_cli("stats", tmp_path, "--count", "1", check=False))
    assert f"{tmp_path} is not a dfsfuse mount point" in line, line
    for interval in ("0", "nan", "inf", "1e300"):
        line = one_line_error(dfsfuse_cli("stats", mount.mountpoint, "--interval", interval, check=False))
        assert "--interval must be more than 0" in line, line
    line = one_line_error(dfsfuse_cli("stats", mount.mountpoint, "--count", "0", check=False))
    assert "--count must be at least 1" in line, line


def test_clients_that_hang_up_before_the_answer_leave_the_mount_running(workdir, mount):
    for request in (b'{"operation": "stats"}\n', b"not json\n", b'{"operation": "format"}\n'):
        for _ in range(10):
            client = control.connect(mount.data_dir / "control.sock")
            assert client is not None
            client.sendall(request)
            client.close()  # before the answer: the mount's reply meets a broken pipe
    samples = control.read_stats(control.connect(mount.data_dir / "control.sock"))
    assert samples["dfsfuse_write_buffer_bytes"] >= 0
    (workdir / "still-here").write_bytes(b"yes")
    assert read_file(workdir / "still-here") == b"yes"


def test_a_bad_or_taken_metrics_address_is_one_line_and_nothing_is_mounted(mount_factory):
    for option, expected in (("metrics=nowhere", "must be HOST:PORT"), ("metrics=::1:9567", "in brackets")):
        fs = mount_factory.new("bad", options=[option], start=False)
        result = dfsfuse_cli("mount", fs.mountpoint, "--data-dir", fs.data_dir, "-o", option, check=False)
        assert result.returncode != 0 and expected in one_line_error(result), result.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        fs = mount_factory.new("taken", start=False)
        result = dfsfuse_cli("mount", fs.mountpoint, "--data-dir", fs.data_dir, "-o", f"metrics={address}",
                             check=False)
        assert result.returncode != 0, result.stderr
        assert f"cannot serve metrics on {address}" in one_line_error(result), result.stderr
    assert not os.path.ismount(fs.mountpoint)
