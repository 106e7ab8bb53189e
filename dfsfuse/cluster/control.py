"""The control socket: how `dfsfuse` commands reach a running mount.

The mount is the only writer of the metadata while it runs (its cache relies
on it), so cluster operations that change the metadata run inside the mount,
asked over DATA_DIR/control.sock (AF_UNIX, mode 0600, so only the owner can
ask). One request per connection, JSON lines both ways:

    -> {"operation": "rebalance", "arguments": {}}
    <- {"progress": [12, 40, "shards moved"]}      any number, in order
    <- {"line": "rebalance: 40 of 900 shards moved ..."}
    <- {"exit": 0}                                 last; or {"error": "...", "exit": 1}

Cluster operations run one at a time; a second request waits for the first.
Operations on the mounted tree (dfsfuse.cluster.tree: "snapshot", ...) do
not wait for them. `{"operation": "stats"}` is answered at once, never waiting for one:
`{"stats": {SAMPLE: VALUE, ...}, "exit": 0}` (dfsfuse.metrics.snapshot).
So are the quota requests (cluster/quotas.py: "quota set", "quota get",
"quota list", "quota remove"): one object with the answer's fields and
`"exit": 0`, or `{"error": "...", "exit": 1}`.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import os
import socket
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import trio

from dfsfuse import metrics
from dfsfuse.cluster.operations import (
    MAINTENANCE_BUSY,
    OPERATIONS,
    Cluster,
    Operation,
    maintenance_turn,
)
from dfsfuse.cluster.quotas import QUOTA_REQUESTS
from dfsfuse.errors import UserError

log = logging.getLogger("dfsfuse.control")

MAX_REQUEST_BYTES = 64 * 1024
STATS = "stats"  # the mount's metrics now: read-only, answered beside any running operation
PROGRESS_BACKLOG = 100  # progress messages queued for a slow client beyond this are dropped


class _StreamOutput:
    """An Output that queues reply messages for the connection's sender."""

    def __init__(self, send: trio.MemorySendChannel[dict[str, Any]]):
        self._send = send

    def line(self, text: str) -> None:
        self._send.send_nowait({"line": text})

    def progress(self, done: int, total: int, what: str) -> None:
        if self._send.statistics().current_buffer_used < PROGRESS_BACKLOG:
            self._send.send_nowait({"progress": [done, total, what]})


class ControlServer:
    def __init__(
        self, path: Path, cluster: Cluster, lock: trio.Lock, tree_operations: Mapping[str, Operation] | None = None
    ):
        """`lock` serializes operations with the mount's own maintenance
        (background repair); `tree_operations` (dfsfuse.cluster.tree) are
        answered too, without waiting for it."""
        self._path = path
        self._cluster = cluster
        self._lock = lock
        self._tree_operations = tree_operations or {}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; the socket file goes with it."""
        listener_socket = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with _socket_file(self._path), _addressable(self._path) as address:
            await listener_socket.bind(address)
            os.chmod(self._path, 0o600)
            listener_socket.listen()
            listener = trio.SocketListener(listener_socket)
            async with listener:
                task_status.started()
                await trio.serve_listeners(self._serve, [listener])

    async def _serve(self, stream: trio.SocketStream) -> None:
        """One connection; whatever becomes of it, the mount goes on."""
        async with stream:
            try:
                await self._answer(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                log.info("control: the client went away before its answer")
            except Exception:  # noqa: BLE001 - a connection must never end the mount
                log.exception("control: a request failed")

    async def _answer(self, stream: trio.SocketStream) -> None:
        """Read one request and answer it (the operation's messages as it runs)."""
        try:
            request = await _receive_request(stream)
            if request.get("operation") == STATS:
                await _send(stream, {"stats": metrics.snapshot(), "exit": 0})
                return
            arguments = request.get("arguments", {})
            if not isinstance(arguments, dict):
                raise ValueError("arguments must be an object")
            name = request["operation"]
            quota_request = QUOTA_REQUESTS.get(name)
            maintains = name in OPERATIONS
            if quota_request is not None:
                inspect.signature(quota_request).bind(self._cluster, **arguments)  # TypeError if they do not fit
            else:
                operation = OPERATIONS[name] if maintains else self._tree_operations[name]
                inspect.signature(operation).bind(self._cluster, None, **arguments)
        except (ValueError, KeyError, TypeError) as error:
            await _send(stream, {"error": f"bad control request: {error}", "exit": 2})
            return
        if quota_request is not None:
            log.info("control: %s %s", request["operation"], arguments)
            try:
                answer = await quota_request(self._cluster, **arguments)
            except UserError as error:
                await _send(stream, {"error": str(error), "exit": error.exit_code})
            else:
                await _send(stream, {**answer, "exit": 0})
            return
        send, receive = trio.open_memory_channel[dict[str, Any]](math.inf)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_forward, receive, stream)
            async with send:
                turn = maintenance_turn(self._cluster.meta, self._lock) if maintains else contextlib.nullcontext(True)
                async with turn as held:
                    log.info("control: %s %s", request["operation"], arguments)
                    try:
                        if not held:
                            raise UserError(MAINTENANCE_BUSY)
                        code = await operation(self._cluster, _StreamOutput(send), **arguments)
                    except UserError as error:
                        send.send_nowait({"error": str(error), "exit": error.exit_code})
                    except Exception as error:  # noqa: BLE001 - a request must never end the mount
                        log.exception("control: %s failed", request["operation"])
                        send.send_nowait({"error": f"{request['operation']} failed: {error}", "exit": 1})
                    else:
                        send.send_nowait({"exit": code})


@contextlib.contextmanager
def _addressable(path: Path) -> Iterator[str]:
    """An address for the socket at `path` that fits AF_UNIX's 108 bytes
    however deep the data dir is: the path through /proc/self/fd to the
    directory (Linux resolves it like any other)."""
    directory = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{directory}/{path.name}"
    finally:
        os.close(directory)


@contextlib.contextmanager
def _socket_file(path: Path) -> Iterator[None]:
    """Remove a stale socket file before (we hold the data dir lock), and ours after."""
    path.unlink(missing_ok=True)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


async def _receive_request(stream: trio.SocketStream) -> dict[str, Any]:
    data = b""
    while b"\n" not in data:
        chunk = await stream.receive_some(4096)
        if not chunk:
            raise ValueError("the request ended early")
        data += chunk
        if len(data) > MAX_REQUEST_BYTES:
            raise ValueError("the request is too long")
    request = json.loads(data.split(b"\n", 1)[0])
    if not isinstance(request, dict):
        raise ValueError("the request must be an object")
    return request


async def _forward(receive: trio.MemoryReceiveChannel[dict[str, Any]], stream: trio.SocketStream) -> None:
    """Send the queued messages; a client that went away just stops getting them."""
    async with receive:
        async for message in receive:
            try:
                await _send(stream, message)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                log.info("control: the client went away; the operation goes on")
                async for _ in receive:
                    pass


async def _send(stream: trio.SocketStream, message: dict[str, Any]) -> None:
    await stream.send_all(json.dumps(message).encode() + b"\n")


# -- the client side (plain blocking sockets: the CLI runs no trio here) --------


def connect(path: Path) -> socket.socket | None:
    """A connection to the mount's control socket, or None if no mount listens."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _addressable(path) as address:
            client.connect(address)
    except (FileNotFoundError, ConnectionRefusedError):
        client.close()
        return None
    except PermissionError:
        client.close()
        raise UserError(f"{path}: permission denied (only the user who mounted may ask the mount)") from None
    return client


def request(
    client: socket.socket, operation: str, arguments: dict[str, Any],
    line: Callable[[str], None], progress: Callable[[int, int, str], None],
) -> int:
    """Ask the mount to run `operation`; report its output; its exit code.

    Raises UserError with the mount's refusal.
    """
    with client, client.makefile("rb") as replies:
        client.sendall(json.dumps({"operation": operation, "arguments": arguments}).encode() + b"\n")
        for raw in replies:
            message = json.loads(raw)
            if "progress" in message:
                progress(*message["progress"])
            elif "line" in message:
                line(message["line"])
            elif "error" in message:
                raise UserError(message["error"], message.get("exit", 1))
            elif "exit" in message:
                return int(message["exit"])
    raise UserError("the mount closed the control connection before the operation finished (see its log)")


def ask(client: socket.socket, operation: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """One request answered at once (a quota request), over `client`: the
    answer's fields; UserError with the mount's refusal."""
    with client, client.makefile("rb") as replies:
        client.sendall(json.dumps({"operation": operation, "arguments": arguments}).encode() + b"\n")
        for raw in replies:
            message = json.loads(raw)
            if "error" in message:
                raise UserError(message["error"], message.get("exit", 1))
            if "exit" in message:
                return dict(message)
    raise UserError("the mount closed the control connection without an answer (an older dfsfuse? see its log)")


def read_stats(client: socket.socket) -> dict[str, float]:
    """The mount's metrics now (dfsfuse.metrics.snapshot), over `client`."""
    with client, client.makefile("rb") as replies:
        client.sendall(json.dumps({"operation": STATS}).encode() + b"\n")
        for raw in replies:
            message = json.loads(raw)
            if "error" in message:
                raise UserError(message["error"], message.get("exit", 1))
            if "stats" in message:
                return {str(name): float(value) for name, value in message["stats"].items()}
    raise UserError("the mount closed the control connection without an answer (an older dfsfuse? see its log)")
