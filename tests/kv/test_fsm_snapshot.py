"""KVStateMachine.snapshot/restore: round trips, determinism, dedup survival, corruption."""

from __future__ import annotations

import random
import struct

import pytest

from raftfast._accel import crc32c
from raftfast.errors import CorruptionError
from raftfast.etcd.mvcc import MVCCStore
from raftfast.kv.commands import NOSPACE, encode_alarm, encode_cas, encode_delete, encode_put
from raftfast.kv.fsm import KEY_OVERHEAD, SNAPSHOT_MAGIC, SNAPSHOT_VERSION, KVStateMachine

HEADER = struct.Struct("<4sHHQQ")


def random_commands(rng: random.Random, n: int, clients: int = 6) -> list[bytes]:
    """A history with puts, deletes, CAS, retries (duplicates), client 0 and malformed payloads."""
    out: list[bytes] = []
    seqs = dict.fromkeys(range(1, clients + 1), 0)
    for _ in range(n):
        r = rng.random()
        if r < 0.03:
            out.append(b"\xff" + bytes(rng.randint(0, 30)))  # malformed
            continue
        if r < 0.15 and out:
            out.append(rng.choice(out))  # a retry of an earlier command
            continue
        client = rng.choice([0, *seqs])
        if client:
            seqs[client] += 1
        seq = seqs.get(client, 0)
        key = b"k%d" % rng.randint(0, 25)
        value = bytes(rng.randint(0, 255) for _ in range(rng.randint(0, 6)))
        op = rng.random()
        if op < 0.55:
            out.append(encode_put(client, seq, key, value))
        elif op < 0.75:
            out.append(encode_delete(client, seq, key))
        else:
            expected = rng.choice([None, b"", value, b"x"])
            out.append(encode_cas(client, seq, key, expected, value))
    return out


def apply_all(m: KVStateMachine, first_index: int, cmds: list[bytes]) -> list[bool | None]:
    return [m.apply(first_index + i, c) for i, c in enumerate(cmds)]


def same_state(a: KVStateMachine, b: KVStateMachine) -> None:
    assert a.fingerprint() == b.fingerprint()
    assert (a.applied_index, a.malformed, a.client_count, len(a)) == (
        b.applied_index,
        b.malformed,
        b.client_count,
        len(b),
    )
    assert a.scan(b"", 0) == b.scan(b"", 0)
    assert a.dump() == b.dump()


def reseal(body: bytes) -> bytes:
    """``body`` (a snapshot without its CRC) with a correct CRC appended."""
    return body + struct.pack("<I", crc32c(body))


# -- round trips ------------------------------------------------------------------------------


def test_empty_machine_round_trip() -> None:
    empty = KVStateMachine()
    snap = empty.dump()
    assert HEADER.unpack_from(snap) == (SNAPSHOT_MAGIC, SNAPSHOT_VERSION, 0, 0, 0)
    # header, no keys, no clients, an empty etcd keyspace, the CRC
    assert len(snap) == HEADER.size + 8 + 8 + 8 + len(MVCCStore().dump()) + 4
    other = KVStateMachine()
    apply_all(other, 1, [encode_put(1, 1, b"a", b"b"), b"junk"])
    other.load(snap)  # replaces everything, including the counters
    same_state(other, empty)
    assert other.get(b"a") is None and other.client_count == 0


def test_header_layout() -> None:
    m = KVStateMachine()
    apply_all(m, 41, [encode_put(0, 0, b"k", b"v"), b"bad", encode_put(3, 1, b"k2", b"w")])
    snap = m.dump()
    assert HEADER.unpack_from(snap) == (b"RFS1", 3, 0, 43, 1)  # version 3, no alarm
    assert struct.unpack_from("<I", snap, len(snap) - 4)[0] == crc32c(snap[:-4])


@pytest.mark.parametrize("seed", range(4))
def test_round_trip_then_identical_futures(seed: int) -> None:
    rng = random.Random(seed)
    cmds = random_commands(rng, 600)
    a = KVStateMachine(dedup_window=8, max_clients=4)  # small: exercise windows and eviction
    apply_all(a, 1, cmds[:400])
    a.scan(b"k1", 3)  # a built scan index with pending changes must not matter
    apply_all(a, 401, cmds[400:420])
    snap = a.dump()
    b = KVStateMachine(dedup_window=8, max_clients=4)
    apply_all(b, 1, random_commands(random.Random(seed + 100), 50))  # unrelated prior state
    b.load(snap)
    same_state(a, b)
    assert b.applied_index == 420
    # Both apply the same commands (including retries of pre-snapshot ones): same answers.
    rest = cmds[420:] + cmds[:100]
    assert apply_all(a, 421, rest) == apply_all(b, 421, rest)
    same_state(a, b)


def test_snapshot_is_deterministic_across_histories() -> None:
    """Same logical state reached by different insertion orders: identical bytes."""
    a, b = KVStateMachine(), KVStateMachine()
    apply_all(a, 1, [encode_put(0, 0, b"x", b"1"), encode_put(0, 0, b"y", b"2")])
    apply_all(b, 1, [encode_put(0, 0, b"y", b"2"), encode_put(0, 0, b"x", b"1")])
    assert a.dump() == b.dump()


def test_larger_store_round_trip_and_scan() -> None:
    a = KVStateMachine()
    cmds = [encode_put(0, 0, b"key%06d" % i, b"v" * (i % 7)) for i in range(20_000)]
    a.apply_batch(1, cmds)
    b = KVStateMachine()
    b.load(bytearray(a.dump()))  # any bytes-like object
    assert b.fingerprint() == a.fingerprint()
    assert b.scan(b"key0199", 0) == a.scan(b"key0199", 0)
    assert len(b.scan(b"key0199", 0)) == 100
    b.apply(20_001, encode_put(0, 0, b"key0199aa", b"new"))  # the index keeps working
    assert b.scan(b"key0199a", 0) == [(b"key0199aa", b"new")]


# -- the dedup table survives -----------------------------------------------------------------


def test_dedup_still_dedups_after_restore() -> None:
    a = KVStateMachine(dedup_window=4)
    first = [
        encode_put(7, 1, b"k", b"first"),
        encode_delete(7, 2, b"missing"),
        encode_cas(7, 3, b"k", b"first", b"swapped"),
    ]
    assert apply_all(a, 1, first) == [True, False, True]
    b = KVStateMachine(dedup_window=4)
    b.load(a.dump())
    # Retries return their first results and change nothing.
    assert b.apply(4, encode_put(7, 1, b"k", b"retry")) is True
    assert b.apply(5, encode_delete(7, 2, b"missing")) is False
    assert b.apply(6, encode_cas(7, 3, b"k", b"first", b"again")) is True
    assert b.get(b"k") == b"swapped"
    # The window moves on as before: after seq 8, seq 3 is below it (a late duplicate).
    assert b.apply(7, encode_put(7, 8, b"z", b"1")) is True
    assert b.apply(8, encode_cas(7, 3, b"k", b"swapped", b"late")) is False
    assert b.get(b"k") == b"swapped"


def test_lru_order_of_clients_survives() -> None:
    a = KVStateMachine(max_clients=2)
    apply_all(
        a,
        1,
        [encode_put(1, 1, b"c1", b"x"), encode_put(2, 1, b"c2", b"x"), encode_put(1, 2, b"a", b"")],
    )  # client 2 is now the least recently active
    b = KVStateMachine(max_clients=2)
    b.load(a.dump())
    for m in (a, b):
        m.apply(4, encode_put(3, 1, b"c3", b"x"))  # evicts client 2, keeps client 1
        assert m.apply(5, encode_put(1, 1, b"c1", b"again")) is True
        assert m.get(b"c1") == b"x"  # client 1 was remembered
        assert m.apply(6, encode_put(2, 1, b"c2", b"again")) is True
        assert m.get(b"c2") == b"again"  # client 2 was forgotten: its retry applied again
    same_state(a, b)


def test_restore_into_smaller_max_clients_forgets_least_recent() -> None:
    a = KVStateMachine()
    apply_all(a, 1, [encode_put(c, 1, b"k%d" % c, b"v") for c in (1, 2, 3)])
    b = KVStateMachine(max_clients=2)
    b.load(a.dump())
    assert b.client_count == 2
    assert b.apply(4, encode_put(1, 1, b"k1", b"again")) is True
    assert b.get(b"k1") == b"again"  # client 1 was the least recently active


def test_results_outside_the_window_are_not_state() -> None:
    """Pruning is lazy, but only the live window is snapshotted (as in fingerprint)."""
    a = KVStateMachine(dedup_window=2)
    apply_all(a, 1, [encode_put(1, s, b"k", b"%d" % s) for s in range(1, 5)])
    b = KVStateMachine(dedup_window=2)
    apply_all(b, 1, [encode_put(1, s, b"k", b"%d" % s) for s in (1, 2, 3, 4)][-2:])
    b.applied_index = a.applied_index
    assert a.dump() == b.dump()


# -- corruption -------------------------------------------------------------------------------


@pytest.fixture
def populated() -> KVStateMachine:
    m = KVStateMachine(dedup_window=4)
    apply_all(m, 1, random_commands(random.Random(7), 80, clients=3))
    return m


def assert_rejected(m: KVStateMachine, data: bytes, match: str) -> None:
    before = (m.fingerprint(), m.applied_index, m.malformed, m.dump())
    with pytest.raises(CorruptionError, match=match):
        m.load(data)
    assert (m.fingerprint(), m.applied_index, m.malformed, m.dump()) == before  # untouched


def test_bad_magic_and_version(populated: KVStateMachine) -> None:
    snap = populated.dump()
    assert_rejected(populated, b"XXXX" + snap[4:], "bad magic")
    assert_rejected(populated, reseal(b"XXXX" + snap[4:-4]), "bad magic")
    bumped = snap[:4] + struct.pack("<H", 4) + snap[6:-4]
    assert_rejected(populated, reseal(bumped), "version 4")


def test_every_truncation_is_rejected(populated: KVStateMachine) -> None:
    snap = populated.dump()
    target = KVStateMachine()
    for n in range(len(snap)):
        with pytest.raises(CorruptionError, match="truncated|CRC|magic"):
            target.load(snap[:n])
    assert target.fingerprint() == KVStateMachine().fingerprint()


def test_flipped_bits_are_rejected(populated: KVStateMachine) -> None:
    snap = populated.dump()
    rng = random.Random(1)
    for off in [*range(4, 24), len(snap) - 1, *rng.sample(range(len(snap)), 60)]:
        bad = bytearray(snap)
        bad[off] ^= 1 << rng.randrange(8)
        with pytest.raises(CorruptionError):
            KVStateMachine().load(bytes(bad))


def test_trailing_bytes_are_rejected(populated: KVStateMachine) -> None:
    snap = populated.dump()
    assert_rejected(populated, snap + b"\x00", "CRC")
    assert_rejected(populated, reseal(snap[:-4] + b"\x00"), "unexpected bytes")


def build(
    keys: list[bytes], values: list[bytes], tail: bytes = b"\x00" * 8, version: int = 1
) -> bytes:
    """A hand-made, correctly sealed snapshot body (``tail`` = the clients section)."""
    body = HEADER.pack(SNAPSHOT_MAGIC, version, 0, 5, 0) + struct.pack("<Q", len(keys))
    body += b"".join(struct.pack("<I", len(k)) for k in keys)
    body += b"".join(struct.pack("<I", len(v)) for v in values)
    return reseal(body + b"".join(keys) + b"".join(values) + tail)


def test_sealed_but_invalid_content_is_rejected() -> None:
    m = KVStateMachine()
    ok = build([b"a", b"b"], [b"1", b"2"])
    m.load(ok)
    assert (m.get(b"b"), m.applied_index) == (b"2", 5)
    assert_rejected(m, build([b"b", b"a"], [b"1", b"2"]), "ascending")
    assert_rejected(m, build([b"a", b"a"], [b"1", b"2"]), "ascending")
    huge = HEADER.pack(SNAPSHOT_MAGIC, 1, 0, 5, 0) + struct.pack("<QII", 1, 1 << 30, 0) + b"a"
    assert_rejected(m, reseal(huge + bytes(8)), "truncated")
    assert_rejected(m, reseal(HEADER.pack(SNAPSHOT_MAGIC, 1, 0, 5, 0) + bytes(8)), "truncated")
    client = struct.pack("<QqI", 0, 1, 0)  # client id 0 never enters the table
    assert_rejected(m, build([], [], struct.pack("<Q", 1) + client), "client id 0")
    twice = struct.pack("<QqI", 9, 1, 1) + struct.pack("<Q", 1) + b"\x01"
    assert_rejected(m, build([], [], struct.pack("<Q", 2) + twice * 2), "repeated client")
    above = struct.pack("<QqI", 9, 1, 1) + struct.pack("<Q", 2) + b"\x01"  # seq > max_seq
    assert_rejected(m, build([], [], struct.pack("<Q", 1) + above), "dedup window")
    result = struct.pack("<QqI", 9, 1, 1) + struct.pack("<Q", 1) + b"\x02"  # not a bool
    assert_rejected(m, build([], [], struct.pack("<Q", 1) + result), "dedup window")
    # version 1 has no alarms (the field was reserved, 0); version 2 knows one (NOSPACE: bit 0)
    assert_rejected(m, reseal(ok[:6] + b"\x01\x00" + ok[8:-4]), "alarm bits")
    assert_rejected(m, reseal(ok[:4] + struct.pack("<HH", 2, 0b10) + ok[8:-4]), "alarm bits")
    etcd = MVCCStore().dump()
    m.load(build([b"a"], [b"1"], bytes(8) + struct.pack("<Q", len(etcd)) + etcd, SNAPSHOT_VERSION))


def test_alarms_and_size_survive_a_snapshot_and_a_version_1_snapshot_still_reads() -> None:
    m = KVStateMachine()
    apply_all(m, 1, [encode_put(0, 0, b"ab", b"123"), encode_alarm(NOSPACE, True)])
    assert m.alarms == {NOSPACE} and m.size_bytes == 5 + KEY_OVERHEAD
    copy = KVStateMachine()
    copy.load(m.dump())
    assert copy.alarms == {NOSPACE} and copy.size_bytes == 5 + KEY_OVERHEAD
    assert copy.fingerprint() == m.fingerprint() != KVStateMachine().fingerprint()
    apply_all(copy, 3, [encode_alarm(NOSPACE, False)])
    assert copy.alarms == set()
    old = build([b"a", b"b"], [b"1", b"2"])  # version 1
    copy.load(old)
    assert copy.alarms == set() and copy.size_bytes == 4 + 2 * KEY_OVERHEAD
    assert copy.get(b"b") == b"2"


@pytest.mark.parametrize("seed", range(5))
def test_a_frozen_copy_is_the_state_as_of_then(seed: int) -> None:
    """``frozen()`` (what the node serializes in another thread) keeps the state of the moment
    it was taken while the machine goes on applying: its snapshot equals a dump taken then."""
    rng = random.Random(seed)
    m = KVStateMachine()
    apply_all(m, 1, random_commands(rng, 300))
    then = m.dump()
    frozen = m.frozen()
    apply_all(m, 301, random_commands(rng, 300))  # keys added, removed, clients' windows moved
    assert m.dump() != then
    assert frozen.dump() == then


@pytest.mark.parametrize("seed", range(3))
def test_frozen_copies_share_the_clients_windows_until_the_machine_changes_one(seed: int) -> None:
    # Copying every client's window cost the loop ~140 ms per 100,000 clients at each
    # snapshot (a hostile hunt made up that many client ids): the windows are shared, and the
    # machine copies one before it changes it. Two copies in a row keep their own moments.
    rng = random.Random(seed)
    history = [random_commands(rng, 200) for _ in range(3)]
    m = KVStateMachine()
    apply_all(m, 1, history[0])
    first_then, first = m.dump(), m.frozen()
    assert all(first._clients[c] is w for c, w in m._clients.items())  # (nothing copied)
    apply_all(m, 201, history[1])
    second_then, second = m.dump(), m.frozen()
    apply_all(m, 401, history[2])
    assert first.dump() == first_then
    assert second.dump() == second_then
    fresh = KVStateMachine()
    for n, commands in enumerate(history):
        apply_all(fresh, 1 + 200 * n, commands)
    assert m.dump() == fresh.dump()  # (the machine itself: as if never frozen)
