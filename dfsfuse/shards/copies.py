"""What the replicated and the erasure-coded paths share: an object's copies
(replicas, or fragments in slots) as repair finds them, and the helpers for
node-store requests both make."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import trio

from dfsfuse import metrics
from dfsfuse.errors import DataError, DfsError, NoSpace
from dfsfuse.metadata.base import ShardRef

_T = TypeVar("_T")

# Checksumming less than this runs on the trio thread: xxh3 does a megabyte in
# well under a millisecond, less than handing it to a worker thread costs.
_HASH_IN_THREAD_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class RepairResult:
    """What repair() found and did for one object."""

    shard_id: int
    good: int  # replicas (fragments) that verified
    missing: int  # listed stores that held none
    corrupt: int  # copies that were short or did not verify
    unreachable: int  # listed stores that could not be read (or are not configured)
    repaired: int  # copies rewritten from good ones, in place or relocated
    # Where the object is afterwards: the stores holding a verified replica,
    # or for an erasure-coded object its slots ('' where a fragment is on no node).
    nodes: tuple[str, ...]
    needed: int = 1  # good copies that give the object back: 1 replica, or k fragments

    @property
    def unrecoverable(self) -> bool:
        """Too few copies verified to give the object back, so nothing could be repaired."""
        return self.good < self.needed


def is_erasure_coded(ref: ShardRef) -> bool:
    return ref.encoding is not None and ref.encoding.erasure_coded


def needed_copies(ref: ShardRef) -> int:
    """How many good copies give the object back: k fragments, or one replica."""
    return ref.encoding.data_fragments if ref.encoding is not None and ref.encoding.erasure_coded else 1


def listed_nodes(nodes: Sequence[str]) -> list[str]:
    """The distinct nodes of a ref's `nodes` (an empty slot is no node)."""
    return [node for node in dict.fromkeys(nodes) if node]


def write_failure(
    shard_id: int, stored: int, wanted: int, needed: int, what: str, failures: list[DfsError]
) -> DfsError:
    """The error of a write that stored fewer than the `needed` copies:
    NoSpace if every failure was NoSpace, else DataError."""
    message = (
        f"shard {shard_id}: could store only {stored} of {wanted} {what} ({needed} needed): "
        + ("; ".join(str(failure) for failure in failures) or "too few writable nodes")
    )
    if failures and all(isinstance(failure, NoSpace) for failure in failures):
        return NoSpace(message)
    return DataError(message)


async def hash_work(nbytes: int, function: Callable[..., _T], *args: object) -> _T:
    """Run checksum (or coding) work on the trio thread if small, else in a worker thread."""
    if nbytes < _HASH_IN_THREAD_BYTES:
        return function(*args)
    return await trio.to_thread.run_sync(function, *args)


@contextlib.contextmanager
def timed(node: str, operation: str) -> Iterator[None]:
    """Time one request to a node store for the metrics, failed ones too."""
    started = time.perf_counter()
    try:
        yield
    finally:
        metrics.NODE_REQUEST_SECONDS.labels(node, operation).observe(time.perf_counter() - started)
