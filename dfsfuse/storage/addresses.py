"""HOST:PORT as people write it and as messages show it: an IPv6 host goes in
brackets, [::1]:PORT, so that its colons cannot be taken for the port's."""

from __future__ import annotations


def format_host_port(host: str, port: int) -> str:
    """HOST:PORT, or [HOST]:PORT for an IPv6 host."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_host_port(text: str) -> tuple[str, int] | None:
    """The host (brackets taken off) and port of HOST:PORT or [IPV6]:PORT;
    None if `text` does not end in :PORT with a port from 0 to 65535.

    ValueError, saying how to write it, for an IPv6 host without brackets.
    What else a host and port must be (not empty, not port 0) is the caller's.
    """
    host, colon, port_text = text.rpartition(":")
    if not colon or not port_text.isdecimal() or not 0 <= int(port_text) <= 65535:
        return None
    if host.startswith("[") and host.endswith("]"):
        return host[1:-1], int(port_text)
    if ":" in host:
        raise ValueError("write an IPv6 address in brackets, as [::1]:PORT")
    return host, int(port_text)
