"""Helpers shared by the WAL tests."""

from __future__ import annotations

import struct

from raftfast._accel import decode_batch, encode_uniform
from raftfast.storage.wal import WAL

HEADER = struct.Struct("<IIB")  # record header: length, crc32c, type


def batch(first: int, term: int, n: int, tag: str = "e") -> bytes:
    return encode_uniform(first, term, [f"{tag}{first + i}".encode() for i in range(n)])


def contents(log) -> list[tuple[int, int, bytes]]:
    """(index, term, payload) of every entry in an EntryLog."""
    if log.last_index < log.first_index:
        return []
    first, terms, _, payloads = decode_batch(log.slice(log.first_index, log.last_index + 1))
    return [(first + i, t, p) for i, (t, p) in enumerate(zip(terms, payloads, strict=True))]


def records(path) -> list[tuple[int, int, int]]:
    """(offset, type, total length) of each record in a segment file."""
    data = open(path, "rb").read()
    out, off = [], 0
    while off < len(data):
        length, _, rtype = HEADER.unpack_from(data, off)
        out.append((off, rtype, HEADER.size + length))
        off += HEADER.size + length
    return out


def reopen(wal: WAL, **kw) -> WAL:
    wal.close()
    return WAL.open(wal.path, **kw)
