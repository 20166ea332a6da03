"""Bad input on every surface of a running node: malformed and oversized gRPC messages to the
KV and Peer services, forged and stale peer frames, and bad command lines and config files.

The cluster is two real ``raftfast-node`` processes (n1, n2) and a fake third member n3 served
by this test: n1 and n2 are a majority, so the cluster commits, and whatever they send to n3
(their answers to our forged messages) is recorded here. After every bad input the nodes must
still serve and the cluster must still commit writes.

Nothing sleeps to let things settle: every wait polls with a deadline. Every process started
here is stopped by PID in a finally block.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from raftfast._accel import encode_uniform
from raftfast.address import split_address
from raftfast.client import SyncClient
from raftfast.core.types import MsgType
from raftfast.proto import raftfast_pb2 as pb
from raftfast.proto import raftfast_pb2_grpc as pb_grpc
from raftfast.tools.localcluster import free_ports, wait_for
from raftfast.transport.grpc import CHANNEL_OPTIONS
from raftfast.transport.tcp import record

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = "raftfast"
MAX_MESSAGE = dict(CHANNEL_OPTIONS)["grpc.max_receive_message_length"]
NO_LIMIT = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
RAW = {"request_serializer": bytes, "response_deserializer": bytes}


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAFTFAST_")}
    if os.environ.get("RAFTFAST_PUREPYTHON"):
        env["RAFTFAST_PUREPYTHON"] = "1"
    env["PYTHONPATH"] = str(ROOT)
    return env


# -- the cluster: two real nodes and a recording fake ------------------------------------------


class FakePeer(pb_grpc.PeerServicer):
    """Member n3: answers nothing, records every message the real nodes send it."""

    def __init__(self) -> None:
        self.messages: list[pb.RaftMessage] = []
        self.lock = threading.Lock()

    def _record(self, f: pb.Frame) -> None:
        with self.lock:
            self.messages.extend(f.messages)

    def Replicate(self, request_iterator, context):  # noqa: N802 - gRPC naming
        for f in request_iterator:
            self._record(f)
        return
        yield

    def RequestVote(self, request, context):  # noqa: N802
        self._record(request)
        return pb.PeerEmpty()

    def find(self, pred: Callable[[pb.RaftMessage], bool]) -> list[pb.RaftMessage]:
        with self.lock:
            return [m for m in self.messages if pred(m)]


class Duo:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        ports = free_ports(3)
        self.addrs = {f"n{i + 1}": f"127.0.0.1:{p}" for i, p in enumerate(ports)}
        self.fake = FakePeer()
        self.server = grpc.server(ThreadPoolExecutor(max_workers=16), options=CHANNEL_OPTIONS)
        pb_grpc.add_PeerServicer_to_server(self.fake, self.server)
        self.server.add_insecure_port(self.addrs["n3"])
        self.procs: dict[str, subprocess.Popen] = {}
        self.channels = {
            nid: grpc.insecure_channel(self.addrs[nid], options=NO_LIMIT) for nid in ("n1", "n2")
        }
        self.keys = itertools.count()

    @property
    def real(self) -> list[str]:
        return ["n1", "n2"]

    def start(self) -> None:
        self.server.start()
        peers = ",".join(f"{k}={v}" for k, v in self.addrs.items())
        for nid in self.real:
            cmd = [
                sys.executable,
                "-m",
                "raftfast.server.node_cli",
                "--id",
                nid,
                "--peers",
                peers,
                "--data-dir",
                str(self.tmp / nid),
                "--tick-ms",
                "50",
            ]
            with open(self.tmp / f"{nid}.log", "ab") as out:
                self.procs[nid] = subprocess.Popen(
                    cmd, stdout=out, stderr=subprocess.STDOUT, env=clean_env()
                )

    def stop(self) -> None:
        for ch in self.channels.values():
            ch.close()
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)
        self.server.stop(None)

    def kv(self, nid: str) -> pb_grpc.KVStub:
        return pb_grpc.KVStub(self.channels[nid])

    def peer(self, nid: str) -> pb_grpc.PeerStub:
        return pb_grpc.PeerStub(self.channels[nid])

    def status(self, nid: str) -> pb.StatusResponse:
        return self.kv(nid).Status(pb.StatusRequest(), timeout=2)

    def leader(self) -> str:
        def find() -> str | None:
            for nid in self.real:
                st = self.status(nid)
                if st.role == "leader":
                    other = self.status(next(n for n in self.real if n != nid))
                    if other.leader == nid and other.term == st.term:
                        return nid
            return None

        return wait_for("a leader known to both real nodes", find, timeout=30)

    def assert_healthy(self) -> None:
        """Both processes run and answer, and the cluster commits a write everyone applies."""
        for nid, proc in self.procs.items():
            assert proc.poll() is None, f"{nid} exited with {proc.returncode}: {self.log(nid)}"
        key = f"healthy-{next(self.keys)}"
        with SyncClient([self.addrs[n] for n in self.real], timeout=30) as c:
            c.put(key, "ok")
            assert c.get(key) == b"ok"
        leader = self.leader()
        target = self.status(leader).commit_index
        for nid in self.real:
            wait_for(
                f"{nid} to apply index {target}",
                lambda n=nid: self.status(n).applied_index >= target,
                timeout=30,
            )
            assert (
                self.kv(nid)
                .Get(pb.GetRequest(key=key.encode(), read_mode=pb.READ_STALE), timeout=5)
                .value
                == b"ok"
            )

    def log(self, nid: str) -> str:
        path = self.tmp / f"{nid}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


@pytest.fixture(scope="module")
def duo(tmp_path_factory) -> Iterator[Duo]:
    d = Duo(tmp_path_factory.mktemp("duo"))
    try:
        d.start()
        d.leader()
        d.assert_healthy()
        yield d
    except BaseException:
        for nid in d.real:
            print(f"--- {nid} ---\n{d.log(nid)}")
        raise
    finally:
        d.stop()


def frame(src: str, *msgs: pb.RaftMessage, cluster_id: str = CLUSTER) -> pb.Frame:
    return pb.Frame(cluster_id=cluster_id, src=src, messages=list(msgs))


def replicate(stub: pb_grpc.PeerStub, *frames: pb.Frame) -> None:
    """Send frames on a Replicate stream and wait until the node has processed all of them
    (it answers nothing and ends the call once we close our side)."""
    list(stub.Replicate(iter(frames), timeout=10))


def tcp_stream(duo: Duo, nid: str) -> socket.socket:
    """A raw connection to ``nid``'s TCP replication stream (the port it announces)."""
    offset = duo.peer(nid).ReplicationEndpoint(pb.PeerEmpty(), timeout=10).port_offset
    assert offset != 0, "the node offers no TCP replication stream"
    port = split_address(duo.addrs[nid])[1] + offset
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def tcp_refusal(duo: Duo, nid: str, data: bytes) -> pb.StreamRefusal:
    """Write ``data`` on a fresh TCP replication stream; the node must answer with exactly
    one refusal record and close the stream."""
    with tcp_stream(duo, nid) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):  # until the node closes (the socket timeout bounds it)
            received += chunk
    assert len(received) >= 4, f"no refusal from {nid}: {received!r}"
    size = int.from_bytes(received[:4], "big")
    assert len(received) == 4 + size, received
    return pb.StreamRefusal.FromString(received[4:])


def expect_code(call: Callable[[], object], code: grpc.StatusCode) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    return info.value


# -- the KV service -----------------------------------------------------------------------------

KV_METHODS = ["Put", "Get", "Delete", "CompareAndSwap", "Scan", "Status"]
# grpcio answers a request it cannot deserialize itself, before any raftfast code runs.
UNPARSABLE = (
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.INVALID_ARGUMENT,
)
GARBAGE = [b"\xff\xff\xff\xff\x0f", b"\x0a\xff\xff\xff\xff\x0f", b"\x12", bytes(range(256))]


def test_garbage_bytes_to_every_kv_method(duo):
    leader = duo.leader()
    ch = duo.channels[leader]
    for method in KV_METHODS:
        call = ch.unary_unary(f"/raftfast.v1.KV/{method}", **RAW)
        for junk in GARBAGE:
            with pytest.raises(grpc.RpcError) as info:
                call(junk, timeout=10)
            assert info.value.code() in UNPARSABLE, (method, junk, info.value)
    session = ch.stream_stream("/raftfast.v1.KV/Session", **RAW)
    with pytest.raises(grpc.RpcError) as info:
        list(session(iter([b"\xff\xff\xff"]), timeout=10))
    assert info.value.code() in UNPARSABLE
    duo.assert_healthy()


def test_nonsense_fields_are_invalid_argument(duo):
    kv = duo.kv(duo.leader())
    bad = [
        lambda: kv.Get(pb.GetRequest(key=b"k", read_mode=99), timeout=10),
        lambda: kv.Scan(pb.ScanRequest(prefix=b"", limit=10**9), timeout=10),
        lambda: kv.Scan(pb.ScanRequest(prefix=b"p" * 5000), timeout=10),
        lambda: kv.CompareAndSwap(
            pb.CasRequest(key=b"k", expect_absent=True, expected=b"x", value=b"v"), timeout=10
        ),
        lambda: kv.Delete(pb.DeleteRequest(key=b""), timeout=10),
    ]
    for call in bad:
        err = expect_code(call, grpc.StatusCode.INVALID_ARGUMENT)
        assert err.details()
    # The Session stream reports bad ops per op and keeps going.
    ops = [
        pb.Op(kind=99, key=b"k"),
        pb.Op(kind=pb.Op.PUT, key=b""),
        pb.Op(kind=pb.Op.GET, key=b"k", read_mode=42),
        pb.Op(kind=pb.Op.PUT, key=b"session-ok", value=b"1", sequence=1),
    ]
    results = list(
        kv.Session(iter([pb.SessionFrame(frame_id=1, client_id=991, ops=ops)]), timeout=10)
    )
    codes = [r.code for r in results[0].results]
    invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert codes == [invalid, invalid, invalid, 0], results
    duo.assert_healthy()


def test_messages_above_the_receive_limit_are_resource_exhausted(duo):
    leader = duo.leader()
    big = b"v" * (MAX_MESSAGE + 1)
    expect_code(
        lambda: duo.kv(leader).Put(pb.PutRequest(key=b"big", value=big), timeout=30),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    follower = next(n for n in duo.real if n != leader)
    huge = pb.RaftMessage(type=MsgType.HEARTBEAT, src=leader, dst=follower, entries=big)
    expect_code(
        lambda: duo.peer(follower).RequestVote(frame(leader, huge), timeout=30),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    duo.assert_healthy()


# -- the Peer service: malformed and refused frames -------------------------------------------


def test_garbage_bytes_to_the_peer_service(duo):
    for nid in duo.real:
        ch = duo.channels[nid]
        vote = ch.unary_unary("/raftfast.v1.Peer/RequestVote", **RAW)
        stream = ch.stream_stream("/raftfast.v1.Peer/Replicate", **RAW)
        for junk in GARBAGE:
            with pytest.raises(grpc.RpcError):
                vote(junk, timeout=10)
            with pytest.raises(grpc.RpcError):
                list(stream(iter([junk]), timeout=10))
        # An empty snapshot chunk names no cluster: refused before anything is written.
        expect_code(
            lambda c=ch: list(
                c.stream_unary("/raftfast.v1.Peer/InstallSnapshot", **RAW)(iter([b""]))
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
        )
        with pytest.raises(grpc.RpcError):
            ch.stream_unary("/raftfast.v1.Peer/InstallSnapshot", **RAW)(iter(GARBAGE), timeout=10)
    duo.assert_healthy()


def test_garbage_bytes_to_the_tcp_replication_stream(duo):
    invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    for nid in duo.real:
        for junk in GARBAGE:
            refusal = tcp_refusal(duo, nid, record(junk))
            assert refusal.code == invalid and "undecodable frame" in refusal.details
        # More data after a refused record is read and dropped: the refusal still arrives
        # (closing with it unread would send a reset that can overtake the refusal).
        refusal = tcp_refusal(duo, nid, record(GARBAGE[0]) + record(b"x" * 1000) * 2000)
        assert refusal.code == invalid and "undecodable frame" in refusal.details
        # A length beyond the limit is refused before anything that large is buffered.
        refusal = tcp_refusal(duo, nid, (MAX_MESSAGE + 1).to_bytes(4, "big") + b"x" * 100)
        assert refusal.code == invalid and "too large" in refusal.details
        # A stream that ends inside a record, or says nothing, is just closed.
        for partial in (b"", b"\x00\x00", record(b"abc")[:-1]):
            with tcp_stream(duo, nid) as sock:
                sock.sendall(partial)
    duo.assert_healthy()


def refused_frames(dst: str, leader: str, term: int) -> list[tuple[pb.Frame, grpc.StatusCode]]:
    hb = pb.RaftMessage(type=MsgType.HEARTBEAT, src="n3", dst=dst, term=term)
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    return [
        (frame("n3", hb, cluster_id="other"), grpc.StatusCode.FAILED_PRECONDITION),
        # An unknown id is heard (a member added recently may lead before we learn of it),
        # but not a message inside its frame that claims to come from someone else.
        (frame("n9", hb), invalid),
        (frame("", hb), invalid),  # not a node id at all
        (frame("n" * 257, hb), invalid),  # ids are at most 256 bytes
        (frame("n3", pb.RaftMessage(type=77, src="n3", dst=dst, term=term)), invalid),
        (frame("n3", pb.RaftMessage(type=0, src="n3", dst=dst, term=term)), invalid),
        (frame("n3", hb, pb.RaftMessage(src="n3", type=2**32 - 1)), invalid),
        # a snapshot without its data (it comes only by InstallSnapshot)
        (frame("n3", pb.RaftMessage(type=MsgType.SNAPSHOT, src="n3", dst=dst, term=term)), invalid),
        # a message from someone else than the frame's sender
        (frame("n3", pb.RaftMessage(type=MsgType.HEARTBEAT, src=leader, term=term)), invalid),
        # A term this close to 2**64 would be adopted, made durable, and could never be bumped
        # by an election again: the whole cluster would be dead for good.
        (
            frame("n3", pb.RaftMessage(type=MsgType.APPEND, src="n3", dst=dst, term=2**64 - 1)),
            invalid,
        ),
        (
            frame("n3", pb.RaftMessage(type=MsgType.HEARTBEAT, src="n3", dst=dst, term=2**62)),
            invalid,
        ),
        (
            frame(
                "n3",
                pb.RaftMessage(
                    type=MsgType.APPEND_RESP, src="n3", dst=dst, term=term, index=2**64 - 1
                ),
            ),
            invalid,
        ),
    ]


def test_refused_frames(duo):
    leader = duo.leader()
    term = duo.status(leader).term
    for nid in duo.real:
        stub = duo.peer(nid)
        for f, code in refused_frames(nid, leader, term):
            err = expect_code(lambda f=f, stub=stub: stub.RequestVote(f, timeout=10), code)
            assert err.details()
            err = expect_code(lambda f=f, stub=stub: replicate(stub, f), code)
            assert err.details()
            refusal = tcp_refusal(duo, nid, record(f.SerializeToString()))
            assert (refusal.code, refusal.details) == (code.value[0], err.details())
        st = duo.status(nid)
        assert (st.term, st.leader) == (term, leader)  # none of it reached the core
    duo.assert_healthy()


# -- the Peer service: forged appends and stale messages ----------------------------------------


def test_corrupt_appends_from_the_leader_are_dropped(duo):
    """Frames that look like they come from the leader but carry a bad batch: dropped."""
    duo.assert_healthy()
    leader = duo.leader()
    follower = next(n for n in duo.real if n != leader)
    st = duo.status(follower)
    term, last = st.term, st.last_index
    good = encode_uniform(last + 1, term, [b"forged-1", b"forged-2"])
    flipped = bytearray(good)
    flipped[-1] ^= 1
    batches = {
        "garbage": b"\x00" * 40,
        "bad magic": b"XXXX" + good[4:],
        "bad crc": bytes(flipped),
        "truncated": good[:-3],
        "first index not prev + 1": encode_uniform(last + 2, term, [b"gap"]),
        "first index before prev + 1": encode_uniform(last, term, [b"overlap"]),
        "older term than the log": encode_uniform(last + 1, max(term - 1, 0), [b"old"]),
    }
    stub = duo.peer(follower)
    for name, entries in batches.items():
        msg = pb.RaftMessage(
            type=MsgType.APPEND,
            src=leader,
            dst=follower,
            term=term,
            index=last,
            log_term=term,
            entries=entries,
            commit=st.commit_index,
        )
        # Dropped quietly: the stream stays up (an exception would abort it, and with it the
        # rest of the frame).
        replicate(stub, frame(leader, msg))
        after = duo.status(follower)
        assert after.last_index == last, name  # nothing was appended
        assert (after.term, after.role, after.leader) == (term, "follower", leader), name
    duo.assert_healthy()


def test_stale_term_messages_are_answered_with_the_current_term(duo):
    leader = duo.leader()
    term = duo.status(leader).term
    assert term >= 1
    stale = term - 1
    for nid in duo.real:
        stub = duo.peer(nid)
        sent_at = len(duo.fake.find(lambda m: True))
        replicate(
            stub,
            frame(
                "n3",
                pb.RaftMessage(type=MsgType.APPEND, src="n3", dst=nid, term=stale, index=1),
                pb.RaftMessage(type=MsgType.HEARTBEAT, src="n3", dst=nid, term=stale, commit=99),
                pb.RaftMessage(
                    type=MsgType.APPEND_RESP, src="n3", dst=nid, term=stale, index=10**9
                ),
            ),
        )
        # The vote first: its answer, if there were one, would reach n3 before the pre-vote's.
        stub.RequestVote(
            frame("n3", pb.RaftMessage(type=MsgType.VOTE, src="n3", dst=nid, term=stale)),
            timeout=10,
        )
        stub.RequestVote(
            frame("n3", pb.RaftMessage(type=MsgType.PRE_VOTE, src="n3", dst=nid, term=stale)),
            timeout=10,
        )
        st = duo.status(nid)
        assert (st.term, st.leader) == (term, leader)

        def answers(kind: MsgType, n: str = nid, since: int = sent_at) -> list[pb.RaftMessage]:
            with duo.fake.lock:
                recent = duo.fake.messages[since:]
            return [m for m in recent if m.src == n and m.type == kind]

        resp = wait_for(f"{nid}'s answer to a stale append", lambda: answers(MsgType.APPEND_RESP))
        assert all(m.term == term for m in resp), resp
        pre = wait_for(
            f"{nid}'s answer to a stale pre-vote", lambda: answers(MsgType.PRE_VOTE_RESP)
        )
        assert all(m.term == term and m.reject for m in pre), pre
        assert not answers(MsgType.VOTE_RESP)  # a stale vote request is ignored
    duo.assert_healthy()


def test_disruptive_vote_requests_are_ignored_while_the_leader_is_alive(duo):
    """Leader lease (check-quorum): a member that wants a far higher term cannot depose a live
    leader, however long its log claims to be."""
    leader = duo.leader()
    term = duo.status(leader).term
    for nid in duo.real:
        for kind in (MsgType.PRE_VOTE, MsgType.VOTE):
            m = pb.RaftMessage(
                type=kind, src="n3", dst=nid, term=term + 5, index=10**12, log_term=term + 5
            )
            duo.peer(nid).RequestVote(frame("n3", m), timeout=10)  # stepped before it returns
            st = duo.status(nid)
            assert (st.term, st.leader) == (term, leader), (nid, kind)
    assert not duo.fake.find(lambda m: m.type == MsgType.VOTE_RESP and not m.reject)
    duo.assert_healthy()


def test_messages_for_another_node_are_refused_not_stepped(duo):
    leader = duo.leader()
    term = duo.status(leader).term
    for nid in duo.real:
        m = pb.RaftMessage(type=MsgType.HEARTBEAT, src="n3", dst="n3", term=term + 7)
        with pytest.raises(grpc.RpcError) as refused:  # (said: it was dropped silently)
            duo.peer(nid).RequestVote(frame("n3", m), timeout=10)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"this is {nid!r}, not 'n3'" in refused.value.details()
        assert duo.status(nid).term == term
    duo.assert_healthy()


# -- the command line ---------------------------------------------------------------------------


def run_node(args: list[str], cwd: Path, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "raftfast.server.node_cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=clean_env(),
    )


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("raftfast-node: ")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_data_dir_that_is_a_file_exits_2(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    proc = run_node(
        ["--id", "n1", "--peers", "n1=127.0.0.1:7001", "--data-dir", str(not_a_dir)], tmp_path
    )
    assert proc.returncode == 2, proc.stderr
    line = one_error_line(proc)
    assert str(not_a_dir) in line


def test_wal_dir_that_is_a_file_exits_1(tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    (data / "wal").write_text("not a directory")
    port = free_ports(1)[0]
    proc = run_node(
        ["--id", "n1", "--peers", f"n1=127.0.0.1:{port}", "--data-dir", str(data)], tmp_path
    )
    assert proc.returncode == 1, proc.stderr
    line = one_error_line(proc)
    assert "cannot open WAL" in line and str(data / "wal") in line


def test_port_in_use_exits_1_instead_of_sharing_it(tmp_path):
    """gRPC binds with SO_REUSEPORT by default: a second node on a busy port would silently
    share it with the first (clients reaching either at random). It must fail instead."""
    port = free_ports(1)[0]
    peers = f"n1=127.0.0.1:{port}"
    first = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "raftfast.server.node_cli",
            "--id",
            "n1",
            "--peers",
            peers,
            "--data-dir",
            str(tmp_path / "a"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=clean_env(),
    )
    try:

        def serving() -> bool:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                return pb_grpc.KVStub(ch).Status(pb.StatusRequest(), timeout=1).id == "n1"

        wait_for("the first node to serve", serving)
        started = time.monotonic()
        proc = run_node(
            ["--id", "n1", "--peers", peers, "--data-dir", str(tmp_path / "b")], tmp_path
        )
        assert time.monotonic() - started < 20
        assert proc.returncode == 1, proc.stderr
        line = one_error_line(proc)
        assert f"cannot listen on 127.0.0.1:{port}" in line, line
        assert serving()
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGTERM)
            try:
                first.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(first.pid, signal.SIGKILL)
                first.wait(timeout=15)
    assert first.returncode == 0


def test_stream_port_in_use_exits_1(tmp_path):
    port, stream_port = free_ports(2)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", stream_port))
        busy.listen()
        proc = run_node(
            [
                "--id", "n1", "--peers", f"n1=127.0.0.1:{port}", "--data-dir",
                str(tmp_path / "a"), "--peer-stream-port", str(stream_port),
            ],
            tmp_path,
        )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    line = one_error_line(proc)
    assert f"cannot listen for replication on 127.0.0.1:{stream_port}" in line, line


def _toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    return str(path)


BAD = [
    # What tests/client/test_node_cli.py does not cover yet.
    ("non-numeric peer port", ["--peers", "n1=127.0.0.1:abc"], "bad address"),
    ("port zero", ["--peers", "n1=127.0.0.1:0"], "bad address"),
    ("non-numeric listen port", ["--listen", "127.0.0.1:seven"], "bad address"),
    ("empty id", ["--id", " "], "--id must not be empty"),
    ("heartbeat not below election", ["--heartbeat-ticks", "12"], "heartbeat_ticks"),
    ("negative value limit", ["--max-value-bytes", "-1"], "limits must be positive"),
    ("float tick", ["--tick-ms", "2.5"], "--tick-ms must be an integer"),
    ("tiny wal segments", ["--wal-segment-bytes", "10"], "--wal-segment-bytes must be at least"),
    ("toml id not a string", ["@toml", "id = 5"], "must be a string"),
    ("toml peers address not a string", ["@toml", "peers = { n1 = 7001 }"], "must be a string"),
    ("toml listen bad port", ["@toml", "listen = '127.0.0.1:x'"], "bad address"),
    ("toml tick as float", ["@toml", "tick_ms = 1.5"], "must be an integer"),
    ("toml tick as string", ["@toml", "tick_ms = 'fast'"], "must be an integer"),
    ("toml data_dir not a string", ["@toml", "data_dir = 3"], "must be a string"),
    ("toml read mode not a string", ["@toml", "read_mode = ['stale']"], "must be a string"),
    ("toml segment bytes negative", ["@toml", "wal_segment_bytes = -5"], "must be at least"),
    ("toml not utf-8", ["@toml-bytes", b"id = '\xff'"], "not UTF-8"),
    ("unknown peer stream", ["--peer-stream", "udp"], "--peer-stream must be one of tcp, grpc"),
    ("stream port too big", ["--peer-stream-port", "70000"], "--peer-stream-port must be 0"),
    ("toml stream port text", ["@toml", "peer_stream_port = 'x'"], "must be an integer"),
    ("no client connections", ["--max-client-connections", "0"], "must be in [1, 65536]"),
    ("2^64 client connections", ["--max-client-connections", str(2**64)], "must be in [1,"),
    # (accepted, they left a node that never elected a leader or a status nobody could read)
    ("2^63 tick", ["--tick-ms", str(2**63)], "need tick_ms <= 10000"),
    ("2^64 election ticks", ["--election-ticks", str(2**64)], "election timeout"),
    ("2^63 snapshot entries", ["--snapshot-entries", str(2**63)], "must be at most"),
    ("a minute's tick", ["--tick-ms", "60000"], "need tick_ms <= 10000"),
    ("toml election of hours", ["@toml", "tick_ms = 1000\nelection_ticks = 3600"], "at most 50000"),
    ("2^64 quota", ["--quota-backend-bytes", str(2**64)], "--quota-backend-bytes must be at most"),
    ("empty restore", ["--restore", ""], "--restore needs a backup file"),
    ("endless config", ["--config", "/dev/zero"], "larger than 65536 bytes"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_arguments_and_config_exit_2_with_one_line(case, tmp_path, monkeypatch, capsys):
    from raftfast.server import node_cli

    for var in list(os.environ):
        if var.startswith("RAFTFAST_") and var != "RAFTFAST_PUREPYTHON":
            monkeypatch.delenv(var)
    _, extra, expected = case
    if extra[0] == "@toml":
        extra = ["--config", _toml(tmp_path, extra[1] + "\n")]
    elif extra[0] == "@toml-bytes":
        path = tmp_path / "bad.toml"
        path.write_bytes(extra[1])
        extra = ["--config", str(path)]
    argv = ["--id", "n1", "--peers", "n1=127.0.0.1:7001", "--data-dir", str(tmp_path / "d")]
    argv += extra
    served = []
    monkeypatch.setattr(node_cli, "_run_serve", served.append)
    with pytest.raises(SystemExit) as info:
        node_cli.main(argv)
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("raftfast-node: error: ") and err.count("\n") == 1, err
    assert expected in err, err
    assert not served
    assert not (tmp_path / "d").exists()  # nothing written for a refused configuration


def test_wal_segment_bytes_is_an_advanced_setting(tmp_path):
    from raftfast.server import node_cli

    argv = ["--id", "n1", "--peers", "n1=127.0.0.1:7001", "--data-dir", str(tmp_path / "d")]
    assert node_cli.parse_settings(argv, {}).wal_segment_bytes == 64 * 1024 * 1024
    flag = node_cli.parse_settings([*argv, "--wal-segment-bytes", "8192"], {})
    assert flag.wal_segment_bytes == 8192
    env = node_cli.parse_settings(argv, {"RAFTFAST_WAL_SEGMENT_BYTES": "16384"})
    assert env.wal_segment_bytes == 16384
    # (in --help's "advanced" part: the docs name it, and --help hid it)
    advanced = node_cli.build_parser().format_help().split("\nadvanced:\n", 1)[1]
    assert "--wal-segment-bytes" in advanced and "--snapshot-log-bytes" in advanced
