"""Tests for the linearizability checker: hand-written verdicts, agreement with a brute-force
checker on random small histories, per-key partitioning, and speed on a fault-test-sized history.

Example counts are modest by default; set RAFTFAST_HYPOTHESIS_EXAMPLES for a longer run.
"""

from __future__ import annotations

import math
import os
import random
import time
from itertools import combinations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.gates import limit

from .linearizability import Op, Result, check

EXAMPLES = int(os.environ.get("RAFTFAST_HYPOTHESIS_EXAMPLES", "300"))

K = b"k"
put, get, delete, cas = Op.put, Op.get, Op.delete, Op.cas


def linearizable(history: list[Op], initial: dict[bytes, bytes] | None = None) -> Result:
    result = check(history, initial, timeout_s=10)
    assert result.ok is True, result.explanation
    assert bool(result) and not result.unknown
    return result


def not_linearizable(history: list[Op], initial: dict[bytes, bytes] | None = None) -> Result:
    result = check(history, initial, timeout_s=10)
    assert result.ok is False, "accepted a non-linearizable history"
    assert not result and not result.unknown and result.key is not None
    return result


# -- Op construction -------------------------------------------------------------------------------


def test_op_positional_and_keyword_forms_agree() -> None:
    positional = Op(3, "cas", K, b"new", b"old", 1.0, 2.0, True)
    assert positional == cas(K, b"old", b"new", True, 1.0, 2.0, client=3)
    assert Op(client=0, kind="get", key=K, invoke=1, complete=None).complete is None


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(kind="scan", invoke=0, complete=1), ValueError),
        (dict(kind="get", invoke=2, complete=1), ValueError),
        (dict(kind="get", complete=1), TypeError),
        (dict(kind="get", invoke=0), TypeError),
    ],
)
def test_op_rejects_malformed(kwargs: dict, error: type[Exception]) -> None:
    with pytest.raises(error):
        Op(client=0, key=K, **kwargs)


# -- hand-written linearizable histories -----------------------------------------------------------


def test_empty_and_only_unknown() -> None:
    linearizable([])
    linearizable([put(K, b"a", 0, None), get(K, b"zzz", 1, None)])


def test_sequential() -> None:
    linearizable(
        [
            get(K, None, 0, 1),
            put(K, b"a", 2, 3),
            get(K, b"a", 4, 5),
            put(K, b"b", 6, 7),
            get(K, b"b", 8, 9),
            delete(K, True, 10, 11),
            get(K, None, 12, 13),
            delete(K, False, 14, 15),
        ]
    )


def test_initial_state() -> None:
    linearizable([get(K, b"x", 0, 1)], initial={K: b"x"})
    not_linearizable([get(K, None, 0, 1)], initial={K: b"x"})


def test_overlapping_puts_either_order() -> None:
    for last in (b"a", b"b"):
        linearizable([put(K, b"a", 0, 10, 1), put(K, b"b", 1, 9, 2), get(K, last, 11, 12)])


def test_get_concurrent_with_put_sees_old_or_new() -> None:
    for seen in (b"old", b"new"):
        linearizable([put(K, b"old", 0, 1), put(K, b"new", 2, 6, 1), get(K, seen, 3, 5, 2)])


def test_two_concurrent_reads_may_disagree_in_any_order() -> None:
    # Both reads overlap the put, so one may see new and the other old, whichever invoked first.
    linearizable([put(K, b"new", 1, 10, 1), get(K, b"new", 2, 3, 2), get(K, None, 2.5, 9, 3)])


def test_equal_timestamps_count_as_concurrent() -> None:
    linearizable([put(K, b"a", 0, 5), get(K, None, 5, 6)])


def test_cas_success_and_failure() -> None:
    linearizable(
        [
            cas(K, None, b"a", True, 0, 1),
            cas(K, None, b"b", False, 2, 3),
            cas(K, b"a", b"b", True, 4, 5),
            cas(K, b"a", b"c", False, 6, 7),
            get(K, b"b", 8, 9),
        ]
    )


def test_concurrent_cas_one_wins() -> None:
    linearizable(
        [
            put(K, b"0", 0, 1),
            cas(K, b"0", b"x", False, 2, 5, 1),
            cas(K, b"0", b"y", True, 2, 5, 2),
            get(K, b"y", 6, 7),
        ]
    )


def test_delete() -> None:
    linearizable([put(K, b"a", 0, 1), delete(K, True, 2, 3), get(K, None, 4, 5)])
    linearizable([put(K, b"a", 0, 1), delete(K, True, 2, 3, 1), delete(K, False, 2, 3, 2)])


def test_unknown_write_that_shows_up_later() -> None:
    linearizable([put(K, b"a", 0, 1), put(K, b"lost?", 2, None), get(K, b"lost?", 50, 51)])
    # ...and may take effect long after it was invoked, even after a later completed write.
    linearizable(
        [put(K, b"u", 0, None), put(K, b"a", 5, 6), get(K, b"a", 7, 8), get(K, b"u", 9, 10)]
    )


def test_unknown_write_that_never_shows_up() -> None:
    linearizable([put(K, b"a", 0, 1), put(K, b"lost", 2, None), get(K, b"a", 50, 51)])
    linearizable([put(K, b"a", 0, 1), delete(K, None, 2, None), get(K, b"a", 50, 51)])
    linearizable([cas(K, None, b"c", None, 0, None), get(K, None, 5, 6)])


def test_unknown_writes_chained() -> None:
    # Only an unknown put followed by an unknown cas explains the read.
    linearizable(
        [
            put(K, b"u", 0, None, 1),
            cas(K, b"u", b"w", None, 1, None, 2),
            get(K, b"w", 5, 6),
            get(K, b"w", 7, 8),
        ]
    )
    not_linearizable([cas(K, b"u", b"w", None, 1, None, 2), get(K, b"w", 5, 6)])


def test_unknown_write_explains_existence() -> None:
    # The delete saw the key present (some lost write of a never-read value made it so),
    # and the failed cas saw it differ from b"a".
    linearizable([put(K, b"q", 0, None, 1), delete(K, True, 3, 4), get(K, None, 5, 6)])
    linearizable(
        [
            put(K, b"a", 0, 1),
            put(K, b"q", 2, None, 1),
            cas(K, b"a", b"z", False, 3, 4),
            get(K, b"q", 5, 6),
        ]
    )
    not_linearizable([put(K, b"q", 0, None, 1), delete(K, True, 3, 4), delete(K, True, 5, 6)])


def test_unknown_write_after_failed_cas() -> None:
    # The failed cas is legal with or without the lost write before it; the read needs it after.
    linearizable(
        [
            put(K, b"a", 0, 1),
            put(K, b"u", 2, None, 1),
            cas(K, b"b", b"z", False, 3, 4),
            get(K, b"a", 5, 6),
            get(K, b"u", 7, 8),
        ]
    )


def test_interchangeable_unknown_writes() -> None:
    # Three lost puts of never-read values can explain three separate "key exists" observations,
    # but not four.
    lost = [put(K, b"l%d" % i, 0, None, i) for i in range(3)]
    deletes = [delete(K, True, 10 * i + 10, 10 * i + 11) for i in range(4)]
    linearizable(lost + deletes[:3])
    not_linearizable(lost + deletes)


def test_unknown_outputs_are_ignored() -> None:
    # An unknown get's output means nothing; an unknown cas's reported output is not trusted.
    linearizable([get(K, b"never written", 0, None), cas(K, b"x", b"y", True, 0, None)])


# -- hand-written NON-linearizable histories -------------------------------------------------------


def test_stale_read_after_completed_put() -> None:
    result = not_linearizable(
        [put(K, b"old", 0, 1), put(K, b"new", 2, 3), get(K, b"old", 4, 5, client=7)]
    )
    assert result.key == K
    assert "#2" in result.explanation and "b'new'" in result.explanation
    print(result.explanation)


def test_read_of_value_never_written() -> None:
    not_linearizable([put(K, b"a", 0, 1), get(K, b"ghost", 2, 3)])
    # Concurrency does not help either.
    not_linearizable([put(K, b"a", 0, 10, 1), get(K, b"ghost", 1, 9, 2)])


def test_reads_going_backwards() -> None:
    not_linearizable(
        [
            put(K, b"old", 0, 1),
            put(K, b"new", 2, 20, 1),  # concurrent with both reads: either value is fine...
            get(K, b"new", 3, 4, 2),
            get(K, b"old", 5, 6, 3),  # ...but not new, then old
        ]
    )


def test_cas_success_that_could_not_match() -> None:
    not_linearizable([put(K, b"a", 0, 1), cas(K, b"z", b"b", True, 2, 3)])
    not_linearizable([cas(K, b"a", b"b", True, 0, 1)])  # the key is absent
    not_linearizable([put(K, b"a", 0, 1), cas(K, b"a", b"b", False, 2, 3)])


def test_delete_wrong_existence() -> None:
    not_linearizable([delete(K, True, 0, 1)])
    not_linearizable([put(K, b"a", 0, 1), delete(K, False, 2, 3)])


def test_lost_acknowledged_write() -> None:
    result = not_linearizable(
        [
            put(K, b"v1", 0, 1, 1),
            get(K, b"v1", 2, 3, 2),
            put(K, b"v2", 4, 5, 1),  # acknowledged...
            get(K, b"v1", 6, 7, 2),  # ...then gone
        ]
    )
    assert "#3" in result.explanation


def test_unknown_write_cannot_take_effect_before_invoke() -> None:
    not_linearizable([get(K, b"u", 0, 1), put(K, b"u", 2, None)])


def test_unknown_write_takes_effect_at_most_once() -> None:
    not_linearizable(
        [
            put(K, b"u", 0, None),
            put(K, b"a", 1, 2),
            get(K, b"u", 3, 4),
            put(K, b"b", 5, 6),
            get(K, b"u", 7, 8),
        ]
    )


# -- per-key partitioning --------------------------------------------------------------------------


def test_keys_are_independent_registers() -> None:
    # Looks like a stale read if the keys were one register; each key alone is fine.
    linearizable(
        [
            put(b"x", b"1", 0, 1),
            put(b"y", b"2", 2, 3),
            get(b"x", b"1", 4, 5),
            get(b"y", b"2", 4, 5),
            delete(b"x", True, 6, 7),
            get(b"y", b"2", 8, 9),
        ]
    )


def test_explanation_names_the_failing_key() -> None:
    history = [put(b"good", b"1", 0, 1), get(b"good", b"1", 2, 3)]
    history += [put(b"bad", b"1", 0, 1), put(b"bad", b"2", 2, 3), get(b"bad", b"1", 4, 5)]
    result = not_linearizable(history)
    assert result.key == b"bad"
    assert result.explanation.startswith("key b'bad'")
    assert "b'good'" not in result.explanation


def test_timeout_is_not_a_verdict() -> None:
    history = simulated_history(random.Random(7), ops=3000, keys=1, clients=8)
    result = check(history, timeout_s=0.0)
    assert result.ok is None and result.unknown and not result
    assert result.key == b"k0"


# -- brute force -----------------------------------------------------------------------------------


def brute_force(history: list[Op], initial: dict[bytes, bytes] | None = None) -> bool:
    """Try every order consistent with real time, over the whole store (no per-key split).

    Unknown-outcome gets are dropped (no effect, no constraint); for each subset of the
    unknown-outcome writes, those outside it never happened and those inside are ordered like
    the others, with an infinite completion time and no check of their output.
    """
    ops = [op for op in history if not (op.kind == "get" and op.complete is None)]
    unknown = [i for i, op in enumerate(ops) if op.complete is None]
    known = [i for i, op in enumerate(ops) if op.complete is not None]
    for r in range(len(unknown) + 1):
        for chosen in combinations(unknown, r):
            if _orders_exist([ops[i] for i in sorted(known + list(chosen))], dict(initial or {})):
                return True
    return False


def _orders_exist(ops: list[Op], store: dict[bytes, bytes]) -> bool:
    if not ops:
        return True
    for i, op in enumerate(ops):
        rest = ops[:i] + ops[i + 1 :]
        # op can go first unless some other op completed strictly before op was invoked
        if any(o.complete is not None and o.complete < op.invoke for o in rest):
            continue
        new = _apply(op, store)
        if new is not None and _orders_exist(rest, new):
            return True
    return False


def _apply(op: Op, store: dict[bytes, bytes]) -> dict[bytes, bytes] | None:
    """The store after ``op``, or None if ``op``'s (known) output contradicts ``store``."""
    cur = store.get(op.key)
    known = op.complete is not None
    new = dict(store)
    if op.kind == "get":
        out: object = cur
    elif op.kind == "put":
        assert op.value is not None
        new[op.key], out = op.value, None
    elif op.kind == "delete":
        new.pop(op.key, None)
        out = cur is not None
    else:
        out = cur == op.expected
        if out:
            assert op.value is not None
            new[op.key] = op.value
    if known and out != op.output:
        return None
    return new


KEYS = [b"a", b"b"]
VALUES = [b"x", b"y", b"z", b"w"]  # some go unobserved, some are read


@st.composite
def small_histories(draw: st.DrawFn) -> tuple[list[Op], dict[bytes, bytes]]:
    """≤7 ops over 2 keys with integer times (so ties happen); a third of the time the outputs
    come from executing a random linearization, another third from that plus one corruption,
    the rest are random."""
    n = draw(st.integers(1, 7))
    initial = {k: v for k in KEYS if (v := draw(st.sampled_from([None, *VALUES]))) is not None}
    specs = []
    for _ in range(n):
        kind = draw(st.sampled_from(["put", "get", "get", "delete", "cas"]))
        key = draw(st.sampled_from(KEYS))
        value = draw(st.sampled_from(VALUES)) if kind in ("put", "cas") else None
        expected = draw(st.sampled_from([None, *VALUES])) if kind == "cas" else None
        invoke = draw(st.integers(0, 8))
        length = draw(st.integers(0, 5))
        complete = None if draw(st.integers(0, 3)) == 0 else invoke + length
        specs.append([kind, key, value, expected, invoke, complete])
    mode = draw(st.sampled_from(["random", "executed", "corrupted"]))
    outputs: list[object]
    if mode == "random":
        outputs = [_random_output(draw, s[0]) for s in specs]
    else:
        outputs = _execute(draw, specs, initial)
        if mode == "corrupted":
            i = draw(st.integers(0, n - 1))
            outputs[i] = _random_output(draw, specs[i][0])
    history = [
        Op(c, kind, key, value, expected, invoke, complete, out)
        for c, ((kind, key, value, expected, invoke, complete), out) in enumerate(
            zip(specs, outputs, strict=True)
        )
    ]
    return history, initial


def _random_output(draw: st.DrawFn, kind: str) -> object:
    if kind == "get":
        return draw(st.sampled_from([None, *VALUES]))
    if kind == "put":
        return None
    return draw(st.booleans())


def _execute(draw: st.DrawFn, specs: list[list], initial: dict[bytes, bytes]) -> list[object]:
    """Outputs of a real execution: each op takes effect at a random point of its interval
    (an unknown-outcome op somewhere after invoke, or never)."""
    points = []
    for i, (_kind, _key, _v, _e, invoke, complete) in enumerate(specs):
        end = complete if complete is not None else invoke + 10
        if complete is None and draw(st.booleans()):
            continue  # never took effect
        frac = draw(st.integers(0, 100)) / 100
        points.append((invoke + frac * (end - invoke), i))
    store = dict(initial)
    outputs: list[object] = [None] * len(specs)
    for _, i in sorted(points):
        kind, key, value, expected, *_ = specs[i]
        op = Op(0, kind, key, value, expected, 0, None)
        outputs[i] = _output_of(op, store)
        new = _apply(op, store)
        assert new is not None
        store = new
    return outputs


def _output_of(op: Op, store: dict[bytes, bytes]) -> object:
    cur = store.get(op.key)
    return {"get": cur, "put": None, "delete": cur is not None, "cas": cur == op.expected}[op.kind]


def test_brute_force_sanity() -> None:
    assert brute_force([put(K, b"a", 0, 1), get(K, b"a", 2, 3)])
    assert not brute_force([put(K, b"a", 0, 1), get(K, None, 2, 3)])
    assert brute_force([put(K, b"a", 0, None), get(K, None, 2, 3)])
    assert brute_force([put(K, b"a", 0, None), get(K, b"a", 2, 3)])


verdicts: dict[bool, int] = {True: 0, False: 0}


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(small_histories())
def test_agrees_with_brute_force(case: tuple[list[Op], dict[bytes, bytes]]) -> None:
    history, initial = case
    want = brute_force(history, initial)
    got = check(history, initial, timeout_s=10)
    assert not got.unknown
    assert got.ok is want, "\n".join(op.describe(i) for i, op in enumerate(history))
    verdicts[want] += 1


def test_both_verdicts_were_exercised() -> None:
    """Runs after the property test (file order): a generator that only ever produced one
    verdict would make the agreement vacuous."""
    if sum(verdicts.values()) < 50:
        pytest.skip("property test not run in this session")
    assert min(verdicts.values()) >= sum(verdicts.values()) // 10, verdicts


# -- performance -----------------------------------------------------------------------------------


def simulated_history(
    rng: random.Random,
    ops: int,
    keys: int,
    clients: int,
    unknown_rate: float = 0.02,
    values: int = 0,
) -> list[Op]:
    """A linearizable history: clients issue ops back to back with random durations, each op
    takes effect at a random instant inside its interval, outputs come from that execution.
    Some ops time out (unknown outcome); half of those never took effect.  Written values are
    unique per op, or drawn from a pool of ``values`` (repeats make states harder to tell apart).
    """
    key_names = [b"k%d" % i for i in range(keys)]
    clock = [rng.random() for _ in range(clients)]
    planned = []
    for n in range(ops):
        c = min(range(clients), key=clock.__getitem__)
        invoke = clock[c]
        complete = invoke + rng.expovariate(1.0)
        clock[c] = complete + rng.expovariate(5.0)
        roll = rng.random()
        kind = "get" if roll < 0.4 else "put" if roll < 0.75 else "delete" if roll < 0.85 else "cas"
        lost = rng.random() < unknown_rate
        point = None if lost and rng.random() < 0.5 else rng.uniform(invoke, complete)
        planned.append((point, n, c, kind, rng.choice(key_names), invoke, complete, lost))

    store: dict[bytes, bytes] = {}
    recent: dict[bytes, list[bytes | None]] = {}
    history = []
    for point, n, c, kind, key, invoke, complete, lost in sorted(
        planned, key=lambda p: (math.inf if p[0] is None else p[0], p[1])
    ):
        value = (
            b"v%d" % (rng.randrange(values) if values else n) if kind in ("put", "cas") else None
        )
        expected = rng.choice(recent.get(key) or [None]) if kind == "cas" else None
        effect = Op(c, kind, key, value, expected, invoke, None)  # output not checked
        output = None
        if point is not None:
            output = _output_of(effect, store)
            new = _apply(effect, store)
            assert new is not None
            store = new
            recent.setdefault(key, []).append(store.get(key))
            del recent[key][:-3]
        if lost:
            history.append(effect)
        else:
            history.append(Op(c, kind, key, value, expected, invoke, complete, output))
    history.sort(key=lambda op: op.invoke)
    return history


def test_performance_3000_ops_10_keys_8_clients() -> None:
    history = simulated_history(random.Random(1), ops=3000, keys=10, clients=8)
    t0 = time.perf_counter()
    result = check(history, timeout_s=120)
    elapsed = time.perf_counter() - t0
    unknown = sum(op.complete is None for op in history)
    print(
        f"\n3000 ops / 10 keys / 8 clients ({unknown} unknown): {elapsed:.2f} s, "
        f"{result.states} states"
    )
    assert result.ok is True, result.explanation
    assert elapsed < limit(test=90, bench=30)  # (30 s idle; the check itself gives up at 120)


def test_performance_finds_injected_stale_read() -> None:
    """A violation deep inside a big history is found too (exhausting the key's search space),
    even with many unknown outcomes (as during a partition)."""
    history = simulated_history(random.Random(2), ops=3000, keys=10, clients=8, unknown_rate=0.2)
    # Make the last completed read of k3 return the value of the first completed put to k3 (or
    # None if it read that), long overwritten by then.
    first_put = next(op for op in history if op.key == b"k3" and op.kind == "put" and op.complete)
    i, last_get = max(
        (
            (i, op)
            for i, op in enumerate(history)
            if op.key == b"k3" and op.kind == "get" and op.complete is not None
        ),
        key=lambda p: p[0],
    )
    stale = None if last_get.output == first_put.value else first_put.value
    history[i] = Op(
        last_get.client, "get", b"k3", None, None, last_get.invoke, last_get.complete, stale
    )
    t0 = time.perf_counter()
    result = check(history, timeout_s=120)
    elapsed = time.perf_counter() - t0
    print(
        f"\ninjected stale read found in {elapsed:.2f} s, {result.states} states\n"
        f"{result.explanation}"
    )
    assert result.ok is False and result.key == b"k3"
    assert elapsed < limit(test=90, bench=30)  # (30 s idle; the check itself gives up at 120)
