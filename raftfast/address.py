"""HOST:PORT addresses, as every raftfast command, setting and message writes them."""

from __future__ import annotations

import ipaddress

MAX_ADDRESS_CHARS = 255


def is_address(address: str) -> bool:
    """True for HOST:PORT with a non-empty host (a name, an IPv4 address or an IPv6 one in
    brackets) and a port in 1..65535, in at most 255 printable ASCII characters (an address
    is stored in every configuration entry)."""
    if len(address) > MAX_ADDRESS_CHARS or not address.isascii() or not address.isprintable():
        return False
    if " " in address:
        return False
    host, sep, port = address.rpartition(":")
    if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
        return False
    if ":" in host or "[" in host or "]" in host:
        # Only an IPv6 address, in brackets ("::1" was host ":" and port 1; gRPC dialed
        # [::1]:443, and a member could be added at it).
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
