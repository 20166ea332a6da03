"""The driver: the only place with an event loop. It owns the RawNode, the WAL, the peer
transport, the KV state machine and the gRPC server.

One loop (``_run``) takes each Ready and carries out the Raft contract:

    send eager messages (the leader's appends: its write overlaps replication, thesis §10.2.1)
    append hard state + entries to the WAL, fdatasync in a dedicated thread (group commit:
        everything that arrived during the previous fdatasync goes into this one)
    send the other messages (acks and votes leave only once durable)
    apply committed entries to the KV state machine, resolve waiting proposals and reads
    advance

While the fdatasync runs, peers' messages, ticks and client proposals keep flowing into the core;
they form the next Ready.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc

from raftfast._accel import decode_batch
from raftfast.address import split_address
from raftfast.admin import AdminService, JoinService
from raftfast.core.membership import ChangeKind, Membership
from raftfast.core.raft import Config
from raftfast.core.rawnode import RawNode
from raftfast.core.types import ENTRY_CONFIG, ENTRY_NORMAL, Message, MsgType, Ready, Role
from raftfast.errors import ChangeInProgressError, CorruptionError, LogError, NotLeaderError
from raftfast.exactly_once import ExactlyOnce
from raftfast.kv.fsm import KVStateMachine
from raftfast.kv.quota import Quota
from raftfast.kv.service import add_kv_service
from raftfast.proto import raftfast_pb2 as pb
from raftfast.proto import raftfast_pb2_grpc as pb_grpc
from raftfast.security.roles import Authorizer, RoleInterceptor, load_roles
from raftfast.server.machine_service import MachineService, StatusOnly
from raftfast.settings import NodeSettings
from raftfast.statemachine import StateMachine
from raftfast.storage.fsutil import DISK_RESERVE_BYTES, free_bytes
from raftfast.storage.snapshot import SnapshotMeta, SnapshotStore
from raftfast.storage.wal import WAL
from raftfast.transport import tcp
from raftfast.transport.grpc import PeerService, PeerTransport
from raftfast.transport.tcp import ReplicationServer

log = logging.getLogger("raftfast.node")

# A small write is synced right here in the loop: handing it to the fsync thread and back costs
# two thread wake-ups (50-250 us on a busy 2-core machine, measured) for an fdatasync of ~200.
# The thread takes a big write (a batched load), and any write while the disk is slow (the last
# sync took longer than _SLOW_SYNC_S) or a peer is on the gRPC stream (its frames leave from
# this loop): there the loop must keep serving, sending and heartbeating meanwhile.
_INLINE_SYNC_BYTES = 64 * 1024
_SLOW_SYNC_S = 0.002
_FAULT_DISK_DELAY = float(os.environ.get("RAFTFAST_FAULT_DISK_DELAY_MS", "0")) / 1000
_MAX_STREAMS_PER_CONNECTION = 256  # gRPC streams one client connection may have open
# Join answers that retrying cannot change: another cluster, a certificate of another name, a
# bad id or address.
_JOIN_REFUSED = (
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNIMPLEMENTED,
)


class Node:
    def __init__(self, settings: NodeSettings, state_machine: StateMachine | None = None) -> None:
        """``state_machine``: what the node replicates (default: the KV store, served by the
        KV service; any other is served by the generic Propose/Query service)."""
        settings.validate()
        self.settings = settings
        self.id = settings.id
        if state_machine is None:
            state_machine = KVStateMachine()
        # The KV store dedups its own commands; any other gets exactly-once around it.
        if not isinstance(state_machine, KVStateMachine):
            state_machine = ExactlyOnce(state_machine)
        self.fsm = state_machine
        # The KV store's extras: its own service and the space quota.
        self.quota = Quota(self) if isinstance(self.fsm, KVStateMachine) else None
        self.applied_index = 0  # of the last entry applied (commands, no-ops, configurations)
        self.raw: RawNode | None = None
        self.wal: WAL | None = None
        self.transport: PeerTransport | None = None
        self.server: grpc.aio.Server | None = None  # clients (and peers, unless peer_server)
        self.peer_server: grpc.aio.Server | None = None  # peers, on --peer-listen
        self.replication_server: ReplicationServer | None = None  # TCP replication streams
        self._wake = asyncio.Event()
        self._proposals: list[tuple[list[bytes], asyncio.Future]] = []
        self._waiting_writes: list[_Waiting] = []
        self._read_requests: list[asyncio.Future] = []
        self._reads_by_id: dict[int, list[asyncio.Future]] = {}
        self._reads_at: list[tuple[int, asyncio.Future]] = []  # (read index, waiter)
        self._read_ids = itertools.count(1)
        self._fsync_pool = ThreadPoolExecutor(1, thread_name_prefix=f"raftfast-fsync-{self.id}")
        self._tasks: list[asyncio.Task] = []
        self._stopping = False
        self._leader_changed = asyncio.Event()
        self.snapshots: SnapshotStore | None = None
        self._snapshot_index = 0  # index of our newest snapshot
        self._log_bytes_kept = 0  # bytes the log held in memory right after the last snapshot
        self._incoming_snapshot = None  # a snapshot streamed from the leader, not yet installed
        self.failed: BaseException | None = None
        self.stopped = asyncio.Event()
        self._membership: Membership | None = None  # the configuration the transport follows
        self._known_addresses: dict[str, str] = {}  # joining: members learned from the cluster
        self._book: dict[str, str] | None = None  # the peers the transport was last pointed at
        self._last_sync_s = 0.0  # how long the last sync took (thread hand-offs included)
        self._joining = False  # --join in progress: entries replayed may predate our addition
        self.removed = False  # a committed configuration left us out: we shut down
        self._committed_members: set[str] = set()  # of the newest configuration applied here
        self._removed_ids: dict[str, int] = {}  # removed node -> index of its removal: refused

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        self.wal = WAL.open(
            os.path.join(s.data_dir, "wal"), segment_bytes=s.wal_segment_bytes, fsync=s.fsync
        )
        state = self.wal.recovered()
        self._durable_term_vote = (state.hard_state.term, state.hard_state.vote)
        self.snapshots = SnapshotStore(os.path.join(s.data_dir, "snap"))
        latest = self.snapshots.latest()
        # A node that joins an existing cluster starts with no configuration: it learns it from
        # the leader (never bootstrap it with itself alone: it would elect itself).
        membership = None if s.join else Membership(dict(s.peers))
        if latest is not None:
            membership = self._restore(latest)
            if not _log_holds(state.log, latest.index, latest.term):
                # A snapshot from the leader whose installation a crash interrupted (the file
                # is complete, the WAL's "snapshot installed" record is not): finish it, or the
                # old log would sit under a state machine that no longer matches it.
                self.wal.install_snapshot(latest.index, latest.term)
                state.log.reset(latest.index + 1, latest.term)
                log.warning("node %s completed installing snapshot %d", s.id, latest.index)
        config = Config(
            s.id,
            [] if s.join else sorted(s.peers),
            election_tick=s.election_ticks,
            heartbeat_tick=s.heartbeat_ticks,
        )
        self.raw = RawNode(
            config,
            state.log,
            state.hard_state,
            random.Random(),
            self._snapshot_index,
            membership,
        )
        fresh = state.log.last_index == 0 and latest is None and state.hard_state.term == 0
        log.info(
            "node %s starting: term %d, %d entries recovered (commit %d), fsync=%s",
            s.id,
            state.hard_state.term,
            state.log.last_index,
            state.hard_state.commit,
            s.fsync,
        )
        self._committed_members = set(self.raw.raft.membership_at(self.applied_index).members())
        self.transport = PeerTransport(
            s.id,
            s.cluster_id,
            {},
            self._on_unreachable,
            self._on_refused,
            s.peer_stream,
            tls=s.peer_tls,
        )
        admin = AdminService(self)
        joins = JoinService(self)
        peer_service = PeerService(
            s.cluster_id,
            self._accepts_from,
            self._deliver,
            self._receive_snapshot,
            self._removed_ids.get,
            authenticated=s.peer_tls is not None,
            join=joins.join,
            alarm=self._alarm_reported,
        )
        peer_service.client_address = s.listen
        shared = s.peer_address == s.listen
        # Clients' requests are at most --max-request-bytes (plus gRPC's framing, as etcd
        # allows); a port shared with peers takes their bigger messages too.
        client_limit = tcp.MAX_RECORD_BYTES if shared else s.max_request_bytes + 512 * 1024
        authorizer = None
        if s.client_cert_auth:
            roles = load_roles(s.auth_roles) if s.auth_roles else None
            authorizer = Authorizer(roles, checked=True)
        self.server = _server(client_limit, authorizer)
        if self.quota is not None:
            add_kv_service(self.server, self, authorizer, self.quota)
        else:
            pb_grpc.add_StateMachineServicer_to_server(MachineService(self), self.server)
            pb_grpc.add_KVServicer_to_server(StatusOnly(self), self.server)
        pb_grpc.add_AdminServicer_to_server(admin, self.server)
        if shared:
            pb_grpc.add_PeerServicer_to_server(peer_service, self.server)
        else:
            self.peer_server = _server(tcp.MAX_RECORD_BYTES)
            pb_grpc.add_PeerServicer_to_server(peer_service, self.peer_server)
            peer_tls = s.peer_tls
            _bind(
                self.peer_server,
                s.peer_address,
                peer_tls.server_credentials(require_client_auth=True) if peer_tls else None,
            )
        client_tls = s.client_tls
        _bind(
            self.server,
            s.listen,
            client_tls.server_credentials(s.client_cert_auth) if client_tls else None,
        )
        if s.peer_stream == "tcp":
            self.replication_server = ReplicationServer(
                peer_service.check,
                self._deliver,
                ssl=s.peer_tls.server_context() if s.peer_tls else None,
            )
            host, port = split_address(s.peer_address)
            try:
                stream_port = await self.replication_server.start(host, s.peer_stream_port)
            except OSError as exc:
                raise OSError(
                    f"cannot listen for replication on {host}:{s.peer_stream_port}: {exc}"
                ) from exc
            peer_service.stream_offset = stream_port - port
        if self.peer_server is not None:
            await self.peer_server.start()
        await self.server.start()
        self.transport.start()
        self._follow_membership()
        self._tasks = [
            asyncio.create_task(self._ticker(), name="raftfast-ticker"),
            asyncio.create_task(self._run(), name="raftfast-run"),
            asyncio.create_task(self._watch_disk(), name="raftfast-disk"),
        ]
        log.info(
            "node %s listening on %s (clients)%s",
            s.id,
            s.listen,
            "" if shared else f", {s.peer_address} (peers)",
        )
        _warn_if_open(s)
        if s.join and fresh:
            self._tasks.append(asyncio.create_task(self._join(), name="raftfast-join"))
        elif s.id not in self.raw.raft.membership:
            log.warning("node %s is not a member of the cluster configuration", s.id)

    async def stop(self) -> None:
        """Graceful stop: refuse new work, let the in-flight Ready finish, close everything."""
        if self._stopping:
            return
        self._stopping = True
        log.info("node %s stopping", self.id)
        for server in (self.server, self.peer_server):
            if server is not None:
                await server.stop(grace=0.5)
        if self.replication_server is not None:
            await self.replication_server.close()
        self._wake.set()
        for task in self._tasks:
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout=5.0)
            except (TimeoutError, asyncio.CancelledError):
                task.cancel()
            except Exception:  # noqa: BLE001 - already logged by _run
                pass
        if self.transport is not None:
            await self.transport.close()
        self._fail_all(NotLeaderError("node is shutting down"))
        self._fsync_pool.shutdown(wait=True)
        if self.wal is not None:
            self.wal.close()
        self.stopped.set()

    # -- API used by the KV service ------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        return self.raw is not None and self.raw.raft.role == Role.LEADER

    async def propose(self, payloads: list[bytes]) -> list:
        """Replicate commands; returns the state machine's result for each, once applied here."""
        self._check_leader()
        fut = asyncio.get_running_loop().create_future()
        self._proposals.append((payloads, fut))
        self._wake.set()
        return await fut

    async def read_barrier(self, mode: str) -> None:
        """Return once reading the local state machine is allowed in ``mode``."""
        if mode == "stale":
            return
        self._check_leader()
        if mode == "lease":
            # Leader lease: check-quorum deposes a leader cut off for an election timeout, so
            # within it our state is current, assuming bounded clock drift (opt-in only).
            await self._wait_applied(self.raw.raft.log.committed)
            return
        fut = asyncio.get_running_loop().create_future()
        self._read_requests.append(fut)
        self._wake.set()
        await fut

    async def transfer_leadership(self, target: str) -> tuple[str, int]:
        """Hand leadership to ``target``; returns (leader, term) once ``target`` leads.

        Raises TimeoutError if it has not taken over within two election timeouts."""
        self._check_leader()
        if target not in self.raw.raft.membership.voters:
            raise ValueError(f"{target!r} is not a voter")
        self.raw.transfer_leadership(target)
        self._wake.set()
        limit = 2 * self.settings.election_ticks * self.settings.tick_ms / 1000
        deadline = asyncio.get_running_loop().time() + limit
        while self.raw.raft.leader != target:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise TimeoutError(f"{target} did not take over within {limit:g}s")
            self._leader_changed.clear()
            try:
                await asyncio.wait_for(self._leader_changed.wait(), remaining)
            except TimeoutError:
                pass
        return target, self.raw.raft.term

    def peer_address_of(self, node_id: str) -> str | None:
        """Where ``node_id`` serves peers (its address in the configuration)."""
        return self._address_book().get(node_id) or self.settings.peers.get(node_id)

    def address_of(self, node_id: str) -> str | None:
        """Where ``node_id`` serves clients (for the leader hints clients follow), if known:
        as it told us, or its peer address if ports are shared here (they are cluster-wide)."""
        if node_id == self.id:
            return self.settings.listen
        told = self.transport.client_address_of(node_id) if self.transport else ""
        if told:
            return told
        return None if self.settings.peer_listen else self.peer_address_of(node_id)

    def _members_pb(self, st) -> list[pb.Member]:
        m = st.membership
        return [
            pb.Member(
                id=nid,
                address=addr,
                role=m.role_of(nid),
                match_index=st.progress.get(nid, (0, 0))[0],
                client_address=self.address_of(nid) or "",
            )
            for nid, addr in sorted(m.members().items())
        ]

    def members(self, require_leader: bool = True) -> pb.MembersResponse:
        """The configuration as the leader sees it (with each member's replication progress);
        ``require_leader=False``: as this node sees it."""
        if require_leader:
            self._check_leader()
        st = self.raw.status()
        return pb.MembersResponse(
            members=self._members_pb(st),
            leader=st.leader,
            config_index=st.config_index,
            committed=st.config_index <= st.commit_index,
            cluster_id=self.settings.cluster_id,
            commit_index=st.commit_index,
        )

    async def add_member(
        self, node_id: str, address: str, learner: bool, timeout: float
    ) -> pb.MembersResponse:
        """Add ``node_id`` as a learner; unless ``learner``, promote it once it caught up.
        Idempotent: adding a member again with the same address just carries on."""
        deadline = asyncio.get_running_loop().time() + timeout
        current = self.raw.raft.membership.members()
        if node_id in current:
            if current[node_id] != address:
                raise ValueError(f"{node_id} is already a member, at {current[node_id]}")
        else:
            await self._change(ChangeKind.ADD_LEARNER, node_id, address, deadline)
        if not learner and node_id not in self.raw.raft.membership.voters:
            await self._wait_caught_up(node_id, deadline)
            await self._change(ChangeKind.PROMOTE, node_id, "", deadline)
        return self.members()

    async def change_member(self, kind: ChangeKind, node_id: str, timeout: float):
        """Promote, demote or remove ``node_id``; returns once the change is committed."""
        deadline = asyncio.get_running_loop().time() + timeout
        m = self.raw.raft.membership
        done = {
            ChangeKind.PROMOTE: node_id in m.voters,
            ChangeKind.DEMOTE: node_id in m.learners,
            ChangeKind.REMOVE: node_id not in m,
        }[kind]
        if done:
            # Already so (perhaps thanks to an earlier attempt of this very call): say so.
            listing = self.members()
            listing.note = f"{node_id} is already {_DONE_NOTE[kind]}: nothing to do"
            return listing
        if kind == ChangeKind.PROMOTE and node_id in m.learners:
            # A voter far behind would stall writes (it counts toward the quorum at once).
            await self._wait_caught_up(node_id, deadline)
        await self._change(kind, node_id, "", deadline)
        # If we removed ourselves we stepped down once it committed: answer with what we know.
        return self.members(require_leader=self.raw.raft.role == Role.LEADER)

    async def _change(self, kind: ChangeKind, node_id: str, address: str, deadline: float):
        """Propose one change and wait until it is committed and applied here."""
        raft = self.raw.raft
        while True:
            self._check_leader()
            try:
                index = self.raw.propose_change(kind, node_id, address)
                break
            except ChangeInProgressError:
                # Wait for the earlier change (or this leader's no-op) to commit, then retry.
                await self._wait_applied_as_leader(raft.log.last_index, deadline, "earlier change")
        self._wake.set()
        log.info("node %s proposed %s %s at %d", self.id, kind.value, node_id, index)
        await self._wait_applied_as_leader(index, deadline, f"{kind.value} {node_id}")

    async def _wait_applied_as_leader(self, index: int, deadline: float, what: str) -> None:
        """Until ``index`` (an entry of our current term) is applied here. NotLeaderError if we
        lose leadership first: whether it commits is then up to the next leader, which the
        client retries at (changes are idempotent). A leader whose own removal commits steps
        down in the same Ready that applies it, so it still sees the entry applied."""
        loop = asyncio.get_running_loop()
        term = self.raw.raft.term
        applied = asyncio.ensure_future(self._wait_applied(index))
        try:
            while not applied.done():
                raft = self.raw.raft
                committed_here = raft.log.committed >= index and raft.log.term_at(index) == term
                if (raft.role != Role.LEADER or raft.term != term) and not committed_here:
                    # (a leader whose own removal just committed has stepped down: the entry
                    # is committed and applied with the next Ready; wait for that)
                    raise NotLeaderError(
                        f"leadership lost before {what} committed", raft.leader or None
                    )
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise TimeoutError(f"{what}: not committed before the deadline")
                await asyncio.wait({applied}, timeout=min(remaining, self.settings.tick_ms / 1000))
            applied.result()
        finally:
            applied.cancel()

    async def _wait_caught_up(self, node_id: str, deadline: float) -> None:
        """Until the learner holds everything committed when we started waiting."""
        loop = asyncio.get_running_loop()
        target = self.raw.raft.log.committed
        while True:
            self._check_leader()
            pr = self.raw.raft.progress.get(node_id)
            if pr is None:
                raise ValueError(f"{node_id} is no longer a member")
            if pr.match_index >= target:
                return
            if loop.time() >= deadline:
                raise TimeoutError(
                    f"{node_id} is a learner but has not caught up yet (has {pr.match_index} of "
                    f"{target}); promote it later with: raftfast member promote {node_id}"
                )
            await asyncio.sleep(self.settings.tick_ms / 1000)

    def status(self) -> pb.StatusResponse:
        st = self.raw.status()
        leader = st.leader
        members = self._members_pb(st)
        return pb.StatusResponse(
            id=st.id,
            role=st.role.name.lower(),
            term=st.term,
            leader=leader,
            leader_address=self.address_of(leader) or "" if leader else "",
            commit_index=st.commit_index,
            applied_index=self.applied_index,
            last_index=st.last_index,
            members=members,
            cluster_id=self.settings.cluster_id,
            first_index=self.raw.raft.log.first_index,
            snapshot_index=self._snapshot_index,
            alarms=self.quota.alarms().alarms if self.quota else [],
            state_bytes=self.quota.alarms().state_bytes if self.quota else 0,
        )

    # -- internals -----------------------------------------------------------------------------

    def _check_leader(self) -> None:
        if self._stopping or self.failed is not None:
            # After a fatal error _run is gone: work queued now would wait for stop() instead
            # of failing at once (and a client would see CANCELLED, not a retryable error).
            raise NotLeaderError("node is shutting down")
        raft = self.raw.raft
        if raft.role != Role.LEADER:
            raise NotLeaderError(leader_id=raft.leader or None)

    def _deliver(self, msgs: list[Message]) -> None:
        if self._stopping:
            return
        for m in msgs:
            if m.dst == self.id:
                try:
                    self.raw.step(m)
                except (LogError, ValueError) as exc:
                    # Entries the log refuses (e.g. terms going backwards): drop this message
                    # only. Raising would abort the peer's stream and lose the rest of its frame.
                    log.warning(
                        "node %s dropped a bad %s from %s (term %d): %s",
                        self.id,
                        m.type.name,
                        m.src,
                        m.term,
                        exc,
                    )
        self._wake.set()

    def _address_book(self) -> dict[str, str]:
        """Whom the transport talks to: the members of the configuration committed here and
        of every newer one (a node being removed is still needed until its removal commits),
        and, while we are not a member, the members the cluster told us about when we joined."""
        raft = self.raw.raft
        book = raft.peers_in_play()
        if self.id in raft.membership:
            return book
        return {**self._known_addresses, **book}

    def _accepts_from(self, src: str) -> bool:
        """Peer traffic we take: anyone with our cluster id (a member added recently may lead
        before we learn of it) except nodes whose removal we applied: they are told so."""
        return src not in self._removed_ids

    def _on_refused(self, peer: str, removed_at: int) -> None:
        """``peer`` applied a committed configuration (at ``removed_at``) that removed a node
        with our id. Stop, unless we know a newer configuration (our id was added back since:
        the peer lags), or we are still joining (an older node with our id was removed)."""
        raft = self.raw.raft
        if self.removed or self._joining:
            return
        newer_than_ours = removed_at > raft.config_index
        leaving = self.id not in raft.membership and any(self.id in m for _, m in raft.configs())
        if newer_than_ours or leaving:
            self._shut_down_removed(f"{peer} says this node was removed at index {removed_at}")

    def _follow_membership(self) -> None:
        """Point the transport at the peers in play (they change on append and on commit)."""
        membership = self.raw.raft.membership
        if membership is not self._membership:
            if self._membership is not None:
                log.info(
                    "node %s configuration now: voters %s, learners %s (index %d)",
                    self.id,
                    sorted(membership.voters) or "none",
                    sorted(membership.learners) or "none",
                    self.raw.raft.config_index,
                )
            self._membership = membership
        book = self._address_book()
        if book != self._book:
            self._book = book
            self.transport.set_peers(book)

    async def _join(self) -> None:
        """``--join``: ask the cluster to add us (as a learner, promoted once caught up), over
        the peer port: first where its members are (so that we can answer the leader), then
        the change itself, at the leader (followers point us at it)."""
        s = self.settings
        backoff = 0.2
        target = s.join
        self._joining = True
        request = pb.JoinRequest(cluster_id=s.cluster_id, id=s.id, address=s.peer_address)
        while not self._stopping:
            channel = self.transport.channel(target)
            try:
                stub = pb_grpc.PeerStub(channel)
                listing = await stub.Join(
                    pb.JoinRequest(cluster_id=s.cluster_id, id=s.id, list_only=True), timeout=30
                )
                self._known_addresses = {m.id: m.address for m in listing.members}
                self._follow_membership()
                log.info("node %s asks %s to add it at %s", s.id, target, s.peer_address)
                await stub.Join(request, timeout=600.0)
                self._joining = False
                log.info("node %s joined the cluster as a voter", s.id)
                return
            except grpc.aio.AioRpcError as exc:
                code, details = exc.code(), exc.details()
                if code in _JOIN_REFUSED:
                    self.failed = ValueError(f"{target} refused the join: {details}")
                    log.critical("node %s cannot join: %s", s.id, self.failed)
                    asyncio.get_running_loop().call_soon(lambda: asyncio.create_task(self.stop()))
                    return
                leader = dict(exc.trailing_metadata() or ()).get("leader-address", "")
                if code == grpc.StatusCode.UNAVAILABLE and leader and leader != target:
                    target = leader
                    continue
                log.warning("node %s: join attempt failed (%s); retrying", s.id, details)
                target = s.join  # (a leader we were pointed at may be gone: ask again)
            finally:
                await channel.close()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def _watch_disk(self) -> None:
        """Every second: if this node's disk is nearly full, the NOSPACE alarm is raised (by
        the leader, which a follower asks), before the log cannot grow any more."""
        while not self._stopping and self.quota is not None:
            await asyncio.sleep(1.0)
            why = self.quota.disk_short()
            if why is None or self.quota.raised():
                continue
            if self.is_leader:
                self.quota.raise_alarm(why)
            elif self.raw.raft.leader:
                await self.transport.report_alarm(self.raw.raft.leader, why)

    def _alarm_reported(self, src: str, why: str) -> str | None:
        """A member says its disk is nearly full: raise NOSPACE (why not, if we cannot)."""
        if self.quota is None:
            return "this node's state machine has no quota"
        if not self.is_leader:
            return "not the leader"
        if src not in self.raw.raft.membership:
            return f"{src} is not a member"
        self.quota.raise_alarm(f"{src} reports: {why}")
        return None

    def _on_unreachable(self, peer: str) -> None:
        if self.raw is not None:
            self.raw.report_unreachable(peer)

    async def _ticker(self) -> None:
        interval = self.settings.tick_ms / 1000
        while not self._stopping:
            await asyncio.sleep(interval)
            self.raw.tick()
            self._wake.set()

    async def _run(self) -> None:
        try:
            while not self._stopping or self.raw.has_ready():
                if not self.raw.has_ready() and not self._proposals and not self._read_requests:
                    self._wake.clear()
                    await self._wake.wait()
                    if self._stopping:
                        break
                self._feed()
                if self.raw.has_ready():
                    await self._handle_ready(self.raw.ready())
        except Exception as exc:  # noqa: BLE001 - a storage failure must stop the node
            self.failed = exc
            log.critical("node %s stopping after a fatal error: %s", self.id, exc)
            self._fail_all(NotLeaderError(f"node failed: {exc}"))
            asyncio.get_running_loop().call_soon(lambda: asyncio.create_task(self.stop()))

    def _feed(self) -> None:
        """Hand queued proposals and reads to the core, as one batch each."""
        if self._proposals:
            batch, self._proposals = self._proposals, []
            payloads = [p for ps, _ in batch for p in ps]
            try:
                first, _last = self.raw.propose(payloads)
            except NotLeaderError as exc:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(NotLeaderError(str(exc), exc.leader_id))
            else:
                term = self.raw.raft.term
                for ps, fut in batch:
                    self._waiting_writes.append(_Waiting(first, first + len(ps) - 1, term, fut))
                    first += len(ps)
        if self._read_requests:
            waiters, self._read_requests = self._read_requests, []
            request_id = next(self._read_ids)
            try:
                self.raw.read_index(request_id)
            except NotLeaderError as exc:
                for fut in waiters:
                    if not fut.done():
                        fut.set_exception(NotLeaderError(str(exc), exc.leader_id))
            else:
                self._reads_by_id[request_id] = waiters

    async def _handle_ready(self, rd: Ready) -> None:
        self.transport.send(rd.eager_messages)
        if rd.snapshot is not None:
            await self._install_snapshot(rd.snapshot)
        hs = rd.hard_state
        if hs is not None or rd.entries:
            self.wal.append(hs, rd.entries or None)
            # Entries, term and vote must be durable before anything is sent or applied; the
            # commit index need not be (a restart relearns it from the leader), so a Ready that
            # only moves it does not wait for a sync: its record rides on the next one. That
            # keeps an fdatasync and a thread hand-off off every write's critical path.
            if rd.entries or (hs is not None and (hs.term, hs.vote) != self._durable_term_vote):
                # A StorageError propagates: _run stops the node (never retry-and-pretend).
                started = time.perf_counter()
                if self._sync_inline(len(rd.entries)):
                    self._write_and_sync()
                else:
                    loop = asyncio.get_running_loop()
                    await loop.run_in_executor(self._fsync_pool, self._write_and_sync)
                self._last_sync_s = time.perf_counter() - started
                if hs is not None:
                    self._durable_term_vote = (hs.term, hs.vote)
        for m in rd.messages:
            if m.type == MsgType.SNAPSHOT:
                asyncio.create_task(self._send_snapshot(m))
        self.transport.send([m for m in rd.messages if m.type != MsgType.SNAPSHOT])
        if rd.committed:
            self._apply(rd.committed)
        for request_id, index in rd.read_states:
            for fut in self._reads_by_id.pop(request_id, []):
                self._reads_at.append((index, fut))
        self._release_reads()
        if rd.soft_state is not None:
            self._on_role_change(*rd.soft_state)
        self._follow_membership()
        self.raw.advance(rd)
        if self._snapshot_due():
            await self._take_snapshot()

    # -- snapshots -----------------------------------------------------------------------------

    def _snapshot_due(self) -> bool:
        """Every ``snapshot_entries`` applied entries, and whenever the log held in memory grew
        by ``snapshot_log_bytes`` since the last snapshot left it (big values overwritten again
        and again make a small state but a big log; what a snapshot cannot drop, say entries
        not yet committed, does not make it snapshot again and again)."""
        behind = self.applied_index - self._snapshot_index
        grown = self.raw.raft.log.entries.nbytes - self._log_bytes_kept
        return behind >= self.settings.snapshot_entries or (
            behind > 0 and grown >= self.settings.snapshot_log_bytes
        )

    async def _take_snapshot(self) -> None:
        """Snapshot the state machine, then drop the log it covers (keeping ``snapshot_keep``
        entries for followers that lag a little, unless they hold a quarter of
        ``snapshot_log_bytes``: then none). The state is serialized here, in the loop, so it is
        point-in-time; the file is written and fsynced in the fsync thread."""
        loop = asyncio.get_running_loop()
        raft_log = self.raw.raft.log
        index = self.applied_index
        term = raft_log.term_at(index)
        snapshot = self.snapshots.create(index, term, self.raw.raft.membership_at(index).encode())
        try:
            self.fsm.snapshot(snapshot.out)  # (into the page cache; the sync is in the thread)
        except BaseException:
            snapshot.abort()
            raise
        meta = await loop.run_in_executor(self._fsync_pool, snapshot.finish)
        self._snapshot_index = index
        keep = self.settings.snapshot_keep
        if raft_log.entries.nbytes >= self.settings.snapshot_log_bytes // 4:
            keep = 0
        upto = min(index - keep, raft_log.stable)
        if upto >= raft_log.first_index:
            upto_term = raft_log.term_at(upto)
            self.raw.compact(upto)
            await loop.run_in_executor(self._fsync_pool, self.wal.release_before, upto, upto_term)
        self._log_bytes_kept = raft_log.entries.nbytes
        log.info("node %s took a snapshot at %d (%d bytes)", self.id, index, meta.size)

    def _receive_snapshot(self, meta: Message) -> _IncomingSnapshot:
        """A leader streams us a snapshot: where to write it. Only the leader of our term may
        (anyone else could replace our state), and only as much as the disk can take."""
        raft = self.raw.raft
        if meta.src != raft.leader or meta.term != raft.term:
            raise tcp.Refused(
                grpc.StatusCode.FAILED_PRECONDITION.value[0],
                f"snapshots are taken from the leader of term {raft.term} only "
                f"({raft.leader or 'none known here'}), not from {meta.src!r} of term {meta.term}",
            )
        room = free_bytes(self.snapshots.directory) - DISK_RESERVE_BYTES
        receiver = self.snapshots.receive(meta.index, meta.log_term)
        return _IncomingSnapshot(self, receiver, room)

    async def _install_snapshot(self, meta: tuple[int, int]) -> None:
        snap = self._incoming_snapshot
        if snap is None or (snap.index, snap.term) != meta:
            raise RuntimeError(f"asked to install snapshot {meta}, but received {snap}")
        loop = asyncio.get_running_loop()
        # The log restarts after the snapshot before the state machine jumps to it: a crash in
        # between restarts from the (durable) snapshot file with a consistent log.
        await loop.run_in_executor(self._fsync_pool, self.wal.install_snapshot, *meta)
        self._restore(snap)
        self._incoming_snapshot = None
        log.info("node %s installed a snapshot at %d from the leader", self.id, snap.index)

    def _restore(self, meta: SnapshotMeta) -> Membership:
        """The state machine from snapshot ``meta``; its configuration."""
        raw_membership, inp = self.snapshots.open_state(meta)
        with inp:
            try:
                membership = Membership.decode(raw_membership)
            except ValueError as exc:
                raise CorruptionError(f"{meta.path}: {exc}", meta.path, 0) from None
            self.fsm.restore(inp)
        self.applied_index = self._snapshot_index = meta.index
        return membership

    async def _send_snapshot(self, m: Message) -> None:
        """The core asked for a snapshot to go to ``m.dst``: stream our newest one."""
        meta = self.snapshots.latest()
        ok = False
        if meta is not None and meta.index >= m.index:
            membership = self.snapshots.read_membership(meta)
            named = Message(
                MsgType.SNAPSHOT, m.src, m.dst, m.term, meta.index, meta.term, membership
            )
            log.info("node %s sends snapshot %d to %s", self.id, meta.index, m.dst)
            ok = await self.transport.send_snapshot(named, self.snapshots.read_chunks(meta))
        if self.raw is not None and not self._stopping:
            self.raw.report_snapshot(m.dst, ok)
            self._wake.set()

    def _sync_inline(self, size: int) -> bool:
        return (
            size <= _INLINE_SYNC_BYTES
            and self._last_sync_s < _SLOW_SYNC_S
            and not _FAULT_DISK_DELAY
            and self.transport.all_direct()
        )

    def _write_and_sync(self) -> None:
        """Group commit (in the loop or the fsync thread). ``RAFTFAST_FAULT_DISK_DELAY_MS``
        (tests only) gives followers a slow, jittery disk: each of their writes starts up to
        that much later, which widens any window in which a follower acknowledges before
        writing."""
        if _FAULT_DISK_DELAY and self.raw.raft.role != Role.LEADER:
            time.sleep(random.uniform(0, _FAULT_DISK_DELAY))
        self.wal.sync()

    def _apply(self, committed: bytes) -> None:
        """Commands to the state machine (in runs of consecutive ones: all of them, but for a
        leader's no-op or a configuration now and then); configurations to the membership."""
        first, terms, types, payloads = decode_batch(committed)
        if types.count(ENTRY_NORMAL) == len(types):
            results = self.fsm.apply_batch(first, payloads)
        else:
            results = [None] * len(types)
            for start, end in _runs_of_commands(types):
                results[start:end] = self.fsm.apply_batch(first + start, payloads[start:end])
            for i, etype in enumerate(types):
                if etype == ENTRY_CONFIG:
                    self._config_committed(first + i, Membership.decode(payloads[i]))
        self.applied_index = first + len(types) - 1
        if self._waiting_writes:
            self._resolve_writes(first, terms, results)

    def _resolve_writes(self, first: int, terms: list[int], results: list) -> None:
        """Hand applied results to the proposals waiting for them. A proposal's entries may be
        applied over several Readys (a Ready applies at most ``max_apply_bytes``): its results
        are collected until its last entry is in."""
        last = first + len(terms) - 1
        still = []
        for waiting in self._waiting_writes:
            if waiting.first > last:
                still.append(waiting)
                continue
            if waiting.fut.done():
                continue
            lo, hi = max(waiting.first, first), min(waiting.last, last)
            if (
                lo != waiting.first + len(waiting.results)  # a part of it was never applied
                or terms[lo - first] != waiting.term
                or terms[hi - first] != waiting.term
            ):
                # Another leader's entries took its place: the write was not applied.
                waiting.fut.set_exception(
                    NotLeaderError("leadership changed before the write committed")
                )
                continue
            waiting.results += results[lo - first : hi - first + 1]
            if hi < waiting.last:
                still.append(waiting)  # partly applied: wait for the rest
            else:
                waiting.fut.set_result(waiting.results)
        self._waiting_writes = still

    def _config_committed(self, index: int, membership: Membership) -> None:
        """A configuration committed. If it left us out (and we were in one before), we are
        done: shut down once our last messages (the hand-over to a new leader) are out."""
        members = set(membership.members())
        for gone in self._committed_members - members:
            self._removed_ids[gone] = index
        for back in members & self._removed_ids.keys():
            del self._removed_ids[back]
        self._committed_members = members
        raft = self.raw.raft
        if self.id in membership or self.removed or self._joining:
            return  # (joining: an earlier node with our id may have been removed long ago)
        if self.id in raft.membership or any(
            self.id in m for at, m in raft.configs() if at > index
        ):
            return  # added back since
        if not any(self.id in m for at, m in raft.configs() if at < index):
            return  # we were never a member before it (we are joining, catching up)
        self._shut_down_removed(f"the configuration at index {index} leaves it out")

    def _shut_down_removed(self, why: str) -> None:
        self.removed = True
        log.warning("node %s was removed from the cluster (%s); shutting down", self.id, why)
        delay = self.settings.election_ticks * self.settings.tick_ms / 1000
        asyncio.get_running_loop().call_later(delay, lambda: asyncio.create_task(self.stop()))

    def _release_reads(self) -> None:
        applied = self.applied_index
        if self._reads_at:
            ready = [f for i, f in self._reads_at if i <= applied]
            self._reads_at = [(i, f) for i, f in self._reads_at if i > applied]
            for fut in ready:
                if not fut.done():
                    fut.set_result(None)

    async def _wait_applied(self, index: int) -> None:
        if self.applied_index >= index:
            return
        fut = asyncio.get_running_loop().create_future()
        self._reads_at.append((index, fut))
        await fut

    def _on_role_change(self, role: Role, leader: str) -> None:
        self._leader_changed.set()
        term, reason = self.raw.raft.term, self.raw.raft.reason
        if role == Role.LEADER:
            log.info("node %s became leader in term %d (%s)", self.id, term, reason)
        else:
            log.info(
                "node %s is %s in term %d, leader %s (%s)",
                self.id,
                role.name.lower(),
                term,
                leader or "unknown",
                reason,
            )
            # Waiters of a deposed leader: tell clients to retry at the new leader. Retried
            # writes carry the same (client id, sequence), so nothing is applied twice.
            err = NotLeaderError("leadership lost", leader or None)
            for waiting in self._waiting_writes:
                if not waiting.fut.done():
                    waiting.fut.set_exception(err)
            self._waiting_writes = []
            for waiters in self._reads_by_id.values():
                for fut in waiters:
                    if not fut.done():
                        fut.set_exception(err)
            self._reads_by_id.clear()

    def _fail_all(self, err: Exception) -> None:
        waiters = [f for _, f in self._proposals] + [w.fut for w in self._waiting_writes]
        waiters += self._read_requests + [f for _, f in self._reads_at]
        waiters += [f for fs in self._reads_by_id.values() for f in fs]
        for fut in waiters:
            if not fut.done():
                fut.set_exception(err)
        self._proposals, self._waiting_writes, self._read_requests = [], [], []
        self._reads_at, self._reads_by_id = [], {}


_DONE_NOTE = {
    ChangeKind.PROMOTE: "a voter",
    ChangeKind.DEMOTE: "a learner",
    ChangeKind.REMOVE: "not a member",
}


@dataclass(slots=True)
class _Waiting:
    """A proposal waiting to be applied: its entries first..last, of ``term``, and the results
    of those applied so far."""

    first: int
    last: int
    term: int
    fut: asyncio.Future
    results: list = field(default_factory=list)


def _runs_of_commands(types: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of consecutive commands (ENTRY_NORMAL) in ``types``."""
    runs, start = [], None
    for i, etype in enumerate(types):
        if etype == ENTRY_NORMAL:
            if start is None:
                start = i
        elif start is not None:
            runs.append((start, i))
            start = None
    if start is not None:
        runs.append((start, len(types)))
    return runs


def _log_holds(entries, index: int, term: int) -> bool:
    """Does the log hold entry ``index`` with ``term`` (or start right after it)?"""
    if not entries.first_index - 1 <= index <= entries.last_index:
        return False
    return entries.term_at(index) == term


class _IncomingSnapshot:
    """Writes a leader's snapshot into our store; once complete, the node remembers it until the
    core asks for it to be installed (``Ready.snapshot``)."""

    def __init__(self, node: Node, receiver, max_bytes: int) -> None:
        self._node = node
        self._receiver = receiver
        self._max_bytes = max_bytes

    def write(self, offset: int, data: bytes) -> None:
        if offset + len(data) > self._max_bytes:
            raise ValueError(
                f"a snapshot of over {self._max_bytes} bytes does not fit this node's disk"
            )
        self._receiver.write(offset, data)

    def finish(self) -> None:
        self._node._incoming_snapshot = self._receiver.finish()

    def abort(self) -> None:
        self._receiver.abort()


def _server(max_message_bytes: int, authorizer: Authorizer | None = None) -> grpc.aio.Server:
    # No SO_REUSEPORT (gRPC's default): a second process on our port must fail to start, not
    # silently share the port with us.
    return grpc.aio.server(
        interceptors=[RoleInterceptor(authorizer)] if authorizer is not None else None,
        options=[
            ("grpc.max_send_message_length", tcp.MAX_RECORD_BYTES),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),
            ("grpc.max_concurrent_streams", _MAX_STREAMS_PER_CONNECTION),
        ],
    )


def _bind(server: grpc.aio.Server, address: str, credentials) -> None:
    try:
        if credentials is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, credentials)
    except RuntimeError:  # grpcio raises instead of returning 0 when bind() fails
        bound = 0
    if bound == 0:
        raise OSError(f"cannot listen on {address} (address in use?)")


def _warn_if_open(s: NodeSettings) -> None:
    """Plain mode is for local work: say what it leaves open."""
    if s.peer_tls is None:
        log.warning(
            "node %s: peer traffic on %s is neither encrypted nor authenticated: anyone who "
            "reaches it can pose as a member (TLS: --peer-cert-file; docs/security.md)",
            s.id,
            s.peer_address,
        )
    if not s.client_cert_auth:
        log.warning(
            "node %s: clients on %s are not authenticated: anyone who reaches it may read, "
            "write and change the membership (--client-cert-auth; docs/security.md)",
            s.id,
            s.listen,
        )


async def serve(settings: NodeSettings, state_machine: StateMachine | None = None) -> None:
    """Run a node until SIGTERM/SIGINT, then stop gracefully. Raises if the node failed."""
    node = Node(settings, state_machine)
    await node.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.create_task(node.stop()))
    await node.stopped.wait()
    if node.failed is not None:
        raise node.failed
