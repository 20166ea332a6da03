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
        scores.best                            # this node's copy (a stale read)
        await scores.top(3)                    # a linearizable read (at the leader)

A ``@replicated`` method called on an object of a started node proposes the call (its name and
arguments) and returns its result once applied; every node applies it to its own copy, so the
method must be deterministic and change only the object. With ``SyncNode`` the call blocks
instead of returning an awaitable. ``@readonly`` methods answer linearizable reads through the
leader. Inside a method, calls to other replicated methods run directly.

Commands, results and snapshots use ``raftfast.objects.codec`` (data only: never pickle), so
arguments, results and an object's state (its public attributes, or what ``__getstate__``
returns) must be None, booleans, numbers, strings, bytes, lists, tuples or dicts of them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, BinaryIO

from raftfast.errors import RaftfastError
from raftfast.objects.codec import decode, encode
from raftfast.statemachine import StateMachine

__all__ = ["Objects", "readonly", "replicated"]

_BOUND = "_raftfast_objects"  # the Objects an object belongs to
_NAME = "_raftfast_name"  # its name there


class replicated:  # noqa: N801 - a decorator, named like one
    """Mark a method as a replicated write (see the module docs)."""

    kind = "write"

    def __init__(self, fn: Callable[..., Any]) -> None:
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
        if objects is not None and objects.applying:
            return self.fn(obj, *args, **kwargs)  # (called from an applying method)
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
        self.applying = False

    def _add(self, name: str, obj: Any) -> None:
        if name in self.objects:
            raise ValueError(f"two objects named {name!r}: name them (Objects(a=..., b=...))")
        if getattr(obj, _BOUND, None) is not None:
            raise ValueError(f"{name!r} belongs to another Objects already")
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
        self.applying = True
        try:
            return encode(method.fn(obj, *args, **kwargs))
        except Exception as exc:  # noqa: BLE001 - the proposer's error, the node goes on
            return exc
        finally:
            self.applying = False

    def query(self, request: bytes) -> bytes:
        method, obj, args, kwargs = self._method(request, "read")
        return encode(method.fn(obj, *args, **kwargs))

    def snapshot(self, out: BinaryIO) -> None:
        out.write(encode({name: _state_of(obj) for name, obj in self.objects.items()}))

    def restore(self, inp: BinaryIO) -> None:
        states = decode(inp.read())
        for name, obj in self.objects.items():
            if name in states:
                _set_state(obj, states[name])

    def _method(self, command: bytes, kind: str) -> tuple[replicated, Any, list, dict]:
        """The method, object and arguments a command names; ValueError if it names none
        (commands come from the network)."""
        call = decode(command)
        if not (isinstance(call, list) and len(call) == 4):
            raise ValueError("not a call: [object, method, args, kwargs]")
        name, method_name, args, kwargs = call
        obj = self.objects.get(name) if isinstance(name, str) else None
        if obj is None:
            raise ValueError(f"no object named {name!r}")
        method = getattr(type(obj), method_name, None) if isinstance(method_name, str) else None
        if not isinstance(method, replicated) or method.kind != kind:
            raise ValueError(f"{name}.{method_name} is not a {kind} method")
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise ValueError("arguments: a list and a dict")
        if not all(isinstance(k, str) for k in kwargs):
            raise ValueError("keyword arguments are named by strings")
        return method, obj, args, kwargs


async def _decoded(answer: Any) -> Any:
    return decode(await answer)


def _state_of(obj: Any) -> Any:
    if hasattr(obj, "__getstate__") and type(obj).__getstate__ is not object.__getstate__:
        return obj.__getstate__()
    return {k: v for k, v in vars(obj).items() if not k.startswith("_")}


def _set_state(obj: Any, state: Any) -> None:
    if hasattr(obj, "__setstate__"):
        obj.__setstate__(state)
    else:
        for key, value in state.items():
            setattr(obj, key, value)
