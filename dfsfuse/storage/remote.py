"""A node store on a node server (dfsfuse.node.server), reached over TCP.

Connections: up to `pool_size` authenticated connections to the node, kept
open between calls (one request at a time on each; a connection idle for
CONNECTION_MAX_IDLE is closed before the server's idle timeout would). Every
network step (connect plus handshake, each frame sent, each frame received)
runs under `timeout` seconds.

Failures:
- transient ones (connection refused or lost) are retried on a fresh
  connection, up to `attempts` tries in all, after a jittered exponential
  backoff;
- a timeout is not retried, and marks the node down at once: the node had
  `timeout` seconds to answer, and the caller (the replicator) does better
  to go to another replica than to wait that long again;
- the others (the server refused our secret, failed to prove its own, serves
  another store, or sent something malformed) are not retried;
- after `down_after` failures in a row the node is marked down: calls fail at
  once with StoreUnavailable, except one probe call after `probe_interval`
  seconds (doubling after each failed probe, up to MAX_PROBE_INTERVAL); the
  first call that gets an answer marks it up again.
An error *reply* (no such shard, disk full, the server's disk failed) is an
answer: the node is up, the call raises ShardMissing, NoSpace or
StoreUnavailable and is not retried.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import random
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

import trio

from dfsfuse.errors import StoreUnavailable
from dfsfuse.storage import protocol as p
from dfsfuse.storage.addresses import format_host_port
from dfsfuse.storage.base import Buffer, NodeStore, StoreStat

log = logging.getLogger("dfsfuse.remote")

CONNECTION_MAX_IDLE = 60.0  # seconds; the server closes connections idle for 120
RETRY_BASE_DELAY = 0.05  # seconds before the first retry; doubles with each retry, ±50% jitter
MAX_PROBE_INTERVAL = 60.0
RECEIVE_SIZE = 64 * 1024

_T = TypeVar("_T")
_M = TypeVar("_M", bound=p.Message)
# Error codes after which the server closes the connection.
_CLOSING_ERRORS = {p.ErrorCode.BAD_REQUEST, p.ErrorCode.AUTH_REQUIRED, p.ErrorCode.AUTH_FAILED}


class _Transient(Exception):
    """The node could not be reached or did not answer in time: worth a retry."""


class _Timeout(_Transient):
    """The node did not answer in time: not retried, and the node is marked down."""


class _Failure(Exception):
    """The node answered, but not as a node server with our secret should: not retried."""


class RemoteStore(NodeStore):
    """The node store served by the node server at host:port.

    `name` must be the name of the store the server holds (checked at each
    connection, so two names can never point at the same disk). With
    `ssl_context` the connection uses TLS (e.g.
    `ssl.create_default_context(cafile=CA_FILE)`, which also checks that the
    server's certificate names `host`).
    """

    def __init__(
        self,
        name: str,
        host: str,
        port: int,
        secret: bytes,
        *,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 10.0,
        pool_size: int = 4,
        attempts: int = 3,
        down_after: int = 3,
        probe_interval: float = 2.0,
    ):
        if not secret:
            raise ValueError("the secret must not be empty")
        if pool_size < 1 or attempts < 1 or down_after < 1:
            raise ValueError("pool_size, attempts and down_after must be at least 1")
        self.name = name
        self.host = host
        self.port = port
        self.address = format_host_port(host, port)
        self.last_seen: float | None = None  # time.time() of the node's last answer
        self._secret = secret
        self._ssl_context = ssl_context
        self._timeout = timeout
        self._attempts = attempts
        self._down_after = down_after
        self._probe_interval = probe_interval
        self._pool_slots = trio.Semaphore(pool_size)
        self._idle: list[_Connection] = []
        self._closed = False
        # Down-marking: consecutive failures, and while down, when to probe next.
        self._up = True
        self._failures = 0
        self._last_failure = ""
        self._probe_delay = probe_interval
        self._probe_at = 0.0
        self._probing = False

    @property
    def is_up(self) -> bool:
        """False while the node is marked down (after repeated failures)."""
        return self._up

    # -- NodeStore ---------------------------------------------------------------

    async def put(self, shard_id: int, parts: Sequence[Buffer], sync: bool) -> None:
        views = [memoryview(part).cast("B") for part in parts]
        begin = p.Put(shard_id, sync)
        end = p.PutEnd(sum(len(view) for view in views))

        async def exchange(connection: _Connection) -> p.Ok | p.Error:
            request_id = connection.next_request_id()
            await connection.send(request_id, begin)
            for chunk in p.split_body(views):
                await connection.send(request_id, p.PutData(chunk))
            await connection.send(request_id, end)
            return await connection.receive_reply(request_id, p.Ok)

        await self._call(exchange)

    async def read(self, shard_id: int, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        for offset, length in ranges:
            if offset < 0 or length < -1:
                raise ValueError(f"invalid range ({offset}, {length})")
        wire_ranges = [(offset, p.TO_END if length == -1 else length) for offset, length in ranges]
        results: list[bytes] = []
        for start in range(0, max(len(wire_ranges), 1), p.MAX_RANGES):
            request = p.Get(shard_id, tuple(wire_ranges[start : start + p.MAX_RANGES]))
            results += await self._call(functools.partial(_get, request=request))
        return results

    async def delete(self, shard_id: int) -> None:
        await self._request(p.Delete(shard_id), p.Ok)

    async def exists(self, shard_id: int) -> bool:
        return (await self._request(p.Has(shard_id), p.Presence)).present

    async def list(self, after: int, limit: int) -> list[int]:
        ids: list[int] = []
        after = max(after, 0)  # shard ids start at 1
        while len(ids) < limit and after < p.MAX_SHARD_ID:
            request = p.List(after, min(limit - len(ids), p.MAX_LIST_PAGE))
            page = await self._call(functools.partial(_list_page, request=request))
            ids += page
            if len(page) < request.limit:
                break
            after = page[-1]
        return ids

    async def sync(self, shard_ids: Sequence[int]) -> None:
        for start in range(0, len(shard_ids), p.MAX_SYNC_IDS):
            await self._request(p.Sync(tuple(shard_ids[start : start + p.MAX_SYNC_IDS])), p.Ok)

    async def stat(self) -> StoreStat:
        reply = await self._request(p.Stat(), p.Stats)
        # The server's device id is unique only on its own machine.
        device = f"{self.host}/{reply.device}" if reply.device else ""
        return StoreStat(reply.capacity, reply.free, reply.used, reply.shards, device)

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            await connection.close()

    # -- calls, retries, down-marking ------------------------------------------------

    async def _request(self, message: p.Message, expected: type[_M]) -> _M:
        """A one-frame request and its one-frame reply."""
        return await self._call(functools.partial(_Connection.request, message=message, expected=expected))

    async def _call(self, exchange: Callable[[_Connection], Awaitable[_T | p.Error]]) -> _T:
        """Run `exchange` on a pooled connection, with retries of transient
        failures; an ERROR reply becomes the matching DfsError."""
        probing = self._admit()
        tries = 1 if probing else self._attempts
        failures = 0
        try:
            while True:
                try:
                    async with self._connection() as connection:
                        reply = await exchange(connection)
                        if isinstance(reply, p.Error) and reply.code in _CLOSING_ERRORS:
                            connection.usable = False
                except (_Transient, _Failure) as failure:
                    self._note_failure(failure, probing)
                    failures += 1
                    if isinstance(failure, (_Failure, _Timeout)) or not self._up or failures == tries:
                        raise StoreUnavailable(f"node {self.name} at {self.address}: {failure}") from None
                    log.info("node %s at %s: %s; retrying", self.name, self.address, failure)
                    await trio.sleep(RETRY_BASE_DELAY * 2 ** (failures - 1) * random.uniform(0.5, 1.5))
                    continue
                self._note_answer()
                if isinstance(reply, p.Error):
                    raise p.error_from_reply(reply, f"{self.name} at {self.address}")
                return reply
        finally:
            if probing:
                self._probing = False

    def _admit(self) -> bool:
        """Whether this call may go to the node: raises while it is down,
        except for one probe call at a time once the probe is due (True)."""
        if self._closed:
            raise StoreUnavailable(f"node {self.name} at {self.address}: the store is closed")
        if self._up:
            return False
        if self._probing or trio.current_time() < self._probe_at:
            raise StoreUnavailable(f"node {self.name} at {self.address} is down: {self._last_failure}")
        self._probing = True
        return True

    def _note_answer(self) -> None:
        self.last_seen = time.time()
        self._failures = 0
        if not self._up:
            self._up = True
            self._probe_delay = self._probe_interval
            log.info("node %s at %s is up again", self.name, self.address)

    def _note_failure(self, failure: Exception, probing: bool) -> None:
        self._last_failure = str(failure)
        self._failures += 1
        if self._up and (self._failures >= self._down_after or isinstance(failure, _Timeout)):
            self._up = False
            self._probe_at = trio.current_time() + self._probe_delay
            log.warning(
                "node %s at %s is down after %d failures in a row (%s); probing again in %g s",
                self.name, self.address, self._failures, failure, self._probe_delay,
            )
        elif probing:
            self._probe_delay = min(self._probe_delay * 2, MAX_PROBE_INTERVAL)
            self._probe_at = trio.current_time() + self._probe_delay

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[_Connection]:
        """A pooled connection for one exchange; closed, not pooled, if the
        exchange fails in any way (the stream may be mid-frame)."""
        async with self._pool_slots:
            connection = await self._take_idle()
            if connection is None:
                connection = await _Connection.open(
                    self.host, self.port, self.name, self._secret, self._ssl_context, self._timeout
                )
            try:
                yield connection
            except BaseException:
                await connection.abort()
                raise
            if connection.usable and not self._closed:
                connection.idle_since = trio.current_time()
                self._idle.append(connection)
            else:
                await connection.close()

    async def _take_idle(self) -> _Connection | None:
        while self._idle:
            connection = self._idle.pop()
            if trio.current_time() - connection.idle_since < CONNECTION_MAX_IDLE:
                return connection
            await connection.close()
        return None


class _Connection:
    """One authenticated connection: frames in and out, each under the timeout."""

    def __init__(self, stream: trio.abc.Stream, timeout: float):
        self._stream = stream
        self._timeout = timeout
        self._decoder = p.FrameDecoder()
        self._request_id = 0
        self.usable = True
        self.idle_since = 0.0
        self.store_name = ""  # the name of the server's store, once authenticated

    @classmethod
    async def open(
        cls, host: str, port: int, name: str | None, secret: bytes, ssl_context: ssl.SSLContext | None, timeout: float
    ) -> _Connection:
        """Connect, set up TLS if asked, and run the handshake: prove we know
        the secret, check that the server does too and holds store `name`
        (any store with None; `store_name` tells which)."""
        try:
            with trio.fail_after(timeout):
                stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
                connection = cls(stream, timeout)
                try:
                    if ssl_context is not None:
                        connection._stream = trio.SSLStream(stream, ssl_context, server_hostname=host)
                        await _tls_handshake(connection._stream)
                    await connection._authenticate(secret, name)
                except BaseException:
                    await connection.abort()
                    raise
        except trio.TooSlowError:
            raise _Timeout(f"no connection within {timeout:g} s") from None
        except OSError as error:
            raise _Transient(f"cannot connect: {error.strerror or error}") from None
        return connection

    async def _authenticate(self, secret: bytes, expected_name: str | None) -> None:
        client_nonce = p.new_nonce()
        await self.send(0, p.Hello(client_nonce))
        challenge = await self._handshake_reply(p.Challenge)
        await self.send(0, p.Auth(p.client_proof(secret, client_nonce, challenge.nonce)))
        welcome = await self._handshake_reply(p.Welcome)
        if not p.proof_matches(p.server_proof(secret, client_nonce, challenge.nonce), welcome.proof):
            raise _Failure("the server does not know the cluster secret")
        if expected_name is not None and welcome.name != expected_name:
            raise _Failure(f"the server holds node store {welcome.name!r}, not {expected_name!r}")
        self.store_name = welcome.name

    async def _handshake_reply(self, expected: type[_M]) -> _M:
        reply = await self.receive(0)
        if isinstance(reply, p.Error):
            raise _Failure(f"refused by the server: {reply.message}")
        if not isinstance(reply, expected):
            raise _Failure(f"{reply.TYPE.name} instead of {expected.TYPE.name} in the handshake")
        return reply

    def next_request_id(self) -> int:
        self._request_id = self._request_id % p.MAX_REQUEST_ID + 1
        return self._request_id

    async def request(self, message: p.Message, expected: type[_M]) -> _M | p.Error:
        """Send a one-frame request and receive its one-frame reply."""
        request_id = self.next_request_id()
        await self.send(request_id, message)
        return await self.receive_reply(request_id, expected)

    async def receive_reply(self, request_id: int, expected: type[_M]) -> _M | p.Error:
        reply = await self.receive(request_id)
        if not isinstance(reply, (expected, p.Error)):
            raise _Failure(f"{reply.TYPE.name} instead of {expected.TYPE.name}")
        return reply

    async def send(self, request_id: int, message: p.Message) -> None:
        data = p.encode_frame(request_id, message)
        try:
            with trio.fail_after(self._timeout):
                await self._stream.send_all(data)
        except trio.TooSlowError:
            raise _Timeout(f"sending took more than {self._timeout:g} s") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
            raise _Transient(f"connection lost: {_reason(error)}") from None

    async def receive(self, request_id: int) -> p.Message:
        """The next frame's message, which must belong to `request_id`."""
        try:
            frame = self._decoder.next_frame()
            with trio.fail_after(self._timeout):
                while frame is None:
                    data = await self._stream.receive_some(RECEIVE_SIZE)
                    if not data:
                        raise _Transient("the server closed the connection")
                    self._decoder.feed(data)
                    frame = self._decoder.next_frame()
        except trio.TooSlowError:
            raise _Timeout(f"no reply within {self._timeout:g} s") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
            raise _Transient(f"connection lost: {_reason(error)}") from None
        except p.ProtocolError as error:
            raise _Failure(f"malformed reply: {error}") from None
        if frame.request_id != request_id:
            raise _Failure(f"a reply to request {frame.request_id} while waiting for {request_id}")
        return frame.message

    async def close(self) -> None:
        """Say goodbye (over TLS: close_notify), so the server logs a clean close."""
        self.usable = False
        with trio.move_on_after(self._timeout, shield=True):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self._stream.aclose()
        await trio.aclose_forcefully(self._stream)

    async def abort(self) -> None:
        """Close at once: the stream may be in the middle of a frame."""
        self.usable = False
        await trio.aclose_forcefully(self._stream)


async def node_server_store_name(
    host: str, port: int, secret: bytes, *, ssl_context: ssl.SSLContext | None = None, timeout: float = 10.0
) -> str:
    """The name of the store a node server holds, learnt from its handshake.

    A RemoteStore must be told the name (so two names never reach one disk);
    this is for callers that know only the address, such as `dfsfuse restore`.
    StoreUnavailable if the server cannot be reached or refuses our secret.
    """
    try:
        connection = await _Connection.open(host, port, None, secret, ssl_context, timeout)
    except (_Transient, _Failure) as failure:
        raise StoreUnavailable(f"node at {format_host_port(host, port)}: {failure}") from None
    await connection.close()
    return connection.store_name


async def _get(connection: _Connection, request: p.Get) -> list[bytes] | p.Error:
    """The exchange of a GET: each range's DATA frames up to its RANGE_END,
    then OK; an ERROR may come instead of any of them. The server may send
    fewer bytes than asked for (the end of the replica), never more."""
    request_id = connection.next_request_id()
    await connection.send(request_id, request)
    results = []
    for _, length in request.ranges:
        most = p.MAX_PUT_BYTES if length == p.TO_END else length
        chunks: list[bytes] = []
        received = 0
        while True:
            reply = await connection.receive(request_id)
            if isinstance(reply, p.Error):
                return reply
            if isinstance(reply, p.RangeEnd):
                if reply.length != received:
                    raise _Failure(f"RANGE_END says {reply.length} bytes after {received}")
                break
            if not isinstance(reply, p.Data):
                raise _Failure(f"{reply.TYPE.name} in the reply to a GET")
            received += len(reply.data)
            if received > most:
                raise _Failure(f"more than the {most} bytes asked for")
            chunks.append(reply.data)
        results.append(b"".join(chunks))
    done = await connection.receive_reply(request_id, p.Ok)
    return done if isinstance(done, p.Error) else results


async def _list_page(connection: _Connection, request: p.List) -> list[int] | p.Error:
    reply = await connection.request(request, p.Listing)
    if isinstance(reply, p.Error):
        return reply
    ids = list(reply.shard_ids)
    if len(ids) > request.limit or any(a >= b for a, b in itertools.pairwise([request.after, *ids])):
        raise _Failure("a LIST page that is not ascending, after the start, within the limit")
    return ids


async def _tls_handshake(stream: trio.SSLStream) -> None:
    try:
        await stream.do_handshake()
    except trio.BrokenResourceError as error:
        if isinstance(error.__cause__, ssl.SSLError):
            raise _Failure(f"TLS handshake failed: {error.__cause__}") from None
        raise _Transient(f"connection lost during the TLS handshake: {_reason(error)}") from None


def _reason(error: BaseException) -> str:
    inner = error.__cause__ or error.__context__ or error
    return str(inner) or type(inner).__name__
