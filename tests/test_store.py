"""The KV store's key/value container (raftfast._store and its pure twin) against a dict.

Every operation, ordered read and snapshot round trip is checked against a plain dict and a
sort, with few distinct keys (so that keys are overwritten, deleted and added again), values of
changing lengths (records move, the arena is compacted) and enough keys now and then to push the
sorted index past its waiting list.
"""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raftfast import _store_py
from raftfast.kv.commands import pack_pairs

IMPLS = [_store_py]
if not os.environ.get("RAFTFAST_PUREPYTHON"):
    from raftfast import _store  # a missing build must fail loudly here

    IMPLS.append(_store)

EXAMPLES = int(os.environ.get("RAFTFAST_HYPOTHESIS_EXAMPLES", "150"))
ops_settings = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

keys = st.binary(max_size=3).map(lambda b: b"k" + b) | st.binary(max_size=6)
values = st.binary(max_size=40) | st.integers(0, 3000).map(lambda n: b"x" * n)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), keys, values),
        st.tuples(st.just("delete"), keys),
        st.tuples(
            st.just("scan"), st.binary(max_size=2), st.integers(-1, 5), keys, st.integers(0, 200)
        ),
        st.tuples(st.just("packed"), st.lists(st.tuples(keys, values), max_size=20)),
        st.tuples(st.just("many"), st.lists(st.tuples(keys, values), max_size=20)),
        st.tuples(st.just("bulk"), st.integers(0, 400)),
        st.tuples(st.just("copy")),
        st.tuples(st.just("reload")),
    ),
    max_size=60,
)


def model_scan(model: dict, prefix: bytes, limit: int, start: bytes, max_bytes: int):
    out, size = [], 0
    for key in sorted(k for k in model if k >= max(prefix, start)):
        if not key.startswith(prefix):
            if key > prefix:
                break
            continue
        size += len(key) + len(model[key])
        if (len(out) == limit or (max_bytes and size > max_bytes)) and out:
            return out, key
        out.append((key, model[key]))
    return out, b""


def reload(impl, store):
    return impl.load_store(*store.dump())


def check(store, model: dict) -> None:
    assert len(store) == len(model)
    assert store.size_bytes == sum(len(k) + len(v) for k, v in model.items())
    assert list(store.items()) == sorted(model.items())


@pytest.mark.parametrize("impl", IMPLS, ids=lambda m: m.__name__)
@ops_settings
@given(ops=ops)
def test_the_store_behaves_as_a_dict_in_key_order(impl, ops):
    store, model = impl.KeyStore(), {}
    for op in ops:
        kind = op[0]
        if kind == "put":
            _, key, value = op
            old = model.get(key)
            assert store.put(key, value) == (-1 if old is None else len(old))
            model[key] = value
        elif kind == "delete":
            old = model.pop(op[1], None)
            assert store.delete(op[1]) == (-1 if old is None else len(old))
        elif kind == "scan":
            _, prefix, limit, start, max_bytes = op
            assert store.scan_page(prefix, limit, start, max_bytes) == model_scan(
                model, prefix, limit, start, max_bytes
            )
        elif kind == "many":
            pairs = op[1]
            store.put_many([k for k, _ in pairs], [v for _, v in pairs])
            model.update(pairs)
        elif kind == "packed":
            pairs = [(k, v) for k, v in op[1] if k]  # (packed pairs have no empty key)
            store.put_packed(pack_pairs(pairs))
            model.update(pairs)
        elif kind == "bulk":  # past the index's waiting list, then gone again
            added = [b"bulk%05d" % i for i in range(op[1])]
            store.put_many(added, [b"v" * (i % 7) for i in range(op[1])])
            model.update(zip(added, [b"v" * (i % 7) for i in range(op[1])], strict=True))
            assert store.scan_page(b"bulk", 3) == model_scan(model, b"bulk", 3, b"", 0)
            for key in added[::2]:
                store.delete(key)
                del model[key]
        elif kind == "copy":
            twin = store.copy()
            check(twin, model)
            twin.put(b"only in the copy", b"!")
            assert b"only in the copy" not in store or b"only in the copy" in model
        else:
            store = reload(impl, store)
        for key in (op[1],) if kind in ("put", "delete") else ():
            assert store.get(key) == model.get(key)
            assert (key in store) == (key in model)
    check(store, model)
    check(reload(impl, store), model)


@pytest.mark.parametrize("impl", IMPLS, ids=lambda m: m.__name__)
def test_many_keys_big_values_and_compaction(impl):
    store, model = impl.KeyStore(), {}
    for round_ in range(4):
        for i in range(5000):
            key, value = b"key%06d" % (i * 7919 % 5000), b"%d" % round_ * (i % 50 + round_)
            store.put(key, value)
            model[key] = value
        for i in range(0, 5000, 3 + round_):
            store.delete(b"key%06d" % i)
            model.pop(b"key%06d" % i, None)
        assert store.scan_page(b"key0012", 0) == model_scan(model, b"key0012", 0, b"", 0)
    check(store, model)
    check(store.copy(), model)


@pytest.mark.parametrize("impl", IMPLS, ids=lambda m: m.__name__)
def test_big_packed_batches_that_grow_and_move_the_store_midway(impl):
    """put_packed looks ahead (the compiled one prefetches slots and records): batches of
    thousands of pairs, a key twice in one batch, the table growing and the arena moving or
    compacting while one batch is applied."""
    store, model, rng = impl.KeyStore(), {}, random.Random(5)
    for round_ in range(6):
        pairs = [
            (b"key%05d" % rng.randrange(4000), b"v" * rng.choice((0, 8, 64, 300)))
            for _ in range(3000)
        ]
        pairs.append(pairs[0][:1] + (b"last of round %d" % round_,))  # twice: the last wins
        store.put_packed(pack_pairs(pairs))
        model.update(pairs)
        check(store, model)


@pytest.mark.parametrize("impl", IMPLS, ids=lambda m: m.__name__)
def test_bad_arguments_and_bad_snapshots_are_refused(impl):
    store = impl.KeyStore()
    for call in (
        lambda: store.put("k", b"v"),
        lambda: store.put(b"k", bytearray(b"v")),
        lambda: store.get(memoryview(b"k")),
        lambda: store.delete(None),
        lambda: store.put_many([b"k"], ["v"]),
    ):
        with pytest.raises(TypeError):
            call()
    with pytest.raises(ValueError):
        store.put_many([b"a", b"b"], [b"v"])
    good = pack_pairs([(b"x", b"1"), (b"y", b"2")])
    for bad in (b"", good[:-1], good[:30] + b"!" + good[31:], pack_pairs([(b"", b"1")])):
        for call in (store.put_packed, impl.check_packed):
            with pytest.raises(ValueError):
                call(bad)
    assert impl.check_packed(good) == (2, 1, 1) and len(store) == 0
    assert impl.check_packed(pack_pairs([(b"k", b""), (b"key", b"v")])) == (2, 3, 1)
    assert "k" not in store and len(store) == 0
    store.put_many([b"b", b"a"], [b"2", b"1"])
    count, klens, vlens, keys_, values_ = store.dump()
    assert (count, keys_, values_) == (2, b"ab", b"12")
    for bad in (
        (3, klens, vlens, keys_, values_),
        (2, klens, vlens, keys_ + b"x", values_),
        (2, klens, vlens, b"ba", values_),  # not ascending
        (2, klens, vlens, b"aa", values_),  # repeated
        (-1, b"", b"", b"", b""),
    ):
        with pytest.raises(ValueError):
            impl.load_store(*bad)
