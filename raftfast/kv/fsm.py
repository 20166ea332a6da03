"""The replicated key/value state machine and the binary encoding of its commands.

Every committed Raft entry of type ENTRY_NORMAL carries one command produced by ``encode_put``,
``encode_delete`` or ``encode_cas``. ``KVStateMachine.apply`` must be deterministic: every
replica applies the same entries in the same order and must end in the same state, so nothing
here may depend on time, randomness, hash order or the local process.

Command layout (struct, little-endian)::

    op u8 | client_id u64 | sequence u64 | key_len u32 | key
    PUT:    value (the rest of the payload)
    DELETE: nothing
    CAS:    expect_absent u8 (0 or 1) | expected_len u32 | expected | value (the rest)

Exactly-once writes: the dedup table (per client, the results of its recent sequences) is part
of the replicated state, so a retried write returns the result of its first application on
every replica. ``client_id`` 0 disables dedup for that command. Limits and their consequences:

* Per client only the last ``DEDUP_WINDOW`` sequence numbers (counted back from the highest
  sequence applied for that client) are remembered. A command whose sequence lies below that
  window is assumed to be a late duplicate and is NOT applied: PUT answers True (the write it
  duplicates was applied), DELETE and CAS answer False (nothing changed now). A client must
  therefore keep fewer than ``DEDUP_WINDOW`` writes outstanding.
* At most ``MAX_CLIENTS`` clients are remembered; beyond that the least recently active client
  (ordered by applied commands, hence identical on every replica) is forgotten, and a retry of
  one of its old writes would be applied again.
"""

from __future__ import annotations

import hashlib
import struct
from bisect import bisect_left, insort
from collections import OrderedDict

__all__ = [
    "DEDUP_WINDOW",
    "MAX_CLIENTS",
    "OP_CAS",
    "OP_DELETE",
    "OP_PUT",
    "KVStateMachine",
    "decode",
    "encode_cas",
    "encode_delete",
    "encode_put",
]

OP_PUT = 1
OP_DELETE = 2
OP_CAS = 3

ENTRY_NORMAL = 0  # raftfast.core.types.ENTRY_NORMAL (repeated to keep this module standalone)

DEDUP_WINDOW = 4096  # sequences remembered per client
MAX_CLIENTS = 100_000  # clients remembered before the least recently active is evicted

_HEADER = struct.Struct("<BQQI")  # op, client_id, sequence, key length
_CAS_HEAD = struct.Struct("<BI")  # expect_absent, expected length
_U64_MAX = (1 << 64) - 1
_MAX_PENDING_INDEX_OPS = 256  # key-set changes replayed into the scan index before a rebuild


# -------------------------------------------------------------------------- encoding


def _header(op: int, client_id: int, seq: int, key: bytes) -> bytes:
    if not 0 <= client_id <= _U64_MAX or not 0 <= seq <= _U64_MAX:
        raise ValueError("client_id and sequence must fit in an unsigned 64-bit integer")
    return _HEADER.pack(op, client_id, seq, len(key)) + key


def encode_put(client_id: int, seq: int, key: bytes, value: bytes) -> bytes:
    """Encode "set key to value" (always succeeds when applied)."""
    return _header(OP_PUT, client_id, seq, bytes(key)) + bytes(value)


def encode_delete(client_id: int, seq: int, key: bytes) -> bytes:
    """Encode "remove key"; applying it reports whether the key existed."""
    return _header(OP_DELETE, client_id, seq, bytes(key))


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
    pos = _HEADER.size
    if klen > n - pos:
        raise ValueError("key length exceeds the payload")
    key = bytes(mv[pos : pos + klen])
    pos += klen
    if op == OP_PUT:
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
    raise ValueError(f"unknown op {op}")


# -------------------------------------------------------------------------- state machine


class _Client:
    """Dedup state of one client: results of its sequences in (max_seq - window, max_seq]."""

    __slots__ = ("max_seq", "results")

    def __init__(self) -> None:
        self.max_seq = -1
        self.results: dict[int, bool] = {}


class KVStateMachine:
    """Deterministic KV store: a dict, a lazily maintained sorted key index and the dedup table.

    ``applied_index`` is the index of the last entry handed to ``apply``/``apply_batch``;
    ``malformed`` counts committed commands that could not be decoded (applied as no-ops).
    """

    def __init__(self, dedup_window: int = DEDUP_WINDOW, max_clients: int = MAX_CLIENTS) -> None:
        if dedup_window < 1 or max_clients < 1:
            raise ValueError("dedup_window and max_clients must be positive")
        self.applied_index = 0
        self.malformed = 0
        self._window = dedup_window
        self._max_clients = max_clients
        self._data: dict[bytes, bytes] = {}
        self._clients: OrderedDict[int, _Client] = OrderedDict()
        # Sorted key index for scan. None = must be rebuilt; otherwise _pending holds the
        # key-set changes (True = added, False = removed) made since, replayed on the next scan.
        self._index: list[bytes] | None = []
        self._pending: list[tuple[bool, bytes]] = []

    # -- applying -------------------------------------------------------------------------

    def apply(self, index: int, payload: bytes) -> bool | None:
        """Apply one committed command; return its result, or None if it is malformed.

        PUT -> True; DELETE -> whether the key existed; CAS -> whether it swapped. A duplicate
        (client_id, sequence) returns the first result and changes nothing.
        """
        self.applied_index = index
        try:
            op, client_id, seq, key, expected, value = decode(payload)
        except (ValueError, struct.error, TypeError):
            self.malformed += 1
            return None
        if client_id == 0:
            return self._execute(op, key, expected, value)

        client = self._clients.get(client_id)
        if client is None:
            client = self._clients[client_id] = _Client()
            if len(self._clients) > self._max_clients:
                self._clients.popitem(last=False)
        else:
            self._clients.move_to_end(client_id)
        if seq <= client.max_seq - self._window:
            return op == OP_PUT  # below the window: a late duplicate, see the module docs
        cached = client.results.get(seq)
        if cached is not None:
            return cached
        result = self._execute(op, key, expected, value)
        client.results[seq] = result
        if seq > client.max_seq:
            client.max_seq = seq
            if len(client.results) > 2 * self._window:
                floor = seq - self._window
                client.results = {s: r for s, r in client.results.items() if s > floor}
        return result

    def apply_batch(
        self, first_index: int, types: list[int], payloads: list[bytes]
    ) -> list[bool | None]:
        """Apply consecutive committed entries starting at ``first_index``.

        Only ENTRY_NORMAL (0) entries are commands; no-ops and config entries yield None and
        leave the store alone, but still advance ``applied_index``.
        """
        if len(types) != len(payloads):
            raise ValueError("types and payloads differ in length")
        out: list[bool | None] = []
        apply = self.apply
        for i, (etype, payload) in enumerate(zip(types, payloads, strict=True)):
            if etype == ENTRY_NORMAL:
                out.append(apply(first_index + i, payload))
            else:
                out.append(None)
        if payloads:
            self.applied_index = first_index + len(payloads) - 1
        return out

    def _execute(self, op: int, key: bytes, expected: bytes | None, value: bytes) -> bool:
        data = self._data
        if op == OP_PUT:
            if key not in data:
                self._key_added(key)
            data[key] = value
            return True
        if op == OP_DELETE:
            if key in data:
                del data[key]
                self._key_removed(key)
                return True
            return False
        # CAS
        current = data.get(key)
        if expected is None:
            if current is not None:
                return False
            self._key_added(key)
        elif current != expected:
            return False
        data[key] = value
        return True

    # -- scan index -----------------------------------------------------------------------

    def _key_added(self, key: bytes) -> None:
        if self._index is not None:
            self._pending.append((True, key))
            if len(self._pending) > _MAX_PENDING_INDEX_OPS:
                self._index = None
                self._pending = []

    def _key_removed(self, key: bytes) -> None:
        if self._index is not None:
            self._pending.append((False, key))
            if len(self._pending) > _MAX_PENDING_INDEX_OPS:
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

    # -- reading --------------------------------------------------------------------------

    def get(self, key: bytes) -> bytes | None:
        """The value of ``key``, or None if it is absent."""
        return self._data.get(key)

    def scan(self, prefix: bytes, limit: int) -> list[tuple[bytes, bytes]]:
        """Up to ``limit`` (<= 0: all) items whose key starts with ``prefix``, sorted by key."""
        keys = self._sorted_keys()
        data = self._data
        out: list[tuple[bytes, bytes]] = []
        i = bisect_left(keys, prefix)
        n = len(keys)
        while i < n:
            key = keys[i]
            if not key.startswith(prefix):
                break
            out.append((key, data[key]))
            if len(out) == limit:
                break
            i += 1
        return out

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    @property
    def client_count(self) -> int:
        """Clients currently remembered by the dedup table."""
        return len(self._clients)

    def fingerprint(self) -> str:
        """A digest of the whole replicated state (store and dedup table).

        Two replicas that applied the same entries have equal fingerprints; tests and
        divergence checks compare these instead of reaching into private state.
        """
        h = hashlib.sha256()
        for key in self._sorted_keys():
            value = self._data[key]
            h.update(struct.pack("<I", len(key)) + key + struct.pack("<I", len(value)) + value)
        h.update(b"\x00clients")
        for client_id, client in self._clients.items():  # LRU order is replicated state too
            floor = client.max_seq - self._window
            live = sorted((s, r) for s, r in client.results.items() if s > floor)
            h.update(struct.pack("<Qqq", client_id, client.max_seq, len(live)))
            for seq, result in live:
                h.update(struct.pack("<Q?", seq, result))
        return h.hexdigest()
