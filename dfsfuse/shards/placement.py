"""Where a shard's replicas go: rendezvous (highest random weight) hashing.

Every store gets a pseudo-random weight per shard; the shard's replicas go to
the stores with the highest weights. The order depends only on the shard id
and the set of store names, so every client computes the same placement with
no shared table, and adding or removing one of n stores moves only the shards
whose top-ranked stores change: about 1/n of them per replica.
"""

from __future__ import annotations

from collections.abc import Sequence

from dfsfuse.shards.checksum import placement_weight


def place(shard_id: int, store_names: Sequence[str]) -> list[str]:
    """All of `store_names`, best first, for `shard_id`.

    The first R names are the replica set; the rest are fallbacks, in the
    order to try them when a store of the replica set cannot take the shard.
    Ties (vanishingly rare) are broken by name so the order stays stable.
    """
    return sorted(store_names, key=lambda name: (-placement_weight(shard_id, name), name))
