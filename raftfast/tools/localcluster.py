"""A local cluster of real `raftfast-node` processes on 127.0.0.1 (ports: tools/ports.py).

Used by `make run`, `raftfast bench` and the integration tests. Every process is started by a
``ProcCluster`` and stopped by it, by PID. Nothing sleeps to "let things settle": callers poll a
condition with a deadline (``wait_for``).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import grpc

from raftfast.address import split_address
from raftfast.proto import raftfast_pb2 as pb
from raftfast.proto import raftfast_pb2_grpc as pb_grpc
from raftfast.security.tls import TLSFiles, channel_credentials
from raftfast.tools.ports import free_ports, release_ports

__all__ = ["ProcCluster", "free_ports", "make_certs", "wait_for"]

T = TypeVar("T")


def wait_for(what: str, check: Callable[[], T], timeout: float = 30.0, every: float = 0.05) -> T:
    """Poll ``check`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except Exception as exc:  # noqa: BLE001 - keep polling, report the last one
            last_error = exc
        time.sleep(every)
    raise AssertionError(
        f"timed out after {timeout}s waiting for {what} (last error: {last_error})"
    )


def make_certs(directory: Path, ids: list[str], clients: str = "admin=admin") -> TLSFiles:
    """``raftfast certs`` for nodes ``ids`` into ``directory``; the admin client's TLSFiles."""
    from raftfast.security import certs

    args = argparse.Namespace(
        dir=str(directory),
        nodes=",".join(ids),
        clients=clients,
        hosts="localhost,127.0.0.1",
        days=30,
        force=True,
        add=False,
    )
    certs.main(args, say=lambda line: None)
    return TLSFiles(
        str(directory / "ca.crt"), str(directory / "admin.crt"), str(directory / "admin.key")
    )


class ProcCluster:
    """``peer_view(nid)`` may give node ``nid`` its own addresses for the others (a fault
    test routes each directed link through a proxy); by default everyone dials directly.

    ``node_extra(nid)``: flags for node ``nid`` alone, after ``extra``.

    ``tls``: a directory made by ``make_certs`` (or ``raftfast certs``) naming every node id
    (those that join later too): each node then serves peers on a port of its own
    (``peer_addrs``), everything is TLS, clients present certificates, and ``client_tls`` is
    the admin client's. ``restore``: a backup (``raftfast snapshot save``) the nodes start
    from, the first time."""

    def __init__(
        self,
        tmp: Path,
        n: int = 3,
        # Tests run with 50 ms ticks, twice the default (election timeouts 600-900 ms): lenient
        # on a loaded CI machine. None: the node's defaults (raftfast bench, make run).
        tick_ms: int | None = 50,
        extra: list[str] | None = None,
        peer_view: Callable[[str], dict[str, str]] | None = None,
        env: dict[str, str] | None = None,
        tls: Path | None = None,
        restore: Path | None = None,
        node_extra: Callable[[str], list[str]] | None = None,
    ):
        self.tmp = tmp
        self.node_extra = node_extra  # more flags for one node (say, its --metrics-listen)
        self.env = {**os.environ, **env} if env else None
        self.peer_view = peer_view
        self.tls = tls
        self.restore = restore  # a backup every node starts from, the first time
        ports = free_ports(4 * n)
        self._ports = ports  # (and those of nodes that join)
        self.ids = [f"n{i + 1}" for i in range(n)]
        self.addrs = {nid: f"127.0.0.1:{port}" for nid, port in zip(self.ids, ports, strict=False)}
        # Fixed replication stream ports (not the default "any free port"), so that a fault
        # proxy can sit in front of them across restarts.
        self.stream_ports = dict(zip(self.ids, ports[n : 2 * n], strict=True))
        # Fixed Session stream ports too: a client that knows one finds a restarted node there.
        self.session_ports = dict(zip(self.ids, ports[3 * n :], strict=True))
        # Where peers dial each node: its own port with TLS, else the client port.
        self.peer_addrs = dict(self.addrs)
        if tls is not None:
            self.peer_addrs = {
                nid: f"127.0.0.1:{port}"
                for nid, port in zip(self.ids, ports[2 * n : 3 * n], strict=True)
            }
        self.tick_ms = tick_ms
        self.extra = extra or []
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self.joins: dict[str, str] = {}  # node added later -> the member it joined through

    def __enter__(self) -> ProcCluster:
        """``with ProcCluster(...) as c``: every node started; on the way out every node is
        stopped, and on failure the tail of each node's log is printed first."""
        self.start_all()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None:
                print(self.log_tail())
        finally:  # (stopped even when the print fails: a closed pipe left nodes running)
            self.stop_all()
            release_ports(self._ports)

    @property
    def client_tls(self) -> TLSFiles | None:
        if self.tls is None:
            return None
        return TLSFiles(
            str(self.tls / "ca.crt"), str(self.tls / "admin.crt"), str(self.tls / "admin.key")
        )

    def stream_offsets(self) -> dict[str, int]:
        """Each node's replication stream port minus its peer gRPC port (what it announces)."""
        return {
            nid: self.stream_ports[nid] - split_address(addr)[1]
            for nid, addr in self.peer_addrs.items()
        }

    @property
    def endpoints(self) -> list[str]:
        return list(self.addrs.values())

    def start(self, nid: str, first_time: bool = True) -> None:
        data = self.tmp / nid
        log_path = self.tmp / f"{nid}.log"
        if first_time and not (data / "node.json").exists() and nid in self.joins:
            args = ["--id", nid, "--listen", self.addrs[nid], "--join", self.joins[nid]]
        elif first_time and not (data / "node.json").exists():
            view = self.peer_view(nid) if self.peer_view else self.peer_addrs
            peers = ",".join(f"{k}={v}" for k, v in view.items())
            args = ["--id", nid, "--listen", self.addrs[nid], "--peers", peers]
            if self.restore is not None:
                args += ["--restore", str(self.restore)]
        else:
            args = []  # a restart needs only the data directory
        if self.tls is not None:
            # (TLS settings are not part of the stored identity: every start names them)
            if args:
                args += ["--peer-listen", self.peer_addrs[nid]]
            args += ["--config", str(self.tls / f"{nid}.toml")]
        cmd = [
            sys.executable,
            "-m",
            "raftfast.server.node_cli",
            *args,
            "--data-dir",
            str(data),
            *(["--tick-ms", str(self.tick_ms)] if self.tick_ms is not None else []),
            "--peer-stream-port",
            str(self.stream_ports[nid]),
            "--client-stream-port",
            str(self.session_ports[nid]),
            *self.extra,
            *(self.node_extra(nid) if self.node_extra else ()),
        ]
        self.logs[nid] = log_path
        with open(log_path, "ab") as out:
            self.procs[nid] = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env
            )

    def join(self, nid: str, via: str) -> None:
        """Start a new, empty node ``nid`` that joins the cluster through member ``via``."""
        if nid in self.addrs:
            raise ValueError(f"{nid} exists already")
        self.ids.append(nid)
        port, stream_port, peer_port, session_port = free_ports(4)
        self._ports += [port, stream_port, peer_port, session_port]
        self.session_ports[nid] = session_port
        self.addrs[nid] = f"127.0.0.1:{port}"
        self.stream_ports[nid] = stream_port
        self.peer_addrs[nid] = f"127.0.0.1:{peer_port}" if self.tls else self.addrs[nid]
        self.joins[nid] = self.peer_addrs[via]
        self.start(nid)

    def exited(self, nid: str) -> int | None:
        """The exit code of ``nid``'s process, or None while it runs (or was never started)."""
        proc = self.procs.get(nid)
        return None if proc is None else proc.poll()

    def start_all(self) -> None:
        for nid in self.ids:
            self.start(nid)

    def kill(self, nid: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(nid, None)
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            proc.wait(timeout=30)

    def stop_all(self) -> None:
        for nid in list(self.procs):
            proc = self.procs[nid]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for nid in list(self.procs):
            proc = self.procs.pop(nid)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)

    def channel(self, nid: str) -> grpc.Channel:
        """A (blocking) channel to ``nid``'s client port, with the admin certificate if TLS."""
        tls = self.client_tls
        if tls is None:
            return grpc.insecure_channel(self.addrs[nid])
        return grpc.secure_channel(self.addrs[nid], channel_credentials(tls))

    def status(self, nid: str, timeout: float = 1.0) -> pb.StatusResponse:
        with self.channel(nid) as ch:
            return pb_grpc.KVStub(ch).Status(pb.StatusRequest(), timeout=timeout)

    def leader(self, among: list[str] | None = None) -> str | None:
        """The node that a majority of the live nodes agree is the leader, if any."""
        votes: dict[str, int] = {}
        for nid in among or list(self.procs):
            try:
                st = self.status(nid)
            except grpc.RpcError:
                continue
            if st.role == "leader":
                votes[st.id] = votes.get(st.id, 0) + len(self.ids)  # it claims it itself
            elif st.leader:
                votes[st.leader] = votes.get(st.leader, 0) + 1
        best = max(votes, key=votes.get, default=None)
        if best is not None and best in self.procs:
            try:
                if self.status(best).role == "leader":
                    return best
            except grpc.RpcError:
                return None
        return None

    def wait_applied(
        self, nid: str, index: int, what: str, timeout: float = 60.0, every: float = 0.05
    ) -> None:
        """Poll until node ``nid`` has applied ``index`` (say, it caught up after a restart)."""
        wait_for(what, lambda: self.status(nid).applied_index >= index, timeout, every)

    def wait_leader(self, timeout: float = 30.0, among: list[str] | None = None) -> str:
        return wait_for("a leader", lambda: self.leader(among), timeout)

    def log_tail(self) -> str:
        parts = []
        for nid, path in self.logs.items():
            if path.exists():
                lines = path.read_text(errors="replace").splitlines()[-15:]
                parts.append(f"--- {nid} ---\n" + "\n".join(lines))
        return "\n".join(parts)
