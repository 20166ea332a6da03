"""The incarnations file (raftfast/server/incarnations.py) on its own: what is remembered,
what is forgotten and when, and that nothing is taken before it is written down. The cluster
behaviour: tests/integration/test_wiped_node.py."""

from __future__ import annotations

import json

import pytest

from raftfast.errors import CorruptionError
from raftfast.server.incarnations import FILE, Incarnations


def test_a_peer_is_known_by_its_first_incarnation(tmp_path):
    inc = Incarnations(str(tmp_path))
    assert 0 < inc.own < 2**63 and Incarnations(str(tmp_path)).own == inc.own
    assert inc.check("n2", 7) is None and inc.check("n2", 7) is None
    assert inc.check("n2", 0) is None  # (a raftfast from before incarnations)
    why = inc.check("n2", 8)
    assert why is not None and "new data directory" in why and "member remove n2" in why
    assert Incarnations(str(tmp_path)).check("n2", 8) is not None  # (written down)


def test_configurations_forget_once_even_when_a_restart_applies_them_again(tmp_path):
    # A restart re-applies the configurations its log holds after its snapshot: forgetting
    # again let a wiped member that had joined since back in (a reviewer's reproducer).
    inc = Incarnations(str(tmp_path))
    inc.check("n3", 1)
    inc.configuration(5, {"n3"})  # n3 removed (or added) at index 5: it may come back anew
    assert inc.check("n3", 2) is None  # (the new n3, recorded)
    again = Incarnations(str(tmp_path))  # restarted: index 5 is applied again
    again.configuration(5, {"n3"})
    assert again.check("n3", 9) is not None  # n3 wiped since: still refused
    again.snapshot_installed(4)  # (older than what was applied: nothing)
    assert again.check("n3", 9) is not None
    again.snapshot_installed(12)  # a snapshot may hide a removal and re-addition: start over
    assert again.check("n3", 9) is None and again.through == 12


def test_nothing_is_taken_before_it_is_written_down(tmp_path, monkeypatch):
    inc = Incarnations(str(tmp_path))

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(inc, "_save", full)
    assert "cannot record" in (inc.check("n2", 5) or "")
    assert "cannot record" in (inc.check("n2", 5) or "")  # (not taken on the second try)
    assert "n2" not in inc.peers


def test_an_unreadable_file_stops_the_node(tmp_path):
    Incarnations(str(tmp_path))
    (tmp_path / FILE).write_text(json.dumps({"own": -1, "peers": {}}))
    with pytest.raises(CorruptionError, match=FILE):
        Incarnations(str(tmp_path))
