"""The embeddable node (raftfast.Node, raftfast.SyncNode): three nodes in one process
replicating a state machine of the test's; proposals from every member (followers forward),
queries in every mode, a leader that leaves, exactly-once across a forward."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from typing import BinaryIO

import grpc
import pytest

import raftfast
from raftfast.dedup import owned_client_id
from raftfast.errors import CommandError, RaftfastError
from raftfast.proto import raftfast_pb2 as pb
from raftfast.proto import raftfast_pb2_grpc as pb_grpc
from raftfast.security.tls import TLSFiles
from raftfast.tools.localcluster import free_ports, make_certs


class Counter(raftfast.StateMachine):
    def __init__(self) -> None:
        self.value = 0
        self.applied = 0

    def apply(self, index: int, command: bytes) -> object:
        if command == b"boom":
            return ValueError("no booms here")
        self.applied += 1
        self.value += int(command)
        return str(self.value).encode()

    def query(self, request: bytes) -> bytes:
        return str(self.value).encode()

    def snapshot(self, out: BinaryIO) -> None:
        out.write(str(self.value).encode())

    def restore(self, inp: BinaryIO) -> None:
        self.value = int(inp.read())


def three(tmp_path, node_class=raftfast.Node, machine=Counter, **settings) -> list:
    ports = free_ports(3)
    peers = {f"n{i + 1}": f"127.0.0.1:{p}" for i, p in enumerate(ports)}
    return [
        node_class(
            id=nid,
            listen=addr,
            peers=peers,
            data_dir=str(tmp_path / nid),
            state_machine=machine(),
            tick_ms=20,
            **settings,
        )
        for nid, addr in peers.items()
    ]


@contextlib.asynccontextmanager
async def started(nodes: list) -> AsyncIterator[str]:
    """``nodes`` started: the leader's id; every one stopped afterwards."""
    try:
        for node in nodes:
            await node.start()
        yield await nodes[0].wait_for_leader()
    finally:
        for node in nodes:
            await node.stop()


def test_three_nodes_in_one_process(tmp_path):
    async def main() -> None:
        nodes = three(tmp_path)
        try:
            for node in nodes:
                await node.start()
            leader = await nodes[0].wait_for_leader()
            by_id = {n.id: n for n in nodes}
            results = await asyncio.gather(*(n.propose(b"1") for n in nodes for _ in range(10)))
            assert sorted(int(r) for r in results) == list(range(1, 31))
            assert await by_id[leader].propose(b"5") == b"35"
            for node in nodes:
                assert await node.query(b"") == b"35"  # linearizable, forwarded if need be
                assert await node.query(b"", mode="lease") == b"35"
            with pytest.raises(CommandError, match="no booms"):
                await nodes[1].propose(b"boom")
            with pytest.raises(ValueError):
                await nodes[0].query(b"", mode="fresh")
            status = await by_id[leader].status()
            assert status["version"] == raftfast.__version__
            assert status["role"] == "leader" and {m["id"] for m in status["members"]} == {
                "n1",
                "n2",
                "n3",
            }
            # the leader leaves; the others elect one and go on
            await by_id[leader].stop()
            rest = [n for n in nodes if n.id != leader]
            await rest[0].wait_for_leader(timeout=30)
            while rest[0].leader == leader:
                await asyncio.sleep(0.05)
            assert int(await rest[1].propose(b"1", timeout=30)) == 36
            for node in rest:
                while await node.query(b"", mode="stale") != b"36":  # each node's own state
                    await asyncio.sleep(0.02)
            assert [n.state_machine.applied for n in rest] == [32, 32]  # (no double apply)
        finally:
            for node in nodes:
                await node.stop()

    asyncio.run(asyncio.wait_for(main(), 120))


def test_sync_node(tmp_path):
    nodes = three(tmp_path, raftfast.SyncNode)
    try:
        for node in nodes:
            node.start()
        nodes[2].wait_for_leader()
        assert int(nodes[2].propose(b"7")) == 7
        assert nodes[0].query(b"") == b"7"
        with pytest.raises(RaftfastError):
            nodes[0].start()  # once
    finally:
        for node in nodes:
            node.stop()
    with pytest.raises(RaftfastError, match="stopped"):
        nodes[0].propose(b"1")


def _one_settings(tmp_path) -> dict:
    [port] = free_ports(1)
    addr = f"127.0.0.1:{port}"
    return dict(
        id="n1", listen=addr, peers={"n1": addr}, data_dir=str(tmp_path / "n1"),
        state_machine=Counter(), tick_ms=20, timeout=5,
    )  # fmt: skip


def _one(tmp_path) -> raftfast.Node:
    return raftfast.Node(**_one_settings(tmp_path))


def test_a_node_stopped_while_it_starts_stops_after_the_start(tmp_path):
    # stop() closed what start() was still opening: the process died (segmentation fault).
    async def main() -> None:
        for delay in (0.0, 0.001, 0.003, 0.01, 0.03):
            node = _one(tmp_path)
            starting = asyncio.ensure_future(node.start())
            await asyncio.sleep(delay)
            await node.stop()
            assert await starting is node
            assert node._driver.stopped.is_set()

    asyncio.run(main())


def test_a_stopped_node_says_so_and_a_failed_start_can_be_retried(tmp_path):
    # A stopped node's state machine holds what it applied: starting it again would replay the
    # log onto it, so it is refused ("started already" before). A SyncNode whose start failed
    # (its port taken) could not be started again: its thread had been started once.
    async def stopped_async() -> None:
        node = _one(tmp_path / "a")
        await node.start()
        await node.stop()
        with pytest.raises(RaftfastError, match="was stopped: make a new Node"):
            await node.start()

    asyncio.run(stopped_async())

    node = raftfast.SyncNode(**_one_settings(tmp_path / "s"))
    with socket.socket() as taken:
        host, port = node.node.settings.listen.rsplit(":", 1)
        taken.bind((host, int(port)))
        taken.listen()
        with pytest.raises(Exception):  # noqa: B017 - (whatever the bind failure is called)
            node.start()
    node.start()  # the port is free now
    try:
        node.wait_for_leader()
        assert int(node.propose(b"5")) == 5
    finally:
        node.stop()
    with pytest.raises(RaftfastError, match="was stopped: make a new SyncNode"):
        node.start()


def test_members_with_bad_addresses_are_refused_and_a_stuck_promote_says_why(tmp_path):
    # An embedded node committed "garbage" or "127.0.0.1:99999" as a member's address; a
    # promote that could not finish was reported as "no leader reachable".
    async def main() -> None:
        async with _one(tmp_path) as node:
            await node.wait_for_leader(timeout=30)
            for address in ("garbage", "127.0.0.1:99999", "h:-1", "a b:5", ""):
                with pytest.raises(ValueError, match="bad address"):
                    await node.add_member("n9", address)
            for bad_id in ("n 9", "x=y", "a,b"):  # (--peers could not name the last two)
                with pytest.raises(ValueError, match="bad node id"):
                    await node.add_member(bad_id, "127.0.0.1:7")
            assert set(node._driver.raw.membership.members()) == {"n1"}  # (nothing committed)
            dead, dead_too = free_ports(2)  # (nobody there: the learner never catches up)
            await node.add_member("n8", f"127.0.0.1:{dead}", learner=True)
            # (never answered: the operator is told to start it, with the command)
            started = "has not answered at 127.0.0.1:{}: start it .*--join.*member promote {}"
            with pytest.raises(raftfast.DeadlineExceededError, match=started.format(dead, "n8")):
                async with raftfast.Client(node.settings.listen, timeout=2) as client:
                    await client.promote_member("n8")
            with pytest.raises(TimeoutError, match=started.format(dead_too, "n7")):
                await node.add_member("n7", f"127.0.0.1:{dead_too}", timeout=2)

    asyncio.run(main())


def test_with_client_certificates_a_command_is_the_same_here_and_forwarded(tmp_path):
    """Under client_cert_auth the leader's StateMachine service mixes the caller's certificate
    name into a forwarded command's client id; a node frames its own commands with the same mix
    for the certificate it forwards with, so a retry that lands on another leader is still a
    retry (the ids differed: it would have been applied twice)."""
    nodes = _tls_nodes(tmp_path)

    async def main() -> None:
        async with started(nodes) as leader:
            results = await asyncio.gather(*(n.propose(b"1") for n in nodes for _ in range(5)))
            assert sorted(int(r) for r in results) == list(range(1, 16))  # (forwarded too)
            for n in nodes:
                assert n._own_client_id() == owned_client_id(n._client_id, n.id)
            follower = next(n for n in nodes if n.id != leader)
            assert follower._own_client_id() != follower._client_id

    asyncio.run(asyncio.wait_for(main(), 120))


def test_a_node_of_a_tls_cluster_without_client_tls_says_so_when_it_forwards(tmp_path):
    # (it forwarded in plain text: every call waited out its timeout, "Socket closed")
    nodes = _tls_nodes(tmp_path, with_client_tls=False)

    async def main() -> None:
        async with started(nodes) as leader:
            follower = next(n for n in nodes if n.id != leader)
            loop = asyncio.get_running_loop()
            started_at = loop.time()
            with pytest.raises(raftfast.RaftfastError, match="client_tls"):
                await follower.propose(b"1", timeout=30)
            assert loop.time() - started_at < 10
            leading = next(n for n in nodes if n.id == leader)
            assert await leading.propose(b"1") == b"1"  # (the leader needs no forwarding)

    asyncio.run(asyncio.wait_for(main(), 120))


def _tls_nodes(tmp_path, with_client_tls: bool = True, reader: bool = False) -> list:
    """The nodes of a 3-node cluster with TLS on both ports and client_cert_auth (``reader``:
    and roles, each node forwarding with a certificate that may only read)."""
    ports = free_ports(6)
    certs = tmp_path / "tls"
    make_certs(certs, ["n1", "n2", "n3"], "admin=admin,reader=read")
    peers = {f"n{i + 1}": f"127.0.0.1:{ports[3 + i]}" for i in range(3)}
    roles = {"auth_roles": str(certs / "roles.toml")} if reader else {}

    def node(i: int) -> raftfast.Node:
        nid = f"n{i + 1}"
        name = "reader" if reader else nid
        client_tls = TLSFiles(
            str(certs / "ca.crt"), str(certs / f"{name}.crt"), str(certs / f"{name}.key")
        )
        return raftfast.Node(
            id=nid, listen=f"127.0.0.1:{ports[i]}", peer_listen=peers[nid], peers=peers,
            data_dir=str(tmp_path / nid), state_machine=Counter(), tick_ms=20,
            cert_file=str(certs / f"{nid}.crt"), key_file=str(certs / f"{nid}.key"),
            trusted_ca_file=str(certs / "ca.crt"), client_cert_auth=True,
            peer_cert_file=str(certs / f"{nid}-peer.crt"),
            peer_key_file=str(certs / f"{nid}-peer.key"),
            peer_trusted_ca_file=str(certs / "peer-ca.crt"),
            client_tls=client_tls if with_client_tls else None, **roles,
        )  # fmt: skip

    return [node(i) for i in range(3)]


def test_a_forwarded_call_the_leader_refuses_for_its_role_is_permission_denied(tmp_path):
    # (it was a bare RaftfastError, where a Client's is PermissionDeniedError)
    nodes = _tls_nodes(tmp_path, reader=True)

    async def main() -> None:
        async with started(nodes) as leader:
            follower = next(n for n in nodes if n.id != leader)
            with pytest.raises(raftfast.PermissionDeniedError, match="the leader refused"):
                await follower.propose(b"1", timeout=30)

    asyncio.run(asyncio.wait_for(main(), 120))


def test_a_cancellation_that_comes_as_a_proposal_ends_is_not_swallowed(tmp_path):
    """asyncio.wait_for in Python 3.11 swallows a cancellation that comes as the call it waits
    for ends: a caller's own ``asyncio.timeout`` around a loop of proposals never fired. Here
    the proposal's result and the caller's cancellation come in the same turn of the loop."""
    [port] = free_ports(1)

    async def main() -> None:
        node = raftfast.Node(
            id="solo", listen=f"127.0.0.1:{port}", data_dir=str(tmp_path / "solo"),
            state_machine=Counter(), tick_ms=20,
        )  # fmt: skip
        async with node:
            await node.wait_for_leader()
            loop = asyncio.get_running_loop()
            caller: list[asyncio.Task] = []

            async def propose(payloads):
                done = loop.create_future()
                loop.call_soon(done.set_result, [b"1"])  # (the result, then at once...)
                loop.call_soon(caller[0].cancel)  # (... the caller's cancellation)
                return await done

            node._driver.propose = propose
            caller.append(asyncio.create_task(node.propose(b"1")))
            with pytest.raises(asyncio.CancelledError):
                await caller[0]

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_command_proposed_at_a_follower_shows_in_its_own_state_when_it_returns(tmp_path):
    # As PySyncObj's: `await counter.add(1)` on a follower, then its own copy showed the old
    # value (195 of 200 times): the call returned with the leader's answer.
    async def main() -> None:
        nodes = three(tmp_path)
        async with started(nodes) as leader:
            follower = next(node for node in nodes if node.id != leader)
            for _ in range(30):
                result = int(await follower.propose(b"1"))
                assert follower.state_machine.value >= result

    asyncio.run(asyncio.wait_for(main(), 120))


class _StopsItself(Counter):
    node: raftfast.SyncNode | None = None

    def apply(self, index: int, command: bytes) -> object:
        if command == b"stop":
            assert self.node is not None
            try:
                self.node.stop()
            except RaftfastError as exc:
                return str(exc).encode()
            return b"stopped"
        return super().apply(index, command)


def test_a_sync_node_stopped_from_its_own_apply_says_so_and_runs_on(tmp_path):
    # It froze 10 s, raised "cannot join current thread", and held its port and WAL until
    # the process exited.
    settings = _one_settings(tmp_path)
    machine = settings["state_machine"] = _StopsItself()
    node = machine.node = raftfast.SyncNode(**settings)
    node.start()
    try:
        node.wait_for_leader()
        assert b"cannot stop itself from its own thread" in node.propose(b"stop")
        assert int(node.propose(b"2")) == 2
    finally:
        node.stop()
    host, port = settings["listen"].rsplit(":", 1)
    with socket.socket() as again:  # (its port is free)
        again.bind((host, int(port)))


@pytest.mark.parametrize(
    "setting, error",
    [
        ({"timeout": 0}, ValueError),
        ({"timeout": -1}, ValueError),
        ({"timeout": float("nan")}, ValueError),
        ({"timeout": "x"}, ValueError),
        ({"fsync": "no"}, TypeError),
        ({"data_dir": None}, TypeError),
        ({"tick_ms": 2.5}, TypeError),
        ({"peers": {"n1": 7001}}, TypeError),
        ({"state_machine": object()}, TypeError),  # (every command failed "has no apply")
        ({"client_tls": "x"}, TypeError),
        ({"state_machine": Counter}, TypeError),  # (the class: every call failed)
    ],
)
def test_bad_settings_are_refused_by_the_constructor(tmp_path, setting, error):
    # (a timeout of 0 failed every later call with "no leader known"; fsync="no" was true)
    with pytest.raises(error):
        raftfast.Node(**{**_one_settings(tmp_path), **setting})


def test_a_path_is_taken_for_a_str_setting_and_0_or_1_for_a_bool(tmp_path):
    settings = {**_one_settings(tmp_path), "data_dir": tmp_path / "n1", "fsync": 0}
    node = raftfast.SyncNode(**settings)
    assert node.node.settings.data_dir == str(tmp_path / "n1")
    assert node.node.settings.fsync is False
    with node:
        node.wait_for_leader()
        assert int(node.propose(b"3")) == 3


class _Exits(Counter):
    """A state machine whose check and query raise SystemExit (a library it calls, say)."""

    def check(self, command: bytes) -> None:
        if command == b"exit":
            raise SystemExit(3)

    def query(self, request: bytes) -> bytes:
        if request == b"exit":
            raise SystemExit(4)
        return super().query(request)


def test_a_check_or_query_that_raises_system_exit_fails_the_call_only(tmp_path):
    # One such request made every node it reached exit (the client retrying at the next).
    settings = {**_one_settings(tmp_path), "state_machine": _Exits()}
    with raftfast.SyncNode(**settings) as node:
        node.wait_for_leader()
        with pytest.raises(raftfast.InvalidArgumentError, match="SystemExit"):
            node.propose(b"exit")
        for mode in ("linearizable", "stale"):
            with pytest.raises(CommandError, match="SystemExit"):
                node.query(b"exit", mode=mode)
        assert int(node.propose(b"2")) == 2
        with raftfast.SyncClient(settings["listen"], timeout=10) as client:
            with pytest.raises(raftfast.InvalidArgumentError, match="SystemExit"):
                client.propose(b"exit")
            with pytest.raises(CommandError, match="SystemExit"):
                client.query(b"exit")
            assert client.query(b"") == b"2"


class _Sizes(Counter):
    def apply(self, index: int, command: bytes) -> object:
        return str(len(command)).encode()


def test_a_command_at_the_size_limit_is_taken_at_every_member_and_one_over_refused(tmp_path):
    # The leader's service counted the request's other fields too: a command of the limit was
    # applied when proposed at the leader, refused ("the leader refused", untyped) through a
    # follower, and a client's from ~16 bytes under the limit.
    limit = 65_536
    nodes = three(tmp_path, raftfast.SyncNode, _Sizes, max_request_bytes=limit, timeout=30)
    try:
        for node in nodes:
            node.start()
        nodes[0].wait_for_leader()
        whole = b"x" * limit
        endpoints = [node.node.settings.listen for node in nodes]
        with raftfast.SyncClient(endpoints, timeout=30) as client:
            for propose in [node.propose for node in nodes] + [client.propose]:
                assert propose(whole) == str(limit).encode()
                with pytest.raises(raftfast.InvalidArgumentError, match="limit"):
                    propose(whole + b"x")
    finally:
        for node in nodes:
            node.stop()


def test_a_node_serving_another_state_machine_cannot_join(tmp_path):
    # A node of the KV store (or of another class) joined a cluster of counters as a voter,
    # applied their commands to its own state and, once leader, refused every proposal.
    async def main() -> None:
        nodes = three(tmp_path)
        [port] = free_ports(1)
        stranger = raftfast.Node(
            id="n4", listen=f"127.0.0.1:{port}", data_dir=str(tmp_path / "n4"),
            state_machine=None, join=nodes[0].settings.listen, tick_ms=20,
        )  # fmt: skip
        async with started(nodes), contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(stranger.stop)
            await stranger.start()
            deadline = asyncio.get_running_loop().time() + 60
            while stranger._driver.failed is None:
                assert asyncio.get_running_loop().time() < deadline, "the join went on"
                await asyncio.sleep(0.05)
            assert "serves 'machine:Counter', 'n4' serves 'kv'" in str(stranger._driver.failed)
            members = (await nodes[0].status())["members"]
            assert {m["id"] for m in members} == {"n1", "n2", "n3"}

    asyncio.run(asyncio.wait_for(main(), 120))


@pytest.mark.parametrize(
    "served",
    [
        {"state_machine": "\0" * 200_000},
        {"state_machine": "machine:" + "é" * 50_000},
        {"state_machine": "kv\n" * 1000},
        # (JoinRequest.machine, beside the right name: huge, deep, of the wrong shape)
        {"state_machine": "machine:Counter", "machine": "x" * 3_000_000},
        {"state_machine": "machine:Counter", "machine": "[" * 60_000},
        {"state_machine": "machine:Counter", "machine": '{"class": ["m", 7]}'},
        {"state_machine": "machine:Counter", "machine": '{"class": ["\u0000" , "Counter"]}'},
    ],
)
def test_a_join_saying_any_state_machine_is_refused_in_one_bounded_line(tmp_path, served):
    # (a stranger's JoinRequest.state_machine and .machine: any text, of any length)
    async def main() -> None:
        nodes = three(tmp_path)
        async with started(nodes) as leader:
            at = next(node for node in nodes if node.id == leader).settings.listen
            async with grpc.aio.insecure_channel(at) as channel:
                join = pb.JoinRequest(
                    cluster_id="raftfast", id="n9", address="127.0.0.1:9", **served
                )
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await pb_grpc.PeerStub(channel).Join(join, timeout=30)
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "a member must serve the same state machine" in info.value.details()
            assert len(info.value.details()) < 2_000
            assert int(await nodes[0].propose(b"1")) == 1  # (the cluster goes on)
            members = (await nodes[0].status())["members"]
            assert {m["id"] for m in members} == {"n1", "n2", "n3"}

    asyncio.run(asyncio.wait_for(main(), 120))


def test_a_learner_made_a_voter_by_an_older_leader_says_so(tmp_path, monkeypatch, caplog):
    # A leader of an earlier release ignores JoinRequest.learner: the joiner logged "joined
    # the cluster as a learner" and was a voter (an upgrade hunt).
    from raftfast.server import admin

    original = admin.JoinService.join

    async def join_of_an_older_leader(self, request, context):
        request.learner = False  # (a field it does not know)
        return await original(self, request, context)

    monkeypatch.setattr(admin.JoinService, "join", join_of_an_older_leader)

    async def main() -> None:
        async with _one(tmp_path) as leader:
            await leader.wait_for_leader(timeout=30)
            [port] = free_ports(1)
            joiner = raftfast.Node(
                id="n2", listen=f"127.0.0.1:{port}", data_dir=str(tmp_path / "n2"),
                state_machine=Counter(), tick_ms=20, join=leader.settings.listen,
                join_as_learner=True,
            )  # fmt: skip
            with caplog.at_level(logging.INFO, logger="raftfast"):
                async with joiner:
                    deadline = asyncio.get_running_loop().time() + 60
                    while "joined the cluster" not in caplog.text:
                        assert asyncio.get_running_loop().time() < deadline, caplog.text
                        await asyncio.sleep(0.05)
            assert "node n2 joined the cluster as a voter" in caplog.text
            assert "asked to join as a learner, but the leader made it a voter" in caplog.text
            assert "raftfast member demote n2" in caplog.text

    asyncio.run(main())


def test_calls_on_a_removed_node_fail_at_once_saying_so(tmp_path):
    # A removed node stopped by itself, and every call on it still went to the leader: each
    # waited out its timeout (30 s), and a write was done there with its result unseen here
    # (a state machine user's hunt).
    async def main() -> None:
        nodes = three(tmp_path, timeout=30)
        async with started(nodes) as leader:
            by_id = {node.id: node for node in nodes}
            gone = next(node for node in nodes if node.id != leader)
            await by_id[leader].remove_member(gone.id)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while not gone._driver.removed:  # (once it has applied its removal)
                assert loop.time() < deadline, "the removed node never learned it"
                await asyncio.sleep(0.05)
            before = int(await by_id[leader].query(b""))
            for call in (gone.propose(b"1"), gone.query(b""), gone.status()):
                started_at = loop.time()
                with pytest.raises(raftfast.RaftfastError, match="removed from the cluster"):
                    await call
                assert loop.time() - started_at < 5
            assert int(await by_id[leader].query(b"")) == before  # (nothing was proposed)

    asyncio.run(asyncio.wait_for(main(), 120))
