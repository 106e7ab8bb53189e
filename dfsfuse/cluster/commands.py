"""The cluster commands on the command line: `dfsfuse node add|drain|remove|list`,
`dfsfuse rebalance`, `dfsfuse repair`, `dfsfuse scrub`.

While the file system is mounted, the mount is the only writer of the
metadata, so the commands ask it over its control socket and show what it
reports. Otherwise they take the data dir's lock and run the operation
themselves. `node list` only reads, like status.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import trio

from dfsfuse.cluster import control
from dfsfuse.cluster.heartbeat import probe
from dfsfuse.cluster.nodeset import NodeSet
from dfsfuse.cluster.operations import OPERATIONS, Cluster
from dfsfuse.cluster.registry import describe_address, local_address, parse_address
from dfsfuse.config import Config
from dfsfuse.datadir import DataDirLock, mountpoint_of, require_file_system
from dfsfuse.errors import UserError
from dfsfuse.runtime import open_components


class TerminalOutput:
    """Lines on stdout; progress as a bar redrawn in place on stderr, if it is a terminal."""

    WIDTH = 30

    def __init__(self, stream: TextIO = sys.stderr):
        self._stream = stream
        self._visible = stream.isatty()

    def line(self, text: str) -> None:
        print(text, flush=True)

    def progress(self, done: int, total: int, what: str) -> None:
        if not self._visible or total <= 0:
            return
        filled = self.WIDTH * done // total
        self._stream.write(f"\r[{'#' * filled}{'.' * (self.WIDTH - filled)}] {done}/{total} {what}")
        if done >= total:
            self._stream.write("\n")
        self._stream.flush()


def run_operation(config: Config, operation: str, **arguments: Any) -> int:
    """Run a cluster operation in the mount if one runs, else here."""
    require_file_system(config)
    output = TerminalOutput()
    client = control.connect(config.control_socket_path)
    if client is not None:
        return control.request(client, operation, arguments, output.line, output.progress)
    lock = DataDirLock(config.lock_path)
    where = mountpoint_of(config)
    lock.acquire(f"it is mounted{' at ' + where if where else ''} but its control socket does not answer")

    async def main() -> int:
        async with open_components(config, cached=False) as parts:
            nodes = NodeSet(parts.meta, config, parts.replicator, parts.stores)
            await nodes.refresh()
            cluster = Cluster(parts.meta, parts.replicator, nodes, config)
            try:
                return await OPERATIONS[operation](cluster, output, **arguments)
            finally:
                await nodes.close()
                await parts.meta.sync()

    try:
        return trio.run(main)
    finally:
        lock.release()


def node_address(where: str) -> str:
    """A node address from what a person typed: a directory, or HOST:PORT."""
    if where.startswith(("/", ".", "~")) or os.path.isdir(where):
        return local_address(os.path.expanduser(where))
    parse_address(where)
    return where


def node_add(config: Config, where: str, name: str | None) -> int:
    address = node_address(where)
    if name is None:
        if not address.startswith("local:"):
            raise UserError(f"node add {where}: --name NAME is required for a node server (the name it serves)")
        name = Path(describe_address(address)).name
    return run_operation(config, "node add", address=address, name=name)


def node_list(config: Config) -> int:
    """One line per node: state, alive, address, capacity, used, shards, last seen."""
    require_file_system(config)

    async def listing() -> list[list[str]]:
        async with open_components(config, cached=False) as parts:
            answers = await probe(parts.stores)
        now_ns = time.time_ns()
        rows = []
        for node in parts.nodes:
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
        return rows

    rows = trio.run(listing)
    header = ["NAME", "STATE", "ALIVE", "ADDRESS", "CAPACITY", "USED", "SHARDS", "LAST SEEN"]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def _ago(seen_ns: int, now_ns: int) -> str:
    if seen_ns == 0:
        return "never"
    return f"{max(0, (now_ns - seen_ns) // 1_000_000_000)}s ago"
