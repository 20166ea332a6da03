"""etcd's Watch: one bidirectional stream carries many watchers.

Every node applies every entry, so a watcher on any member (leader or not) sees every change,
and goes on across leader changes. A watcher is a cursor over the store's history
(``MVCCStore.events_from``): its next revision. After each apply, and when a watcher is
created, each stream sends its watchers the events they have not had yet, whole revisions in
order, each event once: a watcher from a past revision reads the history first, then goes on
live with no gap and no repeat. As etcd's, the watchers of a stream that have caught up are
found by the keys of new events, so a revision costs its events and the watchers they match;
the others (new, behind) read the history each on its own. A watcher whose next revision was
compacted away is canceled with ``compact_revision`` set (etcd's "required revision has been
compacted"); as with etcd, not at the compaction revision itself (etcd keeps that revision's
puts, not its deletes: a watcher may start there and gets those). A slow client costs little
more than its cursor: what it has not read stays in the history, and gRPC's flow control
holds the sender, which keeps the answers of one call (about ``_CALL_BYTES``) until the client
takes them. What all streams keep so is bounded node-wide (``MAX_UNSENT_WATCH_BYTES``): past
that, the stream whose client has taken nothing for the longest is ended (UNAVAILABLE: etcd's
clients watch again from the last revision they read) so that the others go on.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from bisect import bisect_left
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import suppress
from typing import TYPE_CHECKING

import grpc

from raftfast.etcd import errors
from raftfast.etcd.errors import EtcdError
from raftfast.etcd.mvcc import Event, Record, event_pb, in_range, kv_pb, range_of
from raftfast.heap import release_free_memory_soon
from raftfast.proto.etcd import kv_pb2 as mvccpb
from raftfast.proto.etcd import rpc_pb2 as pb
from raftfast.proto.etcd import rpc_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from raftfast.etcd.api import EtcdAPI

__all__ = ["MAX_UNSENT_WATCH_BYTES", "MAX_WATCH_STREAMS", "MAX_WATCHERS_PER_STREAM", "WatchService"]

log = logging.getLogger(__name__)

MAX_WATCHERS_PER_STREAM = 10_000
MAX_WATCH_STREAMS = 4_096  # open Watch streams, node-wide
MAX_EVENTS_PER_RESPONSE = 1_000
# What the watchers of a node may hold (their keys, and _WATCHER_BYTES each): a create beyond
# it is refused (one stream of 30 MiB keys took 1.5 GB).
MAX_WATCH_BYTES = 256 * 1024 * 1024
_WATCHER_BYTES = 512
# Answers a stream holds for a client that does not read them: the stream stops reading its
# requests until they are sent (else a client that only writes grows the node without bound).
_MAX_OUTBOX = 1_000
# A stream's requests are taken in batches of at most this many, or this long, the loop let go
# between (a gRPC read waits for its completion queue already; this holds whatever gRPC does).
_READ_BATCH = 64
_READ_BATCH_S = 0.005
# Answers built and not yet taken by gRPC, node-wide (the yield that sends one returns once
# gRPC took it; a client that does not read holds it there: HTTP/2 flow control). 400 streams
# whose clients stopped reading held 1 GB (each held its last call's answers, ~1.5 MiB built,
# and a copy in gRPC; 4,096 streams may be open: 10-16 GB). Past this bound a stream waits
# before it builds more, and the stream whose client has taken nothing for the longest (at
# least _STALLED_S) is ended. 128 MiB, as the one-request answers' (MAX_UNREAD_ANSWER_BYTES,
# raftfast.server.handlers): each costs up to twice its size while gRPC sends it (these bytes
# and gRPC's copy).
MAX_UNSENT_WATCH_BYTES = 128 * 1024 * 1024
# What one call of _Stream.pending builds, about (the answer of one revision may be more): what
# a stream whose client does not read holds (it was max_request_bytes, 1.5 MiB, and more).
_CALL_BYTES = 256 * 1024
# A response holds whole revisions of about this many bytes (a revision is split only past
# max_request_bytes or MAX_EVENTS_PER_RESPONSE events): gRPC keeps the answer it was given until
# the client reads it, even once the stream is ended (its status waits behind it: HTTP/2), so
# what a stream ended to make room keeps is one answer of about this size or one revision.
_RESPONSE_BYTES = 64 * 1024
# A revision's answer for a watcher that did not ask for fragments is one message up to this
# size (gRPC sends none over tcp.MAX_RECORD_BYTES, 64 MiB); past it, in parts (_Stream.serialized).
_WHOLE_REVISION_BYTES = 60 * 1024 * 1024
# The parts of revisions all streams hold to send them whole (_Stream.serialized), at most:
# apart from MAX_UNSENT_WATCH_BYTES, which they must not fill (they cannot be sent yet: a
# stream whose own parts took the room waited for it, then was ended, again and again).
MAX_JOINING_WATCH_BYTES = 64 * 1024 * 1024
# A stream holding answers its client has not taken for this long may be ended to make room;
# a client that reads takes an answer of _CALL_BYTES in milliseconds.
_STALLED_S = 2.0
# Once none are held, the heap's free pages go back to the system if this many were held (as
# after unread one-request answers: raftfast.server.handlers).
_TRIM_AFTER_BYTES = 32 * 1024 * 1024
# How a stream that had to make way ends: UNAVAILABLE is what etcd's clients (clientv3, so
# etcdctl and Kubernetes; etcd3aio) take for "watch again": they open a new stream from the
# revision after the last one they read, and miss nothing (on RESOURCE_EXHAUSTED they give up).
_ENDED = (
    grpc.StatusCode.UNAVAILABLE,
    "etcdserver: watch stream ended: its client has not read its answers for {s:.0f} s and this "
    "node holds {limit} bytes of watch answers not read, its most; watch again from the last "
    "revision read",
)
PROGRESS_NOTIFY_S = 600.0  # etcd's default progress-notify interval
# Progress notifications one call of _Stream.pending makes (the others in the next calls): a
# stream's 10,000 watchers all due at once held the loop for seconds.
_PROGRESS_PER_CALL = 500
# Keys and events of the keyspace and history one step of a walk for a watcher at the
# compaction revision looks at (each counts _WALK_COST against the bytes of a call).
_WALK_PART = 1_000
_WALK_COST = 64
# What looking at one watcher costs a call of _Stream.pending (against the bytes of a call,
# as _WALK_COST): ~9 us each, and a put matched by 50,000 watchers held the loop 0.45 s.
_WATCHER_COST = 1536
# Events of new revisions one call finds the synced watchers of, by key (whole revisions, at
# least one): each costs a lookup, and a range watcher a search of them, sorted.
_ROUTE_EVENTS = 4_096
_ROUTE_COST = 8  # (against the bytes of a call: a lookup an event, against 64 a watcher's look)
_NOPUT = pb.WatchCreateRequest.NOPUT
_NODELETE = pb.WatchCreateRequest.NODELETE


_NEGATIVE_START = "etcdserver: start_revision must not be negative"


class _Watcher:
    __slots__ = ("id", "key", "range_end", "bounds", "next_rev", "skip", "prev_kv", "noput",
                 "nodelete", "progress_notify", "fragment", "last_sent", "walk")  # fmt: skip

    def __init__(self, watch_id: int, r: pb.WatchCreateRequest, next_rev: int) -> None:
        self.id = watch_id
        self.key = r.key
        self.range_end = r.range_end
        self.bounds = range_of(r.key, r.range_end)
        self.next_rev = next_rev
        self.skip = 0  # events of revision next_rev already sent (a revision sent in parts)
        self.prev_kv = r.prev_kv
        self.noput = _NOPUT in r.filters
        self.nodelete = _NODELETE in r.filters
        self.progress_notify = r.progress_notify
        self.fragment = r.fragment
        self.last_sent = time.monotonic()
        # at the compaction revision: the walk under way for its puts (_Stream._at_compaction)
        self.walk: Iterator[list[Record] | None] | None = None

    def wants(self, ev: Event) -> bool:
        if ev.after is None:
            if self.nodelete:
                return False
        elif self.noput:
            return False
        return in_range(ev.key, self.key, self.bounds)


class _Stream:
    """One Watch call's watchers and what it has to send."""

    def __init__(self, api: EtcdAPI, budget: _Budget | None = None) -> None:
        self.api = api
        self.budget = budget if budget is not None else _Budget()
        self.cost = 0  # what its watchers take of the budget
        self.watchers: dict[int, _Watcher] = {}
        self.outbox: deque[pb.WatchResponse] = deque()
        self.wake = asyncio.Event()
        self.drained = asyncio.Event()  # the outbox was emptied
        self.progress_wanted = False
        self._next_id = 0
        self.done = False
        # Answers built and not yet taken by gRPC (serialized: WatchService.unsent), their
        # bytes, the bytes of the one gRPC is sending, and since when its client has taken
        # none of them (the last one taken, or the first built).
        self.unsent: deque[bytes] = deque()
        self.held = 0
        self.in_flight = 0
        self.since = 0.0
        self.context: grpc.aio.ServicerContext | None = None  # (how it is ended: WatchService)
        self.ended = False  # (ended from outside its handler: WatchService.end)
        self.ending: asyncio.Task[None] | None = None  # (its status being sent)
        # etcd's synced and unsynced watchers. Those that had every event up to _synced_rev
        # are found by the keys of new events (_by_key: one key; _ranged: a range), so that a
        # revision costs its events and the watchers it matches, not every watcher (10,000
        # watchers of keys no one wrote and a DeleteRange of 50,000 keys were 500 million
        # checks). The others (``_behind``: new, behind, in the middle of a big revision, at
        # the compaction revision) each read the history from their own next revision, and
        # join the first once they reach it.
        self._synced_rev = api.store.revision
        self._by_key: dict[bytes, dict[int, _Watcher]] = {}
        self._ranged: dict[int, _Watcher] = {}
        self._behind: dict[int, _Watcher] = {}
        # Watchers from a revision still to come, soonest first: (start, order, watcher); one
        # canceled meanwhile is let go when its turn comes. Kept apart, they cost a call
        # nothing until then (10,000 of them were looked at twice in every call).
        self._future: list[tuple[int, int, _Watcher]] = []
        self._made = 0
        self._progress = 0  # watchers that asked for progress notifications
        # The parts of a revision so far, serialized, of the watchers that did not ask for
        # fragments (``serialized``), by watch id: [their bytes, part, part...], sent whole.
        self._joining: dict[int, list] = {}
        self.joining_bytes = 0

    def take(self, request: pb.WatchRequest) -> None:
        if not isinstance(request, pb.WatchRequest):  # (handlers.Malformed: did not parse)
            raise EtcdError(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        which = request.WhichOneof("request_union")
        if which == "create_request":
            self._create(request.create_request)
        elif which == "cancel_request":
            watch_id = request.cancel_request.watch_id
            if self._drop(watch_id):
                self.outbox.append(
                    pb.WatchResponse(header=self.api.header(), watch_id=watch_id, canceled=True)
                )
        elif which == "progress_request":
            self.progress_wanted = True
        self.wake.set()

    def _create(self, r: pb.WatchCreateRequest) -> None:
        api, store = self.api, self.api.store
        watch_id = r.watch_id
        refusal = None
        if watch_id < 0:
            refusal = "etcdserver: watch id must not be negative"
        elif watch_id and watch_id in self.watchers:
            refusal = "mvcc: duplicate watch ID provided on the WatchStream"  # (etcd's text)
        elif r.range_end and r.range_end != b"\0" and (r.key or b"\0") >= r.range_end:
            refusal = "mvcc: watcher range is empty"  # (etcd's: it would never fire)
        elif len(self.watchers) >= MAX_WATCHERS_PER_STREAM:
            refusal = f"etcdserver: at most {MAX_WATCHERS_PER_STREAM} watchers on one stream"
        elif r.start_revision < 0:
            refusal = _NEGATIVE_START
        elif r.ByteSize() > api.driver.settings.max_request_bytes:
            refusal = errors.REQUEST_TOO_LARGE.message
        elif self.budget.used + _cost(r) > self.budget.limit:
            refusal = f"etcdserver: too many watchers on this node ({self.budget.limit} bytes)"
        if refusal is not None:
            self.outbox.append(
                pb.WatchResponse(
                    header=api.header(),
                    watch_id=-1,
                    created=True,
                    canceled=True,
                    cancel_reason=refusal,
                    # (etcd 3.4 cancels a watch from a negative revision as compacted once
                    # it compacted: clients that read only this field raise rather than wait)
                    compact_revision=store.compact_revision if refusal == _NEGATIVE_START else 0,
                )
            )
            return
        if not watch_id:
            while self._next_id in self.watchers:
                self._next_id += 1
            watch_id = self._next_id
            self._next_id += 1
        start = r.start_revision or store.revision + 1
        self.outbox.append(pb.WatchResponse(header=api.header(), watch_id=watch_id, created=True))
        if start < store.compact_revision:  # (etcd: minRev < compactRev)
            self.outbox.append(self._compacted(watch_id))
            return
        if not r.key:
            r.key = b"\0"  # (etcd: the smallest key; with range_end "\0", every key)
        self.watchers[watch_id] = w = _Watcher(watch_id, r, start)
        if start > store.revision + 1:
            self._made += 1
            heapq.heappush(self._future, (start, self._made, w))
        else:
            self._behind[watch_id] = w
        self._progress += r.progress_notify
        self.cost += _cost(r)
        self.budget.used += _cost(r)

    def _drop(self, watch_id: int) -> bool:
        """Forget watcher ``watch_id``; whether there was one."""
        w = self.watchers.pop(watch_id, None)
        if w is None:
            return False
        if self._behind.pop(watch_id, None) is None:
            self._unindex(w)
        future = self._future
        if len(future) > 2 * len(self.watchers) + 64:
            # (cancelled ones wait in the heap for their revision: a stream that creates and
            # cancels watches of a revision to come held them all; kept to about its watchers)
            future[:] = [f for f in future if self.watchers.get(f[2].id) is f[2]]
            heapq.heapify(future)
        self._progress -= w.progress_notify
        self.cost -= _cost(w)
        self.budget.used -= _cost(w)
        return True

    def close(self) -> None:
        """The stream ended: its watchers go."""
        self.budget.used -= self.cost
        self.cost = 0
        self._progress = 0
        self._by_key.clear()
        self._ranged.clear()
        self._behind.clear()
        self._future.clear()
        self.watchers.clear()
        self._joining.clear()
        self.joining_bytes = 0

    # -- the synced watchers, by key --------------------------------------------------------

    def _index(self, w: _Watcher) -> None:
        """``w`` had every event up to _synced_rev: found by key from now on."""
        if w.bounds is None:
            self._by_key.setdefault(w.key, {})[w.id] = w
        else:
            self._ranged[w.id] = w

    def _unindex(self, w: _Watcher) -> None:
        if w.bounds is None:
            same = self._by_key.get(w.key)
            if same is not None:
                same.pop(w.id, None)
                if not same:
                    del self._by_key[w.key]
        else:
            self._ranged.pop(w.id, None)

    def _demote(self, w: _Watcher, next_rev: int) -> None:
        """``w`` reads the history on its own again, from ``next_rev``."""
        self._unindex(w)
        w.next_rev, w.skip = next_rev, 0
        self._behind[w.id] = w

    def _route(self, max_bytes: int, call_bytes: int) -> tuple[list[pb.WatchResponse], int, int]:
        """The synced watchers' events of the revisions after _synced_rev (whole revisions,
        about _ROUTE_EVENTS events, at least one revision), found by key: the responses, the
        work spent and the bytes built (as ``pending`` counts them). A watcher whose share is
        more than one response or than the call has room for is demoted (``_behind``: the
        calls after send it in parts); the others have had everything up to the new
        _synced_rev."""
        store = self.api.store
        first = self._synced_rev + 1
        if first > store.revision:
            return [], 0, 0
        if not self._by_key and not self._ranged:
            self._synced_rev = store.revision
            return [], 0, 0
        if first <= store.compact_revision:  # (compacted meanwhile: each sees to it alone)
            for w in [
                *self._ranged.values(),
                *(w for ws in self._by_key.values() for w in ws.values()),
            ]:
                self._demote(w, first)
            self._synced_rev = store.revision
            return [], 0, 0
        events: list[Event] = []
        rev = first
        while rev <= store.revision:
            of_rev = store.events_at(rev)
            if events and len(events) + len(of_rev) > _ROUTE_EVENTS:
                break
            events.extend(of_rev)
            rev += 1
        last = rev - 1
        # Each matched watcher is weighed by how many events it matched before any list of
        # them is made: one whose share is too big for a response or for what is left of the
        # call is demoted at once (1,000 prefix watchers and a DeleteRange of 50,000 keys
        # made 1,000 lists of 50,000 events first: 8 s and 200 MB in one call).
        spent = _ROUTE_COST * len(events)
        out: list[pb.WatchResponse] = []
        built = 0

        def serve(w: _Watcher, count: int, events_of: Callable[[], list[Event]]) -> None:
            nonlocal spent, built
            if (
                count > MAX_EVENTS_PER_RESPONSE
                or spent + _WATCHER_COST + 64 * count > max_bytes
                or built >= call_bytes
            ):
                self._demote(w, first)
                return
            spent += _WATCHER_COST + 64 * count
            chosen = [e for e in events_of() if w.wants(e)]
            if not chosen:
                return
            size = sum(e.nbytes() for e in chosen)
            if spent + size > max_bytes or built + size > call_bytes:
                self._demote(w, first)
                return
            spent += size
            built += size
            out.extend(self._responses(w, chosen, last, True, max_bytes))

        if self._by_key:
            hits: dict[bytes, list[Event]] = {}
            for e in events:
                if e.key in self._by_key:
                    hits.setdefault(e.key, []).append(e)
            for key, evs in hits.items():
                for w in list(self._by_key[key].values()):
                    serve(w, len(evs), lambda evs=evs: evs)
        if self._ranged:
            keys = [e.key for e in events]
            order = sorted(range(len(events)), key=keys.__getitem__)
            sorted_keys = [keys[i] for i in order]
            spent += 16 * len(self._ranged)
            for w in list(self._ranged.values()):
                lo, hi = w.bounds  # type: ignore[misc]  # (ranged: bounds is set)
                i = bisect_left(sorted_keys, lo)
                j = len(sorted_keys) if hi is None else bisect_left(sorted_keys, hi, i)
                if i < j:
                    serve(w, j - i, lambda i=i, j=j: [events[k] for k in sorted(order[i:j])])
        self._synced_rev = last
        return out, spent, built

    def _responses(
        self, w: _Watcher, chosen: list[Event], rev: int, whole: bool, max_bytes: int
    ) -> list[pb.WatchResponse]:
        """``chosen`` (events of ``w``'s revisions up to ``rev``: all of them if ``whole``,
        else a part of ``rev``'s) as responses of at most MAX_EVENTS_PER_RESPONSE events and
        about ``max_bytes`` (gRPC sends none over 64 MiB, and a watcher behind by more would
        never catch up), and of whole revisions of about _RESPONSE_BYTES (see there)."""
        parts: list[list[Event]] = [[]]
        size = 0
        for e in chosen:
            n = e.nbytes()
            part = parts[-1]
            if part and (
                len(part) >= MAX_EVENTS_PER_RESPONSE
                or size + n > max_bytes
                or (size + n > _RESPONSE_BYTES and e.revision != part[-1].revision)
            ):
                parts.append([])
                size = 0
            parts[-1].append(e)
            size += n
        out = []
        for i, part in enumerate(parts):
            if i + 1 < len(parts):  # (what it holds, to its last revision)
                upto = part[-1].revision
                more = parts[i + 1][0].revision == upto  # (the rest of it follows)
            else:  # (every revision looked at; or the one sent in parts, not all of it)
                upto, more = rev, not whole
            out.append(
                pb.WatchResponse(
                    header=self.api.header(upto),
                    watch_id=w.id,
                    events=[event_pb(e, w.prev_kv) for e in part],
                    fragment=more,  # (kept only for a watcher that asked: pending, serialized)
                )
            )
        w.last_sent = time.monotonic()
        return out

    def _compacted(self, watch_id: int) -> pb.WatchResponse:
        return pb.WatchResponse(
            header=self.api.header(),
            watch_id=watch_id,
            canceled=True,
            compact_revision=self.api.store.compact_revision,
            cancel_reason=errors.COMPACTED.message,
        )

    def _at_compaction(self, w: _Watcher, allowance: int) -> tuple[int, pb.WatchResponse | None]:
        """The events of the compaction revision, where ``w`` is (its history is gone, but
        etcd keeps the puts of that revision: they are the keys whose mod_revision it is, in
        the keyspace as of then; its deletes are lost, prev_kv too, as with etcd). The walk
        that finds them goes a step at a time (see ``MVCCStore.read_steps``: a walk at once
        held the loop for seconds) until ``allowance`` bytes are spent, and goes on in the next
        call. Returns the bytes spent and, once it is done (``w.next_rev`` past the revision),
        the response if any. EtcdError (COMPACTED) if the revision is compacted meanwhile."""
        rev = w.next_rev
        if w.noput:
            w.next_rev = rev + 1
            return 0, None
        if w.walk is None:
            w.walk = self.api.store.puts_at_steps(rev, w.key, w.range_end, _WALK_PART)
        spent = 0
        while True:
            records = next(w.walk)
            spent += _WALK_COST * _WALK_PART
            if records is not None:
                break
            if spent >= allowance:
                return spent, None
        w.walk = None
        w.next_rev = rev + 1
        if not records:
            return spent, None
        spent += sum(len(rec.key) + len(rec.value) + 64 for rec in records)
        events = [mvccpb.Event(type=mvccpb.Event.PUT, kv=kv_pb(rec)) for rec in records]
        w.last_sent = time.monotonic()
        return spent, pb.WatchResponse(header=self.api.header(rev), watch_id=w.id, events=events)

    def pending(self) -> list[pb.WatchResponse]:
        """``_pending``'s answers, a part of a revision marked ``fragment`` only for a watcher
        that asked for fragments."""
        out = self._pending()
        for r in out:
            if r.fragment and not self._wants_fragments(r.watch_id):
                r.fragment = False
        return out

    def serialized(self, may_hold: int) -> list[bytes]:
        """``_pending``'s answers as gRPC sends them (bytes). The parts of a revision, for a
        watcher that did not ask for fragments, go as one answer once it is whole (serialized
        answers joined are one: protobuf's repeated fields concatenate), as etcd sends each
        revision: clientv3 watches again after a broken stream from the last event's revision
        + 1, and lost the rest of a revision cut there (3,000 of a DeleteRange's 5,000 events
        seen, when a node was killed). The parts held meanwhile (``joining_bytes``) are at most
        ``may_hold`` bytes (the node's room for them: MAX_JOINING_WATCH_BYTES) and
        _WHOLE_REVISION_BYTES a watcher; past either, they go as they are, as before."""
        out: list[bytes] = []
        joining = self._joining
        for r in self._pending():
            part = r.fragment and not self._wants_fragments(r.watch_id)
            if part:
                r.fragment = False
            data = r.SerializeToString()
            held = joining.get(r.watch_id)
            if r.canceled or not r.events:  # (canceled: the rest of the revision is gone)
                if held is not None:
                    self.joining_bytes -= joining.pop(r.watch_id)[0]
                out.append(data)
                continue
            if held is None:
                if not part:
                    out.append(data)
                    continue
                held = joining[r.watch_id] = [0]
            held.append(data)
            held[0] += len(data)
            self.joining_bytes += len(data)
            if part and held[0] < _WHOLE_REVISION_BYTES and self.joining_bytes <= may_hold:
                continue
            del joining[r.watch_id]
            self.joining_bytes -= held[0]
            if part or held[0] >= _WHOLE_REVISION_BYTES:  # (too much to hold: in parts)
                out.extend(held[1:])
            else:
                out.append(b"".join(held[1:]))
        for watch_id in [i for i in joining if self.watchers.get(i) is None]:
            self.joining_bytes -= joining.pop(watch_id)[0]  # (its watcher is gone)
        return out

    def _wants_fragments(self, watch_id: int) -> bool:
        w = self.watchers.get(watch_id)
        return w is not None and w.fragment

    def _pending(self) -> list[pb.WatchResponse]:
        """What to send now: queued answers, then new events for each watcher (a bounded
        amount per watcher and call), then a progress answer once all have caught up. A call
        does about max_request_bytes of work (watchers looked at, walks, events) and builds
        about _CALL_BYTES of events (a revision's may be more): what the stream holds while
        its client does not read."""
        out = list(self.outbox)
        self.outbox.clear()
        self.drained.set()
        store = self.api.store
        max_bytes = self.api.driver.settings.max_request_bytes
        call_bytes = min(_CALL_BYTES, max_bytes)
        future, due = self._future, store.revision + 1
        while future and future[0][0] <= due:  # (their start has come)
            w = heapq.heappop(future)[2]
            if self.watchers.get(w.id) is w:
                self._behind[w.id] = w
        routed, spent, built = self._route(max_bytes, call_bytes)
        out.extend(routed)
        if self._synced_rev < store.revision:
            self.wake.set()  # (the next revisions in the next call)
        for w in list(self._behind.values()):
            if w.next_rev > store.revision:
                continue
            if spent >= max_bytes or built >= call_bytes:
                self.wake.set()  # (the others in the next call, at once: see Watch)
                break
            # (the next call begins with the others)
            self._behind[w.id] = self._behind.pop(w.id)
            # (a watcher in the middle of that revision lost the rest of it: compacted)
            if w.next_rev == store.compact_revision and not w.skip:
                try:
                    cost, response = self._at_compaction(w, max_bytes - spent)
                except EtcdError:
                    self._drop(w.id)
                    out.append(self._compacted(w.id))
                    continue
                spent += cost
                if response is not None:
                    out.append(response)
                    built += response.ByteSize()
                if w.next_rev == store.compact_revision:
                    self.wake.set()  # (its walk goes on in the next call)
                    continue
                if w.next_rev > store.revision:
                    continue
            spent += _WATCHER_COST
            try:
                events, whole = self._next_events(w, max(call_bytes - built, 1))
            except EtcdError:
                self._drop(w.id)
                out.append(self._compacted(w.id))
                continue
            if w.next_rev <= store.revision:
                self.wake.set()  # (it goes on in the next call)
            chosen = [e for e in events if w.wants(e)]
            spent += 64 * len(events)
            if chosen:
                size = sum(e.nbytes() for e in chosen)
                spent += size
                built += size
                rev = w.next_rev - 1 if whole else w.next_rev
                out.extend(self._responses(w, chosen, rev, whole, max_bytes))
        # those that reached the synced ones join them
        joining = self._synced_rev + 1
        for w in [w for w in self._behind.values() if w.next_rev == joining]:
            if not w.skip and w.walk is None:
                del self._behind[w.id]
                self._index(w)
        if self.progress_wanted and self.caught_up():
            self.progress_wanted = False
            out.append(pb.WatchResponse(header=self.api.header(), watch_id=-1))
        if not self._progress:
            return out
        now = time.monotonic()
        due = [
            w
            for w in self.watchers.values()
            if w.progress_notify and now - w.last_sent >= PROGRESS_NOTIFY_S
        ]
        # (caught_up once, not per watcher: it looks at every watcher)
        if due and self.caught_up():
            if len(due) > _PROGRESS_PER_CALL:
                due = due[:_PROGRESS_PER_CALL]
                self.wake.set()  # (the others in the next call)
            header = self.api.header()
            for w in due:
                w.last_sent = now
                out.append(pb.WatchResponse(header=header, watch_id=w.id))
        return out

    def _next_events(self, w: _Watcher, max_bytes: int) -> tuple[list[Event], bool]:
        """The events ``w`` looks at next, and whether they end a revision: whole revisions
        (about ``max_bytes`` of them, at least one), or the next MAX_EVENTS_PER_RESPONSE of one
        bigger than that (a DeleteRange of 50,000 keys was made into events for each watcher
        at once: 0.26 s with one watcher, an election with 20). Moves ``w`` past them."""
        store = self.api.store
        if w.skip:  # (in the middle of a big revision)
            events = store.events_at(w.next_rev)
            part = list(events[w.skip : w.skip + MAX_EVENTS_PER_RESPONSE])
            if w.skip + MAX_EVENTS_PER_RESPONSE < len(events):
                w.skip += MAX_EVENTS_PER_RESPONSE
                return part, False
            w.next_rev, w.skip = w.next_rev + 1, 0
            return part, True
        events, after = store.events_from(w.next_rev, MAX_EVENTS_PER_RESPONSE, max_bytes)
        if len(events) > MAX_EVENTS_PER_RESPONSE:  # (one revision, bigger than a response)
            # (its own: from revision 1, the first with events is 2; the header says it)
            w.next_rev, w.skip = events[0].revision, MAX_EVENTS_PER_RESPONSE
            return events[:MAX_EVENTS_PER_RESPONSE], False
        w.next_rev = after
        return events, True

    def caught_up(self) -> bool:
        revision = self.api.store.revision
        if self._synced_rev < revision and (self._by_key or self._ranged):
            return False
        if self._future and self._future[0][0] <= revision:
            return False
        return all(w.next_rev > revision for w in self._behind.values())


class _Budget:
    """The bytes the watchers of a node hold (MAX_WATCH_BYTES)."""

    def __init__(self, limit: int = MAX_WATCH_BYTES) -> None:
        self.limit = limit
        self.used = 0


def _cost(w: pb.WatchCreateRequest | _Watcher) -> int:
    return _WATCHER_BYTES + len(w.key) + len(w.range_end)


class WatchService(pb_grpc.WatchServicer):
    def __init__(self, api: EtcdAPI) -> None:
        self.api = api
        self.streams: set[_Stream] = set()
        self.budget = _Budget()
        # One stream looks for events at a time, and holds its turn for a loop turn: a write
        # matched by the watchers of many streams was made into answers for all of them in
        # one loop turn (50,000 watchers on 5 streams: 0.45 s, an election). Between two
        # streams' calls the loop now polls its sockets (a call does a bounded amount).
        self.turns = asyncio.Lock()
        # Bytes of answers built and not yet taken by gRPC (MAX_UNSENT_WATCH_BYTES); the
        # streams holding some, the one whose client has taken nothing for the longest first;
        # the streams waiting for room, in order; the ends under way (_end). ``stuck``: the
        # answers gRPC still holds for streams ended to make room (see _RESPONSE_BYTES).
        self.unsent = 0
        self.stuck = 0
        self.joining = 0  # (bytes the streams hold to send revisions whole: _Stream.serialized)
        self.peak = 0  # (of unsent + stuck, since none were held: _TRIM_AFTER_BYTES)
        self.holders: dict[_Stream, None] = {}
        self.waiting: deque[asyncio.Future[None]] = deque()
        self._ending: set[asyncio.Task[None]] = set()

    def notify(self) -> None:
        """After an apply: every stream looks for new events."""
        for stream in self.streams:
            stream.wake.set()

    async def Watch(  # noqa: N802 - gRPC naming
        self, request_iterator: AsyncIterator[pb.WatchRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchResponse | bytes]:
        leader_required = self.api.leader_required
        asked = await leader_required.check_stream(context)  # (etcd's "hasleader")
        if len(self.streams) >= MAX_WATCH_STREAMS:
            await context.abort(errors.TOO_MANY_REQUESTS.code, errors.TOO_MANY_REQUESTS.message)
        stream = _Stream(self.api, self.budget)
        stream.context = context
        self.streams.add(stream)
        # (ended with NO_LEADER once this member has known no leader for a while)
        no_leader = errors.NO_LEADER
        untrack = (
            leader_required.track(lambda: self.end(stream, no_leader.code, no_leader.message))
            if asked
            else None
        )
        reader = asyncio.get_running_loop().create_task(self._read(request_iterator, stream))
        driver = self.api.driver
        unsent = stream.unsent
        try:
            while not stream.done and not driver.stopping:
                stream.wake.clear()
                if not self._room():
                    await self._wait_for_room(stream)
                    continue
                async with self.turns:
                    if stream.done or not self._room():
                        continue  # (taken meanwhile)
                    # Serialized here, once: what the node holds is counted (gRPC passes bytes
                    # on as they are: raftfast.server.handlers._serialize).
                    before = stream.joining_bytes
                    built = stream.serialized(MAX_JOINING_WATCH_BYTES - self.joining + before)
                    self.joining += stream.joining_bytes - before
                    unsent.extend(built)
                    self._hold(stream, sum(map(len, built)))
                    del built
                    if unsent or stream.wake.is_set():
                        await asyncio.sleep(0)  # (the next stream's call in the next turn)
                self._wake_next()  # (the room it left, to the next stream waiting)
                if unsent:
                    while unsent and not stream.done:
                        data = unsent.popleft()
                        stream.in_flight = len(data)
                        yield data  # (back once gRPC took it: its client read enough)
                        stream.in_flight = 0
                        self._taken(stream, len(data))
                    continue
                if stream.wake.is_set():
                    await asyncio.sleep(0)  # (pending stopped short: the rest after others)
                    continue
                try:
                    async with asyncio.timeout(1.0):  # (not wait_for: a task each time)
                        await stream.wake.wait()
                except TimeoutError:
                    pass
            if stream.ended:
                if stream.ending is not None:
                    # (its status first: a handler that returned before it ended the call OK)
                    await stream.ending
                return
            if reader.done() and not reader.cancelled() and reader.exception() is not None:
                exc = reader.exception()
                if isinstance(exc, EtcdError):  # (a request that did not parse)
                    await context.abort(exc.code, exc.message)
                await context.abort(grpc.StatusCode.INTERNAL, f"watch stream failed: {exc!r}")
        finally:
            if untrack is not None:
                untrack()
            self._release(stream)
            self.streams.discard(stream)
            stream.close()
            reader.cancel()

    # -- what the streams hold for clients that do not read (MAX_UNSENT_WATCH_BYTES) ----------

    def _room(self) -> bool:
        """Whether a stream may build a call's answers."""
        return not self.unsent or self.unsent + _CALL_BYTES <= MAX_UNSENT_WATCH_BYTES

    def _hold(self, stream: _Stream, size: int) -> None:
        if not size:
            return
        if not stream.held:
            stream.since = time.monotonic()
            self.holders[stream] = None
        stream.held += size
        self.unsent += size
        self.peak = max(self.peak, self.unsent + self.stuck)

    def _taken(self, stream: _Stream, size: int) -> None:
        """gRPC took ``size`` bytes of ``stream``'s answers."""
        if stream.ended:
            self.stuck -= size  # (its client read after all)
            self._wake_next()
            return
        stream.held -= size
        self.unsent -= size
        self.holders.pop(stream, None)
        if stream.held:
            stream.since = time.monotonic()
            self.holders[stream] = None  # (last: its client reads)
        self._wake_next()

    def _release(self, stream: _Stream) -> None:
        """``stream`` ended: what it held is gone."""
        self.joining -= stream.joining_bytes
        stream.joining_bytes = 0
        if stream.ended:
            self.stuck -= stream.in_flight
        else:
            self.unsent -= stream.held
            self.holders.pop(stream, None)
        stream.held = stream.in_flight = 0
        stream.unsent.clear()
        self._wake_next()

    def _wake_next(self) -> None:
        if not self.unsent and not self.stuck and self.peak >= _TRIM_AFTER_BYTES:
            self.peak = 0
            release_free_memory_soon()
        while self.waiting and self._room():
            waiter = self.waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _wait_for_room(self, stream: _Stream) -> None:
        """Until there is room for ``stream`` to build a call's answers (``_room``): when the
        stream whose client has taken nothing for the longest has done so for _STALLED_S, it is
        ended; until then, room left as clients read goes to the streams waiting, in order."""
        loop = asyncio.get_running_loop()
        while not self._room() and not stream.done and not self.api.driver.stopping:
            oldest = next(iter(self.holders), None)
            if oldest is None:  # (cannot be: nothing held, nothing unsent)
                self.unsent = 0
                return
            stalled = time.monotonic() - oldest.since
            if stalled >= _STALLED_S:
                self._end(oldest, stalled)
                continue
            waiter: asyncio.Future[None] = loop.create_future()
            self.waiting.append(waiter)
            try:
                async with asyncio.timeout(_STALLED_S - stalled):
                    await waiter
            except TimeoutError:
                with suppress(ValueError):
                    self.waiting.remove(waiter)

    def _end(self, stream: _Stream, stalled: float) -> None:
        """End ``stream``, whose client has not read its answers for ``stalled`` seconds, to
        make room (``end``). A status, not a cancel of each watcher: answers it would not read
        either."""
        code, text = _ENDED
        message = text.format(s=stalled, limit=MAX_UNSENT_WATCH_BYTES)
        log.warning("%s (%d watchers)", message, len(stream.watchers))
        self.end(stream, code, message)

    def end(self, stream: _Stream, code: grpc.StatusCode, message: str) -> None:
        """End ``stream`` from outside its handler with status ``code``: the answers it built
        go, and it builds no more. gRPC has no way to drop the one it was given (neither a
        status nor cancelling the handler's task does: the status waits behind it, HTTP/2 flow
        control; the task's end leaves it in gRPC's hands): that one stays until the client
        reads it, and then the status, or goes away (``stuck``)."""
        if stream.ended:
            return
        self.unsent -= stream.held
        self.stuck += stream.in_flight
        self.holders.pop(stream, None)
        stream.ended = stream.done = True
        stream.held = 0
        stream.unsent.clear()
        self._wake_next()
        stream.wake.set()
        if stream.context is not None:
            task = asyncio.get_running_loop().create_task(abort_call(stream.context, code, message))
            stream.ending = task
            self._ending.add(task)
            task.add_done_callback(self._ending.discard)

    @staticmethod
    async def _read(requests: AsyncIterator[pb.WatchRequest], stream: _Stream) -> None:
        """The client's requests. When it closes its side the stream goes on sending events
        until the call ends (as etcd's does: a client may send its creates and close). Each
        request is taken alone, in bounded work (``_Stream.take``: a create does not look at
        the history, the stream's next calls do, a bounded amount each); a read waits for
        gRPC's completion queue, and the loop is let go at least every _READ_BATCH requests
        or _READ_BATCH_S seconds."""
        try:
            taken, since = 0, time.perf_counter()
            async for request in requests:
                stream.take(request)
                taken += 1
                if taken >= _READ_BATCH or time.perf_counter() - since >= _READ_BATCH_S:
                    await asyncio.sleep(0)
                    taken, since = 0, time.perf_counter()
                while len(stream.outbox) >= _MAX_OUTBOX and not stream.done:
                    stream.drained.clear()  # (until Watch takes them: see _MAX_OUTBOX)
                    await stream.drained.wait()
        except grpc.RpcError:
            stream.done = True  # (the client went away)
        except BaseException:
            stream.done = True
            raise
        finally:
            stream.wake.set()


async def abort_call(
    context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str
) -> None:
    """End a call from outside its handler (``WatchService.end``, ``LeaderRequired``)."""
    with suppress(Exception):  # (AbortError: done; or the call had ended meanwhile)
        await context.abort(code, message)
