"""`dfsfuse stats MOUNTPOINT`: what a mount is doing, a line per interval.

The mount's counters (dfsfuse/metrics.py) are read over its control socket
every interval and turned into per-second figures: FUSE operations and their
mean latency, bytes read and written by applications, the shard cache's hit
rate, shard buffers waiting to be stored, the write buffer, node stores'
mean latency and errors. A header comes first and again every screenful in
a terminal, as `vmstat` and `juicefs stats` do.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TextIO

from .cluster import control
from .datadir import dfsfuse_mounts
from .errors import UserError

HEADER_EVERY = 20  # lines between two headers in a terminal
COLUMNS = (
    ("time", 8), ("ops/s", 8), ("op ms", 7), ("read MB/s", 10), ("write MB/s", 10), ("cache hit", 9),
    ("flushing", 8), ("buffer MiB", 10), ("put ms", 7), ("get ms", 7), ("node err/s", 10),
)
Samples = dict[str, float]


MAX_INTERVAL = 3600.0


def stats(mountpoint: str, interval: float, count: int | None, out: TextIO = sys.stdout) -> int:
    if not 0 < interval <= MAX_INTERVAL:  # also refuses nan
        raise UserError(f"--interval must be more than 0 and at most {MAX_INTERVAL:.0f} seconds")
    if count is not None and count < 1:
        raise UserError("--count must be at least 1")
    data_dir = data_dir_of(mountpoint)
    socket_path = data_dir / "control.sock"
    previous, previous_at = _read(socket_path, mountpoint), time.monotonic()
    rows = 0
    while count is None or rows < count:
        if rows % HEADER_EVERY == 0 and (rows == 0 or out.isatty()):
            out.write(_row([name for name, _ in COLUMNS]) + "\n")
        time.sleep(interval)
        now, now_at = _read(socket_path, mountpoint), time.monotonic()
        out.write(_row(figures(previous, now, now_at - previous_at)) + "\n")
        out.flush()
        previous, previous_at = now, now_at
        rows += 1
    return 0


def figures(before: Samples, after: Samples, seconds: float) -> list[str]:
    """One line's cells: rates over `seconds` between two snapshots, and gauges as of `after`."""

    def rate(name: str) -> float:
        # Never below 0: a mount started again between two samples counts from 0.
        return max(0.0, _total(after, name) - _total(before, name)) / seconds

    def mean_ms(histogram: str, label: str = "") -> str:
        count = _total(after, f"{histogram}_count", label) - _total(before, f"{histogram}_count", label)
        spent = _total(after, f"{histogram}_sum", label) - _total(before, f"{histogram}_sum", label)
        return f"{1000 * spent / count:.2f}" if count > 0 else "-"

    hits = _total(after, "dfsfuse_shard_cache_lookups_total", 'result="hit"') - _total(
        before, "dfsfuse_shard_cache_lookups_total", 'result="hit"')
    lookups = _total(after, "dfsfuse_shard_cache_lookups_total") - _total(before, "dfsfuse_shard_cache_lookups_total")
    return [
        time.strftime("%H:%M:%S"),
        f"{rate('dfsfuse_fuse_requests_total'):.0f}",
        mean_ms("dfsfuse_fuse_request_seconds"),
        f"{rate('dfsfuse_read_bytes_total') / 1e6:.1f}",
        f"{rate('dfsfuse_written_bytes_total') / 1e6:.1f}",
        f"{100 * hits / lookups:.0f}%" if lookups > 0 and hits >= 0 else "-",
        f"{_total(after, 'dfsfuse_flush_queue'):.0f}",
        f"{_total(after, 'dfsfuse_write_buffer_bytes') / 2**20:.1f}",
        mean_ms("dfsfuse_node_request_seconds", 'operation="put"'),
        mean_ms("dfsfuse_node_request_seconds", 'operation="read"'),
        f"{rate('dfsfuse_node_errors_total'):.1f}",
    ]


def _total(samples: Samples, name: str, label: str = "") -> float:
    """The sum of a metric's samples (over all its labels, or those with `label`)."""
    total = 0.0
    for key, value in samples.items():
        base, _, labels = key.partition("{")
        if base == name and label in labels:
            total += value
    return total


def _row(cells: list[str]) -> str:
    return "  ".join(cell.rjust(width) for cell, (_, width) in zip(cells, COLUMNS)).rstrip()


def _read(socket_path: Path, mountpoint: str) -> Samples:
    try:
        client = control.connect(socket_path)
        if client is None:
            raise UserError(f"the mount at {mountpoint} does not answer on {socket_path} (has it been unmounted?)")
        return control.read_stats(client)
    except OSError as error:  # EACCES: the socket is its owner's alone (mode 0600)
        raise UserError(f"cannot ask the mount at {mountpoint} ({socket_path}): {error.strerror or error}") from None


def data_dir_of(mountpoint: str) -> Path:
    """The data dir of the dfsfuse mount at `mountpoint`."""
    wanted = os.path.realpath(mountpoint)
    for data_dir, where in dfsfuse_mounts():
        if where == wanted:
            return data_dir
    raise UserError(f"{mountpoint} is not a dfsfuse mount point (see `mount -t fuse.dfsfuse`)")
