"""Reed-Solomon erasure coding of payloads: the only importer of zfec.

A payload of n bytes is cut into k data fragments of L = ceil(n / k) bytes
each (the last one padded with zero bytes), and m parity fragments of L
bytes are computed from them. The code is systematic: fragment i < k *is*
bytes [i * L, (i + 1) * L) of the payload, so a read that gets every data
fragment joins them without any arithmetic, and any k of the k + m
fragments give the payload back.

The parity is zfec's (the Tahoe-LAFS library: Reed-Solomon over GF(2^8)
with the Vandermonde-derived generator matrix zfec 1.x computes, the
matrix its own share files depend on). Parity written by one code can only
be decoded by the same code, so docs/formats.md ties encoding version 1 to
it. zfec was picked over pyeclib/liberasurecode by measurement: see
docs/architecture.md.

Everything here is pure and releases the GIL in zfec's C code, so large
payloads are worked on in worker threads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import zfec

from dfsfuse.storage.base import Buffer

# An object whose payload would give fragments smaller than this is stored
# as m + 1 replicas instead (the same number of losses survived): below a
# checksum block (64 KiB by default) per fragment, k + m files and requests
# per object cost more than the replicas' extra disk.
MIN_FRAGMENT_BYTES = 64 * 1024


def fragment_length(payload_length: int, k: int) -> int:
    """The bytes each of an object's fragments holds (ceil(n / k))."""
    return -(-payload_length // k)


def worth_fragmenting(payload_length: int, k: int) -> bool:
    return fragment_length(payload_length, k) >= MIN_FRAGMENT_BYTES


def split(payload: Buffer, k: int, m: int) -> list[Buffer]:
    """The k + m fragments of `payload`, in order: data fragments first
    (views of `payload` where no padding is needed), then parity."""
    view = memoryview(payload).cast("B")
    size = fragment_length(len(view), k)
    if size == 0:
        raise ValueError("cannot fragment an empty payload")
    data: list[Buffer] = [view[i * size : (i + 1) * size] for i in range(k)]
    for number, fragment in enumerate(data):
        if len(fragment) < size:
            data[number] = bytes(fragment) + bytes(size - len(fragment))
    parity = zfec.Encoder(k, k + m).encode(tuple(data), tuple(range(k, k + m)))
    return [*data, *parity]


def join(fragments: Mapping[int, Buffer], k: int, m: int, payload_length: int) -> bytes:
    """The payload from any k of its fragments (by fragment number).

    The fragments must have been verified: a wrong one gives a wrong payload
    (the caller checks the payload's checksum too)."""
    data = _data_fragments(fragments, k, m)
    return b"".join(data)[:payload_length]


def rebuild(fragments: Mapping[int, Buffer], k: int, m: int, wanted: Sequence[int]) -> dict[int, Buffer]:
    """The fragments numbered `wanted`, made from any k of the others."""
    data = _data_fragments(fragments, k, m)
    parity = [number for number in wanted if number >= k]
    made = dict(zip(parity, zfec.Encoder(k, k + m).encode(tuple(data), tuple(parity)))) if parity else {}
    return {number: data[number] if number < k else made[number] for number in wanted}


def _data_fragments(fragments: Mapping[int, Buffer], k: int, m: int) -> list[Buffer]:
    """The k data fragments, decoded from parity only where one is missing."""
    if not all(0 <= number < k + m for number in fragments):
        raise ValueError(f"fragment numbers {sorted(fragments)} outside 0..{k + m - 1}")
    if all(number in fragments for number in range(k)):
        return [fragments[number] for number in range(k)]
    if len(fragments) < k:
        raise ValueError(f"{len(fragments)} fragments cannot give the payload: {k} are needed")
    numbers = sorted(fragments)[:k]
    return list(zfec.Decoder(k, k + m).decode(tuple(fragments[n] for n in numbers), tuple(numbers)))
