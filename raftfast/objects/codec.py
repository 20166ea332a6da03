"""A small, safe binary encoding for the commands and results of replicated objects.

Never pickle: a node decodes what anyone who reaches it sent. This decodes data, nothing else:
None, booleans, integers (any size), floats, strings, bytes, lists, tuples and dicts (their keys
of the same kinds, hashable). Anything else raises TypeError on encoding; malformed input,
nesting deeper than ``MAX_DEPTH`` or lengths past the end raise ValueError on decoding.

Layout: a tag byte, then ``N`` (an unsigned LEB128 length or count) and the payload:
``n`` None, ``t``/``f`` booleans, ``i``/``I`` a non-negative/negative integer (N bytes of its
magnitude, little-endian), ``d`` a float (8 bytes), ``s`` UTF-8 text, ``b`` bytes, ``l``/``u``
a list/tuple (N items), ``m`` a dict (N key/value pairs).
"""

from __future__ import annotations

import struct
from typing import Any

__all__ = ["MAX_DEPTH", "decode", "encode"]

MAX_DEPTH = 64
_FLOAT = struct.Struct("<d")


def encode(value: Any) -> bytes:
    out = bytearray()
    _encode(value, out, 0)
    return bytes(out)


def _length(n: int, out: bytearray) -> None:
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)


def _encode(value: Any, out: bytearray, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise TypeError(f"nested deeper than {MAX_DEPTH}")
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
        data = value.encode("utf-8", "surrogatepass")
        out += b"s"
        _length(len(data), out)
        out += data
    elif isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
        out += b"b"
        _length(len(data), out)
        out += data
    elif isinstance(value, list | tuple):
        out += b"l" if isinstance(value, list) else b"u"
        _length(len(value), out)
        for item in value:
            _encode(item, out, depth + 1)
    elif isinstance(value, dict):
        out += b"m"
        _length(len(value), out)
        for key, item in value.items():
            _encode(key, out, depth + 1)
            _encode(item, out, depth + 1)
    else:
        raise TypeError(f"cannot encode a {type(value).__name__} (data only: see the docs)")


def decode(data: bytes) -> Any:
    view = memoryview(bytes(data))
    value, pos = _decode(view, 0, 0)
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


def _decode(view: memoryview, pos: int, depth: int) -> tuple[Any, int]:
    if depth > MAX_DEPTH:
        raise ValueError(f"nested deeper than {MAX_DEPTH}")
    if pos >= len(view):
        raise ValueError("truncated")
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
    if tag in (ord("i"), ord("I"), ord("s"), ord("b")):
        n, pos = _read_length(view, pos)
        raw, pos = _take(view, pos, n)
        if tag == ord("s"):
            try:
                return str(raw, "utf-8", "surrogatepass"), pos
            except UnicodeDecodeError as exc:
                raise ValueError(f"bad text: {exc}") from None
        if tag == ord("b"):
            return bytes(raw), pos
        magnitude = int.from_bytes(raw, "little")
        return (magnitude if tag == ord("i") else -magnitude), pos
    if tag in (ord("l"), ord("u"), ord("m")):
        count, pos = _read_length(view, pos)
        if count > len(view) - pos:  # every item takes a byte at least
            raise ValueError("a count past the end")
        if tag == ord("m"):
            out: dict = {}
            for _ in range(count):
                key, pos = _decode(view, pos, depth + 1)
                value, pos = _decode(view, pos, depth + 1)
                try:
                    out[key] = value
                except TypeError:
                    raise ValueError(f"an unhashable dict key ({type(key).__name__})") from None
            return out, pos
        items = []
        for _ in range(count):
            item, pos = _decode(view, pos, depth + 1)
            items.append(item)
        return (items if tag == ord("l") else tuple(items)), pos
    raise ValueError(f"unknown tag {tag:#x}")
