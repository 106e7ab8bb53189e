"""The command-line side of the cluster commands: `dfsfuse node
add|drain|remove|list`, `dfsfuse rebalance`, `dfsfuse repair`, `dfsfuse scrub`.

While the file system is mounted, the mount is the only writer of the
metadata, so a command asks it over its control socket and shows what it
reports (`ask_mount`). Otherwise the composition root runs the operation in
this process (runtime.run_cluster_operation). This module turns what a
person typed into an operation's arguments and its results into lines.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from dfsfuse.cluster import control
from dfsfuse.cluster.registry import describe_address, local_address, parse_address
from dfsfuse.config import Config
from dfsfuse.datadir import require_file_system
from dfsfuse.errors import UserError
from dfsfuse.metadata.base import NodeRecord
from dfsfuse.report import table
from dfsfuse.storage.base import StoreStat


class TerminalOutput:
    """Lines on stdout; progress on stderr: in a terminal a bar redrawn in
    place, with the rate and the time left, else a plain line now and then
    (every PLAIN_EVERY seconds, and at the end) for logs and scripts."""

    WIDTH = 30
    PLAIN_EVERY = 5.0  # seconds between two progress lines when stderr is not a terminal

    def __init__(self, stream: TextIO = sys.stderr):
        self._stream = stream
        self._visible = stream.isatty()
        self._started: dict[str, tuple[float, int]] = {}  # what -> (monotonic time, done) at its first report
        self._last_line = 0.0

    def line(self, text: str) -> None:
        print(text, flush=True)

    def progress(self, done: int, total: int, what: str) -> None:
        if total <= 0:
            return
        now = time.monotonic()
        started_at, started_done = self._started.setdefault(what, (now, done))
        finished = done >= total
        pace = progress_pace(done - started_done, now - started_at, total - done)
        if self._visible:
            filled = self.WIDTH * min(done, total) // total
            self._stream.write(f"\r[{'#' * filled}{'.' * (self.WIDTH - filled)}] {done}/{total} {what}{pace}\033[K")
            if finished:
                self._stream.write("\n")
        elif finished or now - self._last_line >= self.PLAIN_EVERY:
            self._last_line = now
            self._stream.write(f"{done}/{total} {what}{pace}\n")
        self._stream.flush()


def progress_pace(done: int, seconds: float, left: int) -> str:
    """', 12.5/s, 0:42 left' once there is a rate to tell, else ''."""
    if done <= 0 or seconds < 0.5:
        return ""
    rate = done / seconds
    remaining = int(left / rate)
    eta = f", {remaining // 60}:{remaining % 60:02d} left" if left > 0 else ""
    return f", {rate:.1f}/s{eta}"


def ask_mount(config: Config, operation: str, arguments: dict[str, Any], output: TerminalOutput) -> int | None:
    """Run the operation in the mount, if one listens; its exit code, or None."""
    require_file_system(config)
    client = control.connect(config.control_socket_path)
    if client is None:
        return None
    return control.request(client, operation, arguments, output.line, output.progress)


def node_address(where: str) -> str:
    """A node address from what a person typed: a directory, or HOST:PORT."""
    if where.startswith(("/", ".", "~")) or os.path.isdir(where):
        return local_address(os.path.expanduser(where))
    parse_address(where)
    return where


def node_add_arguments(where: str, name: str | None) -> dict[str, str]:
    """The `node add` operation's arguments for a directory or HOST:PORT."""
    address = node_address(where)
    if name is None:
        if not address.startswith("local:"):
            raise UserError(f"node add {where}: --name NAME is required for a node server (the name it serves)")
        name = Path(describe_address(address)).name
    return {"address": address, "name": name}


def print_node_list(nodes: list[NodeRecord], answers: dict[str, StoreStat | None]) -> int:
    """One line per node: state, alive, address, capacity, used, shards, last seen."""
    now_ns = time.time_ns()
    rows = []
    for node in nodes:
        info = answers[node.name]
        capacity, used, shards, seen_ns = (
            (node.capacity, node.used, node.shards, node.last_seen_ns)
            if info is None
            else (info.capacity, info.used, info.shards, now_ns)
        )
        rows.append([
            node.name, node.state, "yes" if info is not None else "no", describe_address(node.address),
            str(capacity), str(used), str(shards), _ago(seen_ns, now_ns),
        ])
    for line in table(["NAME", "STATE", "ALIVE", "ADDRESS", "CAPACITY", "USED", "SHARDS", "LAST SEEN"], rows):
        print(line)
    return 0


def _ago(seen_ns: int, now_ns: int) -> str:
    if seen_ns == 0:
        return "never"
    return f"{max(0, (now_ns - seen_ns) // 1_000_000_000)}s ago"
