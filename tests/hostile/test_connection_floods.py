"""Strangers who open connections and say nothing: a node holds at most its cap of them, and
not for long (each one is a file descriptor, and the WAL and snapshots need theirs). Before,
gRPC kept every idle connection to the client port for 120 s, with no cap: a loop opening
connections took every descriptor the node had."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from raftfast.address import split_address
from raftfast.client import SyncClient
from raftfast.server.driver import GRPC_HANDSHAKE_MS
from raftfast.tools.localcluster import ProcCluster, wait_for

CAP = 16  # this node's --max-client-connections


def _descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _closed(sock: socket.socket) -> bool:
    """Whether the other end closed ``sock`` (what it sent, its HTTP/2 settings, is dropped)."""
    try:
        while sock.recv(65536):
            pass
        return True
    except BlockingIOError:
        return False
    except OSError:  # reset
        return True


def test_idle_connections_to_the_client_port_are_capped_then_dropped(tmp_path):
    with ProcCluster(tmp_path, 1, extra=["--max-client-connections", str(CAP)]) as cluster:
        nid = cluster.wait_leader()
        pid = cluster.procs[nid].pid
        address = cluster.addrs[nid]
        with SyncClient([address], timeout=30) as client:
            client.put("before", "1")
        held = _descriptors(pid)
        host, port = split_address(address)
        strangers = []
        try:
            for _ in range(4 * CAP):
                sock = socket.create_connection((host, port), timeout=10)
                sock.setblocking(False)
                strangers.append(sock)
            # Past the cap, closed at once; the node holds at most the cap's worth.
            wait_for(
                "connections past the cap closed",
                lambda: sum(_closed(s) for s in strangers) >= 3 * CAP,
                timeout=30,
            )
            assert _descriptors(pid) <= held + CAP + 8
            # And the ones let in are dropped once their handshake time is up.
            started = time.monotonic()
            wait_for(
                "idle connections dropped",
                lambda: all(_closed(s) for s in strangers),
                timeout=GRPC_HANDSHAKE_MS / 1000 + 30,
                every=0.25,
            )
            assert time.monotonic() - started < GRPC_HANDSHAKE_MS / 1000 + 30
        finally:
            for sock in strangers:
                sock.close()
        with SyncClient([address], timeout=30) as client:
            client.put("after", "2")
            assert client.get("before") == b"1"
        assert cluster.procs[nid].poll() is None


def test_the_node_raises_its_descriptor_limit_or_says_it_is_short():
    # (in a child: the limits are the process's own)
    script = """
import resource
from raftfast.server import descriptors
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 2048))
print(descriptors.raise_limit(1024))
print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
print(descriptors.raise_limit(4096) or "")
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    ).stdout.splitlines()
    assert out[0] == "None"  # raised to the hard limit: enough
    assert out[1] == "2048"
    assert "2048" in out[2] and "--max-client-connections" in out[2]
