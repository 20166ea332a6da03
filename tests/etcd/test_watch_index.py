"""Watchers that have caught up are found by the keys of new events (raftfast.etcd.watch:
etcd's synced watchers), the others read the history on their own: what each watcher gets must
be exactly what it watches, in order, once, whichever way it went; and a revision must cost
its events and the watchers they match, not every watcher of the stream (10,000 watchers of
keys no one wrote and a DeleteRange of 50,000 keys were 500 million checks: a hostile hunt).
Unit level: the real MVCCStore and _Stream, a fake api."""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Any

import pytest

from raftfast.etcd import watch
from raftfast.etcd.mvcc import MVCCStore, encode, in_range, range_of
from raftfast.proto.etcd import kv_pb2 as mvccpb
from raftfast.proto.etcd import rpc_pb2 as pb


def _api(store: MVCCStore, max_bytes: int) -> Any:
    return SimpleNamespace(
        store=store,
        header=lambda rev=None: pb.ResponseHeader(revision=store.revision if rev is None else rev),
        driver=SimpleNamespace(settings=SimpleNamespace(max_request_bytes=max_bytes)),
    )


ALL = {"key": b"\x00", "range_end": b"\x00"}  # every key


class _CountingWatchers(dict):
    """A stream's watchers, counting the passes over all of them."""

    passes = 0

    def values(self) -> Any:
        self.passes += 1
        return super().values()


KEYS = [b"a", b"a/1", b"a/2", b"ab", b"b", b"b/x", b"c", b"\x00", b"\xff"]
RANGES = [
    (b"a", b""),
    (b"a/", b"a0"),  # a prefix
    (b"a", b"b"),
    (b"b", b"\x00"),  # every key from b
    (b"\x00", b"\x00"),  # every key
    (b"c", b"a"),  # an empty range
    (b"\xff", b""),
    (b"nobody", b""),
]


class _Model:
    """Every event applied, kept here (the store forgets what is compacted)."""

    def __init__(self, store: MVCCStore) -> None:
        self.store = store
        self.events: list[tuple[int, bytes, bool, bytes, bytes | None]] = []
        self.compacted_at: set[int] = set()  # (every compaction revision)

    def apply(self, request: Any) -> None:
        before = self.store.revision
        self.store.apply(encode(request))
        self.compacted_at.add(self.store.compact_revision)
        for rev in range(before + 1, self.store.revision + 1):
            for e in self.store.events_at(rev):
                prev = None if e.prev is None else e.prev.value
                put = e.after is not None
                self.events.append((rev, e.key, put, e.after.value if put else b"", prev))

    def expected(self, r: pb.WatchCreateRequest, start: int) -> list[tuple]:
        key = r.key or b"\x00"
        bounds = range_of(key, r.range_end)
        out = []
        for rev, k, put, value, prev in self.events:
            if rev < start or not in_range(k, key, bounds):
                continue
            if (put and pb.WatchCreateRequest.NOPUT in r.filters) or (
                not put and pb.WatchCreateRequest.NODELETE in r.filters
            ):
                continue
            out.append((rev, k, put, value, prev if r.prev_kv else None))
        return out


def _got(e: mvccpb.Event, with_prev: bool) -> tuple:
    put = e.type == mvccpb.Event.PUT
    prev = e.prev_kv.value if with_prev and e.HasField("prev_kv") else None
    return (e.kv.mod_revision, e.kv.key, put, e.kv.value if put else b"", prev)


def _step(
    rng: random.Random, model: _Model, stream: watch._Stream, created: dict, answers: list
) -> None:
    store = model.store
    roll = rng.random()
    if roll < 0.35:
        model.apply(pb.PutRequest(key=rng.choice(KEYS), value=b"%d" % rng.randrange(1000)))
    elif roll < 0.42:
        model.apply(pb.DeleteRangeRequest(key=rng.choice(KEYS)))
    elif roll < 0.47:
        key, end = rng.choice(RANGES)
        model.apply(pb.DeleteRangeRequest(key=key, range_end=end))
    elif roll < 0.55:
        ops = [
            pb.RequestOp(request_put=pb.PutRequest(key=k, value=b"t%d" % i))
            for i, k in enumerate(rng.sample(KEYS, rng.randrange(1, 6)))
        ]
        model.apply(pb.TxnRequest(success=ops))
    elif roll < 0.57 and store.revision > 2:
        low = max(store.compact_revision, 1)
        model.apply(pb.CompactionRequest(revision=rng.randrange(low, store.revision + 1)))
    elif roll < 0.70:
        key, end = rng.choice(RANGES + [(k, b"") for k in KEYS])
        start = rng.choice([0, 0, 1, max(store.revision - rng.randrange(5), 1), store.revision + 2])
        filters = rng.choice(
            [[], [], [pb.WatchCreateRequest.NOPUT], [pb.WatchCreateRequest.NODELETE]]
        )
        r = pb.WatchCreateRequest(
            key=key, range_end=end, start_revision=start, filters=filters,
            prev_kv=rng.random() < 0.5, fragment=rng.random() < 0.5,
        )  # fmt: skip
        wid = 1000 + len(created)
        r.watch_id = wid
        created[wid] = (r, start or store.revision + 1)
        stream.take(pb.WatchRequest(create_request=r))
    elif roll < 0.74 and created:
        wid = rng.choice(list(created))
        stream.take(pb.WatchRequest(cancel_request=pb.WatchCancelRequest(watch_id=wid)))
    else:
        stream.wake.clear()
        answers.extend(stream.pending())


@pytest.mark.parametrize("seed", range(40))
def test_every_watcher_gets_exactly_what_it_watches(seed: int) -> None:
    rng = random.Random(seed)
    store = MVCCStore()
    model = _Model(store)
    # small calls in some runs: watchers go behind, in parts, and back
    stream = watch._Stream(_api(store, rng.choice([200, 2_000, 1536 * 1024])))
    answers: list[pb.WatchResponse] = []
    created: dict[int, tuple[pb.WatchCreateRequest, int]] = {}
    for _ in range(400):
        _step(rng, model, stream, created, answers)
    for _ in range(10_000):  # until it has nothing more to send
        stream.wake.clear()
        out = stream.pending()
        answers.extend(out)
        if not out and not stream.wake.is_set():
            break
    else:
        raise AssertionError("pending() never ran dry")
    assert stream.caught_up()
    got: dict[int, list[tuple]] = {wid: [] for wid in created}
    ended: dict[int, str] = {}
    last_header: dict[int, int] = {}
    for r in answers:
        if r.watch_id not in created:
            continue
        assert r.watch_id not in ended, "an answer after the watcher ended"
        if r.canceled:
            ended[r.watch_id] = "compacted" if r.compact_revision else "canceled"
            continue
        req = created[r.watch_id][0]
        for e in r.events:
            assert e.kv.mod_revision <= r.header.revision
            got[r.watch_id].append(_got(e, req.prev_kv))
        if r.events:
            assert r.header.revision >= last_header.get(r.watch_id, 0)
            last_header[r.watch_id] = r.header.revision
        assert not r.fragment or req.fragment

    # A watcher read at a compaction revision gets its puts alone, without prev_kv (as from
    # etcd: its deletes are gone); whether one does depends on when its stream looked.
    def as_if_compacted(events: list[tuple]) -> list[tuple]:
        return [
            (rev, k, put, value, None if rev in model.compacted_at else prev)
            for rev, k, put, value, prev in events
            if put or rev not in model.compacted_at
        ]

    for wid, (req, start) in created.items():
        want = as_if_compacted(model.expected(req, start))
        got[wid] = as_if_compacted(got[wid])
        if wid in ended:  # (canceled: what came before is the start of what it watches)
            assert got[wid] == want[: len(got[wid])], wid
        else:
            assert got[wid] == want, wid


def test_a_revision_costs_its_events_not_every_watcher(monkeypatch: pytest.MonkeyPatch) -> None:
    store = MVCCStore()
    n_keys = 5_000
    for i in range(0, n_keys, 500):
        ops = [
            pb.RequestOp(request_put=pb.PutRequest(key=b"d/%06d" % j, value=b"v"))
            for j in range(i, i + 500)
        ]
        store.apply(encode(pb.TxnRequest(success=ops)))
    stream = watch._Stream(_api(store, 1536 * 1024))
    n_watchers = 2_000
    for i in range(n_watchers):
        stream.take(pb.WatchRequest(create_request=pb.WatchCreateRequest(key=b"idle/%d" % i)))
    stream.take(pb.WatchRequest(create_request=pb.WatchCreateRequest(key=b"d/000007")))
    stream.take(pb.WatchRequest(create_request=pb.WatchCreateRequest(key=b"d/", range_end=b"d0")))
    assert len(stream.pending()) == n_watchers + 2  # (the created answers)
    looked = 0
    wants = watch._Watcher.wants

    def counting(self: watch._Watcher, ev: Any) -> bool:
        nonlocal looked
        looked += 1
        return wants(self, ev)

    monkeypatch.setattr(watch._Watcher, "wants", counting)
    store.apply(encode(pb.DeleteRangeRequest(key=b"d/", range_end=b"d0")))
    answers = []
    for _ in range(100):
        stream.wake.clear()
        answers += stream.pending()
        if not stream.wake.is_set():
            break
    events = {}
    for r in answers:
        events.setdefault(r.watch_id, []).extend(e.kv.key for e in r.events)
    assert events[n_watchers] == [b"d/000007"]
    assert events[n_watchers + 1] == [b"d/%06d" % j for j in range(n_keys)]
    assert set(events) == {n_watchers, n_watchers + 1}
    # the events each matched watcher gets, looked at once or twice; before, every watcher
    # looked at every event (10,000,000 here)
    assert looked <= 2 * (n_keys + 1)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"key": b"b", "range_end": b"a"}, "mvcc: watcher range is empty"),
        ({"key": b"a", "range_end": b"a"}, "mvcc: watcher range is empty"),
        ({"key": b"", "range_end": b"\x00"}, None),  # every key
        ({"key": b"a", "range_end": b"\x00"}, None),  # from a key
        ({"watch_id": 7}, "mvcc: duplicate watch ID provided on the WatchStream"),
    ],
)
def test_creates_etcd_refuses_are_refused_with_its_reason(fields: dict, reason: str | None) -> None:
    store = MVCCStore()
    stream = watch._Stream(_api(store, 1536 * 1024))
    stream.take(pb.WatchRequest(create_request=pb.WatchCreateRequest(key=b"k", watch_id=7)))
    stream.pending()
    stream.take(pb.WatchRequest(create_request=pb.WatchCreateRequest(**fields)))
    (answer,) = stream.pending()
    assert answer.created
    if reason is None:
        assert not answer.canceled and answer.watch_id != -1
    else:
        assert (answer.canceled, answer.watch_id, answer.cancel_reason) == (True, -1, reason)


def test_a_watch_from_a_negative_revision_is_refused_as_compacted_once_compacted() -> None:
    # etcd 3.4 cancels it with compact_revision set once it compacted (and never answers
    # before): aetcd reads only that field, and waited for ever on a refusal without it.
    store = MVCCStore()
    for i in range(5):
        store.apply(encode(pb.PutRequest(key=b"k", value=b"%d" % i)))
    stream = watch._Stream(_api(store, 1536 * 1024))
    for compacted in (0, 3):
        if compacted:
            store.compact(compacted)
        stream.take(pb.WatchRequest(create_request=pb.WatchCreateRequest(start_revision=-1)))
        (answer,) = stream.pending()
        assert (answer.created, answer.canceled, answer.compact_revision) == (True, True, compacted)
        assert answer.cancel_reason == "etcdserver: start_revision must not be negative"
    # (refused for another reason, it says nothing of a compaction)
    stream.take(pb.WatchRequest(create_request=pb.WatchCreateRequest(key=b"b", range_end=b"a")))
    (answer,) = stream.pending()
    assert answer.cancel_reason == "mvcc: watcher range is empty"
    bad_range = pb.WatchCreateRequest(key=b"b", range_end=b"a", start_revision=-1)
    stream.take(pb.WatchRequest(create_request=bad_range))
    (answer,) = stream.pending()
    assert answer.canceled and answer.compact_revision == 0


def _filled(n_keys: int) -> MVCCStore:
    """A store of keys d/000000.. (``n_keys`` of them, 500 a revision)."""
    store = MVCCStore()
    for i in range(0, n_keys, 500):
        keys = range(i, min(i + 500, n_keys))
        ops = [pb.RequestOp(request_put=pb.PutRequest(key=b"d/%06d" % j)) for j in keys]
        store.apply(encode(pb.TxnRequest(success=ops)))
    return store


def _count_wants(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    looked = [0]
    wants = watch._Watcher.wants

    def counting(self: watch._Watcher, ev: Any) -> bool:
        looked[0] += 1
        return wants(self, ev)

    monkeypatch.setattr(watch._Watcher, "wants", counting)
    return looked


def test_one_call_weighs_a_watchers_share_before_it_looks_at_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 1,000 prefix watchers and a DeleteRange of 50,000 keys: each watcher's 50,000 events
    # were listed and looked at in the first call (8 s, 200 MB) before its share was found
    # too big for one response. Now too big a share is known by its count, and goes in parts
    # in the calls after, a call's budget at a time.
    n_keys, n_watchers = 5 * watch.MAX_EVENTS_PER_RESPONSE, 200
    store = _filled(n_keys)
    stream = watch._Stream(_api(store, 1536 * 1024))
    for _ in range(n_watchers):
        stream.take(
            pb.WatchRequest(create_request=pb.WatchCreateRequest(key=b"d/", range_end=b"d0"))
        )
    stream.pending()
    stream.pending()  # (they joined the synced ones)
    looked = _count_wants(monkeypatch)
    store.apply(encode(pb.DeleteRangeRequest(key=b"d/", range_end=b"d0")))
    answers = stream.pending()
    # what one call does is bounded (an event counts 64 bytes of its budget): was every
    # watcher's share, n_keys * n_watchers
    assert looked[0] <= 1536 * 1024 // 64 < n_keys * n_watchers
    for _ in range(100_000):  # the parts come in the calls after, each watcher's in order
        stream.wake.clear()
        answers += stream.pending()
        if not stream.wake.is_set():
            break
    for w in range(n_watchers):
        keys = [e.kv.key for r in answers if r.watch_id == w for e in r.events]
        assert keys == [b"d/%06d" % j for j in range(n_keys)]


def test_a_watcher_from_revision_1_gets_a_big_first_revision_once() -> None:
    # revision 1 has no events: a watcher from it was sent revision 2 in parts under header
    # revision 1, then revision 2 again from its start
    n = watch.MAX_EVENTS_PER_RESPONSE + 24
    store = MVCCStore()
    ops = [pb.RequestOp(request_put=pb.PutRequest(key=b"k/%05d" % j)) for j in range(n)]
    store.apply(encode(pb.TxnRequest(success=ops)))
    stream = watch._Stream(_api(store, 1536 * 1024))
    stream.take(pb.WatchRequest(create_request=pb.WatchCreateRequest(start_revision=1, **ALL)))
    answers = [r for _ in range(10) for r in stream.pending() if r.events]
    keys = [e.kv.key for r in answers for e in r.events]
    assert keys == [b"k/%05d" % j for j in range(n)]
    assert [r.header.revision for r in answers] == [2, 2]


def test_watchers_from_a_revision_to_come_cost_a_call_nothing() -> None:
    store = MVCCStore()
    stream = watch._Stream(_api(store, 1536 * 1024))
    stream.watchers = _CountingWatchers()
    for i in range(2_000):
        stream.take(
            pb.WatchRequest(create_request=pb.WatchCreateRequest(key=b"k%d" % i, start_revision=5))
        )
    stream.pending()
    assert not stream._behind  # (held apart until their revision comes)
    for i in range(3):
        store.apply(encode(pb.PutRequest(key=b"k%d" % i)))  # revisions 2, 3, 4
        assert [r.events for r in stream.pending()] == []
    store.apply(encode(pb.PutRequest(key=b"k7")))  # 5: their start
    got = [(r.watch_id, e.kv.key) for r in stream.pending() for e in r.events]
    assert got == [(7, b"k7")]
    assert stream.caught_up() and stream.watchers.passes == 0


def test_watchers_of_a_revision_to_come_cancelled_are_not_held() -> None:
    # (they waited in the stream's heap for their revision: a long-lived stream creating and
    # cancelling such watches held every one of them)
    store = MVCCStore()
    stream = watch._Stream(_api(store, 1536 * 1024))
    for i in range(1, 5_001):
        create = pb.WatchCreateRequest(key=b"k", start_revision=10**12, watch_id=i)
        stream.take(pb.WatchRequest(create_request=create))
        if i > 1:
            stream.take(pb.WatchRequest(cancel_request=pb.WatchCancelRequest(watch_id=i - 1)))
        stream.pending()
    assert len(stream.watchers) == 1 and len(stream._future) <= 2 + 64
    store.apply(encode(pb.PutRequest(key=b"k")))
    assert [r.events for r in stream.pending()] == []  # (the one left still waits)


def test_one_key_watchers_of_a_big_revision_get_it_in_the_first_call() -> None:
    # Routing the 30,000 events of a DeleteRange cost the call 64 bytes an event, more than a
    # call's budget: every matched watcher was demoted and read the revision alone, 1,000
    # events a call (18 s of calls for 1,000 watchers of a 50,000-key delete).
    n_keys, n_watchers = 30_000, 100
    store = _filled(n_keys)
    stream = watch._Stream(_api(store, 1536 * 1024))
    for i in range(n_watchers):
        key = b"d/%06d" % (i * (n_keys // n_watchers))
        stream.take(pb.WatchRequest(create_request=pb.WatchCreateRequest(key=key)))
    stream.pending()
    stream.pending()  # (they joined the synced ones)
    store.apply(encode(pb.DeleteRangeRequest(key=b"d/", range_end=b"d0")))
    first = [r for r in stream.pending() if r.events]
    assert len(first) == n_watchers and all(len(r.events) == 1 for r in first)
