"""`dfsfuse node ...` on the command line: argument parsing and checks of
what a person gives (address, secret file, TLS files), turned into one-line
errors before the server starts."""

from __future__ import annotations

import argparse
import logging
import socket
import ssl
import sys

from dfsfuse.errors import UserError
from dfsfuse.node.secret import load_secret
from dfsfuse.storage.addresses import split_host_port
from dfsfuse.storage.local import LocalStore


def add_node_commands(commands: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Add `node serve` to the top-level subcommands; returns the `node` group
    so that the cluster's node commands (add, list) join it."""
    node = commands.add_parser("node", help="node servers that hold shard replicas for other machines")
    node_commands = node.add_subparsers(dest="node_command", required=True, metavar="NODE_COMMAND")
    serve = node_commands.add_parser("serve", help="serve a node store over TCP")
    serve.add_argument("--data", required=True, metavar="DIR", help="the node store's directory")
    serve.add_argument("--listen", required=True, metavar="HOST:PORT",
                       help="address to listen on; port 0 picks a free port; [::1]:PORT for IPv6, :PORT for all")
    serve.add_argument("--secret-file", required=True, metavar="FILE",
                       help="the cluster secret (not readable by other users)")
    serve.add_argument("--name", metavar="NAME",
                       help="the node store's name (default: the name DIR already has, else this host's name)")
    serve.add_argument("--tls-cert", metavar="FILE", help="serve TLS with this certificate (PEM)")
    serve.add_argument("--tls-key", metavar="FILE", help="the private key of --tls-cert (PEM)")
    return node_commands


def run_node_command(args: argparse.Namespace) -> int:
    import trio

    from dfsfuse.node.server import run_node_server

    host, port = parse_listen_address(args.listen)
    secret = load_secret(args.secret_file)
    ssl_context = _server_tls_context(args.tls_cert, args.tls_key)
    name = args.name or LocalStore.recorded_name(args.data) or socket.gethostname().split(".")[0]
    _log_to_stderr()
    return trio.run(run_node_server, args.data, name, host, port, secret, ssl_context)


def parse_listen_address(text: str) -> tuple[str, int]:
    """HOST:PORT, [IPV6]:PORT or :PORT (every interface) as (host, port); host "" means every interface."""
    try:
        address = split_host_port(text)
    except ValueError as error:
        raise UserError(f"--listen {text}: {error}") from None
    if address is None:
        raise UserError(f"--listen {text}: expected HOST:PORT with a port from 0 to 65535")
    return address


def _server_tls_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise UserError("--tls-cert and --tls-key go together")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except OSError as error:
        raise UserError(f"TLS certificate {cert} or key {key}: {error.strerror or error}") from None
    except ssl.SSLError as error:
        raise UserError(f"TLS certificate {cert} or key {key} is not usable: {error.reason or error}") from None
    return context


def _log_to_stderr() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
