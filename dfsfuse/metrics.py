"""What a mount counts, for Prometheus and `dfsfuse stats`: the only
prometheus_client importer.

The metrics are module-level objects in one registry of our own (so that
nothing of the client library's process defaults is mixed in), as the
client library intends: a layer that counts something imports this module
and calls `inc` or `observe` on a child it looked up once, which costs a
lock and an addition. Names are prefixed `dfsfuse_`; docs/operations.md
lists them.

The mount serves them over HTTP when asked to (`serve`, `-o metrics=` or
`[metrics] listen`), and hands them to `dfsfuse stats` over its control
socket (`snapshot`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)

from .config import parse_metrics_listen
from .errors import UserError
from .storage.addresses import format_host_port

REGISTRY = CollectorRegistry(auto_describe=True)

# Seconds: a FUSE request answered from memory takes ~0.1 ms, one that waits
# for a node or PostgreSQL milliseconds, one that stores shards with fsync more.
_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

FUSE_REQUESTS = Counter(
    "dfsfuse_fuse_requests", "FUSE requests answered, by operation", ["operation"], registry=REGISTRY
)
FUSE_ERRORS = Counter(
    "dfsfuse_fuse_errors", "FUSE requests answered with an error, by operation and errno name",
    ["operation", "errno"], registry=REGISTRY,
)
FUSE_SECONDS = Histogram(
    "dfsfuse_fuse_request_seconds", "Time to answer a FUSE request, by operation", ["operation"],
    buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)
READ_BYTES = Counter("dfsfuse_read_bytes", "Bytes applications read", registry=REGISTRY)
WRITTEN_BYTES = Counter("dfsfuse_written_bytes", "Bytes applications wrote", registry=REGISTRY)
SHARD_CACHE = Counter(
    "dfsfuse_shard_cache_lookups", "Shard cache lookups, by result (hit or miss)", ["result"], registry=REGISTRY
)
SHARD_CACHE_HITS = SHARD_CACHE.labels("hit")
SHARD_CACHE_MISSES = SHARD_CACHE.labels("miss")
WRITE_BUFFER_BYTES = Gauge(
    "dfsfuse_write_buffer_bytes", "Bytes written but not yet stored on the nodes", registry=REGISTRY
)
FLUSH_QUEUE = Gauge(
    "dfsfuse_flush_queue", "Shard buffers being stored or waiting for the flusher", registry=REGISTRY
)
NODE_REQUEST_SECONDS = Histogram(
    "dfsfuse_node_request_seconds", "Time of a replica put or read on a node store, by node and operation",
    ["node", "operation"], buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)
NODE_BYTES = Counter(
    "dfsfuse_node_bytes", "Replica bytes sent to (put) or received from (read) node stores",
    ["node", "operation"], registry=REGISTRY,
)
NODE_ERRORS = Counter(
    "dfsfuse_node_errors", "Failed replica puts and reads, by node and kind (unavailable, full, bad replica)",
    ["node", "kind"], registry=REGISTRY,
)
REPAIRED_REPLICAS = Counter(
    "dfsfuse_repaired_replicas", "Replicas rewritten from a verified copy (repair, scrub, reads)", registry=REGISTRY
)
UNDER_REPLICATED_WRITES = Counter(
    "dfsfuse_under_replicated_writes", "Shards stored with fewer replicas than wanted", registry=REGISTRY
)


def watch(gauge: Gauge, read: Callable[[], float]) -> None:
    """Let `gauge` show what `read` returns whenever it is scraped."""
    gauge.set_function(read)


@contextlib.contextmanager
def serve(listen: str | None) -> Iterator[None]:
    """Serve the metrics at http://LISTEN/metrics while the block runs (a
    thread of the client library's; nothing of it runs on the trio loop).
    UserError, in one line, if the address cannot be bound."""
    if listen is None:
        yield
        return
    host, port = parse_metrics_listen(listen)
    try:
        server, thread = start_http_server(port, addr=host, registry=REGISTRY)
    except OSError as error:
        raise UserError(f"cannot serve metrics on {listen}: {error.strerror or error}") from None
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def describe_listen(text: str) -> str:
    """The metrics URL for a log line."""
    host, port = parse_metrics_listen(text)
    return f"http://{format_host_port(host, port)}/metrics"


def snapshot() -> dict[str, float]:
    """Every sample now, as 'name{label="value",...}' -> value (histograms as
    their _count and _sum): what `dfsfuse stats` turns into rates."""
    samples: dict[str, float] = {}
    for family in REGISTRY.collect():
        for sample in family.samples:
            if sample.name.endswith(("_bucket", "_created")):
                continue
            labels = ",".join(f'{key}="{value}"' for key, value in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples
