"""Replicated Python objects, the way PySyncObj's users are used to them.

::

    class Scores:
        def __init__(self):
            self.best = {}

        @raftfast.replicated
        def record(self, player: str, score: int) -> int:
            self.best[player] = max(score, self.best.get(player, 0))
            return self.best[player]

        @raftfast.readonly
        def top(self, n: int) -> list:
            return sorted(self.best.items(), key=lambda kv: -kv[1])[:n]

    scores = Scores()
    async with raftfast.Node(..., state_machine=raftfast.Objects(scores)) as node:
        await scores.record("ann", 7)          # proposed, applied on every node, its result
        scores.best                            # this node's copy (shows the record above)
        await scores.top(3)                    # a linearizable read (at the leader)

A ``@replicated`` method called on an object of a started node proposes the call (its name and
arguments) and returns its result once applied; every node applies it to its own copy, so the
method must be deterministic and change only the object. It returns once this node has
applied the call too (a follower waits for its own copy, up to the call's deadline), so this
node's copy shows it. With ``SyncNode`` the call blocks
instead of returning an awaitable. ``@readonly`` methods answer linearizable reads through the
leader. Inside a method, calls to other replicated methods run directly (inside a read, other
reads only: a read changes nothing).

Commands, results and snapshots use ``raftfast.objects.codec`` (data only: never pickle), so
arguments, results and an object's state must be None, booleans, numbers, strings, bytes,
bytearrays, lists, tuples, dicts, sets, frozensets or defaultdicts (of builtins) of them. An
object's state is its ``__dict__``, every attribute, private ones too (PySyncObj's
``self.__counter`` style), or what ``__getstate__`` returns (``__setstate__`` takes it back):
keep anything that must stay local (a cache, a lock, a handle) out that way (without
``__setstate__`` a restore sets the state's attributes and keeps the local ones). A snapshot
gives back exactly that state: the same types (no subclasses: an ``OrderedDict`` or an
``IntEnum`` in state makes the snapshot fail, logged by the node, which goes on and tries
again later; ``Objects`` refuses an object whose state cannot be snapshotted, or not taken back
(a ``__getstate__`` that returns anything but a dict of attribute names, and no
``__setstate__``), at the start), no attribute a command deleted.

The order in which a set (or frozenset) iterates is not part of the state: another process
iterates the same set of strings in another order (each hashes strings with its own seed), and
a node restored from a snapshot may iterate a set of numbers in another order than one that
applied every command. A method must not let it show (``set.pop()``, the first item of a loop
over a set, in a result or a change): sort the items, or keep a dict, whose order (insertion)
every node and every snapshot keeps.

An asyncio ``Node``'s objects are called from the loop that runs the node; ``SyncNode``'s from
any thread but its own (calls from inside a replicated method run directly, but a call of the
node's own methods there would wait for itself: refused).
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable
from typing import Any, BinaryIO

from raftfast.errors import CommandError, RaftfastError, message_of
from raftfast.objects.codec import MAX_STATE_DEPTH, decode, encode
from raftfast.statemachine import StateMachine

__all__ = ["Objects", "readonly", "replicated"]

_BOUND = "_raftfast_objects"  # the Objects an object belongs to
_NAME = "_raftfast_name"  # its name there


class replicated:  # noqa: N801 - a decorator, named like one
    """Mark a method as a replicated write (see the module docs)."""

    kind = "write"

    def __init__(self, fn: Callable[..., Any]) -> None:
        if (
            inspect.iscoroutinefunction(fn)
            or inspect.isasyncgenfunction(fn)
            or (inspect.isgeneratorfunction(fn))
        ):
            # (its body would run only when awaited or iterated, which no node does: the call
            # was answered "applied" and changed nothing)
            raise TypeError(
                f"@{type(self).__name__} {fn.__name__}: an async or generator method never runs "
                "its body when applied; make it a plain method"
            )
        self.fn = fn
        self.name = fn.__name__
        functools.update_wrapper(self, fn)

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return functools.partial(self._call, obj)

    def _call(self, obj: Any, *args: Any, **kwargs: Any) -> Any:
        objects: Objects | None = getattr(obj, _BOUND, None)
        running = objects.running.kind if objects is not None else None
        if running == "write" or running == self.kind:
            return self.fn(obj, *args, **kwargs)  # (called from a method this thread runs)
        if running == "read":
            raise RaftfastError(f"{type(obj).__name__}.{self.name}: a read cannot call a write")
        if objects is None or objects.send is None:
            raise RaftfastError(
                f"{type(obj).__name__}.{self.name}: the object is not on a started node "
                "(give it to raftfast.Objects(...), the node's state machine, and start it)"
            )
        return objects.send(self.kind, [getattr(obj, _NAME), self.name, list(args), kwargs])


class readonly(replicated):  # noqa: N801
    """Mark a method as a linearizable read: answered at the leader, changing nothing."""

    kind = "read"


class Objects(StateMachine):
    """The state machine of replicated objects: ``Objects(counter, lock=ReplLock())`` (an
    object given without a name is named after its class)."""

    def __init__(self, *objects: Any, **named: Any) -> None:
        self.objects: dict[str, Any] = {}
        for obj in objects:
            self._add(type(obj).__name__, obj)
        for name, obj in named.items():
            self._add(name, obj)
        self.send: Callable[[str, list], Any] | None = None
        # What this thread runs now ("write": an apply, "read": a query; else None): calls
        # from inside run directly. Per thread: with SyncNode, the node's thread applies while
        # the user's threads call methods, which must be proposed.
        self.running = _Running()

    def _add(self, name: str, obj: Any) -> None:
        if name in self.objects:
            raise ValueError(f"two objects named {name!r}: name them (Objects(a=..., b=...))")
        if getattr(obj, _BOUND, None) is not None:
            raise ValueError(f"{name!r} belongs to another Objects already")
        try:  # (else its first snapshot fails, after snapshot_entries commands)
            state = _state_of(obj)  # (vars() of a __slots__ class raises TypeError: here)
            encode(state, exact=True, max_depth=MAX_STATE_DEPTH)
        except (TypeError, ValueError, RecursionError) as exc:
            raise ValueError(
                f"{name!r}: its state cannot be snapshotted ({message_of(exc)}): keep it to "
                "data (see raftfast.objects.replicated), or keep what is local out of it "
                "with __getstate__"
            ) from None
        if not hasattr(obj, "__setstate__") and not _attributes(state):
            # (else every snapshot was written, and none could be read: no node of the
            # cluster started again on its data directory)
            raise ValueError(
                f"{name!r}: its __getstate__ returns a {type(state).__name__}, which a restore "
                "cannot set as attributes: return a dict of attribute names, or add "
                "__setstate__ to take it back"
            )
        setattr(obj, _BOUND, self)
        setattr(obj, _NAME, name)
        self.objects[name] = obj

    def bind(self, propose: Callable[[bytes], Any], query: Callable[[bytes], Any]) -> None:
        """The node this state machine serves: ``propose(command)`` and ``query(request)``
        return the result's bytes (or an awaitable of them, on an asyncio node)."""

        def send(kind: str, call: list) -> Any:
            answer = (propose if kind == "write" else query)(encode(call))
            if hasattr(answer, "__await__"):
                return _decoded(answer)
            return decode(answer)

        self.send = send

    # -- the StateMachine interface --------------------------------------------------------

    def apply(self, index: int, command: bytes) -> Any:
        try:
            method, obj, args, kwargs = self._method(command, "write")
        except ValueError as exc:
            return exc
        self.running.kind = "write"
        try:
            result = method.fn(obj, *args, **kwargs)
        except KeyboardInterrupt:  # (a signal, not the call: StateMachine.apply_batch)
            raise
        except BaseException as exc:  # noqa: BLE001 - the proposer's error, not ours
            return exc
        finally:
            self.running.kind = None
        try:
            return encode(result)
        except (TypeError, ValueError, RecursionError) as exc:
            # (applied: the proposer must not take it for a call that never ran, and retry)
            return CommandError(f"applied, but its result cannot be sent: {message_of(exc)}")

    def check(self, command: bytes) -> None:
        """Refuse a command before it is proposed (ValueError): one that names no write
        method, or that a client sent too big to decode quickly (``codec``'s limits; its
        apply decodes it whole: a log written before these limits replays as it was)."""
        self._method(command, "write", limited=True)

    def query(self, request: bytes) -> bytes:
        method, obj, args, kwargs = self._method(request, "read", limited=True)
        self.running.kind = "read"
        try:
            return encode(method.fn(obj, *args, **kwargs))
        finally:
            self.running.kind = None

    def snapshot(self, out: BinaryIO) -> None:
        states = {name: _state_of(obj) for name, obj in self.objects.items()}
        out.write(encode(states, exact=True, max_depth=MAX_STATE_DEPTH))

    def restore(self, inp: BinaryIO) -> None:
        states = decode(inp.read(), max_depth=MAX_STATE_DEPTH, references=True)
        if not isinstance(states, dict):
            raise ValueError("not a snapshot of replicated objects")
        for name, obj in self.objects.items():
            if name in states:
                _set_state(obj, states[name])

    def _method(
        self, command: bytes, kind: str, limited: bool = False
    ) -> tuple[replicated, Any, list, dict]:
        """The method, object and arguments a command names; ValueError if it names none
        (commands come from the network; ``limited``: decoded with a client's limits)."""
        call = decode(command, limited=limited)
        if not (isinstance(call, list) and len(call) == 4):
            raise ValueError("not a call: [object, method, args, kwargs]")
        name, method_name, args, kwargs = call
        obj = self.objects.get(name) if isinstance(name, str) else None
        if obj is None:
            raise ValueError(f"no object named {_short(name)}")
        method = getattr(type(obj), method_name, None) if isinstance(method_name, str) else None
        if not isinstance(method, replicated) or method.kind != kind:
            raise ValueError(f"{name}.{_short(method_name)} is not a {kind} method")
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise ValueError("arguments: a list and a dict")
        if not all(isinstance(k, str) for k in kwargs):
            raise ValueError("keyword arguments are named by strings")
        return method, obj, args, kwargs


_NAME_SHOWN = 64  # characters of a name a client sent, in an error (it may be megabytes)


def _short(value: Any) -> str:
    """A client's value, as an error names it: a string shortened, anything else its type."""
    if not isinstance(value, str):
        return f"(a {type(value).__name__})"
    if len(value) <= _NAME_SHOWN:
        return repr(value)
    return f"{value[:_NAME_SHOWN]!r}... ({len(value)} characters)"


class _Running(threading.local):
    kind: str | None = None


async def _decoded(answer: Any) -> Any:
    return decode(await answer)


def _state_of(obj: Any) -> Any:
    if hasattr(obj, "__getstate__") and type(obj).__getstate__ is not object.__getstate__:
        return obj.__getstate__()
    return {k: v for k, v in vars(obj).items() if k not in (_BOUND, _NAME)}


def _attributes(state: Any) -> bool:
    """Whether a restore can set ``state`` as an object's attributes (it has no __setstate__)."""
    return isinstance(state, dict) and all(isinstance(k, str) for k in state)


def _set_state(obj: Any, state: Any) -> None:
    """``obj`` as it was when ``state`` was taken: no attribute more, none less."""
    if hasattr(obj, "__setstate__"):
        obj.__setstate__(state)
        return
    if not _attributes(state):
        raise ValueError(f"not the state of a {type(obj).__name__}: {type(state).__name__}")
    attributes = vars(obj)
    if hasattr(obj, "__getstate__") and type(obj).__getstate__ is not object.__getstate__:
        # (its own __getstate__ keeps local attributes out: they stay; the state's go)
        held = obj.__getstate__()
        ours = set(held) if isinstance(held, dict) else set()
    else:
        ours = set(attributes)
    for key in [k for k in ours if k not in state and k not in (_BOUND, _NAME)]:
        attributes.pop(key, None)
    attributes.update(state)
