"""What a user's state machine is, as a joining node tells the leader (``JoinRequest.machine``),
and whether two are the same.

A node that serves another state machine must not join: it would apply the cluster's commands
to its own, and answer for it as leader. The class's name alone (``JoinRequest.state_machine``,
all a leader of an earlier release compares) let in another module's class of the same name
(``other:Tally`` joined ``mysm:Tally``, led, and answered with its own results) and every
``Objects`` (``Objects(counter=...)`` joined ``Objects(scores=...)``, led, and refused every
command: "no object named 'scores'"; a state machine user's hunt).

The identity is the class's module and qualified name, and an ``Objects``' objects by name with
theirs. Two classes match when their names are equal and so are their modules, unless one of
them is ``__main__`` (the same program started as a script on one node and imported on
another). The identity comes from the network: it is read with bounds, and a malformed one
does not match.
"""

from __future__ import annotations

import json
from typing import Any

from raftfast.objects.replicated import Objects

__all__ = ["MAX_IDENTITY_CHARS", "identity_of", "mismatch"]

MAX_IDENTITY_CHARS = 64 * 1024  # (an Objects of hundreds of objects fits)
_MAIN = "__main__"


def _class_of(obj: Any) -> list[str]:
    kind = type(obj)
    return [kind.__module__, kind.__qualname__]


def identity_of(state_machine: Any) -> str:
    """``state_machine``'s identity (JSON: its class, and an Objects' objects' classes)."""
    identity: dict[str, Any] = {"class": _class_of(state_machine)}
    if isinstance(state_machine, Objects):
        identity["objects"] = {name: _class_of(obj) for name, obj in state_machine.objects.items()}
    return json.dumps(identity, sort_keys=True, separators=(",", ":"))


def _read(identity: str) -> dict[str, Any] | None:
    if len(identity) > MAX_IDENTITY_CHARS:
        return None
    try:
        value = json.loads(identity)
    except (ValueError, RecursionError):  # (deep nesting: RecursionError)
        return None
    if not isinstance(value, dict) or not _is_class(value.get("class")):
        return None
    objects = value.get("objects")
    if objects is not None and not (
        isinstance(objects, dict) and all(_is_class(c) for c in objects.values())
    ):
        return None
    return value


def _is_class(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)


def _same_class(ours: list[str], theirs: list[str]) -> bool:
    (our_module, our_name), (their_module, their_name) = ours, theirs
    return our_name == their_name and (
        our_module == their_module or _MAIN in (our_module, their_module)
    )


def _named(cls: list[str]) -> str:
    return f"{cls[0][:100]}:{cls[1][:100]}"


def mismatch(ours: str, theirs: str) -> str | None:
    """How the state machine ``theirs`` differs from ``ours`` (both ``identity_of``'s), or
    None when they are the same."""
    mine, other = _read(ours), _read(theirs)
    if mine is None:  # (ours past MAX_IDENTITY_CHARS: an Objects of thousands of objects)
        return None  # (the class's name was compared: JoinRequest.state_machine)
    if other is None:
        return "it described its state machine in a form this node cannot read"
    if not _same_class(mine["class"], other["class"]):
        return f"this cluster runs {_named(mine['class'])}, it runs {_named(other['class'])}"
    our_objects, their_objects = mine.get("objects") or {}, other.get("objects") or {}
    for name in sorted(set(our_objects) | set(their_objects)):
        if name not in their_objects:
            return f"it has no object named {name[:100]!r}"
        if name not in our_objects:
            return f"it has an object named {name[:100]!r}, which this cluster has not"
        if not _same_class(our_objects[name], their_objects[name]):
            return (
                f"its object {name[:100]!r} is a {_named(their_objects[name])}, this "
                f"cluster's a {_named(our_objects[name])}"
            )
    return None
