"""The KV store's keys and values (pure-Python twin of raftfast._store).

A dict and a sorted key index, kept lazily: key-set changes since the last ordered read wait in
a short list and are replayed into the index by the next one (past 256 of them the index is
rebuilt instead). The compiled twin keeps the same data in one byte arena and an open-addressing
table (~100 bytes per key of 16 + 64 bytes instead of ~230); behaviour, including exceptions,
is the same (tests/test_store.py).
"""

from __future__ import annotations

import struct
import sys
from array import array
from bisect import bisect_left, insort
from collections.abc import Iterator, Sequence
from itertools import accumulate

from raftfast._batch_py import decode_batch
from raftfast.dedup import ClientTable, remember, window_of
from raftfast.errors import BatchError
from raftfast.limits import MAX_CLIENT_ID, MAX_SEQUENCE

__all__ = [
    "Event",
    "FrozenStore",
    "KeyStore",
    "Record",
    "apply_writes",
    "check_packed",
    "load_store",
    "packed_items",
    "sum_u32",
]

_MAX_PENDING = 256  # key-set changes replayed into the index before it is rebuilt instead


class KeyStore:
    """Keys and values (``bytes``), with reads in key order."""

    def __init__(self) -> None:
        self._data: dict[bytes, bytes] = {}
        self._index: list[bytes] | None = []
        self._pending: list[tuple[bool, bytes]] = []
        self.size_bytes = 0  # of the keys and values held

    def __len__(self) -> int:
        return len(self._data)

    compacting = False  # (the compiled store's arena is compacted a step per write)
    table_moving = 0  # (... and its table grows a step per write)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def get(self, key: bytes) -> bytes | None:
        _check(key)
        return self._data.get(key)

    def put(self, key: bytes, value: bytes) -> int:
        """Set ``key``; the length of the value it replaced, or -1 if it was new."""
        _check(key, value)
        data = self._data
        old = data.get(key)
        data[key] = value
        if old is None:
            self._changed(True, key)
            self.size_bytes += len(key) + len(value)
            return -1
        self.size_bytes += len(value) - len(old)
        return len(old)

    def put_many(self, keys: Sequence[bytes], values: Sequence[bytes]) -> None:
        if len(keys) != len(values):
            raise ValueError("put_many: as many values as keys are needed")
        for key, value in zip(keys, values, strict=True):
            self.put(key, value)

    def put_packed(self, data) -> None:
        """Set every pair of ``data`` (``raftfast.kv.commands.pack_pairs`` output), all or
        none: ValueError, and nothing changed, if it is not well formed."""
        flat = packed_items(data)
        self.put_many(flat[0::2], flat[1::2])

    def delete(self, key: bytes) -> int:
        """Remove ``key``; the length of its value, or -1 if it was absent."""
        _check(key)
        old = self._data.pop(key, None)
        if old is None:
            return -1
        self._changed(False, key)
        self.size_bytes -= len(key) + len(old)
        return len(old)

    def _changed(self, added: bool, key: bytes) -> None:
        if self._index is not None:
            self._pending.append((added, key))
            if len(self._pending) > _MAX_PENDING:
                self._index = None
                self._pending = []

    def _sorted_keys(self) -> list[bytes]:
        index = self._index
        if index is None:
            index = self._index = sorted(self._data)
        elif self._pending:
            # Replaying in order is exact: an add is always of an absent key and a remove of a
            # present one, at the time it happened.
            for added, key in self._pending:
                if added:
                    insort(index, key)
                else:
                    del index[bisect_left(index, key)]
            self._pending = []
        return index

    def scan_page(
        self, prefix: bytes, limit: int, start: bytes = b"", max_bytes: int = 0
    ) -> tuple[list[tuple[bytes, bytes]], bytes]:
        """Items under ``prefix`` from key ``start`` on, in key order: at most ``limit`` of
        them (<= 0: no limit) and, past the first, at most ``max_bytes`` of keys and values (0:
        no limit). Returns (items, the key the next page starts at, or b"" after the last)."""
        _check(prefix, start)
        keys = self._sorted_keys()
        data = self._data
        out: list[tuple[bytes, bytes]] = []
        i = bisect_left(keys, max(prefix, start))
        n = len(keys)
        size = 0
        while i < n:
            key = keys[i]
            if not key.startswith(prefix):
                break
            value = data[key]
            size += len(key) + len(value)
            if (len(out) == limit or (max_bytes and size > max_bytes)) and out:
                return out, key
            out.append((key, value))
            i += 1
        return out, b""

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """Every item in key order (the store must not change meanwhile)."""
        data = self._data
        for key in self._sorted_keys():
            yield key, data[key]

    def dump(self) -> tuple[int, bytes, bytes, bytes, bytes]:
        """(count, key lengths as u32 little-endian, value lengths likewise, the keys
        concatenated, the values concatenated), in key order: the snapshot's store section."""
        keys = self._sorted_keys()
        values = list(map(self._data.__getitem__, keys))
        return (
            len(keys),
            b"".join(len(k).to_bytes(4, "little") for k in keys),
            b"".join(len(v).to_bytes(4, "little") for v in values),
            b"".join(keys),
            b"".join(values),
        )

    def freeze(self) -> FrozenStore:
        """The store as of now, for ``dump`` in another thread (the compiled one hands out a
        view of its arena; here, a copy, behind the same narrow interface)."""
        return FrozenStore(self.copy())

    def copy(self) -> KeyStore:
        twin = KeyStore()
        twin._data = dict(self._data)
        twin._index = None if self._index is None else list(self._index)
        twin._pending = list(self._pending)
        twin.size_bytes = self.size_bytes
        return twin


class FrozenStore:
    """A KeyStore as it was at ``KeyStore.freeze()``, for ``dump`` only."""

    __slots__ = ("_store",)

    def __init__(self, store: KeyStore) -> None:
        self._store = store

    def __len__(self) -> int:
        return len(self._store)

    @property
    def size_bytes(self) -> int:
        return self._store.size_bytes

    def dump(self) -> tuple[int, bytes, bytes, bytes, bytes]:
        return self._store.dump()


def packed_items(data) -> list[bytes]:
    """``[key, value, key, value, ...]`` of packed pairs; ValueError if not well formed."""
    if not len(data):
        raise ValueError("bad packed pairs: empty")
    try:
        flat = decode_batch(data)[3]
    except BatchError as exc:
        raise ValueError(f"bad packed pairs: {exc}") from None
    if len(flat) % 2:
        raise ValueError("bad packed pairs: an odd number of items")
    if not all(flat[0::2]):
        raise ValueError("bad packed pairs: an empty key")
    return flat


def check_packed(data) -> tuple[int, int, int]:
    """ValueError unless ``data`` is well-formed packed pairs; (the number of pairs, the
    longest key's length, the longest value's)."""
    flat = packed_items(data)
    keys, values = flat[0::2], flat[1::2]
    return len(keys), max(map(len, keys), default=0), max(map(len, values), default=0)


def sum_u32(data) -> int:
    """The sum of the little-endian u32s ``data`` holds (a snapshot's length columns)."""
    column = array("I" if array("I").itemsize == 4 else "L")
    column.frombytes(memoryview(data).cast("B"))
    if sys.byteorder == "big":
        column.byteswap()
    return sum(column)


def load_store(count: int, klens, vlens, keys, values) -> KeyStore:
    """A store from ``dump``'s parts (any buffers). ValueError if they do not add up or the
    keys are not strictly ascending."""
    klens, vlens, kblob, vblob = (memoryview(x).cast("B") for x in (klens, vlens, keys, values))
    if count < 0 or len(klens) != 4 * count or len(vlens) != 4 * count:
        raise ValueError("store: the length columns do not match the count")
    klen = [int.from_bytes(klens[i : i + 4], "little") for i in range(0, 4 * count, 4)]
    vlen = [int.from_bytes(vlens[i : i + 4], "little") for i in range(0, 4 * count, 4)]
    if sum(klen) != len(kblob) or sum(vlen) != len(vblob):
        raise ValueError("store: the keys or values do not match their lengths")
    koffs = list(accumulate(klen, initial=0))
    voffs = list(accumulate(vlen, initial=0))
    kbytes, vbytes = kblob.tobytes(), vblob.tobytes()
    keys_ = [kbytes[a:b] for a, b in zip(koffs, koffs[1:], strict=False)]
    values_ = [vbytes[a:b] for a, b in zip(voffs, voffs[1:], strict=False)]
    if not all(map(bytes.__lt__, keys_, keys_[1:])):
        raise ValueError("store: keys are not strictly ascending")
    store = KeyStore()
    store._data = dict(zip(keys_, values_, strict=True))
    store._index = keys_
    store.size_bytes = len(kbytes) + len(vbytes)
    return store


def _check(*items: object) -> None:
    for item in items:
        if type(item) is not bytes:
            raise TypeError(f"keys and values are bytes, not {type(item).__name__}")


# -- the KV state machine's plain writes (the compiled twin applies them from their bytes) -------

_CMD = struct.Struct("<BQQI")  # op, client_id, sequence, key length (raftfast.kv.commands)
_CMD_PUT, _CMD_DELETE = 1, 2  # (its OP_PUT and OP_DELETE)


def _write(store: KeyStore, op: int, key: bytes, value: bytes) -> bool:
    if op == _CMD_PUT:
        store.put(key, value)
        return True
    return store.delete(key) >= 0


def apply_writes(
    store: KeyStore,
    clients: ClientTable,
    payloads: list,
    start: int,
    window: int,
    max_clients: int,
    results: list,
) -> int:
    """Apply ``payloads[start:]`` to ``store`` while they are well-formed PUT or DELETE
    commands (raftfast.kv.commands), each result appended to ``results``, with the
    exactly-once rules of KVStateMachine.apply (``clients``: its ClientTable, ``window`` and
    ``max_clients`` its limits); return the index of the first that is anything else (or
    ``len(payloads)``), for the state machine to apply."""
    head = _CMD.size
    if not 0 <= start <= len(payloads):
        raise IndexError(f"start {start} is outside the {len(payloads)} payloads")
    for i in range(start, len(payloads)):
        payload = payloads[i]
        if type(payload) is not bytes or len(payload) < head:
            return i
        op, client_id, seq, klen = _CMD.unpack_from(payload)
        if op not in (_CMD_PUT, _CMD_DELETE) or client_id > MAX_CLIENT_ID or seq > MAX_SEQUENCE:
            return i
        vlen = len(payload) - head - klen
        if vlen < 0 or (op == _CMD_DELETE and vlen):
            return i
        key, value = payload[head : head + klen], payload[head + klen :]
        if client_id == 0:
            results.append(_write(store, op, key, value))
            continue
        client = window_of(clients, client_id, max_clients)
        if client.is_late(seq, window):
            results.append(op == _CMD_PUT)
            continue
        cached = client.results.get(seq)
        if cached is not None:
            results.append(cached)
            continue
        result = _write(store, op, key, value)
        remember(clients, client, seq, result, window)
        results.append(result)
    return len(payloads)


# -- etcd's records and events (raftfast.etcd.mvcc; the compiled twin keeps them out of the
# cycle collector) ----------------------------------------------------------------------------


class Record:
    """A key's state at one revision (immutable once made: history shares them)."""

    __slots__ = ("key", "value", "create", "mod", "version", "lease")

    def __init__(
        self, key: bytes, value: bytes, create: int, mod: int, version: int, lease: int
    ) -> None:
        _check(key, value)
        self.key = key
        self.value = value
        self.create = create
        self.mod = mod
        self.version = version
        self.lease = lease

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Record):
            return NotImplemented
        return all(getattr(self, f) == getattr(other, f) for f in self.__slots__)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"Record({self.key!r}, {self.value[:20]!r}, create={self.create}, mod={self.mod}, "
            f"version={self.version}, lease={self.lease})"
        )


class Event:
    """One change: ``key`` became ``after`` (None: deleted) at revision ``revision``; it was
    ``prev`` (None: absent)."""

    __slots__ = ("key", "after", "prev", "revision")

    def __init__(self, key: bytes, after: Record | None, prev: Record | None, revision: int):
        _check(key)
        for rec in (after, prev):
            if rec is not None and type(rec) is not Record:
                raise TypeError(f"expected a Record or None, not {type(rec).__name__}")
        self.key = key
        self.after = after
        self.prev = prev
        self.revision = revision

    def nbytes(self) -> int:
        """About the bytes this event takes in a WatchResponse (with its prev_kv)."""
        return (
            len(self.key)
            + (len(self.after.value) if self.after is not None else 0)
            + (len(self.prev.value) if self.prev is not None else 0)
            + 64
        )

    def __repr__(self) -> str:
        return f"Event({self.key!r}, {self.after!r}, {self.prev!r}, {self.revision})"
