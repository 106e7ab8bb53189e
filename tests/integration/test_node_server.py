"""Node servers as a user runs them: `python -m dfsfuse node serve` in a
subprocess on a loopback port it picks at run time, reached through
RemoteStore and through raw sockets that misbehave on purpose.

Every server a test starts is stopped by PID (SIGTERM, then SIGKILL) when the
test ends; the tests that check a clean stop assert the exit status 0.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import re
import select
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
import trio
from dfstest import PYTHON, REPO, command_env, one_line_error, run

from dfsfuse.errors import ShardMissing, StoreUnavailable
from dfsfuse.node.server import NodeServer
from dfsfuse.storage import protocol as p
from dfsfuse.storage.local import LocalStore, replica_name
from dfsfuse.storage.remote import RemoteStore

SECRET = b"integration-test-secret-5f1c2a9e"
START_TIMEOUT = 15.0  # seconds for a server to print "listening on"
STOP_TIMEOUT = 10.0  # seconds for a server to exit after SIGTERM


class NodeServerProcess:
    """One `dfsfuse node serve` process: stdout tells its port, stderr goes to a log file."""

    def __init__(self, base: Path, name: str, secret_file: Path, extra_args: tuple[str, ...], listen: str):
        self.name = name
        self.data = base / name
        self.log_path = base / f"{name}.log"
        self.command = [
            PYTHON, "-m", "dfsfuse", "node", "serve", "--data", str(self.data), "--listen", listen,
            "--secret-file", str(secret_file), "--name", name, *extra_args,
        ]
        self.process: subprocess.Popen | None = None
        self.port = 0

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, cwd=REPO, env=command_env()
            )
        line = self._first_line()
        match = re.fullmatch(r"listening on 127\.0\.0\.1:(\d+)\n", line)
        if not match:
            self.kill()
            raise AssertionError(f"node server {self.name} did not start: {line!r}\n{self.log()}")
        self.port = int(match[1])

    def _first_line(self) -> str:
        assert self.process is not None and self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], START_TIMEOUT)
        return self.process.stdout.readline().decode() if ready else ""

    def store(self, **options) -> RemoteStore:
        return RemoteStore(self.name, "127.0.0.1", self.port, SECRET, **options)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signum)

    def stop(self) -> int:
        """SIGTERM and wait for the exit status (SIGKILL after STOP_TIMEOUT, and fail)."""
        assert self.process is not None
        self.signal(signal.SIGTERM)
        try:
            return self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"node server {self.name} did not stop on SIGTERM\n{self.log()}") from None

    def kill(self) -> None:
        """Make sure the process is gone: continue it if stopped, SIGTERM, then SIGKILL."""
        if self.process is None or self.process.poll() is not None:
            return
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT / 2)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def assert_running(self) -> None:
        assert self.process is not None and self.process.poll() is None, f"{self.name} died\n{self.log()}"


@pytest.fixture
def secret_file(tmp_path) -> Path:
    path = tmp_path / "secret"
    path.write_bytes(SECRET + b"\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def start_server(tmp_path, secret_file):
    """start_server(name, *extra_args, listen=...) -> a running NodeServerProcess."""
    started: list[NodeServerProcess] = []

    def start(name: str = "node-a", *extra_args: str, listen: str = "127.0.0.1:0") -> NodeServerProcess:
        server = NodeServerProcess(tmp_path, name, secret_file, extra_args, listen)
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.kill()


class RawClient:
    """A blocking socket that speaks frames, to send what RemoteStore never would."""

    def __init__(self, port: int, timeout: float = 5.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.decoder = p.FrameDecoder()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_frame(self, request_id: int, message: p.Message) -> None:
        self.send(p.encode_frame(request_id, message))

    def frame(self) -> p.Frame | None:
        """The next frame, or None once the server has closed the connection."""
        while (frame := self.decoder.next_frame()) is None:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                return None
            if not data:
                return None
            self.decoder.feed(data)
        return frame

    def handshake(self, secret: bytes = SECRET) -> p.Message | None:
        client_nonce = p.new_nonce()
        self.send_frame(0, p.Hello(client_nonce))
        challenge = self.frame()
        assert challenge is not None and isinstance(challenge.message, p.Challenge), challenge
        self.send_frame(0, p.Auth(p.client_proof(secret, client_nonce, challenge.message.nonce)))
        reply = self.frame()
        return reply.message if reply else None

    def close(self) -> None:
        self.sock.close()


class TrioFrames:
    """Frames over a trio stream, for the in-process tests (either side of a connection)."""

    def __init__(self, stream: trio.abc.Stream):
        self.stream = stream
        self.decoder = p.FrameDecoder()

    async def send(self, request_id: int, message: p.Message) -> None:
        await self.stream.send_all(p.encode_frame(request_id, message))

    async def receive(self) -> p.Message | None:
        """The next frame's message, or None once the peer has closed."""
        while (frame := self.decoder.next_frame()) is None:
            data = await self.stream.receive_some(65536)
            if not data:
                return None
            self.decoder.feed(data)
        return frame.message

    async def handshake(self, secret: bytes = SECRET) -> p.Message | None:
        client_nonce = p.new_nonce()
        await self.send(0, p.Hello(client_nonce))
        challenge = await self.receive()
        assert isinstance(challenge, p.Challenge), challenge
        await self.send(0, p.Auth(p.client_proof(secret, client_nonce, challenge.nonce)))
        return await self.receive()


def layout_problems(data_dir: Path) -> list[str]:
    """Files in a node's directory outside its layout (STORE, shards/<xx>/<16 hex>,
    packs/<10 digits>.pack|.dead, tmp/)."""
    problems = []
    for path in sorted(data_dir.rglob("*")):
        relative = path.relative_to(data_dir).as_posix()
        if relative in ("STORE", "shards", "tmp", "packs") or re.fullmatch(r"shards/[0-9a-f]{2}", relative):
            continue
        if re.fullmatch(r"packs/[0-9]{10}\.(pack|dead)", relative) and path.is_file():
            continue
        match = re.fullmatch(r"shards/([0-9a-f]{2})/([0-9a-f]{14}([0-9a-f]{2}))", relative)
        if not (match and match[1] == match[3] and path.is_file()):
            problems.append(relative)
    return problems


# -- serving ----------------------------------------------------------------------------


def test_remote_store_put_get_list_through_a_node_server(start_server):
    server = start_server()
    big = os.urandom(3 * p.CHUNK_SIZE + 12345)
    small = {shard_id: os.urandom(shard_id % 5000) for shard_id in range(1, 200, 7)}

    async def main() -> None:
        store = server.store()
        try:
            await store.put(2**63 + 1, [big[:100], memoryview(big)[100:]], sync=True)
            assert await store.read(2**63 + 1, [(0, -1), (p.CHUNK_SIZE - 3, 6), (len(big) - 5, 100)]) == [
                big, big[p.CHUNK_SIZE - 3 : p.CHUNK_SIZE + 3], big[-5:]
            ]

            async def client(shard_ids: list[int]) -> None:
                own = server.store(pool_size=2)  # a client of its own: its own connections
                try:
                    for shard_id in shard_ids:
                        await own.put(shard_id, [small[shard_id]], sync=False)
                        assert await own.read(shard_id, [(0, -1)]) == [small[shard_id]]
                finally:
                    await own.close()

            ids = sorted(small)
            async with trio.open_nursery() as nursery:
                for start in range(8):
                    nursery.start_soon(client, ids[start::8])
            await store.sync(ids)
            assert await store.list(0, 1000) == [*ids, 2**63 + 1]
            assert await store.list(ids[3], 2) == ids[4:6]
            stat = await store.stat()
            assert (stat.shards, stat.used) == (len(ids) + 1, len(big) + sum(map(len, small.values())))
            assert await store.exists(ids[0]) and not await store.exists(2)
            await store.delete(ids[0])
            with pytest.raises(ShardMissing):
                await store.read(ids[0], [(0, -1)])
            assert store.is_up and store.last_seen is not None
        finally:
            await store.close()

    trio.run(main)
    assert (server.data / replica_name(2**63 + 1)).read_bytes() == big  # the local store's own layout
    assert server.stop() == 0
    log = server.log()
    assert log.count("closed by the client; authenticated") == 9, log
    assert "Traceback" not in log


def test_pipelined_requests_are_answered_in_order(start_server):
    server = start_server()
    client = RawClient(server.port)
    try:
        assert isinstance(client.handshake(), p.Welcome)
        body = os.urandom(p.CHUNK_SIZE + 10)
        requests = [
            (1, p.Put(100, sync=True)), (1, p.PutData(body[: p.CHUNK_SIZE])), (1, p.PutData(body[p.CHUNK_SIZE :])),
            (1, p.PutEnd(len(body))),
            (2, p.Has(100)), (3, p.Get(100, ((5, 3), (p.CHUNK_SIZE, p.TO_END)))), (4, p.List(0, 10)),
            (5, p.Get(101, ())), (6, p.Delete(100)), (7, p.Has(100)), (8, p.Stat()),
        ]
        client.send(b"".join(p.encode_frame(request_id, message) for request_id, message in requests))
        replies = [client.frame() for _ in range(12)]
    finally:
        client.close()
    assert [frame.request_id for frame in replies] == [1, 2, 3, 3, 3, 3, 3, 4, 5, 6, 7, 8]
    assert [frame.message for frame in replies[:8]] == [
        p.Ok(),
        p.Presence(True),
        p.Data(body[5:8]), p.RangeEnd(3), p.Data(body[p.CHUNK_SIZE :]), p.RangeEnd(10), p.Ok(),
        p.Listing((100,)),
    ]
    assert isinstance(replies[8].message, p.Error) and replies[8].message.code == p.ErrorCode.SHARD_MISSING
    assert [frame.message for frame in replies[9:11]] == [p.Ok(), p.Presence(False)]  # in order: after the GET
    assert isinstance(replies[11].message, p.Stats)
    assert server.stop() == 0


# -- authentication -----------------------------------------------------------------------


def test_wrong_or_missing_secret_is_refused_and_logged(start_server):
    server = start_server()

    async def main() -> None:
        good = server.store()
        intruder = RemoteStore(server.name, "127.0.0.1", server.port, b"not the secret")
        try:
            await good.put(1, [b"kept"], sync=False)
            with pytest.raises(StoreUnavailable, match="wrong secret"):
                await intruder.read(1, [(0, -1)])
            assert await good.read(1, [(0, -1)]) == [b"kept"]
        finally:
            await good.close()
            await intruder.close()

    trio.run(main)

    no_secret = RawClient(server.port)  # straight to a request, no handshake
    try:
        no_secret.send_frame(1, p.Get(1, ((0, p.TO_END),)))
        refusal = no_secret.frame()
        assert refusal is not None and refusal.message == p.Error(p.ErrorCode.AUTH_REQUIRED, "authenticate first")
        assert no_secret.frame() is None  # and the connection is closed
    finally:
        no_secret.close()

    wrong = RawClient(server.port)
    try:
        assert wrong.handshake(b"guess") == p.Error(p.ErrorCode.AUTH_FAILED, "wrong secret")
        assert wrong.frame() is None
    finally:
        wrong.close()

    async def still_serving() -> None:
        good = server.store()
        try:
            assert await good.read(1, [(0, -1)]) == [b"kept"]
        finally:
            await good.close()

    trio.run(still_serving)
    assert server.stop() == 0
    log = server.log()
    assert log.count("refused: wrong secret; not authenticated") == 2, log
    assert "refused: GET request before authentication" in log, log


def test_a_client_does_not_trust_a_server_without_the_secret():
    """Mutual authentication: an impostor that lets any client in but cannot
    prove it knows the secret gets no request."""
    received_after_welcome: list[p.Message] = []

    async def impostor(stream: trio.SocketStream) -> None:
        frames = TrioFrames(stream)
        assert isinstance(await frames.receive(), p.Hello)
        await frames.send(0, p.Challenge(p.new_nonce()))
        assert isinstance(await frames.receive(), p.Auth)
        await frames.send(0, p.Welcome(bytes(p.PROOF_SIZE), "node-a"))  # "welcome", with a made-up proof
        while (message := await frames.receive()) is not None:
            received_after_welcome.append(message)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(functools.partial(trio.serve_tcp, impostor, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            store = RemoteStore("node-a", "127.0.0.1", port, SECRET)
            try:
                with pytest.raises(StoreUnavailable, match="does not know the cluster secret"):
                    await store.put(1, [b"for the real node only"], sync=False)
            finally:
                await store.close()
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert received_after_welcome == []


def test_a_client_refuses_a_server_holding_another_store(start_server):
    server = start_server()

    async def main() -> None:
        store = RemoteStore("node-b", "127.0.0.1", server.port, SECRET)
        try:
            with pytest.raises(StoreUnavailable, match="holds node store 'node-a', not 'node-b'"):
                await store.exists(1)
        finally:
            await store.close()

    trio.run(main)
    assert server.stop() == 0


# -- hostile input ------------------------------------------------------------------------


def test_garbage_thrown_at_a_live_server(start_server):
    """Random bytes, truncated frames, oversized lengths, bad shard ids and
    protocol violations, before and after authentication, for two seconds;
    then the server still serves the right data and nothing left its directory."""
    server = start_server()
    data = {shard_id: os.urandom(20000 + shard_id % 1000) for shard_id in (1, 2, 2**64 - 1)}
    outside_before = sorted(path.name for path in server.data.parent.iterdir())

    async def put_all() -> None:
        store = server.store()
        try:
            for shard_id, content in data.items():
                await store.put(shard_id, [content], sync=True)
        finally:
            await store.close()

    trio.run(put_all)

    valid = p.encode_frame(5, p.Get(1, ((0, p.TO_END),)))
    traversal = b"../../.."  # 8 bytes: read as a shard id, it is just a number
    attacks = [
        lambda rng: rng.randbytes(rng.randrange(1, 3000)),
        lambda rng: valid[: rng.randrange(1, len(valid))],
        lambda rng: p.HEADER.pack(p.MAGIC, p.VERSION, p.MessageType.PUT_DATA, 0, 1, 2**32 - 1) + rng.randbytes(100),
        lambda rng: b"GET /../../etc/passwd HTTP/1.1\r\n\r\n",
        lambda rng: p.HEADER.pack(p.MAGIC, 9, p.MessageType.HELLO, 0, 1, 32) + bytes(32),
    ]
    after_auth = [
        *attacks,
        lambda rng: p.HEADER.pack(p.MAGIC, p.VERSION, p.MessageType.HAS, 0, 1, 8) + bytes(8),  # shard id 0
        lambda rng: p.HEADER.pack(p.MAGIC, p.VERSION, p.MessageType.GET, 0, 1, 10) + traversal + b"\xff\xff",
        lambda rng: p.HEADER.pack(p.MAGIC, p.VERSION, p.MessageType.DELETE, 0, 1, 8) + traversal,  # valid
        lambda rng: p.HEADER.pack(p.MAGIC, p.VERSION, p.MessageType.HAS, 0, 1, 16) + traversal * 2,
        lambda rng: p.encode_frame(1, p.PutData(b"no put in progress")),
        lambda rng: p.encode_frame(1, p.Put(3, sync=False)) + p.encode_frame(2, p.Stat()),
        lambda rng: (  # a body shorter than its PUT_END says
            p.encode_frame(1, p.Put(3, sync=False))
            + p.encode_frame(1, p.PutData(b"abc"))
            + p.encode_frame(1, p.PutEnd(4))
        ),
        lambda rng: p.encode_frame(1, p.Put(4, sync=False)) + p.encode_frame(1, p.PutData(rng.randbytes(5000))),
        lambda rng: p.encode_frame(1, p.Hello(p.new_nonce())),
        lambda rng: p.encode_frame(1, p.Ok()),
        lambda rng: p.encode_frame(1, p.Get(1, ((0, 10),)))[:-3],
        lambda rng: p.encode_frame(1, p.Get(1, ((0, 10),)))[:16] + rng.randbytes(26),
    ]

    def throw_garbage() -> int:
        rng = random.Random(7)
        rounds = 0
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            rounds += 1
            client = RawClient(server.port, timeout=2.0)
            try:
                if rng.random() < 0.6:
                    assert isinstance(client.handshake(), p.Welcome)
                    attack = rng.choice(after_auth)(rng)
                else:
                    attack = rng.choice(attacks)(rng)
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    client.send(attack)
                if rng.random() < 0.5:
                    with contextlib.suppress(OSError):
                        client.sock.shutdown(socket.SHUT_WR)
                    while client.frame() is not None:  # the server answers what it can and closes
                        pass
                else:  # left open: the server may wait for the rest of a frame, and no one else minds
                    client.sock.settimeout(0.02)
                    with contextlib.suppress(socket.timeout):
                        while client.frame() is not None:
                            pass
            finally:
                client.close()
            server.assert_running()
        return rounds

    async def attack_while_serving() -> int:
        store = server.store()

        async def keep_reading() -> None:
            while True:
                for shard_id, content in data.items():
                    assert await store.read(shard_id, [(0, -1)]) == [content]

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(keep_reading)
                rounds = await trio.to_thread.run_sync(throw_garbage)
                nursery.cancel_scope.cancel()
            assert await store.list(0, 10) == sorted(data)
        finally:
            await store.close()
        return rounds

    assert trio.run(attack_while_serving) > 50
    assert sorted(path.name for path in server.data.parent.iterdir()) == outside_before
    assert layout_problems(server.data) == []
    assert list((server.data / "tmp").iterdir()) == []
    assert server.stop() == 0
    log = server.log()
    assert "malformed frame" in log and "Traceback" not in log and "internal error" not in log, log[-3000:]


# -- stopping --------------------------------------------------------------------------


def spool_size(pid: int) -> int | None:
    """The size of the node server's spool file (a put being received), or None."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if "/tmp/receiving." in os.readlink(f"/proc/{pid}/fd/{fd}"):
                return os.stat(f"/proc/{pid}/fd/{fd}").st_size
        except FileNotFoundError:
            continue
    return None


def test_sigterm_during_a_streamed_put_leaves_no_partial_replica(start_server):
    server = start_server()

    async def put_kept() -> None:
        store = server.store()
        try:
            await store.put(5, [b"stored before"], sync=True)
        finally:
            await store.close()

    trio.run(put_kept)
    client = RawClient(server.port)
    try:
        assert isinstance(client.handshake(), p.Welcome)
        client.send_frame(1, p.Put(77, sync=True))
        for _ in range(2):
            client.send_frame(1, p.PutData(os.urandom(p.CHUNK_SIZE)))
        deadline = time.monotonic() + 5
        while (spool_size(server.process.pid) or 0) < 2 * p.CHUNK_SIZE:  # the server has the body so far
            assert time.monotonic() < deadline, "the server never received the put's chunks"
            time.sleep(0.01)
        server.signal(signal.SIGTERM)
        assert client.frame() is None  # the put is dropped with its connection, not answered
        assert server.process.wait(STOP_TIMEOUT) == 0
    finally:
        client.close()
    assert not (server.data / replica_name(77)).exists()
    assert list((server.data / "tmp").iterdir()) == []
    log = server.log()
    assert "SIGTERM: stopping" in log and "the server is shutting down; authenticated, 1 requests" in log, log

    restarted = start_server(server.name)

    async def check() -> None:
        store = restarted.store()
        try:
            assert await store.list(0, 10) == [5]
            assert await store.read(5, [(0, -1)]) == [b"stored before"]
        finally:
            await store.close()

    trio.run(check)
    assert restarted.stop() == 0


@pytest.mark.parametrize("client_reads", [True, False], ids=["finishes", "cut-off"])
def test_stop_lets_requests_in_flight_finish_within_the_grace_period(tmp_path, caplog, client_reads):
    """In process: a GET in flight when stop() is called is answered whole if
    the client takes it within the grace period, and cut off after it."""
    body = os.urandom(32 * p.CHUNK_SIZE)  # more than the socket buffers take without the client reading

    async def main() -> None:
        local = await LocalStore.open("node-a", str(tmp_path / "node"))
        await local.put(1, [body], sync=False)
        server = NodeServer(local, SECRET)
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, listeners)
            client = TrioFrames(await trio.open_tcp_stream("127.0.0.1", listeners[0].socket.getsockname()[1]))
            assert isinstance(await client.handshake(), p.Welcome)
            await client.send(1, p.Get(1, ((0, p.TO_END),)))
            received = [await client.receive()]
            server.stop(grace=2.0 if client_reads else 0.2)
            while client_reads and (message := await client.receive()) is not None:
                received.append(message)
            # serve() returns once every connection is done, or cut off
        await client.stream.aclose()
        if client_reads:
            assert b"".join(m.data for m in received if isinstance(m, p.Data)) == body
            assert received[-2:] == [p.RangeEnd(len(body)), p.Ok()]

    with caplog.at_level(logging.INFO, logger="dfsfuse.node"):
        trio.run(main)
    expected = "closed: the server is shutting down" if client_reads else "cut off: the server stopped"
    assert expected in caplog.text, caplog.text
    assert "every connection is closed" in caplog.text


# -- TLS -----------------------------------------------------------------------------------


@pytest.fixture
def certificate(tmp_path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    run([
        "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
    ])
    return cert, key


def test_tls(start_server, certificate):
    cert, key = certificate
    server = start_server("node-tls", "--tls-cert", str(cert), "--tls-key", str(key))
    plain_server = start_server("node-plain")

    async def main() -> None:
        trusted = server.store(ssl_context=ssl.create_default_context(cafile=str(cert)))
        plaintext = server.store(attempts=1)
        untrusting = server.store(ssl_context=ssl.create_default_context(), attempts=1)
        tls_to_plain = plain_server.store(ssl_context=ssl.create_default_context(cafile=str(cert)), attempts=1)
        try:
            body = os.urandom(p.CHUNK_SIZE + 7)
            await trusted.put(9, [body], sync=True)
            assert await trusted.read(9, [(0, -1), (p.CHUNK_SIZE, 7)]) == [body, body[-7:]]
            with pytest.raises(StoreUnavailable):
                await plaintext.exists(9)
            with pytest.raises(StoreUnavailable, match="certificate verify failed"):
                await untrusting.exists(9)
            with pytest.raises(StoreUnavailable, match="TLS handshake failed"):
                await tls_to_plain.exists(9)
        finally:
            for store in (trusted, plaintext, untrusting, tls_to_plain):
                await store.close()

    trio.run(main)
    assert server.stop() == 0 and plain_server.stop() == 0
    log = server.log()
    assert log.count("refused: TLS handshake failed") == 2, log
    assert "closed by the client; authenticated, 2 requests" in log, log
    assert "refused: malformed frame: not a dfsfuse frame" in plain_server.log()


# -- a client's view of failures -----------------------------------------------------------


def test_a_dead_node_is_marked_down_and_up_again(start_server):
    server = start_server()
    port = server.port

    async def main() -> None:
        store = server.store(timeout=2.0, attempts=2, down_after=2, probe_interval=0.3)
        try:
            await store.put(1, [b"x"], sync=False)
            seen = store.last_seen
            server.process.kill()
            server.process.wait()
            for _ in range(2):
                with pytest.raises(StoreUnavailable, match="cannot connect"):
                    await store.exists(1)
            assert not store.is_up and store.last_seen == seen
            started = trio.current_time()
            with pytest.raises(StoreUnavailable, match="is down"):
                await store.exists(1)  # fails at once, without trying
            assert trio.current_time() - started < 0.1

            revived = start_server(server.name, listen=f"127.0.0.1:{port}")
            with trio.fail_after(5):
                while True:
                    try:
                        assert await store.read(1, [(0, -1)]) == [b"x"]
                        break
                    except StoreUnavailable:
                        await trio.sleep(0.05)
            assert store.is_up and store.last_seen > seen
            assert revived.stop() == 0
        finally:
            await store.close()

    trio.run(main)


def test_a_frozen_node_times_out(start_server):
    server = start_server()

    async def main() -> None:
        store = server.store(timeout=0.5, attempts=2, down_after=2, probe_interval=0.2)
        try:
            await store.put(1, [b"x"], sync=False)
            server.signal(signal.SIGSTOP)
            try:
                started = trio.current_time()
                with pytest.raises(StoreUnavailable, match=r"within 0\.5 s"):  # a reply, or a new connection
                    await store.exists(1)
                assert trio.current_time() - started < 3 * 0.5 + 1
                assert not store.is_up
            finally:
                server.signal(signal.SIGCONT)
            with trio.fail_after(5):
                while True:
                    try:
                        assert await store.exists(1)
                        break
                    except StoreUnavailable:
                        await trio.sleep(0.05)
            assert store.is_up
        finally:
            await store.close()

    trio.run(main)
    assert server.stop() == 0


# -- bad input on the command line --------------------------------------------------------------


def node_serve(*args) -> subprocess.CompletedProcess:
    return run([PYTHON, "-m", "dfsfuse", "node", "serve", *args], check=False, timeout=30, cwd=REPO)


def test_bad_command_lines_get_one_line_errors(tmp_path, secret_file, certificate):
    data = str(tmp_path / "data")
    base = ["--data", data, "--listen", "127.0.0.1:0"]
    open_secret = tmp_path / "open-secret"
    open_secret.write_bytes(b"readable by all")
    open_secret.chmod(0o644)
    empty_secret = tmp_path / "empty-secret"
    empty_secret.write_bytes(b"\n")
    empty_secret.chmod(0o600)
    not_a_dir = tmp_path / "file"
    not_a_dir.write_bytes(b"")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    busy_port = busy.getsockname()[1]
    cert, _ = certificate
    cases = [
        (base + ["--secret-file", str(tmp_path / "missing")], "No such file"),
        (base + ["--secret-file", str(open_secret)], "other users"),
        (base + ["--secret-file", str(empty_secret)], "empty"),
        (base + ["--secret-file", str(tmp_path)], "not a regular file"),
        (["--data", str(not_a_dir), "--listen", "127.0.0.1:0", "--secret-file", str(secret_file)], "cannot be used"),
        (["--data", data, "--listen", f"127.0.0.1:{busy_port}", "--secret-file", str(secret_file)], "in use"),
        (["--data", data, "--listen", "127.0.0.1", "--secret-file", str(secret_file)], "HOST:PORT"),
        (["--data", data, "--listen", "::1:80", "--secret-file", str(secret_file)], "brackets"),
        (base + ["--secret-file", str(secret_file), "--tls-cert", str(cert)], "go together"),
        (base + ["--secret-file", str(secret_file), "--tls-cert", str(cert), "--tls-key", str(cert)], "TLS"),
    ]
    try:
        for args, words in cases:
            line = one_line_error(node_serve(*args))
            assert words in line, (args, line)
    finally:
        busy.close()
