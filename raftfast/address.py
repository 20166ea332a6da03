"""HOST:PORT addresses, as every raftfast command, setting and message writes them."""

from __future__ import annotations

import ipaddress

MAX_ADDRESS_CHARS = 255


# How the messages that refuse an address say what is wanted.
ADDRESS_FORM = "HOST:PORT; an IPv6 host in brackets: [::1]:7001"


def is_host_port(address: str) -> bool:
    """True for HOST:PORT with a non-empty host and a port in 1..65535, in at most 255
    printable ASCII characters (an address is stored in every configuration entry). The rule
    before IPv6 hosts needed brackets: what a node wrote down then still loads."""
    if len(address) > MAX_ADDRESS_CHARS or not address.isascii() or not address.isprintable():
        return False
    if " " in address:
        return False
    host, sep, port = address.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


def is_address(address: str) -> bool:
    """``is_host_port``, with a host that is a name, an IPv4 address or an IPv6 one in
    brackets ("::1" was host ":" and port 1: gRPC dialed [::1]:443, and a member could be
    added at it)."""
    if not is_host_port(address):
        return False
    host = address.rpartition(":")[0]
    if ":" in host or "[" in host or "]" in host:
        if not (host.startswith("[") and host.endswith("]")):
            return False
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return False
    return True


def split_address(address: str) -> tuple[str, int]:
    """(host, port) of a HOST:PORT address; an IPv6 host loses its brackets ("[::1]:7001")."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)
