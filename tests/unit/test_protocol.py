"""The node server wire format: exact layout, round trips, bounds, and a
decoder that meets garbage with ProtocolError and nothing else."""

from __future__ import annotations

import random
import struct

import pytest

from dfsfuse.errors import NoSpace, ShardMissing, StoreUnavailable
from dfsfuse.storage import protocol as p

EXAMPLES = [
    p.Hello(bytes(range(32))),
    p.Challenge(b"\xff" * 32),
    p.Auth(b"\x01" * 32),
    p.Welcome(b"\x02" * 32, "node-1 ✓"),
    p.Put(1, sync=False),
    p.Put(p.MAX_SHARD_ID, sync=True),
    p.PutData(b"x"),
    p.PutData(bytes(p.CHUNK_SIZE)),
    p.PutEnd(0),
    p.PutEnd(p.MAX_PUT_BYTES),
    p.Get(7, ()),
    p.Get(7, ((0, p.TO_END), (p.MAX_OFFSET, 0), (10, p.MAX_OFFSET))),
    p.Get(2**40, tuple((i, i) for i in range(p.MAX_RANGES))),
    p.Delete(3),
    p.Has(2**63 + 5),
    p.List(0, 0),
    p.List(p.MAX_SHARD_ID, p.MAX_LIST_PAGE),
    p.Stat(),
    p.Sync(()),
    p.Sync(tuple(range(1, p.MAX_SYNC_IDS + 1))),
    p.Ok(),
    p.Data(b"\0" * 1000),
    p.RangeEnd(12345),
    p.Presence(True),
    p.Presence(False),
    p.Listing((1, 2, p.MAX_SHARD_ID)),
    p.Stats(2**64 - 1, 0, 3, 4, "65024"),
    p.Error(p.ErrorCode.SHARD_MISSING, "no replica of shard 0000000000000007"),
    p.Error(p.ErrorCode.INTERNAL, "é" * 2000),  # truncated to MAX_TEXT bytes
]


def decode_all(data: bytes, split: list[int] | None = None) -> list[p.Frame]:
    """Feed `data` (in pieces ending at the offsets in `split`) and collect every frame."""
    decoder = p.FrameDecoder()
    frames = []
    start = 0
    for end in [*(split or []), len(data)]:
        decoder.feed(data[start:end])
        start = end
        while (frame := decoder.next_frame()) is not None:
            frames.append(frame)
    assert decoder.buffered == 0
    return frames


def test_frame_layout_is_exactly_as_documented():
    frame = p.encode_frame(7, p.Put(0x0102, sync=True))
    assert frame == (
        b"DFSP"  # magic
        + bytes([1])  # version
        + bytes([0x10])  # type PUT
        + (1).to_bytes(2, "little")  # flags: sync
        + (7).to_bytes(4, "little")  # request id
        + (8).to_bytes(4, "little")  # payload length
        + (0x0102).to_bytes(8, "little")  # shard id
    )
    assert p.HEADER_SIZE == 16
    get = p.encode_frame(1, p.Get(5, ((10, 20), (0, p.TO_END))))
    assert get[16:] == struct.pack("<QHQQQQ", 5, 2, 10, 20, 0, 2**64 - 1)


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(message):
    assert decode_all(p.encode_frame(42, message)) == [p.Frame(42, message)]


def test_error_messages_are_truncated_to_the_text_limit():
    error = p.Error(p.ErrorCode.INTERNAL, "é" * 2000)
    assert len(error.message.encode()) <= p.MAX_TEXT
    assert error.message == "é" * (p.MAX_TEXT // 2)


def test_pipelined_frames_fed_in_any_pieces():
    data = b"".join(p.encode_frame(i, message) for i, message in enumerate(EXAMPLES))
    expected = [p.Frame(i, message) for i, message in enumerate(EXAMPLES)]
    rng = random.Random(1)
    for _ in range(5):
        cuts = sorted(rng.sample(range(1, len(data)), 200))
        assert decode_all(data, cuts) == expected
    small = b"".join(p.encode_frame(i, m) for i, m in enumerate(EXAMPLES) if len(m.payload()) < 100)
    assert len(decode_all(small, list(range(1, len(small))))) == sum(len(m.payload()) < 100 for m in EXAMPLES)


def test_a_frame_counts_as_begun_from_its_first_byte():
    frame = p.encode_frame(3, p.Has(9))
    decoder = p.FrameDecoder()
    for size in range(1, len(frame)):
        decoder.feed(frame[size - 1 : size])
        assert decoder.next_frame() is None and decoder.buffered == size
    decoder.feed(frame[-1:])
    assert decoder.next_frame() == p.Frame(3, p.Has(9)) and decoder.buffered == 0


def header(message_type: int, length: int, *, flags: int = 0, request_id: int = 9, magic=b"DFSP", version=1) -> bytes:
    return p.HEADER.pack(magic, version, message_type, flags, request_id, length)


def raises_protocol_error(data: bytes) -> p.ProtocolError:
    decoder = p.FrameDecoder()
    decoder.feed(data)
    with pytest.raises(p.ProtocolError) as caught:
        while decoder.next_frame() is not None:
            pass
    return caught.value


def test_oversized_frame_is_refused_from_its_header_alone():
    error = raises_protocol_error(header(p.MessageType.PUT_DATA, p.MAX_PAYLOAD + 1))
    assert "exceeds" in str(error) and error.request_id == 9
    raises_protocol_error(header(p.MessageType.PUT_DATA, 2**32 - 1))


@pytest.mark.parametrize(
    "data, words",
    [
        (header(p.MessageType.OK, 0, magic=b"HTTP"), "magic"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "magic"),
        (header(p.MessageType.OK, 0, version=2), "version 2"),
        (header(0x7E, 0), "unknown message type"),
        (header(p.MessageType.OK, 0, flags=1), "flags"),
        (header(p.MessageType.PUT, 8, flags=2) + bytes(8), "flags"),
        (header(p.MessageType.HAS, 8) + bytes(8), "shard id 0"),
        (header(p.MessageType.HAS, 7) + bytes(7), "expected 8"),
        (header(p.MessageType.HAS, 9) + bytes(9), "expected 8"),
        (header(p.MessageType.OK, 1) + b"x", "expected 0"),
        (header(p.MessageType.PUT_DATA, 0), "1 to"),
        (header(p.MessageType.PUT_END, 8) + struct.pack("<Q", p.MAX_PUT_BYTES + 1), "at most"),
        (header(p.MessageType.GET, 10) + struct.pack("<QH", 1, p.MAX_RANGES + 1), "ranges"),
        (header(p.MessageType.GET, 10 + 16) + struct.pack("<QHQQ", 1, 2, 0, 5), "expected"),
        (header(p.MessageType.GET, 10 + 16) + struct.pack("<QHQQ", 1, 1, 2**63, 5), "invalid range"),
        (header(p.MessageType.GET, 10 + 16) + struct.pack("<QHQQ", 1, 1, 0, 2**63), "invalid range"),
        (header(p.MessageType.LIST, 12) + struct.pack("<QI", 0, p.MAX_LIST_PAGE + 1), "at most"),
        (header(p.MessageType.SYNC, 4) + struct.pack("<I", p.MAX_SYNC_IDS + 1), "at most"),
        (header(p.MessageType.SYNC, 12) + struct.pack("<IQ", 2, 1), "expected"),
        (header(p.MessageType.LISTING, 12) + struct.pack("<IQ", 1, 0), "shard id 0"),
        (header(p.MessageType.PRESENCE, 1) + b"\x02", "0 or 1"),
        (header(p.MessageType.ERROR, 4) + struct.pack("<HH", 99, 0), "error code"),
        (header(p.MessageType.ERROR, 5) + struct.pack("<HH", 1, 5) + b"x", "truncated"),
        (header(p.MessageType.WELCOME, 35) + bytes(32) + struct.pack("<H", 1) + b"\xff", "UTF-8"),
        (header(p.MessageType.STATS, 34) + bytes(32) + struct.pack("<H", p.MAX_TEXT + 1), "exceeds"),
        (header(p.MessageType.HELLO, 31) + bytes(31), "expected 32"),
    ],
)
def test_invalid_frames_are_refused(data, words):
    error = raises_protocol_error(data)
    assert words in str(error)


def test_invalid_values_cannot_be_encoded():
    for make in (
        lambda: p.Has(0),
        lambda: p.Has(2**64),
        lambda: p.Put(-1, sync=False),
        lambda: p.Get(1, tuple((0, 1) for _ in range(p.MAX_RANGES + 1))),
        lambda: p.Get(1, ((-1, 5),)),
        lambda: p.List(-1, 10),
        lambda: p.List(0, p.MAX_LIST_PAGE + 1),
        lambda: p.Sync(tuple(range(1, p.MAX_SYNC_IDS + 2))),
        lambda: p.Sync((0,)),
        lambda: p.PutData(b""),
        lambda: p.PutData(bytes(p.CHUNK_SIZE + 1)),
        lambda: p.PutEnd(p.MAX_PUT_BYTES + 1),
        lambda: p.Hello(b"short"),
        lambda: p.Welcome(bytes(32), "n" * (p.MAX_TEXT + 1)),
        lambda: p.Error(99, "x"),
        lambda: p.encode_frame(2**32, p.Ok()),
    ):
        with pytest.raises(p.ProtocolError):
            make()
    assert issubclass(p.ProtocolError, ValueError)  # what NodeStore callers expect for bad arguments


def test_fuzzed_input_raises_only_protocol_errors():
    """Random bytes, valid headers with random payloads, and mutated,
    truncated or extended valid frames, fed in random pieces."""
    rng = random.Random(20240611)
    valid = [p.encode_frame(rng.randrange(2**32), m) for m in EXAMPLES if len(m.payload()) < 4096]
    types = list(p.MessageType)
    outcomes = {"frames": 0, "errors": 0, "waiting": 0}
    for round_number in range(4000):
        kind = round_number % 4
        if kind == 0:
            data = rng.randbytes(rng.randrange(1, 200))
        elif kind == 1:
            payload = rng.randbytes(rng.choice([0, 1, 8, 10, 12, 26, 32, 34, 40, rng.randrange(100)]))
            flags = rng.choice([0, 0, 1, rng.randrange(2**16)])
            data = header(rng.choice(types), len(payload), flags=flags) + payload
        elif kind == 2:
            data = bytearray(rng.choice(valid))
            for _ in range(rng.randrange(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            data = bytes(data)
        else:
            data = rng.choice(valid)
            if rng.random() < 0.5:
                data = data[: rng.randrange(len(data))]
            else:
                data += rng.randbytes(rng.randrange(1, 40))
        decoder = p.FrameDecoder()
        try:
            position = 0
            while position < len(data):
                step = rng.randrange(1, 64)
                decoder.feed(data[position : position + step])
                position += step
                while (frame := decoder.next_frame()) is not None:
                    assert isinstance(frame.message, p.Message)
                    outcomes["frames"] += 1
            outcomes["waiting"] += 1
        except p.ProtocolError:
            outcomes["errors"] += 1
        assert decoder.buffered <= p.HEADER_SIZE + p.MAX_PAYLOAD + 64
    assert all(outcomes.values()), outcomes


def test_split_body_makes_full_chunks_from_any_parts():
    data = bytes(range(256)) * 100
    parts = [data[:10], b"", memoryview(data)[10:5000], bytearray(data[5000:5001]), data[5001:]]
    chunks = list(p.split_body(parts, chunk_size=4096))
    assert b"".join(chunks) == data
    assert [len(c) for c in chunks] == [4096] * 6 + [len(data) - 6 * 4096]
    assert list(p.split_body([], 4096)) == []
    assert list(p.split_body([b"", b""], 4096)) == []
    assert list(p.split_body([bytes(8192)], 4096)) == [bytes(4096)] * 2


def test_handshake_proofs():
    client_nonce, server_nonce = p.new_nonce(), p.new_nonce()
    assert client_nonce != server_nonce and len(client_nonce) == p.NONCE_SIZE
    proof = p.client_proof(b"secret", client_nonce, server_nonce)
    assert len(proof) == p.PROOF_SIZE
    assert p.proof_matches(proof, p.client_proof(b"secret", client_nonce, server_nonce))
    different = [
        p.server_proof(b"secret", client_nonce, server_nonce),  # the other role: no reflection
        p.client_proof(b"secreT", client_nonce, server_nonce),
        p.client_proof(b"secret", server_nonce, client_nonce),
        p.client_proof(b"secret", p.new_nonce(), server_nonce),
    ]
    assert not any(p.proof_matches(proof, other) for other in different)


def test_store_errors_cross_the_wire_as_their_own_kind():
    for error in (ShardMissing("gone"), NoSpace("full"), StoreUnavailable("disk failed")):
        reply = p.error_reply(error)
        [(_, decoded)] = decode_all(p.encode_frame(1, reply))
        back = p.error_from_reply(decoded, "n1")
        assert type(back) is type(error) and str(error) in str(back) and "n1" in str(back)
    for code in (p.ErrorCode.BAD_REQUEST, p.ErrorCode.AUTH_FAILED, p.ErrorCode.INTERNAL):
        assert type(p.error_from_reply(p.Error(code, "why"), "n1")) is StoreUnavailable
