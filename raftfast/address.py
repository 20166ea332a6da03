"""HOST:PORT addresses, as every raftfast command, setting and message writes them."""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import socket

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


_RESOLVE_S = 2.0  # how long a member add waits for its address's name (and members') to resolve
# Names are looked up on threads of their own: a caller's slow names (a member add's) must not
# hold the loop's default executor, which other work (dialling peers by name) waits on. As many
# as a cluster's members may be looked up at once (each within _RESOLVE_S: two threads let the
# later ones of 5 slow names time out, and the check pass).
_RESOLVER = concurrent.futures.ThreadPoolExecutor(16, thread_name_prefix="raftfast-resolve")


async def places_of(address: str) -> set[tuple[str, int]]:
    """The (IP, port) pairs ``address`` (HOST:PORT) reaches; none if it does not resolve soon
    (a machine still to come may be added). An unspecified IP (0.0.0.0, ::) reaches the
    loopback; IPv4-mapped IPv6 is IPv4."""
    try:
        host, port = split_address(address)
        try:
            ips: list[str] = [host.split("%", 1)[0]]
            ipaddress.ip_address(ips[0])  # (an IP needs no lookup)
        except ValueError:
            lookup = asyncio.get_running_loop().run_in_executor(
                _RESOLVER, socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM
            )
            infos = await asyncio.wait_for(lookup, _RESOLVE_S)
            ips = [str(info[4][0]).split("%", 1)[0] for info in infos]
    except (OSError, ValueError, TimeoutError, UnicodeError):
        return set()
    out: set[tuple[str, int]] = set()
    for text in ips:
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            continue
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip.is_unspecified:
            out |= {("127.0.0.1", port), ("::1", port)}
        else:
            out.add((str(ip), port))
    return out


async def members_at_one_place(members: dict[str, str]) -> tuple[str, str] | None:
    """Two members (id -> address) whose addresses, spelled apart, reach one place, or None
    (``member_at_same_place``'s rule, for the founding members given to a node)."""
    ids = list(members)
    places = await asyncio.gather(*(places_of(members[nid]) for nid in ids))
    for i, first in enumerate(ids):
        for j in range(i + 1, len(ids)):
            if places[i] & places[j]:
                return first, ids[j]
    return None


async def member_at_same_place(address: str, members: dict[str, str]) -> str | None:
    """The member (id -> address) whose address reaches where ``address`` does, spelled
    otherwise (`localhost:7002` for `127.0.0.1:7002`, `127.0.0.1:07002`), or None. Two members
    at one place: each peer dialled it twice, and its two streams displaced each other."""
    mine = await places_of(address)
    if not mine:
        return None
    addresses = sorted(set(members.values()))  # (each looked up once)
    places = dict(zip(addresses, await asyncio.gather(*map(places_of, addresses)), strict=True))
    for member, theirs in members.items():
        if mine & places[theirs]:
            return member
    return None
