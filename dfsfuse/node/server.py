"""The node server: a LocalStore served over TCP to clients that know the secret.

One task per connection. A connection first proves it knows the cluster
secret (the handshake in dfsfuse.storage.protocol, after TLS when
configured); until then no request is served. Then requests are pipelined:

- the *reader* takes frames in order and queues each request; at most
  MAX_IN_FLIGHT wait, after which it stops reading and TCP pushes back on the
  client. A PUT's body is received by the reader itself, straight into a
  spool file, so at most one chunk of it is ever in memory, and the PUT is
  queued once its body is complete.
- the *executor* runs the queued requests one after another, in the order
  they came, and sends each one's reply frames (a GET is read from disk a
  chunk at a time, as fast as the client takes it). So requests on one
  connection take effect in order; a client wanting parallelism opens more
  connections.

Anything malformed ends the connection with an error reply; every read and
write runs under a timeout; nothing a client sends can take down the server or
another connection. On stop() the server stops accepting and reading, lets the
requests already received finish within a grace period, and cancels the rest;
a PUT whose body was not complete never reaches the store.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import ssl
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, NamedTuple

import trio

from dfsfuse.errors import DfsError, UserError
from dfsfuse.storage import protocol as p
from dfsfuse.storage.addresses import format_host_port
from dfsfuse.storage.local import LocalStore, Spool

log = logging.getLogger("dfsfuse.node")

HANDSHAKE_TIMEOUT = 10.0  # seconds for TLS and authentication together
IDLE_TIMEOUT = 120.0  # an authenticated connection without a request for this long is closed
FRAME_TIMEOUT = 30.0  # a frame, once begun, must arrive whole within this
SEND_TIMEOUT = 30.0  # each frame sent must be taken by the client within this
SHUTDOWN_GRACE = 10.0  # seconds requests in flight get to finish after SIGTERM/SIGINT
MAX_IN_FLIGHT = 16  # requests of one connection read ahead of their responses
MAX_SPOOLS = 2  # put bodies of one connection held in spool files: one waiting, one arriving
MAX_CONNECTIONS = 256  # with their spools, well under the usual limit of 1024 open files
RECEIVE_SIZE = 64 * 1024
CLOSE_TIMEOUT = 1.0  # seconds to say goodbye (TLS close_notify) before just closing

Reply = Callable[[p.Message], Awaitable[None]]
Handler = Callable[[Any, Reply], Awaitable[None]]  # (the request message, reply)


class NodeServer:
    """Serves `store` to clients that know `secret`, over TLS with `ssl_context`."""

    def __init__(self, store: LocalStore, secret: bytes, *, ssl_context: ssl.SSLContext | None = None):
        if not secret:
            raise ValueError("the secret must not be empty")
        self.store = store
        self._secret = secret
        self._ssl_context = ssl_context
        self._connection_slots = trio.CapacityLimiter(MAX_CONNECTIONS)
        self._accepting = trio.CancelScope()
        self._intakes: set[trio.CancelScope] = set()
        self._connections: trio.Nursery | None = None
        self._stopping = False

    async def serve(
        self,
        listeners: list[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept and serve connections on `listeners` until stop(), then let
        the connections finish (see stop) and return. Cancel it to stop at once."""
        async with trio.open_nursery() as connections:
            self._connections = connections
            with self._accepting:
                await trio.serve_listeners(
                    self._serve_connection, listeners, handler_nursery=connections, task_status=task_status
                )
            log.info("stopped accepting; %d connections open", self._connection_slots.borrowed_tokens)
        log.info("every connection is closed")

    def stop(self, grace: float = SHUTDOWN_GRACE) -> None:
        """Stop accepting connections and reading requests; requests already
        received get `grace` seconds to finish, then they are cancelled."""
        self._stopping = True
        self._accepting.cancel()
        for intake in self._intakes:
            intake.cancel()
        if self._connections is not None:
            scope = self._connections.cancel_scope
            scope.deadline = min(scope.deadline, trio.current_time() + grace)

    @contextlib.contextmanager
    def _intake(self) -> Iterator[trio.CancelScope]:
        """The cancel scope of a connection's handshake and request reading,
        which stop() cancels (also when the connection starts after stop())."""
        scope = trio.CancelScope()
        if self._stopping:
            scope.cancel()
        self._intakes.add(scope)
        try:
            with scope:
                yield scope
        finally:
            self._intakes.discard(scope)

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        peer = _peer_name(stream)
        try:
            self._connection_slots.acquire_nowait()
        except trio.WouldBlock:
            log.warning("connection from %s: refused: already %d connections", peer, MAX_CONNECTIONS)
            await trio.aclose_forcefully(stream)
            return
        connection = _Connection(stream, peer, self.store, self._secret, self._ssl_context, self._intake)
        finished = False
        try:
            await connection.run()
            finished = True
        except Exception:  # a bug must not take the other connections down
            log.exception("connection from %s: internal error", peer)
            connection.end("internal error", logging.ERROR)
        finally:
            if not finished:  # cancelled: stop()'s grace period is over, or serve() was cancelled
                connection.end("cut off: the server stopped before its requests were done", logging.WARNING)
            self._connection_slots.release()
            await close_stream(connection.stream)
            connection.log_outcome()


@dataclasses.dataclass
class _Counters:
    started: float
    authenticated: bool = False
    requests: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


class _Queued(NamedTuple):
    """A request waiting for the executor."""

    request_id: int
    handler: Handler
    request: p.Message


async def _send_reply(message: p.Message, reply: Reply) -> None:
    """The handler that answers with a given message (a BAD_REQUEST in its turn)."""
    await reply(message)


class _Closed(Exception):
    """Ends a connection; the reason is logged as its outcome."""

    def __init__(self, reason: str, level: int = logging.WARNING):
        super().__init__(reason)
        self.reason = reason
        self.level = level


class _Connection:
    """One client connection, from accept to close."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        peer: str,
        store: LocalStore,
        secret: bytes,
        ssl_context: ssl.SSLContext | None,
        intake: Callable[[], contextlib.AbstractContextManager[trio.CancelScope]],
    ):
        self.stream = stream
        self.peer = peer
        self.store = store
        self.counters = _Counters(started=trio.current_time())
        self._secret = secret
        self._ssl_context = ssl_context
        self._intake = intake
        self._decoder = p.FrameDecoder()
        self._outcome: tuple[str, int] | None = None
        self._spools: set[_Spool] = set()  # put bodies received, or arriving, not yet stored
        self._spool_slots = trio.Semaphore(MAX_SPOOLS)
        self._handlers: dict[type[p.Message], Handler] = {
            p.Get: self._get,
            p.Delete: self._delete,
            p.Has: self._has,
            p.List: self._list,
            p.Stat: self._stat,
            p.Sync: self._sync,
        }

    def end(self, reason: str, level: int) -> None:
        """Record why the connection ends (the first reason wins; a connection
        that ends without one was closed by the client)."""
        if self._outcome is None:
            self._outcome = (reason, level)

    def log_outcome(self) -> None:
        reason, level = self._outcome or ("closed by the client", logging.INFO)
        counters = self.counters
        log.log(
            level,
            "connection from %s: %s; %s, %d requests, %d bytes in, %d bytes out, %.2f s",
            self.peer,
            reason,
            "authenticated" if counters.authenticated else "not authenticated",
            counters.requests,
            counters.bytes_in,
            counters.bytes_out,
            trio.current_time() - counters.started,
        )

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:  # the executor
                queue_in, queue_out = trio.open_memory_channel[_Queued](MAX_IN_FLIGHT)
                async with queue_in:
                    with self._intake() as intake:
                        try:
                            with trio.move_on_after(HANDSHAKE_TIMEOUT) as handshake:
                                await self._secure()
                                await self._authenticate()
                            if handshake.cancelled_caught:
                                raise _Closed("refused: handshake timed out")
                            nursery.start_soon(self._execute, queue_out, nursery.cancel_scope)
                            await self._read_requests(queue_in)
                        except _Closed as closed:
                            self.end(closed.reason, closed.level)
                        except p.ProtocolError as error:
                            await self._refuse_malformed(error, queue_in)
                        except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
                            self.end(f"connection lost: {_cause(error)}", logging.WARNING)
                            nursery.cancel_scope.cancel()
            if intake.cancelled_caught:  # and every request received was answered
                self.end("closed: the server is shutting down", logging.INFO)
        finally:
            for spool in list(self._spools):
                spool.close()

    async def _refuse_malformed(self, error: p.ProtocolError, queue_in: trio.MemorySendChannel[_Queued]) -> None:
        """Answer a malformed frame with BAD_REQUEST (after the replies to the
        requests before it, when authenticated) and end the connection."""
        reply = p.Error(p.ErrorCode.BAD_REQUEST, str(error))
        if self.counters.authenticated:
            self.end(f"malformed frame: {error}", logging.WARNING)
            await queue_in.send(_Queued(error.request_id, _send_reply, reply))
            return
        self.end(f"refused: malformed frame: {error}", logging.WARNING)
        with trio.move_on_after(SEND_TIMEOUT), contextlib.suppress(
            _Closed, trio.BrokenResourceError, trio.ClosedResourceError
        ):
            await self._send(error.request_id, reply)

    # -- handshake -----------------------------------------------------------------

    async def _secure(self) -> None:
        if self._ssl_context is None:
            return
        self.stream = trio.SSLStream(self.stream, self._ssl_context, server_side=True)
        try:
            await self.stream.do_handshake()
        except trio.BrokenResourceError as error:
            raise _Closed(f"refused: TLS handshake failed: {_cause(error)}") from None

    async def _authenticate(self) -> None:
        hello = await self._receive(IDLE_TIMEOUT)
        if hello is None:
            raise _Closed("refused: closed before authenticating")
        if not isinstance(hello.message, p.Hello):
            await self._send(hello.request_id, p.Error(p.ErrorCode.AUTH_REQUIRED, "authenticate first"))
            raise _Closed(f"refused: {hello.message.TYPE.name} request before authentication")
        server_nonce = p.new_nonce()
        await self._send(hello.request_id, p.Challenge(server_nonce))
        auth = await self._receive(IDLE_TIMEOUT)
        if auth is None:
            raise _Closed("refused: closed during authentication")
        if not isinstance(auth.message, p.Auth):
            await self._send(auth.request_id, p.Error(p.ErrorCode.AUTH_REQUIRED, "authenticate first"))
            raise _Closed(f"refused: {auth.message.TYPE.name} instead of AUTH")
        expected = p.client_proof(self._secret, hello.message.nonce, server_nonce)
        if not p.proof_matches(expected, auth.message.proof):
            await self._send(auth.request_id, p.Error(p.ErrorCode.AUTH_FAILED, "wrong secret"))
            raise _Closed("refused: wrong secret")
        proof = p.server_proof(self._secret, hello.message.nonce, server_nonce)
        await self._send(auth.request_id, p.Welcome(proof, self.store.name))
        self.counters.authenticated = True

    # -- requests ------------------------------------------------------------------

    async def _read_requests(self, queue_in: trio.MemorySendChannel[_Queued]) -> None:
        while (frame := await self._receive(IDLE_TIMEOUT)) is not None:
            request = frame.message
            self.counters.requests += 1
            if isinstance(request, p.Put):
                spool = await self._receive_put(frame.request_id, request)
                await queue_in.send(_Queued(frame.request_id, spool.store_as, request))
                continue
            handler = self._handlers.get(type(request))
            if handler is None:
                raise p.ProtocolError(f"{request.TYPE.name} is not a request", frame.request_id)
            await queue_in.send(_Queued(frame.request_id, handler, request))
        self.end("closed by the client", logging.INFO)

    async def _receive_put(self, request_id: int, put: p.Put) -> _Spool:
        """Receive a PUT's body, up to its PUT_END, into a spool."""
        await self._spool_slots.acquire()
        spool = _Spool(self.store, put.shard_id, self._spool_closed)
        self._spools.add(spool)
        await spool.open()
        while True:
            frame = await self._receive(IDLE_TIMEOUT)
            if frame is None:
                raise _Closed(f"connection closed in the middle of a put of shard {put.shard_id}")
            if frame.request_id != request_id or not isinstance(frame.message, (p.PutData, p.PutEnd)):
                raise p.ProtocolError(
                    f"{frame.message.TYPE.name} in the body of PUT request {request_id}", frame.request_id
                )
            if isinstance(frame.message, p.PutEnd):
                if frame.message.length != spool.size:
                    raise p.ProtocolError(
                        f"PUT_END says {frame.message.length} bytes, the body had {spool.size}", request_id
                    )
                return spool
            if spool.size + len(frame.message.data) > p.MAX_PUT_BYTES:
                raise p.ProtocolError(f"a put body exceeds {p.MAX_PUT_BYTES} bytes", request_id)
            await spool.append(frame.message.data)

    def _spool_closed(self, spool: _Spool) -> None:
        self._spools.discard(spool)
        self._spool_slots.release()

    async def _execute(self, queue_out: trio.MemoryReceiveChannel[_Queued], connection: trio.CancelScope) -> None:
        """Run the queued requests in order, sending each one's replies."""
        try:
            async with queue_out:
                async for queued in queue_out:
                    await self._run(queued)
        except _Closed as closed:
            self.end(closed.reason, closed.level)
            connection.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
            self.end(f"connection lost while sending: {_cause(error)}", logging.WARNING)
            connection.cancel()

    async def _run(self, queued: _Queued) -> None:
        """One request: store errors become ERROR replies, and so does a bug
        (logged), for this request only."""

        async def reply(message: p.Message) -> None:
            await self._send(queued.request_id, message)

        try:
            await queued.handler(queued.request, reply)
        except DfsError as error:
            await reply(p.error_reply(error))
        except (_Closed, trio.BrokenResourceError, trio.ClosedResourceError):
            raise
        except Exception:
            log.exception("connection from %s: request %d (%r) failed", self.peer, queued.request_id, queued.request)
            await reply(p.Error(p.ErrorCode.INTERNAL, "internal error (see the node server's log)"))

    # -- request handlers ------------------------------------------------------------

    async def _get(self, request: p.Get, reply: Reply) -> None:
        """Each range is read and sent a chunk at a time, so memory holds at
        most a chunk per request whatever the ranges ask for."""
        touched = False
        for offset, length in request.ranges:
            wanted = None if length == p.TO_END else length
            sent = 0
            while wanted is None or sent < wanted:
                size = p.CHUNK_SIZE if wanted is None else min(p.CHUNK_SIZE, wanted - sent)
                (data,) = await self.store.read(request.shard_id, [(offset + sent, size)])
                touched = True
                if data:
                    await reply(p.Data(data))
                    sent += len(data)
                if len(data) < size:
                    break
            await reply(p.RangeEnd(sent))
        if not touched:  # no byte asked for: still ShardMissing if the replica is absent
            await self.store.read(request.shard_id, [])
        await reply(p.Ok())

    async def _delete(self, request: p.Delete, reply: Reply) -> None:
        await self.store.delete(request.shard_id)
        await reply(p.Ok())

    async def _has(self, request: p.Has, reply: Reply) -> None:
        await reply(p.Presence(await self.store.exists(request.shard_id)))

    async def _list(self, request: p.List, reply: Reply) -> None:
        await reply(p.Listing(tuple(await self.store.list(request.after, request.limit))))

    async def _stat(self, request: p.Stat, reply: Reply) -> None:
        stat = await self.store.stat()
        await reply(p.Stats(stat.capacity, stat.free, stat.used, stat.shards, stat.device))

    async def _sync(self, request: p.Sync, reply: Reply) -> None:
        await self.store.sync(request.shard_ids)
        await reply(p.Ok())

    # -- frame I/O -------------------------------------------------------------------

    async def _receive(self, idle_timeout: float) -> p.Frame | None:
        """The next frame, or None when the client closed between frames.

        Waiting for a frame to begin is bounded by `idle_timeout`, and a frame
        that has begun must be complete within FRAME_TIMEOUT."""
        frame = self._decoder.next_frame()
        deadline = trio.current_time() + (FRAME_TIMEOUT if self._decoder.buffered else idle_timeout)
        while frame is None:
            with trio.move_on_at(deadline) as waiting:
                data = await self.stream.receive_some(RECEIVE_SIZE)
            if waiting.cancelled_caught:
                if self._decoder.buffered:
                    raise _Closed(f"timed out in the middle of a frame ({FRAME_TIMEOUT:g} s)")
                raise _Closed(f"idle for {idle_timeout:g} s", logging.INFO)
            if not data:
                if self._decoder.buffered:
                    raise _Closed("connection closed in the middle of a frame")
                return None
            if not self._decoder.buffered:
                deadline = trio.current_time() + FRAME_TIMEOUT
            self.counters.bytes_in += len(data)
            self._decoder.feed(data)
            frame = self._decoder.next_frame()
        return frame

    async def _send(self, request_id: int, message: p.Message) -> None:
        data = p.encode_frame(request_id, message)
        with trio.move_on_after(SEND_TIMEOUT) as sending:
            await self.stream.send_all(data)
        if sending.cancelled_caught:
            raise _Closed(f"the client took no data for {SEND_TIMEOUT:g} s")
        self.counters.bytes_out += len(data)


class _Spool:
    """A put's body as it arrives, in a spool of the store (LocalStore.open_spool),
    stored as the replica once complete.

    A failure to take the body (disk full, ...) is kept and reported in the
    reply; the rest of the body is still received, and dropped.
    """

    def __init__(self, store: LocalStore, shard_id: int, on_close: Callable[[_Spool], None]):
        self._store = store
        self._shard_id = shard_id
        self._on_close = on_close
        self._closed = False
        self._file: Spool | None = None
        self.size = 0  # bytes of the body received, kept or not
        self._error: DfsError | None = None

    async def open(self) -> None:
        try:
            self._file = await self._store.open_spool(self._shard_id)
        except DfsError as error:
            self._error = error

    async def append(self, data: bytes) -> None:
        if self._file is not None:
            try:
                await self._file.append(data)
            except DfsError as error:
                self._drop_file()
                self._error = error
        self.size += len(data)

    async def store_as(self, put: p.Put, reply: Reply) -> None:
        """The request handler that stores the complete body as the replica."""
        try:
            if self._error is not None:
                raise self._error
            assert self._file is not None
            await self._file.commit(put.sync)
        finally:
            self.close()
        await reply(p.Ok())

    def close(self) -> None:
        self._drop_file()
        if not self._closed:
            self._closed = True
            self._on_close(self)

    def _drop_file(self) -> None:
        if self._file is not None:
            self._file.abort()
            self._file = None


async def close_stream(stream: trio.abc.Stream) -> None:
    """Close gracefully if the peer lets us within CLOSE_TIMEOUT (over TLS
    that sends close_notify, which tells the peer this is the end and not a
    lost connection), else just close. Shielded: it also closes, and
    returns, in a task being cancelled."""
    with trio.CancelScope(shield=True):
        with trio.move_on_after(CLOSE_TIMEOUT):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.aclose()
        await trio.aclose_forcefully(stream)


def _peer_name(stream: trio.SocketStream) -> str:
    try:
        return format_host_port(*stream.socket.getpeername()[:2])
    except OSError:
        return "an unknown peer"


def _cause(error: BaseException) -> str:
    """The reason inside trio's wrapper exceptions (e.g. the ssl error behind BrokenResourceError)."""
    inner = error.__cause__ or error.__context__
    return str(inner or error) or type(inner or error).__name__


# -- the `dfsfuse node serve` process -----------------------------------------------------


async def run_node_server(
    data_dir: str, name: str, host: str, port: int, secret: bytes, ssl_context: ssl.SSLContext | None
) -> int:
    """Serve the node store in `data_dir` on host:port until SIGTERM or SIGINT.

    Prints "listening on HOST:PORT" (the real port, when `port` is 0) once
    bound. A first signal stops the server gracefully (SHUTDOWN_GRACE), a
    second one at once. Returns the exit status, 0 after a clean stop.
    """
    try:
        store = await LocalStore.open(name, data_dir)
    except (OSError, DfsError) as error:
        raise UserError(f"data dir {data_dir} cannot be used: {error}") from None
    try:
        listeners = await trio.open_tcp_listeners(port, host=host or None)
    except OSError as error:
        raise UserError(f"cannot listen on {format_host_port(host or '*', port)}: {error.strerror or error}") from None
    server = NodeServer(store, secret, ssl_context=ssl_context)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        for listener in listeners:
            address = format_host_port(*listener.socket.getsockname()[:2])
            tls = " (TLS)" if ssl_context else ""
            log.info("node store %r in %s: listening on %s%s", name, store.root, address, tls)
            print(f"listening on {address}", flush=True)
        async with trio.open_nursery() as nursery:

            async def stop_on_signals() -> None:
                grace = SHUTDOWN_GRACE
                async for signum in signals:
                    log.info("%s: stopping (requests in flight get %g s)", signal.Signals(signum).name, grace)
                    server.stop(grace)
                    grace = 0.0

            nursery.start_soon(stop_on_signals)
            await server.serve(listeners)
            nursery.cancel_scope.cancel()
    log.info("node server stopped")
    return 0
