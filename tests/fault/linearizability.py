"""Linearizability checker for a key/value store, one register per key.

Fault tests record what clients saw (invoke time, completion time, output) and ask whether some
total order of the operations, consistent with real time, explains every output.  The search is
Wing & Gong's, with Lowe's memoization of (set of linearized ops, state) as in Porcupine, and the
history is split per key first: linearizability is compositional (Herlihy & Wing), and the search
is exponential in the history length, so checking each key on its own is the big win.

Real-time order: op ``a`` precedes op ``b`` iff ``a.complete < b.invoke``.  Equal times count as
concurrent, so either order is allowed (clocks have finite resolution; be permissive, not wrong).

Ops with an unknown outcome (``complete is None``: timed out, connection lost) may have taken
effect at any time after ``invoke``, or never.  A get of that kind has no effect and no constraint,
so it is dropped; a write gets an infinite completion time, so it never forces anything, and the
search succeeds once every *completed* op is linearized: unknown writes still pending then are the
"never happened" case.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Op", "Result", "check"]

KINDS = ("put", "get", "delete", "cas")
_PUT, _GET, _DELETE, _CAS = range(4)
_INF = math.inf
_CLOCK_EVERY = 1024  # search steps between deadline checks


@dataclass(frozen=True)
class Op:
    """One client call as observed by the client.

    ``complete=None`` means the outcome is unknown; ``output`` is then ignored.  Outputs: get ->
    ``bytes | None`` (the value read), delete -> ``bool`` (the key existed), cas -> ``bool``
    (swapped), put -> ``None``.  ``expected=None`` in a cas means "the key must be absent".

    Positional order is ``Op(client, kind, key, value, expected, invoke, complete, output)``.
    ``invoke`` and ``complete`` must be given (positionally or by keyword): their NaN defaults
    only exist so that ``value``/``expected`` can be omitted, and are rejected on construction.
    """

    client: int
    kind: str
    key: bytes
    value: bytes | None = None
    expected: bytes | None = None
    invoke: float = math.nan
    complete: float | None = math.nan
    output: object = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown op kind {self.kind!r}")
        if math.isnan(self.invoke):
            raise TypeError("Op: invoke is required")
        if self.complete is not None:
            if math.isnan(self.complete):
                raise TypeError("Op: complete is required (None = unknown outcome)")
            if self.complete < self.invoke:
                raise ValueError(f"Op completes ({self.complete}) before invoke ({self.invoke})")

    # Helper constructors: Op.put(b"k", b"v", 0, 1) reads better than nine keywords.
    @classmethod
    def put(
        cls, key: bytes, value: bytes, invoke: float, complete: float | None, client: int = 0
    ) -> Op:
        return cls(
            client=client, kind="put", key=key, value=value, invoke=invoke, complete=complete
        )

    @classmethod
    def get(
        cls,
        key: bytes,
        output: bytes | None,
        invoke: float,
        complete: float | None,
        client: int = 0,
    ) -> Op:
        return cls(
            client=client, kind="get", key=key, invoke=invoke, complete=complete, output=output
        )

    @classmethod
    def delete(
        cls,
        key: bytes,
        output: bool | None,
        invoke: float,
        complete: float | None,
        client: int = 0,
    ) -> Op:
        return cls(
            client=client, kind="delete", key=key, invoke=invoke, complete=complete, output=output
        )

    @classmethod
    def cas(
        cls,
        key: bytes,
        expected: bytes | None,
        value: bytes,
        output: bool | None,
        invoke: float,
        complete: float | None,
        client: int = 0,
    ) -> Op:
        return cls(
            client=client,
            kind="cas",
            key=key,
            value=value,
            expected=expected,
            invoke=invoke,
            complete=complete,
            output=output,
        )

    def describe(self, index: int | None = None) -> str:
        """One line for explanations, e.g. ``#4 c1 get() -> b'x'  [2, 3]``."""
        out = "?" if self.complete is None else _fmt(self.output)
        if self.kind == "put":
            call = f"put({_fmt(self.value)})"
            out = "?" if self.complete is None else "ok"
        elif self.kind == "get":
            call = "get()"
        elif self.kind == "delete":
            call = "delete()"
        else:
            call = f"cas({_fmt(self.expected)} -> {_fmt(self.value)})"
        done = "?" if self.complete is None else f"{self.complete:g}"
        prefix = "" if index is None else f"#{index} "
        return f"{prefix}c{self.client} {call} -> {out}  [{self.invoke:g}, {done}]"


@dataclass(frozen=True)
class Result:
    """Verdict of :func:`check`.

    ``ok`` is True (linearizable), False (a key has no valid order: ``key`` names the first one
    found) or None when the search hit the time limit before deciding, so a cut search is never
    reported as linearizable; ``unknown`` mirrors ``ok is None``.  ``bool(result)`` is True only
    for a proven-linearizable history, so ``assert check(h)`` is safe.
    """

    ok: bool | None
    key: bytes | None = None
    explanation: str = ""
    unknown: bool = False
    elapsed_s: float = 0.0
    states: int = 0  # configurations explored, summed over keys (a cost measure)

    def __bool__(self) -> bool:
        return self.ok is True


def check(
    history: Iterable[Op], initial: dict[bytes, bytes] | None = None, timeout_s: float = 60.0
) -> Result:
    """Decide whether ``history`` is linearizable, key by key.

    Keys are checked smallest first, so under a deadline the cheap keys still get a definite
    verdict; a definite failure wins over a timeout on another key.
    """
    start = time.monotonic()
    deadline = start + timeout_s
    initial = initial or {}
    per_key: dict[bytes, list[tuple[int, Op]]] = defaultdict(list)
    for index, op in enumerate(history):
        if op.kind == "get" and op.complete is None:
            continue  # no effect and no constraint
        per_key[op.key].append((index, op))

    states = 0
    timed_out: bytes | None = None
    for key in sorted(per_key, key=lambda k: (len(per_key[k]), k)):
        ops = per_key[key]
        verdict, path, explored = _search(ops, initial.get(key), deadline)
        states += explored
        if verdict is False:
            return Result(
                ok=False,
                key=key,
                explanation=_explain(key, ops, initial.get(key), path),
                elapsed_s=time.monotonic() - start,
                states=states,
            )
        if verdict is None and timed_out is None:
            timed_out = key
    elapsed = time.monotonic() - start
    if timed_out is not None:
        n = len(per_key[timed_out])
        return Result(
            ok=None,
            key=timed_out,
            unknown=True,
            elapsed_s=elapsed,
            states=states,
            explanation=f"key {timed_out!r}: search over {n} ops cut at {timeout_s:g} s; "
            "no verdict (not claimed linearizable)",
        )
    return Result(ok=True, elapsed_s=elapsed, states=states)


def _step(
    kind: int,
    value: object,
    expected: bytes | None,
    output: object,
    known: bool,
    state: object,
) -> tuple[bool, object]:
    """Apply one op to a register: (legal, new state).

    An unknown-outcome write that would leave the state unchanged (failed cas, delete of an absent
    key, put of the current value) is reported illegal: applying it is indistinguishable from it
    never happening, which the search already covers by leaving it out, so this only prunes.
    """
    if kind == _GET:
        return output == state, state
    if kind == _PUT:
        return (known or state != value), value
    if kind == _DELETE:
        if known:
            return output == (state is not None), None
        return state is not None, None
    # cas
    swapped = state == expected
    if known:
        if output != swapped:
            return False, state
        return True, (value if swapped else state)
    return swapped and value != state, value


class _Unobserved:
    """Stands for every value no op can tell apart (see :func:`_search`)."""

    def __repr__(self) -> str:
        return "<unobserved value>"


_UNOBSERVED = _Unobserved()
_NO_RUN = object()  # run_start when the last op applied was a completed one


def _search(
    ops: list[tuple[int, Op]], init: bytes | None, deadline: float
) -> tuple[bool | None, list[int], int]:
    """Wing & Gong / Lowe search over one key: (verdict, longest legal prefix, states explored).

    Ops are kept in a doubly linked list sorted by invoke time, holding those not yet linearized.
    The next op in a linearization must not be preceded by any remaining op, i.e. it was invoked
    no later than the earliest completion among the remaining ops: one scan of the list gives
    those candidates.  Completed candidates are tried before unknown-outcome ones, so histories
    whose lost writes never show up are accepted without branching on them.  Explicit stack
    frames replace recursion (histories run to thousands of ops).  The returned prefix is in
    linearization order, for the explanation.

    Plain Wing & Gong is exponential in the number of unknown-outcome writes pending at once (each
    may or may not be applied at each point), which is exactly what a fault test produces.  Four
    reductions keep it tractable; each keeps at least one linearization if any exists:

    * Values no op observes (not read by a completed get, not a cas's expected value) are all
      interchangeable, so the state stores one token for them: fewer distinct states.
    * Unknown ops with the same kind and (abstracted) arguments are interchangeable, and their
      windows never close, so only the earliest-invoked unused one is a candidate.
    * Unknown ops only matter through the state they leave, so they are applied only when needed:
      a run of unknown ops must be followed by a completed get/delete/cas that would be illegal
      from the state before the run, and only its first op may be a put or delete (later ones can
      only be cas, which reads the state).  Any linearization can be rewritten into that form:
      drop runs before an op that overwrites the state anyway, or whose net effect is nil; move a
      run past a failed cas that was legal without it; drop ops a later put/delete in the same
      run overwrites; drop a run at the end.  Unknown ops that would not change the state are
      never applied (see :func:`_step`).
    * Memo: a configuration is (completed ops linearized K, unknown ops applied U, state, state
      before the current run of unknown ops if any).  Lowe's memo prunes exact repeats; here a
      configuration is also pruned when one with the same K and state, a subset of its U and the
      same or no run restriction was seen: fewer applied unknown ops only leaves more choices
      (they never constrain which op may come next), and a path from the restricted
      configuration rewrites into one of no more steps from the unrestricted one.
    """
    order = sorted(range(len(ops)), key=lambda i: (ops[i][1].invoke, i))
    sorted_ops = [ops[i][1] for i in order]
    n = len(sorted_ops)
    invoke = [op.invoke for op in sorted_ops]
    complete = [_INF if op.complete is None else op.complete for op in sorted_ops]
    known = [op.complete is not None for op in sorted_ops]
    kinds = [KINDS.index(op.kind) for op in sorted_ops]
    outputs = [op.output for op in sorted_ops]
    expecteds = [op.expected for op in sorted_ops]
    observed = {op.expected for op in sorted_ops if op.kind == "cas"}
    observed |= {op.output for op in sorted_ops if op.kind == "get"}  # unknown gets are dropped

    def abstract(value: bytes | None) -> object:
        return value if value is None or value in observed else _UNOBSERVED

    values = [abstract(op.value) for op in sorted_ops]
    classes: dict[tuple, int] = {}
    klass = [
        classes.setdefault((kinds[j], values[j], expecteds[j]), len(classes)) for j in range(n)
    ]
    left = sum(known)
    if left == 0:
        return True, [], 0

    # Node n is the head sentinel and -1 ends the list; writes to prv[-1] (the sentinel's own,
    # unused, prv slot) when unlinking the last node are harmless.
    head, end = n, -1
    nxt = [*range(1, n), end, 0]
    prv = [n, *range(0, n - 1), end]

    def candidates(after_unknown: bool) -> list[int]:
        limit = _INF
        seen = []
        i = nxt[head]
        while i != end and invoke[i] <= limit:
            seen.append(i)
            if complete[i] < limit:
                limit = complete[i]
            i = nxt[i]
        done = []
        lost = []
        first_of: set[int] = set()
        for j in seen:
            if invoke[j] > limit:
                break  # invoke-sorted: the rest are later still
            if known[j]:
                if not (after_unknown and kinds[j] == _PUT):
                    done.append(j)
            elif klass[j] not in first_of:
                first_of.add(klass[j])
                if not after_unknown or kinds[j] == _CAS:
                    lost.append(j)
        return done + lost

    # (K, state, state before the current run of unknown ops or _NO_RUN) -> minimal U's seen
    memo: dict[tuple[int, object, object], list[int]] = {}
    states = 0
    state: object = abstract(init)
    run_start: object = _NO_RUN
    done_known = 0  # K
    done_unknown = 0  # U
    # [candidates, next index, op applied to get here, state and run_start before it]
    frames: list[list] = [[candidates(False), 0, -1, None, None]]
    best: list[int] = []
    best_left = left
    steps = 0
    while True:
        steps += 1
        if steps % _CLOCK_EVERY == 0 and time.monotonic() > deadline:
            return None, [order[j] for j in best], states
        frame = frames[-1]
        cands = frame[0]
        if frame[1] >= len(cands):  # every candidate refuted: undo the op that led here
            frames.pop()
            op = frame[2]
            if op < 0:
                return False, [order[j] for j in best], states
            state, run_start = frame[3], frame[4]
            if known[op]:
                done_known ^= 1 << op
                left += 1
            else:
                done_unknown ^= 1 << op
            nxt[prv[op]] = op  # relink (dancing links: undone in LIFO order)
            prv[nxt[op]] = op
            continue
        op = cands[frame[1]]
        frame[1] += 1
        legal, new_state = _step(
            kinds[op], values[op], expecteds[op], outputs[op], known[op], state
        )
        if not legal:
            continue
        if known[op]:
            if (
                run_start is not _NO_RUN
                and _step(kinds[op], values[op], expecteds[op], outputs[op], True, run_start)[0]
            ):
                continue  # legal without the preceding unknown ops: they were not needed here
            new_known, new_unknown, new_run = done_known | (1 << op), done_unknown, _NO_RUN
        else:
            new_known, new_unknown = done_known, done_unknown | (1 << op)
            new_run = state if run_start is _NO_RUN else run_start
        mark = (new_known, new_state, new_run)
        seen = memo.get(mark)
        if seen is not None and any(old & new_unknown == old for old in seen):
            continue  # dominated: the same or fewer unknown ops applied were already explored
        if new_run is not _NO_RUN:
            free = memo.get((new_known, new_state, _NO_RUN))
            if free is not None and any(old & new_unknown == old for old in free):
                continue
        if seen is None:
            memo[mark] = [new_unknown]
        else:
            seen[:] = [old for old in seen if old & new_unknown != new_unknown]
            seen.append(new_unknown)
        states += 1
        before = (state, run_start)
        done_known, done_unknown, state, run_start = new_known, new_unknown, new_state, new_run
        nxt[prv[op]] = nxt[op]  # unlink
        prv[nxt[op]] = prv[op]
        if known[op]:
            left -= 1
            if left == 0:
                return True, [], states
            if left < best_left:
                best_left = left
                best = [f[2] for f in frames[1:]] + [op]
        frames.append([candidates(not known[op]), 0, op, *before])


def _fmt(value: object, limit: int = 24) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _explain(key: bytes, ops: list[tuple[int, Op]], init: bytes | None, prefix: list[int]) -> str:
    """Say where the longest legal prefix got stuck and list the ops around that point.

    A complete proof of "no order works" is the whole search tree; the useful part for a human
    is the deepest point reached: the state there, the completed op that had to come next (the
    earliest completion still pending), and the ops it was concurrent with.
    """
    state = init
    for j in prefix:
        _, op = ops[j]
        state = _step(
            KINDS.index(op.kind), op.value, op.expected, op.output, op.complete is not None, state
        )[1]
    done = set(prefix)
    pending = [j for j in range(len(ops)) if j not in done]
    blocker = min(
        (j for j in pending if ops[j][1].complete is not None),
        key=lambda j: _completion(ops[j][1]),
    )
    b_index, b_op = ops[blocker]
    rivals = [j for j in pending if j != blocker and ops[j][1].invoke <= _completion(b_op)]
    known_total = sum(1 for _, op in ops if op.complete is not None)
    fits = _step(KINDS.index(b_op.kind), b_op.value, b_op.expected, b_op.output, True, state)[0]
    why = "it fits that state, but nothing legal can follow" if fits else _why(b_op, state)
    if rivals:
        why += f"; no order with the {len(rivals)} concurrent pending ops helps"
    lines = [
        f"key {key!r}: not linearizable ({len(ops)} ops).",
        f"Longest legal prefix: {len(done)} ops ({_count_known(ops, prefix)} of {known_total} "
        f"completed), leaving state {_fmt(state)}.",
        f"Next, #{b_index} must take effect before it completed at {_completion(b_op):g}: {why}.",
        "Ops (by invoke; * = in the prefix):",
    ]
    context = set(prefix[-4:]) | set(rivals) | {blocker}
    shown = sorted(context, key=lambda j: (ops[j][1].invoke, ops[j][0]))
    cap = 25
    for j in shown[:cap]:
        index, op = ops[j]
        lines.append(f"  {'*' if j in done else ' '} {op.describe(index)}")
    if len(shown) > cap:
        lines.append(f"  ... {len(shown) - cap} more")
    hidden = len(ops) - len(shown)
    if hidden > 0:
        lines.append(f"  ({hidden} earlier/later ops of this key not shown)")
    return "\n".join(lines)


def _completion(op: Op) -> float:
    return _INF if op.complete is None else op.complete


def _count_known(ops: list[tuple[int, Op]], prefix: list[int]) -> int:
    return sum(1 for j in prefix if ops[j][1].complete is not None)


def _why(op: Op, state: object) -> str:
    """Why ``op`` is illegal from ``state``."""
    if op.kind == "get":
        return f"it read {_fmt(op.output)} but the state is {_fmt(state)}"
    if op.kind == "delete":
        exists = "exists" if state is not None else "is absent"
        return f"it returned {op.output} but the key {exists}"
    if op.kind == "cas":
        would = state == op.expected
        return f"it returned {op.output} but from state {_fmt(state)} it would return {would}"
    raise AssertionError("a put is always legal")
