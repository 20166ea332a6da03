"""A small, safe binary encoding for the commands, results and snapshots of replicated objects.

Never pickle: a node decodes what anyone who reaches it sent. This decodes data, nothing else:
None, booleans, integers (any size), floats, strings, bytes, bytearrays, lists, tuples, dicts,
sets, frozensets and defaultdicts whose default is one of ``DEFAULT_FACTORIES`` (keys and
items of the same kinds, hashable where they must be). Each comes back as the very type it was.
Anything else raises TypeError on encoding; malformed input, nesting deeper than the limit or
lengths past the end raise ValueError on decoding.

Subclasses of these (an ``IntEnum``, a ``namedtuple``, an ``OrderedDict``...) travel as their
base type in a command or a result (the method gets the same value on every node). A snapshot
must give back exactly what it was taken of, or a restored node would run the next command
differently from the others: ``encode(..., exact=True)`` refuses them there, and keeps shared
references: a list, dict, set, bytearray or defaultdict met again (two indexes of one record,
a cycle) is written as a reference to the first, and ``decode(..., references=True)`` gives
back one object where there was one (without it a restored node held two copies, and the next
command changed only one of them).

Commands and results nest at most ``MAX_DEPTH`` deep; a snapshot, which puts an object's state
a few levels further in, at most ``MAX_STATE_DEPTH`` (a value a call may carry fits in state).

What a client sends (a command before it is proposed, a query) is decoded ``limited``: it
holds at most ``MAX_ITEMS`` values (decoding is Python, ~1-3 us a value, on the node's event
loop: a 1.4 MB command of 700,000 empty sets held a node 1.5 s), and no set or dict in it has
more than ``MAX_SAME_HASH`` keys sharing a hash (numbers hash the same everywhere: the
multiples of 2**61 - 1 all hash to 0, and 30,000 of them in a set took 9.6 s to build, on
every node). A snapshot is decoded whole: it holds what the commands built.

Layout: a tag byte, then ``N`` (an unsigned LEB128 length or count) and the payload:
``n`` None, ``t``/``f`` booleans, ``i``/``I`` a non-negative/negative integer (N bytes of its
magnitude, little-endian), ``d`` a float (8 bytes), ``s`` UTF-8 text, ``b`` bytes, ``a`` a
bytearray, ``l``/``u`` a list/tuple (N items), ``m`` a dict (N key/value pairs), ``e``/``z`` a
set/frozenset (N items), ``D`` a defaultdict (its factory's name as a string item, then N
key/value pairs); in a snapshot, ``r`` the N-th list, dict, set, bytearray or defaultdict met
before (counted from 0 in the order each first began).
"""

from __future__ import annotations

import struct
from collections import Counter, defaultdict
from typing import Any

__all__ = [
    "DEFAULT_FACTORIES",
    "MAX_DEPTH",
    "MAX_ITEMS",
    "MAX_SAME_HASH",
    "MAX_STATE_DEPTH",
    "decode",
    "encode",
]

MAX_DEPTH = 64
MAX_ITEMS = 50_000  # values in a command or query (each item, key and container counts one)
MAX_SAME_HASH = 16  # keys of one set or dict sharing a hash, in a command or query
MAX_STATE_DEPTH = 256  # (each level is a frame of Python's stack: well within its 1,000)
_FLOAT = struct.Struct("<d")
# A defaultdict's default, by name (a name, not code: nothing else is called on decoding).
DEFAULT_FACTORIES: dict[str, Any] = {
    f.__name__: f for f in (int, float, str, bytes, list, tuple, dict, set, frozenset, bool)
}
DEFAULT_FACTORIES["None"] = None
_EXACT = (type(None), bool, int, float, str, bytes, bytearray, list, tuple, dict, set, frozenset)
_MUTABLE = (list, dict, set, bytearray, defaultdict)  # (shared references kept in a snapshot)


def encode(value: Any, *, exact: bool = False, max_depth: int = MAX_DEPTH) -> bytes:
    """``value``'s bytes; ``exact``: refuse what would not come back as its very type, and
    keep shared references (a snapshot's rules)."""
    out = bytearray()
    _encode(value, out, max_depth, exact, {} if exact else None)
    return bytes(out)


def _length(n: int, out: bytearray) -> None:
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)


def _encode(
    value: Any, out: bytearray, room: int, exact: bool, seen: dict[int, int] | None
) -> None:
    """``room``: how many levels deeper containers may still go; ``seen``: the mutable
    containers met so far (id -> their number), if references are kept."""
    if room < 0:
        raise TypeError("nested deeper than allowed")
    kind = type(value)
    if seen is not None and kind in _MUTABLE:
        number = seen.get(id(value))
        if number is not None:  # (the state holds it, and so keeps its id, until encoded)
            out += b"r"
            _length(number, out)
            return
        seen[id(value)] = len(seen)
    if kind is defaultdict:
        factory = value.default_factory
        name = "None" if factory is None else getattr(factory, "__name__", "")
        if DEFAULT_FACTORIES.get(name, 0) is not factory:
            raise TypeError(f"cannot encode a defaultdict of {factory!r} (only of builtins)")
        out += b"D"
        _length(len(value), out)
        _encode(name, out, room - 1, exact, seen)
        for key, item in value.items():
            _encode(key, out, room - 1, exact, seen)
            _encode(item, out, room - 1, exact, seen)
        return
    if exact and kind not in _EXACT:
        raise TypeError(
            f"cannot keep a {kind.__name__} in a snapshot as it is (data only: see the docs)"
        )
    if value is None:
        out += b"n"
    elif value is True:
        out += b"t"
    elif value is False:
        out += b"f"
    elif isinstance(value, int):
        magnitude = abs(value)
        data = magnitude.to_bytes((magnitude.bit_length() + 7) // 8, "little")
        out += b"i" if value >= 0 else b"I"
        _length(len(data), out)
        out += data
    elif isinstance(value, float):
        out += b"d" + _FLOAT.pack(value)
    elif isinstance(value, str):
        data = str.encode(value, "utf-8", "surrogatepass")
        out += b"s"
        _length(len(data), out)
        out += data
    elif isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
        out += b"a" if kind is bytearray else b"b"
        _length(len(data), out)
        out += data
    elif isinstance(value, list | tuple | set | frozenset):
        if isinstance(value, list):
            out += b"l"
        elif isinstance(value, tuple):
            out += b"u"
        else:
            out += b"e" if isinstance(value, set) else b"z"
        _length(len(value), out)
        for item in value:
            _encode(item, out, room - 1, exact, seen)
    elif isinstance(value, dict):
        out += b"m"
        _length(len(value), out)
        for key, item in value.items():
            _encode(key, out, room - 1, exact, seen)
            _encode(item, out, room - 1, exact, seen)
    else:
        raise TypeError(f"cannot encode a {kind.__name__} (data only: see the docs)")


def decode(
    data: bytes, *, max_depth: int = MAX_DEPTH, limited: bool = False, references: bool = False
) -> Any:
    """The value ``data`` holds; ``limited``: a client's (see the module docs);
    ``references``: a snapshot's, which may refer to a container met before."""
    view = memoryview(bytes(data))
    made: list | None = [] if references else None
    value, pos = _decode(view, 0, max_depth, [MAX_ITEMS] if limited else None, made)
    if pos != len(view):
        raise ValueError(f"{len(view) - pos} bytes after the value")
    return value


def _read_length(view: memoryview, pos: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if pos >= len(view):
            raise ValueError("truncated length")
        byte = view[pos]
        pos += 1
        n |= (byte & 0x7F) << shift
        if byte < 0x80:
            return n, pos
        shift += 7
        if shift > 63:
            raise ValueError("length too long")


def _take(view: memoryview, pos: int, n: int) -> tuple[memoryview, int]:
    if n > len(view) - pos:
        raise ValueError("a length past the end")
    return view[pos : pos + n], pos + n


def _check_hashes(keys: list) -> None:
    """Refuse keys of which too many share a hash (a quadratic set or dict to build)."""
    try:
        counts = Counter(map(hash, keys))  # (a hash's own hash is itself: no collisions here)
    except TypeError:
        raise ValueError("an unhashable key or set item") from None
    if counts and max(counts.values()) > MAX_SAME_HASH:
        raise ValueError(
            f"more than {MAX_SAME_HASH} keys of a set or dict share a hash (they would take "
            "time quadratic in their number to store)"
        )


def _decode(
    view: memoryview, pos: int, room: int, budget: list[int] | None, made: list | None
) -> tuple[Any, int]:
    """``budget``: [values still allowed], or None for no limit; ``made``: the mutable
    containers made so far, in order, if references may refer to them."""
    if room < 0:
        raise ValueError("nested deeper than allowed")
    if pos >= len(view):
        raise ValueError("truncated")
    if budget is not None:
        budget[0] -= 1
        if budget[0] < 0:
            raise ValueError(f"more than {MAX_ITEMS} values")
    tag = view[pos]
    pos += 1
    if tag == ord("n"):
        return None, pos
    if tag == ord("t"):
        return True, pos
    if tag == ord("f"):
        return False, pos
    if tag == ord("d"):
        raw, pos = _take(view, pos, 8)
        return _FLOAT.unpack(raw)[0], pos
    if tag in (ord("i"), ord("I"), ord("s"), ord("b"), ord("a")):
        n, pos = _read_length(view, pos)
        raw, pos = _take(view, pos, n)
        if tag == ord("s"):
            try:
                return str(raw, "utf-8", "surrogatepass"), pos
            except UnicodeDecodeError as exc:
                raise ValueError(f"bad text: {exc}") from None
        if tag == ord("b"):
            return bytes(raw), pos
        if tag == ord("a"):
            made_array = bytearray(raw)
            if made is not None:
                made.append(made_array)
            return made_array, pos
        magnitude = int.from_bytes(raw, "little")
        return (magnitude if tag == ord("i") else -magnitude), pos
    if tag in (ord("l"), ord("u"), ord("m"), ord("e"), ord("z"), ord("D")):
        count, pos = _read_length(view, pos)
        if count > len(view) - pos:  # every item takes a byte at least
            raise ValueError("a count past the end")
        if tag in (ord("m"), ord("D")):
            out: dict = {}
            if tag == ord("m") and made is not None:  # (before its items, numbered as in
                made.append(out)  # encode: one of them may refer to it)
            if tag == ord("D"):
                name, pos = _decode(view, pos, room - 1, budget, made)
                if not isinstance(name, str) or name not in DEFAULT_FACTORIES:
                    raise ValueError(f"a defaultdict of {name!r}: not a builtin")
                out = defaultdict(DEFAULT_FACTORIES[name])
                if made is not None:
                    made.append(out)
            keys, values = [], []
            for _ in range(count):
                key, pos = _decode(view, pos, room - 1, budget, made)
                value, pos = _decode(view, pos, room - 1, budget, made)
                keys.append(key)
                values.append(value)
            if budget is not None:
                _check_hashes(keys)
            try:
                out.update(zip(keys, values, strict=True))
            except TypeError:
                raise ValueError("an unhashable dict key") from None
            return out, pos
        items: list = []
        made_set: set = set()
        if made is not None and tag in (ord("l"), ord("e")):
            made.append(items if tag == ord("l") else made_set)
        for _ in range(count):
            item, pos = _decode(view, pos, room - 1, budget, made)
            items.append(item)
        if budget is not None and tag in (ord("e"), ord("z")):
            _check_hashes(items)
        if tag == ord("l"):
            return items, pos
        if tag == ord("u"):
            return tuple(items), pos
        try:
            if tag == ord("e"):
                made_set.update(items)
                return made_set, pos
            return frozenset(items), pos
        except TypeError:
            raise ValueError("an unhashable item in a set") from None
    if tag == ord("r") and made is not None:
        n, pos = _read_length(view, pos)
        if n >= len(made):
            raise ValueError(f"a reference to container {n} of {len(made)}")
        return made[n], pos
    raise ValueError(f"unknown tag {tag:#x}")
