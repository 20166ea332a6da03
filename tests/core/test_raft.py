"""Unit tests of the pure Raft core: elections, replication, commit rules, the Ready contract."""

from __future__ import annotations

import random

import pytest

from raftfast._accel import EntryLog, decode_batch, encode_batch
from raftfast.core.progress import ProgressState
from raftfast.core.raft import Config
from raftfast.core.raft_log import RaftLog, batch_count
from raftfast.core.rawnode import RawNode
from raftfast.core.types import ENTRY_NOOP, ENTRY_NORMAL, HardState, Message, MsgType, Role
from raftfast.errors import NotLeaderError

from .netutil import Net

IDS = ["a", "b", "c"]


def lone_node(nid: str = "a", voters=IDS, entries=None, hs=HardState(), **cfg) -> RawNode:
    return RawNode(Config(nid, voters, **cfg), entries or EntryLog(), hs, random.Random(7))


# -- configuration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "voters, kwargs",
    [
        (["b", "c"], {}),
        (["a", "a", "b"], {}),
        (IDS, {"election_tick": 1, "heartbeat_tick": 1}),
        (IDS, {"max_inflight": 0}),
    ],
)
def test_bad_config_is_rejected(voters, kwargs):
    with pytest.raises(ValueError):
        lone_node(voters=voters, **kwargs)


# -- elections -----------------------------------------------------------------------------


def test_single_node_elects_itself_and_commits_only_once_durable():
    node = lone_node(voters=["a"])
    node.campaign()
    rd = node.ready()
    assert node.raft.role == Role.LEADER
    assert rd.committed is None  # its no-op is not durable yet
    node.advance(rd)
    rd = node.ready()
    assert rd.committed_last == 1
    node.advance(rd)
    node.propose([b"x"])
    rd = node.ready()
    assert rd.committed is None and rd.last_index == 2
    node.advance(rd)
    assert node.ready().committed_last == 2


def test_three_nodes_elect_exactly_one_leader_by_ticking():
    net = Net(IDS)
    net.tick_all(40)
    assert len(net.leaders()) == 1
    leader = net.node(net.leaders()[0])
    assert leader.raft.term >= 1
    assert all(n.raft.leader == leader.raft.id for n in net.nodes.values())


def test_vote_is_persisted_before_it_is_answered():
    follower = lone_node("b")
    follower.step(Message(MsgType.VOTE, "a", "b", term=1, index=0, log_term=0))
    rd = follower.ready()
    assert rd.hard_state == HardState(1, "a", 0)
    assert [m.type for m in rd.messages] == [MsgType.VOTE_RESP]
    assert not rd.messages[0].reject
    assert rd.eager_messages == []  # never sent before the vote is durable


def test_one_vote_per_term():
    follower = lone_node("c")
    follower.step(Message(MsgType.VOTE, "a", "c", term=1))
    follower.step(Message(MsgType.VOTE, "b", "c", term=1))
    answers = {m.dst: m.reject for m in follower.ready().messages}
    assert answers == {"a": False, "b": True}


def test_vote_denied_to_a_less_up_to_date_log():
    entries = EntryLog()
    entries.append(2, [b"x", b"y"])
    node = lone_node("c", entries=entries, hs=HardState(2, "", 0))
    node.step(Message(MsgType.VOTE, "a", "c", term=3, index=5, log_term=1))
    (resp,) = node.ready().messages
    assert resp.reject and node.raft.vote == ""


def test_pre_vote_does_not_disturb_the_term_of_a_partitioned_node():
    net = Net(IDS)
    net.elect("a")
    term = net.node("a").raft.term
    net.down.add("c")
    for _ in range(60):
        net.node("c").tick()
        net.drive()
    c = net.node("c").raft
    assert c.term == term  # pre-vote never reached a quorum, so no term inflation
    net.down.clear()
    net.tick_all(3)
    assert net.leaders() == ["a"] and net.node("a").raft.term == term


def test_two_pre_candidates_with_equal_logs_do_not_split_the_vote():
    """The leader is gone and both followers start campaigning at once: the higher id grants
    the lower one's pre-vote, not the other way round, so one real election settles it."""

    def pre_candidate(nid: str) -> RawNode:
        node = lone_node(nid)
        while node.raft.role != Role.PRE_CANDIDATE:
            node.tick()
        node.advance(node.ready())  # (its own pre-vote requests: delivered by hand below)
        return node

    a, b = pre_candidate("a"), pre_candidate("b")
    last = (a.raft.log.last_index, a.raft.log.entries.last_term)
    term = a.raft.term + 1

    def pre_vote(src: str, dst: RawNode) -> Message:
        dst.step(Message(MsgType.PRE_VOTE, src, dst.raft.id, term, last[0], last[1]))
        rd = dst.ready()
        dst.advance(rd)
        (answer,) = [m for m in rd.messages if m.type == MsgType.PRE_VOTE_RESP]
        return answer

    assert not pre_vote("a", b).reject  # b grants the lower id
    assert pre_vote("b", a).reject  # a, campaigning too, does not grant the higher one


def test_without_pre_vote_a_rejoining_node_inflates_terms():
    net = Net(IDS, pre_vote=False, check_quorum=False)
    net.elect("a")
    net.down.add("c")
    for _ in range(60):
        net.node("c").tick()
        net.drive()
    assert net.node("c").raft.term > net.node("a").raft.term


def test_check_quorum_makes_an_isolated_leader_step_down():
    net = Net(IDS)
    net.elect("a")
    net.down.update({"b", "c"})
    for _ in range(2 * 10):
        net.node("a").tick()
        net.drive()
    assert net.node("a").raft.role == Role.FOLLOWER


def test_leader_lease_ignores_vote_requests_while_it_hears_from_the_leader():
    net = Net(IDS)
    net.elect("a")
    b = net.node("b")
    b.step(Message(MsgType.VOTE, "c", "b", term=9, index=100, log_term=9))
    assert b.raft.term == 1 and b.raft.vote != "c"


@pytest.mark.parametrize("kind", [MsgType.PRE_VOTE_RESP, MsgType.VOTE_RESP])
def test_leader_lease_ignores_late_higher_term_answers_to_an_old_campaign(kind):
    # A late rejection of one of b's pre-votes from before it heard a (c had moved to a newer
    # term) made b forget its leader and vote for c at once: c was elected within a's lease,
    # and a's lease reads were stale.
    net = Net(IDS)
    net.elect("a")
    a, b, c = (net.node(x) for x in IDS)
    net.down.add("a")  # (cut off right after its last round: it still leads, in its lease)
    c.raft.term += 1
    b.step(Message(kind, "c", "b", c.raft.term, reject=True))
    assert b.raft.term == a.raft.term and b.raft.leader == "a"
    c.raft.become_follower(c.raft.term, "", "test")
    c.campaign()
    net.drive()
    assert c.raft.role != Role.LEADER and a.raft.role == Role.LEADER


def test_a_follower_told_out_of_band_that_an_entry_it_holds_is_committed_commits_it():
    # (the answer to a proposal a follower forwarded: it applies at once, not at the leader's
    # next append or heartbeat)
    net = Net(IDS)
    net.elect("a")
    a, b = net.node("a"), net.node("b")
    index, _ = a.propose([b"x"])
    net.drive()
    assert a.commit_index >= index > b.commit_index  # (the commit rides on the next append)
    term = a.term_at(index)
    assert not b.learn_commit(index, term + 1), "another entry at that index"
    assert not b.learn_commit(index + 1, term), "not in its log"
    assert not b.learn_commit(index, 0)
    assert not a.learn_commit(index, term), "a leader knows"
    assert b.learn_commit(index, term) and b.commit_index == index
    net.drive()
    assert net.applied["b"][-1:] == [b"x"]
    assert not b.learn_commit(index, term)


def test_stale_leader_steps_down_on_a_higher_term_answer():
    net = Net(IDS)
    net.elect("a")
    net.down.add("a")
    net.tick_all(40)  # b and c elect a new leader among themselves
    (new_leader,) = net.leaders()
    net.down.clear()
    a = net.node("a")
    assert a.raft.role == Role.LEADER  # it heard nothing yet
    a.propose([b"lost?"])
    net.drive()
    assert a.raft.role == Role.FOLLOWER
    assert a.raft.term == net.node(new_leader).raft.term
    net.tick_all(1)  # the new leader's heartbeat names it
    assert a.raft.leader == new_leader
    assert b"lost?" not in net.applied[new_leader]


# -- replication ---------------------------------------------------------------------------


def test_propose_replicates_and_applies_everywhere():
    net = Net(IDS)
    net.elect("a")
    first, last = net.node("a").propose([b"x", b"y", b"z"])
    assert (first, last) == (2, 4)
    net.drive()
    net.tick_all(1)  # followers learn the commit index from the next heartbeat
    for nid in IDS:
        assert net.applied[nid] == [b"", b"x", b"y", b"z"]


def test_propose_on_a_follower_names_the_leader():
    net = Net(IDS)
    net.elect("a")
    with pytest.raises(NotLeaderError) as info:
        net.node("b").propose([b"x"])
    assert info.value.leader_id == "a"


def test_follower_acknowledges_only_after_persisting():
    net = Net(IDS)
    net.elect("a")
    net.node("a").propose([b"x"])
    leader_rd = net.node("a").ready()
    (to_b,) = [m for m in leader_rd.eager_messages if m.dst == "b" and m.entries]
    b = net.node("b")
    b.step(to_b)
    rd = b.ready()
    assert rd.entries and rd.last_index == 2
    acks = [m for m in rd.messages if m.type == MsgType.APPEND_RESP]
    assert acks and acks[0].index == 2  # in ``messages``: sent only after rd is durable
    assert rd.eager_messages == []


def test_leader_counts_itself_only_once_durable():
    net = Net(IDS)
    net.elect("a")
    a = net.node("a")
    a.propose([b"x"])
    rd = a.ready()  # the leader's write is in progress
    (to_b,) = [m for m in rd.eager_messages if m.dst == "b" and m.entries]
    net.node("b").step(to_b)
    rd_b = net.node("b").ready()
    net.node("b").advance(rd_b)
    for m in rd_b.messages:
        a.step(m)
    # Index 2 is durable on b only: a's own copy counts once a's write completes.
    assert a.raft.log.committed == 1
    a.advance(rd)
    assert a.raft.log.committed == 2


def test_a_leader_applies_what_its_followers_commit_while_its_own_write_syncs():
    net = Net(IDS)
    net.elect("a")
    a = net.node("a")
    a.propose([b"x"])
    rd = a.ready()  # the leader's write of index 2 is in progress
    assert a.take_committed() is None  # nothing committed yet
    a.propose([b"y"])  # more writes meanwhile: their appends leave at once
    appends = rd.eager_messages + a.take_eager_messages()
    for follower in ("b", "c"):
        f = net.node(follower)
        for m in appends:
            if m.dst == follower:
                f.step(m)
        rd_f = f.ready()
        f.advance(rd_f)
        for m in rd_f.messages:
            a.step(m)
    # Both followers hold 2 and 3 durably: a quorum without the leader's own copy.
    committed = a.take_committed()
    assert committed.last == 3 and committed.payloads == [b"x", b"y"]
    assert a.take_committed() is None  # taken once
    a.advance(rd)
    assert a.raft.log.applied == 3  # advance does not take it back to rd's
    rd = a.ready()
    assert rd.committed is None  # and the next Ready does not apply them again
    a.advance(rd)


def test_a_remembered_append_slice_never_outlives_the_entries_it_copied():
    log = RaftLog(EntryLog())
    log.append(1, [b"a", b"b", b"c"], ENTRY_NORMAL)
    first = log.slice(2, 4, 0)
    assert log.slice(2, 4, 0) is first  # the next follower at 2 gets the same bytes
    log.truncate_after(1)  # a new leader overwrote 2..3
    log.append(2, [b"x", b"y"], ENTRY_NORMAL)
    assert log.slice(2, 4, 0) == log.entries.slice(2, 4) != first
    log.stable = log.applied = log.committed = 3
    log.compact(2)
    assert log.slice(3, 4, 0) == log.entries.slice(3, 4)
    log.restore(10, 3)
    log.append(3, [b"z"], ENTRY_NORMAL)
    assert decode_batch(log.slice(11, 12, 0))[3] == [b"z"]


def test_a_remembered_slice_serves_another_limit_only_when_it_is_the_same_slice():
    """A leader sends [2, 4) under the message limit, then writes [2, 4) to its WAL with no
    limit: the same bytes, unless the limit cut the first slice short."""
    log = RaftLog(EntryLog())
    log.append(1, [b"a" * 10, b"b" * 10, b"c" * 10], ENTRY_NORMAL)
    sent = log.slice(2, 4, 20)
    assert log.slice(2, 4, 0) is sent and log.slice(2, 4, 1000) is sent
    assert log.slice(2, 4, 19) == log.entries.slice(2, 4, 19)  # (over this one's limit)
    assert decode_batch(log.slice(2, 4, 19))[3] == [b"b" * 10]
    cut = log.slice(2, 4, 15)
    assert decode_batch(cut)[3] == [b"b" * 10]
    assert log.slice(2, 4, 0) == log.entries.slice(2, 4) != cut  # (cut short: not the same)
    assert log.slice(2, 3, 0) == cut  # ... but all of [2, 3)
    assert log.slice(3, 4, 0) == log.entries.slice(3, 4)


def test_a_sender_shares_a_remembered_prefix_and_never_an_empty_one():
    """Followers a few entries apart: the one behind gets the batch the other was sent and the
    rest in a second one, both remembered; an empty slice (a heartbeat-like append) is never
    handed out for entries, nor a prefix to the WAL, which needs all it asks for."""
    log = RaftLog(EntryLog())
    log.append(1, [b"a", b"b"], ENTRY_NORMAL)
    assert batch_count(log.slice(3, 3, 1000)) == 0  # (a follower with all: an empty append)
    assert log._slices == []  # (not remembered: made at no cost)
    first = log.slice(1, 3, 1000)
    log.append(1, [b"c", b"d"], ENTRY_NORMAL)
    rest = log.slice(3, 5, 1000, prefix=True)
    assert decode_batch(rest)[3] == [b"c", b"d"]
    assert log.slice(1, 5, 1000, prefix=True) is first  # [1, 3) now, [3, 5) next
    assert log.slice(3, 5, 1000) is rest
    whole = log.slice(1, 5, 0)  # the WAL: no prefix
    assert decode_batch(whole)[3] == [b"a", b"b", b"c", b"d"] and whole is not first
    assert log.slice(1, 5, 1000) is whole  # (all of it, within the limit)
    assert decode_batch(log.slice(1, 5, 2, prefix=True))[3] == [b"a", b"b"]  # (the limit)


def test_remembered_slices_are_few_and_hold_few_bytes_besides_the_newest(monkeypatch):
    from raftfast.core import raft_log

    monkeypatch.setattr(raft_log, "_SLICES_BYTES", 300)
    log = RaftLog(EntryLog())
    log.append(1, [b"x" * 100] * 10, ENTRY_NORMAL)
    batches = [log.slice(i, i + 1, 0) for i in range(1, 10)]
    assert [b for *_, b in log._slices] == [batches[8], batches[7]]  # (133 bytes each)
    big = log.slice(1, 11, 0)
    assert [b for *_, b in log._slices] == [big]  # (the newest stays, however big)
    monkeypatch.setattr(raft_log, "_SLICES_BYTES", 1 << 20)
    batches = [log.slice(i, i + 1, 0) for i in range(1, 10)]
    assert len(log._slices) == raft_log._SLICES_KEPT
    assert log.slice(4, 5, 0) is batches[3]  # (asked for again: kept longest)
    for lo in (1, 2, 3, 5, 6):  # (five others, each of two entries)
        log.slice(lo, lo + 2, 0)
    assert [b for *_, b in log._slices][-1] is batches[3]


def test_leader_commits_old_term_entries_only_through_an_entry_of_its_term():
    """Raft §5.4.2 / Figure 8: replicas of an old-term entry alone never commit it."""
    entries = EntryLog()
    entries.append(1, [b""])
    entries.append(2, [b"old"])
    hs = HardState(3, "a", 1)
    a = RawNode(Config("a", IDS), entries, hs, random.Random(1))
    a.raft._campaign(pre=False)  # term 4
    for voter in ("b", "c"):
        a.step(Message(MsgType.VOTE_RESP, voter, "a", a.raft.term))
    assert a.raft.role == Role.LEADER
    rd = a.ready()
    a.advance(rd)
    # b reports a durable match of index 2 (the term-2 entry) only.
    a.step(Message(MsgType.APPEND_RESP, "b", "a", a.raft.term, index=2))
    assert a.raft.log.committed == 1, "an old-term entry must not be committed by counting"
    a.step(Message(MsgType.APPEND_RESP, "b", "a", a.raft.term, index=3))
    assert a.raft.log.committed == 3  # the no-op of term 4 commits everything before it
    assert a.raft.log.entries.entry(3)[1] == ENTRY_NOOP


def test_conflicting_suffix_is_truncated_and_replaced():
    entries = EntryLog()
    entries.append(1, [b"a", b"b"])
    entries.append(2, [b"stale1", b"stale2"])
    b = lone_node("b", entries=entries, hs=HardState(2, "", 2))
    batch = encode_batch(3, [3, 3], [b"new1", b"new2"])
    b.step(Message(MsgType.APPEND, "a", "b", 3, index=2, log_term=1, entries=batch, commit=4))
    log = b.raft.log
    assert [log.entries.entry(i)[2] for i in range(1, 5)] == [b"a", b"b", b"new1", b"new2"]
    assert log.committed == 4
    rd = b.ready()
    assert rd.entries and rd.last_index == 4  # the overwrite is handed to storage again


def test_duplicate_append_is_idempotent():
    b = lone_node("b")
    batch = encode_batch(1, [1, 1], [b"x", b"y"])
    m = Message(MsgType.APPEND, "a", "b", 1, index=0, log_term=0, entries=batch, commit=0)
    b.step(m)
    b.step(m)
    assert b.raft.log.last_index == 2
    assert [r.index for r in b.ready().messages] == [2, 2]


def test_corrupt_or_misplaced_batch_is_dropped():
    b = lone_node("b")
    batch = bytearray(encode_batch(1, [1], [b"x"]))
    batch[-1] ^= 0xFF
    b.step(Message(MsgType.APPEND, "a", "b", 1, index=0, entries=bytes(batch)))
    b.step(Message(MsgType.APPEND, "a", "b", 1, index=5, log_term=0, entries=batch[:0]))
    wrong_place = encode_batch(7, [1], [b"x"])
    b.step(Message(MsgType.APPEND, "a", "b", 1, index=0, entries=wrong_place))
    assert b.raft.log.last_index == 0


def test_fast_backtracking_skips_a_whole_conflicting_term():
    def log_with(*runs):
        entries = EntryLog()
        for term, count in runs:
            entries.append(term, [b"e%d" % term] * count)
        return entries

    net = Net(IDS)
    # a and b share 60 entries of term 3; c holds 50 entries of a term-2 leader nobody kept.
    for nid, entries in [
        ("a", log_with((1, 1), (3, 60))),
        ("b", log_with((1, 1), (3, 60))),
        ("c", log_with((1, 1), (2, 50))),
    ]:
        net.nodes[nid] = RawNode(Config(nid, IDS), entries, HardState(3, "", 1), random.Random(3))
    net.elect("a")
    net.drive()
    rejects = [m for m in net.sent if m.type == MsgType.APPEND_RESP and m.reject]
    assert len(rejects) == 1  # one round trip skips the whole term-2 run, not 50
    assert net.node("c").raft.log.entries.slice(1, 63) == net.node("a").raft.log.entries.slice(
        1, 63
    )


def test_pipelining_keeps_several_frames_in_flight():
    net = Net(IDS, max_msg_bytes=10, max_inflight=4)
    net.elect("a")
    a = net.node("a")
    a.propose([b"0123456789"] * 20)
    rd = a.ready()
    to_b = [m for m in rd.eager_messages if m.dst == "b" and m.entries]
    assert len(to_b) == 4  # the window, not one frame per round trip
    a.advance(rd)
    for m in to_b:
        net.node("b").step(m)
    net.drive()
    net.tick_all(1)
    assert net.applied["b"][-1] == b"0123456789" and len(net.applied["b"]) == 21


def test_a_follower_whose_last_appends_were_lost_catches_up_with_no_new_write():
    # A follower in REPLICATE whose last frames were lost (a stream that broke before the
    # transport could say so) stayed behind until the next write: heartbeat answers sent it
    # nothing, the leader's next index being past its last entry (a chaos schedule: one
    # node 5 entries behind for the 90 s of the quiet period).
    net = Net(IDS)
    net.elect("a")
    a = net.node("a")
    b = net.node("b")
    a.propose([b"x"])
    net.drive()
    assert b.raft.log.last_index == a.raft.log.last_index
    a.propose([b"lost"])
    rd = a.ready()
    a.advance(rd)
    for m in rd.eager_messages + rd.messages:
        if not (m.dst == "b" and m.entries):
            net.nodes[m.dst].step(m)
    net.drive()
    assert net.applied["a"][-1] == b"lost"
    assert b.raft.log.last_index == a.raft.log.last_index - 1
    net.tick_all(3 * a.raft.config.heartbeat_tick)  # (heartbeats only: nothing proposed)
    assert b.raft.log.last_index == a.raft.log.last_index
    assert net.applied["b"][-1] == b"lost"


def test_follower_learns_commit_index_from_heartbeats():
    net = Net(IDS)
    net.elect("a")
    net.node("a").propose([b"x"])
    net.drive()
    assert net.node("a").raft.log.committed == 2
    # The new commit index is not broadcast on its own: it rides on the next heartbeat.
    assert net.node("b").raft.log.committed == 1
    net.tick_all(1)
    assert net.node("b").raft.log.committed == 2
    assert net.node("c").status().applied_index == 2


def test_advance_must_follow_ready():
    node = lone_node(voters=["a"])
    node.campaign()
    rd = node.ready()
    with pytest.raises(RuntimeError):
        node.ready()
    node.advance(rd)
    with pytest.raises(RuntimeError):
        node.advance(rd)


def test_restart_from_storage_keeps_term_vote_and_commit():
    entries = EntryLog()
    entries.append(1, [b"", b"x"])
    node = lone_node("b", entries=entries, hs=HardState(5, "a", 9))
    s = node.status()
    assert (s.term, node.raft.vote) == (5, "a")
    assert s.commit_index == 2  # clamped to what survived (a torn tail may lose entries)
    assert s.durable_index == 2


# -- ReadIndex -----------------------------------------------------------------------------


def test_read_index_waits_for_a_quorum_heartbeat_round():
    net = Net(IDS)
    net.elect("a")
    a = net.node("a")
    a.read_index(42)
    rd = a.ready()
    assert rd.read_states == []
    heartbeats = [m for m in rd.eager_messages if m.type == MsgType.HEARTBEAT]
    assert {m.dst for m in heartbeats} == {"b", "c"} and all(m.context for m in heartbeats)
    a.advance(rd)
    net.nodes["b"].step(heartbeats[0] if heartbeats[0].dst == "b" else heartbeats[1])
    rd_b = net.node("b").ready()
    net.node("b").advance(rd_b)
    for m in rd_b.messages:
        a.step(m)
    assert a.ready().read_states == [(42, a.raft.log.committed)]


def test_read_index_on_a_partitioned_leader_never_confirms():
    net = Net(IDS)
    net.elect("a")
    net.down.update({"b", "c"})
    net.node("a").read_index(7)
    net.drive()
    assert net.node("a").raft.read_states == [] and net.node("a").raft._reads


def test_reads_waiting_until_confirmed_or_the_leader_steps_down():
    net = Net(IDS)
    net.elect("a")
    a = net.node("a")
    assert not a.reads_waiting()
    a.read_index(1)
    assert a.reads_waiting()
    net.drive()  # (the heartbeat round answered)
    assert not a.reads_waiting()
    net.down.update({"b", "c"})
    a.read_index(2)
    net.drive()
    assert a.reads_waiting()  # (no quorum answers)
    a.step(Message(MsgType.HEARTBEAT, "b", "a", a.raft.term + 1))  # (a newer leader)
    assert a.raft.role == Role.FOLLOWER and not a.reads_waiting()


def test_read_index_on_a_follower_names_the_leader():
    net = Net(IDS)
    net.elect("a")
    with pytest.raises(NotLeaderError):
        net.node("b").read_index(1)


def test_read_index_before_the_noop_commits_waits_for_it():
    net = Net(IDS)
    a = net.node("a")
    a.campaign()
    # Win the election but hold back replication of the no-op.
    net.down.update({"b", "c"})
    for voter in ("b", "c"):
        a.step(Message(MsgType.PRE_VOTE_RESP, voter, "a", a.raft.term + 1))
    for voter in ("b", "c"):
        a.step(Message(MsgType.VOTE_RESP, voter, "a", a.raft.term))
    assert a.raft.role == Role.LEADER
    a.read_index(5)
    assert a.raft._reads == [(5, -1, 0)]
    net.down.clear()
    net.drive()
    assert a.raft.log.committed == 1
    net.tick_all(1)
    assert net.node("a").raft._reads == []


# -- leadership transfer -------------------------------------------------------------------


def test_transfer_to_an_up_to_date_follower():
    net = Net(IDS)
    net.elect("a")
    term = net.node("a").raft.term
    net.node("a").transfer_leadership("c")
    net.drive()
    assert net.leaders() == ["c"] and net.node("c").raft.term == term + 1
    assert net.node("a").raft.leader == "c"


def test_transfer_brings_a_lagging_target_up_to_date_first():
    net = Net(IDS)
    net.elect("a")
    net.down.add("c")
    net.node("a").propose([b"x", b"y"])
    net.drive()
    net.down.clear()
    net.node("a").transfer_leadership("c")
    with pytest.raises(NotLeaderError):
        net.node("a").propose([b"refused during the transfer"])
    net.drive()
    assert net.leaders() == ["c"]
    assert net.applied["c"][:3] == [b"", b"x", b"y"]


def test_transfer_to_an_unreachable_target_times_out_and_leader_carries_on():
    net = Net(IDS)
    net.elect("a")
    net.down.add("c")
    a = net.node("a")
    a.transfer_leadership("c")
    for _ in range(10):
        a.tick()
        net.drive()
    assert a.raft.role == Role.LEADER and a.raft.transferee == ""
    a.propose([b"accepted again"])


def test_transfer_to_a_target_whose_stream_broke_is_given_up_at_once():
    # (it is likely stopping, as in a whole cluster's stop: leading on beats an election
    # timeout of refused proposals)
    net = Net(IDS)
    net.elect("a")
    a = net.node("a")
    assert a.transfer_candidate() == "b" and a.transfer_candidate(skip={"b"}) == "c"
    assert a.transfer_candidate(skip={"b", "c"}) is None
    net.down.add("c")
    a.propose([b"c lags: no TimeoutNow yet"])
    net.drive()
    a.transfer_leadership("c")
    assert a.transferee == "c" and not a.raft.timeout_now_sent
    a.report_unreachable("b")
    assert a.transferee == "c"
    a.report_unreachable("c")
    assert a.raft.role == Role.LEADER and a.transferee == ""
    a.propose([b"accepted at once"])


def test_a_target_told_to_campaign_keeps_the_transfer_when_its_stream_breaks():
    # Taking writes again would leave the target behind: its forced campaign would unseat the
    # leader and fail, and nobody would lead for an election timeout (a review found it).
    net = Net(IDS)
    net.elect("a")
    a, c = net.node("a"), net.node("c")
    a.propose([b"base"])
    net.drive()
    a.transfer_leadership("c")  # c is caught up: TimeoutNow goes out in this Ready
    rd = a.ready()
    a.advance(rd)
    held = [m for m in rd.eager_messages + rd.messages if m.type == MsgType.TIMEOUT_NOW]
    assert held and held[0].dst == "c"
    a.report_unreachable("c")  # the stream broke just after the frame left
    assert a.transferee == "c"
    with pytest.raises(NotLeaderError):
        a.propose([b"refused: the transfer goes on"])
    c.step(held[0])
    net.drive()
    assert net.leaders() == ["c"]


def test_transfer_to_a_non_voter_is_rejected():
    net = Net(IDS)
    net.elect("a")
    with pytest.raises(ValueError):
        net.node("a").transfer_leadership("zz")


def test_a_stale_rejection_does_not_restart_replication():
    """On a network that reorders, a follower may reject frames that arrived before their
    predecessors; answers to frames of an earlier probe/replicate round must be ignored, or
    every one of them restarts replication (which the simulation saw turn into a storm)."""
    net = Net(["n1", "n2", "n3"], max_msg_bytes=1)
    net.elect("n1")
    net.node("n1").propose([b"a", b"b", b"c"])
    net.drive()
    leader = net.node("n1").raft
    pr = leader.progress["n2"]
    assert pr.state == ProgressState.REPLICATE

    def rejection(generation: int) -> Message:
        return Message(
            MsgType.APPEND_RESP,
            "n2",
            "n1",
            leader.term,
            index=pr.match_index + 1,
            reject=True,
            hint=pr.match_index,
            context=generation,
        )

    net.node("n1").step(rejection(pr.generation - 1))  # stale
    assert pr.state == ProgressState.REPLICATE
    net.node("n1").step(rejection(pr.generation))  # current
    assert pr.state == ProgressState.PROBE


def test_a_follower_that_lost_acknowledged_entries_is_caught_up_again():
    """A disk that loses a record it had synced (a torn WAL tail) leaves the follower behind
    the match index the leader recorded; the leader must not wait for it forever."""
    net = Net(["n1", "n2", "n3"])
    net.elect("n1")
    net.node("n1").propose([b"a", b"b", b"c"])
    net.drive()
    leader = net.node("n1").raft
    assert leader.progress["n2"].match_index == leader.log.last_index == 4
    old = net.node("n2").raft
    shorter = EntryLog()
    shorter.append_batch(old.log.entries.slice(1, 3), 1)  # entries 3 and 4 are gone
    net.nodes["n2"] = RawNode(
        Config("n2", ["n1", "n2", "n3"]), shorter, HardState(old.term, old.vote, 2)
    )
    net.node("n1").report_unreachable("n2")  # its stream broke when it restarted
    net.node("n1").propose([b"d"])
    net.drive()
    assert net.node("n2").raft.log.last_index == 5
    assert leader.progress["n2"].match_index == 5


def test_restart_with_a_snapshot_newer_than_the_synced_commit_index():
    """The driver does not sync a Ready that only moves the commit index, so after a crash the
    state machine's snapshot may be ahead of the recovered commit index; what it holds is
    committed (the simulation caught the log refusing to compact up to it)."""
    log = EntryLog()
    log.append(1, [b"a", b"b", b"c", b"d", b"e", b"f"])
    node = RawNode(Config("n1", ["n1", "n2", "n3"]), log, HardState(1, "", 4), applied=6)
    assert node.raft.log.committed == 6 and node.raft.log.applied == 6
    node.compact(5)  # allowed: entries up to 6 are in the snapshot
