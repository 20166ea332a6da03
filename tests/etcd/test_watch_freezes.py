"""Watch streams must not hold the event loop: one ``_Stream.pending()`` call does a bounded
amount of work however many watchers are due for a progress notification or start at the
compaction revision (the rest comes in later calls), and what the watchers get is unchanged.
Unit level: the real MVCCStore and _Stream, a fake api."""

from __future__ import annotations

import asyncio
import contextlib
from types import SimpleNamespace
from typing import Any

import pytest
from sortedcontainers import SortedDict

from raftfast.etcd import watch
from raftfast.etcd.mvcc import MVCCStore, encode, event_pb, in_range, kv_pb, range_of
from raftfast.proto.etcd import kv_pb2 as mvccpb
from raftfast.proto.etcd import rpc_pb2 as pb

MAX_BYTES = 1536 * 1024  # etcd's max request bytes
ALL = {"key": b"\x00", "range_end": b"\x00"}  # every key


def _api(store: MVCCStore, max_bytes: int = MAX_BYTES) -> Any:
    return SimpleNamespace(
        store=store,
        header=lambda rev=None: pb.ResponseHeader(revision=store.revision if rev is None else rev),
        driver=SimpleNamespace(settings=SimpleNamespace(max_request_bytes=max_bytes)),
        leader_required=SimpleNamespace(check_stream=_asks_for_none),
    )


async def _asks_for_none(context: Any) -> bool:
    return False  # (no call asks for a leader)


def _create(stream: watch._Stream, **fields: Any) -> None:
    stream.take(pb.WatchRequest(create_request=pb.WatchCreateRequest(**fields)))


def _put(store: MVCCStore, key: bytes, value: bytes = b"v") -> None:
    store.apply(encode(pb.PutRequest(key=key, value=value)))


def _drain(
    stream: watch._Stream, between: Any = None, limit: int = 10_000, take: Any = None
) -> list[list]:
    """``take()`` (``stream.pending`` unless given) until it has nothing more to send; what
    each call gave."""
    take = take or stream.pending
    calls = []
    for _ in range(limit):
        stream.wake.clear()
        out = take()
        calls.append(out)
        if not out and not stream.wake.is_set():
            return calls
        if between is not None:
            between()
    raise AssertionError("pending() never ran dry")


class _CountingDict(SortedDict):
    """A keyspace that counts the records read from it."""

    reads = 0

    def __getitem__(self, key: bytes) -> Any:
        _CountingDict.reads += 1
        return super().__getitem__(key)


# -- progress notifications -----------------------------------------------------------------


def test_progress_notify_due_watchers_cost_linear_and_bounded_per_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    n = 3_000
    store = MVCCStore()
    stream = watch._Stream(_api(store))
    for i in range(n):
        _create(stream, key=f"idle/{i}".encode(), progress_notify=True)
    assert len(stream.pending()) == n  # (the created answers)
    for w in stream.watchers.values():
        w.last_sent -= watch.PROGRESS_NOTIFY_S + 1
    checks = 0
    caught_up = stream.caught_up

    def counting() -> bool:
        nonlocal checks
        checks += 1
        return caught_up()

    monkeypatch.setattr(stream, "caught_up", counting)
    calls = _drain(stream)
    # whether all have caught up is asked once a call, not once per due watcher (quadratic)
    assert checks <= 2 * len(calls)
    # a bounded number of notifications a call, the others in the next calls
    assert max(len(out) for out in calls) <= 1_000
    ids = [r.watch_id for out in calls for r in out]
    assert sorted(ids) == sorted(stream.watchers)  # each watcher once
    assert all(not r.events and not r.canceled for out in calls for r in out)


def test_progress_notify_waits_until_caught_up() -> None:
    store = MVCCStore()
    for i in range(5):
        _put(store, f"k{i}".encode())
    stream = watch._Stream(_api(store, max_bytes=16))  # (a revision a call)
    _create(stream, key=b"idle", progress_notify=True)
    _create(stream, start_revision=1, **ALL)
    idle, behind = stream.watchers
    stream.watchers[idle].last_sent -= watch.PROGRESS_NOTIFY_S + 1
    responses = [r for out in _drain(stream) for r in out if not r.created]
    # the watcher behind gets its events first, the idle one its notification once, after
    assert [r.watch_id for r in responses] == [behind] * 5 + [idle]
    assert not responses[-1].events


# -- watchers at the compaction revision ----------------------------------------------------


def _compacted_store(keys: int, after: int) -> tuple[MVCCStore, int]:
    """``keys`` keys, compacted at the last of their puts, then ``after`` more puts."""
    store = MVCCStore()
    for i in range(keys):
        _put(store, f"k{i:08d}".encode())
    store.apply(encode(pb.CompactionRequest(revision=store.revision)))
    for i in range(after):
        _put(store, f"k{i % keys:08d}".encode(), b"w")
    return store, store.compact_revision


@pytest.mark.parametrize(("keys", "after"), [(20_000, 0), (2_000, 30_000)])
def test_at_compaction_walk_bounded_per_call(keys: int, after: int) -> None:
    watchers = 20
    store, crev = _compacted_store(keys, after)
    store.kvs = _CountingDict(store.kvs)
    stream = watch._Stream(_api(store))
    for _ in range(watchers):
        _create(stream, start_revision=crev, **ALL)
    reads: list[int] = []

    def count() -> None:
        reads.append(_CountingDict.reads)
        _CountingDict.reads = 0

    _CountingDict.reads = 0
    calls = _drain(stream, between=count)
    count()
    answers = [[r for r in out if r.events and r.header.revision == crev] for out in calls]
    # one call walks a bounded part of the keyspace and history (the old code walked them all,
    # once per watcher: 20 x 20,000 records in one call)
    assert max(reads) <= 60_000
    assert max(len(a) for a in answers) <= watchers // 4
    # and each watcher got the puts of the compaction revision once
    got = [r for a in answers for r in a]
    assert sorted(r.watch_id for r in got) == sorted(stream.watchers)
    assert {tuple((e.kv.key, e.kv.mod_revision) for e in r.events) for r in got} == {
        ((f"k{keys - 1:08d}".encode(), crev),)
    }


def _event(e: mvccpb.Event) -> tuple:
    kv, prev = e.kv, e.prev_kv
    return (e.type, kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version) + (
        prev.key,
        prev.value,
        prev.mod_revision,
    )


def _events(responses: list[pb.WatchResponse]) -> dict[int, list[tuple[int, list[tuple]]]]:
    """The events of each watcher: (header revision, events) a response."""
    by_id: dict[int, list[tuple[int, list[tuple]]]] = {}
    for r in responses:
        if r.events:
            assert not r.created and not r.canceled
            by_id.setdefault(r.watch_id, []).append(
                (r.header.revision, [_event(e) for e in r.events])
            )
    return by_id


@pytest.mark.parametrize("part", [1, 2, 1_000])
def test_at_compaction_same_events_while_store_moves(
    monkeypatch: pytest.MonkeyPatch, part: int
) -> None:
    """Walked in tiny steps, with writes between the calls (to keys written at the compaction
    revision, before and after the walk passes them): each watcher gets the puts of that
    revision as they were then, then every later event, once, in order (as etcd)."""
    monkeypatch.setattr(watch, "_WALK_PART", part, raising=False)
    store = MVCCStore()
    for k in (b"a", b"b", b"c", b"d", b"e", b"x"):
        _put(store, k, b"0")
    put = pb.RequestOp

    def put_op(key: bytes, value: bytes) -> Any:
        return put(request_put=pb.PutRequest(key=key, value=value))

    txn = pb.TxnRequest(
        success=[
            put_op(b"b", b"1"),
            put_op(b"d", b"1"),
            put_op(b"x", b"1"),
            put(request_delete_range=pb.DeleteRangeRequest(key=b"c")),
            put_op(b"f", b"1"),
        ]
    )
    store.apply(encode(txn))
    crev = store.revision
    then = store.frozen()  # the keyspace at the compaction revision
    _put(store, b"d", b"2")  # (changed before the walk)
    store.apply(encode(pb.CompactionRequest(revision=crev)))
    specs = [
        dict(ALL),
        {"key": b"a", "range_end": b"e"},
        {"key": b"d"},
        {"key": b"a"},
        {"key": b"b", "prev_kv": True},
        {"filters": [pb.WatchCreateRequest.NODELETE], **ALL},
        {"filters": [pb.WatchCreateRequest.NOPUT], **ALL},
    ]
    stream = watch._Stream(_api(store, max_bytes=256))
    for spec in specs:
        _create(stream, start_revision=crev, **spec)
    watchers = dict(stream.watchers)
    writes = iter(
        [
            lambda: _put(store, b"f", b"2"),
            lambda: store.apply(encode(pb.DeleteRangeRequest(key=b"b"))),
            lambda: _put(store, b"b", b"3"),
            lambda: _put(store, b"zz", b"1"),
            lambda: _put(store, b"x", b"2"),
        ]
    )

    def between() -> None:
        write = next(writes, None)
        if write is not None:
            write()

    calls = _drain(stream, between)
    for write in writes:  # (if the walk was over before they all were made)
        write()
    calls += _drain(stream)
    got = _events([r for out in calls for r in out])

    later, _ = store.events_from(crev + 1, 10**6)
    for wid, w in watchers.items():
        bounds = range_of(w.key, w.range_end)
        first = [
            kv_pb(rec)
            for k, rec in then.kvs.items()
            if rec.mod == crev and in_range(k, w.key, bounds) and not w.noput
        ]
        responses = got.get(wid, [])
        if first:  # (one response at the compaction revision, its puts by key)
            header, events = responses.pop(0)
            assert header == crev
            assert events == [_event(mvccpb.Event(type=mvccpb.Event.PUT, kv=kv)) for kv in first]
        expected = [_event(event_pb(e, w.prev_kv)) for e in later if w.wants(e)]
        assert [e for _, events in responses for e in events] == expected, w.key


def test_at_compaction_compacted_again_during_walk(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watch, "_WALK_PART", 1, raising=False)
    store, crev = _compacted_store(50, 5)
    stream = watch._Stream(_api(store, max_bytes=256))
    _create(stream, start_revision=crev, **ALL)
    stream.pending()
    store.apply(encode(pb.CompactionRequest(revision=crev + 2)))
    out = [r for call in _drain(stream) for r in call]
    assert out[-1].canceled and out[-1].compact_revision == crev + 2
    assert not stream.watchers


# -- fan-out: many watchers, big revisions --------------------------------------------------


def _big_delete(n: int) -> tuple[MVCCStore, watch._Stream]:
    """A store of ``n`` keys d/000000... (one revision per 128) and a stream on it."""
    store = MVCCStore()
    for i in range(0, n, 128):
        ops = [
            pb.RequestOp(request_put=pb.PutRequest(key=b"d/%06d" % j, value=b"v"))
            for j in range(i, min(i + 128, n))
        ]
        store.apply(encode(pb.TxnRequest(success=ops)))
    return store, watch._Stream(_api(store))


def test_a_big_revision_goes_to_a_watcher_in_parts_across_calls() -> None:
    # A DeleteRange of 50,000 keys was made into events for each watcher in one call (0.26 s
    # with one prev_kv watcher, an election with 20): now at most MAX_EVENTS_PER_RESPONSE
    # events of it per watcher and call, in order, fragments marked.
    n = 3 * watch.MAX_EVENTS_PER_RESPONSE + 7
    store, stream = _big_delete(n)
    _create(stream, key=b"d/", range_end=b"d0", prev_kv=True, fragment=True)
    _create(stream, key=b"d/000005")  # (one key of the revision: one event)
    assert len(stream.pending()) == 2  # (the created answers)
    store.apply(encode(pb.DeleteRangeRequest(key=b"d/", range_end=b"d0")))
    deleted_at = store.revision
    _put(store, b"d/after")
    calls = _drain(stream)
    by_watcher: dict[int, list[pb.WatchResponse]] = {0: [], 1: []}
    for call in calls:
        per_watcher = [r for r in call if r.events]
        assert all(len(r.events) <= watch.MAX_EVENTS_PER_RESPONSE for r in per_watcher)
        for r in per_watcher:
            by_watcher[r.watch_id].append(r)
    big = by_watcher[0]
    events = [e for r in big for e in r.events]
    assert [e.kv.key for e in events] == [b"d/%06d" % j for j in range(n)] + [b"d/after"]
    assert all(e.prev_kv.value == b"v" for e in events[:n])
    deletes = [r for r in big if r.header.revision == deleted_at]
    assert len(deletes) == 4 and [r.fragment for r in deletes] == [True, True, True, False]
    assert [len(r.events) for r in deletes] == [1000, 1000, 1000, 7]
    assert len(calls) >= 4  # (the parts came in calls of their own)
    small = [e.kv.key for r in by_watcher[1] for e in r.events]
    assert small == [b"d/000005"]


def _serialized_until_dry(stream: watch._Stream, may_hold: int = 1 << 40) -> list:
    """``serialized`` until it has nothing more to send: the answers, parsed."""
    calls = _drain(stream, limit=100, take=lambda: stream.serialized(may_hold))
    return [pb.WatchResponse.FromString(data) for call in calls for data in call]


def test_a_big_revision_goes_whole_to_a_watcher_that_did_not_ask_for_fragments() -> None:
    # clientv3 watches again after a broken stream from the last event's revision + 1: the
    # parts of a revision sent as answers of their own lost the rest of it (3,000 of a
    # DeleteRange's 5,000 events seen when the node was killed). etcd sends a revision whole.
    n = 3 * watch.MAX_EVENTS_PER_RESPONSE + 7
    store, stream = _big_delete(n)
    _create(stream, key=b"d/", range_end=b"d0", prev_kv=True)
    assert len(stream.serialized(0)) == 1  # (created)
    store.apply(encode(pb.DeleteRangeRequest(key=b"d/", range_end=b"d0")))
    deleted_at = store.revision
    _put(store, b"d/after")
    answers = _serialized_until_dry(stream)
    assert [len(r.events) for r in answers] == [n, 1]
    assert [r.header.revision for r in answers] == [deleted_at, deleted_at + 1]
    assert not any(r.fragment for r in answers)
    assert [e.kv.key for e in answers[0].events] == [b"d/%06d" % j for j in range(n)]
    assert all(e.type == mvccpb.Event.DELETE and e.prev_kv.value == b"v" for e in answers[0].events)
    assert stream.joining_bytes == 0


def test_past_the_room_for_held_parts_a_revision_goes_in_parts_as_before() -> None:
    n = 3 * watch.MAX_EVENTS_PER_RESPONSE + 7
    store, stream = _big_delete(n)
    _create(stream, key=b"d/", range_end=b"d0")
    stream.serialized(0)
    store.apply(encode(pb.DeleteRangeRequest(key=b"d/", range_end=b"d0")))
    answers = _serialized_until_dry(stream, may_hold=0)
    assert [len(r.events) for r in answers] == [1000, 1000, 1000, 7]
    assert [e.kv.key for r in answers for e in r.events] == [b"d/%06d" % j for j in range(n)]
    assert stream.joining_bytes == 0


def test_the_held_parts_of_a_watcher_canceled_in_the_middle_of_a_revision_are_let_go() -> None:
    # ... and not joined to the first answer of a new watcher given the same id (a review).
    store, stream = _big_delete(3 * watch.MAX_EVENTS_PER_RESPONSE)
    _create(stream, key=b"d/", range_end=b"d0")
    stream.serialized(1 << 40)
    store.apply(encode(pb.DeleteRangeRequest(key=b"d/", range_end=b"d0")))
    assert stream.serialized(1 << 40) == [] and stream.joining_bytes > 0  # (a part, held)
    stream.take(pb.WatchRequest(cancel_request=pb.WatchCancelRequest(watch_id=0)))
    _create(stream, key=b"other", watch_id=0)
    _put(store, b"other")
    answers = _serialized_until_dry(stream)
    assert stream.joining_bytes == 0
    assert [(r.canceled, r.created) for r in answers[:2]] == [(True, False), (False, True)]
    assert [[e.kv.key for e in r.events] for r in answers[2:]] == [[b"other"]]


def test_parts_held_to_send_a_revision_whole_never_take_the_room_for_answers(monkeypatch):
    # They were counted in MAX_UNSENT_WATCH_BYTES: a stream whose held parts filled it waited
    # for room only it held, and was ended as stalled though its client had read everything;
    # watching again did the same (a review). Scaled down: 2 MiB of room, ~1 MiB a watcher.
    monkeypatch.setattr(watch, "MAX_UNSENT_WATCH_BYTES", 2 * 1024 * 1024)
    monkeypatch.setattr(watch, "_STALLED_S", 0.3)
    n, watchers = 3000, 3
    store = MVCCStore()
    for i in range(0, n, 100):
        ops = [
            pb.RequestOp(request_put=pb.PutRequest(key=b"d/%06d" % j, value=b"v" * 300))
            for j in range(i, i + 100)
        ]
        store.apply(encode(pb.TxnRequest(success=ops)))
    api = _api(store)
    api.driver.stopping = False
    service = watch.WatchService(api)
    create = pb.WatchRequest(
        create_request=pb.WatchCreateRequest(
            key=b"d/", range_end=b"d0", prev_kv=True, start_revision=store.revision + 1
        )
    )
    ended: list = []

    class Context:
        async def abort(self, code: object, message: str) -> None:
            ended.append(message)
            raise asyncio.CancelledError

    async def requests() -> Any:
        for _ in range(watchers):
            yield create
        await asyncio.Event().wait()  # (the client keeps its side open)

    async def main() -> int:
        store.apply(encode(pb.DeleteRangeRequest(key=b"d/", range_end=b"d0")))
        got = 0
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            async with asyncio.timeout(60):
                async for data in service.Watch(requests(), Context()):  # (read at once)
                    got += len(pb.WatchResponse.FromString(data).events)
                    if got >= watchers * n:
                        break
        return got

    assert asyncio.run(main()) == watchers * n, ended
    assert not ended


def test_one_call_looks_at_a_bounded_number_of_watchers() -> None:
    # A put matched by 50,000 watchers of 5 streams held the loop 0.45 s: each watcher looked
    # at now costs a call _WATCHER_COST, so a call stops after a bounded number of them.
    store = MVCCStore()
    stream = watch._Stream(_api(store))
    n = watch.MAX_WATCHERS_PER_STREAM
    for _ in range(n):
        _create(stream, key=b"k")
    stream.pending()
    _put(store, b"k")
    calls = _drain(stream)
    assert sum(len(c) for c in calls) == n  # (every watcher got the put, once)
    most = MAX_BYTES // watch._WATCHER_COST + 1
    assert max(len(c) for c in calls) <= most and len(calls) > n // most


def test_a_watcher_in_the_middle_of_a_revision_compacted_meanwhile_is_told_so() -> None:
    n = 2 * watch.MAX_EVENTS_PER_RESPONSE + 1
    store = MVCCStore()
    ops = [pb.RequestOp(request_put=pb.PutRequest(key=b"t/%05d" % j, value=b"v")) for j in range(n)]
    for i in range(0, n, 128):
        store.apply(encode(pb.TxnRequest(success=ops[i : i + 128])))
    stream = watch._Stream(_api(store))
    _create(stream, key=b"t/", range_end=b"t0")
    stream.pending()
    store.apply(encode(pb.DeleteRangeRequest(key=b"t/", range_end=b"t0")))
    first = [r for r in stream.pending() if r.events]
    assert len(first) == 1 and len(first[0].events) == watch.MAX_EVENTS_PER_RESPONSE
    store.apply(encode(pb.CompactionRequest(revision=store.revision)))  # (the delete's)
    answers = stream.pending()
    assert [r.canceled for r in answers] == [True] and answers[0].compact_revision > 0
    assert not stream.watchers
