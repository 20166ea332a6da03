"""The etcd v3 data model as a deterministic state machine part: MVCC keys, revisions, history,
compaction and leases (what etcd's mvcc and lease packages keep), applied from the log.

* The store has one revision, 1 when empty; every write (a Put, a DeleteRange that deletes, a
  Txn that writes, a lease revocation that deletes keys) makes it one higher, and all changes of
  one write share that revision. Each key holds create_revision, mod_revision, version (1 when
  created, +1 per change) and its lease.
* History: the changes of every revision after ``compact_revision`` (``Event``: key, the record
  after, the record before). A read at a past revision undoes the newer changes; watches read
  it from any revision on. ``compact`` forgets history up to a revision (auto-compaction keeps
  memory bounded, ``raftfast.etcd.lessor``).
* Leases: id -> granted TTL and the keys attached. When a lease expires is decided by the
  leader's clock, outside the state machine; its revocation is a logged command like any other,
  and deletes its keys in one revision.

Commands are a tag byte and the etcd request message (``encode``). ``apply`` returns the
response (its header's revision set) or an ``EtcdError``, never raises for a bad command: the
same entry gives the same result on every node. Nothing here does I/O or reads a clock.
"""

from __future__ import annotations

import heapq
import os
import struct
import sys
import threading
import time
import zlib
from array import array
from collections import deque
from collections.abc import Iterator
from itertools import islice
from operator import attrgetter
from typing import Any

from sortedcontainers import SortedDict

from raftfast._accel import Event, Record  # (kept out of the cycle collector: _store.pyx)
from raftfast.errors import CorruptionError
from raftfast.etcd import errors
from raftfast.etcd.errors import EtcdError
from raftfast.proto.etcd import kv_pb2 as mvccpb
from raftfast.proto.etcd import rpc_pb2 as pb

__all__ = [
    "EVENT_OVERHEAD",
    "LIVE_KEY_OVERHEAD",
    "MAX_LEASE_TTL",
    "MAX_TXN_DEPTH",
    "Event",
    "MVCCStore",
    "Record",
    "decode",
    "encode",
    "event_pb",
    "fill_kv",
    "kv_pb",
    "reaping",
]

# Command tags (the byte after the KV store's OP_ETCD)
T_PUT = 1
T_DELETE = 2
T_TXN = 3
T_COMPACT = 4
T_LEASE_GRANT = 5
T_LEASE_REVOKE = 6
_REQUESTS = {
    T_PUT: pb.PutRequest,
    T_DELETE: pb.DeleteRangeRequest,
    T_TXN: pb.TxnRequest,
    T_COMPACT: pb.CompactionRequest,
    T_LEASE_GRANT: pb.LeaseGrantRequest,
    T_LEASE_REVOKE: pb.LeaseRevokeRequest,
}
_TAGS = {cls: tag for tag, cls in _REQUESTS.items()}

MAX_LEASE_TTL = 9_000_000_000  # seconds (etcd's MaxLeaseTTL)
MAX_TXN_DEPTH = 16  # nested Txn levels (protobuf itself parses at most 100)
# What the reads of one Txn (its ranges and compares, nested txns' too) may cost: about the
# bytes of their answers, and _RECORD_COST per record (or event of the history) looked at. A
# bigger answer could not be sent (gRPC's limit, 64 MiB); nesting multiplies the 128 ops a
# level may hold, and without this one small request could have every node work for hours and
# build gigabytes in apply.
MAX_TXN_READ_BYTES = 64 * 1024 * 1024
_RECORD_COST = 64
_WALK_PART = 20_000  # keys of the keyspace read at a time by a read in steps (~7 ms)
_HISTORY_PART = 20_000  # events of the history walked at a time by a read at an old revision
# What one history event is counted as (``history_bytes``, hence the quota) beyond its key and
# its value: about what it costs in memory. Measured in one process (compiled Record/Event,
# Python 3.11; Txns of 1,000-4,000 puts of keys written again and again, versions past 256;
# tracemalloc's traced bytes and sys.getallocatedblocks per event added, and RSS): the Event
# 48 B, its Record 64, the key's bytes object 33 + the key, the value's 33 + the value (none
# when empty: b"" is shared), the version's int 28, the slot in the revision's tuple 8, each
# rounded up to 16 by pymalloc; the revision's int is one for all the events and records of
# a revision. Traced: 185 B beyond the key (2-byte keys, empty values; RSS 194 B an event in
# all), 218 B beyond key and value (16-byte keys and 10-byte values, 32 and 100), ~32 B more
# with RAFTFAST_PUREPYTHON=1. A delete's event is smaller, but it may hold the record it
# deleted alone (once its put is compacted away): counted the same. (It was counted 64: 66 B
# against 245 B of RSS an event, so the 2 GiB quota let ~8 GB of history in.)
EVENT_OVERHEAD = 256
# What one live key is counted as (``size_bytes``, hence the quota) beyond its key and value:
# its Record, its key's and value's bytes objects and its SortedDict entry. Measured (RSS,
# 1,000,000 keys, compiled): 204 B (6-byte keys, empty values), 221 B (16 + 64 bytes). It was
# counted nothing: after a compaction, 1,000,000 keys of 4 bytes held ~270 MB of every node
# while the quota saw 4 MB.
LIVE_KEY_OVERHEAD = 256
# A compaction that drops more than this (history_bytes) leaves the freeing of the events to
# the history reaper's thread (below): 5,000,000 events freed at once held each node 0.6 s.
_FREE_LATER_BYTES = 1 << 20
_REAP_PART = 8192  # events freed by the reaper between two chances for the loop's thread
LEASE_LOG = 4096  # the last lease ids granted or revoked that a store remembers (lease_log)
_INT64_MAX = (1 << 63) - 1

_CMP = pb.Compare
_SORT = pb.RangeRequest


def encode(request: Any) -> bytes:
    """The command for an etcd write request (without the KV store's op byte)."""
    return bytes((_TAGS[type(request)],)) + request.SerializeToString()


def decode(command: bytes | memoryview) -> Any:
    """The request of an ``encode``d command; ValueError if it is not one."""
    if not command:
        raise ValueError("empty etcd command")
    cls = _REQUESTS.get(command[0])
    if cls is None:
        raise ValueError(f"unknown etcd command tag {command[0]}")
    request = cls()
    try:
        request.ParseFromString(bytes(command[1:]))
    except Exception as exc:  # protobuf's DecodeError, RecursionError...
        raise ValueError(f"malformed etcd command: {exc}") from None
    return request


def kv_pb(rec: Record, keys_only: bool = False) -> mvccpb.KeyValue:
    """``rec`` as etcd's KeyValue (without its value: ``keys_only``)."""
    out = mvccpb.KeyValue()
    fill_kv(out, rec, keys_only)
    return out


def fill_kv(kv: mvccpb.KeyValue, rec: Record, keys_only: bool = False) -> None:
    """Set etcd's KeyValue ``kv`` (a new one: ``kv_pb``; one added in place to an answer's
    list) to ``rec`` (without its value: ``keys_only``)."""
    kv.key = rec.key
    if not keys_only:
        kv.value = rec.value
    kv.create_revision = rec.create
    kv.mod_revision = rec.mod
    kv.version = rec.version
    kv.lease = rec.lease


def event_pb(ev: Event, with_prev: bool) -> mvccpb.Event:
    """``ev`` as etcd's Event (with the key's previous state: ``with_prev``)."""
    if ev.after is not None:
        out = mvccpb.Event(type=mvccpb.Event.PUT, kv=kv_pb(ev.after))
    else:
        out = mvccpb.Event(
            type=mvccpb.Event.DELETE,
            kv=mvccpb.KeyValue(key=ev.key, mod_revision=ev.revision),
        )
    if with_prev and ev.prev is not None:
        out.prev_kv.CopyFrom(kv_pb(ev.prev))
    return out


def range_of(key: bytes, range_end: bytes) -> tuple[bytes, bytes | None] | None:
    """etcd's range convention as (first key, end or None for "no end"); None: ``key`` alone.
    ``range_end`` b"\\0" means every key >= ``key`` (and key b"\\0" with it: every key)."""
    if not range_end:
        return None
    if range_end == b"\x00":
        return (b"" if key == b"\x00" else key), None
    return key, range_end


def in_range(k: bytes, key: bytes, bounds: tuple[bytes, bytes | None] | None) -> bool:
    if bounds is None:
        return k == key
    lo, hi = bounds
    return k >= lo and (hi is None or k < hi)


class Lease:
    __slots__ = ("id", "ttl", "keys")

    def __init__(self, lease_id: int, ttl: int) -> None:
        self.id = lease_id
        self.ttl = ttl
        self.keys: set[bytes] = set()


class _KeyOrder:
    """A frozen store's keys in key order and its records in any order: what ``dump`` reads
    of ``kvs``, in key order once ``items`` is called (in the snapshot thread)."""

    __slots__ = ("keys", "records")

    def __init__(self, keys: list[bytes], records: list[Record]) -> None:
        self.keys = keys
        self.records = records

    def __len__(self) -> int:
        return len(self.keys)

    def items(self) -> Iterator[tuple[bytes, Record]]:
        # (in parts: one call into C over 1,000,000 records would hold the loop's thread
        # out of the interpreter; between calls it gets in)
        by_key: dict[bytes, Record] = {}
        records, keys = self.records, self.keys
        for start in range(0, len(records), _WALK_PART):
            part = records[start : start + _WALK_PART]
            by_key.update(zip(map(_BY_KEY, part), part, strict=True))
        ordered: list[Record] = []
        for start in range(0, len(keys), _WALK_PART):
            ordered += map(by_key.__getitem__, keys[start : start + _WALK_PART])
        return zip(keys, ordered, strict=True)


class MVCCStore:
    """The etcd keyspace of one node (see the module docs)."""

    def __init__(self) -> None:
        self.revision = 1
        self.compact_revision = 0
        self.kvs: SortedDict = SortedDict()  # key -> Record (live keys only)
        self.leases: dict[int, Lease] = {}
        self.lease_changes = 0  # grants and revokes applied (the lessor syncs when it moves)
        # the ids of the last grants and revokes, one per change (the lessor follows them
        # instead of walking every lease; not state: not dumped, empty after a restore)
        self.lease_log: deque[int] = deque(maxlen=LEASE_LOG)
        # (the API's LeaseLeases answer, built of ``leases`` as of some ``lease_changes``: a
        # cache beside the state, gone with the store; not dumped, not copied)
        self.lease_list: Any = None
        self.size_bytes = 0  # the live keys: keys, values and LIVE_KEY_OVERHEAD each
        # what the history holds in memory: its keys and values, EVENT_OVERHEAD per event
        self.history_bytes = 0
        # _history[i] holds the events of revision _history_base + i; the newest is ``revision``
        self._history: list[tuple[Event, ...]] = []
        self._history_base = 2
        # _history_ends[i]: _dropped_bytes + the history_bytes of revisions _history_base to
        # _history_base + i (so a compaction subtracts a difference, not a sum over events)
        self._history_ends = array("q")
        self._dropped_bytes = 0
        # _event_ends[i]: _dropped_events + the events of revisions _history_base to
        # _history_base + i (read_cost counts the events since a revision at once: walked a
        # revision at a time, a Txn of 3,840 old-revision Ranges held a leader 10-15 s)
        self._event_ends = array("q")
        self._dropped_events = 0
        # while a write is applied: its revision (one int object for all its events and
        # records: 32 B an event less) and its events
        self._next_revision = 2
        self._pending: list[Event] | None = None
        self._read_budget: int | None = None  # while a Txn is applied (MAX_TXN_READ_BYTES)

    # -- applying ---------------------------------------------------------------------------

    def apply(self, command: bytes | memoryview) -> Any:
        """Apply one committed command: its response, or an EtcdError (see the module docs)."""
        try:
            request = decode(command)
        except ValueError as exc:
            return errors.invalid(str(exc))
        try:
            if isinstance(request, pb.PutRequest):
                return self._write(lambda: self._put(request), pb.PutResponse)
            if isinstance(request, pb.DeleteRangeRequest):
                # (its prev_kvs are an answer too: over gRPC's limit it could not be sent,
                # and the keys would be gone with the client told it failed)
                self._read_budget = MAX_TXN_READ_BYTES if request.prev_kv else None
                try:
                    return self._write(lambda: self._delete(request), pb.DeleteRangeResponse)
                finally:
                    self._read_budget = None
            if isinstance(request, pb.TxnRequest):
                self._read_budget = MAX_TXN_READ_BYTES
                try:
                    return self._write(lambda: self._txn(request), pb.TxnResponse)
                finally:
                    self._read_budget = None
            if isinstance(request, pb.CompactionRequest):
                self.compact(request.revision)
                return self._header(pb.CompactionResponse())
            if isinstance(request, pb.LeaseGrantRequest):
                return self._grant(request)
            return self._write(lambda: self._revoke(request.ID), pb.LeaseRevokeResponse)
        except EtcdError as exc:
            return exc
        except Exception as exc:  # noqa: BLE001 - apply never raises (module docs)
            return errors.invalid(f"cannot apply the request: {exc!r}"[:300])

    def _header(self, response: Any) -> Any:
        response.header.revision = self.revision
        return response

    def _write(self, body, cls) -> Any:
        """Run ``body`` as one write: its changes get the next revision, together."""
        self._next_revision = self.revision + 1
        self._pending = []
        try:
            response = body()
        except Exception as exc:
            # Nothing of a failed write stays (and nothing escapes apply: the same command
            # fails the same way on every node).
            self._rollback()
            if isinstance(exc, EtcdError):
                raise
            raise errors.invalid(f"cannot apply the request: {exc!r}"[:300]) from None
        finally:
            events, self._pending = self._pending, None
        if response is None:
            response = cls()
        if events:
            self.revision = self._next_revision
            self._history.append(tuple(events))
            self.history_bytes += _history_bytes(events)
            self._history_ends.append(self._dropped_bytes + self.history_bytes)
            ends = self._event_ends
            ends.append((ends[-1] if ends else self._dropped_events) + len(events))
        return self._header(response)

    def _rollback(self) -> None:
        """Undo the changes of a write that failed part-way (in reverse)."""
        for ev in reversed(self._pending or ()):
            self._set(ev.key, ev.prev)

    def _set(self, key: bytes, rec: Record | None) -> None:
        """Make ``key`` hold ``rec`` (None: absent), keeping sizes and lease key sets."""
        old = self.kvs.get(key)
        if old is not None:
            self.size_bytes -= len(key) + len(old.value) + LIVE_KEY_OVERHEAD
            if old.lease:
                lease = self.leases.get(old.lease)
                if lease is not None:
                    lease.keys.discard(key)
        if rec is None:
            if old is not None:
                del self.kvs[key]
            return
        self.kvs[key] = rec
        self.size_bytes += len(key) + len(rec.value) + LIVE_KEY_OVERHEAD
        if rec.lease:
            lease = self.leases.get(rec.lease)
            if lease is not None:
                lease.keys.add(key)

    def _change(self, key: bytes, rec: Record | None) -> Record | None:
        """Record one change of the write under way; returns the key's previous record."""
        prev = self.kvs.get(key)
        self._set(key, rec)
        self._pending.append(Event(key, rec, prev, self._next_revision))
        return prev

    def _put(self, r: pb.PutRequest) -> pb.PutResponse:
        key = r.key
        if not key:
            raise errors.EMPTY_KEY
        prev = self.kvs.get(key)
        value, lease = r.value, r.lease
        if lease and lease not in self.leases:
            raise errors.LEASE_NOT_FOUND  # (etcd looks for the lease before the key)
        if r.ignore_value or r.ignore_lease:
            if prev is None:
                raise errors.KEY_NOT_FOUND
            if r.ignore_value:
                value = prev.value
            if r.ignore_lease:
                lease = prev.lease
        rev = self._next_revision
        if prev is None:
            rec = Record(key, value, rev, rev, 1, lease)
        else:
            rec = Record(key, value, prev.create, rev, prev.version + 1, lease)
        self._change(key, rec)
        response = pb.PutResponse()
        if r.prev_kv and prev is not None:
            self._charge(_RECORD_COST + len(prev.key) + len(prev.value))
            response.prev_kv.CopyFrom(kv_pb(prev))
        return response

    def _delete(self, r: pb.DeleteRangeRequest) -> pb.DeleteRangeResponse:
        if not r.key:
            raise errors.EMPTY_KEY
        response = pb.DeleteRangeResponse()
        keys = list(self._keys_in(r.key, r.range_end))
        for key in keys:
            prev = self._change(key, None)
            if r.prev_kv:
                self._charge(_RECORD_COST + len(key) + len(prev.value))
                response.prev_kvs.append(kv_pb(prev))
        response.deleted = len(keys)
        return response

    def _keys_in(self, key: bytes, range_end: bytes) -> Iterator[bytes]:
        bounds = range_of(key, range_end)
        if bounds is None:
            if key in self.kvs:
                yield key
            return
        lo, hi = bounds
        if hi is not None and hi <= lo:
            return
        yield from self.kvs.irange(lo, hi, inclusive=(True, False))

    # -- txn --------------------------------------------------------------------------------

    def _txn(self, r: pb.TxnRequest) -> pb.TxnResponse:
        # As etcd (compareToPath, checkRequests): the branch of the txn, and of every txn nested
        # in a branch taken, is chosen on the state before the txn, and the requests of those
        # branches checked on it too; only then do they run, in order.
        return self._run(r, iter(self._checked_path(r)))

    def _checked_path(self, r: pb.TxnRequest, below_zero: bool = False) -> list[bool]:
        """The branches ``r`` takes on this state (``_choose``), once its requests on them
        pass etcd's checks (``_check_ops``; EtcdError otherwise)."""
        path: list[bool] = []
        ops: list[pb.RequestOp] = []
        self._choose(r, 0, path, ops)
        self._check_ops(ops, below_zero)
        return path

    def _choose(
        self, r: pb.TxnRequest, depth: int, path: list[bool], ops: list[pb.RequestOp]
    ) -> None:
        """The branches taken (``path``, one a txn, depth first) and their requests but
        nested txns (``ops``, in order)."""
        if depth >= MAX_TXN_DEPTH:
            raise errors.invalid(f"txn nested more than {MAX_TXN_DEPTH} levels deep")
        ok = all(self._compare(c) for c in r.compare)
        path.append(ok)
        for op in r.success if ok else r.failure:
            if op.WhichOneof("request") == "request_txn":
                self._choose(op.request_txn, depth + 1, path, ops)
            else:
                ops.append(op)

    def txn_refusal(self, r: pb.TxnRequest) -> EtcdError | None:
        """What etcd refuses ``r`` with on this state (None: nothing), for the API to refuse
        it before it is proposed: the checks of its apply, and (as etcd's) a range at a
        negative revision below the first one kept (``_check_ops``). Changes nothing."""
        try:
            self._checked_path(r, below_zero=True)
        except EtcdError as exc:
            return exc
        return None

    def read_txn(self, r: pb.TxnRequest) -> pb.TxnResponse:
        """Answer a Txn that only reads (ranges, or nothing) from this state, writing
        nothing: etcd's serializable txn, answered by the member asked. Raises EtcdError as
        its apply would (``_check_ops`` with ``below_zero``), or for an answer over
        MAX_TXN_READ_BYTES."""
        self._read_budget = MAX_TXN_READ_BYTES
        try:
            path = self._checked_path(r, below_zero=True)
            self._next_revision = self.revision + 1  # (what _run's reads say they saw, less one)
            return self._header(self._run(r, iter(path)))
        finally:
            self._read_budget = None

    def _run(self, r: pb.TxnRequest, path: Iterator[bool]) -> pb.TxnResponse:
        ok = next(path)
        response = pb.TxnResponse(succeeded=ok)
        # Each op's header holds the revision it saw, as etcd's: a read or a delete, the one
        # before the txn until the txn has changed something, then the txn's; a put, the
        # txn's. A nested txn's own header is there, empty (etcd's).
        written = self._next_revision
        for op in r.success if ok else r.failure:
            which = op.WhichOneof("request")
            out = response.responses.add()
            if which == "request_range":
                out.response_range.CopyFrom(self.range(op.request_range, in_txn=True))
                out.response_range.header.revision = self._seen(written)
            elif which == "request_put":
                out.response_put.CopyFrom(self._put(op.request_put))
                out.response_put.header.revision = written
            elif which == "request_delete_range":
                out.response_delete_range.CopyFrom(self._delete(op.request_delete_range))
                out.response_delete_range.header.revision = self._seen(written)
            elif which == "request_txn":
                out.response_txn.CopyFrom(self._run(op.request_txn, path))
                out.response_txn.header.SetInParent()
            else:
                out.response_range.CopyFrom(pb.RangeResponse())  # (an empty RequestOp)
        return response

    def _seen(self, written: int) -> int:
        """The revision a txn's read or delete saw: the txn's own (``written``) once it has
        changed something, else the one before it."""
        return written if self._pending else written - 1

    def _check_ops(self, ops: list[pb.RequestOp], below_zero: bool = False) -> None:
        """As etcd does before applying a txn (checkRequests, once for its puts, then for its
        ranges): the leases its puts name exist, keys that ignore_value/ignore_lease exist,
        then its ranges' revisions can be read (else nothing of it is applied). ``below_zero``
        (not in apply: a log written before reads such a range at the current revision): a
        range at a negative revision below the first one kept (the compaction's; -1 before
        any) is refused as compacted, as etcd's ``checkRequestRange`` refuses it."""
        for op in ops:
            if op.WhichOneof("request") == "request_put":
                put = op.request_put
                if (put.ignore_value or put.ignore_lease) and put.key not in self.kvs:
                    raise errors.KEY_NOT_FOUND
                if put.lease and put.lease not in self.leases:
                    raise errors.LEASE_NOT_FOUND
        first_kept = self.compact_revision or -1
        for op in ops:
            if op.WhichOneof("request") == "request_range":
                revision = op.request_range.revision
                if revision > 0:
                    self.check_revision(revision)
                elif below_zero and revision < first_kept:
                    raise errors.COMPACTED

    def _charge(self, cost: int) -> None:
        """Count ``cost`` against the read budget of the Txn being applied (if one is)."""
        if self._read_budget is None:
            return
        self._read_budget -= cost
        if self._read_budget < 0:
            raise errors.invalid(
                f"the answer would be too big (more than {MAX_TXN_READ_BYTES} bytes of values "
                "read or prev_kv): nothing is written"
            )

    def _compare(self, c: pb.Compare) -> bool:
        if not c.key:
            raise errors.EMPTY_KEY
        bounds = range_of(c.key, c.range_end)
        if bounds is None:
            self._charge(_RECORD_COST)
            return self._compare_one(c, self.kvs.get(c.key))
        keys = list(self._keys_in(c.key, c.range_end))
        self._charge(_RECORD_COST * (len(keys) + 1))
        if not keys:  # (as etcd: an empty range compares like an absent key)
            return self._compare_one(c, None)
        return all(self._compare_one(c, self.kvs[k]) for k in keys)

    @staticmethod
    def _compare_one(c: pb.Compare, rec: Record | None) -> bool:
        target = c.target
        if target == _CMP.VALUE:
            if rec is None:
                return False  # (etcd: a value compare on an absent key fails)
            mine, theirs = rec.value, c.value
        elif target == _CMP.VERSION:
            mine, theirs = (rec.version if rec else 0), c.version
        elif target == _CMP.CREATE:
            mine, theirs = (rec.create if rec else 0), c.create_revision
        elif target == _CMP.MOD:
            mine, theirs = (rec.mod if rec else 0), c.mod_revision
        elif target == _CMP.LEASE:
            mine, theirs = (rec.lease if rec else 0), c.lease
        else:
            return False
        result = c.result
        if result == _CMP.EQUAL:
            return mine == theirs
        if result == _CMP.NOT_EQUAL:
            return mine != theirs
        if result == _CMP.GREATER:
            return mine > theirs
        if result == _CMP.LESS:
            return mine < theirs
        return False

    # -- leases -----------------------------------------------------------------------------

    def _grant(self, r: pb.LeaseGrantRequest) -> Any:
        if r.ID == 0:
            return errors.invalid("a lease id is chosen before it is logged")
        if r.ID in self.leases:
            return errors.LEASE_EXIST
        if r.TTL > MAX_LEASE_TTL:
            return errors.LEASE_TTL_TOO_LARGE
        self.leases[r.ID] = Lease(r.ID, max(r.TTL, 1))
        self.lease_changes += 1
        self.lease_log.append(r.ID)
        return self._header(pb.LeaseGrantResponse(ID=r.ID, TTL=max(r.TTL, 1)))

    def _revoke(self, lease_id: int) -> pb.LeaseRevokeResponse:
        lease = self.leases.get(lease_id)
        if lease is None:
            raise errors.LEASE_NOT_FOUND
        for key in sorted(lease.keys):
            self._change(key, None)
        del self.leases[lease_id]
        self.lease_changes += 1
        self.lease_log.append(lease_id)
        return pb.LeaseRevokeResponse()

    # -- compaction -------------------------------------------------------------------------

    def compact(self, revision: int) -> None:
        """Forget the history up to ``revision`` (reads and watches before it fail).

        At once: ``compact_revision``, ``history_bytes`` (the same on every node). Not the
        memory: the events dropped are freed later, by the history reaper's thread, a revision
        at a time (``reaping``). Freed here, 5,000,000 events held each node's loop 0.6 s. What
        is left here is pointer work, per revision (not event) dropped or kept, whichever is
        cheaper: ~20 ms a million revisions at worst, nothing per event."""
        if revision <= self.compact_revision:
            raise errors.COMPACTED
        if revision > self.revision:
            raise errors.FUTURE_REV
        drop = revision - self._history_base + 1
        if drop > 0:
            ends = self._history_ends
            end = ends[drop - 1]
            freed = end - self._dropped_bytes
            self.history_bytes -= freed
            self._dropped_bytes = end
            del ends[:drop]  # (a memmove: ~5 ms for 8,000,000 revisions kept)
            self._dropped_events = self._event_ends[drop - 1]
            del self._event_ends[:drop]
            history = self._history
            # (each revision's tuple touched once or twice: ~10 ns each, out of the cache)
            if drop <= (len(history) - drop) // 2:
                dropped = history[:drop]  # (incref the ones dropped, ...)
                del history[:drop]  # (... decref them: none freed)
            else:
                dropped = history  # (the first ``drop`` of it; the others are kept in ...)
                self._history = history[drop:]  # (... a copy: incref the ones kept)
            self._history_base += drop
            if freed > _FREE_LATER_BYTES:
                _REAPER.take(dropped, drop)
            # (else freed here, with ``dropped``: a few thousand events at most)
        self.compact_revision = revision

    def __del__(self, _finalizing=sys.is_finalizing) -> None:
        # A store let go with a long history (a snapshot's frozen copy that a compaction outran,
        # the state a snapshot restore replaced) has it freed by the reaper too, not in the
        # thread that lets it go (the loop's). (Not at interpreter exit: freed then and there.)
        try:
            if self.history_bytes > _FREE_LATER_BYTES and not _finalizing():
                _REAPER.take(self._history, len(self._history))
        except Exception:  # noqa: BLE001, S110 - (at interpreter exit, or half-made)
            pass

    # -- reading ----------------------------------------------------------------------------

    def check_revision(self, revision: int) -> None:
        """EtcdError unless the state at ``revision`` (> 0) can be read."""
        if revision > self.revision:
            raise errors.FUTURE_REV
        if revision < self.compact_revision:
            raise errors.COMPACTED

    def range(self, r: pb.RangeRequest, in_txn: bool = False) -> pb.RangeResponse:
        """Answer a Range (raises EtcdError); header.revision is the store's revision."""
        response, records = self.range_records(r, in_txn)
        keys_only = r.keys_only
        response.kvs.extend([kv_pb(rec, keys_only) for rec in records])
        return response

    def range_records(
        self, r: pb.RangeRequest, in_txn: bool = False, view: list[Record] | None = None
    ) -> tuple[pb.RangeResponse, list[Record]]:
        """A Range's answer but for its ``kvs``, and the records they are made of (immutable:
        a caller may make them into messages later, a part at a time, as the store goes on).
        ``view``: the records at ``r.revision`` already read (``read_steps``)."""
        for step in self.range_records_steps(r, in_txn, view):
            if step is not None:
                return step
        raise AssertionError("range_records_steps ended without an answer")

    def range_records_steps(
        self, r: pb.RangeRequest, in_txn: bool = False, view: list[Record] | None = None
    ) -> Iterator[tuple[pb.RangeResponse, list[Record]] | None]:
        """``range_records`` in steps: None between parts of a filter or a sort of many
        records (``_WALK_PART`` at a time: a caller that awaits there lets the loop go on),
        the answer last. A sort of 1,000,000 records by value, or a filter of them, at once
        held the loop 0.2-0.3 s (three such reads at once cost the leader its term)."""
        if not r.key:
            raise errors.EMPTY_KEY
        rev = r.revision
        # (in a txn after a write, its revision too is read through the history: as etcd)
        if view is None and rev > 0 and (rev != self.revision or (in_txn and self._pending)):
            view = self._view_at(rev, r.key, r.range_end, self._pending if in_txn else None)
        bounds = range_of(r.key, r.range_end)
        if view is None:
            if bounds is None:
                rec = self.kvs.get(r.key)
                items = [] if rec is None else [rec]
            else:
                items = (self.kvs[k] for k in self._keys_in(r.key, r.range_end))
        else:
            items = view
        sort_order, target = r.sort_order, r.sort_target
        if sort_order not in _SORT_ORDERS or target not in _SORT_KEYS:
            raise errors.invalid(f"unknown sort order {sort_order} or target {target}")
        filtered = _filtered(r)
        # etcd sorts by another target ascending by default, but with a limit and no filter
        # it reads only limit + 1 keys first, in key order, and sorts those (etcd 3.4 and 3.5:
        # clients paging so get the same pages here)
        by_another = sort_order == _SORT.NONE and target != _SORT.KEY
        first_keys = by_another and not filtered
        if by_another:
            sort_order = _SORT.ASCEND
        plain = not filtered and _in_key_order(r)
        response = pb.RangeResponse()
        limit = min(r.limit, _INT64_MAX - 1) if r.limit > 0 else 0  # (islice takes limit + 1)
        if view is None and bounds is not None and _shortcut(r):
            # the common case: the newest state in key order; count by bisection, read only
            # limit + 1 records (none for a count: its order does not matter; a count of
            # 1,000,000 keys read them all, ~0.5 s of the loop)
            response.count = self._count(*bounds)
            out = [] if r.count_only else list(islice(items, limit + 1))
            # (a Txn's read budget is charged as when every key was read: a log applied
            # before this shortcut must end the same way now)
            looked_at = len(out) if plain and limit else response.count
            if len(out) > limit:
                out = out[:limit]
                response.more = True
        else:
            out = list(items)
            response.count = looked_at = len(out)
            if first_keys and limit:
                del out[limit + 1 :]
            if filtered:
                kept: list[Record] = []
                for start in range(0, len(out), _WALK_PART):
                    if start:
                        yield None
                    kept += [rec for rec in out[start : start + _WALK_PART] if _passes(rec, r)]
                out = kept
            if sort_order == _SORT.DESCEND or (sort_order == _SORT.ASCEND and target != _SORT.KEY):
                out = yield from _sorted_steps(out, _SORT_KEYS[target], sort_order == _SORT.DESCEND)
            if r.count_only:
                out = []  # (no kvs, hence never "more": as etcd)
            if limit and len(out) > limit:
                out = out[:limit]
                response.more = True
        keys_only = r.keys_only
        if self._read_budget is not None:
            self._charge(
                _RECORD_COST * (looked_at + 1)
                + sum(len(rec.key) + (0 if keys_only else len(rec.value)) for rec in out)
            )
        response.header.revision = self.revision
        yield response, out

    def count_in(self, key: bytes, range_end: bytes) -> int:
        """How many live keys the range (etcd's convention) holds, by bisection."""
        bounds = range_of(key, range_end)
        if bounds is None:
            return int(key in self.kvs)
        return self._count(*bounds)

    def read_cost(self, r: pb.RangeRequest) -> int:
        """About how many records (and events of the history) answering ``r`` inside a Txn
        looks at, from the newest state; by bisection and the history's running count of
        events, without reading them."""
        count = self.count_in(r.key, r.range_end)
        if r.revision > 0 and r.revision != self.revision:
            return count + self.events_since(r.revision)  # (its history walked too)
        if _filtered(r):
            return count
        if r.count_only:
            return 0
        return min(count, r.limit + 1) if _in_key_order(r) and r.limit > 0 else count

    def events_since(self, revision: int) -> int:
        """How many events the history holds of the revisions after ``revision`` (all it
        holds if that is before it)."""
        ends = self._event_ends
        if not ends:
            return 0
        start = revision + 1 - self._history_base  # (the first revision counted, as an index)
        if start >= len(ends):
            return 0
        before = ends[start - 1] if start > 0 else self._dropped_events
        return ends[-1] - before

    def _count(self, lo: bytes, hi: bytes | None) -> int:
        kvs = self.kvs
        end = len(kvs) if hi is None else kvs.bisect_left(hi)
        return max(end - kvs.bisect_left(lo), 0)

    def read_steps(self, r: pb.RangeRequest) -> Iterator[list[Record] | None] | None:
        """A Range outside a txn (its revision checked: EtcdError) that reads many records,
        read in steps, for ``range_records(r, view=...)``: ``None`` between parts (a caller
        that awaits there lets the loop go on), the records in key order last. None: read it
        at once (``range_records``): the current state of a key or of a range of at most
        ``_WALK_PART`` keys, or one the shortcuts answer (a ``limit`` in key order, a count).

        The revision read is taken by the first ``next`` (the store's then, or ``r``'s). The
        keyspace is walked ``_WALK_PART`` keys at a time while writes go on, then every change
        after that revision (made before the walk or during it) is undone, the history too
        walked a part at a time: 1,000,000 keys read at once held the loop ~0.2-0.5 s, and
        millions of revisions walked at once ~0.13 s a million (a leader past its election
        timeout). A compaction past that revision meanwhile ends it: EtcdError COMPACTED."""
        if not r.key:
            raise errors.EMPTY_KEY
        rev = r.revision
        if 0 < rev != self.revision:
            self.check_revision(rev)
            return self._read_steps(rev, r.key, r.range_end)
        bounds = range_of(r.key, r.range_end)
        if bounds is None or _shortcut(r) or self._count(*bounds) <= _WALK_PART:
            return None
        return self._read_steps(None, r.key, r.range_end)

    def _read_steps(
        self, rev: int | None, key: bytes, range_end: bytes
    ) -> Iterator[list[Record] | None]:
        rev = self.revision if rev is None else rev  # (at the first step)
        self.check_revision(rev)
        bounds = range_of(key, range_end)
        lo, hi = bounds if bounds is not None else (key, key + b"\0")  # (one key)
        kvs = self.kvs
        walked: list[Record] = []
        first = True
        while True:
            keys = list(islice(kvs.irange(lo, hi, inclusive=(first, False)), _WALK_PART))
            walked += map(kvs.__getitem__, keys)
            if len(keys) < _WALK_PART:
                break
            lo, first = keys[-1], False
            yield None
        self.check_revision(rev)  # (a compaction past it meanwhile took the changes to undo)
        history = self._history[max(rev + 1 - self._history_base, 0) :]
        undo: dict[bytes, Record | None] = {}
        yield from _undo_steps(history, key, bounds, undo)
        if undo:
            walked = [rec for rec in walked if rec.key not in undo]
            walked += [rec for rec in undo.values() if rec is not None]
            walked.sort(key=_BY_KEY)  # (nearly sorted: ~0.06 s for 1,000,000)
        yield walked

    def _view_at(
        self, rev: int, key: bytes, range_end: bytes, pending: list[Event] | None = None
    ) -> list[Record]:
        """The records of the range as they were at revision ``rev`` (checked), by key, at
        once (a Txn's read: bounded when proposed); ``pending``: the changes so far of a txn
        under way (newer still)."""
        self.check_revision(rev)
        bounds = range_of(key, range_end)
        undo: dict[bytes, Record | None] = {}
        history = self._history[max(rev + 1 - self._history_base, 0) :]
        if pending:
            history.append(tuple(pending))
        if self._read_budget is not None:
            self._charge(_RECORD_COST * sum(len(events) + 1 for events in history))
        current = {k: self.kvs[k] for k in self._keys_in(key, range_end)}
        for _ in _undo_steps(history, key, bounds, undo):
            pass  # (at once)
        current.update(undo)
        return [current[k] for k in sorted(current) if current[k] is not None]

    def events_at(self, revision: int) -> tuple[Event, ...]:
        """The events of ``revision`` (at most the store's; EtcdError COMPACTED if gone)."""
        if revision <= self.compact_revision:
            raise errors.COMPACTED
        if revision < self._history_base:
            return ()  # (revision 1: the empty store's)
        return self._history[revision - self._history_base]

    def events_from(
        self, revision: int, max_events: int = 1000, max_bytes: int | None = None
    ) -> tuple[list[Event], int]:
        """Events of revisions ``revision``.. (whole revisions, about ``max_events`` of them
        and ``max_bytes`` of them (``Event.nbytes``) at most, at least one revision) and the
        revision to read next. EtcdError COMPACTED if that history is gone."""
        if revision <= self.compact_revision:
            raise errors.COMPACTED
        i = max(revision - self._history_base, 0)
        out: list[Event] = []
        history = self._history
        size = 0
        while i < len(history):
            events = history[i]
            if not out and len(events) > max_events:  # (one revision alone: not sized)
                out.extend(events)
                i += 1
                break
            if max_bytes is not None:
                size += sum(e.nbytes() for e in events)
                if out and size > max_bytes:
                    break
            if out and len(out) + len(events) > max_events:
                break
            out.extend(events)
            i += 1
        return out, self._history_base + i

    def puts_at_steps(
        self, rev: int, key: bytes, range_end: bytes, part: int = _HISTORY_PART
    ) -> Iterator[list[Record] | None]:
        """The records of the range written at revision ``rev``, as they were then, by key:
        the puts of ``rev`` even once its events are compacted away (a watcher at the
        compaction revision gets them). Found in steps, as ``read_steps``: ``None`` after
        each ``part`` keys or events looked at, the last item the records. A key not changed
        since ``rev`` still has ``mod == rev``; one changed since has its record at ``rev``
        as the ``prev`` of its first event after ``rev``. Neither walk holds an iterator
        across steps, so the store may go on meanwhile (a key looked at before a change is
        also found in the history: the same record). EtcdError (COMPACTED) if ``rev`` is
        compacted away between steps."""
        self.check_revision(rev)
        bounds = range_of(key, range_end)
        found: dict[bytes, Record] = {}
        if bounds is None:
            rec = self.kvs.get(key)
            if rec is not None and rec.mod == rev:
                found[key] = rec
        elif bounds[1] is None or bounds[0] < bounds[1]:
            lo, hi = bounds
            first = True
            while True:
                # (from the last key looked at, anew each step: the keys may have changed)
                keys = self.kvs.irange(lo, hi, inclusive=(first, False))
                taken = 0
                for k in islice(keys, part):
                    rec = self.kvs[k]
                    if rec.mod == rev:
                        found[k] = rec
                    lo = k
                    taken += 1
                if taken < part:
                    break
                first = False
                yield None
                self.check_revision(rev)
        seen: set[bytes] = set()
        r = rev + 1  # (by revision, not index: a compaction up to rev moves the indexes)
        walked = 0
        while r <= self.revision:
            events = self._history[r - self._history_base]
            for ev in events:
                if ev.key not in seen and in_range(ev.key, key, bounds):
                    seen.add(ev.key)
                    if ev.prev is not None and ev.prev.mod == rev:
                        found[ev.key] = ev.prev
            walked += 1 + len(events)
            r += 1
            if walked >= part:
                walked = 0
                yield None
                self.check_revision(rev)
        yield [found[k] for k in sorted(found)]

    # -- snapshots --------------------------------------------------------------------------

    def frozen(self) -> MVCCStore:
        """A copy of the state as of now, cheap to take (records are shared: immutable), for
        ``dump`` (and reads of its records and history; its leases' key sets are the store's)."""
        twin = MVCCStore()
        twin.revision = self.revision
        twin.compact_revision = self.compact_revision
        # (only dumped, in the snapshot thread: the keys in order and the records as the dict
        # holds them, ~35 ms of the loop for 1,000,000 keys here; a SortedDict's copy rebuilt
        # it, 0.87 s, and the records read key by key took 0.1-0.3 s)
        records = list(dict.values(self.kvs))
        twin.kvs = _KeyOrder(list(self.kvs.keys()), records)  # type: ignore[assignment]
        # (only dumped: the leases' ids and TTLs, which a Lease never changes; the Lease objects
        # are shared, their key sets the store's. Each copied, 100,000 leases took 0.15-0.25 s)
        twin.leases = self.leases.copy()
        twin.size_bytes = self.size_bytes
        twin.history_bytes = self.history_bytes
        twin._history = list(self._history)  # (~8 ms a million revisions)
        twin._history_base = self._history_base
        twin._history_ends = self._history_ends[:]
        twin._event_ends = self._event_ends[:]
        twin._dropped_events = self._dropped_events
        twin._dropped_bytes = self._dropped_bytes
        twin._next_revision = self._next_revision
        return twin

    def dump(self) -> bytes:
        """The whole state, deterministic (two nodes that applied the same entries give the
        same bytes). Layout (little-endian)::

            magic "RFE1" | revision q | compact_revision q | history_base q
            | count Q | records (key-ordered)        record: klen I | key | value record
            | leases Q | (id q, ttl q) by id         value record: vlen I | value | create q
            | revisions Q | per revision: n I | n events   | mod q | version q | lease q
            event: klen I | key | flags B (1: after, 2: prev) | value records
            | crc32 I of everything before
        """
        out = bytearray(b"RFE1")
        out += _Q3.pack(self.revision, self.compact_revision, self._history_base)
        out += _U64.pack(len(self.kvs))
        for key, rec in self.kvs.items():
            out += _U32.pack(len(key))
            out += key
            _put_record(out, rec)
        out += _U64.pack(len(self.leases))
        for lease_id in sorted(self.leases):
            out += _Q2.pack(lease_id, self.leases[lease_id].ttl)
        out += _U64.pack(len(self._history))
        for events in self._history:
            out += _U32.pack(len(events))
            for ev in events:
                out += _U32.pack(len(ev.key))
                out += ev.key
                out.append((ev.after is not None) | (ev.prev is not None) << 1)
                if ev.after is not None:
                    _put_record(out, ev.after)
                if ev.prev is not None:
                    _put_record(out, ev.prev)
        out += _U32.pack(zlib.crc32(out))
        return bytes(out)

    @classmethod
    def load(cls, data: bytes | memoryview) -> MVCCStore:
        """The store a ``dump`` holds; CorruptionError if it is not an intact one."""
        mv = memoryview(data)
        if len(mv) < 4 + _Q3.size + 3 * _U64.size + _U32.size or bytes(mv[:4]) != b"RFE1":
            raise CorruptionError("not an etcd keyspace snapshot (bad magic or too short)")
        end = len(mv) - _U32.size
        if zlib.crc32(mv[:end]) != _U32.unpack_from(mv, end)[0]:
            raise CorruptionError("etcd keyspace snapshot CRC mismatch")
        reader = _Reader(mv, 4, end)
        store = cls()
        store.revision, store.compact_revision, store._history_base = reader.take(_Q3)
        items = []
        for _ in range(reader.take(_U64)[0]):
            key = reader.bytes_()
            items.append((key, reader.record(key)))
        for _ in range(reader.take(_U64)[0]):
            lease_id, ttl = reader.take(_Q2)
            store.leases[lease_id] = Lease(lease_id, ttl)
        history = []
        ends = store._history_ends
        event_ends = store._event_ends
        rev = store._history_base
        total = 0
        # (a record the history holds twice, as a change's ``after`` and the next change's
        # ``prev``, is one object, as when applied: dumped twice, it was loaded twice, and a
        # node restored from a snapshot held its history in twice the memory)
        last: dict[bytes, Record] = {}
        for _ in range(reader.take(_U64)[0]):
            events = []
            for _ in range(reader.take(_U32)[0]):
                key = reader.bytes_()
                (flags,) = reader.take(_U8)
                after = reader.record(key, rev) if flags & 1 else None
                prev = None
                if flags & 2:
                    prev = reader.record(key)
                    seen = last.get(key)
                    if seen is not None and seen == prev:
                        prev = seen
                if after is not None:
                    last[key] = after
                events.append(Event(key, after, prev, rev))
            history.append(tuple(events))
            total += _history_bytes(events)
            ends.append(total)
            event_ends.append((event_ends[-1] if event_ends else 0) + len(events))
            rev += 1
        if reader.pos != end:
            raise CorruptionError("etcd keyspace snapshot has trailing bytes")
        keys = [k for k, _ in items]
        if not all(a < b for a, b in zip(keys, keys[1:], strict=False)):
            raise CorruptionError("etcd keyspace snapshot keys are not ascending")
        if store.revision < 1 or rev - 1 != store.revision and history:
            raise CorruptionError("etcd keyspace snapshot history does not end at its revision")
        # (fed by a generator, not the list: from a list the dict is built in one C call that
        # holds the GIL, ~0.2 s for 1M keys, and a follower's loop waits for a restore made
        # in a worker thread; a generator's bytecode lets the loop's thread in every 5 ms)
        store.kvs = SortedDict((key, _same(last, key, rec)) for key, rec in items)
        store._history = history
        for key, rec in items:
            store.size_bytes += len(key) + len(rec.value) + LIVE_KEY_OVERHEAD
            if rec.lease in store.leases:
                store.leases[rec.lease].keys.add(key)
        store.history_bytes = total
        return store

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MVCCStore) and self.dump() == other.dump()


def _undo_steps(
    history: list[tuple[Event, ...]],
    key: bytes,
    bounds: tuple[bytes, bytes | None] | None,
    undo: dict[bytes, Record | None],
) -> Iterator[None]:
    """Fill ``undo`` with each key of the range that ``history`` changed -> its record before
    it (None: absent), walking newest first (the oldest change's prev stays); None after each
    ``_HISTORY_PART`` events, for a caller that lets the loop go on between parts."""
    count = 0
    for events in reversed(history):
        for ev in reversed(events):
            if in_range(ev.key, key, bounds):
                undo[ev.key] = ev.prev
        count += len(events)
        if count >= _HISTORY_PART:
            count = 0
            yield None


def _history_bytes(events: list[Event] | tuple[Event, ...]) -> int:
    """What ``events`` count for in ``history_bytes``: keys, values after, EVENT_OVERHEAD."""
    return sum(
        [len(e.key) + len(e.after.value) if e.after is not None else len(e.key) for e in events]
    ) + EVENT_OVERHEAD * len(events)


class _Reaper:
    """Frees the history a compaction dropped, in a daemon thread of its own, one revision's
    events at a time: what a node's state is (revisions, ``history_bytes``) changes at once in
    apply; only the memory comes back later. Between two revisions the loop's thread may take
    the interpreter back (every 5 ms when both want it: one C call freeing millions of events,
    ``list.clear()``, would keep it the whole time), and after every ``_REAP_PART`` events the
    reaper offers it (``time.sleep(0)``), so a busy loop goes on nearly at full speed."""

    def __init__(self) -> None:
        self._parts: deque[tuple[list[tuple[Event, ...]], int]] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self.pending = 0  # revisions handed over, not yet freed

    def take(self, revisions: list[tuple[Event, ...]], count: int) -> None:
        """Free the first ``count`` of ``revisions`` (a list no one else holds) later; the
        others, still the store's, are only let go of. (At interpreter exit, where no thread
        starts, the caller frees them.)"""
        if sys.is_finalizing():
            return
        with self._cond:
            self._parts.append((revisions, count))
            self.pending += count
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="raftfast-history-reaper", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        cond, parts = self._cond, self._parts
        while True:
            with cond:
                while not parts:
                    cond.wait()
                revisions, count = parts.popleft()
            while len(revisions) > count:  # (let go of: no event freed, ~2 ns a revision)
                del revisions[max(count, len(revisions) - _REAP_PART * 16) :]
                time.sleep(0)
            freed = 0
            while revisions:
                freed += len(revisions.pop())  # (the events of one revision freed here)
                if freed >= _REAP_PART:
                    freed = 0
                    time.sleep(0)  # (lets another thread that waits for the GIL in)
            with cond:
                self.pending -= count

    def _after_fork(self) -> None:
        # (in a child, no reaper runs, and its lock may have been held: the next take starts
        # one, which frees what is left too)
        self._cond = threading.Condition()
        self._thread = None


_REAPER = _Reaper()
os.register_at_fork(after_in_child=_REAPER._after_fork)


def reaping() -> int:
    """How many revisions of compacted history are not freed yet (the reaper's work)."""
    return _REAPER.pending


def _sorted_steps(records: list[Record], key: Any, reverse: bool) -> Iterator[None | list[Record]]:
    """``sorted(records, key=key, reverse=reverse)`` (as stable), in steps (``yield from``:
    None between them, the sorted list its value): parts of ``_WALK_PART`` sorted one at a
    time, then merged ``_WALK_PART`` records at a time."""
    if len(records) <= _WALK_PART:
        return sorted(records, key=key, reverse=reverse)
    runs = []
    for start in range(0, len(records), _WALK_PART):
        runs.append(sorted(records[start : start + _WALK_PART], key=key, reverse=reverse))
        yield None
    merged = heapq.merge(*runs, key=key, reverse=reverse)  # (stable: earlier runs first)
    out: list[Record] = []
    while len(out) < len(records):
        out += islice(merged, _WALK_PART)
        yield None
    return out


def _filtered(r: pb.RangeRequest) -> bool:
    """``r`` keeps only records of some mod or create revisions."""
    return bool(
        r.min_mod_revision or r.max_mod_revision or r.min_create_revision or r.max_create_revision
    )


def _in_key_order(r: pb.RangeRequest) -> bool:
    return r.sort_target == _SORT.KEY and r.sort_order in (_SORT.NONE, _SORT.ASCEND)


def _shortcut(r: pb.RangeRequest) -> bool:
    """A Range of the current state answered without reading every record of its range: a
    ``limit`` in key order reads ``limit + 1``, a count without filter none (by bisection)."""
    filtered = _filtered(r)
    return (not filtered and _in_key_order(r) and r.limit > 0) or (r.count_only and not filtered)


def _passes(rec: Record, r: pb.RangeRequest) -> bool:
    return not (
        (r.min_mod_revision and rec.mod < r.min_mod_revision)
        or (r.max_mod_revision and rec.mod > r.max_mod_revision)
        or (r.min_create_revision and rec.create < r.min_create_revision)
        or (r.max_create_revision and rec.create > r.max_create_revision)
    )


_SORT_ORDERS = (_SORT.NONE, _SORT.ASCEND, _SORT.DESCEND)
_SORT_KEYS = {
    _SORT.KEY: attrgetter("key"),
    _SORT.VERSION: attrgetter("version"),
    _SORT.CREATE: attrgetter("create"),
    _SORT.MOD: attrgetter("mod"),
    _SORT.VALUE: attrgetter("value"),
}
_BY_KEY = _SORT_KEYS[_SORT.KEY]


_U8 = struct.Struct("<B")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_Q2 = struct.Struct("<qq")
_Q3 = struct.Struct("<qqq")
_REC = struct.Struct("<qqqq")


def _put_record(out: bytearray, rec: Record) -> None:
    out += _U32.pack(len(rec.value))
    out += rec.value
    out += _REC.pack(rec.create, rec.mod, rec.version, rec.lease)


class _Reader:
    def __init__(self, mv: memoryview, pos: int, end: int) -> None:
        self.mv, self.pos, self.end = mv, pos, end

    def _advance(self, n: int) -> int:
        at = self.pos
        if n > self.end - at:
            raise CorruptionError(f"etcd keyspace snapshot truncated at offset {at}")
        self.pos = at + n
        return at

    def take(self, st: struct.Struct) -> tuple:
        return st.unpack_from(self.mv, self._advance(st.size))

    def bytes_(self) -> bytes:
        (n,) = self.take(_U32)
        at = self._advance(n)
        return bytes(self.mv[at : at + n])

    def record(self, key: bytes, rev: int | None = None) -> Record:
        """The next value record, of ``key``; ``rev``: the revision being read (its int object
        shared by the records made then, as when applied)."""
        value = self.bytes_()
        create, mod, version, lease = self.take(_REC)
        if mod == rev:
            mod = rev
            if create == rev:
                create = rev
        return Record(key, value, create, mod, version, lease)


def _same(last: dict[bytes, Record], key: bytes, rec: Record) -> Record:
    """``rec``, or the equal record the history holds (one object, as when applied)."""
    seen = last.get(key)
    return seen if seen is not None and seen == rec else rec
