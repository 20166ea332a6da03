"""A follower that installs a leader's snapshot decodes it in a worker thread: its loop goes on
meanwhile. With 1,000,000 keys written through etcd's API the restore held the loop ~8 s: no
heartbeat answered, no client served, and with the other follower down the leader lost its
quorum. Here the decoding is held at a gate for as long as the test likes: the loop must keep
running (the follower acknowledges new writes: they commit with it alone), its old state must
stay whole and where it was (nothing applied, reads that wait for the snapshot's index wait),
and once the gate opens it must hold everything, the writes committed meanwhile included."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from types import SimpleNamespace

import pytest

import raftfast
import raftfast.kv.fsm as kv_fsm
from raftfast.errors import CorruptionError
from raftfast.etcd.lessor import Lessor
from raftfast.etcd.mvcc import MVCCStore, encode
from raftfast.kv.commands import encode_put
from raftfast.kv.fsm import KVStateMachine
from raftfast.proto.etcd import rpc_pb2 as pb
from raftfast.server.snapshots import _restore_later
from tests.polling import until
from tests.server import in_process

GATE_S = 10.0  # the longest the gate holds a decoding (a loop it blocks: the test fails)


def _node(nid: str, peers: dict[str, str], tmp_path) -> raftfast.Node:
    return in_process.node(
        nid, peers, tmp_path, KVStateMachine(), snapshot_entries=20, snapshot_keep=0
    )


class _Gate:
    """Holds the KV snapshot's decoding (``_parse_snapshot``) until opened, or GATE_S."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.started = threading.Event()
        self.opened = threading.Event()
        self.timed_out = False
        self.on_loop_thread = False
        self._loop_thread = threading.get_ident()
        parse = kv_fsm._parse_snapshot

        def gated(*args):
            self.on_loop_thread = threading.get_ident() == self._loop_thread
            self.started.set()
            self.timed_out = not self.opened.wait(GATE_S)
            return parse(*args)

        monkeypatch.setattr(kv_fsm, "_parse_snapshot", gated)


async def _put(driver, key: bytes, value: bytes) -> None:
    await asyncio.wait_for(driver.propose([encode_put(0, 0, key, value)]), 30)


def test_the_loop_runs_while_a_leaders_snapshot_is_restored(tmp_path, monkeypatch):
    async def main() -> None:
        peers = in_process.peers(3)
        nodes = {nid: _node(nid, peers, tmp_path) for nid in peers}
        for node in nodes.values():
            await node.start()
        try:
            leader_id = await nodes["n1"].wait_for_leader(timeout=30)
            behind, other = (nid for nid in nodes if nid != leader_id)
            await nodes[behind].stop()
            leader = nodes[leader_id]._driver
            for i in range(100):  # (snapshots every 20 entries: the log behind them goes)
                await _put(leader, b"k%03d" % i, b"v%d" % i)
            await until(
                "the leader to compact its log past index 50", lambda: leader.raw.first_index > 50
            )
            # The other follower goes: from now on the leader commits only with `behind`.
            await nodes[other].stop()

            nodes[behind] = _node(behind, peers, tmp_path)
            await nodes[behind].start()
            follower = nodes[behind]._driver
            gate = _Gate(monkeypatch)
            await until("a snapshot to come to the follower", gate.started.is_set)
            assert not gate.timed_out, "the loop stood still while the snapshot was decoded"
            assert not gate.on_loop_thread, "the snapshot was decoded in the loop's thread"
            # (recorded with the WAL's record, before the restore: a node stopped meanwhile
            # kept the incarnations the snapshot made stale, and refused a re-added member)
            assert follower.incarnations.through == follower.raw.first_index - 1

            # Meanwhile: a leader (maybe re-elected when `other` went) commits with it alone.
            leader_id = await nodes[behind].wait_for_leader(timeout=30)
            leader = nodes[leader_id]._driver
            assert leader_id != behind
            await _put(leader, b"during", b"the restore")
            # ... and its old state stays as it was, whole: nothing applied, reads that wait
            # for what it acknowledged wait.
            before = follower.applied_index
            assert follower.applied_index < follower.raw.commit_index
            assert follower.fsm.get(b"k099") is None
            waiting = asyncio.ensure_future(follower.wait_applied(follower.raw.commit_index))
            await asyncio.sleep(0)
            assert not waiting.done()
            assert follower.applied_index == before
            assert not gate.timed_out

            gate.opened.set()
            await asyncio.wait_for(waiting, 30)
            await until(
                "the follower to catch up",
                lambda: (
                    follower.applied_index >= leader.applied_index
                    and follower.fsm.get(b"during") is not None
                ),
            )
            assert follower.fsm.get(b"k099") == b"v99"
            assert follower.fsm.get(b"during") == b"the restore"
            assert follower.fsm.fingerprint() == leader.fsm.fingerprint()
            assert follower.failed is None
        finally:
            for node in nodes.values():
                await node.stop()

    asyncio.run(main())


def test_restore_later_changes_nothing_until_swapped_in():
    source = KVStateMachine()
    source.apply(1, encode_put(0, 0, b"a", b"1"))
    out = io.BytesIO()
    source.snapshot(out)
    target = KVStateMachine()
    target.apply(1, encode_put(0, 0, b"b", b"2"))
    before = target.fingerprint()

    swap = target.restore_later(io.BytesIO(out.getvalue()))
    assert target.fingerprint() == before and target.get(b"a") is None
    swap()
    assert target.fingerprint() == source.fingerprint() and target.get(b"a") == b"1"

    with pytest.raises(CorruptionError):
        target.restore_later(io.BytesIO(out.getvalue()[:-1] + b"\x00"))


def test_no_lease_clock_runs_on_the_old_state_while_a_snapshot_is_restored():
    # A follower restoring a snapshot may be elected meanwhile: its lessor ran on the old
    # store, and revoked leases whose keep-alives waited for the restore (a review).
    store = MVCCStore()
    store.apply(encode(pb.LeaseGrantRequest(ID=1, TTL=5)))
    driver = SimpleNamespace(
        is_leader=True,
        restoring=True,
        raw=SimpleNamespace(term=3),
        settings=SimpleNamespace(auto_compaction_mode="periodic", auto_compaction_retention="0"),
        election_timeout_s=0.3,
    )
    lessor = Lessor(SimpleNamespace(driver=driver, store=store))
    lessor.sync()
    assert lessor.expiry == {}  # (no clock on the old state's leases)
    driver.restoring = False
    before = time.monotonic()
    lessor.sync()  # (as newly leader: every lease starts afresh, with an election's grace)
    assert lessor.expiry[1] >= before + 5 + 0.3


def test_a_subclass_overriding_restore_is_restored_by_its_own_restore():
    # restore_later knows nothing of a subclass's restore: a leader's snapshot bypassed it.
    class Indexed(KVStateMachine):
        def restore(self, inp):
            super().restore(inp)
            self.rebuilt = True

    class Plain(KVStateMachine):
        pass

    assert _restore_later(Indexed()) is None
    plain = Plain()
    assert _restore_later(plain) == plain.restore_later
    assert _restore_later(SimpleNamespace()) is None
