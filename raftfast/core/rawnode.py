"""RawNode: the Ready/advance contract between the pure Raft core and whoever drives it.

    node.tick(); node.step(msg); node.propose([b"...", ...])
    rd = node.ready()          # at most one Ready outstanding
    persist rd.hard_state + rd.entries (one write, one fdatasync)   | send rd.eager_messages
    send rd.messages                                                 | (any time)
    apply rd.committed
    node.advance(rd)

The driver may keep calling tick/step/propose while a Ready is being persisted; whatever that
produces goes into the next Ready. That is what makes group commit natural: everything that
arrived during one fdatasync is written by the next.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from raftfast.core.membership import ChangeKind, Membership
from raftfast.core.raft import Config, Raft
from raftfast.core.types import Committed, HardState, Message, MsgType, Ready, Role


@dataclass(frozen=True)
class Status:
    id: str
    role: Role
    term: int
    leader: str
    commit_index: int
    applied_index: int
    last_index: int
    durable_index: int
    progress: dict[str, tuple[int, int]]  # leader only: peer -> (match index, next index)
    membership: Membership
    config_index: int


class RawNode:
    def __init__(
        self,
        config: Config,
        entries,
        hard_state: HardState = HardState(),
        rng: random.Random | None = None,
        applied: int = 0,
        membership: Membership | None = None,
    ) -> None:
        """``entries`` is the EntryLog recovered from storage (it is owned by the node from now);
        ``applied`` is the index of the snapshot the state machine was restored from and
        ``membership`` the configuration stored in it (None: the bootstrap ``config.voters``)."""
        self.raft = Raft(config, entries, hard_state, rng or random.Random(0), applied, membership)
        self._prev_hard_state = hard_state
        self._prev_soft_state = (self.raft.role, self.raft.leader)
        self._outstanding: Ready | None = None

    # -- inputs --------------------------------------------------------------------------------

    def tick(self) -> None:
        self.raft.tick()

    def step(self, m: Message) -> None:
        self.raft.step(m)

    def propose(self, payloads: Sequence[bytes]) -> tuple[int, int]:
        """Append commands as one batch; raises NotLeaderError (with a leader hint) elsewhere."""
        return self.raft.propose(payloads)

    def campaign(self) -> None:
        self.raft.campaign()

    def learn_commit(self, index: int, term: int) -> bool:
        """The leader said, out of band, that entry ``index`` of ``term`` is committed: True
        if that commits more here (see Raft.learn_commit)."""
        return self.raft.learn_commit(index, term)

    def read_index(self, request_id: int) -> None:
        """Start a linearizable read; ``(request_id, index)`` shows up in ``Ready.read_states``."""
        self.raft.read_index(request_id)

    def reads_waiting(self) -> bool:
        """Reads started with ``read_index`` wait for their heartbeat round (or for the
        leader's first commit of its term); a change of role drops them."""
        return bool(self.raft._reads)

    def heartbeat_now(self) -> None:
        """Leader: send a heartbeat round now (it carries the commit index, so followers
        apply without waiting for the next one); the next regular one is a full interval
        later. Elsewhere: nothing."""
        r = self.raft
        if r.role == Role.LEADER:
            r.heartbeat_elapsed = 0
            r._broadcast_heartbeat()

    def report_unreachable(self, peer: str) -> None:
        self.raft.report_unreachable(peer)

    def compact(self, index: int) -> None:
        """A durable snapshot at ``index`` exists: the log may drop entries up to it."""
        self.raft.compact(index)

    def release_log_memory(self) -> None:
        """Give back the memory the log holds past its entries (a compaction keeps it for the
        entries to come): for a log at rest."""
        self.raft.log.entries.release_unused()

    def report_snapshot(self, peer: str, ok: bool) -> None:
        """Streaming a snapshot to ``peer`` (asked for by a SNAPSHOT message) ended."""
        self.raft.report_snapshot(peer, ok)

    def propose_change(self, kind: ChangeKind, node_id: str, address: str = "") -> int:
        """Append a single-server membership change; returns its index (see Raft)."""
        return self.raft.propose_change(kind, node_id, address)

    def force_new_cluster(self, address: str) -> int:
        """Make this node the only voter (disaster recovery; see Raft.force_new_cluster)."""
        return self.raft.force_new_cluster(address)

    def transfer_leadership(self, target: str) -> None:
        """Start handing leadership to ``target`` (see Raft.transfer_leadership)."""
        self.raft.transfer_leadership(target)

    @property
    def transferee(self) -> str:
        """Leader: the node leadership is being handed to, or ""."""
        return self.raft.transferee

    # -- Ready / advance -----------------------------------------------------------------------

    def has_ready(self) -> bool:
        r = self.raft
        return bool(
            r.pending_snapshot
            or r.msgs
            or r.eager_msgs
            or r.log.last_index > r.log.stable
            or r.log.committed > r.log.applied
            or r.hard_state() != self._prev_hard_state
            or (r.role, r.leader) != self._prev_soft_state
            or r.read_states
        )

    @property
    def leader_silent_ticks(self) -> int:
        """Follower: ticks since it last heard from its leader (0 on a leader)."""
        r = self.raft
        return 0 if r.role == Role.LEADER else r.election_elapsed

    def take_eager_messages(self) -> list[Message]:
        """The leader's appends and heartbeats produced since the last Ready, to send now, even
        while a Ready is outstanding (they never wait for our own write: thesis §10.2.1). A
        driver that awaits its disk calls this on every tick, so heartbeats keep flowing while
        an fdatasync takes long."""
        r = self.raft
        out, r.eager_msgs = r.eager_msgs, []
        return out

    def ready(self) -> Ready:
        if self._outstanding is not None:
            raise RuntimeError("ready() called again before advance()")
        r = self.raft
        rd = Ready()
        hs = r.hard_state()
        if hs != self._prev_hard_state:
            rd.hard_state = hs
        if r.pending_snapshot is not None:
            rd.snapshot, r.pending_snapshot = r.pending_snapshot, None
            r.log.applied = rd.snapshot[0]  # the snapshot brings the state machine this far
        rd.entries, rd.last_index, rd.last_term = r.log.unstable_batch()
        if rd.entries:
            r.log.begin_persist()
        rd.committed = r.log.committed_entries(r.config.max_apply_bytes)
        rd.committed_last = rd.committed.last if rd.committed is not None else 0
        rd.messages = _drop_stale_acks(r.msgs, r.term)
        rd.eager_messages = r.eager_msgs
        r.msgs, r.eager_msgs = [], []
        rd.read_states, r.read_states = r.read_states, []
        soft = (r.role, r.leader)
        if soft != self._prev_soft_state:
            rd.soft_state = soft
            self._prev_soft_state = soft
        self._outstanding = rd
        return rd

    def advance(self, rd: Ready) -> None:
        if rd is not self._outstanding:
            raise RuntimeError("advance() with a Ready that is not the outstanding one")
        self._outstanding = None
        log = self.raft.log
        if rd.hard_state is not None:
            self._prev_hard_state = rd.hard_state
        if rd.entries:
            log.end_persist(rd.last_index)
        if rd.committed_last > log.applied:  # (take_committed may have gone further)
            log.applied = rd.committed_last
        self.raft.on_persisted()

    def take_committed(self) -> Committed | None:
        """Committed entries past those of the outstanding Ready, to apply now instead of in
        the next Ready, or None. They count as applied from here on. A leader calls this
        while its own write syncs (whatever is committed is durable on a quorum already),
        once it has applied the outstanding Ready's entries."""
        log = self.raft.log
        start = log.applied
        rd = self._outstanding
        if rd is not None:
            if rd.snapshot is not None:
                return None  # the state machine is being replaced: apply after it
            start = max(start, rd.committed_last)
        committed = log.committed_entries(self.raft.config.max_apply_bytes, after=start)
        if committed is not None:
            log.applied = committed.last
        return committed

    # -- inspection ----------------------------------------------------------------------------

    # What the driver may ask of the core (read-only; the core's own fields stay its own).

    @property
    def role(self) -> Role:
        return self.raft.role

    @property
    def term(self) -> int:
        return self.raft.term

    @property
    def leader(self) -> str:
        """The leader of the current term as far as we know ("" if none)."""
        return self.raft.leader

    @property
    def reason(self) -> str:
        """Why the role or term last changed (for the log)."""
        return self.raft.reason

    @property
    def commit_index(self) -> int:
        return self.raft.log.committed

    @property
    def first_index(self) -> int:
        """The first index the log holds (after the newest snapshot)."""
        return self.raft.log.first_index

    @property
    def last_index(self) -> int:
        return self.raft.log.last_index

    @property
    def stable_index(self) -> int:
        """The last index known durable."""
        return self.raft.log.stable

    @property
    def log_bytes(self) -> int:
        """Bytes of entries held in memory."""
        return self.raft.log.entries.nbytes

    def term_at(self, index: int) -> int:
        return self.raft.log.term_at(index)

    @property
    def membership(self) -> Membership:
        """The newest configuration in the log (committed or not)."""
        return self.raft.membership

    @property
    def config_index(self) -> int:
        """The index of the newest configuration in the log."""
        return self.raft.config_index

    def membership_at(self, index: int) -> Membership:
        """The configuration in force at ``index``."""
        return self.raft.membership_at(index)

    def configs(self) -> list[tuple[int, Membership]]:
        """(index, configuration) of every configuration still in the log."""
        return self.raft.configs()

    def peers_in_play(self) -> dict[str, str]:
        """Members of the committed configuration and of every newer one: id -> address."""
        return self.raft.peers_in_play()

    def match_index(self, peer: str) -> int | None:
        """Leader only: how far ``peer``'s log is known to match ours (None: not a peer)."""
        pr = self.raft.progress.get(peer)
        return None if pr is None else pr.match_index

    def transfer_candidate(self, skip: Collection[str] = ()) -> str | None:
        """Leader only: the voter (not us, not in ``skip``) whose log matches ours furthest,
        or None."""
        r = self.raft
        best, best_match = None, 0
        for peer in sorted(r.voters):
            pr = r.progress.get(peer)
            if peer != r.id and peer not in skip and pr is not None and pr.match_index > best_match:
                best, best_match = peer, pr.match_index
        return best

    def status(self) -> Status:
        r = self.raft
        progress = {p: (pr.match_index, pr.next_index) for p, pr in r.progress.items()}
        return Status(
            r.id,
            r.role,
            r.term,
            r.leader,
            r.log.committed,
            r.log.applied,
            r.log.last_index,
            r.log.stable,
            progress,
            r.membership,
            r.config_index,
        )


def _drop_stale_acks(msgs: list[Message], term: int) -> list[Message]:
    """Drop acknowledgements made in an earlier term of ours.

    They may refer to entries a newer leader has since overwritten (before they were ever
    durable), so they must not be sent after this Ready's write completes.
    """
    if all(m.term >= term or m.type != MsgType.APPEND_RESP for m in msgs):
        return msgs
    return [m for m in msgs if m.term >= term or m.type != MsgType.APPEND_RESP]
