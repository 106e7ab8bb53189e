"""The node server wire protocol: frames and messages, encoded and decoded.

Pure functions and data, no I/O: the node server (dfsfuse.node.server) and
its client (dfsfuse.storage.remote) do the reading and writing, and feed the
bytes they receive to a FrameDecoder. docs/protocol.md describes the same
format for people; the two must agree.

Every frame is a 16-byte header followed by its payload:

    magic b"DFSP" | version u8 | type u8 | flags u16 | request id u32 | payload length u32

All integers are little-endian. Every size is bounded (see the MAX_
constants) and checked while decoding, before anything is buffered, so a
peer can make us hold at most one header and MAX_PAYLOAD bytes per
connection. Anything that is not a valid frame raises ProtocolError, and
nothing else: a decoder fed random bytes either waits for more or raises it.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import hmac
import secrets
import struct
from collections.abc import Iterator, Sequence
from typing import ClassVar, NamedTuple

from dfsfuse.errors import DfsError, NoSpace, ShardMissing, StoreUnavailable
from dfsfuse.storage.base import Buffer

MAGIC = b"DFSP"
VERSION = 1
HEADER = struct.Struct("<4sBBHII")  # magic, version, type, flags, request id, payload length
HEADER_SIZE = HEADER.size

MAX_PAYLOAD = 1 << 20  # bytes in one frame's payload
CHUNK_SIZE = MAX_PAYLOAD  # most bytes of a shard body in one PUT_DATA or DATA frame
MAX_PUT_BYTES = 1 << 30  # longest replica a PUT may carry
MAX_RANGES = 1024  # byte ranges in one GET
MAX_LIST_PAGE = 65536  # shard ids in one LIST reply
MAX_SYNC_IDS = 65536  # shard ids in one SYNC request
MAX_TEXT = 1024  # bytes of UTF-8 in a name, device or error message
MAX_REQUEST_ID = 2**32 - 1

MIN_SHARD_ID = 1  # 0 is never handed out
MAX_SHARD_ID = 2**64 - 1
MAX_OFFSET = 2**63 - 1  # the largest file offset (off_t)
TO_END = 2**64 - 1  # a range length meaning "to the end of the replica" (NodeStore's -1)

NONCE_SIZE = 32
PROOF_SIZE = 32  # HMAC-SHA256

FLAG_SYNC = 0x0001  # PUT: fsync the replica before replying

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_RANGE = struct.Struct("<QQ")
_STATS = struct.Struct("<QQQQ")
_GET_HEAD = struct.Struct("<QH")
_LIST = struct.Struct("<QI")


class ProtocolError(ValueError):
    """Bytes or values that are not a valid frame of this protocol.

    `request_id` is the id of the offending frame when its header could be
    read (so an error reply can name it), else 0.
    """

    def __init__(self, message: str, request_id: int = 0):
        super().__init__(message)
        self.request_id = request_id


class MessageType(enum.IntEnum):
    # handshake
    HELLO = 0x01
    CHALLENGE = 0x02
    AUTH = 0x03
    WELCOME = 0x04
    # requests
    PUT = 0x10
    PUT_DATA = 0x11
    PUT_END = 0x12
    GET = 0x13
    DELETE = 0x14
    HAS = 0x15
    LIST = 0x16
    STAT = 0x17
    SYNC = 0x18
    # responses
    OK = 0x80
    DATA = 0x81
    RANGE_END = 0x82
    PRESENCE = 0x83
    LISTING = 0x84
    STATS = 0x85
    ERROR = 0x8F


class ErrorCode(enum.IntEnum):
    SHARD_MISSING = 1  # no replica of the shard here (ShardMissing)
    NO_SPACE = 2  # the store is full (NoSpace)
    STORE_UNAVAILABLE = 3  # the store failed (StoreUnavailable)
    BAD_REQUEST = 4  # not a valid request; the server closes the connection
    AUTH_REQUIRED = 5  # a request before the handshake; the server closes the connection
    AUTH_FAILED = 6  # the client's proof is wrong (wrong secret); the server closes the connection
    INTERNAL = 7  # a bug in the server; the request failed, the connection stays


# -- messages ------------------------------------------------------------------


class Message:
    """One frame's content. Subclasses are frozen dataclasses that validate
    their fields on construction, so an invalid message cannot be encoded."""

    TYPE: ClassVar[MessageType]

    def flags(self) -> int:
        return 0

    def payload(self) -> bytes:
        return b""

    @classmethod
    def decode(cls, flags: int, payload: bytes) -> Message:
        _expect_flags(flags, 0)
        _expect_length(payload, 0)
        return cls()


@dataclasses.dataclass(frozen=True)
class _Nonce(Message):
    nonce: bytes

    def __post_init__(self) -> None:
        _check_bytes("nonce", self.nonce, NONCE_SIZE)

    def payload(self) -> bytes:
        return self.nonce

    @classmethod
    def decode(cls, flags: int, payload: bytes) -> Message:
        _expect_flags(flags, 0)
        _expect_length(payload, NONCE_SIZE)
        return cls(payload)


class Hello(_Nonce):
    """Client -> server, first: the client's nonce."""

    TYPE = MessageType.HELLO


class Challenge(_Nonce):
    """Server -> client: the server's nonce."""

    TYPE = MessageType.CHALLENGE


@dataclasses.dataclass(frozen=True)
class Auth(Message):
    """Client -> server: client_proof(secret, client nonce, server nonce)."""

    TYPE = MessageType.AUTH
    proof: bytes

    def __post_init__(self) -> None:
        _check_bytes("proof", self.proof, PROOF_SIZE)

    def payload(self) -> bytes:
        return self.proof

    @classmethod
    def decode(cls, flags: int, payload: bytes) -> Message:
        _expect_flags(flags, 0)
        _expect_length(payload, PROOF_SIZE)
        return cls(payload)


@dataclasses.dataclass(frozen=True)
class Welcome(Message):
    """Server -> client, only after a correct Auth: server_proof(...) and the
    name of the node store the server holds."""

    TYPE = MessageType.WELCOME
    proof: bytes
    name: str

    def __post_init__(self) -> None:
        _check_bytes("proof", self.proof, PROOF_SIZE)
        _check_text("name", self.name)

    def payload(self) -> bytes:
        return self.proof + _encode_text(self.name)

    @classmethod
    def decode(cls, flags: int, payload: bytes) -> Message:
        _expect_flags(flags, 0)
        _expect_at_least(payload, PROOF_SIZE)
        name, end = _decode_text(payload, PROOF_SIZE, strict=True)
        _expect_length(payload, end)
        return cls(payload[:PROOF_SIZE], name)


@dataclasses.dataclass(frozen=True)
class _ShardRequest(Message):
    shard_id: int

    def __post_init__(self) -> None:
        _check_shard_id(self.shard_id)

    def payload(self) -> bytes:
        return _U64.pack(self.shard_id)

    @classmethod
    def decode(cls, flags: int, payload: bytes) -> Message:
        _expect_flags(flags, 0)
        _expect_length(payload, _U64.size)
        return cls(_U64.unpack(payload)[0])


@dataclasses.dataclass(frozen=True)
class Put(Message):
    """Starts a replica upload: PUT_DATA frames with the body follow, then
    PUT_END, all with this request's id. The server answers once, after PUT_END."""

    TYPE = MessageType.PUT
    shard_id: int
    sync: bool

    def __post_init__(self) -> None:
        _check_shard_id(self.shard_id)

    def flags(self) -> int:
        return FLAG_SYNC if self.sync else 0

    def payload(self) -> bytes:
        return _U64.pack(self.shard_id)

    @classmethod
    def decode(cls, flags: int, payload: bytes) -> Message:
        _expect_flags(flags, FLAG_SYNC)
        _expect_length(payload, _U64.size)
        return cls(_U64.unpack(payload)[0], bool(flags & FLAG_SYNC))


@dataclasses.dataclass(frozen=True)
class _Chunk(Message):
    data: bytes

    def __post_init__(self) -> None:
        if not 1 <= len(self.data) <= CHUNK_SIZE:
            raise ProtocolError(f"a body chunk holds 1 to {CHUNK_SIZE} bytes, not {len(self.data)}")

    def payload(self) -> bytes:
        return self.data

    @classmethod
    def decode(cls, flags: int, payload: bytes) -> Message:
        _expect_flags(flags, 0)
        return cls(payload)


class PutData(_Chunk):
    """Client -> server: the next bytes of the replica being put."""

    TYPE = MessageType.PUT_DATA


@dataclasses.dataclass(frozen=True)
class PutEnd(Message):
    """Client -> server: the body is complete; `length` is its total size,
    which the server checks before the replica becomes visible."""

    TYPE = MessageType.PUT_END
    length: int

    def __post_init__(self) -> None:
        if not 0 <= self.length <= MAX_PUT_BYTES:
            raise ProtocolError(f"a replica holds at most {MAX_PUT_BYTES} bytes, not {self.length}")

    def payload(self) -> bytes:
        return _U64.pack(self.length)

    @classmethod
    def decode(cls, flags: int, payload: bytes) -> Message:
        _expect_flags(flags, 0)
        _expect_length(payload, _U64.size)
        return cls(_U64.unpack(payload)[0])


@dataclasses.dataclass(frozen=True)
class Get(Message):
    """Byte ranges (offset, length) of a replica; length TO_END means to its end.

    The answer is, for each range in order, DATA frames with its bytes and a
    RANGE_END frame with their count, then OK; or ERROR at any point.
    """

    TYPE = MessageType.GET
    shard_id: int
    ranges: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "ranges", tuple((offset, length) for offset, length in self.ranges))
        _check_shard_id(self.shard_id)
        if len(self.ranges) > MAX_RANGES:
            raise ProtocolError(f"a GET holds at most {MAX_RANGES} ranges, not {len(self.ranges)}")
        for offset, length in self.ranges:
            if not 0 <= offset <= MAX_OFFSET or not (0 <= length <= MAX_OFFSET or length == TO_END):
                raise ProtocolError(f"invalid range ({offset}, {length})")

    def payload(self) -> bytes:
        head = _GET_HEAD.pack(self.shard_id, len(self.ranges))
        return head + b"".join(_RANGE.pack(offset, length) for offset, length in self.ranges)

    @classmethod
    def decode(cls, flags: int, payload: bytes) -> Message:
        _expect_flags(flags, 0)
        _expect_at_least(payload, _GET_HEAD.size)
        shard_id, count = _GET_HEAD.unpack_from(payload)
        if count > MAX_RANGES:
            raise ProtocolError(f"a GET holds at most {MAX_RANGES} ranges, not {count}")
        _expect_length(payload, _GET_HEAD.size + count * _RANGE.size)
        ranges = tuple(_RANGE.iter_unpack(payload[_GET_HEAD.size :]))
        return cls(shard_id, ranges)


class Delete(_ShardRequest):
    TYPE = MessageType.DELETE


class Has(_ShardRequest):
    """Answered by PRESENCE."""

    TYPE = MessageType.HAS


@dataclasses.dataclass(frozen=True)
class List(Message):
    """Shard ids held that are > after, ascending, at most `limit`; answered by LISTING."""

    TYPE = MessageType.LIST
    after: int
    limit: int

    def __post_init__(self) -> None:
        if not 0 <= self.after <= MAX_SHARD_ID:
            raise ProtocolError(f"invalid list start {self.after}")
        if not 0 <= self.limit <= MAX_LIST_PAGE:
            raise ProtocolError(f"a list page holds at most {MAX_LIST_PAGE} ids, not {self.limit}")

    def payload(self) -> bytes:
        return _LIST.pack(self.after, self.limit)

    @classmethod
    def decode(cls, flags: int, payload: bytes) -> Message:
        _expect_flags(flags, 0)
        _expect_length(payload, _LIST.size)
        return cls(*_LIST.unpack(payload))


@dataclasses.dataclass(frozen=True)
class Stat(Message):
    """Answered by STATS."""

    TYPE = MessageType.STAT


@dataclasses.dataclass(frozen=True)
class _ShardIds(Message):
    shard_ids: tuple[int, ...]
    LIMIT: ClassVar[int]

    def __post_init__(self) -> None:
        object.__setattr__(self, "shard_ids", tuple(self.shard_ids))
        if len(self.shard_ids) > self.LIMIT:
            raise ProtocolError(f"at most {self.LIMIT} shard ids, not {len(self.shard_ids)}")
        for shard_id in self.shard_ids:
            _check_shard_id(shard_id)

    def payload(self) -> bytes:
        return _U32.pack(len(self.shard_ids)) + struct.pack(f"<{len(self.shard_ids)}Q", *self.shard_ids)

    @classmethod
    def decode(cls, flags: int, payload: bytes) -> Message:
        _expect_flags(flags, 0)
        _expect_at_least(payload, _U32.size)
        (count,) = _U32.unpack_from(payload)
        if count > cls.LIMIT:
            raise ProtocolError(f"at most {cls.LIMIT} shard ids, not {count}")
        _expect_length(payload, _U32.size + count * _U64.size)
        return cls(struct.unpack_from(f"<{count}Q", payload, _U32.size))


class Sync(_ShardIds):
    """Make these replicas durable (absent ones are skipped); answered by OK."""

    TYPE = MessageType.SYNC
    LIMIT = MAX_SYNC_IDS


@dataclasses.dataclass(frozen=True)
class Ok(Message):
    """Success of PUT, DELETE and SYNC; the last frame of a GET's answer."""

    TYPE = MessageType.OK


class Data(_Chunk):
    """Server -> client: the next bytes of the current GET range."""

    TYPE = MessageType.DATA


@dataclasses.dataclass(frozen=True)
class RangeEnd(Message):
    """Server -> client: the current GET range is complete after `length` bytes."""

    TYPE = MessageType.RANGE_END
    length: int

    def __post_init__(self) -> None:
        if not 0 <= self.length <= MAX_PUT_BYTES:
            raise ProtocolError(f"a range holds at most {MAX_PUT_BYTES} bytes, not {self.length}")

    def payload(self) -> bytes:
        return _U64.pack(self.length)

    @classmethod
    def decode(cls, flags: int, payload: bytes) -> Message:
        _expect_flags(flags, 0)
        _expect_length(payload, _U64.size)
        return cls(_U64.unpack(payload)[0])


@dataclasses.dataclass(frozen=True)
class Presence(Message):
    """The answer to HAS."""

    TYPE = MessageType.PRESENCE
    present: bool

    def payload(self) -> bytes:
        return _U8.pack(1 if self.present else 0)

    @classmethod
    def decode(cls, flags: int, payload: bytes) -> Message:
        _expect_flags(flags, 0)
        _expect_length(payload, _U8.size)
        if payload[0] > 1:
            raise ProtocolError(f"presence must be 0 or 1, not {payload[0]}")
        return cls(payload[0] == 1)


class Listing(_ShardIds):
    """The answer to LIST."""

    TYPE = MessageType.LISTING
    LIMIT = MAX_LIST_PAGE


@dataclasses.dataclass(frozen=True)
class Stats(Message):
    """The answer to STAT (the fields of StoreStat)."""

    TYPE = MessageType.STATS
    capacity: int
    free: int
    used: int
    shards: int
    device: str

    def __post_init__(self) -> None:
        for field in (self.capacity, self.free, self.used, self.shards):
            if not 0 <= field <= 2**64 - 1:
                raise ProtocolError(f"store statistic {field} out of range")
        _check_text("device", self.device)

    def payload(self) -> bytes:
        return _STATS.pack(self.capacity, self.free, self.used, self.shards) + _encode_text(self.device)

    @classmethod
    def decode(cls, flags: int, payload: bytes) -> Message:
        _expect_flags(flags, 0)
        _expect_at_least(payload, _STATS.size)
        capacity, free, used, shards = _STATS.unpack_from(payload)
        device, end = _decode_text(payload, _STATS.size, strict=True)
        _expect_length(payload, end)
        return cls(capacity, free, used, shards, device)


@dataclasses.dataclass(frozen=True)
class Error(Message):
    """The request failed; `message` says why, for logs and people."""

    TYPE = MessageType.ERROR
    code: ErrorCode
    message: str

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "code", ErrorCode(self.code))
        except ValueError:
            raise ProtocolError(f"unknown error code {self.code}") from None
        object.__setattr__(self, "message", _truncate_text(self.message))

    def payload(self) -> bytes:
        return _U16.pack(self.code) + _encode_text(self.message)

    @classmethod
    def decode(cls, flags: int, payload: bytes) -> Message:
        _expect_flags(flags, 0)
        _expect_at_least(payload, _U16.size)
        (code,) = _U16.unpack_from(payload)
        message, end = _decode_text(payload, _U16.size, strict=False)
        _expect_length(payload, end)
        return cls(code, message)


_MESSAGES: dict[int, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Hello, Challenge, Auth, Welcome,
        Put, PutData, PutEnd, Get, Delete, Has, List, Stat, Sync,
        Ok, Data, RangeEnd, Presence, Listing, Stats, Error,
    )
}


# -- frames ---------------------------------------------------------------------


class Frame(NamedTuple):
    request_id: int
    message: Message


def encode_frame(request_id: int, message: Message) -> bytes:
    """The bytes of one frame: header and payload."""
    if not 0 <= request_id <= MAX_REQUEST_ID:
        raise ProtocolError(f"request id {request_id} out of range")
    payload = message.payload()
    return HEADER.pack(MAGIC, VERSION, message.TYPE, message.flags(), request_id, len(payload)) + payload


class FrameDecoder:
    """Turns received bytes into frames, one at a time.

    `feed` the bytes as they arrive and call `next_frame` until it returns
    None (it needs more bytes) before feeding more: then the buffer never holds
    more than one frame plus one receive. The header is checked as soon as its
    16 bytes are in, so an oversized or foreign frame is refused before its
    payload is waited for.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._header: tuple[int, int, int, int] | None = None  # type, flags, request id, length

    def feed(self, data: bytes | bytearray) -> None:
        self._buffer += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned in a frame; non-zero while a frame is partly in."""
        return len(self._buffer) + (HEADER_SIZE if self._header is not None else 0)

    def next_frame(self) -> Frame | None:
        if self._header is None:
            if len(self._buffer) < HEADER_SIZE:
                return None
            self._header = decode_header(bytes(self._buffer[:HEADER_SIZE]))
            del self._buffer[:HEADER_SIZE]
        message_type, flags, request_id, length = self._header
        if len(self._buffer) < length:
            return None
        payload = bytes(self._buffer[:length])
        del self._buffer[:length]
        self._header = None
        try:
            message = _MESSAGES[message_type].decode(flags, payload)
        except ProtocolError as error:
            raise ProtocolError(f"{MessageType(message_type).name}: {error}", request_id) from None
        return Frame(request_id, message)


def decode_header(header: bytes) -> tuple[int, int, int, int]:
    """(type, flags, request id, payload length) of a frame header, checked."""
    magic, version, message_type, flags, request_id, length = HEADER.unpack(header)
    if magic != MAGIC:
        raise ProtocolError(f"not a dfsfuse frame (magic {magic!r})")
    if version != VERSION:
        raise ProtocolError(f"unsupported protocol version {version} (this side speaks {VERSION})", request_id)
    if message_type not in _MESSAGES:
        raise ProtocolError(f"unknown message type {message_type:#04x}", request_id)
    if length > MAX_PAYLOAD:
        raise ProtocolError(f"frame payload of {length} bytes exceeds {MAX_PAYLOAD}", request_id)
    return message_type, flags, request_id, length


def split_body(parts: Sequence[Buffer], chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """The bytes of `parts`, concatenated, as chunks of exactly `chunk_size`
    bytes (the last may be shorter); small parts are joined, large ones sliced."""
    pending = bytearray()
    for part in parts:
        view = memoryview(part).cast("B")
        while view:
            if not pending and len(view) >= chunk_size:
                yield bytes(view[:chunk_size])
                view = view[chunk_size:]
                continue
            take = chunk_size - len(pending)
            pending += view[:take]
            view = view[take:]
            if len(pending) == chunk_size:
                yield bytes(pending)
                pending.clear()
    if pending:
        yield bytes(pending)


# -- authentication -------------------------------------------------------------


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_SIZE)


def client_proof(secret: bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    """What the client sends to show it knows the secret."""
    return _proof(b"dfsfuse/1 client", secret, client_nonce, server_nonce)


def server_proof(secret: bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    """What the server sends back to show it knows the secret too. The role
    label differs from the client's, so neither proof can be reflected as the other."""
    return _proof(b"dfsfuse/1 server", secret, client_nonce, server_nonce)


def proof_matches(expected: bytes, received: bytes) -> bool:
    """Constant-time comparison, so timing reveals nothing about the expected proof."""
    return hmac.compare_digest(expected, received)


def _proof(label: bytes, secret: bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    return hmac.new(secret, label + b"\0" + client_nonce + server_nonce, hashlib.sha256).digest()


# -- errors <-> error replies ------------------------------------------------------------

_CODE_OF_ERROR: tuple[tuple[type[DfsError], ErrorCode], ...] = (
    (ShardMissing, ErrorCode.SHARD_MISSING),
    (NoSpace, ErrorCode.NO_SPACE),
    (StoreUnavailable, ErrorCode.STORE_UNAVAILABLE),
)


def error_reply(error: DfsError) -> Error:
    """The ERROR message that reports a store error to the client."""
    for error_type, code in _CODE_OF_ERROR:
        if isinstance(error, error_type):
            return Error(code, str(error))
    return Error(ErrorCode.STORE_UNAVAILABLE, str(error))


def error_from_reply(reply: Error, node: str) -> DfsError:
    """The exception a client raises for an ERROR reply from `node`."""
    message = f"node {node}: {reply.message}"
    if reply.code == ErrorCode.SHARD_MISSING:
        return ShardMissing(message)
    if reply.code == ErrorCode.NO_SPACE:
        return NoSpace(message)
    return StoreUnavailable(f"{message} ({reply.code.name.lower().replace('_', ' ')})")


# -- field helpers ------------------------------------------------------------------


def _check_shard_id(shard_id: int) -> None:
    if not MIN_SHARD_ID <= shard_id <= MAX_SHARD_ID:
        raise ProtocolError(f"shard id {shard_id} out of range {MIN_SHARD_ID}..{MAX_SHARD_ID}")


def _check_bytes(what: str, value: bytes, size: int) -> None:
    if len(value) != size:
        raise ProtocolError(f"{what} must be {size} bytes, not {len(value)}")


def _check_text(what: str, text: str) -> None:
    if len(text.encode("utf-8", "replace")) > MAX_TEXT:
        raise ProtocolError(f"{what} longer than {MAX_TEXT} bytes")


def _truncate_text(text: str) -> str:
    encoded = text.encode("utf-8", "replace")
    return text if len(encoded) <= MAX_TEXT else encoded[:MAX_TEXT].decode("utf-8", "ignore")


def _encode_text(text: str) -> bytes:
    encoded = text.encode("utf-8", "replace")
    return _U16.pack(len(encoded)) + encoded


def _decode_text(payload: bytes, offset: int, strict: bool) -> tuple[str, int]:
    """A u16-length-prefixed UTF-8 string at `offset`: (text, offset after it)."""
    if len(payload) < offset + _U16.size:
        raise ProtocolError("truncated text field")
    (length,) = _U16.unpack_from(payload, offset)
    start = offset + _U16.size
    if length > MAX_TEXT:
        raise ProtocolError(f"text field of {length} bytes exceeds {MAX_TEXT}")
    if len(payload) < start + length:
        raise ProtocolError("truncated text field")
    raw = payload[start : start + length]
    try:
        text = raw.decode("utf-8", "strict" if strict else "replace")
    except UnicodeDecodeError:
        raise ProtocolError("text field is not UTF-8") from None
    return text, start + length


def _expect_flags(flags: int, allowed: int) -> None:
    if flags & ~allowed:
        raise ProtocolError(f"unknown flags {flags:#06x}")


def _expect_length(payload: bytes, length: int) -> None:
    if len(payload) != length:
        raise ProtocolError(f"payload of {len(payload)} bytes, expected {length}")


def _expect_at_least(payload: bytes, length: int) -> None:
    if len(payload) < length:
        raise ProtocolError(f"payload of {len(payload)} bytes, expected at least {length}")
