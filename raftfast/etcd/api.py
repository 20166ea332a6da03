"""The etcd v3 API's requests, served on top of a raftfast node.

Every request a client can send to any member is answered here as etcd answers it:

* writes (Put, DeleteRange, Txn, Compact, LeaseGrant, LeaseRevoke) become log entries
  (``raftfast.etcd.mvcc`` commands) proposed by the leader; linearizable Ranges wait for the
  leader's read barrier; leases' keep-alives and time-to-live are the leader's (it decides
  expiry); membership changes and MoveLeader are the leader's too. A follower hands these to the
  leader over the peer connection (``Forward``: mutually authenticated under TLS) and relays the
  answer, so a client may talk to any member, as with etcd;
* serializable Ranges, Txns of serializable Ranges only (or of no operation), MemberList,
  Status, Alarm (GET), HashKV and Defragment are answered by the member asked, from its own
  state.

A request the member cannot get done (no leader, a leader it cannot reach) is given up after
etcd's request timeout (``_REQUEST_TIMEOUT_S``), whatever the client's deadline. A call whose
metadata asks for a leader ("hasleader") is refused when the member knows none
(``raftfast.etcd.require_leader``).

Errors are ``EtcdError`` with etcd's code and message. ``handle(method, request)`` is the one
entry point, for the gRPC services and for requests forwarded by a follower.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import re
import zlib
from bisect import bisect_right
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import grpc

from raftfast.errors import AddressTakenError, NotLeaderError
from raftfast.etcd import errors
from raftfast.etcd.errors import EtcdError
from raftfast.etcd.mvcc import (
    MAX_LEASE_TTL,
    MAX_TXN_DEPTH,
    MVCCStore,
    Record,
    encode,
    fill_kv,
    kv_pb,
)
from raftfast.etcd.require_leader import LeaderRequired
from raftfast.kv.commands import NOSPACE, OP_ETCD
from raftfast.limits import check_node_id
from raftfast.proto.etcd import rpc_pb2 as pb

if TYPE_CHECKING:
    from raftfast.server.driver import Driver

__all__ = ["API_VERSION", "EtcdAPI", "member_id"]

log = logging.getLogger(__name__)

API_VERSION = "3.5.0"  # the etcd version whose API this serves (Status.version)
MAX_TXN_OPS = 128  # per branch of a Txn (etcd's --max-txn-ops default)
# In all, nested txns included (etcd has no such bound: 16 levels of 128 are 10^33; the request
# size alone let 117,000 puts in, 0.8 s of checks on the leader's loop and as long to apply)
MAX_TXN_TOTAL_OPS = 4096
# Keys one lease may hold (a put that would attach one more is refused): revoking a lease
# deletes all its keys in one entry, applied at once on every node, and LeaseTimeToLive lists
# them all: 500,000 keys held each node's loop 4 s (elections) and made answers of 6 MB.
# Kubernetes attaches at most 1,000 (its --lease-max-object-count). Checked when a write is
# proposed, not applied: an old log replays as it was written.
MAX_LEASE_KEYS = 10_000
# Keys one write (a DeleteRange, or all the deletes of a Txn's branches) may delete: every node
# deletes them in one apply, ~4 us a key here with its history event, and a DeleteRange of
# 500,000 keys held every node ~2 s (elections; etcd has no bound). Counted on the leader's
# state when it is proposed, like the lease bound (an old log replays as written).
MAX_DELETE_KEYS = 50_000
# Leases a cluster holds (a grant past it is refused, counted on the applied state when it is
# asked: grants at the same moment may pass it by as many). The leader's lessor looks at every
# lease when the set changes and every 0.1 s for expiry: unbounded, 100,000 leases were granted
# at only ~700 a second, and millions would hold the leader's loop (a hostile hunt).
MAX_LEASES = 100_000
# Records one Txn's ranges and compares may look at (its ranges read at an old revision count
# the history's events since too): a Txn is applied at once on every node, and one that read 300,000
# keys held each ~0.7 s (etcd has no bound; a Range outside a Txn is answered in parts, on
# the node asked only). Counted on the leader's state when proposed (an old log replays as
# written).
MAX_TXN_READ_KEYS = 50_000
_REQUEST_TIMEOUT_S = 7.0  # etcd's: 5 s + 2 election timeouts (about)
_ANSWER_MARGIN_S = 0.5  # a forwarded request's answer goes this early, at the latest
# Requests a follower forwards again when the leader could not be reached (it may have done
# them): they change nothing, or nothing twice (a keep-alive renews the lease again).
_SAFE_TO_REPEAT = frozenset(
    ("KV/Range", "Lease/LeaseKeepAlive", "Lease/LeaseTimeToLive", "Lease/LeaseLeases")
)
_OP_ETCD = bytes((OP_ETCD,))


def id64(text: str) -> int:
    """A stable, non-zero 64-bit id for ``text`` (a node id, a cluster id)."""
    value = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
    return value or 1


def member_id(node_id: str) -> int:
    """The etcd member id of raftfast node ``node_id`` (the same on every node, every run)."""
    return id64("member:" + node_id)


class EtcdAPI:
    """The etcd requests of one node (see the module docs)."""

    def __init__(self, driver: Driver) -> None:
        self.driver = driver
        self.cluster_id = id64("cluster:" + driver.settings.cluster_id)
        self.member_id = member_id(driver.id)
        self.applied = asyncio.Event()  # set after every apply (see _caught_up)
        # Reads of many records in steps at once (each holds its records meanwhile)
        self._stepped_reads = asyncio.Semaphore(_STEPPED_READS)
        from raftfast.etcd.lessor import Lessor  # (it needs this class's instance)

        self.lessor = Lessor(self)
        self.leader_required = LeaderRequired(driver)  # (etcd's "hasleader" metadata)
        # method -> (request class, response class, handler, served by the leader)
        self.methods: dict[str, tuple[type, type, Callable[[Any], Awaitable[Any]], bool]] = {
            "KV/Range": (pb.RangeRequest, pb.RangeResponse, self._range, True),
            "KV/Put": (pb.PutRequest, pb.PutResponse, self._put, True),
            "KV/DeleteRange": (pb.DeleteRangeRequest, pb.DeleteRangeResponse, self._delete, True),
            "KV/Txn": (pb.TxnRequest, pb.TxnResponse, self._txn, True),
            "KV/Compact": (pb.CompactionRequest, pb.CompactionResponse, self._compact, True),
            "Lease/LeaseGrant": (pb.LeaseGrantRequest, pb.LeaseGrantResponse, self._grant, True),
            "Lease/LeaseRevoke": (
                pb.LeaseRevokeRequest,
                pb.LeaseRevokeResponse,
                self._revoke,
                True,
            ),
            "Lease/LeaseKeepAlive": (
                pb.LeaseKeepAliveRequest,
                pb.LeaseKeepAliveResponse,
                self._keep_alive,
                True,
            ),
            "Lease/LeaseTimeToLive": (
                pb.LeaseTimeToLiveRequest,
                pb.LeaseTimeToLiveResponse,
                self._time_to_live,
                True,
            ),
            "Lease/LeaseLeases": (
                pb.LeaseLeasesRequest,
                pb.LeaseLeasesResponse,
                self._leases,
                True,
            ),
            "Cluster/MemberAdd": (pb.MemberAddRequest, pb.MemberAddResponse, self._add, True),
            "Cluster/MemberRemove": (
                pb.MemberRemoveRequest,
                pb.MemberRemoveResponse,
                self._remove,
                True,
            ),
            "Cluster/MemberPromote": (
                pb.MemberPromoteRequest,
                pb.MemberPromoteResponse,
                self._promote,
                True,
            ),
            "Cluster/MemberList": (
                pb.MemberListRequest,
                pb.MemberListResponse,
                self._member_list,
                False,
            ),
            "Maintenance/Alarm": (pb.AlarmRequest, pb.AlarmResponse, self._alarm, True),
            "Maintenance/Status": (pb.StatusRequest, pb.StatusResponse, self._status, False),
            "Maintenance/Defragment": (
                pb.DefragmentRequest,
                pb.DefragmentResponse,
                self._defragment,
                False,
            ),
            "Maintenance/Hash": (pb.HashRequest, pb.HashResponse, self._hash, False),
            "Maintenance/HashKV": (pb.HashKVRequest, pb.HashKVResponse, self._hash_kv, False),
            "Maintenance/MoveLeader": (
                pb.MoveLeaderRequest,
                pb.MoveLeaderResponse,
                self._move_leader,
                True,
            ),
        }

    @property
    def store(self) -> MVCCStore:
        return self.driver.fsm.etcd

    def header(self, revision: int | None = None) -> pb.ResponseHeader:
        return pb.ResponseHeader(
            cluster_id=self.cluster_id,
            member_id=self.member_id,
            revision=self.store.revision if revision is None else revision,
            raft_term=self.driver.raw.term,
        )

    # -- the entry point --------------------------------------------------------------------

    async def handle(self, method: str, request: Any, timeout: float | None = None) -> Any:
        """Answer ``request`` (of etcdserverpb ``method``, e.g. "KV/Put") here or at the
        leader: the response, or its bytes (a big Range's; the leader's answer); raises
        EtcdError."""
        _, _, handler, at_leader = self.methods[method]
        self.check_request(method, request)
        _gte_where_empty(method, request)
        if not at_leader or self._local(method, request):
            return await handler(request)
        loop = asyncio.get_running_loop()
        # (as etcd's: a request it cannot get done is given up after its request timeout,
        # UNAVAILABLE, which clients retry, whatever the client's deadline; a shorter one wins)
        budget = _REQUEST_TIMEOUT_S if timeout is None else min(timeout, _REQUEST_TIMEOUT_S)
        deadline = loop.time() + budget
        # (the answer of a request done at the leader must reach the client before its
        # deadline, even if this member never catches up: a member its peers refused answered
        # a write done with "context deadline exceeded")
        answer_by = deadline - min(_ANSWER_MARGIN_S, budget / 10)
        driver = self.driver
        while True:
            if driver.stopping:
                raise errors.STOPPED
            if driver.is_leader:
                try:
                    return await handler(request)
                except NotLeaderError:
                    raise errors.LEADER_CHANGED from None
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise errors.NO_LEADER if not driver.raw.leader else errors.TIMEOUT
            leader = await driver.leader_soon(min(remaining, driver.election_timeout_s))
            if leader is None or leader == driver.id:
                continue  # (an election under way; or we lead now)
            try:
                data, applied = await driver.transport.forward(
                    leader, method, request.SerializeToString(), max(remaining, 0.05)
                )
            except EtcdError as exc:
                lost = exc.code_name == "UNAVAILABLE" and method in _SAFE_TO_REPEAT
                if exc == errors.NOT_LEADER or lost:
                    # (NOT_LEADER: refused before anything was done; lost: the leader went
                    # away, and this request may be done again: at the next leader, as etcd's
                    # member waits for one. A keep-alive failed at once, and the client's
                    # keep-alive task ended, its lease's keys deleted when it expired.)
                    await asyncio.sleep(min(0.05, max(deadline - loop.time(), 0)))
                    continue
                raise
            await self._caught_up(applied, answer_by)
            return data  # (the leader's answer as it came: parsed by the client, not here)

    async def _caught_up(self, index: int, deadline: float) -> None:
        """Wait (until ``deadline``) for this member to apply up to ``index``, the leader's
        applied index once it answered a forwarded request: as etcd's member that took a
        request answers once it applied it itself, so that what the client does next here (a
        watch from the write's revision, a serializable read, an alarm list) sees it."""
        loop = asyncio.get_running_loop()
        applied = self.applied
        while self.driver.applied_index < index and not self.driver.stopping:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return  # (the request is done at the leader: answer it anyway)
            applied.clear()  # (no await between the check and the wait: no apply is missed)
            try:
                async with asyncio.timeout(remaining):
                    await applied.wait()
            except TimeoutError:
                return

    async def handle_forwarded(self, method: str, data: bytes) -> bytes:
        """A request a follower handed us: answered here, as leader (EtcdError NOT_LEADER
        if we are not, before anything is done)."""
        entry = self.methods.get(method)
        if entry is None:
            raise EtcdError(grpc.StatusCode.UNIMPLEMENTED, f"unknown method {method[:100]!r}")
        request_cls, _, handler, _ = entry
        request = request_cls()
        try:
            request.ParseFromString(data)
        except Exception:  # noqa: BLE001 - a malformed message from a member: say so
            raise errors.invalid("malformed forwarded request") from None
        self.check_request(method, request)
        if not self.driver.is_leader:
            raise errors.NOT_LEADER
        try:
            response = await handler(request)
        except NotLeaderError:
            raise errors.LEADER_CHANGED from None
        except EtcdError:
            raise
        except Exception as exc:  # noqa: BLE001 - the follower relays INTERNAL, never UNKNOWN
            log.error("forwarded etcd %s failed", method, exc_info=exc)
            raise EtcdError(
                grpc.StatusCode.INTERNAL, f"etcdserver: internal error: {exc!r}"[:300]
            ) from None
        return response if isinstance(response, bytes) else response.SerializeToString()

    def _local(self, method: str, request: Any) -> bool:
        """Served from this node's own state (a serializable read or txn, the alarms
        raised)."""
        if method == "KV/Range":
            return request.serializable
        if method == "KV/Txn":
            return _serializable_txn(request)
        return method == "Maintenance/Alarm" and request.action == pb.AlarmRequest.GET

    # -- validation at the boundary ---------------------------------------------------------

    def check_request(self, method: str, request: Any) -> None:
        """EtcdError for what etcd refuses before proposing, and for values raftfast cannot
        hold: too large, too many txn ops, duplicate keys in a txn, an empty key."""
        settings = self.driver.settings
        if request.ByteSize() > settings.max_request_bytes:
            raise errors.REQUEST_TOO_LARGE
        if method == "KV/Put":
            _check_put(request)
        elif method in ("KV/Range", "KV/DeleteRange"):
            if not request.key:
                raise errors.EMPTY_KEY
        elif method == "KV/Txn":
            _check_txn(request, 0)
        elif method == "Lease/LeaseGrant":
            if request.TTL > MAX_LEASE_TTL:
                raise errors.LEASE_TTL_TOO_LARGE
            if len(self.store.leases) >= MAX_LEASES:
                raise errors.too_many_leases(MAX_LEASES)

    # -- KV ---------------------------------------------------------------------------------

    async def _range(self, request: pb.RangeRequest) -> pb.RangeResponse | bytes:
        """A Range's answer; one of more than ``_PART`` records as the message's bytes, sized,
        made into messages and serialized a part at a time, the loop let go between parts
        (1,000,000 keys sized at once, then serialized by gRPC, held it ~0.2 s: three such
        reads at once cost the leader its term)."""
        if not request.serializable:
            await self.driver.read_barrier("linearizable")
        response, records = await self._read(request)
        # (the revision read, not the store's after the parts below: a client lists, then
        # watches from header.revision + 1, and would miss writes made meanwhile)
        response.header.CopyFrom(self.header(response.header.revision))
        keys_only = request.keys_only
        if len(records) <= _PART:  # (the usual: no async generator for a key or a few)
            _check_answer_size(_answer_bytes(records, keys_only))
            _add_kvs(response, records, keys_only)
            return response
        size = 0
        async for part in _parts(records):
            size += _answer_bytes(part, keys_only)
        _check_answer_size(size)
        pieces = [response.SerializeToString()]  # (fields in any order: kvs come after)
        async for part in _parts(records):
            answer = pb.RangeResponse()
            _add_kvs(answer, part, keys_only)
            pieces.append(answer.SerializeToString())
        return b"".join(pieces)

    async def _read(self, request: pb.RangeRequest) -> tuple[pb.RangeResponse, list[Record]]:
        """``store.range_records(request)``; one that reads many records (an old revision,
        a big range) a part at a time, the loop let go between parts (``read_steps``)."""
        store = self.store
        steps = store.read_steps(request)
        if steps is None:  # (the everyday read)
            return store.range_records(request)
        async with self._stepped_reads:
            # (the header's revision: the store's at the first step, as etcd's read txn's)
            read_at = store.revision
            view = next(steps)
            while view is None:
                await asyncio.sleep(0)
                view = next(steps)
            for answer in store.range_records_steps(request, view=view):
                if answer is None:
                    await asyncio.sleep(0)
                    continue
                response, records = answer
                response.header.revision = read_at
                return response, records
            raise AssertionError("range_records_steps ended without an answer")

    async def write(self, request: Any) -> Any:
        """Propose an etcd write and return its response (header filled), or raise its
        EtcdError. Only on the leader (NotLeaderError otherwise)."""
        if isinstance(request, pb.PutRequest | pb.TxnRequest):
            self._check_lease_room(request)
        if isinstance(request, pb.DeleteRangeRequest | pb.TxnRequest):
            self._check_work(request)
        quota = self.driver.quota
        if quota is not None and _grows(request):
            why = quota.refusal(request.ByteSize())
            if why is not None:
                raise errors.NO_SPACE
        if isinstance(request, pb.TxnRequest) and _reads_below_zero(request):
            # (refused here as etcd refuses it, not in the apply: nodes of two releases would
            # apply the same entry two ways in a rolling upgrade)
            refusal = self.store.txn_refusal(request)
            if refusal is not None:
                raise refusal
        (result,) = await self.driver.propose([_OP_ETCD + encode(request)])
        if isinstance(result, EtcdError):
            raise result
        if result is None:
            raise errors.invalid("the write could not be applied")
        result.header.CopyFrom(self.header(result.header.revision))
        return result

    def _check_lease_room(self, request: pb.PutRequest | pb.TxnRequest) -> None:
        """EtcdError if the puts of ``request`` (a Txn's in either branch) would take a lease
        past ``MAX_LEASE_KEYS``. Against the applied state: writes proposed at once may pass
        it by as many as are under way."""
        puts = [request] if isinstance(request, pb.PutRequest) else _lease_puts(request)
        leases = self.store.leases
        new_keys: dict[int, set[bytes]] = {}  # (a Txn's own count: up to 4,096 puts)
        for put in puts:
            lease = leases.get(put.lease) if put.lease else None
            if lease is not None and put.key not in lease.keys:
                adding = new_keys.setdefault(put.lease, set())
                adding.add(put.key)
                if len(lease.keys) + len(adding) > MAX_LEASE_KEYS:
                    raise errors.lease_full(put.lease, MAX_LEASE_KEYS)

    def _check_work(self, request: pb.DeleteRangeRequest | pb.TxnRequest) -> None:
        """EtcdError if ``request`` would delete more than ``MAX_DELETE_KEYS`` keys, or (a Txn)
        look at more than ``MAX_TXN_READ_KEYS`` records, of the applied state. A Txn counts its
        compares and the branch that does the most of each, nested ones likewise; the ranges of
        one branch are added up, overlapping or not."""
        store = self.store

        def compares(txn: pb.TxnRequest) -> int:
            return sum(store.count_in(c.key, c.range_end) for c in txn.compare)

        def most(ops: Any) -> tuple[int, int]:  # (keys deleted, records read)
            deleted = read = 0
            for op in ops:
                which = op.WhichOneof("request")
                if which == "request_delete_range":
                    delete = op.request_delete_range
                    deleted += store.count_in(delete.key, delete.range_end)
                elif which == "request_range":
                    read += store.read_cost(op.request_range)
                elif which == "request_txn":
                    nested = op.request_txn
                    (d1, r1), (d2, r2) = most(nested.success), most(nested.failure)
                    deleted += max(d1, d2)
                    read += compares(nested) + max(r1, r2)
            return deleted, read

        if isinstance(request, pb.DeleteRangeRequest):
            deleted, read = store.count_in(request.key, request.range_end), 0
        else:
            (d1, r1), (d2, r2) = most(request.success), most(request.failure)
            deleted, read = max(d1, d2), compares(request) + max(r1, r2)
        if deleted > MAX_DELETE_KEYS:
            raise errors.too_many_deletes(deleted, MAX_DELETE_KEYS)
        if read > MAX_TXN_READ_KEYS:
            raise errors.txn_reads_too_much(read, MAX_TXN_READ_KEYS)

    async def _put(self, request: pb.PutRequest) -> pb.PutResponse:
        return await self.write(request)

    async def _delete(self, request: pb.DeleteRangeRequest) -> pb.DeleteRangeResponse:
        return await self.write(request)

    async def _txn(self, request: pb.TxnRequest) -> pb.TxnResponse:
        if _serializable_txn(request):
            # (as etcd's: answered from this member's state, the log left alone; a follower
            # of an older release may have forwarded it)
            self._check_work(request)
            response = self.store.read_txn(request)
            response.header.CopyFrom(self.header(response.header.revision))
            return response
        return await self.write(request)

    async def _compact(self, request: pb.CompactionRequest) -> pb.CompactionResponse:
        store = self.store
        if request.revision <= store.compact_revision:
            raise errors.COMPACTED
        if request.revision > store.revision:
            raise errors.FUTURE_REV
        return await self.write(request)

    # -- leases -----------------------------------------------------------------------------

    async def _grant(self, request: pb.LeaseGrantRequest) -> pb.LeaseGrantResponse:
        grant = pb.LeaseGrantRequest(TTL=max(request.TTL, self.lessor.min_ttl), ID=request.ID)
        if grant.ID == 0:
            leases = self.store.leases
            while grant.ID == 0 or grant.ID in leases:
                grant.ID = random.getrandbits(62) + 1  # (chosen here: the log holds it)
        elif grant.ID in self.store.leases:
            raise errors.LEASE_EXIST
        response = await self.write(grant)
        self.lessor.granted(response.ID, response.TTL)
        return response

    async def _revoke(self, request: pb.LeaseRevokeRequest) -> pb.LeaseRevokeResponse:
        if request.ID not in self.store.leases:
            raise errors.LEASE_NOT_FOUND
        return await self.write(request)

    async def _keep_alive(self, request: pb.LeaseKeepAliveRequest) -> pb.LeaseKeepAliveResponse:
        await self.driver.read_barrier("linearizable")  # (we still lead: our clock decides)
        ttl = self.lessor.renew(request.ID)
        return pb.LeaseKeepAliveResponse(header=self.header(), ID=request.ID, TTL=ttl)

    async def _time_to_live(self, request: pb.LeaseTimeToLiveRequest) -> pb.LeaseTimeToLiveResponse:
        await self.driver.read_barrier("linearizable")
        lease = self.store.leases.get(request.ID)
        response = pb.LeaseTimeToLiveResponse(header=self.header(), ID=request.ID, TTL=-1)
        if lease is not None:
            response.TTL = self.lessor.remaining(request.ID)
            response.grantedTTL = lease.ttl
            if request.keys:
                response.keys.extend(sorted(lease.keys))
        return response

    async def _leases(self, request: pb.LeaseLeasesRequest) -> pb.LeaseLeasesResponse:
        await self.driver.read_barrier("linearizable")
        # (built in parts and kept until the lease set changes: 100,000 leases sorted and made
        # into messages at once held the leader ~0.1 s a call, 20 calls 0.46-0.60 s; and a
        # couple at a time: 20 copies of the answer at once, ~2 ms each, in one turn of the
        # loop held it ~40 ms)
        async with self._stepped_reads:
            listing = await _LeaseList.of(self.store)
            response = pb.LeaseLeasesResponse()
            response.CopyFrom(listing)  # (~2 ms for 100,000 leases)
        response.header.CopyFrom(self.header())
        return response

    # -- cluster ----------------------------------------------------------------------------

    def members(self) -> list[pb.Member]:
        raw, driver = self.driver.raw, self.driver
        membership = raw.membership
        out = []
        for node_id, address in sorted(membership.members().items()):
            client = driver.address_of(node_id) if node_id != driver.id else driver.settings.listen
            started = self._started(node_id)
            out.append(
                pb.Member(
                    ID=member_id(node_id),
                    name=node_id if started else "",
                    peerURLs=[_url(address)],
                    clientURLs=[_url(client)] if client and started else [],
                    isLearner=node_id in membership.learners,
                )
            )
        return out

    def _started(self, node_id: str) -> bool:
        """Whether ``node_id`` has run, as far as this node knows: it is this node, a
        founding member, a voter (promoted only once it had caught up), or it has spoken to
        us. etcd names a member (and gives its client URLs) once it has started; etcdctl says
        "unstarted" of one without a name, and scripts wait for that to change after a member
        add. (A learner that ran, then stopped before this node restarted, reads unstarted
        here until it is back.)"""
        driver = self.driver
        return (
            node_id == driver.id
            or node_id in driver.settings.peers
            or node_id in driver.raw.membership.voters
            or bool(driver.transport.client_address_of(node_id))
        )

    def node_of(self, mid: int) -> str:
        for node_id in self.driver.raw.membership.members():
            if member_id(node_id) == mid:
                return node_id
        raise errors.MEMBER_NOT_FOUND

    async def _member_list(self, request: pb.MemberListRequest) -> pb.MemberListResponse:
        return pb.MemberListResponse(header=self.header(), members=self.members())

    async def _add(self, request: pb.MemberAddRequest) -> pb.MemberAddResponse:
        """A new member at the first peer URL; its raftfast node id is that URL's host:port
        (start it with ``--id HOST:PORT --join ...``: docs/etcd-api.md)."""
        if len(request.peerURLs) != 1:
            raise errors.MEMBER_BAD_URLS
        address = _address_of_url(request.peerURLs[0])
        node_id = address
        members = self.driver.raw.membership.members()
        if node_id in members or address in members.values():
            raise errors.PEER_URL_EXIST
        timeout = 10 * self.driver.election_timeout_s + 10
        try:
            # (which refuses another name for a member's address, localhost:PORT for
            # 127.0.0.1:PORT: AddressTakenError)
            await self.driver.add_member(node_id, address, True, timeout)
            if not request.isLearner:
                # (etcd adds a voter at once; raftfast lets it catch up first: see the docs)
                asyncio.get_running_loop().create_task(self._promote_later(node_id, timeout))
        except AddressTakenError:
            raise errors.PEER_URL_EXIST from None
        except ValueError as exc:
            raise EtcdError(grpc.StatusCode.FAILED_PRECONDITION, f"etcdserver: {exc}") from None
        except TimeoutError:
            raise errors.TIMEOUT from None
        member = next(m for m in self.members() if m.ID == member_id(node_id))
        return pb.MemberAddResponse(header=self.header(), member=member, members=self.members())

    async def _promote_later(self, node_id: str, timeout: float) -> None:
        from raftfast.core.membership import ChangeKind

        try:
            await self.driver.change_member(ChangeKind.PROMOTE, node_id, timeout)
        except Exception as exc:  # noqa: BLE001 - the operator sees a learner; promote by hand
            log.warning("member %s was added but not promoted: %s", node_id, exc)

    async def _remove(self, request: pb.MemberRemoveRequest) -> pb.MemberRemoveResponse:
        from raftfast.core.membership import ChangeKind

        node_id = self.node_of(request.ID)
        await self._change(ChangeKind.REMOVE, node_id)
        return pb.MemberRemoveResponse(header=self.header(), members=self.members())

    async def _promote(self, request: pb.MemberPromoteRequest) -> pb.MemberPromoteResponse:
        from raftfast.core.membership import ChangeKind

        node_id = self.node_of(request.ID)
        if node_id not in self.driver.raw.membership.learners:
            raise errors.MEMBER_NOT_LEARNER
        await self._change(ChangeKind.PROMOTE, node_id)
        return pb.MemberPromoteResponse(header=self.header(), members=self.members())

    async def _change(self, kind: Any, node_id: str) -> None:
        from raftfast.core.membership import ChangeKind

        try:
            await self.driver.change_member(kind, node_id, 10 * self.driver.election_timeout_s)
        except TimeoutError:
            # (a learner that has not caught up; a removal is not about a learner's progress)
            slow = errors.LEARNER_NOT_READY if kind == ChangeKind.PROMOTE else errors.TIMEOUT
            raise slow from None
        except ValueError as exc:
            raise EtcdError(grpc.StatusCode.FAILED_PRECONDITION, f"etcdserver: {exc}") from None

    # -- maintenance ------------------------------------------------------------------------

    def alarm_members(self) -> list[pb.AlarmMember]:
        if NOSPACE not in self.driver.fsm.alarms:
            return []
        leader = self.driver.raw.leader
        return [pb.AlarmMember(memberID=member_id(leader or self.driver.id), alarm=pb.NOSPACE)]

    async def _alarm(self, request: pb.AlarmRequest) -> pb.AlarmResponse:
        if request.action not in (
            pb.AlarmRequest.GET,
            pb.AlarmRequest.ACTIVATE,
            pb.AlarmRequest.DEACTIVATE,
        ):
            raise errors.invalid(f"unknown alarm action {request.action}")
        if request.action != pb.AlarmRequest.GET and request.alarm != pb.NONE:
            # (only NOSPACE exists here; it is cleared through the quota, on the leader. NONE
            # names no alarm: etcd changes nothing, so neither do we.)
            if request.alarm != pb.NOSPACE:
                raise errors.invalid(f"alarm {request.alarm} is not one this node raises")
            quota = self.driver.quota
            if quota is None:
                raise errors.invalid("this node has no quota")
            if request.action == pb.AlarmRequest.DEACTIVATE:
                disarmed = self.alarm_members()
                try:
                    await quota.disarm()
                except ValueError as exc:
                    raise EtcdError(
                        grpc.StatusCode.FAILED_PRECONDITION, f"etcdserver: {exc}"
                    ) from None
                # (as etcd: the alarms deactivated; etcdctl prints them)
                return pb.AlarmResponse(header=self.header(), alarms=disarmed)
            else:
                quota.raise_alarm("activated through the etcd API")
                raising = quota._raising  # noqa: SLF001 - answered once applied, as etcd does
                if raising is not None:
                    await asyncio.shield(raising)
        return pb.AlarmResponse(header=self.header(), alarms=self.alarm_members())

    async def _status(self, request: pb.StatusRequest) -> pb.StatusResponse:
        driver, store = self.driver, self.store
        raw = driver.raw
        alarms = [
            f"memberID:{a.memberID} alarm:{pb.AlarmType.Name(a.alarm)} "
            for a in self.alarm_members()
        ]
        if not raw.leader:
            alarms.append("etcdserver: no leader")  # (as etcd: monitoring reads it here)
        return pb.StatusResponse(
            header=self.header(),
            version=API_VERSION,
            dbSize=store.size_bytes + store.history_bytes,
            leader=member_id(raw.leader) if raw.leader else 0,
            raftIndex=raw.commit_index,
            raftTerm=raw.term,
            raftAppliedIndex=driver.applied_index,
            errors=alarms,
            dbSizeInUse=store.size_bytes,
            isLearner=driver.id in raw.membership.learners,
        )

    async def _defragment(self, request: pb.DefragmentRequest) -> pb.DefragmentResponse:
        return pb.DefragmentResponse(header=self.header())  # (in memory: nothing to do)

    async def _hash_kv(self, request: pb.HashKVRequest) -> pb.HashKVResponse:
        """A CRC32 of the keyspace at a revision: equal on members that agree."""
        store = self.store
        rev = request.revision if request.revision > 0 else store.revision
        store.check_revision(rev)
        header, compacted = self.header(), store.compact_revision  # (as of the records)
        _, records = await self._read(pb.RangeRequest(key=b"\x00", range_end=b"\x00", revision=rev))
        crc = 0
        async for part in _parts(records):
            for rec in part:
                crc = zlib.crc32(kv_pb(rec).SerializeToString(), crc)
        return pb.HashKVResponse(header=header, hash=crc, compact_revision=compacted)

    async def _hash(self, request: pb.HashRequest) -> pb.HashResponse:
        """etcd hashes its database file; there is none here: the hash of the keyspace at the
        current revision (HashKV's), equal on members that agree."""
        response = await self._hash_kv(pb.HashKVRequest())
        return pb.HashResponse(header=response.header, hash=response.hash)

    async def _move_leader(self, request: pb.MoveLeaderRequest) -> pb.MoveLeaderResponse:
        try:
            target = self.node_of(request.targetID)
        except EtcdError:
            raise errors.BAD_LEADER_TRANSFEREE from None
        if target == self.driver.id:
            return pb.MoveLeaderResponse(header=self.header())
        try:
            await self.driver.transfer_leadership(target)
        except ValueError:
            raise errors.BAD_LEADER_TRANSFEREE from None
        except TimeoutError:
            raise errors.TIMEOUT from None
        return pb.MoveLeaderResponse(header=self.header())


# -- helpers ----------------------------------------------------------------------------------


_PART = 4096
# What an answer to a Range may hold: what the client port sends at most (its messages are at
# most tcp.MAX_RECORD_BYTES), less room for the header; a KeyValue's fields besides its key
# and value take up to ~40 bytes.
MAX_RANGE_ANSWER_BYTES = 63 * 1024 * 1024
_KV_OVERHEAD = 40
_STEPPED_READS = 2  # reads of many records (read_steps) at once: each holds its records


def _add_kvs(response: pb.RangeResponse, records: list[Record], keys_only: bool) -> None:
    """``records`` into ``response.kvs``, each made in place (``kv_pb``'s messages, listed,
    then copied in, took twice as long, and their thousands of live objects set off the
    cycle collector, whose full passes walk the keyspace: ~0.1 s each at 1,000,000 keys)."""
    add = response.kvs.add
    for rec in records:
        fill_kv(add(), rec, keys_only)


def _answer_bytes(records: list[Record], keys_only: bool) -> int:
    """About what ``records`` take in a Range's answer."""
    size = sum(len(rec.key) + (0 if keys_only else len(rec.value)) for rec in records)
    return size + _KV_OVERHEAD * len(records)


def _check_answer_size(size: int) -> None:
    if size > MAX_RANGE_ANSWER_BYTES:
        # (gRPC would refuse to send it, after the loop had spent seconds building it:
        # 400 values of 1 MB, four such reads at once, a node at 3.2 GB and elections)
        raise errors.answer_too_big(size, MAX_RANGE_ANSWER_BYTES)


async def _parts(records: list, size: int = _PART) -> AsyncIterator[list]:
    """``records`` a part at a time, the loop let go between parts: 327,000 keys made into
    messages at once held it ~1 s (the node missed its heartbeats: an election per read)."""
    for start in range(0, len(records), size):
        if start:
            await asyncio.sleep(0)
        yield records[start : start + size]


_LEASE_PART = 10_000  # leases sorted, or made into LeaseStatus messages, in one step (~2-3 ms)


class _LeaseList:
    """LeaseLeases' answer but its header, for one store (kept in it: ``store.lease_list``):
    built in steps, the loop let go between parts of ``_LEASE_PART`` leases (sorted in parts,
    then the sorted parts merged: ~6 ms for 100,000), and kept until the next grant or revoke
    (``store.lease_changes``). One build at a time: calls at once share it. Built at once in
    each call, 100,000 leases held the leader ~0.1 s a call, and 20 calls at once 0.46-0.60 s
    (leader changes)."""

    __slots__ = ("answer", "building", "changes")

    def __init__(self) -> None:
        self.answer: pb.LeaseLeasesResponse | None = None  # (never changed once built)
        self.changes = -1  # the store's lease_changes it was built at
        self.building: asyncio.Future | None = None

    @staticmethod
    async def of(store: MVCCStore) -> pb.LeaseLeasesResponse:
        """The answer for the lease set as of now or later (linearizable after a barrier)."""
        listing = store.lease_list
        if listing is None:
            listing = store.lease_list = _LeaseList()
        wanted = store.lease_changes
        while listing.answer is None or listing.changes < wanted:
            if listing.building is None:  # (or the one under way began before we came)
                listing.building = asyncio.ensure_future(listing._build(store))
            await asyncio.shield(listing.building)  # (one caller gone: the others wait on)
        return listing.answer

    async def _build(self, store: MVCCStore) -> None:
        try:
            changes = store.lease_changes
            ids = list(store.leases)  # (the set as of now: ~1 ms for 100,000)
            for start in range(0, len(ids), _LEASE_PART):
                await asyncio.sleep(0)
                ids[start : start + _LEASE_PART] = sorted(ids[start : start + _LEASE_PART])
            ids.sort()
            answer = pb.LeaseLeasesResponse()
            add = answer.leases.add
            for start in range(0, len(ids), _LEASE_PART):
                await asyncio.sleep(0)
                for lease_id in ids[start : start + _LEASE_PART]:
                    add(ID=lease_id)
            self.answer, self.changes = answer, changes
        finally:
            self.building = None


def _check_put(r: pb.PutRequest) -> None:
    if not r.key:
        raise errors.EMPTY_KEY
    if r.ignore_value and r.value:
        raise errors.VALUE_PROVIDED
    if r.ignore_lease and r.lease:
        raise errors.LEASE_PROVIDED


def _check_txn(r: pb.TxnRequest, depth: int) -> int:
    """etcd's checks of a txn (``checkTxnReq``), nested ones included; how many compares and
    operations it holds in all."""
    if depth >= MAX_TXN_DEPTH:
        raise errors.invalid(f"txn nested more than {MAX_TXN_DEPTH} levels deep")
    if len(r.compare) > MAX_TXN_OPS or len(r.success) > MAX_TXN_OPS:
        raise errors.TOO_MANY_OPS
    if len(r.failure) > MAX_TXN_OPS:
        raise errors.TOO_MANY_OPS
    total = len(r.compare) + len(r.success) + len(r.failure)
    for c in r.compare:
        if not c.key:
            raise errors.EMPTY_KEY
        if c.result not in _COMPARE_RESULTS or c.target not in _COMPARE_TARGETS:
            raise errors.invalid(f"unknown compare result {c.result} or target {c.target}")
    for ops in (r.success, r.failure):
        for op in ops:
            which = op.WhichOneof("request")
            if which == "request_put":
                _check_put(op.request_put)
            elif which == "request_range":
                if not op.request_range.key:
                    raise errors.EMPTY_KEY
            elif which == "request_delete_range":
                if not op.request_delete_range.key:
                    raise errors.EMPTY_KEY
            elif which == "request_txn":
                total += _check_txn(op.request_txn, depth + 1)
                if total > MAX_TXN_TOTAL_OPS:  # (at once: the rest is not even looked at)
                    raise errors.invalid(
                        f"txn holds more than {MAX_TXN_TOTAL_OPS} compares and operations "
                        "(nested txns included)"
                    )
            else:  # (an empty RequestOp)
                raise errors.KEY_NOT_FOUND
    if depth == 0:
        _check_intervals(r.success)
        _check_intervals(r.failure)
    return total


_COMPARE_RESULTS = frozenset(pb.Compare.CompareResult.values())
_COMPARE_TARGETS = frozenset(pb.Compare.CompareTarget.values())
_Interval = tuple[bytes, bytes | None]  # [lo, hi): a key range (hi None: to the end)


def _gte_where_empty(method: str, request: Any) -> None:
    """A ``range_end`` sent but empty, read as etcd 3.4 reads it: every key from the key on
    (made "\0", which says so here) in what etcd answers without its log, a Range and a Txn
    that only reads (Go decodes it as an empty, not a nil, slice; etcd's Node.js client sends
    one for a range with no end); the key alone in what goes through etcd's log (encoded
    again, it is left out): a DeleteRange, a Txn that writes (checked against etcd 3.4)."""
    if method == "KV/Range":
        if request.HasField("range_end") and not request.range_end:
            request.range_end = b"\0"
    elif method == "KV/Txn" and all(
        op.WhichOneof("request") == "request_range" for op in (*request.success, *request.failure)
    ):  # (etcd's isTxnReadonly)
        reads = [op.request_range for op in (*request.success, *request.failure)]
        for part in (*request.compare, *reads):
            _gte_where_empty("KV/Range", part)


def _serializable_txn(txn: pb.TxnRequest) -> bool:
    """etcd's ``isTxnSerializable``: every operation of both branches is a serializable
    Range (so no nested txn), or there is none."""
    return all(
        op.WhichOneof("request") == "request_range" and op.request_range.serializable
        for branch in (txn.success, txn.failure)
        for op in branch
    )


def _reads_below_zero(txn: pb.TxnRequest) -> bool:
    """Whether a Range of ``txn`` (nested ones included) asks for a negative revision."""
    return any(
        op.WhichOneof("request") == "request_range" and op.request_range.revision < 0
        for branch in (txn.success, txn.failure)
        for op in _flat_ops(branch)
    )


def _flat_ops(ops) -> Iterator[pb.RequestOp]:
    """``ops`` and, within them, both branches of nested txns."""
    for op in ops:
        yield op
        if op.WhichOneof("request") == "request_txn":
            yield from _flat_ops(op.request_txn.success)
            yield from _flat_ops(op.request_txn.failure)


def _writes_of(ops) -> tuple[list[bytes], list[_Interval]]:
    """(keys put, ranges deleted) by ``ops``, nested txns' branches included."""
    puts: list[bytes] = []
    deletes: list[_Interval] = []
    for op in _flat_ops(ops):
        which = op.WhichOneof("request")
        if which == "request_put":
            puts.append(op.request_put.key)
        elif which == "request_delete_range":
            deletes.append(_deleted(op.request_delete_range))
    return puts, deletes


def _lease_puts(txn: pb.TxnRequest) -> list[pb.PutRequest]:
    """The puts with a lease in both branches of ``txn``, nested txns' included."""
    return [
        op.request_put
        for branch in (txn.success, txn.failure)
        for op in _flat_ops(branch)
        if op.WhichOneof("request") == "request_put" and op.request_put.lease
    ]


def _deleted(r: pb.DeleteRangeRequest) -> _Interval | None:
    """The keys a delete covers for the duplicate check, as etcd's ``checkIntervals`` reads
    them: ``range_end`` taken literally, so a delete "from key" (range_end "\0") covers none
    there (a txn that deletes from a key and then puts a key after it runs on etcd)."""
    if not r.range_end:
        return r.key, r.key + b"\0"
    return (r.key, r.range_end) if r.key < r.range_end else None


def _check_intervals(ops) -> tuple[set[bytes], list[_Interval]]:
    """etcd's ``checkIntervals``: a txn branch may not put a key twice, nor put a key it also
    deletes, nested txns included (but the two branches of a nested txn may write the same
    key: only one runs). Each level is looked at once (walking every subtree again at each
    level kept the loop busy for 0.8 s on one 1.5 MB txn: elections)."""
    dels = [
        interval
        for op in ops
        if op.HasField("request_delete_range")
        and (interval := _deleted(op.request_delete_range)) is not None
    ]
    covers = _Covers(dels)
    puts: set[bytes] = set()
    for op in ops:
        if not op.HasField("request_txn"):
            continue
        then_puts, then_dels = _check_intervals(op.request_txn.success)
        else_puts, else_dels = _check_intervals(op.request_txn.failure)
        for key in then_puts:
            if key in puts or covers(key):
                raise errors.DUPLICATE_KEY
        puts |= then_puts
        for key in else_puts:
            if (key in puts and key not in then_puts) or covers(key):
                raise errors.DUPLICATE_KEY
        puts |= else_puts
        if then_dels or else_dels:
            dels += then_dels + else_dels
            covers = _Covers(dels)
    for op in ops:
        if op.HasField("request_put"):
            key = op.request_put.key
            if key in puts or covers(key):
                raise errors.DUPLICATE_KEY
            puts.add(key)
    return puts, dels


class _Covers:
    """Whether a key lies in any of some ranges: merged, then a bisection per key."""

    def __init__(self, ranges: list[_Interval]) -> None:
        merged: list[list] = []
        for lo, hi in sorted(ranges, key=lambda r: r[0]):
            if merged and (merged[-1][1] is None or lo <= merged[-1][1]):
                last = merged[-1]
                last[1] = None if hi is None or last[1] is None else max(last[1], hi)
            else:
                merged.append([lo, hi])
        self._los = [lo for lo, _ in merged]
        self._his = [hi for _, hi in merged]

    def __call__(self, key: bytes) -> bool:
        i = bisect_right(self._los, key) - 1
        return i >= 0 and (self._his[i] is None or key < self._his[i])


def _grows(request: Any) -> bool:
    """Whether ``request`` can add to the state (the quota refuses it; deletes still go)."""
    if isinstance(request, pb.PutRequest | pb.LeaseGrantRequest):
        return True
    if isinstance(request, pb.TxnRequest):
        return bool(_writes_of(request.success)[0] or _writes_of(request.failure)[0])
    return False


def _url(address: str) -> str:
    return address if "://" in address else f"http://{address}"


_HOST = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*|[0-9A-Fa-f:.]+(%[A-Za-z0-9_.-]+)?")


def _address_of_url(url: str) -> str:
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:
        raise errors.MEMBER_BAD_URLS from None
    if parts.scheme not in ("http", "https") or not host or not port:
        raise errors.MEMBER_BAD_URLS
    if parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc:
        raise errors.MEMBER_BAD_URLS  # (etcd: a peer URL has no path; nor userinfo here)
    if not _HOST.fullmatch(host):  # (a name or an IP address: not "%zz", which etcd refuses)
        raise errors.MEMBER_BAD_URLS
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        check_node_id(address)
    except ValueError:
        raise errors.MEMBER_BAD_URLS from None
    return address
