"""Whom the core listens to (``Raft._admits``): strangers, TimeoutNow, forced votes and term
jumps. Every case is a message someone could send a node; a dropped message must leave the
node exactly as it was."""

from __future__ import annotations

from raftfast.core.membership import ChangeKind
from raftfast.core.raft import MAX_TERM_JUMP
from raftfast.core.types import Message, MsgType, Role

from .netutil import Net

IDS = ["a", "b", "c"]


def healthy() -> Net:
    net = Net(IDS)
    net.elect("a")
    net.node("a").propose([b"x"])
    net.drive()
    return net


def unchanged(net: Net, nid: str, before: tuple) -> bool:
    raft = net.node(nid).raft
    return (raft.term, raft.leader, raft.role, raft.log.last_index) == before


def state(net: Net, nid: str) -> tuple:
    raft = net.node(nid).raft
    return (raft.term, raft.leader, raft.role, raft.log.last_index)


def test_a_stranger_cannot_depose_a_healthy_leader():
    net = healthy()
    term = net.node("b").raft.term
    before = {nid: state(net, nid) for nid in IDS}
    for m in [
        Message(MsgType.HEARTBEAT, "mallory", "b", term + 5, commit=1),
        Message(MsgType.APPEND, "mallory", "b", term, 1, term, b""),
        Message(MsgType.VOTE, "mallory", "b", term + 1, 99, term),
        Message(MsgType.VOTE, "mallory", "b", term + 1, 99, term, context=1),  # "forced"
        Message(MsgType.PRE_VOTE, "mallory", "c", term + 1, 99, term),
        Message(MsgType.APPEND_RESP, "mallory", "a", term + 3, 1),  # would depose the leader
        Message(MsgType.TIMEOUT_NOW, "mallory", "c", term),
    ]:
        net.node(m.dst).step(m)
    net.drive()
    assert all(unchanged(net, nid, before[nid]) for nid in IDS)


def test_timeout_now_is_taken_from_the_leader_only():
    net = healthy()
    term = net.node("b").raft.term
    net.node("b").step(Message(MsgType.TIMEOUT_NOW, "c", "b", term))  # a follower's: ignored
    net.drive()
    assert net.leaders() == ["a"] and net.node("b").raft.term == term
    net.node("b").step(Message(MsgType.TIMEOUT_NOW, "a", "b", term))  # the leader's: campaign
    net.drive()
    assert net.leaders() == ["b"] and net.node("b").raft.term == term + 1


def test_a_forced_vote_passes_a_lease_only_from_a_voter_in_the_next_term():
    net = healthy()
    term = net.node("c").raft.term
    last = net.node("c").raft.log.last_index
    # a voter we know, but two terms ahead: not a leadership transfer
    net.node("c").step(Message(MsgType.VOTE, "b", "c", term + 2, last, term, context=1))
    assert net.node("c").raft.term == term
    # the next term: a transfer, which the lease must not block
    net.node("c").step(Message(MsgType.VOTE, "b", "c", term + 1, last, term, context=1))
    assert net.node("c").raft.term == term + 1 and net.node("c").raft.vote == "b"


def test_a_term_far_ahead_is_dropped_even_from_a_member():
    net = healthy()
    term = net.node("b").raft.term
    # Once adopted, such a term leaves no room for elections after it (the range guard stops
    # at 2**62): the cluster would have no leader, forever.
    net.node("b").step(Message(MsgType.HEARTBEAT, "a", "b", term + MAX_TERM_JUMP + 1))
    net.node("b").step(Message(MsgType.HEARTBEAT, "c", "b", (1 << 62) - 1))
    assert net.node("b").raft.term == term
    net.node("b").step(Message(MsgType.HEARTBEAT, "a", "b", term + MAX_TERM_JUMP))
    assert net.node("b").raft.term == term + MAX_TERM_JUMP  # a jump within reach is heard


def test_a_new_node_hears_the_leader_it_does_not_know_yet():
    # A joining node has no configuration: every member is a stranger to it until the log
    # brings the configurations. It must still hear the leader, at once and afterwards.
    net = healthy()
    d = net.add("d")
    leader = net.node("a")
    term = leader.raft.term
    d.step(Message(MsgType.HEARTBEAT, "a", "d", term, commit=0))
    assert (d.raft.term, d.raft.leader, d.raft.role) == (term, "a", Role.FOLLOWER)
    d.step(Message(MsgType.TIMEOUT_NOW, "b", "d", term))  # not its leader: ignored
    assert d.raft.role == Role.FOLLOWER and d.raft.term == term


def test_a_stranger_is_heard_once_no_known_leader_is_alive():
    # A follower that lags behind the configuration that brought the current leader: once its
    # old leader's lease has run out, the new leader's appends must get through.
    net = healthy()
    b = net.node("b")
    term = b.raft.term
    stranger = Message(MsgType.HEARTBEAT, "e", "b", term + 1, commit=0)
    b.step(stranger)
    assert b.raft.term == term  # in the lease of "a"
    net.down.add("a")
    for _ in range(2 * b.raft.config.election_tick):
        b.tick()  # (b's own elections fail: a is down and c is in a's lease)
    b.step(Message(MsgType.HEARTBEAT, "e", "b", b.raft.term + 1, commit=0))
    assert b.raft.leader == "e"


def test_a_leader_ignores_answers_about_entries_or_rounds_it_never_sent():
    net = healthy()
    leader = net.node("a").raft
    last, commit = leader.log.last_index, leader.log.committed
    term = leader.term
    for src in ("b", "c"):
        net.node("a").step(Message(MsgType.APPEND_RESP, src, "a", term, last + 1000))
        net.node("a").step(Message(MsgType.HEARTBEAT_RESP, src, "a", term, context=1 << 40))
    assert leader.progress["b"].match_index <= last and leader.log.committed == commit
    assert all(ack < 1 << 40 for ack in leader._read_acks.values())
    # ... but kept for the driver to report: such a follower holds another cluster's state
    assert leader.foreign_acks == {"b": (last + 1000, last), "c": (last + 1000, last)}
    leader.foreign_acks.clear()
    leader._foreign.pop("c")  # (c, as if it never said so)
    net.node("a").propose([b"y"])  # and it still commits, with c
    net.drive()
    assert leader.log.committed == last + 1
    # b's answers count no more, now that the log is longer (they passed for matches): each is
    # noted again, as first seen
    assert leader.progress["b"].match_index <= last and leader.progress["c"].match_index == last + 1
    assert leader.foreign_acks == {"b": (last + 1000, last)}


def test_timeout_now_from_a_voter_is_taken_while_no_leader_is_known():
    # Just after a restart a follower knows no leader yet; the leader's TimeoutNow (a transfer
    # to it) must still work, while a stranger's must not.
    net = healthy()
    b = net.node("b")
    term = b.raft.term
    b.raft.leader = ""
    b.step(Message(MsgType.TIMEOUT_NOW, "mallory", "b", term))
    assert b.raft.role == Role.FOLLOWER and b.raft.term == term
    b.step(Message(MsgType.TIMEOUT_NOW, "a", "b", term))
    assert b.raft.role == Role.CANDIDATE and b.raft.term == term + 1


def test_a_follower_taken_for_another_clusters_costs_a_term_at_most():
    # One answer "from b" past the end of the leader's log (a forged one, in plain mode) made
    # the leader ignore b for the rest of its leadership: with c down, a and b are a quorum,
    # yet nothing committed while a led. b is no quorum for check-quorum either: a steps down,
    # and the next term (which forgets) commits.
    net = healthy()
    a = net.node("a").raft
    net.node("a").step(Message(MsgType.APPEND_RESP, "b", "a", a.term, a.log.last_index + 1000))
    net.down.add("c")
    before = a.log.committed
    net.node("a").propose([b"y"])
    net.drive()
    assert a.log.committed == before  # (b's answers do not count)
    for _ in range(40):  # (20 election timeouts at most)
        net.tick_all(5)
        net.drive()
        leaders = net.leaders()
        if leaders and net.node(leaders[0]).raft.log.committed > before:
            break
    assert leaders and net.node(leaders[0]).raft.log.committed > before


def test_a_follower_removed_and_added_back_is_heard_again():
    net = healthy()
    a = net.node("a").raft
    net.node("a").step(Message(MsgType.APPEND_RESP, "c", "a", a.term, a.log.last_index + 1000))
    assert "c" in a._foreign
    net.node("a").propose_change(ChangeKind.REMOVE, "c")
    net.drive()
    del net.nodes["c"]
    net.add("c")  # (an empty data directory)
    net.node("a").propose_change(ChangeKind.ADD_LEARNER, "c", "c:1")
    net.drive()
    net.tick_all(50)
    net.drive()
    assert "c" not in a._foreign and net.node("c").raft.log.last_index == a.log.last_index
