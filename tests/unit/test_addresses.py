"""HOST:PORT formatting and splitting (dfsfuse.storage.addresses), and the
rules its callers add: a node address and the node server's --listen."""

from __future__ import annotations

import pytest

from dfsfuse.cluster.registry import RemoteAddress, parse_address
from dfsfuse.errors import UserError
from dfsfuse.node.cli import parse_listen_address
from dfsfuse.storage.addresses import format_host_port, split_host_port


def test_format_host_port():
    assert format_host_port("192.0.2.7", 7070) == "192.0.2.7:7070"
    assert format_host_port("node-a.example", 0) == "node-a.example:0"
    assert format_host_port("::1", 7070) == "[::1]:7070"
    assert format_host_port("fe80::1%eth0", 7070) == "[fe80::1%eth0]:7070"


@pytest.mark.parametrize("host", ["192.0.2.7", "node-a.example", "::1", "2001:db8::42", ""])
def test_split_host_port_takes_back_what_format_wrote(host):
    assert split_host_port(format_host_port(host, 65535)) == (host, 65535)


@pytest.mark.parametrize("text", ["node-a", "node-a:", "node-a:http", "node-a:65536", "node-a:-1", "node-a:²"])
def test_split_host_port_without_a_port_is_none(text):
    assert split_host_port(text) is None


def test_split_host_port_refuses_ipv6_without_brackets():
    with pytest.raises(ValueError, match=r"brackets, as \[::1\]:PORT"):
        split_host_port("::1:7070")


def test_node_addresses():
    assert parse_address("[::1]:7070") == RemoteAddress("::1", 7070)
    assert parse_address("node-a:7070") == RemoteAddress("node-a", 7070)
    for wrong in ("node-a", ":7070", "node-a:0"):
        with pytest.raises(UserError, match="expected HOST:PORT or a directory"):
            parse_address(wrong)
    with pytest.raises(UserError, match="node address '::1:7070': write an IPv6 address in brackets"):
        parse_address("::1:7070")


def test_listen_addresses():
    assert parse_listen_address(":0") == ("", 0)
    assert parse_listen_address("[::]:7070") == ("::", 7070)
    with pytest.raises(UserError, match="--listen 127.0.0.1: expected HOST:PORT"):
        parse_listen_address("127.0.0.1")
    with pytest.raises(UserError, match="--listen ::1:80: write an IPv6 address in brackets"):
        parse_listen_address("::1:80")
