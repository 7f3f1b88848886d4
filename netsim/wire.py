"""Endpoint text shared by the responder and the probes: ``<ipv4>:<port>``."""

from __future__ import annotations

from ipaddress import IPv4Address

MAX_MESSAGE_SIZE = 512
"""Longest responder/probe datagram; anything longer is ignored."""

Endpoint = tuple[str, int]
"""An IPv4 address and a UDP port, as the socket module takes them."""


def format_endpoint(endpoint: Endpoint) -> str:
    return f"{endpoint[0]}:{endpoint[1]}"


def parse_endpoint_untrusted(text: str) -> Endpoint:
    """``"203.0.113.10:3478"`` -> ``("203.0.113.10", 3478)``; ValueError on anything else."""
    host, separator, port_text = text.rpartition(":")
    if not separator or not port_text.isdigit():
        raise ValueError(f"not an ipv4:port endpoint: {text!r}")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"port out of range: {text!r}")
    return (str(IPv4Address(host)), port)
