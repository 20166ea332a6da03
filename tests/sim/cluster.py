"""Deterministic simulation of a Raft cluster: RawNodes over a faulty in-memory network.

Everything random comes from one ``random.Random(seed)``, so a failing seed replays exactly.
Virtual time advances in units; a node ticks every ``TICK`` units. Each node is driven the way
the real driver does it: take a Ready, buffer its writes, send the eager messages, and only when
the (simulated) fdatasync completes send the rest, apply, and advance. A crash loses everything
not yet synced.

After every event the cluster checks Raft's safety properties (Figure 3 of the Raft paper):
election safety, log matching, leader completeness and state-machine safety; and the final
phase checks that every acknowledged proposal was committed on every node.

Membership changes (add a learner, promote, demote, remove — the leader included) mix with the
faults. New nodes start empty and unconfigured, as with ``raftfast-node --join``; a node whose
removal committed is shut down a little later (as its driver or an operator would do).
"""

from __future__ import annotations

import hashlib
import heapq
import random
from dataclasses import dataclass, field

from raftfast.core.membership import ChangeKind, Membership
from raftfast.core.raft import Config
from raftfast.core.rawnode import RawNode
from raftfast.core.types import ENTRY_CONFIG, ENTRY_NORMAL, Committed, Message, MsgType, Ready, Role
from raftfast.errors import ChangeInProgressError, NotLeaderError
from raftfast.storage.memory import MemoryStorage

TICK = 10  # time units per node tick
MAX_QUEUE = 50_000


class SafetyViolation(AssertionError):
    pass


@dataclass
class Faults:
    """How hostile one simulated run is; drawn from the seed."""

    drop: float = 0.0  # probability a message is lost
    duplicate: float = 0.0  # probability a message is delivered twice
    max_delay: int = 5  # delivery delay in units, uniform in [1, max_delay] (reorders messages)
    max_fsync: int = 5  # fdatasync duration in units, uniform in [0, max_fsync]
    crash: float = 0.0  # per-unit probability that some node crashes
    crash_in_sync: float = 0.0  # probability that a node crashes instead of completing a sync
    partition: float = 0.0  # per-unit probability that the partition changes
    propose: float = 0.05  # per-unit probability of a client proposal
    transfer: float = 0.0  # per-unit probability that the leader hands leadership on
    compact: float = 0.0  # per-unit probability that some node snapshots and compacts its log
    change: float = 0.0  # per-unit probability of a membership change

    @classmethod
    def random(cls, rng: random.Random) -> Faults:
        return cls(
            drop=rng.choice([0.0, 0.01, 0.05, 0.15]),
            duplicate=rng.choice([0.0, 0.02, 0.1]),
            max_delay=rng.choice([1, 5, 15, 40]),
            max_fsync=rng.choice([0, 3, 10, 30]),
            crash=rng.choice([0.0, 0.001, 0.003, 0.01, 0.03]),
            crash_in_sync=rng.choice([0.0, 0.0, 0.01, 0.05]),
            partition=rng.choice([0.0, 0.002, 0.005]),
            propose=rng.choice([0.02, 0.1, 0.3]),
            transfer=rng.choice([0.0, 0.0, 0.001, 0.005]),
            compact=rng.choice([0.0, 0.0, 0.002, 0.01, 0.05]),
            change=rng.choice([0.0, 0.0, 0.001, 0.003, 0.01]),
        )


@dataclass
class SimNode:
    id: str
    storage: MemoryStorage
    raw: RawNode | None = None
    pending: Ready | None = None
    sync_at: int = 0
    tick_phase: int = 0
    applied_index: int = 0
    restart_at: int = 0  # when crashed: time to restart
    # durable snapshot: (index, term, digest of the entries, encoded membership)
    snapshot: tuple[int, int, str, bytes] | None = None
    incoming: tuple[int, int, str, bytes] | None = None  # streamed to us, not installed yet
    bootstrap: bool = True  # one of the founding nodes (else it joined later, empty)
    joined_at: int = 0  # index of the configuration entry that added it (0: a founder)
    retire_at: int | None = None  # removed from the cluster: shut down for good at this time
    retired: bool = False
    durable_term_vote: tuple[int, str] = (0, "")
    # A leader's Ready is syncing: like the driver, it applied the Ready's committed entries at
    # once, and meanwhile sends its appends and applies what commits as inputs arrive.
    pumping: bool = False


@dataclass(order=True)
class _Delivery:
    at: int
    seq: int
    msg: Message = field(compare=False)


class Cluster:
    def __init__(self, n: int, seed: int, faults: Faults | None = None, **config) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.faults = faults or Faults.random(self.rng)
        self.initial_faults = self.faults
        self.ids = [f"n{i + 1}" for i in range(n)]
        self.founders = list(self.ids)
        self.max_nodes = n + 2
        # Small frames and windows make every ack cover few entries: more interleavings.
        self.config = {
            "max_msg_bytes": self.rng.choice([1, 16, 1 << 20]),
            "max_inflight": self.rng.choice([1, 4, 256]),
            # Safety must not depend on the optional protections: sometimes run without them.
            "pre_vote": self.rng.random() < 0.7,
            "check_quorum": self.rng.random() < 0.7,
            **config,
        }
        self.time = 0
        self._seq = 0
        self.queue: list[_Delivery] = []
        self.blocked: set[tuple[str, str]] = set()  # (src, dst) pairs that cannot talk
        self.nodes = {nid: SimNode(nid, MemoryStorage()) for nid in self.ids}
        for i, node in enumerate(self.nodes.values()):
            node.tick_phase = (i * 3) % TICK
            self._start(node)
        # Checker state.
        self.leaders: dict[int, str] = {}  # term -> the one leader of that term
        self.committed: dict[int, tuple[int, int, bytes]] = {}  # index -> (term, type, payload)
        self.proposed: dict[bytes, str] = {}  # payload -> node that accepted it
        self.acked: set[bytes] = set()
        self._completeness_checked: set[int] = set()  # terms whose leader was checked
        self.latest_config = (0, Membership.of_voters(self.ids))  # newest committed
        self.events: list[str] = []
        self.stats = {"crashes": 0, "partitions": 0, "proposals": 0, "elections": 0}

    # -- running -------------------------------------------------------------------------------

    def run(self, units: int) -> None:
        for _ in range(units):
            self.step()

    def step(self) -> None:
        self.time += 1
        now = self.time
        faults = self.faults
        while self.queue and self.queue[0].at <= now:
            self._deliver(heapq.heappop(self.queue).msg)
        if len(self.queue) > MAX_QUEUE:
            # Raft sends O(window) messages per node; a queue this long is a feedback loop
            # (replication restarting on every stale answer, say): fail instead of hanging.
            raise SafetyViolation(f"message storm: {len(self.queue)} messages in flight")
        for node in list(self.nodes.values()):
            if node.retire_at is not None and now >= node.retire_at:
                self._retire(node)
            if node.raw is None:
                if now >= node.restart_at and not node.retired:
                    self._start(node)
                continue
            if node.pending is not None and now >= node.sync_at:
                if faults.crash_in_sync and self.rng.random() < faults.crash_in_sync:
                    self.crash(node.id)  # power lost while the write was in flight
                    continue
                self._complete_sync(node)
            if (now + node.tick_phase) % TICK == 0:
                node.raw.tick()
                self._after_input(node)
        if faults.crash and self.rng.random() < faults.crash:
            self.crash(self.rng.choice(self.ids))
        if faults.partition and self.rng.random() < faults.partition:
            self._change_partition()
        if faults.propose and self.rng.random() < faults.propose:
            self.propose_random()
        if faults.transfer and self.rng.random() < faults.transfer:
            self.transfer_random()
        if faults.compact and self.rng.random() < faults.compact:
            self.compact_random()
        if faults.change and self.rng.random() < faults.change:
            self.change_random()

    def heal(self) -> None:
        """Stop injecting faults and restart everything: the system must now make progress."""
        self.blocked.clear()
        self.faults = Faults(
            max_delay=self.faults.max_delay, max_fsync=self.faults.max_fsync, propose=0.0
        )
        for node in self.nodes.values():
            if node.raw is None and not node.retired:
                self._start(node)

    def settle(self, stall_units: int, max_units: int = 400_000) -> None:
        """After heal(): run until a leader commits a fresh proposal and every node applied it.

        Fails if no node appends, persists or applies anything for ``stall_units`` (liveness is
        lost), or if the
        whole catch-up exceeds ``max_units`` (a bound on the test's run time).
        """
        marker, retry_at = None, 0
        last_progress, progress_at = -1, self.time
        for _ in range(max_units):
            self.step()
            leader = self.leader()
            if leader is not None and self.time >= retry_at:
                # Like a client: (re)try through whoever leads now; a deposed leader loses it.
                marker = self._propose(leader, 1) or marker
                retry_at = self.time + 50 * TICK
            if marker is not None and self._all_applied(marker):
                return
            progress = self._progress_signature()
            if progress != last_progress:
                last_progress, progress_at = progress, self.time
            elif self.time - progress_at > stall_units:
                break
        raise SafetyViolation(
            f"no progress after healing (t={self.time}, leader={self.leader() and self.leader().id}"
            f", status={self.describe()})"
        )

    # -- client --------------------------------------------------------------------------------

    def propose_random(self) -> None:
        alive = [n for n in self.nodes.values() if n.raw is not None]
        if alive:
            self._propose(self.rng.choice(alive), self.rng.randint(1, 4))

    def _propose(self, node: SimNode, count: int) -> bytes | None:
        payloads = []
        for _ in range(count):
            self.stats["proposals"] += 1
            payloads.append(b"s%d-p%d" % (self.seed, self.stats["proposals"]))
        try:
            node.raw.propose(payloads)
        except NotLeaderError:
            return None
        if node.pending is not None and node.pumping:
            # (as the driver feeds a big proposal while its own write syncs: sent at once)
            self.stats["proposed_while_syncing"] = self.stats.get("proposed_while_syncing", 0) + 1
        for p in payloads:
            self.proposed[p] = node.id
        self._after_input(node)
        return payloads[-1]

    def compact_random(self) -> None:
        """A node snapshots its state machine, then drops (most of) the log the snapshot covers."""
        alive = [n for n in self.nodes.values() if n.raw is not None]
        if not alive:
            return
        node = self.rng.choice(alive)
        log = node.raw.raft.log
        index = min(node.applied_index, log.stable)
        if index < log.first_index:
            return
        membership = node.raw.raft.membership_at(index).encode()
        node.snapshot = (index, log.term_at(index), self._digest(index), membership)
        upto = max(log.first_index - 1, index - self.rng.randint(0, 20))  # keep a little
        # (the driver compacts between Readys; here a leader's Ready may be syncing, its
        # entries applied but not yet reported by advance)
        upto = min(upto, log.applied)
        if upto >= log.first_index:
            node.raw.compact(upto)
            node.storage.release_before(upto, log.term_at(upto))
            self.stats["compactions"] = self.stats.get("compactions", 0) + 1

    def _digest(self, index: int) -> str:
        """What a snapshot at ``index`` holds: every committed entry up to it."""
        return hashlib.sha256(
            repr([self.committed[i] for i in range(1, index + 1)]).encode()
        ).hexdigest()

    def transfer_random(self) -> None:
        leader = self.leader()
        if leader is not None:
            targets = [n for n in leader.raw.raft.voters if n != leader.id]
            if not targets:
                return
            target = self.rng.choice(targets)
            self.stats["transfers"] = self.stats.get("transfers", 0) + 1
            self.events.append(f"t={self.time} transfer {leader.id} -> {target}")
            leader.raw.transfer_leadership(target)
            self._after_input(leader)

    def change_random(self) -> None:
        """One single-server membership change through the current leader."""
        leader = self.leader()
        if leader is None:
            return
        m = leader.raw.raft.membership
        options: list[tuple[ChangeKind, str]] = []
        if sum(not n.retired for n in self.nodes.values()) < self.max_nodes:
            options.append((ChangeKind.ADD_LEARNER, f"n{len(self.nodes) + 1}"))
        for nid in m.learners:
            options += [(ChangeKind.PROMOTE, nid), (ChangeKind.REMOVE, nid)]
        if len(m.voters) > 1:
            options += [(k, v) for v in m.voters for k in (ChangeKind.REMOVE, ChangeKind.DEMOTE)]
        if not options:
            return
        kind, nid = self.rng.choice(options)
        try:
            index = leader.raw.raft.propose_change(kind, nid, f"sim:{nid}")
        except (ChangeInProgressError, NotLeaderError):
            return
        self.events.append(f"t={self.time} {leader.id} proposes {kind.value} {nid} at {index}")
        self.stats["changes"] = self.stats.get("changes", 0) + 1
        if kind == ChangeKind.ADD_LEARNER:
            node = SimNode(nid, MemoryStorage(), bootstrap=False, joined_at=index)
            node.tick_phase = self.rng.randrange(TICK)
            self.nodes[nid] = node
            self.ids.append(nid)
            self._start(node)
        self._after_input(leader)

    def _retire(self, node: SimNode) -> None:
        self.events.append(f"t={self.time} retire {node.id} (removed)")
        node.retire_at, node.retired = None, True
        node.raw = None
        node.pending = None

    def leader(self) -> SimNode | None:
        best = None
        for node in self.nodes.values():
            if node.raw is not None and node.raw.raft.role == Role.LEADER:
                if best is None or node.raw.raft.term > best.raw.raft.term:
                    best = node
        return best

    # -- faults --------------------------------------------------------------------------------

    def crash(self, nid: str) -> None:
        node = self.nodes[nid]
        if node.raw is None or node.retired:
            return
        self.stats["crashes"] += 1
        self.events.append(f"t={self.time} crash {nid}")
        node.raw = None
        node.pending = None
        node.pumping = False
        node.storage.crash()
        # Some restarts are quick (a process supervisor), some slow (a machine reboot).
        downtime = self.rng.choice([TICK, 40 * TICK])
        node.restart_at = self.time + self.rng.randint(1, downtime)

    def _change_partition(self) -> None:
        self.stats["partitions"] += 1
        self.blocked.clear()
        kind = self.rng.choice(["heal", "split", "isolate", "oneway"])
        ids = self.ids[:]
        self.rng.shuffle(ids)
        if kind == "split":  # a minority cut off from the majority, both ways
            cut = self.rng.randint(1, len(ids) // 2)
            minority, majority = ids[:cut], ids[cut:]
            for a in minority:
                for b in majority:
                    self.blocked.update({(a, b), (b, a)})
        elif kind == "isolate":  # one node (maybe the leader) alone
            leader = self.leader()
            lone = leader.id if leader and self.rng.random() < 0.5 else ids[0]
            for b in self.ids:
                if b != lone:
                    self.blocked.update({(lone, b), (b, lone)})
        elif kind == "oneway":  # asymmetric: a node can send but not receive (or the reverse)
            a = ids[0]
            for b in ids[1:]:
                self.blocked.add((a, b) if self.rng.random() < 0.5 else (b, a))
        self.events.append(f"t={self.time} partition {kind} {sorted(self.blocked)}")

    # -- the driver, simulated -----------------------------------------------------------------

    def _start(self, node: SimNode) -> None:
        state = node.storage.recovered()
        cfg = Config(node.id, self.founders if node.bootstrap else [], **self.config)
        applied = node.snapshot[0] if node.snapshot else 0
        membership = Membership.decode(node.snapshot[3]) if node.snapshot else None
        if applied < state.log.first_index - 1:
            raise SafetyViolation(f"{node.id}: log compacted past its snapshot")
        node.raw = RawNode(
            cfg,
            state.log,
            state.hard_state,
            random.Random(self.rng.random()),
            applied,
            membership,
        )
        node.pending = None
        node.incoming = None
        node.applied_index = applied
        node.durable_term_vote = (state.hard_state.term, state.hard_state.vote)
        if self.time:
            self.events.append(f"t={self.time} restart {node.id}")

    def _after_input(self, node: SimNode) -> None:
        self._check_leader(node)
        if node.pending is not None and node.pumping:
            self._send_all(node.raw.take_eager_messages())
            committed = node.raw.take_committed()
            if committed is not None:
                self._apply(node, committed)
                self.stats["applied_while_syncing"] = self.stats.get("applied_while_syncing", 0) + 1
        if node.pending is None and node.raw.has_ready():
            rd = node.raw.ready()
            if rd.snapshot is not None:
                self._install(node, rd.snapshot)
            node.storage.append(rd.hard_state, rd.entries or None)
            self._send_all(rd.eager_messages)
            node.pending = rd
            hs = rd.hard_state
            if not rd.entries and (hs is None or (hs.term, hs.vote) == node.durable_term_vote):
                # Like the driver: a Ready that only moves the commit index is not synced.
                self._complete_sync(node, sync=False)
                return
            if node.raw.role == Role.LEADER:
                if rd.committed is not None:
                    self._apply(node, rd.committed)
                node.pumping = True
            node.sync_at = self.time + self.rng.randint(0, self.faults.max_fsync)
            if node.sync_at <= self.time:
                self._complete_sync(node)

    def _complete_sync(self, node: SimNode, sync: bool = True) -> None:
        rd = node.pending
        if sync:
            node.storage.sync()
            if rd.hard_state is not None:
                node.durable_term_vote = (rd.hard_state.term, rd.hard_state.vote)
        self._send_all(rd.messages)
        if rd.committed is not None and not node.pumping:
            self._apply(node, rd.committed)
        node.pending = None
        node.pumping = False
        node.raw.advance(rd)
        self._after_input(node)

    def _install(self, node: SimNode, meta: tuple[int, int]) -> None:
        snap = node.incoming
        if snap is None or snap[:2] != meta:
            raise SafetyViolation(f"{node.id} installs {meta} but received {snap}")
        if snap[2] != self._digest(meta[0]):
            raise SafetyViolation(f"{node.id}: snapshot {meta} differs from the committed log")
        node.storage.install_snapshot(*meta)  # durable, like a renamed and fsynced file
        node.snapshot, node.incoming = snap, None
        node.applied_index = meta[0]

    def _send_all(self, msgs: list[Message]) -> None:
        faults = self.faults
        for m in msgs:
            lost = (m.src, m.dst) in self.blocked or self.rng.random() < faults.drop
            if m.type == MsgType.SNAPSHOT:
                self._stream_snapshot(m, lost)
                continue
            if lost:
                continue
            copies = 2 if self.rng.random() < faults.duplicate else 1
            for _ in range(copies):
                self._seq += 1
                at = self.time + self.rng.randint(1, faults.max_delay)
                heapq.heappush(self.queue, _Delivery(at, self._seq, m))

    def _stream_snapshot(self, m: Message, lost: bool) -> None:
        """The driver streams the sender's latest snapshot; the receiver then steps a SNAPSHOT
        message naming it. Either way the sender learns how the stream ended."""
        sender, receiver = self.nodes[m.src], self.nodes[m.dst]
        snap = sender.snapshot
        if snap is None or snap[0] < m.index:
            raise SafetyViolation(f"{m.src} asked to send a snapshot >= {m.index}, has {snap}")
        ok = not lost and receiver.raw is not None
        if ok:
            receiver.incoming = snap
            receiver.raw.step(
                Message(
                    MsgType.SNAPSHOT,
                    m.src,
                    m.dst,
                    m.term,
                    index=snap[0],
                    log_term=snap[1],
                    entries=snap[3],
                )
            )
            self._after_input(receiver)
        if sender.raw is not None:
            sender.raw.report_snapshot(m.dst, ok)
            self._after_input(sender)
        self.stats["snapshots_sent"] = self.stats.get("snapshots_sent", 0) + 1

    def _deliver(self, m: Message) -> None:
        node = self.nodes[m.dst]
        if node.raw is None or (m.src, m.dst) in self.blocked:
            return
        node.raw.step(m)
        self._after_input(node)

    # -- checks --------------------------------------------------------------------------------

    def _apply(self, node: SimNode, committed: Committed) -> None:
        first, terms, types, payloads = committed
        if first != node.applied_index + 1:
            raise SafetyViolation(f"{node.id} applies {first} after {node.applied_index}")
        for i, entry in enumerate(zip(terms, types, payloads, strict=True)):
            index = first + i
            known = self.committed.setdefault(index, entry)
            if known != entry:
                raise SafetyViolation(
                    f"state machine safety: {node.id} applies {entry} at {index}, "
                    f"another node applied {known}"
                )
            if entry[1] == ENTRY_NORMAL and self.proposed.get(entry[2]) == node.id:
                self.acked.add(entry[2])  # the proposer applied it: a client was told "ok"
            elif entry[1] == ENTRY_CONFIG and index > self.latest_config[0]:
                self.latest_config = (index, Membership.decode(entry[2]))
                self._schedule_retirements(*self.latest_config)
        node.applied_index = first + len(terms) - 1

    def _schedule_retirements(self, index: int, committed: Membership) -> None:
        """Nodes a committed configuration left out are shut down a little later: until then
        they may still campaign and disturb, as a real removed node could."""
        for node in self.nodes.values():
            if node.joined_at >= index or node.id in committed:
                continue  # added after this configuration, or still a member
            if node.retire_at is None and not node.retired:
                node.retire_at = self.time + self.rng.randint(0, 100 * TICK)

    def _check_leader(self, node: SimNode) -> None:
        raft = node.raw.raft
        if raft.role != Role.LEADER:
            return
        holder = self.leaders.setdefault(raft.term, node.id)
        if holder != node.id:
            raise SafetyViolation(f"election safety: {holder} and {node.id} lead term {raft.term}")
        if raft.term not in self._completeness_checked:
            self._completeness_checked.add(raft.term)
            self.stats["elections"] += 1
            self._check_leader_completeness(node)

    def _check_leader_completeness(self, node: SimNode) -> None:
        log = node.raw.raft.log
        if not self.committed:
            return
        top = max(self.committed)
        if top < log.first_index:
            return  # covered by the node's snapshot, whose digest was checked on install
        if log.last_index < top or log.term_at(top) != self.committed[top][0]:
            raise SafetyViolation(
                f"leader completeness: new leader {node.id} (term {node.raw.raft.term}) lacks "
                f"committed entry {top} {self.committed[top]}"
            )

    def check_log_matching(self) -> None:
        """Two logs that agree on (index, term) agree on every entry up to that index."""
        alive = [n for n in self.nodes.values() if n.raw is not None]
        for i, a in enumerate(alive):
            for b in alive[i + 1 :]:
                la, lb = a.raw.raft.log, b.raw.raft.log
                lo = max(la.first_index, lb.first_index)
                index = min(la.last_index, lb.last_index)
                while index >= lo and la.term_at(index) != lb.term_at(index):
                    index -= 1
                if index >= lo and la.entries.slice(lo, index + 1) != lb.entries.slice(
                    lo, index + 1
                ):
                    raise SafetyViolation(
                        f"log matching: {a.id} and {b.id} agree at {index} but differ before"
                    )

    def check_acknowledged(self) -> None:
        """Every acknowledged proposal is applied, once, on every node still in the cluster."""
        for node in self.members():
            seen: dict[bytes, int] = {}
            for index in range(1, node.applied_index + 1):
                term, etype, payload = self.committed[index]
                if etype == ENTRY_NORMAL:
                    seen[payload] = seen.get(payload, 0) + 1
            lost = [p for p in self.acked if p not in seen]
            if lost:
                raise SafetyViolation(f"{node.id} lost acknowledged writes: {sorted(lost)[:5]}")

    def _progress_signature(self) -> tuple:
        return tuple(
            (n.applied_index, n.raw.raft.log.last_index, n.raw.raft.log.stable)
            for n in self.nodes.values()
            if n.raw is not None
        )

    def members(self) -> list[SimNode]:
        """Nodes in the newest committed configuration: they must hold every committed entry.
        (A node whose addition was never committed sits idle outside the cluster.)"""
        return [n for n in self.nodes.values() if n.id in self.latest_config[1]]

    def _all_applied(self, marker: bytes) -> bool:
        index = next((i for i, e in self.committed.items() if e[2] == marker), None)
        return index is not None and all(
            n.raw is not None and n.applied_index >= index for n in self.members()
        )

    def describe(self) -> str:
        parts = []
        for n in self.nodes.values():
            if n.raw is None:
                parts.append(f"{n.id}:down")
            else:
                s = n.raw.status()
                parts.append(
                    f"{n.id}:{s.role.name}/t{s.term} last={s.last_index} "
                    f"commit={s.commit_index} applied={n.applied_index}"
                )
        return "; ".join(parts)
