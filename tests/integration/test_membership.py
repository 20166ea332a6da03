"""Membership changes with real processes: grow 3 -> 5, shrink 5 -> 3 (leader included),
replace a failed node, and the ``raftfast member`` commands."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading

import pytest

from raftfast.client import SyncClient
from raftfast.errors import DeadlineExceededError, RaftfastError
from raftfast.tools.localcluster import ProcCluster, free_ports, wait_for

from .load import write_each

# Small snapshots so joining nodes also exercise InstallSnapshot.
FLAGS = ["--snapshot-entries", "2000", "--snapshot-keep", "500"]


@pytest.fixture
def cluster(tmp_path):
    with ProcCluster(tmp_path, extra=FLAGS) as c:
        yield c


def _write(endpoints: list[str], prefix: str, count: int) -> None:
    write_each(endpoints, prefix, count)


def _roles(client: SyncClient) -> dict[str, str]:
    return {m["id"]: m["role"] for m in client.members()["members"]}


def _live(cluster: ProcCluster) -> list[str]:
    return [n for n in cluster.procs if cluster.exited(n) is None]


def _cli(cluster: ProcCluster, *args: str) -> subprocess.CompletedProcess:
    endpoints = ",".join(cluster.addrs[n] for n in _live(cluster))
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "raftfast.client.cli",
            "--endpoints",
            endpoints,
            "--timeout",
            "30",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_grow_to_five_by_join_then_shrink_to_three_removing_the_leader(cluster):
    cluster.wait_leader()
    _write(cluster.endpoints, "a", 6_000)  # compacted: joiners need a snapshot
    for nid in ("n4", "n5"):
        cluster.join(nid, via="n1")
    with SyncClient(cluster.endpoints, timeout=30) as c:
        wait_for(
            "n4 and n5 to join as voters",
            lambda: _roles(c) == {n: "voter" for n in ("n1", "n2", "n3", "n4", "n5")},
            timeout=90,
        )
    for nid in ("n4", "n5"):
        with SyncClient([cluster.addrs[nid]], timeout=30) as c:
            assert wait_for(
                f"{nid} to hold the data written before it joined",
                lambda c=c: c.get("a5999", read_mode="stale") == b"5999",
                timeout=60,
            )
    assert "installed a snapshot" in cluster.logs["n4"].read_text()

    # Five voters: a quorum is 3, so two nodes down cannot stop writes.
    cluster.kill("n4")
    cluster.kill("n5")
    _write([cluster.addrs[n] for n in ("n1", "n2", "n3")], "b", 100)
    cluster.start("n4", first_time=False)
    cluster.start("n5", first_time=False)

    # Shrink to three, removing the leader along the way (once n4 and n5 are back in step).
    leader = cluster.wait_leader()
    wait_for(
        "n4 and n5 to catch up",
        lambda: (
            min(cluster.status(n).applied_index for n in ("n4", "n5"))
            >= cluster.status(leader).commit_index
        ),
        timeout=60,
    )
    with SyncClient(cluster.endpoints, timeout=30) as c:
        c.remove_member(leader)
        wait_for("the removed leader to exit", lambda: cluster.exited(leader) == 0, timeout=60)
        # Then a follower: it must learn of its removal too, and go.
        now_leading = cluster.wait_leader(among=[n for n in cluster.ids if n != leader])
        second = next(n for n in ("n1", "n2", "n3") if n not in (leader, now_leading))
        c.remove_member(second)
        wait_for("the removed follower to exit", lambda: cluster.exited(second) == 0, 60)
        remaining = sorted(_roles(c))
        assert len(remaining) == 3 and leader not in remaining and second not in remaining
        new_leader = cluster.wait_leader(among=remaining)
        assert new_leader in remaining
        c.put("after-shrink", "ok")
        assert c.get("a0") == b"0" and c.get("b99") == b"99"
    for nid in remaining:
        with SyncClient([cluster.addrs[nid]], timeout=30) as c:
            assert wait_for(
                f"{nid} to apply the write after the shrink",
                lambda c=c: c.get("after-shrink", read_mode="stale") == b"ok",
            )


def test_replace_a_failed_node(cluster):
    cluster.wait_leader()
    _write(cluster.endpoints, "r", 1_000)
    cluster.kill("n3")  # the machine is gone for good
    cluster.join("n4", via="n1")
    with SyncClient([cluster.addrs[n] for n in ("n1", "n2")], timeout=30) as c:
        wait_for("n4 to become a voter", lambda: _roles(c).get("n4") == "voter", timeout=90)
        c.remove_member("n3")
        assert _roles(c) == {"n1": "voter", "n2": "voter", "n4": "voter"}
        # The new configuration survives a full restart of the cluster.
    for nid in ("n1", "n2", "n4"):
        cluster.kill(nid)
    for nid in ("n1", "n2", "n4"):
        cluster.start(nid, first_time=False)
    cluster.wait_leader(among=["n1", "n2", "n4"])
    with SyncClient([cluster.addrs[n] for n in ("n1", "n2", "n4")], timeout=30) as c:
        assert _roles(c) == {"n1": "voter", "n2": "voter", "n4": "voter"}
        # n1 + n4 are a quorum of the new configuration: n2 down, writes go on.
        cluster.kill("n2")
        c.put("replaced", "yes")
        assert c.get("replaced") == b"yes" and c.get("r999") == b"999"


def test_member_commands(cluster):
    cluster.wait_leader()
    cluster.join("n4", via="n2")  # joins as a voter by default
    with SyncClient(cluster.endpoints, timeout=30) as c:
        wait_for("n4 to be a voter", lambda: _roles(c).get("n4") == "voter", timeout=90)
    out = _cli(cluster, "member", "demote", "n4")
    assert out.returncode == 0, out.stderr
    assert any(
        line.split()[:3] == ["n4", cluster.addrs["n4"], "learner"]
        for line in out.stdout.splitlines()
    ), out.stdout
    out = _cli(cluster, "member", "promote", "n4")
    assert out.returncode == 0, out.stderr
    out = _cli(cluster, "member", "list")
    assert out.returncode == 0, out.stderr
    roles = {line.split()[0]: line.split()[2] for line in out.stdout.splitlines()[1:5]}
    assert roles == {"n1": "voter", "n2": "voter", "n3": "voter", "n4": "voter"}, out.stdout
    assert "committed" in out.stdout
    # Done already (a retry, say): done, with a note, as the other changes say.
    out = _cli(cluster, "member", "add", "n4", cluster.addrs["n4"])
    assert out.returncode == 0, out.stderr
    assert f"n4 is already a voter at {cluster.addrs['n4']}: nothing to do" in out.stdout
    # Bad requests: one line, exit 1, nothing changed.
    n2_port = cluster.peer_addrs["n2"].rsplit(":", 1)[1]
    for args, expected, code in (  # 5: the cluster refuses; 2: a bad argument
        # (never a member: a typo in a replacement must not look like a success)
        (("member", "remove", "n9"), "'n9' is not a member", 5),
        (("member", "promote", "n9"), "n9 is not a learner", 5),
        (("member", "add", "n1", "127.0.0.1:1"), "already a member", 5),
        (("member", "add", "n9", "nonsense"), "bad address", 2),
        # (another spelling of a member's address: each node's streams to the two displaced
        # each other, writes 3-8x slower)
        (("member", "add", "n9", f"localhost:{n2_port}"), "reaches n2's", 5),
        (("member", "add", "n9", f"127.0.0.1:0{n2_port}"), "reaches n2's", 5),
    ):
        out = _cli(cluster, *args)
        assert out.returncode == code and expected in out.stderr, (args, out.stderr)
        assert out.stderr.count("\n") == 1, out.stderr
    out = _cli(cluster, "member", "list", "--json")
    assert out.returncode == 0 and '"learner"' not in out.stdout
    out = _cli(cluster, "status")
    assert out.returncode == 0 and "n4" in out.stdout and "voter" in out.stdout


def test_an_id_can_be_used_again_after_its_removal(cluster):
    """A fresh node that takes the id of a removed one replays the old removal from the log
    while it catches up: that must not make it shut down."""
    cluster.wait_leader()
    _write(cluster.endpoints, "x", 200)
    with SyncClient(cluster.endpoints, timeout=30) as c:
        # A configuration entry that names n3 before its removal (a learner nobody runs).
        c.add_member("n9", "127.0.0.1:9", learner=True)
        c.remove_member("n3")
        again = _cli(cluster, "member", "remove", "n3")  # idempotent: retries must be safe
        assert again.returncode == 0, again.stderr
        assert "n3 is already removed: nothing to do" in again.stdout
        wait_for("n3 to exit", lambda: cluster.exited("n3") == 0, timeout=60)
        # The same id on a new machine: a new data dir and address, joining again.
        cluster.ids.remove("n3")
        del cluster.addrs["n3"]
        shutil.rmtree(cluster.tmp / "n3")
        cluster.join("n3", via="n1")
        wait_for("n3 to be a voter again", lambda: _roles(c).get("n3") == "voter", timeout=90)
        c.put("after-rejoin", "ok")
        with SyncClient([cluster.addrs["n3"]], timeout=30) as c3:
            assert wait_for(
                "n3 to apply the write",
                lambda: c3.get("after-rejoin", read_mode="stale") == b"ok",
            )
        assert cluster.exited("n3") is None, cluster.logs["n3"].read_text()[-2000:]


def test_a_join_the_cluster_refuses_ends_in_one_line(tmp_path, cluster):
    """A --join under a member's id is refused: the node says so in its one error line and
    exits 1 (it ended in "node failed unexpectedly" and a traceback)."""
    leader = cluster.wait_leader()
    port, stream_port, session_port = free_ports(3)
    joiner = subprocess.run(
        [
            sys.executable, "-m", "raftfast.server.node_cli", "--id", "n1",
            "--listen", f"127.0.0.1:{port}", "--join", cluster.addrs[leader],
            "--data-dir", str(tmp_path / "joiner"), "--peer-stream-port", str(stream_port),
            "--client-stream-port", str(session_port),
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert joiner.returncode == 1, joiner.stderr
    assert "Traceback" not in joiner.stderr and "unexpectedly" not in joiner.stderr
    assert "raftfast-node: error: node n1 failed:" in joiner.stderr
    assert "refused the join" in joiner.stderr


def test_a_change_made_but_not_committed_is_not_done_yet(tmp_path):
    """A retry of a change the leader holds but has not committed (its first attempt timed
    out; or another caller's) waits for the commit: it said "nothing to do" at once, and a new
    leader could still have dropped the change (a hunt: three terminals, one change)."""
    # (elections 5 s away: the leader left alone keeps leading while it is asked twice)
    with ProcCluster(tmp_path, 3, extra=["--election-ticks", "100"]) as cluster:
        leader = cluster.wait_leader(timeout=60)
        followers = [n for n in cluster.ids if n != leader]
        with SyncClient([cluster.addrs[leader]], timeout=30) as c:
            for what, change, later in (
                (
                    "add",
                    lambda: c.add_member("x", "127.0.0.1:9", learner=True, timeout=1),
                    lambda t: c.add_member("x", "127.0.0.1:9", learner=True, timeout=t),
                ),
                (
                    "remove",
                    lambda: c.remove_member("x", timeout=1),
                    lambda t: c.remove_member("x", timeout=t),
                ),
            ):
                for nid in followers:
                    cluster.kill(nid)
                with pytest.raises(DeadlineExceededError):
                    change()  # (proposed: the leader's latest configuration has it)
                with pytest.raises(DeadlineExceededError):
                    change()  # (the retry: "nothing to do", at once)
                for nid in followers:
                    cluster.start(nid, first_time=False)
                listing = later(60)  # (committed once the followers are back: done)
                assert listing["committed"], (what, listing)


def test_two_adds_at_once_at_two_spellings_of_one_place_let_one_in(cluster):
    """Each add looked at the members before the other had proposed: both were let in, two
    members at one place (a review)."""
    leader = cluster.wait_leader()
    with SyncClient([cluster.addrs[leader]], timeout=30) as c:
        for round_ in range(3):
            [port] = free_ports(1)
            spellings = {f"a{round_}": f"localhost:{port}", f"b{round_}": f"127.0.0.1:{port}"}
            outcomes: dict[str, object] = {}

            def add(nid: str, address: str, outcomes: dict = outcomes) -> None:
                try:
                    outcomes[nid] = c.add_member(nid, address, learner=True)
                except RaftfastError as exc:
                    outcomes[nid] = exc

            threads = [threading.Thread(target=add, args=item) for item in spellings.items()]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            added = [nid for nid, got in outcomes.items() if isinstance(got, dict)]
            refused = [got for got in outcomes.values() if isinstance(got, RaftfastError)]
            assert len(added) == 1 and len(refused) == 1, outcomes
            assert "another member's already" in str(refused[0])
            c.remove_member(added[0])


def test_a_node_joining_as_a_learner_stays_one(cluster):
    """``--join ... --learner``: a backup's way in (a learner an admin added was promoted once
    it joined, as every joining node is: the docs hunt)."""
    cluster.wait_leader()
    _write(cluster.endpoints, "a", 100)
    cluster.node_extra = lambda nid: ["--learner"] if nid == "n4" else []
    cluster.join("n4", via="n1")
    wait_for(
        "n4 to say it joined",
        lambda: "joined the cluster as a learner" in cluster.logs["n4"].read_text(),
        timeout=60,
    )
    with SyncClient(cluster.endpoints, timeout=30) as c:
        assert _roles(c) == {"n1": "voter", "n2": "voter", "n3": "voter", "n4": "learner"}
    with SyncClient([cluster.addrs["n4"]], timeout=30) as c:
        wait_for("n4 to catch up", lambda: c.get("a99", read_mode="stale") == b"99", timeout=60)
    with SyncClient(cluster.endpoints, timeout=30) as c:
        assert _roles(c)["n4"] == "learner"  # (caught up, and still one)
