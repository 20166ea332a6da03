"""Membership changes in the core: learners, promotion, removal (the leader's too), one change
at a time, configurations in force on append, undone by truncation, carried by snapshots."""

from __future__ import annotations

import random

import pytest

from raftfast._accel import EntryLog
from raftfast.core.membership import ChangeKind, Membership
from raftfast.core.raft import Config
from raftfast.core.rawnode import RawNode
from raftfast.core.types import HardState, MsgType, Role
from raftfast.errors import ChangeInProgressError, NotLeaderError

from .netutil import Net

ADD, PROMOTE, DEMOTE, REMOVE = (
    ChangeKind.ADD_LEARNER,
    ChangeKind.PROMOTE,
    ChangeKind.DEMOTE,
    ChangeKind.REMOVE,
)


def cluster() -> Net:
    net = Net(["n1", "n2", "n3"])
    net.elect("n1")
    return net


def commit_of(net: Net, nid: str) -> int:
    return net.node(nid).raft.log.committed


# -- Membership values ---------------------------------------------------------------------------


def test_membership_round_trips_and_is_deterministic():
    a = Membership({"n2": "h:2", "n1": "h:1"}, {"n3": "h:3"})
    b = Membership({"n1": "h:1", "n2": "h:2"}, {"n3": "h:3"})
    assert a.encode() == b.encode()
    assert Membership.decode(a.encode()) == a
    assert a.role_of("n3") == "learner" and a.role_of("n1") == "voter" and a.role_of("x") == ""


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"{",
        b"[]",
        b'{"format":2}',
        b'{"format":1,"voters":{"a":1},"learners":{}}',
        b'{"format":1,"voters":{"a":""},"learners":{"a":""}}',
        b"\xff",
    ],
)
def test_membership_decode_refuses_garbage(data):
    with pytest.raises(ValueError):
        Membership.decode(data)


def test_single_server_changes_are_validated():
    m = Membership({"n1": "h:1", "n2": "h:2"})
    with pytest.raises(ValueError, match="already a voter"):
        m.change(ADD, "n1", "h:9")
    with pytest.raises(ValueError, match="needs its address"):
        m.change(ADD, "n3")
    with pytest.raises(ValueError, match="already used"):
        m.change(ADD, "n3", "h:2")
    with pytest.raises(ValueError, match="not a learner"):
        m.change(PROMOTE, "n2")
    with pytest.raises(ValueError, match="not a member"):
        m.change(REMOVE, "n9")
    with pytest.raises(ValueError, match="last voter"):
        m.change(REMOVE, "n1").change(REMOVE, "n2")
    m3 = m.change(ADD, "n3", "h:3")
    assert m3.learners == {"n3": "h:3"}
    assert m3.change(PROMOTE, "n3").voters == {"n1": "h:1", "n2": "h:2", "n3": "h:3"}
    assert m.change(DEMOTE, "n2") == Membership({"n1": "h:1"}, {"n2": "h:2"})


# -- learners ------------------------------------------------------------------------------------


def test_a_learner_catches_up_but_never_counts_nor_campaigns():
    net = cluster()
    net.node("n1").propose([b"before"])
    net.drive()
    net.add("n4")
    net.node("n1").propose_change(ADD, "n4", "h:4")
    net.drive()
    assert b"before" in net.applied["n4"]
    assert net.node("n4").raft.membership.learners == {"n4": "h:4"}
    # With n2 and n3 gone, n1 + the learner are no quorum: nothing commits.
    net.down |= {"n2", "n3"}
    before = commit_of(net, "n1")
    net.node("n1").propose([b"x"])
    net.drive()
    assert commit_of(net, "n1") == before
    # And the learner never campaigns, however long it hears nothing.
    net.down.add("n1")
    for _ in range(100):
        net.node("n4").tick()
        net.drive()
    assert net.node("n4").raft.role == Role.FOLLOWER
    assert not [m for m in net.sent if m.src == "n4" and m.type in (MsgType.VOTE, MsgType.PRE_VOTE)]


def test_a_promoted_learner_counts_toward_the_quorum():
    net = cluster()
    net.add("n4")
    net.node("n1").propose_change(ADD, "n4", "h:4")
    net.drive()
    net.node("n1").propose_change(PROMOTE, "n4")
    net.drive()
    for nid in ("n1", "n2", "n3", "n4"):
        assert sorted(net.node(nid).raft.membership.voters) == ["n1", "n2", "n3", "n4"]
    # 4 voters: a quorum is 3. n1, n3, n4 commit without n2; n1 + n3 alone cannot.
    net.down.add("n2")
    net.node("n1").propose([b"three"])
    net.drive()
    net.tick_all(1)  # followers learn the commit index from the next heartbeat
    assert b"three" in net.applied["n4"]
    net.down.add("n4")
    before = commit_of(net, "n1")
    net.node("n1").propose([b"two"])
    net.drive()
    assert commit_of(net, "n1") == before


# -- one at a time -------------------------------------------------------------------------------


def test_one_change_at_a_time_and_only_after_the_leader_committed_in_its_term():
    net = cluster()
    net.down.add("n2")
    net.down.add("n3")  # nothing can commit
    net.node("n1").propose_change(REMOVE, "n3")
    with pytest.raises(ChangeInProgressError, match="not committed yet"):
        net.node("n1").propose_change(REMOVE, "n2")
    with pytest.raises(NotLeaderError):
        net.node("n2").propose_change(REMOVE, "n3")

    # A new leader whose no-op has not committed yet must wait.
    fresh = Net(["n1", "n2", "n3"], pre_vote=False)
    n1, n2 = fresh.node("n1"), fresh.node("n2")
    n1.campaign()
    rd = n1.ready()
    n1.advance(rd)
    n2.step(next(m for m in rd.messages if m.dst == "n2"))
    rd2 = n2.ready()
    n2.advance(rd2)
    n1.step(rd2.messages[0])
    assert n1.raft.role == Role.LEADER and n1.raft.log.committed == 0
    with pytest.raises(ChangeInProgressError, match="not committed an entry of its term"):
        n1.propose_change(REMOVE, "n3")


# -- removal -------------------------------------------------------------------------------------


def test_removing_a_follower_shrinks_the_quorum():
    net = cluster()
    net.node("n1").propose_change(REMOVE, "n3")
    net.drive()
    assert sorted(net.node("n2").raft.membership.voters) == ["n1", "n2"]
    assert "n3" not in net.node("n1").raft.progress
    net.down.add("n3")
    net.node("n1").propose([b"after"])
    net.drive()
    net.tick_all(1)
    assert b"after" in net.applied["n2"]


def test_removing_the_leader_hands_over_after_the_change_commits():
    net = cluster()
    index = net.node("n1").propose_change(REMOVE, "n1")
    # Until the change commits, n1 still leads (and replicates) without counting itself.
    assert net.node("n1").raft.role == Role.LEADER
    net.drive()
    assert commit_of(net, "n2") >= index or commit_of(net, "n3") >= index
    assert net.node("n1").raft.role == Role.FOLLOWER
    # It sent TimeoutNow to the most caught-up voter, which took over at once.
    assert [m.dst for m in net.sent if m.type == MsgType.TIMEOUT_NOW and m.src == "n1"]
    assert len(net.leaders()) == 1 and net.leaders()[0] in ("n2", "n3")
    new = net.node(net.leaders()[0])
    new.propose([b"under-new-leader"])
    net.drive()
    net.tick_all(1)
    other = "n3" if new.raft.id == "n2" else "n2"
    assert b"under-new-leader" in net.applied[other]
    # n1 is out: it never campaigns again.
    net.down.add(net.leaders()[0])
    for _ in range(100):
        net.node("n1").tick()
    assert net.node("n1").raft.role == Role.FOLLOWER


def test_a_voter_whose_removal_is_uncommitted_may_still_campaign():
    """Thesis §4.2.2: the removed leader may be the only node holding its removal; the others
    would otherwise be stuck voting in the old configuration for someone who cannot win."""
    net = Net(["n1", "n2"])
    net.elect("n1")
    net.down.add("n2")
    net.node("n1").propose_change(REMOVE, "n1")  # {n2} alone now; n2 has not heard of it
    net.drive()
    n1 = net.node("n1").raft
    assert n1.membership.voters.keys() == {"n2"}
    net.node("n1").raft.become_follower(n1.term, "", "test: lost leadership")
    net.down.discard("n2")
    for _ in range(60):
        net.tick_all(1)
        if net.leaders() and commit_of(net, "n2") >= n1.config_index:
            break
    assert commit_of(net, "n2") >= n1.config_index, "the removal never committed"
    for _ in range(60):
        net.tick_all(1)
        if net.leaders() == ["n2"]:
            break
    assert net.leaders() == ["n2"]


# -- in force on append, undone by truncation, recovered, snapshotted ----------------------------


def test_an_uncommitted_change_is_undone_when_a_new_leader_overwrites_it():
    ids = ["n1", "n2", "n3", "n4", "n5"]
    net = Net(ids, check_quorum=False)
    net.elect("n1")
    # n1 gets its change to n2 only: in force on n2 at once, but not committed.
    net.down = {"n3", "n4", "n5"}
    index = net.node("n1").propose_change(REMOVE, "n5")
    net.drive()
    assert net.node("n2").raft.membership.voters.keys() == {"n1", "n2", "n3", "n4"}
    assert net.node("n2").raft.config_index == index
    # n3 wins with n4 and n5 and overwrites index 2 on n2: the change is gone there.
    net.down = {"n1"}
    net.elect("n3")
    net.drive()
    n2 = net.node("n2").raft
    assert n2.log.term_at(index) == net.node("n3").raft.term
    assert n2.membership.voters.keys() == set(ids)
    assert n2.config_index == 0


def test_restart_recovers_the_configuration_from_the_log():
    net = cluster()
    net.add("n4")
    net.node("n1").propose_change(ADD, "n4", "h:4")
    net.drive()
    log = net.node("n2").raft.log.entries
    copy = EntryLog()
    copy.append_batch(log.slice(1, log.last_index + 1), 1)
    again = RawNode(Config("n2", ["n1", "n2", "n3"]), copy, HardState(), random.Random(1))
    assert again.raft.membership == net.node("n2").raft.membership
    assert again.raft.membership.learners == {"n4": "h:4"}


def test_snapshots_carry_the_configuration():
    net = cluster()
    net.add("n4")
    net.node("n1").propose_change(ADD, "n4", "h:4")
    net.drive()
    net.node("n1").propose([b"a", b"b"])
    net.drive()
    leader = net.node("n1").raft
    assert leader.membership_at(1) == Membership.of_voters(["n1", "n2", "n3"])
    assert leader.membership_at(leader.log.committed) == leader.membership
    # Compact the leader past everything, then add a fresh learner: it gets a snapshot.
    net.node("n1").compact(leader.log.committed)
    net.add("n5")
    net.node("n1").propose_change(ADD, "n5", "h:5")
    snaps = []
    for _ in range(5):
        net.drive()
        snaps += [m for m in net.sent if m.type == MsgType.SNAPSHOT and m.dst == "n5"]
        if snaps:
            break
    assert snaps, "no snapshot was sent"
    assert Membership.decode(snaps[0].entries).learners == {"n4": "h:4"}
    n5 = net.node("n5")
    n5.step(snaps[0])
    assert n5.raft.membership.learners == {"n4": "h:4"}  # the snapshot's configuration


def test_a_snapshot_without_a_readable_configuration_is_refused():
    node = RawNode(Config("n2", ["n1", "n2"]), EntryLog(), HardState(), random.Random(0))
    from raftfast.core.types import Message

    node.step(Message(MsgType.SNAPSHOT, "n1", "n2", 1, 10, 1, b"garbage"))
    assert node.raft.log.last_index == 0 and node.raft.pending_snapshot is None


def test_a_lost_first_probe_to_a_new_learner_is_repeated_on_heartbeats():
    net = cluster()
    net.add("n4")
    net.down.add("n4")  # its stream is not up yet: the first probe is lost
    net.node("n1").propose_change(ADD, "n4", "h:4")
    net.drive()
    net.down.discard("n4")
    for _ in range(3):  # no new proposals: only heartbeats can get things going
        net.node("n1").tick()
        net.drive()
    assert net.node("n4").raft.membership.learners == {"n4": "h:4"}
    assert net.node("n1").raft.progress["n4"].match_index == net.node("n1").raft.log.last_index


def test_a_removed_follower_receives_its_removal():
    """It is replicated to until the removal commits (and is heard: it may be needed for the
    commit), so it holds the entry that removes it; its driver then shuts it down once it
    applies it or once a peer refuses it as removed."""
    net = cluster()
    index = net.node("n1").propose_change(REMOVE, "n3")
    net.drive()
    n3 = net.node("n3").raft
    assert n3.config_index == index and "n3" not in n3.membership
    assert "n3" not in net.node("n1").raft.progress  # dropped once the removal committed


def test_peers_in_play_keep_a_node_being_removed_until_the_removal_commits():
    net = cluster()
    net.down = {"n2", "n3"}  # nothing commits
    net.node("n1").propose_change(REMOVE, "n3")
    leader = net.node("n1").raft
    assert set(leader.peers_in_play()) == {"n1", "n2", "n3"}
    assert "n3" in leader.progress
    assert set(leader.membership.voters) == {"n1", "n2"}  # but it no longer counts


def test_a_configuration_has_a_bounded_number_of_members_and_sane_addresses():
    from raftfast.address import is_address
    from raftfast.limits import MAX_MEMBERS

    m = Membership.of_voters(["n1"], "127.0.0.1:1")
    for i in range(MAX_MEMBERS - 1):
        m = m.change(ChangeKind.ADD_LEARNER, f"l{i}", f"127.0.0.1:{i + 2}")
    with pytest.raises(ValueError, match=f"at most {MAX_MEMBERS}"):
        m.change(ChangeKind.ADD_LEARNER, "one-too-many", "127.0.0.1:9999")
    # every address is stored in every configuration entry: short, printable ASCII
    assert is_address("127.0.0.1:7001") and is_address("[::1]:7001")
    for bad in ("h" * 300 + ":1", "\x01" * 10 + ":1", "٧:٧٠٠١", "a b:1", "h:0", "h:65536", ":1"):
        assert not is_address(bad), bad
    # IPv6 only in brackets ("::1" was host ":" and port 1: gRPC dialed [::1]:443)
    assert is_address("[fe80::1%eth0]:7001") and is_address("[::]:1")
    for bad in ("::1", "::1:7001", "[:1", "a:b:1", "[::1:7001", "a]:1", "[1.2.3.4]:5", "[x]:1"):
        assert not is_address(bad), bad
