"""The Raft algorithm as a deterministic state machine: no I/O, no clocks, no global random.

Time passes through ``tick()``; peers' messages arrive through ``step()``; outgoing messages pile
up in ``msgs`` (send only after the current Ready is durable) and ``eager_msgs`` (the leader's
AppendEntries and heartbeats, which may be sent while its own write is in progress — Raft thesis
§10.2.1). ``RawNode`` wraps this class with the Ready/advance contract.

The shape follows etcd-io/raft: pre-vote (thesis §9.6), check-quorum with leader leases for
vote requests (§6.2), a no-op entry on election (§5.4.2), per-follower progress with probing and
pipelined replication, and fast backtracking with conflict hints.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from raftfast._accel import batch_info, entries_of_type
from raftfast.core.membership import ChangeKind, Membership
from raftfast.core.progress import Progress, ProgressState
from raftfast.core.quorum import quorum_match, quorum_size, vote_result
from raftfast.core.raft_log import RaftLog, batch_count
from raftfast.core.types import (
    ENTRY_CONFIG,
    ENTRY_NOOP,
    ENTRY_NORMAL,
    HardState,
    Message,
    MsgType,
    Role,
)
from raftfast.errors import BatchError, ChangeInProgressError, NotLeaderError

_EMPTY = b""
# Votes, pre-votes and their answers: of a newer term, ignored while in a leader's lease.
_ELECTION_TRAFFIC = frozenset(
    (MsgType.VOTE, MsgType.PRE_VOTE, MsgType.VOTE_RESP, MsgType.PRE_VOTE_RESP)
)
_FORCED_VOTE = 1  # VOTE context: a leadership transfer, which others' leases must not block
# 2**32 elections at one every half second take 68 years: no real term jumps further.
MAX_TERM_JUMP = 1 << 32
_FROM_STRANGERS = frozenset(
    (MsgType.APPEND, MsgType.HEARTBEAT, MsgType.SNAPSHOT, MsgType.VOTE, MsgType.PRE_VOTE)
)


@dataclass
class Config:
    """Static settings of one Raft node. Times are in ticks (the driver decides a tick's length)."""

    id: str
    voters: Sequence[str]  # the bootstrap configuration; empty for a node that joins later
    election_tick: int = 10  # followers campaign after election_tick..2*election_tick-1 ticks
    heartbeat_tick: int = 1
    pre_vote: bool = True
    check_quorum: bool = True
    max_msg_bytes: int = 1 << 20  # payload bytes per AppendEntries frame
    max_inflight: int = 256  # AppendEntries frames in flight per follower
    max_inflight_bytes: int = 32 << 20
    max_apply_bytes: int = 8 << 20  # payload bytes of committed entries per Ready

    def validate(self) -> None:
        if not self.id:
            raise ValueError("node id must not be empty")
        if self.voters and self.id not in self.voters:
            raise ValueError(f"node {self.id!r} is not among the voters {list(self.voters)}")
        if len(set(self.voters)) != len(self.voters):
            raise ValueError(f"duplicate voter ids in {list(self.voters)}")
        if self.heartbeat_tick < 1 or self.election_tick <= self.heartbeat_tick:
            raise ValueError("need 1 <= heartbeat_tick < election_tick")
        if self.max_msg_bytes < 1 or self.max_inflight < 1 or self.max_inflight_bytes < 1:
            raise ValueError("message and in-flight limits must be positive")


class Raft:
    def __init__(
        self,
        config: Config,
        entries,
        hard_state: HardState,
        rng: random.Random,
        applied: int = 0,
        membership: Membership | None = None,
    ) -> None:
        """``membership`` is the configuration of the snapshot the log starts from (None: the
        bootstrap configuration ``config.voters``)."""
        config.validate()
        self.config = config
        self.id = config.id
        self.rng = rng
        self.log = RaftLog(entries, hard_state.commit, applied)
        # Every configuration the log still holds, as (index, membership), oldest first. The
        # first is the one in force where the log starts; the newest is in force now, committed
        # or not (thesis §4.1: a server uses the latest configuration in its log).
        base = membership if membership is not None else Membership.of_voters(config.voters)
        self._configs: list[tuple[int, Membership]] = [(entries.first_index - 1, base)]
        if entries.last_index >= entries.first_index:
            self._configs += _configs_in(entries.slice(entries.first_index, entries.last_index + 1))
        self.membership = self._configs[-1][1]
        self.voters: list[str] = sorted(self.membership.voters)
        self.pending_snapshot: tuple[int, int] | None = None  # follower: (index, term) to install
        self.term = hard_state.term
        self.vote = hard_state.vote
        self.role = Role.FOLLOWER
        self.leader = ""
        self.msgs: list[Message] = []
        self.eager_msgs: list[Message] = []
        self.progress: dict[str, Progress] = {}
        self.votes: dict[str, bool] = {}
        self.read_states: list[tuple[int, int]] = []  # confirmed reads: (request id, index)
        self._reads: list[tuple[int, int, int]] = []  # waiting: (request id, index, round)
        self._read_round = 0
        self._read_acks: dict[str, int] = {}  # voter -> highest round it confirmed
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self.randomized_election_timeout = 0
        self.reason = "start"  # why the role or term last changed (for the driver's log)
        # Followers that acknowledged entries past the end of this leader's log: within one
        # cluster a follower never holds more than its leader (leader completeness), so such a
        # follower's state came from elsewhere (another backup restored at a founding node).
        # None of its answers counts for the rest of this leadership or until it leaves the
        # configuration (once our log passed the index it named, they would have passed for
        # matches: it skipped our entries), nor for check-quorum, and each is noted in
        # ``foreign_acks`` for the driver to report (and clear): the index it first named, and
        # where our log ended then.
        self._foreign: dict[str, tuple[int, int]] = {}
        self.foreign_acks: dict[str, tuple[int, int]] = {}
        self.transferee = ""  # leader: the node leadership is being handed to
        self.timeout_now_sent = False  # ... and it was told to campaign
        self.transfer_elapsed = 0
        self.become_follower(self.term, "")

    # -- public inputs -------------------------------------------------------------------------

    def tick(self) -> None:
        if self.role == Role.LEADER:
            self._tick_leader()
        else:
            self.election_elapsed += 1
            if self.election_elapsed >= self.randomized_election_timeout:
                self.election_elapsed = 0
                if self._can_campaign():
                    self.campaign()
                else:
                    self.leader = ""  # no word from a leader: stop vouching for its lease

    def campaign(self) -> None:
        """Start an election now (pre-vote first when enabled). No-op on a leader."""
        if self.role == Role.LEADER or not self._can_campaign():
            return
        self.reason = "election timeout"
        self._campaign(pre=self.config.pre_vote)

    def propose(self, payloads: Sequence[bytes]) -> tuple[int, int]:
        """Append client commands as one batch; returns their (first, last) index."""
        if self.role != Role.LEADER:
            raise NotLeaderError(leader_id=self.leader or None)
        if self.transferee:
            # Proposals would keep the target behind forever (thesis §3.10).
            raise NotLeaderError(
                f"leadership transfer to {self.transferee} in progress", self.transferee
            )
        if not payloads:
            raise ValueError("propose needs at least one payload")
        first = self.log.last_index + 1
        last = self.log.append(self.term, payloads, ENTRY_NORMAL)
        self._broadcast_append()
        return first, last

    def learn_commit(self, index: int, term: int) -> bool:
        """A follower told by its leader, out of band (the answer to a proposal it forwarded),
        that entry ``index`` of ``term`` is committed: if our log holds that very entry, our
        log up to it is the leader's (log matching), so it is committed here too; True if that
        moved our commit index. (An append or heartbeat would tell us a moment later.)"""
        if self.role != Role.FOLLOWER or term == 0 or index <= self.log.committed:
            return False
        if not self.log.match_term(index, term):
            return False
        return self.log.commit_to(index)

    def read_index(self, request_id: int) -> None:
        """ReadIndex (thesis §6.4): confirm leadership with a heartbeat round, then report
        ``(request_id, commit index)`` in ``read_states``; reads are linearizable once the state
        machine has applied that index. Batch many client reads under one request id."""
        if self.role != Role.LEADER:
            raise NotLeaderError(leader_id=self.leader or None)
        if self.log.term_at(self.log.committed) != self.term:
            # Until our no-op commits we do not know the true commit index (§6.4 step 1).
            self._reads.append((request_id, -1, 0))
            return
        self._add_read(request_id)

    def _add_read(self, request_id: int) -> None:
        if self.voters == [self.id]:
            self.read_states.append((request_id, self.log.committed))
            return
        self._read_round += 1
        self._reads.append((request_id, self.log.committed, self._read_round))
        self._broadcast_heartbeat()

    def _release_reads(self) -> None:
        """Hand out every read whose heartbeat round a quorum (us included) confirmed."""
        if not self._reads:
            return
        rounds = sorted(
            (self._read_round if v == self.id else self._read_acks.get(v, 0) for v in self.voters),
            reverse=True,
        )  # a leader that is removing itself is not among the voters: it does not count
        confirmed = rounds[quorum_size(len(self.voters)) - 1]
        can_start = self.log.term_at(self.log.committed) == self.term
        waiting, start_now = [], []
        for request_id, index, round_ in self._reads:
            if index < 0 and can_start:
                start_now.append(request_id)  # our no-op committed: the read can begin
            elif 0 < round_ <= confirmed:
                self.read_states.append((request_id, index))
            else:
                waiting.append((request_id, index, round_))
        self._reads = waiting
        for request_id in start_now:
            self._add_read(request_id)

    def transfer_leadership(self, target: str) -> None:
        """Hand leadership to ``target`` (thesis §3.10): stop taking proposals, bring the target
        up to date, then send it TimeoutNow so it campaigns at once. Gives up after an election
        timeout. No-op if ``target`` already leads or a transfer to it is under way."""
        if self.role != Role.LEADER:
            raise NotLeaderError(leader_id=self.leader or None)
        if target not in self.voters:
            raise ValueError(f"{target!r} is not a voter")
        if target == self.id or target == self.transferee:
            return
        self.transferee = target
        self.transfer_elapsed = 0
        self.timeout_now_sent = False
        pr = self.progress[target]
        if pr.match_index == self.log.last_index:
            self._send_timeout_now(target)
        else:
            self._send_append(target, pr, allow_empty=True)

    def _send_timeout_now(self, target: str) -> None:
        self.timeout_now_sent = True
        self._send(Message(MsgType.TIMEOUT_NOW, self.id, target, self.term))

    def compact(self, index: int) -> None:
        """The driver holds a durable snapshot at ``index``: entries up to it may go."""
        self.log.compact(index)
        # Keep the configuration in force at the new start of the log, and the ones after it.
        keep = max(i for i, (at, _) in enumerate(self._configs) if at <= index)
        del self._configs[:keep]

    # -- membership ----------------------------------------------------------------------------

    def membership_at(self, index: int) -> Membership:
        """The configuration in force at ``index`` (for a snapshot taken there)."""
        found = self._configs[0][1]
        for at, m in self._configs:
            if at > index:
                break
            found = m
        return found

    def configs(self) -> list[tuple[int, Membership]]:
        """Every configuration the log still holds, as (index, membership), oldest first."""
        return list(self._configs)

    @property
    def config_index(self) -> int:
        """Index of the entry that made the current configuration (0: bootstrap)."""
        return self._configs[-1][0]

    def propose_change(self, kind: ChangeKind, node_id: str, address: str = "") -> int:
        """Append a single-server configuration change; returns its index. It is in force at
        once (on every node as soon as it is appended there) and final once committed.

        Refused (ChangeInProgressError, retry later) while another change is uncommitted, and
        until this leader has committed an entry of its own term: without that rule a change
        made by a deposed leader and one made by its successor could together skip the overlap
        that single-server changes rely on (the bug described on raft-dev in 2015)."""
        if self.role != Role.LEADER:
            raise NotLeaderError(leader_id=self.leader or None)
        if self.transferee:
            raise NotLeaderError(
                f"leadership transfer to {self.transferee} in progress", self.transferee
            )
        if self.config_index > self.log.committed:
            raise ChangeInProgressError(
                f"the change at index {self.config_index} is not committed yet"
            )
        if self.log.term_at(self.log.committed) != self.term:
            raise ChangeInProgressError("this leader has not committed an entry of its term yet")
        new = self.membership.change(kind, node_id, address)
        index = self.log.append(self.term, [new.encode()], ENTRY_CONFIG)
        self._configs.append((index, new))
        self._membership_changed()
        self._broadcast_append()
        return index

    def force_new_cluster(self, address: str) -> int:
        """Disaster recovery, when the others are gone for good: make this node the only voter
        by a configuration entry appended to its own log; returns its index. Everything in the
        log so far commits under it (entries the old cluster had not committed included), as
        etcd's --force-new-cluster does. Never while the old cluster may still run."""
        if self.role == Role.LEADER:
            raise ValueError("a leader has a quorum: no need to force a new cluster")
        new = Membership({self.id: address})
        index = self.log.append(self.term, [new.encode()], ENTRY_CONFIG)
        self._configs.append((index, new))
        self._membership_changed()
        return index

    def _can_campaign(self) -> bool:
        """Voters campaign; learners and strangers never do. A voter being removed still may
        while its removal is uncommitted (thesis §4.2.2): it may be the only one holding that
        entry, and without it the remaining voters could not elect anyone."""
        if self.id in self.membership.voters:
            return True
        if self.config_index > self.log.committed and len(self._configs) > 1:
            return self.id in self._configs[-2][1].voters
        return False

    def peers_in_play(self) -> dict[str, str]:
        """Every node messages must still reach (id -> address): the members of the
        configuration committed here and of every newer one. A node being removed keeps being
        replicated to, and heard, until its removal commits: it may be needed to commit it,
        and it must learn of it (to shut down)."""
        committed = self.log.committed
        out = dict(self.membership_at(committed).members())
        for at, m in self._configs:
            if at > committed:
                out.update(m.members())
        return out

    def _sync_progress(self) -> None:
        """Leader: track exactly the peers in play. Those dropped (their removal committed) get
        a last heartbeat carrying the commit index, so they learn of it."""
        wanted = self.peers_in_play()
        for peer in wanted:
            if peer not in self.progress:
                self.progress[peer] = Progress(self.log.last_index + 1)
        for peer, pr in list(self.progress.items()):
            if peer not in wanted and peer != self.id:
                del self.progress[peer]
                self._foreign.pop(peer, None)  # (added back, with a new data directory, say)
                commit = min(pr.match_index, self.log.committed)
                self._send(Message(MsgType.HEARTBEAT, self.id, peer, self.term, commit=commit))

    def _membership_changed(self) -> None:
        self.membership = self._configs[-1][1]
        self.voters = sorted(self.membership.voters)
        if self.role == Role.LEADER:
            self._sync_progress()
            if self.transferee and self.transferee not in self.membership.voters:
                self.transferee = ""
            if self._maybe_commit():  # a smaller quorum may already hold more
                self._broadcast_append()
        elif self.role in (Role.PRE_CANDIDATE, Role.CANDIDATE) and not self._can_campaign():
            self.become_follower(self.term, "", "no longer a voter")

    def _log_rewritten(self, lo: int, hi: int, configs: list[tuple[int, Membership]]) -> None:
        """Entries ``lo..hi`` were (re)written (anything after ``hi`` may have been truncated);
        ``configs`` are the configuration entries among them."""
        last = self.log.last_index
        current = self._configs[-1]
        kept = [c for c in self._configs if c[0] < lo or hi < c[0] <= last]
        self._configs = sorted(kept + configs, key=lambda c: c[0])
        if self._configs[-1] != current:
            self._membership_changed()

    def report_snapshot(self, peer: str, ok: bool) -> None:
        """The driver finished (or failed) streaming a snapshot to ``peer``."""
        pr = self.progress.get(peer)
        if self.role != Role.LEADER or pr is None or pr.state != ProgressState.SNAPSHOT:
            return
        pending = pr.pending_snapshot
        pr.become_probe()
        if ok:
            pr.next_index = max(pr.match_index + 1, pending + 1)

    def report_unreachable(self, peer: str) -> None:
        """The driver lost its stream to ``peer``: frames in flight are gone, probe again. A
        leadership transfer to it that has not told it to campaign yet is given up (it is
        likely stopping, as when a whole cluster is: lead on rather than wait an election
        timeout for it). Once told, it may campaign even so: taking writes again would leave
        it behind, its campaign would unseat us and fail, and nobody would lead for an
        election timeout; the transfer runs out as usual (_tick_leader)."""
        if self.role != Role.LEADER:
            return
        if peer == self.transferee and not self.timeout_now_sent:
            self.transferee = ""
        pr = self.progress.get(peer)
        if pr is not None and pr.state == ProgressState.REPLICATE:
            pr.become_probe()

    def step(self, m: Message) -> None:
        if not self._admits(m):
            return
        if m.term > self.term:
            # A leadership transfer: a voter we know, campaigning in the term right after the
            # leader's.
            forced = (
                m.type == MsgType.VOTE
                and m.context == _FORCED_VOTE
                and m.term == self.term + 1
                and any(m.src in c.voters for _, c in self._configs)
            )
            if m.type in _ELECTION_TRAFFIC and self._in_lease() and not forced:
                # We heard from a live leader recently: don't let a stray node disrupt it, nor
                # a late answer to a campaign of ours from before (a higher-term rejection
                # made us forget the leader, and vote, within its lease).
                return
            if m.type == MsgType.PRE_VOTE or (m.type == MsgType.PRE_VOTE_RESP and not m.reject):
                pass  # pre-vote traffic never changes our term
            elif m.type in (MsgType.APPEND, MsgType.HEARTBEAT, MsgType.SNAPSHOT):
                self.become_follower(m.term, m.src, f"{m.type.name} of term {m.term} from {m.src}")
            else:
                self.become_follower(m.term, "", f"{m.type.name} of term {m.term} from {m.src}")
        elif m.term < self.term:
            if m.type in (MsgType.APPEND, MsgType.HEARTBEAT):
                # A stale leader (perhaps cut off and back): tell it our term so it steps down.
                self._send(Message(MsgType.APPEND_RESP, self.id, m.src, self.term))
            elif m.type == MsgType.PRE_VOTE:
                self._send(Message(MsgType.PRE_VOTE_RESP, self.id, m.src, self.term, reject=True))
            return

        if m.type in (MsgType.VOTE, MsgType.PRE_VOTE):
            self._handle_vote_request(m)
        elif self.role == Role.LEADER:
            self._step_leader(m)
        elif self.role == Role.FOLLOWER:
            self._step_follower(m)
        else:
            self._step_candidate(m)

    def _admits(self, m: Message) -> bool:
        """Whom we listen to (a message not admitted is dropped, as if lost):

        * nothing whose term is more than ``MAX_TERM_JUMP`` ahead of ours: real terms grow by
          one an election, and one forged term near the top of the range would leave no term
          for any election after it;
        * TimeoutNow only from our leader, in its term (it makes us campaign at once), or from
          a voter of our term while we know no leader;
        * anything else from members of a configuration we hold, and from our leader;
        * from a stranger, only an append, heartbeat, snapshot, vote or pre-vote of our term
          or a newer one, and only when no leader we know is alive. The leader of a
          configuration we have not received yet (we lag, or we are joining and the
          configurations are further on in the log) must be able to reach us, and a voter we
          do not know yet may need our vote; but a stranger must not depose a healthy leader.
        """
        if m.term > self.term + MAX_TERM_JUMP:
            return False
        if m.type == MsgType.TIMEOUT_NOW:
            # (with no leader known, say just after a restart, from a voter of this term)
            known = m.src == self.leader or (
                not self.leader and any(m.src in c.voters for _, c in self._configs)
            )
            return known and m.term == self.term
        if m.src == self.leader or any(m.src in c for _, c in self._configs):
            return True
        return m.type in _FROM_STRANGERS and m.term >= self.term and not self._in_lease()

    # -- roles ---------------------------------------------------------------------------------

    def become_follower(self, term: int, leader: str, reason: str = "start") -> None:
        self.reason = reason
        if term != self.term:
            self.term = term
            self.vote = ""
        self.role = Role.FOLLOWER
        self.leader = leader
        self._reset_timers()
        self.progress = {}
        self.transferee = ""
        self._reads = []  # their waiters learn of the lost leadership from the soft state

    def _become_pre_candidate(self) -> None:
        # Term and vote stay as they are: a pre-vote must not disturb anyone (thesis §9.6).
        self.role = Role.PRE_CANDIDATE
        self.leader = ""
        self._reset_timers()

    def _become_candidate(self) -> None:
        self.term += 1
        self.vote = self.id
        self.role = Role.CANDIDATE
        self.leader = ""
        self._reset_timers()

    def _become_leader(self) -> None:
        self.role = Role.LEADER
        self.leader = self.id
        self._reset_timers()
        next_index = self.log.last_index + 1
        members = [*self.peers_in_play(), self.id]
        self.progress = {peer: Progress(next_index) for peer in members}
        self._read_acks = {}
        self._foreign = {}
        self.transferee = ""
        own = self.progress[self.id]
        own.become_replicate()
        own.match_index = self.log.stable
        # A no-op of our term lets us commit entries of earlier terms (§5.4.2).
        self.log.append(self.term, [_EMPTY], ENTRY_NOOP)
        self._broadcast_append()

    def _reset_timers(self) -> None:
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self.votes = {}
        # In [E, 1.5 E): a dead leader is noticed ~E + E/6 later by the first of two
        # followers (with [E, 2 E) it would be E + E/3); near ties are broken by pre-vote.
        timeout = self.config.election_tick
        self.randomized_election_timeout = timeout + self.rng.randrange(max(1, timeout // 2))

    def _in_lease(self) -> bool:
        return (
            self.config.check_quorum
            and self.leader != ""
            and self.election_elapsed < self.config.election_tick
        )

    # -- elections -----------------------------------------------------------------------------

    def _campaign(self, pre: bool, forced: bool = False) -> None:
        if pre:
            self._become_pre_candidate()
            vote_term, kind = self.term + 1, MsgType.PRE_VOTE
        else:
            self._become_candidate()
            vote_term, kind = self.term, MsgType.VOTE
        if self._record_vote(self.id, granted=True):
            return  # a single-node cluster wins at once
        last_index, last_term = self.log.last_index, self.log.last_term
        for peer in self.voters:
            if peer != self.id:
                self._send(
                    Message(
                        kind,
                        self.id,
                        peer,
                        vote_term,
                        last_index,
                        last_term,
                        context=_FORCED_VOTE if forced else 0,
                    )
                )

    def _handle_vote_request(self, m: Message) -> None:
        pre = m.type == MsgType.PRE_VOTE
        can_vote = (
            self.vote == m.src
            or (self.vote == "" and self.leader == "")
            or (pre and m.term > self.term)
        )
        if (
            pre
            and self.role == Role.PRE_CANDIDATE
            and m.src > self.id
            and (m.log_term, m.index) == (self.log.entries.last_term, self.log.last_index)
        ):
            # Both of us are campaigning with equal logs: granting each other would make two
            # candidates split the vote (another election timeout). The lower id goes first;
            # we vote for it when its real request comes. (Pre-votes change no term and no
            # vote: safety does not depend on them.)
            can_vote = False
        resp_type = MsgType.PRE_VOTE_RESP if pre else MsgType.VOTE_RESP
        if can_vote and self.log.is_up_to_date(m.index, m.log_term):
            # For a real vote the answer goes in ``msgs``: it is sent only after the vote is
            # durable, so a crash can never make us vote twice in one term.
            self._send(Message(resp_type, self.id, m.src, m.term))
            if not pre:
                self.election_elapsed = 0
                self.vote = m.src
        else:
            self._send(Message(resp_type, self.id, m.src, self.term, reject=True))

    def _step_candidate(self, m: Message) -> None:
        expected = MsgType.PRE_VOTE_RESP if self.role == Role.PRE_CANDIDATE else MsgType.VOTE_RESP
        if m.type in (MsgType.APPEND, MsgType.HEARTBEAT, MsgType.SNAPSHOT):
            self.become_follower(m.term, m.src, f"leader {m.src} of term {m.term} exists")
            self._step_follower(m)
        elif m.type == expected:
            if self.role == Role.PRE_CANDIDATE and not m.reject and m.term != self.term + 1:
                return  # an answer to an older pre-vote round
            self._record_vote(m.src, granted=not m.reject)

    def _record_vote(self, voter: str, granted: bool) -> bool:
        """Count a vote; returns True when the election was won (and acted on)."""
        if voter not in self.membership.voters:
            return False  # a learner's or a stranger's answer does not count
        self.votes.setdefault(voter, granted)
        granted_n = sum(1 for v in self.votes.values() if v)
        result = vote_result(granted_n, len(self.votes) - granted_n, len(self.voters))
        if result is True:
            self.reason = "won the pre-vote" if self.role == Role.PRE_CANDIDATE else "won the vote"
            if self.role == Role.PRE_CANDIDATE:
                self._campaign(pre=False)
            else:
                self._become_leader()
            return True
        if result is False:
            self.become_follower(self.term, "", "lost the election")
        return False

    # -- follower ------------------------------------------------------------------------------

    def _step_follower(self, m: Message) -> None:
        if m.type == MsgType.APPEND:
            self.election_elapsed = 0
            self.leader = m.src
            self._handle_append(m)
        elif m.type == MsgType.SNAPSHOT:
            self.election_elapsed = 0
            self.leader = m.src
            self._handle_snapshot(m)
        elif m.type == MsgType.HEARTBEAT:
            self.election_elapsed = 0
            self.leader = m.src
            self.log.commit_to(min(m.commit, self.log.last_index))
            self._send(
                Message(MsgType.HEARTBEAT_RESP, self.id, m.src, self.term, context=m.context)
            )
        elif m.type == MsgType.TIMEOUT_NOW and self._can_campaign():
            self.reason = f"leadership transfer from {m.src}"
            self._campaign(pre=False, forced=True)  # skip pre-vote and the others' leases

    def _handle_snapshot(self, m: Message) -> None:
        """InstallSnapshot (the driver already holds the snapshot data): ``m.index``/``m.log_term``
        name its last entry."""
        log = self.log
        if m.index <= log.committed:
            self._send(Message(MsgType.APPEND_RESP, self.id, m.src, self.term, log.committed))
            return
        if log.match_term(m.index, m.log_term):
            log.commit_to(m.index)  # we hold that entry already: no need to restore
        else:
            try:
                membership = Membership.decode(m.entries)
            except ValueError:
                return  # a snapshot without a readable configuration: refuse it
            log.restore(m.index, m.log_term)
            self.pending_snapshot = (m.index, m.log_term)
            current = self._configs[-1]
            self._configs = [(m.index, membership)]
            if self._configs[-1] != current:
                self._membership_changed()
        self._send(Message(MsgType.APPEND_RESP, self.id, m.src, self.term, m.index))

    def _handle_append(self, m: Message) -> None:
        log = self.log
        if m.index < log.committed:
            # Everything up to our commit index is settled; say so and let the leader skip on.
            self._send(
                Message(
                    MsgType.APPEND_RESP, self.id, m.src, self.term, log.committed, context=m.context
                )
            )
            return
        count = 0
        configs: list[tuple[int, Membership]] = []
        if m.entries:
            try:
                first, count = batch_info(m.entries)
                configs = _configs_in(m.entries)
            except (BatchError, ValueError):
                return  # a corrupt frame: drop it, the leader will send it again
            if first != m.index + 1:
                return
        if log.match_term(m.index, m.log_term):
            last_new = m.index + count
            if count:
                rewrites = configs or self.config_index > m.index
                log.merge(m.entries, log.committed)
                if rewrites:
                    self._log_rewritten(m.index + 1, last_new, configs)
            log.commit_to(min(m.commit, last_new))
            self._send(
                Message(MsgType.APPEND_RESP, self.id, m.src, self.term, last_new, context=m.context)
            )
            return
        # Fast backtracking: point the leader at the last entry that could still match.
        hint = log.entries.find_conflict_by_term(min(m.index, log.last_index), m.log_term)
        self._send(
            Message(
                MsgType.APPEND_RESP,
                self.id,
                m.src,
                self.term,
                m.index,
                log.term_at(hint),
                reject=True,
                hint=hint,
                context=m.context,  # the leader's progress generation: stale rejects are ignored
            )
        )

    # -- leader --------------------------------------------------------------------------------

    def _tick_leader(self) -> None:
        self.heartbeat_elapsed += 1
        self.election_elapsed += 1
        if self.transferee:
            self.transfer_elapsed += 1
            if self.transfer_elapsed >= self.config.election_tick:
                self.transferee = ""  # the target did not take over in time: lead on
        if self.election_elapsed >= self.config.election_tick:
            self.election_elapsed = 0
            if self.config.check_quorum and not self._quorum_active():
                self.become_follower(self.term, "", "check-quorum: no contact with a quorum")
                return
        if self.heartbeat_elapsed >= self.config.heartbeat_tick:
            self.heartbeat_elapsed = 0
            self._broadcast_heartbeat()

    def _quorum_active(self) -> bool:
        """Check-quorum: did a quorum of voters (counting us) talk to us since the last round?"""
        active = 0
        voters = self.membership.voters
        for peer, pr in self.progress.items():
            # (a follower whose answers do not count (_foreign) is no quorum either: without a
            # real one, the leader steps down and a new term, which forgets, is elected)
            if (
                peer in voters
                and (peer == self.id or pr.recent_active)
                and peer not in self._foreign
            ):
                active += 1
            pr.recent_active = False
        return active >= quorum_size(len(voters))

    def _step_leader(self, m: Message) -> None:
        pr = self.progress.get(m.src)
        if pr is None:
            return  # not a member of our configuration
        if m.type == MsgType.APPEND_RESP:
            pr.recent_active = True
            if m.src in self._foreign or (not m.reject and m.index > self.log.last_index):
                first = self._foreign.setdefault(m.src, (m.index, self.log.last_index))
                self.foreign_acks[m.src] = first  # (entries we never sent: not an answer)
                return
            if m.reject:
                if m.context == pr.generation:
                    self._handle_reject(m, pr)
                # else: an answer to a frame sent before the last probe/replicate switch. On a
                # network that reorders, acting on it would restart replication again and again.
            elif pr.maybe_update(m.index):
                if pr.state == ProgressState.PROBE:
                    pr.become_replicate()
                # A new commit index is not broadcast at once: it rides on the next append or
                # heartbeat. An extra message per write to every follower cost ~0.15-0.4 ms of
                # sequential put latency here; followers apply at most a heartbeat later.
                self._maybe_commit()
                if self.role != Role.LEADER:
                    return  # the commit removed us from the voters: we stepped down
                if m.src == self.transferee and pr.match_index == self.log.last_index:
                    self._send_timeout_now(m.src)
            while self._send_append(m.src, pr):
                pass
        elif m.type == MsgType.HEARTBEAT_RESP:
            pr.recent_active = True
            pr.probe_sent = False
            # The follower is alive but our window is full: frames may have been lost. Free one
            # slot so a frame goes out; a gap makes the follower reject and we probe again.
            pr.free_one_if_full(self.config.max_inflight, self.config.max_inflight_bytes)
            if self._read_round >= m.context > self._read_acks.get(m.src, 0):
                self._read_acks[m.src] = m.context
                self._release_reads()
            if pr.match_index < self.log.last_index:
                # A probe, or the last frames sent in REPLICATE, may have been lost (a stream
                # that broke before the transport said so): an empty append at the follower's
                # next index finds where the logs agree even when nothing new is to be sent.
                # In REPLICATE only once the follower made no progress for a heartbeat (frames
                # under way would answer it anyway). Without it, a follower whose last frames
                # were lost stayed behind until the next write.
                stalled = pr.match_index == pr.heartbeat_match
                pr.heartbeat_match = pr.match_index
                self._send_append(m.src, pr, allow_empty=stalled or pr.state == ProgressState.PROBE)

    def _handle_reject(self, m: Message, pr: Progress) -> None:
        probe_hint = m.hint
        if m.log_term > 0 and m.hint >= self.log.first_index - 1:
            # Skip every entry of the follower's conflicting term in one round trip.
            probe_hint = self.log.entries.find_conflict_by_term(
                min(m.hint, self.log.last_index), m.log_term
            )
        pr.maybe_decrease(m.index, probe_hint)

    def _broadcast_append(self) -> None:
        for peer, pr in self.progress.items():
            if peer != self.id and self._send_append(peer, pr, allow_empty=True):
                while self._send_append(peer, pr):  # fill the pipelining window
                    pass

    def _broadcast_heartbeat(self) -> None:
        for peer, pr in self.progress.items():
            if peer != self.id:
                commit = min(pr.match_index, self.log.committed)
                self._send(
                    Message(
                        MsgType.HEARTBEAT,
                        self.id,
                        peer,
                        self.term,
                        commit=commit,
                        context=self._read_round,
                    )
                )

    def _send_append(self, peer: str, pr: Progress, allow_empty: bool = False) -> bool:
        """Send the next frame of entries to ``peer``; True if it carried entries."""
        cfg = self.config
        if pr.is_paused(cfg.max_inflight, cfg.max_inflight_bytes):
            return False
        log = self.log
        has_entries = pr.next_index <= log.last_index
        if not has_entries and not allow_empty:
            return False
        prev = pr.next_index - 1
        if prev < log.first_index - 1:
            # What the follower needs was compacted away: it must catch up from a snapshot.
            # The driver streams its latest snapshot (at least this recent) and reports back.
            snap_index = log.first_index - 1
            snap_term = log.term_at(snap_index)
            config = self.membership_at(snap_index).encode()
            self._send(
                Message(MsgType.SNAPSHOT, self.id, peer, self.term, snap_index, snap_term, config)
            )
            pr.become_snapshot(snap_index)
            return False
        prev_term = log.term_at(prev)
        batch = log.slice(pr.next_index, log.last_index + 1, cfg.max_msg_bytes, prefix=True)
        count = batch_count(batch)
        self._send(
            Message(
                MsgType.APPEND,
                self.id,
                peer,
                self.term,
                prev,
                prev_term,
                batch if count else _EMPTY,
                log.committed,
                context=pr.generation,
            )
        )
        if count:
            pr.sent(prev + count, len(batch))
        return count > 0

    def _maybe_commit(self) -> bool:
        """Advance the commit index to the quorum's durable match, if it is of our term.
        True if it advanced and we still lead (a commit of our own removal steps us down)."""
        self.progress[self.id].match_index = self.log.stable
        index = quorum_match(self.progress[v].match_index for v in self.voters)
        if index > self.log.committed and self.log.term_at(index) == self.term:
            before = self.log.committed
            self.log.commit_to(index)
            self._release_reads()
            if before < self.config_index <= index:
                self._sync_progress()  # a removal committed: stop replicating to that node
            if self.id not in self.membership.voters and self.config_index <= index:
                self._step_down_removed()
                return False
            return True
        return False

    def _step_down_removed(self) -> None:
        """Our own removal (or demotion) committed: hand over to the most caught-up voter at
        once rather than leave the cluster waiting for an election timeout (thesis §4.2.2)."""
        best = max(self.voters, key=lambda v: self.progress[v].match_index)
        self.become_follower(self.term, "", "removed from the voters")
        self._send(Message(MsgType.TIMEOUT_NOW, self.id, best, self.term))

    def on_persisted(self) -> None:
        """The driver made our entries durable: the leader may now count itself."""
        if self.role == Role.LEADER:
            self._maybe_commit()  # (see _step_leader: the commit index rides on later traffic)

    # -- plumbing ------------------------------------------------------------------------------

    def _send(self, m: Message) -> None:
        if self.role == Role.LEADER and m.type in (MsgType.APPEND, MsgType.HEARTBEAT):
            self.eager_msgs.append(m)
        else:
            self.msgs.append(m)

    def hard_state(self) -> HardState:
        return HardState(self.term, self.vote, self.log.committed)


def _configs_in(batch: bytes) -> list[tuple[int, Membership]]:
    """The configuration entries of a packed batch; ValueError if one is unreadable."""
    return [(i, Membership.decode(p)) for i, p in entries_of_type(batch, ENTRY_CONFIG)]
