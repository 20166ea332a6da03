"""The KV commands: their binary encoding, shared by the client (which packs pairs) and the
state machine (which decodes every committed command).

Layout (struct, little-endian)::

    op u8 | client_id u64 | sequence u64 | key_len u32 | key
    PUT:      value (the rest of the payload)
    PUT_MANY: no key; the pairs, packed by ``pack_pairs`` (the rest)
    DELETE:   nothing
    CAS:      expect_absent u8 (0 or 1) | expected_len u32 | expected | value (the rest)
    ALARM:    key = the alarm's name (b"NOSPACE"); active u8 (1: raise, 0: clear)

Nothing here imports grpc or the server, so the client and tools can use it alone.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from raftfast._accel import encode_uniform
from raftfast._store_py import packed_items
from raftfast.limits import MAX_CLIENT_ID, MAX_SEQUENCE

__all__ = [
    "ALARMS",
    "NOSPACE",
    "OP_ALARM",
    "OP_CAS",
    "OP_DELETE",
    "OP_ETCD",
    "OP_PUT",
    "OP_PUT_MANY",
    "decode",
    "encode_alarm",
    "encode_cas",
    "encode_delete",
    "encode_put",
    "encode_put_many",
    "pack_pairs",
    "unpack_pairs",
]

OP_PUT = 1
OP_DELETE = 2
OP_CAS = 3
OP_PUT_MANY = 4  # many puts in one entry: one atomic, exactly-once write (pipelined clients)
OP_ALARM = 5  # raise or clear an alarm
OP_ETCD = 6  # an etcd v3 API write: the rest is raftfast.etcd.mvcc's command (no dedup)
NOSPACE = b"NOSPACE"  # the state passed --quota-backend-bytes, or the disk is nearly full
ALARMS = (NOSPACE,)  # every alarm there is; bit i of a snapshot's alarm field is ALARMS[i]


_HEADER = struct.Struct("<BQQI")  # op, client_id, sequence, key length
_CAS_HEAD = struct.Struct("<BI")  # expect_absent, expected length


def _header(op: int, client_id: int, seq: int, key: bytes) -> bytes:
    if not 0 <= client_id <= MAX_CLIENT_ID or not 0 <= seq <= MAX_SEQUENCE:
        raise ValueError(f"client_id and sequence must be in [0, {MAX_SEQUENCE}]")
    return _HEADER.pack(op, client_id, seq, len(key)) + key


def encode_put(client_id: int, seq: int, key: bytes, value: bytes) -> bytes:
    """Encode "set key to value" (always succeeds when applied)."""
    return _header(OP_PUT, client_id, seq, bytes(key)) + bytes(value)


def encode_delete(client_id: int, seq: int, key: bytes) -> bytes:
    """Encode "remove key"; applying it reports whether the key existed."""
    return _header(OP_DELETE, client_id, seq, bytes(key))


def pack_pairs(items: Sequence[tuple[bytes, bytes]]) -> bytes:
    """Key/value pairs packed for PUT_MANY: the batch format with payloads key, value, ...
    (compiled packing and a CRC; the entries' index and term fields are unused, 0)."""
    return encode_uniform(0, 0, [x for pair in items for x in pair])


def unpack_pairs(data: bytes) -> tuple[list[bytes], list[bytes]]:
    """(keys, values) of ``pack_pairs`` output; ValueError if it is not well formed. (The
    state machine and the server read packed pairs in place: ``raftfast._accel``'s
    ``check_packed`` and ``KeyStore.put_packed``; this is for code that wants the objects.)"""
    flat = packed_items(data)
    return flat[0::2], flat[1::2]


def encode_put_many(client_id: int, seq: int, pairs: bytes) -> bytes:
    """Encode "set every pair of ``pairs`` (``pack_pairs`` output)" as one command."""
    return _header(OP_PUT_MANY, client_id, seq, b"") + bytes(pairs)


def encode_cas(client_id: int, seq: int, key: bytes, expected: bytes | None, value: bytes) -> bytes:
    """Encode "set key to value if it currently equals expected".

    ``expected=None`` means "only if the key is absent" (distinct from expecting b"").
    """
    if expected is None:
        tail = _CAS_HEAD.pack(1, 0)
    else:
        expected = bytes(expected)
        tail = _CAS_HEAD.pack(0, len(expected)) + expected
    return _header(OP_CAS, client_id, seq, bytes(key)) + tail + bytes(value)


def encode_alarm(name: bytes, active: bool) -> bytes:
    """Encode "raise (or clear) alarm ``name``"."""
    if name not in ALARMS:
        raise ValueError(f"unknown alarm {name!r}")
    return _header(OP_ALARM, 0, 0, name) + (b"\x01" if active else b"\x00")


def decode(payload: bytes) -> tuple[int, int, int, bytes, bytes | None, bytes]:
    """Parse a command into ``(op, client_id, seq, key, expected, value)``.

    ``expected`` is only meaningful for CAS (None = expect absent); ``value`` is b"" for
    DELETE. Raises ValueError for anything that ``encode_*`` could not have produced, so a
    corrupt or foreign payload is rejected as a whole rather than half-applied.
    """
    mv = memoryview(payload)
    n = len(mv)
    if n < _HEADER.size:
        raise ValueError(f"command too short ({n} bytes)")
    op, client_id, seq, klen = _HEADER.unpack_from(mv, 0)
    if client_id > MAX_CLIENT_ID or seq > MAX_SEQUENCE:
        # The dedup table (and its snapshot) holds sequences below 2**63; such a command can
        # only come from a log written before the API checked the range: a no-op everywhere.
        raise ValueError("client_id or sequence out of range")
    pos = _HEADER.size
    if klen > n - pos:
        raise ValueError("key length exceeds the payload")
    key = bytes(mv[pos : pos + klen])
    pos += klen
    if op == OP_PUT or op == OP_PUT_MANY:
        if op == OP_PUT_MANY and klen:
            raise ValueError("PUT_MANY carries no key")
        return op, client_id, seq, key, None, bytes(mv[pos:])
    if op == OP_DELETE:
        if pos != n:
            raise ValueError("trailing bytes after a DELETE command")
        return op, client_id, seq, key, None, b""
    if op == OP_CAS:
        if n - pos < _CAS_HEAD.size:
            raise ValueError("CAS command truncated")
        absent, elen = _CAS_HEAD.unpack_from(mv, pos)
        pos += _CAS_HEAD.size
        if absent not in (0, 1) or (absent and elen):
            raise ValueError("bad CAS expect_absent flag")
        if elen > n - pos:
            raise ValueError("CAS expected length exceeds the payload")
        expected = None if absent else bytes(mv[pos : pos + elen])
        pos += elen
        return op, client_id, seq, key, expected, bytes(mv[pos:])
    if op == OP_ALARM:
        flag = bytes(mv[pos:])
        if key not in ALARMS or flag not in (b"\x00", b"\x01") or client_id or seq:
            raise ValueError("bad ALARM command")
        return op, client_id, seq, key, None, flag
    raise ValueError(f"unknown op {op}")
