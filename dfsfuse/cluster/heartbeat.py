"""Which nodes answer now: probing every node store, and recording each
answer (capacity, usage, when) in the node registry (the heartbeat the
mount's NodeSet runs)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import trio

from dfsfuse.errors import DfsError, NotFound
from dfsfuse.metadata.base import MetadataStore
from dfsfuse.storage.base import NodeStore, StoreStat

log = logging.getLogger("dfsfuse.heartbeat")

PROBE_TIMEOUT = 10.0  # seconds a node has to answer a probe


async def probe(stores: Sequence[NodeStore]) -> dict[str, StoreStat | None]:
    """Every store's stat(), in parallel; None for a store that did not answer."""
    answers: dict[str, StoreStat | None] = {}

    async def ask(store: NodeStore) -> None:
        answers[store.name] = None
        with trio.move_on_after(PROBE_TIMEOUT):
            try:
                answers[store.name] = await store.stat()
            except DfsError as error:
                log.warning("node %s does not answer: %s", store.name, error)

    async with trio.open_nursery() as nursery:
        for store in stores:
            nursery.start_soon(ask, store)
    return answers


async def record_probe(meta: MetadataStore, stores: Sequence[NodeStore]) -> dict[str, StoreStat | None]:
    """Probe every store and record the answers in the registry."""
    answers = await probe(stores)
    seen_ns = time.time_ns()
    for name, info in answers.items():
        if info is not None:
            try:
                await meta.record_node_stat(name, info.capacity, info.used, info.shards, seen_ns)
            except NotFound:
                pass  # removed from the registry meanwhile

    return answers

