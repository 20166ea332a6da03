"""Ports for local clusters that nothing else takes while a node is down.

A node killed by a test comes back on the same port. With ports the kernel handed out
(``bind(("127.0.0.1", 0))``), anything could take that port meanwhile: an outgoing connection
of any process (they use the same ephemeral range), or a cluster of another test run on the
same machine. So ports come from below the ephemeral range, and each is claimed in a shared
directory with the claiming process's PID until ``release_ports`` (or that process's end).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import socket
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = ["claim_port", "free_ports", "release_ports"]

_LOW, _HIGH = 10_000, 32_000  # (Linux's ephemeral ports start at 32768)
_CLAIMS = Path(tempfile.gettempdir()) / "raftfast-ports"
_random = random.Random()


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports on 127.0.0.1, free now and claimed by this process."""
    ports: list[int] = []
    with _claims_locked():
        for _ in range(100 * count + 1000):
            if len(ports) == count:
                return ports
            port = _random.randrange(_LOW, _HIGH)
            if port not in ports and _unclaimed(port) and _bindable(port):
                (_CLAIMS / str(port)).write_text(str(os.getpid()))
                ports.append(port)
    raise OSError(f"no {count} free ports between {_LOW} and {_HIGH}")


def claim_port(port: int) -> bool:
    """Claim ``port``, one a caller must use at a given place (say, at an offset from another),
    as ``free_ports`` claims its own: False if another process claimed it or it is taken now.
    A port outside the range ``free_ports`` hands out is no one's to claim: only whether it
    is free counts."""
    with _claims_locked():
        if not 0 < port < 65536 or not _bindable(port):
            return False
        if _LOW <= port < _HIGH:
            if not _unclaimed(port):
                return False
            (_CLAIMS / str(port)).write_text(str(os.getpid()))
        return True


def release_ports(ports: Iterable[int]) -> None:
    """Give back ports this process claimed (a cluster that stopped)."""
    with _claims_locked():
        for port in ports:
            path = _CLAIMS / str(port)
            if _owner(path) == os.getpid():
                path.unlink(missing_ok=True)


@contextlib.contextmanager
def _claims_locked() -> Iterator[None]:
    _CLAIMS.mkdir(mode=0o777, exist_ok=True)
    fd = os.open(_CLAIMS / ".lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _owner(path: Path) -> int:
    try:
        return int(path.read_text() or 0)
    except (OSError, ValueError):
        return 0


def _unclaimed(port: int) -> bool:
    pid = _owner(_CLAIMS / str(port))
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True  # its claimer is gone
    except PermissionError:
        return False
    return False


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
