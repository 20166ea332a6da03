"""A node learns that a committed configuration left it out, and shuts down, even when the
log's own configurations no longer say that it was a member before: a follower restoring a
leader's snapshot holds the commits that come after it, and a second snapshot, installed in
the core meanwhile, replaced the log and its configurations. The held removal was then taken
for a configuration of a node still joining, and the node ran on outside the cluster until
its peers refused it (a review)."""

from __future__ import annotations

from types import SimpleNamespace

from raftfast.core.membership import Membership
from raftfast.server.membership import MembershipMixin


def _node(committed: Membership, log_configs: list[tuple[int, Membership]]) -> SimpleNamespace:
    node = SimpleNamespace(
        id="n3",
        removed=False,
        _joining=False,
        _committed_members=set(committed.members()),
        _removed_ids={},
        incarnations=SimpleNamespace(configuration=lambda index, changed: None),
        raw=SimpleNamespace(membership=log_configs[-1][1], configs=lambda: log_configs),
        shut_down=[],
    )
    node._shut_down_removed = node.shut_down.append
    return node


def test_a_held_removal_shuts_the_node_down_though_a_newer_snapshot_replaced_the_log():
    with_us = Membership.of_voters(["n1", "n2", "n3"])
    without_us = Membership.of_voters(["n1", "n2"])
    # The first snapshot (restored) had us; the second (in the core) does not, at index 90.
    node = _node(with_us, [(90, without_us)])
    MembershipMixin._config_committed(node, 50, without_us)
    assert node.shut_down == ["the configuration at index 50 leaves it out"]


def test_a_node_that_was_never_a_member_is_not_shut_down_by_an_old_configuration():
    # Catching up from the start: configurations from before it was added leave it out.
    without_us = Membership.of_voters(["n1", "n2"])
    with_us = Membership.of_voters(["n1", "n2", "n3"])
    node = _node(without_us, [(1, without_us), (40, with_us)])
    MembershipMixin._config_committed(node, 1, without_us)
    assert node.shut_down == []
    assert not node.removed


def test_a_node_added_back_since_is_not_shut_down():
    with_us = Membership.of_voters(["n1", "n2", "n3"])
    without_us = Membership.of_voters(["n1", "n2"])
    node = _node(with_us, [(50, without_us), (60, with_us)])
    MembershipMixin._config_committed(node, 50, without_us)
    assert node.shut_down == []
