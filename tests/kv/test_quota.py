"""The quota's refusals say what is short and what an operator does about it: a state over
--quota-backend-bytes is cut by deleting keys, a full disk by freeing that disk."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from raftfast.kv import quota as quota_mod
from raftfast.kv.quota import Quota
from raftfast.storage.fsutil import DISK_RESERVE_BYTES


def _node(size_bytes: int, limit: int) -> SimpleNamespace:
    fsm = SimpleNamespace(size_bytes=size_bytes, alarms=set(), recount=lambda: None)
    settings = SimpleNamespace(
        quota_backend_bytes=limit, data_dir="/nonexistent", max_request_bytes=1 << 20
    )
    return SimpleNamespace(id="n1", fsm=fsm, settings=settings, propose=None)


@pytest.fixture
def free(monkeypatch):
    room = {"bytes": 10 * DISK_RESERVE_BYTES}
    monkeypatch.setattr(quota_mod, "free_bytes", lambda _path: room["bytes"])
    return room


def test_a_state_over_the_quota_is_told_to_delete_keys(free):
    quota = Quota(_node(size_bytes=900, limit=1000))
    quota.raise_alarm = lambda why: None  # (no loop: the alarm's proposal is not the point)
    why = quota.refusal(200)
    assert why is not None and why.startswith("NOSPACE: the state holds 900 bytes")
    assert "; delete keys, then `raftfast alarm disarm`" in why
    assert "free space on that disk" not in why
    assert quota.refusal(50) is None


def test_a_full_disk_is_told_to_free_that_disk(free):
    free["bytes"] = DISK_RESERVE_BYTES + 100
    quota = Quota(_node(size_bytes=0, limit=1 << 30))
    quota.raise_alarm = lambda why: None
    why = quota.refusal(200)
    assert why is not None and "node n1's disk has" in why
    assert "free space on that disk (its --data-dir's file system)" in why


def test_disarm_refused_says_the_same_remedy(free):
    free["bytes"] = DISK_RESERVE_BYTES
    node = _node(size_bytes=0, limit=1 << 30)
    node.fsm.alarms.add(quota_mod.NOSPACE)
    with pytest.raises(ValueError, match="no room yet: .*free space on that disk.* first$"):
        asyncio.run(Quota(node).disarm())
