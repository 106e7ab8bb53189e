"""The mount's live view of the node registry.

Every few seconds the NodeSet re-reads the registry, opens the stores of
nodes added since (`dfsfuse node add`), closes those of nodes removed, probes
every store (the heartbeat: what each answers is recorded in the registry),
and tells the replicator where new replicas may go: the active nodes that
answered. So a mount follows node changes without a remount.
"""

from __future__ import annotations

import logging

import trio

from dfsfuse.cluster.heartbeat import record_probe
from dfsfuse.cluster.registry import (
    NodeAccess,
    UnreachableStore,
    open_store_or_stand_in,
)
from dfsfuse.metadata.base import NODE_ACTIVE, MetadataStore
from dfsfuse.shards.replicator import Replicator
from dfsfuse.storage.base import NodeStore

log = logging.getLogger("dfsfuse.nodes")

REFRESH_INTERVAL = 5.0  # seconds between two refreshes


class NodeSet:
    def __init__(self, meta: MetadataStore, access: NodeAccess, replicator: Replicator, stores: list[NodeStore]):
        """`stores`: the stores open_components opened for the registry's nodes;
        the NodeSet closes those it drops (the rest are closed by their opener)."""
        self._meta = meta
        self._access = access
        self._replicator = replicator
        self._stores = {store.name: store for store in stores}
        self._opened: list[NodeStore] = []  # stores the NodeSet opened itself

    async def refresh(self) -> None:
        """Follow the registry: open, drop and probe stores; update the replicator."""
        nodes = await self._meta.nodes()
        for node in nodes:
            current = self._stores.get(node.name)
            if current is None or isinstance(current, UnreachableStore):
                store = await open_store_or_stand_in(node, self._access)
                if isinstance(store, UnreachableStore) and current is not None:
                    continue
                log.info("node %s at %s %s", node.name, node.address, "joined" if current is None else "opened")
                self._stores[node.name] = store
                self._opened.append(store)
        registered = {node.name for node in nodes}
        for name in [name for name in self._stores if name not in registered]:
            log.info("node %s left the registry", name)
            store = self._stores.pop(name)
            if store in self._opened:
                self._opened.remove(store)
                await store.close()
        answers = await record_probe(self._meta, list(self._stores.values()))
        writable = [
            node.name for node in nodes if node.state == NODE_ACTIVE and answers.get(node.name) is not None
        ]
        self._replicator.update_nodes(list(self._stores.values()), writable)

    async def run(self, interval: float = REFRESH_INTERVAL, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Refresh now, report ready, then every `interval` seconds until cancelled."""
        try:
            await self.refresh()
            task_status.started()
            while True:
                await trio.sleep(interval)
                await self.refresh()
        finally:
            with trio.CancelScope(shield=True):
                await self.close()

    async def close(self) -> None:
        """Close the stores the NodeSet opened itself."""
        while self._opened:
            await self._opened.pop().close()
