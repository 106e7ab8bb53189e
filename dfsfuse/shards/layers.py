"""The arithmetic of one shard index's layers: a whole shard and patches on top.

A shard index is stored as objects (metadata/base.py ShardLayers): at most
one whole shard, holding the bytes [0, length), then patches, oldest first,
each holding whole pages one after another. A later object's pages win;
bytes no object holds read as zeros. These functions answer, without any
I/O, which object holds which page and what the merged bytes are.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from dfsfuse.layout import PAGE_SIZE
from dfsfuse.metadata.base import ShardLayers, ShardRef

# Where one page of an index comes from: (the patch, the page's slot in it).
PageSource = tuple[ShardRef, int]


def reach(ref: ShardRef) -> int:
    """The offset in its shard index just past the last byte an object holds."""
    return (ref.pages[-1] + 1) * PAGE_SIZE if ref.is_patch else ref.length


def stored_length(layers: ShardLayers) -> int:
    """How far the stored objects of an index reach (0: none)."""
    return max((reach(ref) for ref in layers), default=0)


def base_of(layers: ShardLayers) -> ShardRef | None:
    """The whole shard under the patches, if there is one."""
    return layers[0] if layers and not layers[0].is_patch else None


def patch_count(layers: ShardLayers) -> int:
    return sum(1 for ref in layers if ref.is_patch)


def page_sources(layers: ShardLayers) -> dict[int, PageSource]:
    """page -> its source, for the newest patch holding each page; pages
    absent come from the whole shard (or are zeros)."""
    sources: dict[int, PageSource] = {}
    for ref in layers:
        for slot, page in enumerate(ref.pages):
            sources[page] = (ref, slot)
    return sources


def source_runs(
    start: int, stop: int, sources: Mapping[int, PageSource]
) -> Iterator[tuple[int, int, PageSource | None]]:
    """Split [start, stop) into maximal runs that one read can serve; yields
    (run start, run stop, source of its first page): pages all from the whole
    shard (source None), or from one patch at consecutive slots."""
    position = start
    while position < stop:
        first = position // PAGE_SIZE
        source = sources.get(first)
        end = min(stop, (first + 1) * PAGE_SIZE)
        while end < stop and _continues(source, sources.get(end // PAGE_SIZE), end // PAGE_SIZE - first):
            end = min(stop, end + PAGE_SIZE)
        yield position, end, source
        position = end


def _continues(first: PageSource | None, source: PageSource | None, distance: int) -> bool:
    if first is None or source is None:
        return first is source
    return source[0] is first[0] and source[1] == first[1] + distance


def merge(layers: ShardLayers, contents: Sequence[bytes]) -> bytes:
    """The bytes of the index: `contents[i]` is the whole of `layers[i]`."""
    if len(layers) == 1 and not layers[0].is_patch:
        return contents[0]
    merged = bytearray(stored_length(layers))
    for ref, data in zip(layers, contents):
        if not ref.is_patch:
            merged[: ref.length] = data
            continue
        for slot, page in enumerate(ref.pages):
            merged[page * PAGE_SIZE : (page + 1) * PAGE_SIZE] = data[slot * PAGE_SIZE : (slot + 1) * PAGE_SIZE]
    return bytes(merged)
