"""TLS, mutual TLS and client roles on a real 3-node cluster made from ``raftfast certs``.

Checked on every port a node opens (the client port, the peer gRPC port, the TCP replication
stream): plain connections, connections without a certificate and with one from another CA are
refused at the handshake; a node holding n2's peer certificate cannot speak as n1; each role
may do what docs/security.md says and no more, through our client, our CLI and raw gRPC.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from raftfast.address import split_address
from raftfast.client import SyncClient
from raftfast.core.types import MsgType
from raftfast.errors import ClusterUnavailableError, PermissionDeniedError
from raftfast.proto import raftfast_pb2 as pb
from raftfast.proto import raftfast_pb2_grpc as pb_grpc
from raftfast.security.tls import TLSFiles, channel_credentials
from raftfast.tools.localcluster import ProcCluster, make_certs, wait_for
from raftfast.transport.codec import encode_frame
from raftfast.transport.tcp import record
from tests.unread_calls import UnreadCalls

ROOT = Path(__file__).resolve().parents[2]
CLIENTS = "admin=admin,writer=write,reader=read,ghost=read"
PERMISSION_DENIED = "7"  # (a grpc-status as sent)


class TLSCluster:
    def __init__(self, tmp: Path) -> None:
        self.certs = tmp / "tls"
        make_certs(self.certs, ["n1", "n2", "n3", "n4"], CLIENTS)
        roles = self.certs / "roles.toml"  # ghost: a good certificate without a role
        roles.write_text("".join(x for x in roles.read_text().splitlines(True) if "ghost" not in x))
        self.other = tmp / "other-ca"  # the same names, signed by another CA
        make_certs(self.other, ["n1", "n2", "n3"], CLIENTS)
        (tmp / "data").mkdir()
        self.cluster = ProcCluster(tmp / "data", 3, tls=self.certs)

    def files(self, name: str, root: Path | None = None) -> TLSFiles:
        root = root or self.certs
        ca = "peer-ca.crt" if name.endswith("-peer") else "ca.crt"
        return TLSFiles(str(root / ca), str(root / f"{name}.crt"), str(root / f"{name}.key"))

    def client(self, name: str) -> SyncClient:
        return SyncClient(self.cluster.endpoints, timeout=20, tls=self.files(name))

    def channel(self, address: str, tls: TLSFiles | None) -> grpc.Channel:
        if tls is None:
            return grpc.insecure_channel(address)
        return grpc.secure_channel(address, channel_credentials(tls))

    def stream_address(self, nid: str) -> tuple[str, int]:
        with self.channel(self.cluster.peer_addrs[nid], self.files("n1-peer")) as ch:
            offset = pb_grpc.PeerStub(ch).ReplicationEndpoint(pb.PeerEmpty(), timeout=10)
        host, port = split_address(self.cluster.peer_addrs[nid])
        return host, port + offset.port_offset


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> Iterator[TLSCluster]:
    c = TLSCluster(tmp_path_factory.mktemp("tls"))
    try:
        c.cluster.start_all()
        leader = c.cluster.wait_leader(timeout=60)
        with c.client("admin") as admin:
            admin.put("ready", "1")
        # Every node in touch with the leader (a node that started late on a loaded machine
        # may wait out a gRPC reconnect backoff first): the tests compare their states.
        wait_for(
            "every node to know the leader",
            lambda: all(c.cluster.status(n).leader == leader for n in c.cluster.ids),
            timeout=60,
        )
        yield c
    except BaseException:
        print(c.cluster.log_tail())
        raise
    finally:
        c.cluster.stop_all()


def expect(call: Callable[[], object], code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    return info.value.details() or ""


def test_connections_without_a_good_certificate_are_refused_at_the_handshake(tls):
    unavailable = grpc.StatusCode.UNAVAILABLE
    ca_only = TLSFiles(str(tls.certs / "ca.crt"))
    foreign = tls.files("admin", tls.other)
    for nid in tls.cluster.ids:
        for tls_files in (None, ca_only, foreign):  # plain, no certificate, another CA
            with tls.channel(tls.cluster.addrs[nid], tls_files) as ch:
                expect(
                    lambda ch=ch: pb_grpc.KVStub(ch).Status(pb.StatusRequest(), timeout=5),
                    unavailable,
                )
        peer_ca_only = TLSFiles(str(tls.certs / "peer-ca.crt"))
        # the client CA's certificates are strangers on the peer port (and the reverse)
        for tls_files in (None, peer_ca_only, tls.files("n1-peer", tls.other), tls.files("admin")):
            with tls.channel(tls.cluster.peer_addrs[nid], tls_files) as ch:
                stub = pb_grpc.PeerStub(ch)
                expect(lambda s=stub: s.ReplicationEndpoint(pb.PeerEmpty(), timeout=5), unavailable)
        host, port = tls.stream_address(nid)
        with socket.create_connection((host, port), timeout=10) as plain:
            plain.sendall(record(encode_frame("raftfast", "n1", [])))
            assert _read_all(plain) == b""  # no refusal record: the TLS handshake failed
        for tls_files in (peer_ca_only, tls.files("n1-peer", tls.other)):
            ctx = tls_files.client_context()
            with pytest.raises((ssl.SSLError, ConnectionError)):
                with socket.create_connection((host, port), timeout=10) as raw:
                    with ctx.wrap_socket(raw, server_hostname=host) as s:
                        s.sendall(record(encode_frame("raftfast", "n1", [])))
                        assert _read_all(s) == b""
                        raise ConnectionError("closed")
    with tls.client("admin") as admin:
        admin.put("still", "up")


def _read_all(sock) -> bytes:
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except (ConnectionResetError, ssl.SSLError):
        pass
    return out


def test_a_node_holding_n2s_peer_certificate_cannot_speak_as_n1(tls):
    leader = tls.cluster.leader()
    target = next(nid for nid in tls.cluster.ids if nid not in (leader, "n2"))
    term = tls.cluster.status(target).term
    denied = grpc.StatusCode.PERMISSION_DENIED
    vote = pb.RaftMessage(type=MsgType.VOTE, src="n1", dst=target, term=term + 1, index=1 << 40)
    beat = pb.RaftMessage(type=MsgType.HEARTBEAT, src="n1", dst=target, term=term + 5)
    meta = pb.RaftMessage(type=MsgType.SNAPSHOT, src="n1", dst=target, term=term, index=1 << 30)
    chunk = pb.SnapshotChunk(cluster_id="raftfast", meta=meta, data=b"x", done=True)
    with tls.channel(tls.cluster.peer_addrs[target], tls.files("n2-peer")) as ch:
        peer = pb_grpc.PeerStub(ch)
        as_n1 = pb.Frame(cluster_id="raftfast", src="n1", messages=[vote])
        assert "authenticated as 'n2'" in expect(lambda: peer.RequestVote(as_n1, timeout=5), denied)
        beats = pb.Frame(cluster_id="raftfast", src="n1", messages=[beat])
        expect(lambda: list(peer.Replicate(iter([beats]), timeout=5)), denied)
        expect(lambda: peer.InstallSnapshot(iter([chunk]), timeout=5), denied)
        join = pb.JoinRequest(cluster_id="raftfast", id="n1", list_only=True)
        expect(lambda: peer.Join(join, timeout=5), denied)
    host, port = tls.stream_address(target)
    ctx = tls.files("n2-peer").client_context()
    with socket.create_connection((host, port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=host) as s:
            s.sendall(record(encode_frame("raftfast", "n1", [])))
            refusal = pb.StreamRefusal.FromString(_read_all(s)[4:])
    assert refusal.code == denied.value[0] and "authenticated as 'n2'" in refusal.details
    st = tls.cluster.status(target)
    assert (st.term, st.leader) == (term, leader)  # none of it reached the core


def test_each_role_may_do_what_it_may_and_no_more(tls):
    with tls.client("admin") as admin:
        admin.put("k", "admin")
    with tls.client("reader") as reader:
        assert reader.get("k") == b"admin" and reader.scan("k") == [(b"k", b"admin")]
        assert reader.status()["role"] and reader.members()["members"]
        for write in (
            lambda: reader.put("k", "reader"),  # the Session stream: refused per op
            lambda: reader.delete("k"),
            lambda: reader.put_many([("a", "1")]),
            lambda: reader.alarms() and reader.disarm_alarms(),
        ):
            with pytest.raises(PermissionDeniedError, match="role read; .* needs"):
                write()
    with tls.client("writer") as writer:
        writer.put("k", "writer")
        assert writer.cas("k", "writer", "again") and writer.get("k") == b"again"
        for admin_only in (
            lambda: writer.remove_member("n3"),
            lambda: writer.add_member("n9", "127.0.0.1:9", learner=True),
            lambda: writer.transfer_leader("n2"),
            lambda: writer.disarm_alarms(),
        ):
            with pytest.raises(PermissionDeniedError, match="needs admin"):
                admin_only()
    with tls.client("ghost") as ghost:  # a certificate the CA signed, with no role
        with pytest.raises(PermissionDeniedError, match=r"no role here; reading \(a Session"):
            ghost.get("k")
        with pytest.raises(PermissionDeniedError):
            ghost.put("k", "ghost")
    with tls.client("admin") as admin:
        assert admin.get("k") == b"again"
        admin.add_member("n9", "127.0.0.1:9", learner=True)
        assert "n9" in {m["id"] for m in admin.members()["members"]}
        admin.remove_member("n9")
        target = next(n for n in tls.cluster.ids if n != tls.cluster.leader())
        assert admin.transfer_leader(target) == target
        assert admin.disarm_alarms()["alarms"] == []


def test_health_needs_no_role_and_reflection_needs_read(tls):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    address = tls.cluster.addrs[tls.cluster.ids[0]]
    for name in ("ghost", "reader"):  # a certificate the CA signed, with no role; read
        with tls.channel(address, tls.files(name)) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            wait_for(
                "the node to serve",
                lambda stub=stub: (
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                    == health_pb2.HealthCheckResponse.SERVING
                ),
            )
    with tls.channel(address, tls.files("ghost")) as ch:
        with pytest.raises(grpc.RpcError) as info:
            list(ProtoReflectionDescriptorDatabase(ch).get_services())
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "needs read" in info.value.details()
    with tls.channel(address, tls.files("reader")) as ch:
        assert "raftfast.v1.KV" in ProtoReflectionDescriptorDatabase(ch).get_services()


def test_the_cli_with_certificates(tls):
    def cli(name: str, *args: str) -> subprocess.CompletedProcess:
        files = tls.files(name)
        cmd = [
            sys.executable,
            "-m",
            "raftfast.client.cli",
            "--endpoints",
            ",".join(tls.cluster.endpoints),
        ]
        cmd += ["--cacert", files.ca_file, "--cert", files.cert_file, "--key", files.key_file]
        return subprocess.run(
            [*cmd, *args], capture_output=True, text=True, timeout=60, env={"PYTHONPATH": str(ROOT)}
        )

    ok = cli("admin", "put", "cli", "1")
    assert ok.returncode == 0 and ok.stdout.strip() == "OK", ok.stderr
    for name, args in (("reader", ("put", "cli", "2")), ("writer", ("member", "remove", "n3"))):
        refused = cli(name, *args)
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode == 4 and len(lines) == 1, refused.stderr  # permission
        assert "needs" in lines[0] and "Traceback" not in refused.stderr
    plain = subprocess.run(
        [sys.executable, "-m", "raftfast.client.cli", "--endpoints", tls.cluster.endpoints[0],
         "--timeout", "2", "get", "cli"],
        capture_output=True, text=True, timeout=60, env={"PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    # a plain client cannot talk to a TLS port: unavailable (3), told to trust the CA
    assert plain.returncode == 3 and len(plain.stderr.strip().splitlines()) == 1
    assert "if the cluster uses TLS, trust its CA (raftfast --cacert FILE" in plain.stderr
    ca_only = SyncClient(
        tls.cluster.endpoints[0], timeout=2, tls=TLSFiles(tls.files("admin").ca_file)
    )
    with ca_only, pytest.raises(ClusterUnavailableError, match="present one .raftfast --cert FILE"):
        ca_only.get("cli")  # (the cluster asks for a client certificate)


def test_a_call_without_its_role_is_refused_before_its_request_comes(tls):
    # Calls whose request never came held the port's places until their connection closed,
    # a certificate without a role included: its role was checked once the request was there.
    port = split_address(tls.cluster.addrs["n1"])[1]
    raw = UnreadCalls(port, tls.files("ghost").client_context())
    try:
        streams = [raw.open("/raftfast.v1.KV/Get", None) for _ in range(20)]
        streams.append(raw.open("/etcdserverpb.KV/Put", None))
        until = time.monotonic() + 30
        while len(raw.status) < len(streams) and time.monotonic() < until:
            raw.pump(0.2)
        assert raw.status == dict.fromkeys(streams, PERMISSION_DENIED), raw.status
    finally:
        raw.close()
    with tls.client("reader") as reader:  # (a role: its call goes on to its request)
        assert reader.get("ready") == b"1"


def test_a_node_joins_over_tls_and_writes_survive_a_restart(tls):
    c = tls.cluster
    with tls.client("admin") as admin:
        for i in range(20):
            admin.put(f"before-join-{i}", str(i))
        c.join("n4", via="n2")
        wait_for(
            "n4 to join as a voter",
            lambda: {m["id"]: m["role"] for m in admin.members()["members"]}.get("n4") == "voter",
            timeout=90,
        )
        target = c.status(c.leader()).commit_index
        c.wait_applied("n4", target, "n4 to catch up")
        admin.remove_member("n4")
    c.kill("n4")
    c.stop_all()
    for nid in ("n1", "n2", "n3"):
        c.start(nid, first_time=False)
    c.wait_leader(timeout=60)
    with tls.client("reader") as reader:
        assert [reader.get(f"before-join-{i}") for i in range(20)] == [
            str(i).encode() for i in range(20)
        ]


def test_no_client_can_spend_another_clients_exactly_once_numbers(tls):
    # Dedup is per client id. With certificates, ids are each certificate's own: a writer that
    # reuses admin's id with a huge sequence cannot make admin's next writes count as late
    # duplicates (acknowledged, never applied).
    leader = tls.cluster.leader()
    with tls.channel(tls.cluster.addrs[leader], tls.files("writer")) as ch:
        pb_grpc.KVStub(ch).Put(
            pb.PutRequest(key=b"spent", value=b"writer", client_id=77, sequence=1 << 62),
            timeout=10,
        )
    with tls.channel(tls.cluster.addrs[leader], tls.files("admin")) as ch:
        kv = pb_grpc.KVStub(ch)
        kv.Put(pb.PutRequest(key=b"spent", value=b"admin", client_id=77, sequence=1), timeout=10)
        assert kv.Get(pb.GetRequest(key=b"spent"), timeout=10).value == b"admin"


def _session_results(sock, hello: bytes, frames: bytes = b"") -> list[pb.SessionResult]:
    sock.sendall(hello + frames)
    data = _read_all(sock)
    out = []
    while len(data) >= 4:
        size = int.from_bytes(data[:4], "big")
        out.append(pb.SessionResult.FromString(data[4 : 4 + size]))
        data = data[4 + size :]
    return out


def test_the_session_stream_over_tcp_takes_the_client_ports_tls_and_roles(tls):
    hello = record(pb.SessionHello(cluster_id="raftfast").SerializeToString())
    put = pb.Op(kind=pb.Op.PUT, key=b"tcp", value=b"reader", sequence=1)
    get = pb.Op(kind=pb.Op.GET, key=b"tcp-k")
    frame = pb.SessionFrame(frame_id=1, client_id=5, ops=[put, get])
    ca_only = TLSFiles(str(tls.certs / "ca.crt"))
    with tls.client("admin") as admin:
        admin.put("tcp-k", "1")
    for nid in ("n1", "n2", "n3"):  # (n4 has left)
        addr = tls.cluster.addrs[nid]
        with tls.client("admin") as admin:
            port = admin.status(addr)["session_port"]
        host = split_address(addr)[0]
        with socket.create_connection((host, port), timeout=10) as plain:
            plain.sendall(hello)
            assert _read_all(plain) == b""  # no status record: the TLS handshake failed
        for tls_files in (ca_only, tls.files("admin", tls.other)):  # no certificate, another CA
            with pytest.raises((ssl.SSLError, ConnectionError)):
                with socket.create_connection((host, port), timeout=10) as raw:
                    with tls_files.client_context().wrap_socket(raw, server_hostname=host) as s:
                        assert _session_results(s, hello) == []
                        raise ConnectionError("closed")

        def over_tls(
            name: str, frames: bytes = b"", host: str = host, port: int = port
        ) -> list[pb.SessionResult]:
            ctx = tls.files(name).client_context()
            with socket.create_connection((host, port), timeout=10) as raw:
                with ctx.wrap_socket(raw, server_hostname=host) as s:
                    if frames:
                        s.sendall(hello + frames)
                        answer = s.recv(65536)  # (TLS cannot half-close: one answer, then go)
                        while len(answer) < 4 or len(answer) < 4 + int.from_bytes(answer[:4]):
                            answer += s.recv(65536)
                        return [pb.SessionResult.FromString(answer[4:])]
                    return _session_results(s, hello)

        (end,) = over_tls("ghost")  # a certificate with no role: not even a read
        assert (end.frame_id, end.code) == (0, grpc.StatusCode.PERMISSION_DENIED.value[0])
        assert "no role" in end.error
        # ... told at once, before any hello (it held a connection of the port's until its
        # hello was overdue, 5 s: 1,200 of them, reopened as they were dropped, kept every
        # client out of a hunt's port)
        with socket.create_connection((host, port), timeout=10) as raw:
            ctx = tls.files("ghost").client_context()
            with ctx.wrap_socket(raw, server_hostname=host) as s:
                s.settimeout(3)  # (< the 5 s a silent connection has)
                told = _read_all(s)
        end = pb.SessionResult.FromString(told[4 : 4 + int.from_bytes(told[:4], "big")])
        assert (end.frame_id, end.code) == (0, grpc.StatusCode.PERMISSION_DENIED.value[0])
        (answer,) = over_tls("reader", record(frame.SerializeToString()))
        put_result, get_result = answer.results
        assert put_result.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
        assert "role read" in put_result.error
        assert get_result.code in (0, grpc.StatusCode.UNAVAILABLE.value[0])  # (a follower)
    with tls.client("reader") as reader:  # our client goes over TCP under TLS
        assert reader.get("tcp-k") == b"1"
        assert reader._blocking is not None and reader._blocking.connected_to
