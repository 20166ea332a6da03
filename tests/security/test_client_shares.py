"""One client certificate holds at most a quarter of a port (raftfast.security.roles:
ClientShares). A certificate without a role may call health Check; calls whose answers it
never let through (no flow-control window) held every place of the port, and kept an admin
out for as long as its 9 connections stayed open (a hunt)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from grpc_health.v1 import health_pb2

import raftfast
from raftfast.address import split_address
from raftfast.kv.fsm import KVStateMachine
from raftfast.security.tls import TLSFiles
from raftfast.server import driver, kv_service
from raftfast.tools.localcluster import free_ports, make_certs
from tests.unread_calls import UnreadCalls

CAP = 100
RESOURCE_EXHAUSTED = "8"


def _tls_node(tmp_path) -> tuple[raftfast.Node, Callable[[str], TLSFiles]]:
    """A node under --client-cert-auth and roles (admin, reader; ghost: a certificate the CA
    signed, without a role), and the TLS files of each client."""
    certs = tmp_path / "tls"
    make_certs(certs, ["n1"], "admin=admin,reader=read,ghost=read")
    roles = certs / "roles.toml"
    roles.write_text("".join(x for x in roles.read_text().splitlines(True) if "ghost" not in x))
    port, peer_port = free_ports(2)

    def files(name: str) -> TLSFiles:
        ca, crt, key = (str(certs / f) for f in ("ca.crt", f"{name}.crt", f"{name}.key"))
        return TLSFiles(ca, crt, key)

    node = raftfast.Node(
        id="n1", listen=f"127.0.0.1:{port}", peer_listen=f"127.0.0.1:{peer_port}",
        peers={"n1": f"127.0.0.1:{peer_port}"}, data_dir=str(tmp_path / "n1"),
        state_machine=KVStateMachine(), tick_ms=20,
        cert_file=str(certs / "n1.crt"), key_file=str(certs / "n1.key"),
        trusted_ca_file=str(certs / "ca.crt"), client_cert_auth=True,
        auth_roles=str(roles), peer_cert_file=str(certs / "n1-peer.crt"),
        peer_key_file=str(certs / "n1-peer.key"), peer_trusted_ca_file=str(certs / "peer-ca.crt"),
    )  # fmt: skip
    return node, files


def test_a_certificate_holds_at_most_a_quarter_of_the_calls(tmp_path, monkeypatch):
    monkeypatch.setattr(driver, "MAX_CONCURRENT_RPCS", CAP)
    node, files = _tls_node(tmp_path)
    port = split_address(node.settings.listen)[1]

    async def main() -> None:
        async with node:
            await node.wait_for_leader()
            raw = await asyncio.to_thread(UnreadCalls, port, files("ghost").client_context())
            try:
                check = health_pb2.HealthCheckRequest().SerializeToString()
                calls = [
                    await asyncio.to_thread(raw.open, "/grpc.health.v1.Health/Check", check)
                    for _ in range(CAP + 20)
                ]
                share = CAP // 4
                until = time.monotonic() + 30
                while len(raw.status) < len(calls) - share and time.monotonic() < until:
                    await asyncio.to_thread(raw.pump, 0.1)
                refused = [raw.status.get(c) for c in calls[share:]]
                assert refused == [RESOURCE_EXHAUSTED] * len(refused), raw.status
                assert not any(c in raw.status for c in calls[:share])  # (held, unanswered)
                # Everyone else has the rest, the ghost's connection still open.
                async with raftfast.Client(
                    node.settings.listen, tls=files("admin"), timeout=20
                ) as admin:
                    await admin.put(b"k", b"admin's")
                async with raftfast.Client(
                    node.settings.listen, tls=files("reader"), timeout=20
                ) as reader:
                    assert await reader.get(b"k") == b"admin's"
            finally:
                await asyncio.to_thread(raw.close)

    asyncio.run(main())


class _Context:
    def __init__(self) -> None:
        self.done: list = []

    def add_done_callback(self, callback) -> None:
        self.done.append(callback)

    def end(self) -> None:
        for callback in self.done:
            callback(self)


def test_shares_count_calls_and_streams_of_each_kind_until_they_end():
    from raftfast.security.roles import ClientShares

    session = "/raftfast.v1.KV/Session"
    shares = ClientShares(most_calls=5, most_streams={session: 2})
    streams = [_Context() for _ in range(2)]
    assert [shares.take("app", session, c) for c in streams] == [None, None]
    why = shares.take("app", session, _Context())
    assert why is not None and "2 KV Session streams open" in why
    assert shares.take("other", session, _Context()) is None  # (each client its own)
    calls = [_Context() for _ in range(3)]
    assert [shares.take("app", "/raftfast.v1.KV/Get", c) for c in calls] == [None] * 3
    why = shares.take("app", "/raftfast.v1.KV/Get", _Context())
    assert why is not None and "5 calls under way" in why
    streams[0].end()
    calls[0].end()
    assert shares.take("app", session, _Context()) is None  # (a stream's place back)
    assert shares.calls["app"] == 4 and shares.streams["app", session] == 2
    for c in [*streams[1:], *calls[1:]]:
        c.end()
    assert shares.calls == {"app": 1, "other": 1}


def test_a_certificate_has_a_quarter_of_the_session_streams_its_idle_ones_made_way_for(
    tmp_path, monkeypatch
):
    # (the review: a share checked before the stream opened refused a client whose own
    # streams were all idle, where the node would have ended one of them)
    monkeypatch.setattr(kv_service, "SESSION_SHARE", 2)
    monkeypatch.setattr(kv_service, "IDLE_SESSION_S", 0.3)
    node, files = _tls_node(tmp_path)

    async def main() -> None:
        async with node:
            await node.wait_for_leader()
            address = node.settings.listen
            async with raftfast.Client(address, tls=files("admin"), timeout=20) as admin:
                await admin.put(b"k", b"v")
            clients = [
                raftfast.Client(address, tls=files("reader"), timeout=20, session_transport=kind)
                for kind in ("grpc", "auto", "grpc")  # (auto: over TCP here)
            ]
            try:
                for client in clients[:2]:
                    assert await client.get(b"k") == b"v"  # (a Session stream each)
                owned = [u for u in node._running().app._service._uses if u.owner == "reader"]
                assert len(owned) == 2
                await asyncio.sleep(0.5)  # (both idle past IDLE_SESSION_S)
                assert await clients[2].get(b"k") == b"v"  # (one of its own made way)
                owned = [u for u in node._running().app._service._uses if u.owner == "reader"]
                assert len(owned) == 2
                assert not [u for u in node._running().app._service._uses if u.owner == "admin"]
            finally:
                for client in clients:
                    await client.close()

    asyncio.run(main())
