"""Strangers who open connections and say nothing: a node holds at most its cap of them, and
not for long (each one is a file descriptor, and the WAL and snapshots need theirs). Before,
gRPC kept every idle connection to the client port for 120 s, with no cap: a loop opening
connections took every descriptor the node had."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request

from raftfast.address import split_address
from raftfast.client import SyncClient
from raftfast.security.tls import TLSFiles
from raftfast.server import metrics_http
from raftfast.server.driver import GRPC_HANDSHAKE_MS
from raftfast.server.session_stream import server_context
from raftfast.tools.localcluster import ProcCluster, free_ports, make_certs, wait_for
from raftfast.transport import tcp

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


class _Echo(asyncio.Protocol):
    """A connection of ``_EchoListener``: sends back what it gets."""

    def __init__(self, listener: _EchoListener) -> None:
        self.listener = listener

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.listener.connections[transport] = self

    def connection_lost(self, exc) -> None:
        self.listener.connections.pop(self.transport, None)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def overdue(self, now: float) -> str | None:
        return None


class _EchoListener(tcp.RecordListener):
    max_connections = 8

    def protocol(self) -> _Echo:
        return _Echo(self)


def test_tls_handshakes_never_finished_count_against_a_stream_listener(tmp_path):
    # A TLS listener's connection was counted once its handshake was done: strangers that
    # never began one each held a descriptor for up to 5 s, uncounted. Then, counted, a slow
    # flood of silent connections reopened as they were dropped kept every peer out (a
    # hostile review): the oldest handshake of the busiest address now makes way.
    make_certs(tmp_path, ["n1"])
    server_ctx = server_context(
        TLSFiles(None, str(tmp_path / "n1.crt"), str(tmp_path / "n1.key")), False
    )
    client_ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))

    async def scenario() -> None:
        listener = _EchoListener(server_ctx)
        port = await listener.start("127.0.0.1")
        pid = os.getpid()
        held = _descriptors(pid)
        strangers = []
        try:
            for _ in range(5 * _EchoListener.max_connections):
                # (from another address of the loopback: the real client below is not theirs)
                sock = socket.create_connection(
                    ("127.0.0.1", port), timeout=10, source_address=("127.0.0.2", 0)
                )
                sock.setblocking(False)
                strangers.append(sock)
            loop = asyncio.get_running_loop()
            # Closed at once: well before the handshake time is up (it closed them all, too).
            deadline = loop.time() + tcp.HANDSHAKE_S / 2
            while sum(_closed(s) for s in strangers) < 4 * _EchoListener.max_connections:
                assert loop.time() < deadline, "connections past the limit were kept"
                await asyncio.sleep(0.05)
            # (ours: 40 client ends; the listener's: at most 8 in their handshakes)
            assert _descriptors(pid) <= held + len(strangers) + _EchoListener.max_connections + 4
            # While they hold the room, a real client gets in: the flooding address's oldest
            # handshake makes way, however fast the flood comes back.
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    "127.0.0.1", port, ssl=client_ctx, server_hostname="localhost"
                ),
                10,
            )
            writer.write(b"ping")
            assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
            writer.close()
        finally:
            for sock in strangers:
                sock.close()
        await listener.close()

    asyncio.run(scenario())


def _threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Threads:"))


def test_a_scrape_gets_in_while_strangers_hold_every_metrics_connection(tmp_path):
    # 50 connections sending a byte a second held all 16 places: no scrape got in for as long
    # as they went on (Prometheus saw the node down). The oldest connection still sending its
    # request now makes way for a new one.
    port = free_ports(1)[0]
    with ProcCluster(tmp_path, 1, extra=["--metrics-listen", f"127.0.0.1:{port}"]) as cluster:
        nid = cluster.wait_leader()
        url = f"http://127.0.0.1:{port}/metrics"
        strangers = []
        try:
            for _ in range(2 * metrics_http.MAX_CONNECTIONS):
                sock = socket.create_connection(
                    ("127.0.0.1", port), timeout=10, source_address=("127.0.0.2", 0)
                )
                sock.setblocking(False)
                with contextlib.suppress(OSError):
                    sock.send(b"GET /metrics HTTP/1.1\r\n")  # (and never the rest)
                strangers.append(sock)
            wait_for(
                "connections past the cap closed",
                lambda: sum(_closed(s) for s in strangers) >= metrics_http.MAX_CONNECTIONS,
                timeout=metrics_http.TIMEOUT_S / 2,
            )
            for _ in range(3):  # (each time the oldest stranger still there makes way)
                assert b"raftfast_" in urllib.request.urlopen(url, timeout=10).read()
        finally:
            for sock in strangers:
                sock.close()
        assert cluster.procs[nid].poll() is None


def test_idle_connections_to_the_metrics_port_are_capped_then_dropped(tmp_path):
    # prometheus_client's server ran a thread per connection and waited for its request
    # forever: 300 idle connections, 300 threads, for good. Then a timeout per read let a
    # byte every 9 s keep a connection (a hostile review).
    port = free_ports(1)[0]
    with ProcCluster(tmp_path, 1, extra=["--metrics-listen", f"127.0.0.1:{port}"]) as cluster:
        nid = cluster.wait_leader()
        pid = cluster.procs[nid].pid
        url = f"http://127.0.0.1:{port}/metrics"
        assert b"raftfast_" in urllib.request.urlopen(url, timeout=30).read()
        threads = _threads(pid)
        strangers = []
        try:
            for _ in range(8 * metrics_http.MAX_CONNECTIONS):
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                sock.setblocking(False)
                strangers.append(sock)
            wait_for(
                "connections past the cap closed",
                lambda: sum(_closed(s) for s in strangers) >= 7 * metrics_http.MAX_CONNECTIONS,
                timeout=metrics_http.TIMEOUT_S / 2,
            )
            assert _threads(pid) <= threads + metrics_http.MAX_CONNECTIONS + 2
            # The ones let in trickle a request, a byte a second (each read well within a
            # socket timeout): they are dropped at their connection's deadline all the same.
            request = b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"a" * 1000
            started = time.monotonic()
            sent = 0
            while not all(_closed(s) for s in strangers):
                assert time.monotonic() - started < metrics_http.TIMEOUT_S + 30, "kept"
                for sock in strangers:
                    with contextlib.suppress(OSError):
                        sock.send(request[sent : sent + 1])
                sent += 1
                time.sleep(1)
        finally:
            for sock in strangers:
                sock.close()
        assert b"raftfast_" in urllib.request.urlopen(url, timeout=30).read()
        assert cluster.procs[nid].poll() is None


def test_a_metrics_request_that_fails_writes_nothing_to_stderr(capfd):
    """A stranger's `Accept: text/plain; version=x` made prometheus_client raise: a 500 and a
    1 KB traceback on the node's stderr per request (plain text among JSON log lines). Now
    such a request gets the text format, and a request that fails is logged at debug level."""
    from prometheus_client import CollectorRegistry, Counter

    registry = CollectorRegistry()
    Counter("raftfast_probe", "a series to see", registry=registry).inc()
    [port] = free_ports(1)
    server, thread = metrics_http.serve("127.0.0.1", port, registry)
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        for accept in ("text/plain; version=x", "application/openmetrics-text; version=abc"):
            request = urllib.request.Request(url, headers={"Accept": accept})
            with urllib.request.urlopen(request, timeout=10) as answer:
                assert answer.status == 200 and b"raftfast_probe_total 1.0" in answer.read()

        class Broken:
            def collect(self):
                raise RuntimeError("a collector failed")

        registry.register(Broken())
        with contextlib.suppress(urllib.error.HTTPError):
            urllib.request.urlopen(url, timeout=10).read()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "metrics" not in err, err
