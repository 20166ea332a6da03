"""Ports for local clusters (raftfast/tools/ports.py): a claimed port is no one else's."""

from __future__ import annotations

import socket
import subprocess
import sys

from raftfast.tools import ports


def test_a_port_is_claimed_once_until_released_or_its_claimer_is_gone():
    port, taken = ports.free_ports(2)
    assert not ports.claim_port(port)  # (free_ports claimed it: not again, not even by us)
    ports.release_ports([port])
    assert ports.claim_port(port) and not ports.claim_port(port)
    ports.release_ports([port])
    # Claimed by another process: not while it lives, then free again.
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=-1)
    try:
        (ports._CLAIMS / str(port)).write_text(str(child.pid))
        assert not ports.claim_port(port)
    finally:
        child.communicate(b"")
    assert ports.claim_port(port)
    ports.release_ports([port, taken])
    # Taken by a listener that never claimed it; out of range.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", taken))
        sock.listen()
        assert not ports.claim_port(taken)
    for bad in (0, -1, 65536, 1 << 70):
        assert not ports.claim_port(bad)
