"""The driver: the only place with an event loop. It owns the RawNode, the WAL, the peer
transport, the state machine and the gRPC servers. Its parts: membership changes
(``membership.py``), snapshots (``snapshots.py``); what it serves on top of the log, the KV
store or another state machine, is its application (``apps.py``).

One loop (``_run``) takes each Ready and carries out the Raft contract:

    send eager messages (the leader's appends: its write overlaps replication, thesis §10.2.1)
    append hard state + entries to the WAL, fdatasync on a writer thread or in the loop (group
        commit: everything that arrived during the previous fdatasync goes into this one)
    send the other messages (acks and votes leave only once durable)
    apply committed entries to the state machine, resolve waiting proposals and reads
    advance

While the fdatasync runs, peers' messages, ticks and client proposals keep flowing into the core;
they form the next Ready.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc

from raftfast._accel import COMPILED
from raftfast._version import __version__
from raftfast.address import split_address
from raftfast.core.membership import Membership
from raftfast.core.raft import Config
from raftfast.core.rawnode import RawNode
from raftfast.core.types import ENTRY_CONFIG, ENTRY_NORMAL, Committed, Message, MsgType, Ready, Role
from raftfast.errors import CorruptionError, LogError, NotLeaderError
from raftfast.proto import raftfast_pb2 as pb
from raftfast.security.roles import Authorizer, ClientShares, RoleInterceptor, load_roles
from raftfast.server import lease, logs
from raftfast.server.admin import AdminService, JoinService
from raftfast.server.apps import app_for
from raftfast.server.arrival import ArrivalLimit
from raftfast.server.handlers import quiet_answers_not_sent, register
from raftfast.server.health import ADMIN_SERVICE, MAX_REFLECTION_STREAMS, Health, enable_reflection
from raftfast.server.health import MAX_WATCHES as MAX_HEALTH_WATCHES
from raftfast.server.incarnations import FILE as INCARNATIONS_FILE
from raftfast.server.incarnations import Incarnations
from raftfast.server.lease import LeaderLease
from raftfast.server.log_counts import CountedWarning
from raftfast.server.membership import MembershipMixin
from raftfast.server.metrics import MetricsServer, NodeMetrics, RequestTimer
from raftfast.server.session_stream import SessionServer, server_context
from raftfast.server.settings import NodeSettings
from raftfast.server.snapshots import SnapshotMixin, log_holds
from raftfast.statemachine import StateMachine
from raftfast.storage.snapshot import SnapshotMeta, SnapshotStore
from raftfast.storage.wal import WAL
from raftfast.storage.writer import WALWriter
from raftfast.transport import tcp
from raftfast.transport.grpc import PeerService, PeerTransport
from raftfast.transport.tcp import ReplicationServer

log = logging.getLogger("raftfast.node")

APP_TASK = "raftfast-app"  # the application's background work (KVApp.run)

# A follower (or a leader alone) syncs a small write right here in the loop: its sync is on the
# write's critical path, and handing it to the writer thread and back costs two wake-ups. The
# writer (raftfast.storage.writer: a C thread that needs no GIL) takes a big write (a batched
# load), any write while other writes wait (many clients with unary calls: gRPC hands the loop
# their calls one at a time, and a loop blocked in fdatasync took one call per Ready, 850
# puts/s at 256 in flight; with the thread, 2,000), any write while the disk is slow (the last
# sync took longer than _SLOW_SYNC_S) or a peer is on the gRPC stream (its frames leave from
# this loop), and every write of a leader with followers: their acknowledgements commit its
# entries meanwhile (_pump), and the loop must keep taking them (sequential put p50 1.13-1.18
# -> 1.11 ms, alternating runs), sending and heartbeating.
_INLINE_SYNC_BYTES = 64 * 1024
_SLOW_SYNC_S = 0.002
# A commit index reaches the followers on the next append or heartbeat (not by a message of its
# own per write: that cost sequential latency). When no write follows within this long, a
# heartbeat round takes it, so followers apply (serializable reads, watches on followers) a few
# milliseconds after the leader, not a heartbeat interval later (etcd's followers are that close).
_COMMIT_NOTICE_S = 0.002
# While the leader's own write syncs, a proposal of this many bytes or more (a put_many, a big
# value) is handed to the core at once, with every proposal queued by then, and sent to the
# followers (_pump), not after the sync (batched loads waited one sync of the leader per round).
# Smaller ones wait for the next Ready to share its frame to each follower: fed as soon as they
# added up to as much, 1x2048 unbatched puts went from ~100,000 a second to ~87,000 in two runs
# of three (more frames, more Readys on the followers, on the same two cores).
_FEED_WHILE_SYNCING_BYTES = 64 * 1024
# An apply holds the loop for about this long at most: what is left of the committed entries
# waits for the next turn of the loop (_apply_held), in order, with everything committed after
# it. A Ready hands over up to 8 MiB of entries, and 8 MiB of etcd Txns of tiny puts (416,000
# puts) held every node 1.7 s: elections (a hostile hunt). Entries are applied in parts, the
# clock looked at between parts (_apply_slice).
_APPLY_SLICE_S = 0.01
_FAULT_DISK_DELAY = float(os.environ.get("RAFTFAST_FAULT_DISK_DELAY_MS", "0")) / 1000
# gRPC streams one client connection may have open: enough for an etcd client's 256 unary calls
# in flight plus its watches and keep-alives (etcd sets no limit); what they may hold is bounded
# by --max-request-bytes each and by HTTP/2 flow control per connection.
_MAX_STREAMS_PER_CONNECTION = 1024
_IDENTITY_ONLY = 1  # gRPC's compression algorithms as a bitset: "identity" alone
# Calls under way on a port at once (more are answered RESOURCE_EXHAUSTED at once): beyond the
# streams, each kind bounded on its own (tests/server/test_request_arrival.py adds the bounds
# up), room for one-request calls, whose request must come within REQUEST_ARRIVAL_S while
# many wait (raftfast.server.arrival). Calls whose request never arrives cost ~12-24 KB each: 100
# connections of 1,024 such calls took 1.2 GB and cost a leader its leadership (16,384 of
# them: ~390 MB, the leader kept).
MAX_CONCURRENT_RPCS = 12_288
_MISSING_REMEDY = (  # a data directory that lost files the node needs
    "put the missing files back, restore a backup (--restore), or remove this node's data and "
    "add it back (docs/operations.md)"
)
GRPC_HANDSHAKE_MS = 5_000  # a gRPC connection's TLS and HTTP/2 handshakes, at most
KEEPALIVE_PING_MS = 60_000  # a client connection is pinged after this long without a frame
FOREIGN_SAID_EVERY_S = 60.0  # a follower holding another cluster's state: an error this often


class Driver(MembershipMixin, SnapshotMixin):
    def __init__(self, settings: NodeSettings, state_machine: StateMachine | None = None) -> None:
        """``state_machine``: what the node replicates (default: the KV store, served by the
        KV service; any other is served by the generic Propose/Query service)."""
        settings.validate()
        self.settings = settings
        self.id = settings.id
        self.app = app_for(self, state_machine)
        self.fsm = self.app.fsm
        self.quota = self.app.quota  # (the KV store's; None for other state machines)
        self.applied_index = 0  # of the last entry applied (commands, no-ops, configurations)
        self.raw: RawNode | None = None
        self.wal: WAL | None = None
        self._wal_writer: WALWriter | None = None  # the WAL's syncs off the loop
        self.transport: PeerTransport | None = None
        self.server: grpc.aio.Server | None = None  # clients (and peers, unless peer_server)
        self.peer_server: grpc.aio.Server | None = None  # peers, on --peer-listen
        self.replication_server: ReplicationServer | None = None  # TCP replication streams
        self.session_server: SessionServer | None = None  # clients' Session streams over TCP
        self.session_port = 0  # where session_server listens (0: not offered)
        self._wake = asyncio.Event()
        self._proposals: list[tuple[list[bytes], asyncio.Future]] = []
        self._big_proposal = False  # _proposals hold one of _FEED_WHILE_SYNCING_BYTES
        self._commit_notice: asyncio.TimerHandle | None = None
        self._proposed_since_notice = False
        self._committed_at = 0.0  # loop time of the leader's newest apply
        self._waiting_writes: list[_Waiting] = []
        self._read_requests: list[asyncio.Future] = []
        self._reads_by_id: dict[int, list[asyncio.Future]] = {}
        self._reads_at: list[tuple[int, asyncio.Future]] = []  # (read index, waiter)
        self._read_ids = itertools.count(1)
        self._lease = LeaderLease(settings.tick_ms, settings.election_ticks)
        self._fsync_pool = ThreadPoolExecutor(1, thread_name_prefix=f"raftfast-fsync-{self.id}")
        self._tasks: list[asyncio.Task] = []
        self._stopping = False
        self._handing_over = False  # stop() is handing leadership over first
        self._snapshot_lock = asyncio.Lock()
        self._snapshot_task: asyncio.Task | None = None
        self._snapshot_sends: set[asyncio.Task] = set()  # (held: the loop keeps weak references)
        self._compact_to = 0
        # Snapshot files are written and synced here, apart from the WAL's appends.
        self._snapshot_pool = ThreadPoolExecutor(1, thread_name_prefix=f"raftfast-snap-{self.id}")
        self._leader_changed = asyncio.Event()
        self._streams_lost: set[str] = set()  # peers whose stream broke (transfer_leadership)
        self.snapshots: SnapshotStore | None = None
        self._snapshot_index = 0  # index of our newest snapshot
        self._snapshot_retry_at = 0.0  # (after a refused snapshot: SnapshotMixin)
        self._snapshot_resend_s: dict[str, float] = {}
        self._no_room_warning = CountedWarning(
            log, "%d snapshot(s) found no room on the disk of node %s; the latest: %s", 60.0
        )
        self._backup_taken_at = -1e9  # (the last snapshot a backup took: SnapshotMixin)
        self._log_bytes_kept = 0  # bytes the log held in memory right after the last snapshot
        self._release_at_rest = self._trim_at_rest = False  # (SnapshotMixin)
        self._release_seen = (0, 0.0)
        self._incoming_snapshot = None  # a snapshot streamed from the leader, not yet installed
        self._restoring: asyncio.Task | None = None  # a leader's snapshot decoded off the loop
        self._held_commits: list[Committed] = []  # committed after it: applied once it is in
        self.failed: BaseException | None = None
        self.stopped = asyncio.Event()
        self._membership: Membership | None = None  # the configuration the transport follows
        self._known_addresses: dict[str, str] = {}  # joining: members learned from the cluster
        self._book: dict[str, str] | None = None  # the peers the transport was last pointed at
        self._last_sync_s = 0.0  # how long the last sync took (thread hand-offs included)
        self._syncing = False  # the leader's own write is syncing in the fsync thread: _pump
        self._pump_scheduled = False
        self._joining = False  # --join in progress: entries replayed may predate our addition
        self._adding = asyncio.Lock()  # (membership: one member add at a time)
        self.removed = False  # a committed configuration left us out: we shut down
        self._committed_members: set[str] = set()  # of the newest configuration applied here
        self._removed_ids: dict[str, int] = {}  # removed node -> index of its removal: refused
        self.metrics = NodeMetrics()  # counted as it happens; the rest is read on scrape
        self.metrics_server: MetricsServer | None = None  # --metrics-listen
        self._grpc_started: set[grpc.aio.Server] = set()  # (the others were only bound)
        self._starting = False  # start() is under way
        self._start_over = asyncio.Event()  # start() returned or raised
        self.health: Health | None = None  # grpc.health.v1 on the client port
        self._last_leader = ""  # the leader of the last soft state (for leader_changes)
        self._foreign_said: dict[str, float] = {}  # (_say_foreign_acks: when, per follower)

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        # Log lines of this node's tasks (created from here on) carry its id and term.
        token = logs.bind(self)
        self._starting = True
        try:
            await self._start()
        except BaseException:
            # What the start opened is closed (the WAL's lock, listeners, threads): an
            # embedded node that failed to start may be started again.
            self._stopping = True
            try:
                await self._close()
            except Exception:  # noqa: BLE001 - the start's own failure is the one to report
                log.debug("closing after a failed start", exc_info=True)
            raise
        finally:
            self._starting = False
            self._start_over.set()
            logs.unbind(token)

    def _check_log_kept(self, wal_dir: str) -> None:
        """Refuse (CorruptionError, before anything is written) a data directory that ran a
        node and lost its log: started on a new one, the node would forget its entries, its
        term and its vote (and could vote twice in a term). A first start makes its log before
        its incarnation (``incarnations.json``), so a directory with one had a log."""
        s = self.settings
        if not WAL.holds_log(wal_dir) and os.path.exists(
            os.path.join(s.data_dir, INCARNATIONS_FILE)
        ):
            raise CorruptionError(
                f"{wal_dir} holds no log, but this data directory ran a node before: its "
                f"entries, term and vote are gone; {_MISSING_REMEDY}",
                wal_dir,
            )

    def _check_snapshot_kept(self, first_index: int, latest: SnapshotMeta | None) -> None:
        """Refuse (CorruptionError) a log compacted behind a snapshot that is gone: started on
        an older snapshot (or none), the node would serve a store without what the lost one
        held, or take the older one for a leader's interrupted install and drop its log."""
        snap_dir = os.path.join(self.settings.data_dir, "snap")
        compacted = first_index - 1  # the log dropped what a snapshot then held
        if compacted and (latest is None or latest.index < compacted):
            newest = "none" if latest is None else f"the newest is at {latest.index}"
            raise CorruptionError(
                f"the log starts after index {compacted}, behind a snapshot at {compacted} "
                f"or later, and {snap_dir} has no such snapshot ({newest}); {_MISSING_REMEDY}",
                snap_dir,
            )

    async def _start(self) -> None:
        s = self.settings
        wal_dir = os.path.join(s.data_dir, "wal")
        self._check_log_kept(wal_dir)
        self.wal = WAL.open(wal_dir, segment_bytes=s.wal_segment_bytes, fsync=s.fsync)
        self._wal_writer = WALWriter(self.wal)
        state = self.wal.recovered()
        state.check_terms(wal_dir)  # (a crafted log "newer" than the node's term: refused)
        self._durable_term_vote = (state.hard_state.term, state.hard_state.vote)
        self.snapshots = SnapshotStore(os.path.join(s.data_dir, "snap"))
        latest = self.snapshots.latest()
        self._check_snapshot_kept(state.log.first_index, latest)
        # A node that joins an existing cluster starts with no configuration: it learns it from
        # the leader (never bootstrap it with itself alone: it would elect itself).
        membership = None if s.join else Membership(dict(s.peers))
        if latest is not None:
            membership = self._restore(latest)
            if not log_holds(state.log, latest.index, latest.term):
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
        if s.force_new_cluster:
            index = self.raw.force_new_cluster(s.peer_address)
            log.warning(
                "node %s forced a new cluster: it is the only voter from index %d on (add the "
                "others with --join)",
                s.id,
                index,
            )
        fresh = state.log.last_index == 0 and latest is None and state.hard_state.term == 0
        self.health = Health(self, (*self.app.service_names, ADMIN_SERVICE))
        self.health.ready_from = state.hard_state.commit  # applied before SERVING
        if s.metrics_listen:
            self.metrics_server = MetricsServer(self, s.metrics_listen)
        log.info(
            "node %s starting: term %d, %d entries recovered (commit %d), fsync=%s",
            s.id,
            state.hard_state.term,
            state.log.last_index,
            state.hard_state.commit,
            s.fsync,
        )
        self._committed_members = set(self.raw.membership_at(self.applied_index).members())
        self.incarnations = Incarnations(s.data_dir, fsync=s.fsync)
        if s.force_new_cluster:  # (the others were removed: they come back anew)
            self.incarnations.forget_all()
        self.transport = PeerTransport(
            s.id,
            s.cluster_id,
            {},
            self._on_unreachable,
            self._on_refused,
            s.peer_stream,
            tls=s.peer_tls,
            incarnation=self.incarnations.own,
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
            alarm=self.app.alarm_reported,
            forward=self.app.forwarded,
            incarnations=self._check_incarnation,
            node_id=s.id,
        )
        peer_service.client_address = s.listen
        shared = s.peer_address == s.listen
        # Clients' requests are at most --max-request-bytes (plus gRPC's framing, as etcd
        # allows); a port shared with peers takes their bigger messages too.
        client_limit = tcp.MAX_RECORD_BYTES if shared else s.max_request_bytes + 512 * 1024
        authorizer = None
        shares = None
        if s.client_cert_auth:
            roles = load_roles(s.auth_roles) if s.auth_roles else None
            authorizer = Authorizer(roles, checked=True)
            shares = client_shares()
        timer = RequestTimer(self.metrics) if s.metrics_listen else None
        self.server = _server(client_limit, s.max_client_connections, authorizer, timer, shares)
        self.app.add_services(self.server, authorizer)
        register(self.server, pb, "Admin", admin)
        # (after the services: their calls find their handlers first)
        self.health.add_to(self.server)
        enable_reflection(self.server, (*self.app.service_names, ADMIN_SERVICE))
        if shared:
            register(self.server, pb, "Peer", peer_service, free=True)
        else:
            # (peers are few; the cap is headroom: with a small one, a stranger reopening
            # silent connections as gRPC drops them kept every peer's vote out)
            self.peer_server = _server(tcp.MAX_RECORD_BYTES, s.max_client_connections, None, timer)
            register(self.peer_server, pb, "Peer", peer_service, free=True)
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
                learned=self.transport.learned,
            )
            host, port = split_address(s.peer_address)
            try:
                stream_port = await self.replication_server.start(host, s.peer_stream_port)
            except OSError as exc:
                raise OSError(
                    f"cannot listen for replication on {host}:{s.peer_stream_port}: {exc}"
                ) from exc
            peer_service.stream_offset = stream_port - port
            self.transport.endpoint = pb.StreamEndpoint(
                port_offset=peer_service.stream_offset, client_address=s.listen
            )
        await self._serve_sessions(authorizer)
        if self.peer_server is not None:
            await self.peer_server.start()
            self._grpc_started.add(self.peer_server)
        await self.server.start()
        self._grpc_started.add(self.server)
        self.transport.start()
        self._follow_membership()
        self._tasks = [
            asyncio.create_task(self._ticker(), name="raftfast-ticker"),
            asyncio.create_task(self._run(), name="raftfast-run"),
            asyncio.create_task(self.app.run(), name=APP_TASK),
        ]
        log.info(
            "node %s listening on %s (clients)%s",
            s.id,
            s.listen,
            "" if shared else f", {s.peer_address} (peers)",
        )
        _warn_if_open(s)
        _warn_if_pure(s)
        if s.join and fresh:
            self._tasks.append(asyncio.create_task(self._join(), name="raftfast-join"))
        elif s.id not in self.raw.membership:
            log.warning("node %s is not a member of the cluster configuration", s.id)

    async def _serve_sessions(self, authorizer: Authorizer | None) -> None:
        """Clients' Session streams over TCP too (``--client-stream tcp``; the KV store's)."""
        s = self.settings
        service = getattr(self.app, "kv_service", None)
        if s.client_stream != "tcp" or service is None:
            return
        client_tls = s.client_tls
        self.session_server = SessionServer(
            service,
            authorizer,
            server_context(client_tls, s.client_cert_auth) if client_tls else None,
        )
        host = split_address(s.listen)[0]
        try:
            self.session_port = await self.session_server.start(host, s.client_stream_port)
        except OSError as exc:
            raise OSError(
                f"cannot listen for Session streams on {host}:{s.client_stream_port}: {exc}"
            ) from exc

    async def stop(self) -> None:
        """Graceful stop: refuse new work, let the in-flight Ready finish, close everything.
        During ``start``, once it is over (closing what it is still opening crashed the
        process: the WAL's writer freed under it)."""
        if self._starting:
            await self._start_over.wait()
        if self._stopping or self._handing_over:
            return
        await self._hand_over_leadership()
        self._stopping = True
        log.info("node %s stopping", self.id)
        await self._close()

    async def _close(self) -> None:
        """Close everything (``stop``'s part once it stops; all of a start that failed)."""
        if self.health is not None:
            self.health.shutdown()
        # (together: each waits up to its grace for the streams it serves, which never end)
        await asyncio.gather(
            *(self._stop_grpc(server) for server in (self.server, self.peer_server) if server)
        )
        for stream_server in (self.replication_server, self.session_server):
            if stream_server is not None:
                await stream_server.close()
        self._wake.set()
        for task in self._tasks:
            if task.get_name() == APP_TASK:
                # (its rounds, a disk check a second apart and the leases' expiry, have nothing
                # to finish: waiting for the next round made every stop ~0.5 s longer)
                task.cancel()
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout=5.0)
            except (TimeoutError, asyncio.CancelledError):
                task.cancel()
            except Exception:  # noqa: BLE001 - already logged by _run
                pass
        if self.transport is not None:
            await self.transport.close()
        if self._snapshot_task is not None:
            await asyncio.gather(self._snapshot_task, return_exceptions=True)
        if self._restoring is not None:  # (its file and WAL record are durable: a restart ends it)
            self._restoring.cancel()
            await asyncio.gather(self._restoring, return_exceptions=True)
        if self._restoring is None and self.failed is None:
            while self._held_commits:  # (committed: applied and answered, not failed)
                self._apply_held()
        self._fail_all(NotLeaderError("node is shutting down"))
        if self._wal_writer is not None:
            await self._wal_writer.drain()  # (its end holds the WAL's lock until the loop ends it)
            self._wal_writer.close()
        self._fsync_pool.shutdown(wait=True)
        self._snapshot_pool.shutdown(wait=True)
        if self.wal is not None:
            self.wal.close()
        if self.metrics_server is not None:
            server, self.metrics_server = self.metrics_server, None
            await asyncio.get_running_loop().run_in_executor(None, server.close)
        self.stopped.set()

    async def _stop_grpc(self, server: grpc.aio.Server) -> None:
        """Stop a gRPC server. One bound but never started (a start that failed after its
        bind) keeps its port until started: it is started to be stopped at once, or a retried
        start in this process found the port taken."""
        if server not in self._grpc_started:
            try:
                await server.start()
            except Exception:  # noqa: BLE001 - nothing bound: nothing to give back
                return
            await server.stop(None)
            return
        await server.stop(grace=0.5)

    async def _hand_over_leadership(self) -> None:
        """A leader that stops hands leadership to its most caught-up voter first, so a
        rolling restart costs the clients a hand-over (milliseconds), not an election."""
        if self.raw is None or not self.is_leader or self.failed is not None:
            return
        # (not to one we have no stream to: it is likely stopping too, as in a whole cluster)
        target = self.raw.transfer_candidate(skip=self.transport.unreachable())
        if target is None:
            return
        self._handing_over = True
        try:
            await asyncio.wait_for(
                self.transfer_leadership(target, stopping=True), self.election_timeout_s
            )
        except Exception as exc:  # noqa: BLE001 - stopping goes on whatever happened
            log.warning(
                "node %s stopping without handing leadership to %s: %s",
                self.id,
                target,
                exc if str(exc) else f"no answer within {self.election_timeout_s:g}s",
            )
        else:
            log.info("node %s handed leadership to %s before stopping", self.id, target)
        finally:
            self._handing_over = False

    @property
    def stopping(self) -> bool:
        return self._stopping

    # -- API used by the services --------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        return self.raw is not None and self.raw.role == Role.LEADER

    @property
    def restoring(self) -> bool:
        """A leader's snapshot is being restored off the loop: the state machine is the old
        one, and what is committed meanwhile waits (``SnapshotMixin._install_snapshot``)."""
        return self._restoring is not None

    async def propose(self, payloads: list[bytes]) -> list:
        """Replicate commands; returns the state machine's result for each, once applied here."""
        fut = self._queue_proposal(payloads)
        try:
            return await fut
        except Exception:
            self.metrics.proposals_failed += len(payloads)
            raise

    def submit(self, payloads: list[bytes]) -> asyncio.Future[list]:
        """``propose`` without a coroutine: the future of its results, for a caller that goes
        on in a callback (a Session frame of PUTs: no task of its own). Raises NotLeaderError
        here, as ``propose`` does."""
        fut = self._queue_proposal(payloads)
        fut.add_done_callback(functools.partial(self._count_failed, len(payloads)))
        return fut

    def _queue_proposal(self, payloads: list[bytes]) -> asyncio.Future[list]:
        self._check_leader()
        fut = asyncio.get_running_loop().create_future()
        self._proposals.append((payloads, fut))
        self._wake.set()
        self.metrics.proposals += len(payloads)
        if self._syncing and sum(map(len, payloads)) >= _FEED_WHILE_SYNCING_BYTES:
            self._big_proposal = True
            self._schedule_pump()
        return fut

    def _count_failed(self, count: int, fut: asyncio.Future) -> None:
        if not fut.cancelled() and fut.exception() is not None:
            self.metrics.proposals_failed += count

    async def read_barrier(self, mode: str) -> None:
        """Return once reading the local state machine is allowed in ``mode``."""
        if mode == "stale":
            return
        self._check_leader()
        term = self.raw.term
        if mode == "lease":
            # Within the lease of a round a quorum confirmed, no other leader can have been
            # elected: our commit index is the cluster's (raftfast/server/lease.py).
            if self._lease.holds(term):
                await self.wait_applied(self.raw.commit_index)
                return
            asked = lease.now()  # (before the round's heartbeats go out: _feed)
        fut = asyncio.get_running_loop().create_future()
        self._read_requests.append(fut)
        self._wake.set()
        await fut
        if mode == "lease":
            self._lease.confirmed(term, asked)  # (a round of a later term: no lease of it)

    async def transfer_leadership(self, target: str, *, stopping: bool = False) -> tuple[str, int]:
        """Hand leadership to ``target``; returns (leader, term) once ``target`` leads.

        Raises TimeoutError if it has not taken over within two election timeouts, or when our
        stream to it broke and the core gave the transfer up (we lead on), or, ``stopping``
        (this node's own hand-over), as soon as that stream breaks: the target is likely
        stopping too, as when a whole cluster stops."""
        self._check_transferee(target)
        if target != self.id and target in self.transport.unreachable():
            # Down, or cut off: it could not take over, and proposals would wait meanwhile.
            # (A stream being dialled again, a target just restarted, gets an election timeout.)
            loop = asyncio.get_running_loop()
            until = loop.time() + self.election_timeout_s
            while target in self.transport.unreachable():
                if loop.time() >= until:
                    raise TimeoutError(
                        f"{target} is not reachable from the leader: its stream is down"
                    )
                await asyncio.sleep(self.settings.tick_ms / 1000)
            self._check_transferee(target)  # (still, after the wait)
        self._streams_lost.discard(target)
        self._lease.spoil(self.raw.term)  # (the target's forced vote ignores leases)
        self.raw.transfer_leadership(target)
        self._wake.set()
        limit = 2 * self.election_timeout_s
        deadline = asyncio.get_running_loop().time() + limit
        while self.raw.leader != target:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise TimeoutError(f"{target} did not take over within {limit:g}s")
            if target in self._streams_lost and (
                stopping or (self.raw.leader == self.id and self.raw.transferee != target)
            ):
                raise TimeoutError(f"our stream to {target} broke (stopping?): no hand-over")
            self._leader_changed.clear()
            try:
                await asyncio.wait_for(self._leader_changed.wait(), remaining)
            except TimeoutError:
                pass
        return target, self.raw.term

    def _check_transferee(self, target: str) -> None:
        """We lead, and ``target`` is a voter that could."""
        self._check_leader()
        if target not in self.raw.membership.voters:
            raise ValueError(f"{target!r} is not a voter")

    async def leader_soon(self, timeout: float) -> str | None:
        """The leader's id, for a redirect. While an election is on, or while the leader we
        know has been silent for a few heartbeats (it may be dead: sending clients there would
        waste their time), wait up to ``timeout`` for the outcome."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        tick = self.settings.tick_ms / 1000
        while not self._stopping and not self._leader_credible():
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            await asyncio.sleep(min(tick, remaining))  # (only while leaderless: rare)
        return None if self._stopping else self.raw.leader or None

    def _leader_credible(self) -> bool:
        """We know a leader, and heard from it within a few heartbeats."""
        silent = self.raw.leader_silent_ticks
        return bool(self.raw.leader) and silent <= 3 * self.settings.heartbeat_ticks

    @property
    def election_timeout_s(self) -> float:
        return self.settings.election_ticks * self.settings.tick_ms / 1000

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
            first_index=self.raw.first_index,
            snapshot_index=self._snapshot_index,
            version=__version__,
            session_port=self.session_port,
            **self.app.status_fields(),
        )

    # -- internals -----------------------------------------------------------------------------

    def _check_leader(self) -> None:
        if self._stopping or self.failed is not None:
            # After a fatal error _run is gone: work queued now would wait for stop() instead
            # of failing at once (and a client would see CANCELLED, not a retryable error).
            raise NotLeaderError("node is shutting down")
        raw = self.raw
        if raw.role != Role.LEADER:
            raise NotLeaderError(leader_id=raw.leader or None)

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
        if self._syncing:
            self._schedule_pump()

    def _on_unreachable(self, peer: str) -> None:
        if self.raw is not None:
            self.raw.report_unreachable(peer)
            self._streams_lost.add(peer)  # (peers only: a few ids)
            self._leader_changed.set()  # (a transfer to it is given up)

    async def _ticker(self) -> None:
        interval = self.settings.tick_ms / 1000
        health = self.health
        while not self._stopping:
            await asyncio.sleep(interval)
            self.raw.tick()
            if self.raw.raft.foreign_acks:
                self._say_foreign_acks()
            # A leader's heartbeats go out now, not after a sync that _run may be awaiting.
            eager = self.raw.take_eager_messages()
            if eager:
                self.transport.send(eager)
            self._wake.set()
            health.update()

    def _say_foreign_acks(self) -> None:
        """A follower acknowledged entries past the end of our log (``Raft.foreign_acks``): it
        holds another cluster's state and never catches up; say so, once a minute a follower
        (it was only seen as a follower stuck at match 0)."""
        now = time.monotonic()
        acks = self.raw.raft.foreign_acks
        for peer, (index, ours) in acks.items():
            if now - self._foreign_said.get(peer, -FOREIGN_SAID_EVERY_S) >= FOREIGN_SAID_EVERY_S:
                self._foreign_said[peer] = now
                log.error(
                    "node %s: %s answered that it holds entries through %d, past the end of "
                    "this leader's log (%d then): its state is not this cluster's (did the "
                    "founding nodes restore different backups?); its answers are ignored: "
                    "remove it and add it back with an empty data directory "
                    "(docs/operations.md)",
                    self.id,
                    peer,
                    index,
                    ours,
                )
        acks.clear()

    async def _run(self) -> None:
        try:
            while not self._stopping or self.raw.has_ready():
                if (
                    not self.raw.has_ready()
                    and not self._proposals
                    and not self._reads_to_start()
                    and not self._apply_due()
                ):
                    self._wake.clear()
                    await self._wake.wait()
                    if self._stopping:
                        break
                if self._apply_due():
                    self._apply_held()
                    await asyncio.sleep(0)  # (the loop's other work between two slices)
                if self._compact_to:
                    await self._compact_log()
                if self._release_at_rest:
                    self._release_memory_at_rest()
                self._feed()
                if self.raw.has_ready():
                    await self._handle_ready(self.raw.ready())
        except Exception as exc:  # noqa: BLE001 - a storage failure must stop the node
            self._fatal(exc)

    def _fatal(self, exc: BaseException) -> None:
        """A failure the node cannot go on after (a disk that failed): stop."""
        if self.failed is not None:
            return
        self.failed = exc
        log.critical("node %s stopping after a fatal error: %s", self.id, exc)
        self._fail_all(NotLeaderError(f"node failed: {exc}"))
        asyncio.get_running_loop().call_soon(lambda: asyncio.create_task(self.stop()))

    def _reads_to_start(self) -> bool:
        """Linearizable reads wait and no read round is under way: one may start. One round
        at a time, as etcd's read loop does: reads that come while a round confirms the
        leadership go together in the next, instead of a heartbeat round each (at 1x64 etcd
        Ranges, ~a round per read: every read paid two heartbeats, two answers and a wake of
        each follower). A round whose heartbeats or answers were lost is confirmed by the
        next tick's heartbeats, which carry its number. (The core's own list of waiting reads
        decides: a change of role empties it, so a round it dropped never holds later reads.)"""
        return bool(self._read_requests) and not self.raw.reads_waiting()

    def _feed(self) -> None:
        """Hand queued proposals, and reads if no read round is under way, to the core, as
        one batch each."""
        self._feed_proposals()
        if self._reads_to_start():
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
                self.metrics.read_rounds += 1
                self.metrics.reads += len(waiters)

    def _feed_proposals(self, fed: str = "after_sync") -> None:
        """``fed``: when, for the metric (``_pump`` feeds while the leader's write syncs)."""
        if self._proposals:
            batch, self._proposals = self._proposals, []
            self._big_proposal = False
            payloads = [p for ps, _ in batch for p in ps]
            try:
                first, _last = self.raw.propose(payloads)
                self._proposed_since_notice = True
            except NotLeaderError as exc:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(NotLeaderError(str(exc), exc.leader_id))
            else:
                self.metrics.proposal_batches[fed] += 1
                term = self.raw.term
                for ps, fut in batch:
                    self._waiting_writes.append(_Waiting(first, first + len(ps) - 1, term, fut))
                    first += len(ps)

    def _notify_commit(self) -> None:
        """See _COMMIT_NOTICE_S: unless an append went out since the newest commit (it carries
        the commit index), or that commit is younger than _COMMIT_NOTICE_S: then wait for the
        rest of it. (Counted from the first commit, one sequential put in six cost a heartbeat
        round to both followers: its append came ~1 ms after the commit before, the notice 2 ms
        after the one before that.)"""
        self._commit_notice = None
        if self._proposed_since_notice or not self.is_leader or self._stopping:
            return
        loop = asyncio.get_running_loop()
        wait = self._committed_at + _COMMIT_NOTICE_S - loop.time()
        if wait > 0:
            self._commit_notice = loop.call_later(wait, self._notify_commit)
            return
        self.raw.heartbeat_now()
        self._wake.set()

    async def _handle_ready(self, rd: Ready) -> None:
        self.transport.send(rd.eager_messages)
        if rd.snapshot is not None:
            await self._install_snapshot(rd.snapshot)
        hs = rd.hard_state
        applied = False
        if hs is not None or rd.entries:
            self.wal.append(hs, rd.entries or None)
            # Entries, term and vote must be durable before anything is sent; the commit
            # index need not be (a restart relearns it from the leader), so a Ready that only
            # moves it does not wait for a sync: its record rides on the next one. That keeps
            # an fdatasync and a thread hand-off off every write's critical path.
            if rd.entries or (hs is not None and (hs.term, hs.vote) != self._durable_term_vote):
                # A StorageError propagates: _run stops the node (never retry-and-pretend).
                started = time.perf_counter()
                if self._sync_inline(len(rd.entries)):
                    self.wal.sync()  # group commit: one write, one fdatasync
                else:
                    # RAFTFAST_FAULT_DISK_DELAY_MS (tests only) gives followers a slow, jittery
                    # disk: each write starts up to that much later, which widens any window
                    # in which a follower acknowledges before writing.
                    delay = 0.0
                    if _FAULT_DISK_DELAY and self.raw.role != Role.LEADER:
                        delay = random.uniform(0, _FAULT_DISK_DELAY)
                    syncing = self._wal_writer.start(delay)
                    try:
                        if self.is_leader:
                            # What is committed is durable on a quorum already (the leader
                            # counts its own copy only once synced): a leader applies it, and
                            # answers its clients, while its disk syncs the entries of this
                            # Ready. (Not a follower: its acknowledgements, the leader's
                            # commit, wait for this sync, and must not wait for an apply too.)
                            if rd.committed is not None:
                                self._apply_committed(rd.committed)
                            applied = True
                            # Meanwhile what the followers' acknowledgements commit is
                            # applied and answered at once, not after this sync (_pump).
                            self._syncing = True
                    finally:
                        try:
                            if syncing is not None:
                                await syncing
                        finally:
                            self._syncing = False
                self._last_sync_s = time.perf_counter() - started
                self.metrics.wal_sync.observe(self._last_sync_s)
                if hs is not None:
                    self._durable_term_vote = (hs.term, hs.vote)
        for m in rd.messages:
            if m.type == MsgType.SNAPSHOT:
                send = asyncio.create_task(self._send_snapshot(m))
                self._snapshot_sends.add(send)
                send.add_done_callback(self._snapshot_sends.discard)
        self.transport.send([m for m in rd.messages if m.type != MsgType.SNAPSHOT])
        if rd.committed is not None and not applied:
            self._apply_committed(rd.committed)
        for request_id, index in rd.read_states:
            for fut in self._reads_by_id.pop(request_id, []):
                self._reads_at.append((index, fut))
        self._release_reads()
        if rd.soft_state is not None:
            self._on_role_change(*rd.soft_state)
        self._follow_membership()
        self.raw.advance(rd)
        busy = self._snapshot_lock.locked() or (
            self._snapshot_task is not None and not self._snapshot_task.done()
        )
        if not (busy or self._compact_to) and self._snapshot_due():
            self._start_snapshot()

    def _schedule_pump(self) -> None:
        if not self._pump_scheduled:
            self._pump_scheduled = True
            asyncio.get_running_loop().call_soon(self._pump)

    def _pump(self) -> None:
        """While the leader's own write syncs: apply what the followers' acknowledgements
        committed (all that arrived in one turn of the loop), and send the appends they let
        out (the core allows both while a Ready is out). New proposals wait for the next
        Ready unless one is big (_FEED_WHILE_SYNCING_BYTES): handing each to the core as it
        came cost a frame to every follower per write, and through etcd's API 1x256 went from
        ~2,000 to ~1,200 puts/s (no gain at 8x1)."""
        self._pump_scheduled = False
        if not self._syncing or self._stopping:
            return
        try:
            if self._big_proposal:
                self._feed_proposals("while_syncing")
            eager = self.raw.take_eager_messages()
            if eager:
                self.transport.send(eager)
            committed = self.raw.take_committed()
            if committed is not None:
                self._apply_committed(committed)
                self._release_reads()
        except Exception as exc:  # noqa: BLE001 - as in _run: a failure here stops the node
            self._fatal(exc)

    def _apply_committed(self, committed: Committed) -> None:
        self._apply(committed)
        if self.is_leader:
            # (no append has carried this commit index yet: one sent from now on will)
            self._proposed_since_notice = False
            loop = asyncio.get_running_loop()
            self._committed_at = loop.time()
            if self._commit_notice is None:
                self._commit_notice = loop.call_later(_COMMIT_NOTICE_S, self._notify_commit)

    # -- snapshots -----------------------------------------------------------------------------

    def _sync_inline(self, size: int) -> bool:
        if self.raw.role == Role.LEADER and len(self.raw.membership.voters) > 1:
            return False  # (see _INLINE_SYNC_BYTES)
        return (
            size <= _INLINE_SYNC_BYTES
            and len(self._waiting_writes) <= 1
            and self._last_sync_s < _SLOW_SYNC_S
            and not _FAULT_DISK_DELAY
            and self.transport.all_direct()
        )

    def _apply(self, committed: Committed) -> None:
        """Apply ``committed`` now, as much of it as _APPLY_SLICE_S allows: the rest, and what
        comes after it, is held and applied in later turns of the loop (as everything
        committed while a leader's snapshot is restored: after it)."""
        if self._restoring is not None or self._held_commits:
            self._held_commits.append(committed)  # (in order: after what is held already)
            return
        rest = self._apply_slice(committed, time.perf_counter() + _APPLY_SLICE_S)
        if rest is not None:
            self._held_commits.append(rest)
            self._wake.set()  # (_run goes on with it after a turn of the loop)

    def _apply_due(self) -> bool:
        return bool(self._held_commits) and self._restoring is None

    def _apply_held(self) -> None:
        """A slice of the held entries (see _APPLY_SLICE_S), and the reads they let go. The
        slice grows with what is held, up to ten: a node whose applies fall behind what it
        acknowledges gives them more of its time (the held entries, and the log they keep,
        do not grow for good; applied at once, it acknowledged nothing meanwhile)."""
        deadline = time.perf_counter() + _APPLY_SLICE_S * min(len(self._held_commits), 10)
        held = self._held_commits
        while held and self._restoring is None:
            rest = self._apply_slice(held.pop(0), deadline)
            if rest is not None:
                held.insert(0, rest)
                break
        self._release_reads()

    def _apply_slice(self, committed: Committed, deadline: float) -> Committed | None:
        """Apply ``committed`` part by part until ``deadline``; the entries left, if any. The
        first part is one entry; each next one is as many entries, and bytes, as the part
        before it says fit in half the time left (entries of a batch cost alike, mostly: a
        command's cost is not known before it is applied)."""
        first, terms, types, payloads = committed
        count = len(types)
        if count == 1:
            self._apply_part(committed)
            return None
        start, most_entries, most_bytes = 0, 1, 0
        while True:
            end, size = start + 1, len(payloads[start])
            while end < count and end - start < most_entries:
                more = len(payloads[end])
                if size + more > most_bytes:
                    break
                size += more
                end += 1
            began = time.perf_counter()
            if start == 0 and end == count:
                self._apply_part(committed)
            else:
                part = terms[start:end], types[start:end], payloads[start:end]
                self._apply_part(Committed(first + start, *part))
            now = time.perf_counter()
            if end == count:
                return None
            if now >= deadline:
                return Committed(first + end, terms[end:], types[end:], payloads[end:])
            grow = (deadline - now) / max(now - began, 1e-6) / 2
            most_entries = max(int((end - start) * grow), 1)
            most_bytes = int(max(size, 1) * grow)
            start = end

    def _apply_part(self, committed: Committed) -> None:
        """Commands to the state machine (in runs of consecutive ones: all of them, but for a
        leader's no-op or a configuration now and then); configurations to the membership."""
        first, terms, types, payloads = committed
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
        self.app.applied()

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

    def _release_reads(self) -> None:
        applied = self.applied_index
        if self._reads_at:
            ready = [f for i, f in self._reads_at if i <= applied]
            self._reads_at = [(i, f) for i, f in self._reads_at if i > applied]
            for fut in ready:
                if not fut.done():
                    fut.set_result(None)

    def learn_commit(self, index: int, term: int) -> None:
        """The leader said entry ``index`` of ``term`` is committed (RawNode.learn_commit):
        applied with the next Ready, not at the leader's next append or heartbeat."""
        if self.raw is not None and not self._stopping and self.raw.learn_commit(index, term):
            self._wake.set()

    async def wait_applied(self, index: int) -> None:
        """Until this node has applied ``index``."""
        if self.applied_index >= index:
            return
        fut = asyncio.get_running_loop().create_future()
        self._reads_at.append((index, fut))
        await fut

    def _on_role_change(self, role: Role, leader: str) -> None:
        self._leader_changed.set()
        if leader and leader != self._last_leader:
            self.metrics.leader_changes += 1
        self._last_leader = leader
        term, reason = self.raw.term, self.raw.reason
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
            # (not those committed: their entries wait to be applied, in a later slice or
            # Ready, and are answered then: failed, a retry without an id applied twice)
            committed = self.raw.commit_index
            still = []
            for waiting in self._waiting_writes:
                if waiting.last <= committed:
                    still.append(waiting)
                elif not waiting.fut.done():
                    waiting.fut.set_exception(err)
            self._waiting_writes = still
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
        self._big_proposal = False
        self._reads_at, self._reads_by_id = [], {}


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


def client_shares() -> ClientShares:
    """What one client certificate may hold of the client port: a quarter of its calls and of
    each node-wide bound on streams."""
    from raftfast.etcd.services import MAX_KEEPALIVE_STREAMS
    from raftfast.etcd.watch import MAX_WATCH_STREAMS

    bounds = {  # (Session streams: shared out by the KV service, which can end idle ones)
        "/etcdserverpb.Watch/Watch": MAX_WATCH_STREAMS,
        "/etcdserverpb.Lease/LeaseKeepAlive": MAX_KEEPALIVE_STREAMS,
        "/grpc.health.v1.Health/Watch": MAX_HEALTH_WATCHES,
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": MAX_REFLECTION_STREAMS,
    }
    return ClientShares(
        MAX_CONCURRENT_RPCS // 4, {method: max(1, most // 4) for method, most in bounds.items()}
    )


def _server(
    max_message_bytes: int,
    max_connections: int,
    authorizer: Authorizer | None = None,
    timer: RequestTimer | None = None,
    shares: ClientShares | None = None,
) -> grpc.aio.Server:
    # No SO_REUSEPORT (gRPC's default): a second process on our port must fail to start, not
    # silently share the port with us. The timer comes after the role check: it is handed the
    # services' own handlers (the same each call), whose timed twins it keeps. Connections
    # are capped (past the cap gRPC closes new ones at once) and one that has not finished its
    # TLS and HTTP/2 handshakes in GRPC_HANDSHAKE_MS is closed (gRPC's default: 120 s), so
    # that a stranger's idle connections cannot hold every descriptor the node has.
    quiet_answers_not_sent()
    # The role check outermost: a caller without the method's role is refused at a call's
    # start, before its request is waited for (ArrivalLimit); the timer times the service's
    # own handler, once the request is there.
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if authorizer is not None:
        interceptors.append(RoleInterceptor(authorizer, shares))
    interceptors.append(ArrivalLimit())
    if timer is not None:
        interceptors.append(timer)
    return grpc.aio.server(
        interceptors=interceptors,
        maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
        options=[
            ("grpc.max_send_message_length", tcp.MAX_RECORD_BYTES),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),
            ("grpc.max_concurrent_streams", _MAX_STREAMS_PER_CONNECTION),
            # No compressed requests (UNIMPLEMENTED, "Compression algorithm 'gzip' is
            # disabled."; no client of ours or etcd's compresses): a 64 KB gzip body is a
            # 63 MiB request once inflated, and 32 such calls on one connection took a
            # leader from 91 MB to 2.5 GB, and its term.
            ("grpc.compression_enabled_algorithms_bitset", _IDENTITY_ONLY),
            ("grpc.max_allowed_incoming_connections", max_connections),
            ("grpc.server_handshake_timeout_ms", GRPC_HANDSHAKE_MS),
            # A connection whose client vanished without closing it (a host lost, a NAT that
            # forgot it) is closed once a ping goes unanswered, and its streams give back
            # their places (gRPC's default: a ping after 2 hours).
            ("grpc.keepalive_time_ms", KEEPALIVE_PING_MS),
            ("grpc.keepalive_timeout_ms", KEEPALIVE_PING_MS // 3),
            ("grpc.http2.ping_timeout_ms", KEEPALIVE_PING_MS // 3),  # (what this gRPC reads)
            ("grpc.http2.max_pings_without_data", 0),
            # Clients' keep-alive pings are taken every 5 s, as etcd's
            # --grpc-keepalive-min-time (gRPC's default: 5 minutes): clientv3 pings every 10 s
            # at the fastest, and its watches were cut by GOAWAY too_many_pings. As etcd's, a
            # connection with no call open may not ping (gRPC's default: 2 hours).
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
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


def _warn_if_pure(s: NodeSettings) -> None:
    """A build without a C compiler installs the pure-Python twins, and pip shows no word of
    it (a wheel without its compiled modules, tagged as one with them): say so where an
    operator looks, unless they were asked for (RAFTFAST_PUREPYTHON)."""
    if not COMPILED and not os.environ.get("RAFTFAST_PUREPYTHON"):
        log.warning(
            "node %s runs raftfast's pure-Python modules: its compiled ones were not built "
            "(no C compiler at install?), and it is several times slower; reinstall where gcc "
            "is (docs/operations.md, Installing)",
            s.id,
        )


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
    node = Driver(settings, state_machine)
    await node.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.create_task(node.stop()))
    await node.stopped.wait()
    if node.failed is not None:
        raise node.failed
