"""The replicated key/value state machine.

Every committed command was produced by ``raftfast.kv.commands`` (``encode_put``,
``encode_delete``, ``encode_cas``, ...). ``KVStateMachine.apply`` must be deterministic: every
replica applies the same entries in the same order and must end in the same state, so nothing
here may depend on time, randomness, hash order or the local process.

Alarms are replicated state, raised and cleared through the log like any write, so every node
(and every future leader) knows that writes are refused until an operator clears them.

Exactly-once writes: the dedup table (per client, the results of its recent sequences) is part
of the replicated state, so a retried write returns the result of its first application on
every replica. ``client_id`` 0 disables dedup for that command. Limits and their consequences:

* Per client only the last ``DEDUP_WINDOW`` sequence numbers (counted back from the highest
  sequence applied for that client) are remembered. A command whose sequence lies below that
  window is assumed to be a late duplicate and is NOT applied: PUT and PUT_MANY answer True
  (the write it duplicates was applied), DELETE and CAS answer False (nothing changed now). A
  client must therefore keep fewer than ``DEDUP_WINDOW`` writes outstanding.
* At most ``MAX_CLIENTS`` clients are remembered; beyond that the least recently active client
  (ordered by applied commands, hence identical on every replica) is forgotten, and a retry of
  one of its old writes would be applied again.
"""

from __future__ import annotations

import copy
import hashlib
import struct
import sys
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import BinaryIO

from raftfast._accel import KeyStore, apply_writes, check_packed, crc32c, load_store, sum_u32
from raftfast.dedup import (
    DEDUP_WINDOW,
    MAX_CLIENTS,
    ClientTable,
    ClientWindow,
    remember,
    window_of,
)
from raftfast.errors import CorruptionError, FormatVersionError
from raftfast.etcd.mvcc import MVCCStore
from raftfast.kv.commands import (
    ALARMS,
    OP_ALARM,
    OP_DELETE,
    OP_ETCD,
    OP_PUT,
    OP_PUT_MANY,
    decode,
)
from raftfast.statemachine import StateMachine

__all__ = ["DEDUP_WINDOW", "MAX_CLIENTS", "KVStateMachine"]

# Snapshot layout (little-endian; see KVStateMachine.snapshot):
SNAPSHOT_MAGIC = b"RFS1"
SNAPSHOT_VERSION = 3  # 2: the alarm field (reserved, 0, in 1); 3: the etcd keyspace
_SNAP_HEADER = struct.Struct("<4sHHQQ")  # magic, version, alarms, applied_index, malformed
_SNAP_COUNT = struct.Struct("<Q")  # number of keys / of clients
_SNAP_CLIENT = struct.Struct("<QqI")  # client_id, max_seq, live result count
_SNAP_CRC = struct.Struct("<I")
_BIG_ENDIAN = sys.byteorder == "big"
_ETCD = bytes((OP_ETCD,))
_MOST_FAST = 1 << 62  # dedup_window and max_clients apply_writes takes (C integers)
# What one key is counted as in ``size_bytes`` (hence the quota) beyond its key and value: its
# record's header, its hash slot and its place in the sorted index. Measured (RSS, 1,000,000
# keys, compiled KeyStore): 43 B (6-byte keys, empty values), 54 B (16 + 64 bytes). It was
# counted nothing: a 32 MiB quota let 8,000,000 keys of 4 bytes in, ~300 MB of every node.
KEY_OVERHEAD = 48


# -------------------------------------------------------------------------- state machine


class KVStateMachine(StateMachine):
    """Deterministic KV store: the keys and values (``raftfast._accel.KeyStore``: compact,
    with reads in key order) and the dedup table.

    ``applied_index`` is the index of the last entry handed to ``apply``/``apply_batch``;
    ``malformed`` counts committed commands that could not be decoded (applied as no-ops);
    ``alarms`` holds the alarms raised (``NOSPACE``); ``size_bytes`` is about the memory the
    keys and values take: their bytes and ``KEY_OVERHEAD`` a key (the etcd keyspace's, with its
    history, included, as it counts them).
    """

    def __init__(self, dedup_window: int = DEDUP_WINDOW, max_clients: int = MAX_CLIENTS) -> None:
        if dedup_window < 1 or max_clients < 1:
            raise ValueError("dedup_window and max_clients must be positive")
        self.applied_index = 0
        self.malformed = 0
        self.alarms: set[bytes] = set()
        self.size_bytes = 0
        self._window = dedup_window
        self._max_clients = max_clients
        # PUTs and DELETEs go to the compiled apply_writes, unless a subclass applies them its
        # own way or the limits do not fit its C integers (then all go through _apply_other).
        self._fast_writes = (
            type(self).apply is KVStateMachine.apply
            and dedup_window <= _MOST_FAST
            and max_clients <= _MOST_FAST
        )
        self._data = KeyStore()
        self._clients = ClientTable()
        # The etcd API's keyspace (raftfast.etcd): a namespace of its own, beside this one.
        self.etcd = MVCCStore()

    # -- applying -------------------------------------------------------------------------

    def apply(self, index: int, payload: bytes) -> bool | None:
        """Apply one committed command; return its result, or None if it is malformed.

        PUT -> True; DELETE -> whether the key existed; CAS -> whether it swapped. A duplicate
        (client_id, sequence) returns the first result and changes nothing.
        """
        self.applied_index = index
        out: list[bool | None] = []
        self._apply_writes([payload], 0, out)
        return out[0] if out else self._apply_other(payload)

    def apply_batch(self, first_index: int, commands: Sequence[bytes]) -> list[bool | None]:
        """Apply consecutive committed commands starting at ``first_index``."""
        if type(self).apply is not KVStateMachine.apply:  # (a subclass's own apply: each)
            each = [self.apply(first_index + i, payload) for i, payload in enumerate(commands)]
            if commands:
                self.applied_index = first_index + len(commands) - 1
            return each
        commands = commands if type(commands) is list else list(commands)
        out: list[bool | None] = []
        i, n = 0, len(commands)
        while True:
            i = self._apply_writes(commands, i, out)  # (the PUTs and DELETEs: compiled)
            if i == n:
                break
            self.applied_index = first_index + i
            out.append(self._apply_other(commands[i]))
            i += 1
        if commands:
            self.applied_index = first_index + n - 1
        return out

    def _apply_writes(self, commands: list[bytes], start: int, out: list[bool | None]) -> int:
        if not self._fast_writes:
            return start
        data = self._data
        before = _counted(data)
        end = apply_writes(
            data, self._clients, commands, start, self._window, self._max_clients, out
        )
        self.size_bytes += _counted(data) - before
        return end

    def _apply_other(self, payload: bytes) -> bool | None:
        """``apply`` of a command ``apply_writes`` leaves: an etcd write, a CAS, a PUT_MANY, an
        alarm, or one that is malformed."""
        if payload[:1] == _ETCD:
            return self._apply_etcd(payload)
        try:
            op, client_id, seq, key, expected, value = decode(payload)
            if op == OP_PUT_MANY:
                check_packed(value)  # (applied straight from the packed bytes)
        except (ValueError, struct.error, TypeError):
            self.malformed += 1
            return None
        if client_id == 0:
            return self._execute(op, key, expected, value)

        client = window_of(self._clients, client_id, self._max_clients)
        if client.is_late(seq, self._window):
            # Below the window: a late duplicate, see the module docs.
            return op in (OP_PUT, OP_PUT_MANY)
        cached = client.results.get(seq)
        if cached is not None:
            return cached
        result = self._execute(op, key, expected, value)
        remember(self._clients, client, seq, result, self._window)
        return result

    def _apply_etcd(self, payload: bytes):
        """An etcd API write: the etcd keyspace's response, or its EtcdError (returned)."""
        etcd = self.etcd
        before = etcd.size_bytes + etcd.history_bytes
        result = etcd.apply(memoryview(payload)[1:])
        self.size_bytes += etcd.size_bytes + etcd.history_bytes - before
        return result

    def _execute(self, op: int, key: bytes, expected: bytes | None, value) -> bool:
        data = self._data
        before = _counted(data)
        if op == OP_PUT_MANY:
            data.put_packed(value)
        elif op == OP_PUT:
            data.put(key, value)
        elif op == OP_DELETE:
            if data.delete(key) < 0:
                return False
        elif op == OP_ALARM:
            if value == b"\x01":
                self.alarms.add(key)
            else:
                self.alarms.discard(key)
        else:  # CAS
            current = data.get(key)
            if current != expected:  # (None expected: the key must be absent)
                return False
            data.put(key, value)
        self.size_bytes += _counted(data) - before
        return True

    def recount(self) -> int:
        """``size_bytes`` from its parts (each keeps its own exact count); returns it."""
        etcd = self.etcd
        self.size_bytes = _counted(self._data) + etcd.size_bytes + etcd.history_bytes
        return self.size_bytes

    # -- reading --------------------------------------------------------------------------

    def get(self, key: bytes) -> bytes | None:
        """The value of ``key``, or None if it is absent."""
        return self._data.get(key)

    def scan(self, prefix: bytes, limit: int) -> list[tuple[bytes, bytes]]:
        """Up to ``limit`` (<= 0: all) items whose key starts with ``prefix``, sorted by key."""
        return self.scan_page(prefix, limit)[0]

    def scan_page(
        self, prefix: bytes, limit: int, start: bytes = b"", max_bytes: int = 0
    ) -> tuple[list[tuple[bytes, bytes]], bytes]:
        """One page of ``scan``: items under ``prefix`` from key ``start`` on (at ``prefix`` if
        empty), at most ``limit`` of them (<= 0: no limit) and, past the first, at most
        ``max_bytes`` of keys and values (0: no limit). Returns (items, the key the next page
        starts at, or b"" if this was the last)."""
        return self._data.scan_page(prefix, limit, start, max_bytes)

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
        for key, value in self._data.items():
            h.update(struct.pack("<I", len(key)) + key + struct.pack("<I", len(value)) + value)
        h.update(b"\x00clients")
        for client_id, client in self._clients.items():  # LRU order is replicated state too
            floor = client.max_seq - self._window
            live = sorted((s, r) for s, r in client.results.items() if s > floor)
            h.update(struct.pack("<Qqq", client_id, client.max_seq, len(live)))
            for seq, result in live:
                h.update(struct.pack("<Q?", seq, result))
        if self.alarms:
            h.update(b"\x00alarms" + b",".join(sorted(self.alarms)))
        if self.etcd.revision > 1 or self.etcd.leases:
            h.update(b"\x00etcd" + self.etcd.dump())
        return h.hexdigest()

    # -- snapshots ------------------------------------------------------------------------

    # -- the StateMachine interface: snapshots through file objects, queries ----------------

    def snapshot(self, out: BinaryIO) -> None:
        for part in self._dump_parts():  # (no joined copy of the whole state in memory)
            out.write(part)

    def frozen(self) -> KVStateMachine:
        """The state as of now, cheap to take, whose ``snapshot`` (its only use) may then run
        in another thread while this machine goes on applying: the store hands out a frozen
        view of its records (``KeyStore.freeze``: nothing copied), the rest is copied."""
        twin = copy.copy(self)
        twin._data = self._data.freeze()
        twin._clients = self._clients.frozen()
        twin.alarms = set(self.alarms)
        twin.etcd = self.etcd.frozen()
        return twin

    def restore(self, inp: BinaryIO) -> None:
        self.load(inp.read())

    def restore_later(self, inp: BinaryIO) -> Callable[[], None]:
        """``restore`` in two steps, so that the driver can decode a leader's snapshot in a
        worker thread (seconds for 1M keys) while its loop goes on: this reads and checks
        ``inp`` into new objects, changing nothing of this machine (reads go on meanwhile),
        and returns what swaps them in, at once, to be called on the loop. Raises as
        ``restore``."""
        return self._decoded(inp.read())

    def query(self, request: bytes) -> bytes:
        """The value of key ``request`` (b"" if it is absent): the KV service reads the store
        itself; this serves the embeddable node's generic ``query``."""
        return self._data.get(bytes(request)) or b""

    def dump(self) -> bytes:
        """A deterministic serialization of the whole replicated state.

        It holds the store, the dedup table (clients in LRU order, each with its live window of
        results), ``applied_index`` and ``malformed``: two replicas that applied the same entries
        produce identical bytes. ``dedup_window`` and ``max_clients`` are configuration, not
        state, and must match across the cluster. Layout (little-endian)::

            header   magic "RFS1" | version u16 (2) | alarms u16 (bit i: ALARMS[i] is raised)
                     | applied_index u64 | malformed u64
            store    count u64 | key lengths u32[count] | value lengths u32[count]
                     | keys, concatenated | values, concatenated        (sorted by key)
            clients  count u64 | per client, least recently active first:
                     client_id u64 | max_seq i64 | n u32 | seqs u64[n] (ascending) | results u8[n]
            etcd     length u64 | the etcd keyspace (``MVCCStore.dump``; not in versions 1, 2)
            trailer  crc32c u32 of everything before it
        """
        return b"".join(self._dump_parts())

    def _dump_parts(self) -> list[bytes]:
        """``dump``'s bytes in parts (a snapshot writes them one by one)."""
        count, klens, vlens, keys, values = self._data.dump()
        etcd = self.etcd.dump()
        parts: list[bytes] = [
            _SNAP_HEADER.pack(
                SNAPSHOT_MAGIC,
                SNAPSHOT_VERSION,
                sum(1 << i for i, name in enumerate(ALARMS) if name in self.alarms),
                self.applied_index,
                self.malformed,
            ),
            _SNAP_COUNT.pack(count),
            klens,
            vlens,
            keys,
            values,
            _SNAP_COUNT.pack(len(self._clients)),
        ]
        window = self._window
        for client_id, client in self._clients.items():
            floor = client.max_seq - window
            live = sorted(s for s in client.results if s > floor)
            parts.append(_SNAP_CLIENT.pack(client_id, client.max_seq, len(live)))
            if live:
                seqs = array("Q", live)
                if _BIG_ENDIAN:
                    seqs.byteswap()
                parts.append(seqs.tobytes())
                parts.append(bytes(map(client.results.__getitem__, live)))
        parts += [_SNAP_COUNT.pack(len(etcd)), etcd]
        crc = 0
        for part in parts:
            crc = crc32c(part, crc)
        parts.append(_SNAP_CRC.pack(crc))
        return parts

    def load(self, data: bytes | bytearray | memoryview) -> None:
        """Replace the whole state with a ``dump()``'s.

        Raises CorruptionError (and changes nothing) if ``data`` is not an intact snapshot. If
        the snapshot remembers more clients than this machine's ``max_clients``, the least
        recently active ones are forgotten, as applying would have done.
        """
        self._decoded(data)()

    def _decoded(self, data: bytes | bytearray | memoryview) -> Callable[[], None]:
        """``load``'s work but the last step: the state ``data`` holds, in new objects, and
        the function that makes it this machine's (``load``; ``restore_later``)."""
        mv = memoryview(data).cast("B")
        size = len(mv)
        minimum = _SNAP_HEADER.size + 2 * _SNAP_COUNT.size + _SNAP_CRC.size
        if size < minimum:
            raise CorruptionError(
                f"KV snapshot truncated: {size} bytes, an empty one has {minimum}", offset=size
            )
        magic, version, alarm_bits, applied_index, malformed = _SNAP_HEADER.unpack_from(mv, 0)
        if magic != SNAPSHOT_MAGIC:
            raise CorruptionError(
                f"not a KV snapshot: bad magic {magic!r} (expected {SNAPSHOT_MAGIC!r})", offset=0
            )
        if version not in (1, 2, SNAPSHOT_VERSION):
            raise (FormatVersionError if version > SNAPSHOT_VERSION else CorruptionError)(
                f"unsupported KV snapshot version {version} (this build reads 1 to "
                f"{SNAPSHOT_VERSION})",
                offset=4,
            )
        end = size - _SNAP_CRC.size
        (crc,) = _SNAP_CRC.unpack_from(mv, end)
        if crc32c(mv[:end]) != crc:
            raise CorruptionError("KV snapshot CRC mismatch: truncated or corrupt", offset=end)
        if alarm_bits >> (len(ALARMS) if version > 1 else 0):
            raise CorruptionError(f"KV snapshot: unknown alarm bits {alarm_bits:#x}", offset=6)
        data_, parsed, etcd = _parse_snapshot(mv, _SNAP_HEADER.size, end, version)
        clients = ClientTable(parsed)
        while len(clients) > self._max_clients:
            clients.forget_oldest()
        alarms = {name for i, name in enumerate(ALARMS) if alarm_bits >> i & 1}

        def swap() -> None:
            self.applied_index = applied_index
            self.malformed = malformed
            self.alarms = alarms
            self._data = data_
            self._clients = clients
            self.etcd = etcd
            self.recount()

        return swap


def _parse_snapshot(
    mv: memoryview, pos: int, end: int, version: int
) -> tuple[KeyStore, OrderedDict[int, ClientWindow], MVCCStore]:
    """The store, the dedup table and the etcd keyspace of a snapshot whose
    CRC matched."""

    def take(n: int, what: str) -> memoryview:
        nonlocal pos
        if n > end - pos:
            raise CorruptionError(
                f"KV snapshot truncated: {what} needs {n} bytes at offset {pos}, "
                f"{end - pos} remain",
                offset=pos,
            )
        pos += n
        return mv[pos - n : pos]

    (count,) = _SNAP_COUNT.unpack(take(_SNAP_COUNT.size, "the key count"))
    at = pos
    klens = take(4 * count, "the key lengths")
    vlens = take(4 * count, "the value lengths")
    kblob = take(sum_u32(klens), "the keys")
    vblob = take(sum_u32(vlens), "the values")
    try:
        store = load_store(count, klens, vlens, kblob, vblob)
    except ValueError as exc:
        raise CorruptionError(f"KV snapshot: {exc}", offset=at) from None

    (ccount,) = _SNAP_COUNT.unpack(take(_SNAP_COUNT.size, "the client count"))
    clients: OrderedDict[int, ClientWindow] = OrderedDict()
    for _ in range(ccount):
        at = pos
        client_id, max_seq, n = _SNAP_CLIENT.unpack(take(_SNAP_CLIENT.size, "a client"))
        seqs = array("Q")
        seqs.frombytes(take(8 * n, "client sequences"))
        if _BIG_ENDIAN:
            seqs.byteswap()
        results = take(n, "client results").tobytes()
        if client_id == 0 or client_id in clients:
            raise CorruptionError(f"KV snapshot: bad or repeated client id {client_id}", offset=at)
        if (
            max_seq < -1
            or (n and seqs[-1] > max_seq)
            or not all(map(int.__lt__, seqs, seqs[1:]))
            or results.translate(None, b"\x00\x01")
        ):
            raise CorruptionError(f"KV snapshot: bad dedup window of client {client_id}", offset=at)
        client = clients[client_id] = ClientWindow()
        client.max_seq = max_seq
        client.results = dict(zip(seqs, map(bool, results), strict=True))
    etcd = MVCCStore()
    if version >= 3:
        (n,) = _SNAP_COUNT.unpack(take(_SNAP_COUNT.size, "the etcd keyspace length"))
        etcd = MVCCStore.load(take(n, "the etcd keyspace"))
    if pos != end:
        raise CorruptionError(
            f"KV snapshot has {end - pos} unexpected bytes at offset {pos}", offset=pos
        )
    return store, clients, etcd


def _counted(data: KeyStore) -> int:
    """What ``data`` counts for in ``size_bytes``."""
    return data.size_bytes + KEY_OVERHEAD * len(data)
