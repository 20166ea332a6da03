"""etcd's Watch: one bidirectional stream carries many watchers.

Every node applies every entry, so a watcher on any member (leader or not) sees every change,
and goes on across leader changes. A watcher is a cursor over the store's history
(``MVCCStore.events_from``): its next revision. After each apply, and when a watcher is
created, each stream sends its watchers the events they have not had yet, whole revisions in
order, each event once: a watcher from a past revision reads the history first, then goes on
live with no gap and no repeat. A watcher whose next revision was compacted away is canceled
with ``compact_revision`` set (etcd's "required revision has been compacted"). A slow client
costs nothing but its cursor: what it has not read stays in the history, and gRPC's flow control
holds the sender.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc

from raftfast.etcd import errors
from raftfast.etcd.errors import EtcdError
from raftfast.etcd.mvcc import Event, in_range, range_of
from raftfast.proto.etcd import rpc_pb2 as pb
from raftfast.proto.etcd import rpc_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from raftfast.etcd.api import EtcdAPI

__all__ = ["MAX_WATCH_STREAMS", "MAX_WATCHERS_PER_STREAM", "WatchService"]

log = logging.getLogger(__name__)

MAX_WATCHERS_PER_STREAM = 10_000
MAX_WATCH_STREAMS = 4_096  # open Watch streams, node-wide
MAX_EVENTS_PER_RESPONSE = 1_000
PROGRESS_NOTIFY_S = 600.0  # etcd's default progress-notify interval
_NOPUT = pb.WatchCreateRequest.NOPUT
_NODELETE = pb.WatchCreateRequest.NODELETE


class _Watcher:
    __slots__ = ("id", "key", "bounds", "next_rev", "prev_kv", "noput", "nodelete",
                 "progress_notify", "fragment", "last_sent")  # fmt: skip

    def __init__(self, watch_id: int, r: pb.WatchCreateRequest, next_rev: int) -> None:
        self.id = watch_id
        self.key = r.key
        self.bounds = range_of(r.key, r.range_end)
        self.next_rev = next_rev
        self.prev_kv = r.prev_kv
        self.noput = _NOPUT in r.filters
        self.nodelete = _NODELETE in r.filters
        self.progress_notify = r.progress_notify
        self.fragment = r.fragment
        self.last_sent = time.monotonic()

    def wants(self, ev: Event) -> bool:
        if ev.after is None:
            if self.nodelete:
                return False
        elif self.noput:
            return False
        return in_range(ev.key, self.key, self.bounds)


class _Stream:
    """One Watch call's watchers and what it has to send."""

    def __init__(self, api: EtcdAPI) -> None:
        self.api = api
        self.watchers: dict[int, _Watcher] = {}
        self.outbox: deque[pb.WatchResponse] = deque()
        self.wake = asyncio.Event()
        self.progress_wanted = False
        self._next_id = 0
        self.done = False

    def take(self, request: pb.WatchRequest) -> None:
        which = request.WhichOneof("request_union")
        if which == "create_request":
            self._create(request.create_request)
        elif which == "cancel_request":
            watch_id = request.cancel_request.watch_id
            if self.watchers.pop(watch_id, None) is not None:
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
            refusal = "etcdserver: watcher ID already in use"  # (etcd's mvcc error text)
        elif len(self.watchers) >= MAX_WATCHERS_PER_STREAM:
            refusal = f"etcdserver: at most {MAX_WATCHERS_PER_STREAM} watchers on one stream"
        elif r.start_revision < 0:
            refusal = "etcdserver: start_revision must not be negative"
        if refusal is not None:
            self.outbox.append(
                pb.WatchResponse(
                    header=api.header(),
                    watch_id=-1,
                    created=True,
                    canceled=True,
                    cancel_reason=refusal,
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
        if start <= store.compact_revision:
            self.outbox.append(self._compacted(watch_id))
            return
        self.watchers[watch_id] = _Watcher(watch_id, r, start)

    def _compacted(self, watch_id: int) -> pb.WatchResponse:
        return pb.WatchResponse(
            header=self.api.header(),
            watch_id=watch_id,
            canceled=True,
            compact_revision=self.api.store.compact_revision,
            cancel_reason=errors.COMPACTED.message,
        )

    def pending(self) -> list[pb.WatchResponse]:
        """What to send now: queued answers, then new events for each watcher (a bounded
        amount per watcher and call), then a progress answer once all have caught up."""
        out = list(self.outbox)
        self.outbox.clear()
        store = self.api.store
        for w in list(self.watchers.values()):
            if w.next_rev > store.revision:
                continue
            try:
                events, w.next_rev = store.events_from(w.next_rev, MAX_EVENTS_PER_RESPONSE)
            except EtcdError:
                del self.watchers[w.id]
                out.append(self._compacted(w.id))
                continue
            chosen = [e for e in events if w.wants(e)]
            header = self.api.header(w.next_rev - 1)
            for i in range(0, len(chosen), MAX_EVENTS_PER_RESPONSE):
                part = chosen[i : i + MAX_EVENTS_PER_RESPONSE]
                more = i + MAX_EVENTS_PER_RESPONSE < len(chosen)
                out.append(
                    pb.WatchResponse(
                        header=header,
                        watch_id=w.id,
                        events=[e.to_pb(w.prev_kv) for e in part],
                        fragment=more and w.fragment,
                    )
                )
                w.last_sent = time.monotonic()
        if self.progress_wanted and self.caught_up():
            self.progress_wanted = False
            out.append(pb.WatchResponse(header=self.api.header(), watch_id=-1))
        now = time.monotonic()
        for w in self.watchers.values():
            if w.progress_notify and now - w.last_sent >= PROGRESS_NOTIFY_S and self.caught_up():
                w.last_sent = now
                out.append(pb.WatchResponse(header=self.api.header(), watch_id=w.id))
        return out

    def caught_up(self) -> bool:
        revision = self.api.store.revision
        return all(w.next_rev > revision for w in self.watchers.values())


class WatchService(pb_grpc.WatchServicer):
    def __init__(self, api: EtcdAPI) -> None:
        self.api = api
        self.streams: set[_Stream] = set()

    def notify(self) -> None:
        """After an apply: every stream looks for new events."""
        for stream in self.streams:
            stream.wake.set()

    async def Watch(  # noqa: N802 - gRPC naming
        self, request_iterator: AsyncIterator[pb.WatchRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchResponse]:
        if len(self.streams) >= MAX_WATCH_STREAMS:
            await context.abort(errors.TOO_MANY_REQUESTS.code, errors.TOO_MANY_REQUESTS.message)
        stream = _Stream(self.api)
        self.streams.add(stream)
        reader = asyncio.get_running_loop().create_task(self._read(request_iterator, stream))
        driver = self.api.driver
        try:
            while not stream.done and not driver.stopping:
                responses = stream.pending()
                if responses:
                    for response in responses:
                        yield response
                    continue
                stream.wake.clear()
                try:
                    await asyncio.wait_for(stream.wake.wait(), 1.0)
                except TimeoutError:
                    pass
            if reader.done() and not reader.cancelled() and reader.exception() is not None:
                exc = reader.exception()
                await context.abort(grpc.StatusCode.INTERNAL, f"watch stream failed: {exc!r}")
        finally:
            self.streams.discard(stream)
            reader.cancel()

    @staticmethod
    async def _read(requests: AsyncIterator[pb.WatchRequest], stream: _Stream) -> None:
        try:
            async for request in requests:
                stream.take(request)
        except asyncio.CancelledError:
            raise
        except grpc.RpcError:
            pass  # (the client went away)
        finally:
            stream.done = True
            stream.wake.set()
