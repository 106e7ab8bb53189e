"""`dfsfuse status`: the node stores, usage, shards short of replicas, the
directory quotas and the mounts, as tables for a person or as JSON for
scripts (`--json`).

It reads the metadata and lists each node store, so it works whether or not
the file system is mounted (SQLite in WAL mode lets it read beside a mount).
The sessions are the mounts using the file system, wherever they run.
Usage shows the file sizes (logical), the bytes the shards hold (stored,
one copy), their payloads after compression and encryption (one copy), and
what the node stores hold in all (every replica and fragment).
A shard counts as under-replicated when fewer of the stores its metadata
names hold a replica than its file's replica count (user.dfs.replicas, else
R); checksums are `dfsfuse scrub`'s and `dfsfuse fsck`'s job. A node's
metadata snapshots (dfsfuse.cluster.snapshots) are counted apart from its shards.
The trash's files (dfsfuse/metadata/trash.py) are counted in the totals and
shown apart too: the space that emptying the trash would free.
"""

from __future__ import annotations

import json
import time
from typing import Any

import trio

from .cluster.heartbeat import probe
from .cluster.inventory import ReplicaTargets, live_shards, present_copies, replica_ids
from .cluster.quotas import describe
from .cluster.registry import describe_address
from .cluster.snapshots import is_snapshot_id
from .config import Config
from .datadir import mount_state, require_file_system
from .errors import DfsError
from .quota import quota_rows
from .report import size, table


def status(config: Config, as_json: bool = False) -> int:
    require_file_system(config)
    report = trio.run(gather, config)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print("\n".join(render(report)))
    return 0


async def gather(config: Config) -> dict[str, Any]:
    """Everything status shows, in exact numbers (the JSON of --json, docs/operations.md)."""
    from .runtime import open_components

    report: dict[str, Any] = {"data_dir": str(config.data_dir), "mount": mount_state(config)}
    async with open_components(config, cached=False, beside_mounts=True) as parts:
        answers = await probe(parts.stores)
        held: dict[str, set[int]] = {}
        nodes = []
        for node, store in zip(parts.nodes, parts.stores):
            row: dict[str, Any] = {"name": node.name, "address": describe_address(node.address), "state": node.state,
                                   "alive": False, "capacity": None, "used": None, "free": None, "shards": None,
                                   "metadata_snapshots": None, "error": None}
            nodes.append(row)
            info = answers[store.name]
            if info is None:
                row["error"] = "no answer"
                continue
            try:
                held[store.name] = await replica_ids(store)
            except DfsError as error:
                row["error"] = str(error)
                continue
            snapshots = sum(1 for shard_id in held[store.name] if is_snapshot_id(shard_id))
            row.update(alive=True, capacity=info.capacity, used=info.used, free=info.free,
                       shards=info.shards - snapshots, metadata_snapshots=snapshots)
        usage = await parts.meta.usage()
        in_trash = await parts.meta.trash_entries()
        under = 0
        targets = ReplicaTargets(parts.meta, config.replicas)
        async for record in live_shards(parts.meta):
            if present_copies(record, held) < await targets.of_record(record):
                under += 1
        now_ns = time.time_ns()
        sessions = [
            {"id": session.id, "host": session.host, "pid": session.pid, "mountpoint": session.mountpoint,
             "started_ns": session.started_ns, "heartbeat_age": round(max(0, now_ns - session.heartbeat_ns) / 1e9, 1)}
            for session in await parts.meta.list_sessions()
        ]
        quotas = [await describe(parts.meta, quota) for quota in await parts.meta.quotas()]
    report.update(
        nodes=nodes, inodes=usage.inodes, logical_bytes=usage.logical_bytes, stored_bytes=usage.stored_bytes,
        payload_bytes=usage.payload_bytes, node_bytes=sum(node["used"] or 0 for node in nodes),
        replicas=config.replicas, shards=usage.shards, under_replicated=under, quotas=quotas, sessions=sessions,
        trash={"files": len(in_trash), "logical_bytes": sum(entry.size for entry in in_trash),
               "stored_bytes": sum(entry.stored_bytes for entry in in_trash)},
    )
    return report


def _ratio(report: dict[str, Any]) -> str:
    """Bytes on the nodes per logical byte, when there are logical bytes."""
    if not report["logical_bytes"]:
        return ""
    return f"; {report['node_bytes'] / report['logical_bytes']:.2f} bytes per logical byte"


def render(report: dict[str, Any]) -> list[str]:
    """The report as a person reads it: tables of nodes and sessions, and the totals."""
    lines = [f"data dir {report['data_dir']}: {report['mount']}", ""]
    rows = []
    for node in report["nodes"]:
        known = node["alive"]
        rows.append([
            node["name"], node["state"], "yes" if known else "no", node["address"],
            *(size(node[key]) if known else "-" for key in ("capacity", "used", "free")),
            *(str(node[key]) if known else "-" for key in ("shards", "metadata_snapshots")),
        ])
    lines += table(["NODE", "STATE", "ALIVE", "ADDRESS", "CAPACITY", "USED", "FREE", "SHARDS", "SNAPSHOTS"], rows)
    lines += [f"  {node['name']}: unreachable: {node['error']}" for node in report["nodes"] if node["error"]]
    lines += [
        "",
        f"files: {report['inodes']} inodes, {size(report['logical_bytes'])} logical,"
        f" {size(report['stored_bytes'])} stored, {report['shards']} shards",
        f"stored: {size(report['payload_bytes'])} after compression and encryption (one copy),"
        f" {size(report['node_bytes'])} on the nodes (x{report['replicas']} replicas, erasure coding, snapshots)"
        + _ratio(report),
        f"trash: {report['trash']['files']} files, {size(report['trash']['logical_bytes'])} logical,"
        f" {size(report['trash']['stored_bytes'])} stored (dfsfuse trash list MOUNTPOINT)",
        f"replication: {report['under_replicated']} under-replicated shards"
        + (" (dfsfuse repair makes the missing replicas)" if report["under_replicated"] else ""),
        "",
    ]
    if report["quotas"]:
        lines += [*table(*quota_rows(report["quotas"])), ""]
    else:
        lines += ["quotas: none", ""]
    if not report["sessions"]:
        return [*lines, "sessions: none (not mounted anywhere)"]
    session_rows = [
        [str(s["id"]), s["host"], str(s["pid"]), s["mountpoint"],
         time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["started_ns"] / 1e9)), f"{s['heartbeat_age']:.0f} s ago"]
        for s in report["sessions"]
    ]
    return lines + table(["SESSION", "HOST", "PID", "MOUNT POINT", "SINCE", "HEARTBEAT"], session_rows)
