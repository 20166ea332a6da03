"""A state machine of the user's (examples/ledger.py) served by three ``raftfast-node
--state-machine`` processes: clients propose and query through the generic StateMachine service;
its state survives kill -9 of the leader and a restart of every node, and a follower that
missed many commands catches up by snapshot."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from raftfast.client import Client, SyncClient
from raftfast.dedup import DEDUP_WINDOW
from raftfast.errors import CommandError, RequestFailedError
from raftfast.proto import raftfast_pb2 as pb
from raftfast.proto import raftfast_pb2_grpc as pb_grpc
from raftfast.security.tls import TLSFiles, channel_credentials
from raftfast.tools.localcluster import ProcCluster, make_certs, wait_for

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture
def cluster(tmp_path):
    env = {"PYTHONPATH": os.pathsep.join([str(EXAMPLES), os.environ.get("PYTHONPATH", "")])}
    extra = ["--state-machine", "ledger:Ledger", "--snapshot-entries", "100"]
    with ProcCluster(tmp_path, 3, extra=[*extra, "--snapshot-keep", "10"], env=env) as c:
        yield c


def deposit(c: SyncClient, account: str, amount: int) -> int:
    return int(c.propose(json.dumps({"op": "deposit", "account": account, "amount": amount})))


def test_a_ledger_of_our_own_across_kills_restarts_and_a_snapshot(cluster):
    cluster.wait_leader()
    with SyncClient(cluster.endpoints, timeout=30) as c:
        assert [deposit(c, "alice", 1) for _ in range(50)][-1] == 50
        with pytest.raises(CommandError, match="alice has 50, not 70"):
            c.propose(json.dumps({"op": "transfer", "from": "alice", "to": "bob", "amount": 70}))
        with pytest.raises(CommandError, match="bad command"):
            c.propose(b"not json")
        c.propose(json.dumps({"op": "transfer", "from": "alice", "to": "bob", "amount": 20}))
        assert (c.query("alice"), c.query("bob")) == (b"30", b"20")

        leader = cluster.leader()
        cluster.kill(leader)  # kill -9 of the leader
        assert deposit(c, "alice", 5) == 35
        cluster.start(leader, first_time=False)
        behind = next(n for n in cluster.ids if n != cluster.wait_leader())
        cluster.kill(behind)
        for _ in range(300):  # (snapshots every 100 commands: behind needs one)
            deposit(c, "carol", 1)
        for nid in cluster.ids:
            if nid not in cluster.procs:
                cluster.start(nid, first_time=False)
        target = cluster.status(cluster.wait_leader()).commit_index
        for nid in cluster.ids:
            cluster.wait_applied(nid, target, f"{nid} to catch up")
        assert cluster.status(behind).snapshot_index > 0
        for nid in cluster.ids:
            with SyncClient([cluster.addrs[nid]], timeout=10) as one:
                assert one.query("carol", read_mode="stale") == b"300", nid

    cluster.stop_all()
    for nid in cluster.ids:
        cluster.start(nid, first_time=False)
    cluster.wait_leader()
    with SyncClient(cluster.endpoints, timeout=30) as c:
        assert (c.query("alice"), c.query("bob"), c.query("carol")) == (b"35", b"20", b"300")


def test_a_retried_propose_is_applied_once(cluster):
    leader = cluster.wait_leader()
    command = json.dumps({"op": "deposit", "account": "dave", "amount": 7}).encode()
    with grpc.insecure_channel(cluster.addrs[leader]) as ch:
        stub = pb_grpc.StateMachineStub(ch)
        request = pb.ProposeRequest(client_id=99, sequence=1, command=command)
        first = stub.Propose(request, timeout=10)
        again = stub.Propose(request, timeout=10)  # a retry: the same client id and sequence
        assert first.result == again.result == b"7"
        assert stub.Query(pb.QueryRequest(request=b"dave"), timeout=10).result == b"7"
        # and the KV service is not there: this node serves a state machine of its own
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.KVStub(ch).Get(pb.GetRequest(key=b"k"), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    # ... and the clients say so, not "not a raftfast server" (a hunt)
    for client_cls in (SyncClient, Client):
        with pytest.raises(RequestFailedError, match="serves a state machine of its own"):
            if client_cls is SyncClient:
                with SyncClient(cluster.endpoints, timeout=10) as c:
                    c.get("k")
            else:

                async def get() -> None:
                    async with Client(cluster.endpoints, timeout=10) as c:
                        await c.get("k")

                asyncio.run(get())
    cli = [sys.executable, "-m", "raftfast.client.cli", "--endpoints", cluster.endpoints[0]]
    proc = subprocess.run([*cli, "get", "k"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 5 and "serves a state machine of its own" in proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    wait_for("every node to apply it", lambda: all(
        cluster.status(n).applied_index >= first.index for n in cluster.ids
    ))  # fmt: skip


def test_more_proposals_at_once_than_the_nodes_remember_are_each_applied_once(cluster):
    """Proposals take sequences from the client's window as queued writes do: with 10,000 at
    once from one client (more than DEDUP_WINDOW), a quarter came back "late duplicate: not
    applied", and under a leader kill some of those had been applied (a hunt)."""
    calls = 10_000
    assert calls > DEDUP_WINDOW
    command = json.dumps({"op": "deposit", "account": "many", "amount": 1})

    async def main() -> tuple[list, int]:
        async with Client(cluster.endpoints, timeout=120) as c:
            results = await asyncio.gather(
                *(c.propose(command) for _ in range(calls)), return_exceptions=True
            )
            return results, int(await c.query(b"many"))

    results, balance = asyncio.run(main())
    failed = [r for r in results if isinstance(r, BaseException)]
    assert not failed, f"{len(failed)} failed, first: {failed[0]!r}"
    assert balance == calls and sorted(int(r) for r in results) == list(range(1, calls + 1))


def test_with_client_certificates_each_certificates_exactly_once_ids_are_its_own(tmp_path):
    """Over the StateMachine service as over KV: a writer that takes another certificate's
    client id neither makes the other's next command a duplicate (acknowledged, never
    applied) nor is handed the other's results (it was: found by a hostile hunt)."""
    certs = tmp_path / "tls"
    make_certs(certs, ["n1"], clients="admin=admin,victim=write,attacker=write")
    env = {"PYTHONPATH": os.pathsep.join([str(EXAMPLES), os.environ.get("PYTHONPATH", "")])}
    extra = ["--state-machine", "ledger:Ledger"]
    (tmp_path / "data").mkdir()
    with ProcCluster(tmp_path / "data", 1, extra=extra, env=env, tls=certs) as cluster:
        cluster.wait_leader()

        def propose(who: str, client_id: int, sequence: int, account: str, amount: int) -> bytes:
            command = json.dumps({"op": "deposit", "account": account, "amount": amount})
            request = pb.ProposeRequest(
                client_id=client_id, sequence=sequence, command=command.encode()
            )
            files = TLSFiles(
                str(certs / "ca.crt"), str(certs / f"{who}.crt"), str(certs / f"{who}.key")
            )
            with grpc.secure_channel(cluster.addrs["n1"], channel_credentials(files)) as ch:
                return pb_grpc.StateMachineStub(ch).Propose(request, timeout=30).result

        victim_id = 0x1234_5678_9ABC
        assert propose("victim", victim_id, 1, "secret", 777) == b"777"
        assert propose("attacker", victim_id, 1, "x", 1) == b"1"  # (its own, applied)
        assert propose("attacker", victim_id, 2, "attacker", 1) == b"1"
        assert propose("victim", victim_id, 2, "secret", 100) == b"877"  # (applied)
        assert propose("victim", victim_id, 2, "secret", 100) == b"877"  # (a retry: once)


def test_a_backup_of_a_state_machine_cluster_restores_into_a_new_one(tmp_path):
    """``raftfast snapshot save`` of a --state-machine cluster, then ``raftfast-node
    --restore``: the state comes back, and so does the exactly-once table (a retry after the
    restore is not applied again). The restore read the backup with the bare state machine,
    which could not read the table ahead of its state: such a backup never restored."""
    env = {"PYTHONPATH": os.pathsep.join([str(EXAMPLES), os.environ.get("PYTHONPATH", "")])}
    extra = ["--state-machine", "ledger:Ledger"]
    backup = tmp_path / "ledger.backup"
    request = pb.ProposeRequest(
        client_id=77, sequence=1, command=b'{"op": "deposit", "account": "al", "amount": 5}'
    )

    def propose(address: str) -> bytes:
        with grpc.insecure_channel(address) as channel:
            return pb_grpc.StateMachineStub(channel).Propose(request, timeout=30).result

    (tmp_path / "old").mkdir()
    with ProcCluster(tmp_path / "old", 1, extra=extra, env=env) as old:
        old.wait_leader()
        assert propose(old.addrs["n1"]) == b"5"
        saved = subprocess.run(
            [sys.executable, "-m", "raftfast.client.cli", "--endpoints", old.addrs["n1"],
             "snapshot", "save", str(backup)],
            capture_output=True, text=True, timeout=120, env={**os.environ, **env},
        )  # fmt: skip
        assert saved.returncode == 0, saved.stderr
    (tmp_path / "new").mkdir()
    with ProcCluster(tmp_path / "new", 1, extra=extra, env=env, restore=backup) as new:
        new.wait_leader()
        with SyncClient(list(new.addrs.values()), timeout=30) as c:
            assert c.query("al") == b"5"
        assert propose(new.addrs["n1"]) == b"5"  # (the retry: its first answer, once)
        with SyncClient(list(new.addrs.values()), timeout=30) as c:
            assert c.query("al") == b"5"


def _start_on_crafted_state(tmp_path, state: bytes, *flags: str) -> tuple[Path, str]:
    """A data directory restored from a backup whose snapshot holds ``state`` (a snapshot at
    index 7, term 2); the stderr of a node started on it (exit 1 asserted, no traceback)."""
    from raftfast.core.membership import Membership
    from raftfast.server.restore import restore_backup
    from raftfast.storage.backup import BackupWriter
    from raftfast.storage.snapshot import pack_state
    from raftfast.tools.localcluster import free_ports
    from tests.fault.test_bad_input import clean_env

    [port] = free_ports(1)
    peers = {"n1": f"127.0.0.1:{port}"}
    content = pack_state(Membership(peers).encode(), state)
    crafted = tmp_path / "crafted.backup"
    writer = BackupWriter(str(crafted))
    writer.write(content)
    writer.finish(7, 2, len(content))
    data = tmp_path / "d"
    restore_backup(str(crafted), str(data), peers, fsync=False)
    env = {**clean_env(), "PYTHONPATH": str(EXAMPLES)}
    proc = subprocess.run(
        [sys.executable, "-m", "raftfast.server.node_cli", "--id", "n1", "--peers",
         f"n1=127.0.0.1:{port}", "--data-dir", str(data), *flags],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return data, proc.stderr


def test_a_node_whose_snapshot_its_state_machine_cannot_read_says_so(tmp_path):
    """A data directory whose snapshot holds a state the state machine refuses (a crafted or
    foreign one, put there without --restore's check): one line naming the file, exit 1; it
    was a CRITICAL "failed unexpectedly" and a traceback through the user's code."""
    state = b"RFX1" + bytes(8) + b"not json"
    _, stderr = _start_on_crafted_state(tmp_path, state, "--state-machine", "ledger:Ledger")
    assert "the state machine cannot read this snapshot: JSONDecodeError" in stderr


def test_a_kv_snapshot_that_does_not_check_out_is_named(tmp_path):
    """The KV store's own refusal of its snapshot ("KV snapshot CRC mismatch") named no file
    (a hunt): one line naming it, exit 1."""
    from raftfast.kv.fsm import KVStateMachine

    state = bytearray(KVStateMachine().dump())
    state[-1] ^= 0xFF  # (its CRC)
    data, stderr = _start_on_crafted_state(tmp_path, bytes(state))
    snap = data / "snap" / f"snap-{7:016x}-{2:016x}.snap"
    assert f"{snap}: KV snapshot CRC mismatch" in stderr, stderr
